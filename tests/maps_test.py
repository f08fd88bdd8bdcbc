"""Tests for anomaly maps: logits, upsampling, memory, smoothing, scores."""

import jax
import jax.numpy as jnp
import numpy as np

from ultraad_jax import maps


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_text_logits_equal_softmax_over_cosines():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  t = rng.normal(size=(3, 2, 8)).astype(np.float32)
  z = maps.text_logits(jnp.asarray(p), jnp.asarray(t), 0.07)
  cos = np.einsum("lbnd,bcd->lbnc", _unit(p), _unit(t)) / 0.07
  soft = np.exp(cos) / np.exp(cos).sum(-1, keepdims=True)
  np.testing.assert_allclose(jax.nn.sigmoid(z), soft[..., 1], atol=1e-5)
  # Shared [2, D] text broadcasts over queries.
  z2 = maps.text_logits(jnp.asarray(p), jnp.asarray(t[0]), 0.07)
  np.testing.assert_allclose(z2[:, 0], z[:, 0], atol=1e-5)


def test_upsample_shape_and_constant():
  v = jnp.full((2, 3, 16), 0.3)
  up = maps.upsample(v, 32)
  assert up.shape == (2, 3, 32, 32)
  np.testing.assert_allclose(up, 0.3, atol=1e-6)
  ramp = jnp.arange(16.0)
  up = maps.upsample(ramp, 8)  # 4x4 grid, upsampled x2
  assert float(up.min()) >= 0 and float(up.max()) <= 15


def test_combine_layers_in_unit_interval():
  rng = np.random.default_rng(1)
  m = jnp.asarray(rng.uniform(size=(3, 2, 4, 4)), jnp.float32)
  for how in maps.LAYER_COMBINE:
    out = maps.combine_layers(m, how)
    assert out.shape == (2, 4, 4)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
  np.testing.assert_allclose(maps.combine_layers(m, "mean"), m.mean(0))


def test_memory_distance_zero_on_memory_and_respects_keep():
  rng = np.random.default_rng(2)
  mem = _unit(rng.normal(size=(2, 3, 4, 8))).astype(np.float32)
  query = mem[:, :2] * 5.0  # Queries 0, 1 are support samples 0, 1 (scaled).
  keep_all = jnp.ones((3,), bool)
  d = maps.memory_distance(jnp.asarray(query), jnp.asarray(mem), keep_all)
  assert d.shape == (2, 4)
  np.testing.assert_allclose(d, 0.0, atol=1e-5)
  # Excluding each query's own sample: distance becomes positive.
  keep = jnp.asarray([[False, True, True], [True, False, True]])
  d = maps.memory_distance(jnp.asarray(query), jnp.asarray(mem), keep)
  assert float(d.min()) > 1e-3 and float(d.max()) <= 1.0
  # Nothing to match: the maximal distance 1.
  d = maps.memory_distance(
      jnp.asarray(query), jnp.asarray(mem), jnp.zeros((3,), bool)
  )
  np.testing.assert_allclose(d, 1.0)


def test_gaussian_smoothing_keeps_range_and_constants():
  rng = np.random.default_rng(3)
  m = jnp.asarray(rng.uniform(size=(2, 20, 24)), jnp.float32)
  s = maps.gaussian_smooth(m, 2.0)
  assert s.shape == m.shape
  assert float(s.min()) >= 0 and float(s.max()) <= 1 + 1e-6
  assert float(s.std()) < float(m.std())  # It smooths.
  np.testing.assert_allclose(
      maps.gaussian_smooth(jnp.full((1, 9, 9), 0.7), 4.0), 0.7, atol=1e-5
  )
  assert maps.gaussian_smooth(m, 0.0) is m
  # An impulse spreads symmetrically around its pixel.
  imp = jnp.zeros((1, 21, 21)).at[0, 10, 10].set(1.0)
  s = np.asarray(maps.gaussian_smooth(imp, 1.5))[0]
  np.testing.assert_allclose(s, s[::-1, ::-1], atol=1e-7)
  assert s.argmax() == 10 * 21 + 10


def test_gaussian_smoothing_equals_normalised_zero_padded_convolutions():
  # Reference: two zero-padded 1-D correlations with the same kernel
  # (scipy), divided by the same smoothing of a map of ones.
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(7)
  for shape, sigma in (((3, 40, 56), 4.0), ((2, 17, 9), 1.5), ((1, 5, 5), 2.0)):
    m = rng.uniform(size=shape).astype(np.float32)
    k = maps.gaussian_kernel(sigma).astype(np.float64)

    def smooth(x, k=k):
      x = ndimage.correlate1d(x, k, axis=1, mode="constant")
      return ndimage.correlate1d(x, k, axis=2, mode="constant")

    want = smooth(m.astype(np.float64)) / smooth(np.ones(shape))
    got = maps.gaussian_smooth(jnp.asarray(m), sigma)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_smoothing_matrix_rows_are_convex_weights():
  a = maps.smoothing_matrix(30, 3.0)
  np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-6)
  assert (a >= 0).all()
  radius = len(maps.gaussian_kernel(3.0)) // 2
  assert a[0, radius] > 0 and a[0, radius + 1] == 0  # banded


def test_combine_layers_max_and_mean_against_numpy():
  rng = np.random.default_rng(5)
  m = rng.uniform(size=(5, 2, 6, 7)).astype(np.float32)
  np.testing.assert_allclose(
      maps.combine_layers(jnp.asarray(m), "mean"), m.mean(0), rtol=1e-6
  )
  np.testing.assert_array_equal(
      maps.combine_layers(jnp.asarray(m), "max"), m.max(0)
  )


def test_image_score_max_and_topk():
  m = jnp.zeros((2, 10, 10)).at[0, 3, 3].set(1.0).at[1].set(0.5)
  np.testing.assert_allclose(maps.image_score(m, "max"), [1.0, 0.5])
  np.testing.assert_allclose(
      maps.image_score(m, "topk_mean", topk=4), [0.25, 0.5]
  )
  # k larger than the image is capped.
  np.testing.assert_allclose(
      maps.image_score(m, "topk_mean", topk=10**6), [0.01, 0.5], rtol=1e-6
  )


def test_upsample_equals_jax_image_resize_bilinear():
  # The matrix form must reproduce jax.image.resize exactly, edges included,
  # for grids of CLIP models (7, 14, 16, 24) and an odd target size.
  rng = np.random.default_rng(3)
  for grid, size in ((7, 224), (14, 224), (16, 336), (8, 64), (3, 10)):
    v = jnp.asarray(rng.normal(size=(2, 3, grid * grid)), jnp.float32)
    want = jax.image.resize(v.reshape(2, 3, grid, grid), (2, 3, size, size),
                            method="bilinear")  # fmt: skip
    np.testing.assert_allclose(maps.upsample(v, size), want, atol=1e-5)
  a = maps.bilinear_matrix(4, 9)
  np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-6)  # Convex rows.


def test_text_logits_gradient_matches_normalise_first_form():
  rng = np.random.default_rng(4)
  p = jnp.asarray(rng.normal(size=(2, 3, 5, 8)) * 3, jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32)

  def reference(p):
    unit = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
    tt = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    return jnp.einsum("lbnd,bd->lbn", unit, tt[:, 1] - tt[:, 0]) / 0.05

  w = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  np.testing.assert_allclose(maps.text_logits(p, t, 0.05), reference(p),
                             rtol=1e-5, atol=1e-4)  # fmt: skip
  g = jax.grad(lambda p: jnp.sum(w * maps.text_logits(p, t, 0.05)))(p)
  g_ref = jax.grad(lambda p: jnp.sum(w * reference(p)))(p)
  np.testing.assert_allclose(g, g_ref, atol=1e-4 * float(jnp.abs(g_ref).max()))
