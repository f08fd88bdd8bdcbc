"""The PyTorch UltraAD head (benchmarks/peer_ultraad.py) equals the JAX one.

bench.py's few-shot sweep only compares like with like if its PyTorch peer
trains the same head with the same loss as the engine. Checked here on the
tiny CLIP: the loss and each of its terms, the gradient of every trainable
parameter, the frozen buffers built in PyTorch, the bilinear upsampling, and
the peer's backbone forward against the feature cache.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench_helpers
from configs import common
from ultraad_jax import clip
from ultraad_jax import features
from ultraad_jax import model

torch = pytest.importorskip("torch")

LAYERS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def env():
  bench = bench_helpers.load_benchmark(
      "bench"
  )  # puts benchmarks/ on sys.path for peer_ultraad
  pu = bench_helpers.load_benchmark("peer_ultraad")
  backbone = clip.tiny()
  cfg = model.ModelConfig.from_dict(
      common.model_config(layers=LAYERS).to_dict()
  )
  pt_model = bench.bench_backbone.torch_clip(backbone)
  tower = pu.TextTower(pt_model)
  grad_fn = jax.jit(
      jax.value_and_grad(
          functools.partial(model.loss_fn, cfg=cfg, backbone=backbone),
          has_aux=True,
      )
  )
  init = jax.jit(lambda k, s, p: model.init(k, cfg, backbone, p, s))
  frozen = jax.jit(lambda s, p: model.frozen(cfg, backbone, p, s))
  return dict(bench=bench, pu=pu, backbone=backbone, cfg=cfg,
              pt_model=pt_model, tower=tower, grad_fn=grad_fn, init=init,
              frozen=frozen)  # fmt: skip


def _support(backbone, labels, group, mask_valid, seed):
  """Random features and elliptic lesion masks for abnormal samples."""
  rng = np.random.default_rng(seed)
  s, d = len(labels), backbone.embed_dim
  n, h = backbone.grid_size**2, backbone.image_size
  yy, xx = np.mgrid[0:h, 0:h]
  masks = np.zeros((s, h, h), np.float32)
  for i in np.flatnonzero(labels):
    cy, cx = rng.uniform(0.3 * h, 0.7 * h, 2)
    ry, rx = rng.uniform(0.1 * h, 0.25 * h, 2)
    masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
  return model.Support(
      global_embed=rng.standard_normal((s, d)).astype(np.float32),
      patch_tokens=rng.standard_normal((len(LAYERS), s, n, d)).astype(
          np.float32
      ),
      masks=masks,
      labels=np.asarray(labels, np.int32),
      group=np.asarray(group, np.int32),
      text_embed=rng.standard_normal((s, d)).astype(np.float32),
      mask_valid=np.asarray(mask_valid, bool),
  )


def _torch_support(pu, support):
  t = lambda x, dtype=None: torch.as_tensor(np.asarray(x), dtype=dtype)
  return pu.Support(
      global_embed=t(support.global_embed),
      patch_tokens=t(support.patch_tokens),
      masks=t(support.masks),
      labels=t(support.labels, torch.int64),
      group=t(support.group, torch.int64),
      mask_valid=t(support.mask_valid),
  )


# Per-class support with two views of one image (a shared group) and one
# unknown mask; then a normal-only support, where BCE, CE and dice are off.
CASES = {
    "per_class": dict(labels=[0, 0, 1, 1, 2, 2], group=[0, 0, 1, 2, 3, 4],
                      mask_valid=[1, 1, 1, 0, 1, 1]),
    "normal_only": dict(labels=[0] * 6, group=[0, 1, 2, 3, 4, 5],
                        mask_valid=[1] * 6),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_terms_and_gradients_match_jax(env, case):
  pu, backbone, cfg = env["pu"], env["backbone"], env["cfg"]
  support = _support(backbone, **CASES[case], seed=len(case))
  params = env["init"](jax.random.key(1), support, backbone.params)
  # Away from the initialisation (where the mini-net's output layer is 0 and
  # its first layer gets no gradient), so every parameter's gradient counts.
  flat, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(flat))
  params = jax.tree.unflatten(treedef, [
      x + 0.05 * (1.0 + jnp.std(x)) * jax.random.normal(k, x.shape)
      for x, k in zip(flat, keys)
  ])  # fmt: skip
  state = env["frozen"](support, backbone.params)
  (loss_j, aux_j), grads_j = env["grad_fn"](
      params, state, support, jax.random.key(3), clip_params=backbone.params
  )

  pu.check_config(cfg, image_size=backbone.image_size, support_size=6)
  params_t = pu.params_from_jax(params)
  loss_t, aux_t = pu.loss_fn(
      params_t, pu.buffers_from_jax(state), _torch_support(pu, support),
      cfg=cfg, tower=env["tower"], image_size=backbone.image_size,
  )  # fmt: skip
  loss_t.backward()

  assert sorted(aux_t) == sorted(aux_j)
  for key in aux_j:
    np.testing.assert_allclose(
        float(aux_t[key].detach()), float(aux_j[key]), rtol=1e-5, atol=1e-7,
        err_msg=key,
    )  # fmt: skip
  assert float(loss_t.detach()) == pytest.approx(float(loss_j), rel=1e-5)
  if case == "normal_only":
    assert float(aux_j["frac_bce"]) == float(aux_j["frac_ce"]) == 0.0
  else:
    assert 0.0 < float(aux_j["frac_ce"]) and float(aux_j["bce"]) > 0.0

  paths = jax.tree_util.tree_flatten_with_path(grads_j)[0]
  got = pu.leaves(params_t)
  assert len(paths) == len(got)
  for (path, g_j), p_t in zip(paths, got):
    name = jax.tree_util.keystr(path)
    g_j = np.asarray(g_j)
    assert p_t.grad is not None, name
    g_t = p_t.grad.numpy()
    assert g_t.shape == g_j.shape, name
    scale = np.max(np.abs(g_j))
    if case == "per_class":
      # Every parameter receives gradient from the per-class loss.
      assert scale > 0, name
    np.testing.assert_allclose(g_t, g_j, rtol=0, atol=1e-4 * scale + 1e-12,
                               err_msg=name)  # fmt: skip


def test_torch_built_buffers_equal_the_frozen_state(env):
  pu, backbone, cfg = env["pu"], env["backbone"], env["cfg"]
  support = _support(backbone, **CASES["per_class"], seed=5)
  state = env["frozen"](support, backbone.params)
  ts = _torch_support(pu, support)
  built = {
      **pu.prompt_buffers(cfg, backbone, env["tower"]),
      **pu.bank_buffers(ts.labels, ts.group,
                        torch.as_tensor(support.text_embed)),
  }  # fmt: skip
  for key, value in built.items():
    np.testing.assert_allclose(value.numpy(), np.asarray(state[key]),
                               rtol=0, atol=1e-6, err_msg=key)  # fmt: skip


@pytest.mark.parametrize("grid,size", [(8, 64), (7, 20), (24, 336)])
def test_interpolate_matches_jax_bilinear_upsampling(grid, size):
  x = np.random.default_rng(grid).standard_normal((3, grid, grid))
  x = x.astype(np.float32)
  want = jax.image.resize(jnp.asarray(x), (3, size, size), "bilinear")
  got = torch.nn.functional.interpolate(
      torch.as_tensor(x)[:, None], size=(size, size), mode="bilinear",
      align_corners=False,
  )[:, 0]  # fmt: skip
  np.testing.assert_allclose(got.numpy(), np.asarray(want), atol=1e-5)


def test_peer_backbone_forward_matches_the_feature_cache(env):
  bench, backbone = env["bench"], env["backbone"]
  images, masks, _ = bench_helpers.sibling("sweep_inputs").synthetic_pool(
      3, backbone.image_size, seed=4
  )
  cache = features.build(
      backbone, backbone.params, images, masks, None, np.zeros(3, bool),
      layers=LAYERS, num_views=1, batch_size=3,
  )  # fmt: skip
  encoder = bench.bench_backbone.torch_image_encoder(env["pt_model"], LAYERS)
  pixels = np.ascontiguousarray(clip.normalize(images).transpose(0, 3, 1, 2))
  with torch.no_grad():
    g, tokens, _ = encoder(torch.as_tensor(pixels))
  rows = cache.rows[:, 0]
  for got, want in ((g, cache.global_embed[rows]),
                    (tokens, cache.patch_tokens[:, rows])):  # fmt: skip
    want = np.asarray(want)
    np.testing.assert_allclose(got.numpy(), want, rtol=0,
                               atol=1e-5 * np.max(np.abs(want)))  # fmt: skip


def test_check_config_rejects_what_it_does_not_compute(env):
  pu, backbone = env["pu"], env["backbone"]
  size = backbone.image_size
  base = dict(layers=LAYERS)
  pu.check_config(model.ModelConfig(**base), image_size=size, support_size=6)
  pu.check_config(model.ModelConfig(**base, loss_map_size=size),
                  image_size=size)  # fmt: skip
  for bad, key in (
      (dict(fusion="gated"), "fusion"),
      (dict(prompt_mode="input"), "prompt_mode"),
      (dict(adapter=False), "adapter"),
      (dict(map_loss="combined"), "map_loss"),
      (dict(bank_readout="sum"), "bank_readout"),
      (dict(bank_train_ft=False), "bank_train_ft"),
      (dict(loss_map_size=16), "loss_map_size"),
      (dict(train_batch_size=2), "train_batch_size"),
  ):
    with pytest.raises(ValueError, match=key):
      pu.check_config(model.ModelConfig(**base, **bad), image_size=size,
                      support_size=6)  # fmt: skip
