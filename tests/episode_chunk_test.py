"""Tests of the train step computed a few episodes at a time.

The chunked step (train.episode_chunk, chunking.map_in_chunks) must give
what the plain vmap gives, and on a mesh it must not move episodes between
devices.
"""

import dataclasses

import jax
import numpy as np
import pytest

import engine_helpers
from ultraad_jax import losses
from ultraad_jax import train

P = jax.sharding.PartitionSpec


@pytest.mark.parametrize(
    "setting,episodes,axis,elements,backend,want",
    [
        (0, 64, 1, 196_608, "cpu", 4),  # tiny: 4 x 196k <= 1M
        (0, 64, 2, 196_608, "cpu", 8),  # 4 per device on 2 devices
        (0, 8, 1, 4_816_896, "cpu", 8),  # ViT-B/16 episodes: all at once
        (0, 16, 1, 4_816_896, "cpu", 16),  # ... up to 2^27 elements
        (0, 64, 1, 4_816_896, "cpu", 16),  # ... then chunks of at most that
        (0, 64, 2, 4_816_896, "cpu", 32),  # 16 per device on 2 devices
        (0, 48, 1, 4_816_896, "cpu", 24),  # the largest divisor that fits
        (0, 4, 1, 1 << 28, "cpu", 1),  # huge episodes: one at a time
        (0, 64, 1, 4_816_896, "gpu", 64),  # accelerators: all at once
        (0, 64, 1, 196_608, "gpu", 64),  # accelerators: all at once
        (0, 7, 1, 196_608, "cpu", 7),  # no divisor of 7 in 2..5
        (2, 64, 4, 1, "gpu", 8),  # explicit: per device
    ],
)
def test_episode_chunk_rules(setting, episodes, axis, elements, backend, want):
  got = train.episode_chunk(setting, episodes, axis, elements, backend)
  assert got == want
  assert episodes % got == 0 and got % axis == 0


def test_episode_chunk_rejects_a_non_divisor():
  with pytest.raises(
      ValueError, match=r"train.episode_chunk=3.*\[1, 2, 4, 8\]"
  ):
    train.episode_chunk(3, 16, 2, 1, "cpu")
  with pytest.raises(ValueError, match="expected 0"):
    train.episode_chunk(-1, 16, 2, 1, "cpu")


def _step(inputs, chunk, **jit_kwargs):
  return engine_helpers.jit_engine_fn(
      train.train_step, inputs, jit_kwargs, chunk=chunk
  )


def _assert_same(got, want, before):
  """Same step up to float reassociation.

  Each parameter may differ by a few ulps plus 1e-5 of its leaf's largest
  update: the text prompts' gradient comes through the text tower, and even
  the plain vmap over 1 or 4 episodes differs by 2e-6 of that update there.
  """
  (state, metrics), (state_want, metrics_want) = got, want
  for a, b, b0 in zip(jax.tree.leaves(state["params"]),
                      jax.tree.leaves(state_want["params"]),
                      jax.tree.leaves(before["params"])):  # fmt: skip
    update = float(np.max(np.abs(np.asarray(b) - np.asarray(b0))))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5 * update)
  assert int(state["step"]) == int(state_want["step"])
  for k in metrics_want:
    np.testing.assert_allclose(metrics[k], metrics_want[k], rtol=1e-5,
                               err_msg=k)  # fmt: skip


def test_chunked_train_step_equals_the_vmapped_one(step_inputs):
  want = _step(step_inputs, 0)(*step_inputs["args"])
  # Not a no-op comparison: the step changed the parameters.
  moved = jax.tree.leaves(want[0]["params"])[0]
  assert not np.allclose(moved, jax.tree.leaves(
      step_inputs["args"][0]["params"])[0])  # fmt: skip
  for chunk in (1, 2):
    _assert_same(_step(step_inputs, chunk)(*step_inputs["args"]), want,
                 step_inputs["args"][0])  # fmt: skip


def _on_two_devices(step_inputs):
  """The step's inputs with episodes split over a 2-device mesh.

  Returns:
    (the arguments, out_shardings for the step).
  """
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (the root conftest forces 8 CPU devices)")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("episode",))
  by_episode = jax.sharding.NamedSharding(mesh, P("episode"))
  replicated = jax.sharding.NamedSharding(mesh, P())
  state, ep_data, frozen, cache, clip_params, key = step_inputs["args"]
  state = {
      "params": jax.device_put(state["params"], by_episode),
      "opt": jax.device_put(state["opt"], by_episode),
      "step": jax.device_put(state["step"], replicated),
  }
  args = (
      state,
      jax.device_put(ep_data, by_episode),
      jax.device_put(frozen, by_episode),
      jax.device_put(cache, replicated),
      jax.device_put(clip_params, replicated),
      key,
  )
  return args, (jax.tree.map(lambda x: x.sharding, state), by_episode)


def _assert_local_loop(hlo):
  """A compiled step with a loop over chunks and no cross-device traffic."""
  assert "while" in hlo  # the chunked form, not a plain vmap
  for collective in ("all-gather", "all-to-all", "collective-permute",
                     "all-reduce"):  # fmt: skip
    assert collective not in hlo, collective


def test_chunked_step_on_a_mesh_keeps_episodes_on_their_devices(step_inputs):
  args, out_shardings = _on_two_devices(step_inputs)
  # 2 episodes at once: one on each device per loop iteration.
  step = _step(step_inputs, 2, out_shardings=out_shardings)
  _assert_local_loop(step.lower(*args).compile().as_text())
  got = step(*args)
  assert got[0]["params"]["fusion"]["wq"].sharding.spec == P("episode")
  _assert_same(got, _step(step_inputs, 0)(*step_inputs["args"]),
               step_inputs["args"][0])  # fmt: skip


def test_fused_map_losses_on_a_mesh_keep_episodes_on_their_devices(
    step_inputs, monkeypatch
):
  # The fused map losses chunk the episode axis by themselves
  # (chunking.chunked_vmap): 2 of the 4 episodes per iteration here, and
  # still one on each device, so nothing crosses devices.
  bb = step_inputs["bb"]
  per_episode = 4 * 6 * bb.image_size**2  # layers x support x H x W
  monkeypatch.setattr(losses, "MAP_LOSS_CHUNK_ELEMENTS", 2 * per_episode)
  fused = dict(step_inputs, cfg=dataclasses.replace(
      step_inputs["cfg"], fused_map_loss="on"))  # fmt: skip
  args, out_shardings = _on_two_devices(step_inputs)
  step = _step(fused, 0, out_shardings=out_shardings)
  _assert_local_loop(step.lower(*args).compile().as_text())
  _assert_same(step(*args), _step(step_inputs, 0)(*step_inputs["args"]),
               step_inputs["args"][0])  # fmt: skip
