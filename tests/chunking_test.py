"""Tests of chunking.py: a vmapped function computed a few items at a time."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultraad_jax import chunking


@pytest.mark.parametrize(
    "total,item,target,multiple,want",
    [
        (64, 10, 640, 1, 64),  # everything fits
        (64, 10, 45, 1, 4),  # 4 x 10 <= 45 < 8 x 10
        (12, 10, 45, 1, 4),  # the largest divisor of 12 up to 4.5
        (64, 10, 45, 8, 8),  # at least the smallest multiple allowed
        (64, 10, 170, 8, 16),
        (7, 10, 30, 1, 1),  # prime: one at a time
        (6, 10, 30, 4, 3),  # 4 does not divide 6: multiple ignored
    ],
)
def test_chunk_size(total, item, target, multiple, want):
  got = chunking.chunk_size(total, item, target, multiple)
  assert got == want
  assert total % got == 0


def _fn(w, x, scale):
  y = jnp.tanh(w @ x) * scale
  return {"y": y, "norm": jnp.sum(y**2)}


def test_chunked_vmap_equals_vmap_and_loops_only_when_needed():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(4,)), jnp.float32)  # not batched
  scale = jnp.arange(1.0, 7.0)
  want = jax.vmap(_fn, in_axes=(0, None, 0))(w, x, scale)
  for target, loops in ((2, True), (5, True), (6, False)):
    fn = chunking.chunked_vmap(_fn, item_elements=1, target=target)
    vmapped = jax.jit(jax.vmap(fn, in_axes=(0, None, 0)))
    got = vmapped(w, x, scale)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    text = vmapped.lower(w, x, scale).as_text()
    assert ("while" in text) == loops, target
  # Unbatched it is the function itself.
  one = chunking.chunked_vmap(_fn, item_elements=1, target=1)(w[2], x, 3.0)
  np.testing.assert_allclose(one["y"], _fn(w[2], x, 3.0)["y"], rtol=1e-6)


def test_map_in_chunks_equals_vmap_on_a_pytree():
  rng = np.random.default_rng(0)
  args = (
      {"w": jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)},
      jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
      jnp.arange(6),
  )

  def fn(p, x, i):
    y = jnp.tanh(p["w"] @ x) * (i + 1)
    return {"y": y, "norm": jnp.sum(y**2)}

  want = jax.vmap(fn)(*args)
  for chunk in (1, 2, 3, 6, 12):
    got = jax.jit(functools.partial(chunking.map_in_chunks, fn, chunk=chunk))(
        args
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="does not divide"):
    chunking.map_in_chunks(fn, args, 4)
