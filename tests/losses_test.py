"""Tests for the training losses: values, stability, weighting."""

import jax
import jax.numpy as jnp
import numpy as np

from ultraad_jax import losses


def _naive_focal(z, y, gamma):
  p = 1 / (1 + np.exp(-z))
  pt = np.where(y > 0, p, 1 - p)
  return np.mean(-((1 - pt) ** gamma) * np.log(pt))


def test_focal_matches_definition_and_reduces_to_bce():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 8, 8)) * 3
  y = (rng.uniform(size=(3, 8, 8)) > 0.7).astype(np.float32)
  got = losses.focal_loss_with_logits(jnp.asarray(z, jnp.float32), y, gamma=2)
  np.testing.assert_allclose(got, _naive_focal(z, y, 2), rtol=1e-5)
  got0 = losses.focal_loss_with_logits(jnp.asarray(z, jnp.float32), y, gamma=0)
  bce = losses.bce_with_logits(jnp.asarray(z.ravel(), jnp.float32), y.ravel())
  np.testing.assert_allclose(got0, bce, rtol=1e-5)
  # On probabilities (clipped), the same value for moderate logits.
  p = jax.nn.sigmoid(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(
      losses.focal_loss_on_probs(p, y, gamma=2), _naive_focal(z, y, 2),
      rtol=1e-4)  # fmt: skip


def test_logit_losses_are_stable_for_huge_logits():
  z = jnp.asarray([[-1e4, 1e4, 80.0, -80.0]], jnp.float32)
  y = jnp.asarray([[1.0, 0.0, 1.0, 0.0]])
  for fn in (
      lambda z: losses.focal_loss_with_logits(z, y),
      lambda z: losses.bce_with_logits(z[0], y[0]),
  ):
    value, grad = jax.value_and_grad(fn)(z)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert value > 100  # The two wrong-sign huge logits dominate.


def test_dice_perfect_and_disjoint():
  y = np.zeros((2, 16, 16), np.float32)
  y[:, 4:12, 4:12] = 1
  assert losses.dice_loss(jnp.asarray(y), y) < 1e-2
  assert losses.dice_loss(jnp.asarray(1 - y), y) > 0.99


def test_weighted_mean_masks_samples_and_is_zero_without_weight():
  v = jnp.asarray([1.0, 5.0, 9.0])
  np.testing.assert_allclose(
      losses.weighted_mean(v, jnp.asarray([1.0, 0.0, 1.0])), 5.0
  )
  assert losses.weighted_mean(v, jnp.zeros(3)) == 0.0
  g = jax.grad(lambda v: losses.weighted_mean(v, jnp.zeros(3)))(v)
  assert np.all(g == 0)


def test_cross_entropy_with_absent_class_logits():
  logits = jnp.asarray([[2.0, -1e9, 0.0], [0.0, 1.0, -1e9]])
  labels = jnp.asarray([0, 1])
  ce = losses.cross_entropy(logits, labels)
  expected = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))])
  np.testing.assert_allclose(ce, expected, rtol=1e-5)
  # A query whose true class is absent is masked out: finite, no gradient.
  bad = jnp.asarray([[2.0, -1e9, 0.0]])
  val, g = jax.value_and_grad(
      lambda l: losses.cross_entropy(l, jnp.asarray([1]),
                                     weights=jnp.zeros(1)))(bad)  # fmt: skip
  assert val == 0 and np.all(g == 0)
