"""Tests for the training losses: values, stability, weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultraad_jax import losses
from ultraad_jax import maps


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


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_fused_map_losses_equal_the_separate_losses_and_gradients(gamma):
  # Fresh random inputs: logits with saturated values, soft and hard
  # targets, zero weights (a masked-out sample) on each term.
  rng = np.random.default_rng(int(gamma * 10) + 1)
  z = rng.normal(size=(4, 6, 6)) * 4
  z[0, 0, :3] = [60.0, -60.0, 0.0]
  z = jnp.asarray(z, jnp.float32)
  y = rng.uniform(size=(4, 6, 6)).astype(np.float32)
  y[1] = y[1] > 0.5
  wf = jnp.asarray([1.0, 0.0, 1.0, 2.0])
  wd = jnp.asarray([1.0, 1.0, 0.0, 1.0])

  def separate(z):
    return (
        losses.focal_loss_with_logits(z, y, gamma=gamma, weights=wf),
        losses.dice_loss(jax.nn.sigmoid(z), y, weights=wd),
    )

  def fused(z):
    return losses.map_losses(z, y, gamma=gamma, focal_weights=wf,
                             dice_weights=wd)  # fmt: skip

  np.testing.assert_allclose(fused(z), separate(z), rtol=1e-6, atol=1e-7)
  for mix in ((1.0, 0.0), (0.0, 1.0), (0.7, 1.3)):
    grads = [
        jax.grad(lambda z, f=f: mix[0] * f(z)[0] + mix[1] * f(z)[1])(z)
        for f in (separate, fused)
    ]
    scale = float(jnp.max(jnp.abs(grads[0])))
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-5 * scale)
  # Under vmap (the model maps it over layers) and jit.
  stacked = jnp.stack([z, -z])
  got = jax.jit(jax.vmap(fused))(stacked)
  np.testing.assert_allclose(got[0][0], fused(z)[0], rtol=1e-6)
  np.testing.assert_allclose(got[1][1], separate(-z)[1], rtol=1e-6)


def test_fused_map_losses_zero_weights_give_zero_and_finite_gradient():
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4)), jnp.float32)
  y = jnp.zeros((2, 4, 4))
  fn = lambda z: sum(losses.map_losses(
      z, y, focal_weights=jnp.zeros(2), dice_weights=jnp.zeros(2)))  # fmt: skip
  value, grad = jax.value_and_grad(fn)(z)
  assert value == 0.0
  assert np.all(grad == 0)


def _upsampled_reference(g, y, wf, wd, gamma):
  up = maps.upsample(g, y.shape[-1])
  return jax.vmap(lambda z: losses.map_losses(
      z, y, gamma=gamma, focal_weights=wf, dice_weights=wd))(up)  # fmt: skip


def _upsampled_inputs(rng, episodes=None, layers=3, batch=4, grid=4, size=12):
  lead = () if episodes is None else (episodes,)
  g = rng.normal(size=lead + (layers, batch, grid * grid)) * 3
  y = (rng.uniform(size=lead + (batch, size, size)) > 0.7).astype(np.float32)
  wf = rng.uniform(size=lead + (batch,)) * (rng.uniform(size=batch) > 0.2)
  wd = (rng.uniform(size=lead + (batch,)) > 0.3).astype(np.float32)
  return tuple(jnp.asarray(x, jnp.float32) for x in (g, y, wf, wd))


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_upsampled_map_losses_equal_upsample_then_map_losses(gamma):
  # Values, and gradients for arbitrary cotangents on every layer's focal
  # and dice terms (the backward pass combines the saved partials).
  rng = np.random.default_rng(3 + int(gamma))
  g, y, wf, wd = _upsampled_inputs(rng)
  fused = lambda g: losses.upsampled_map_losses(
      g, y, gamma=gamma, focal_weights=wf, dice_weights=wd)  # fmt: skip
  ref = lambda g: _upsampled_reference(g, y, wf, wd, gamma)
  (vf, vjp_f), (vr, vjp_r) = jax.vjp(fused, g), jax.vjp(ref, g)
  np.testing.assert_allclose(vf, vr, rtol=1e-6, atol=1e-7)
  cts = tuple(jnp.asarray(rng.normal(size=(2, 3)), jnp.float32))
  (df,), (dr,) = vjp_f(cts), vjp_r(cts)
  np.testing.assert_allclose(df, dr, atol=1e-5 * float(jnp.abs(dr).max()))
  assert float(jnp.abs(dr).max()) > 0


@pytest.mark.parametrize("chunk_episodes", [1, 2, 3, 6])
def test_upsampled_map_losses_chunked_under_vmap(chunk_episodes):
  # Vmapped over 6 episodes with room for `chunk_episodes` at once: the same
  # values and gradients as the reference, and a loop in the program only
  # when the episodes do not all fit.
  rng = np.random.default_rng(chunk_episodes)
  g, y, wf, wd = _upsampled_inputs(rng, episodes=6)
  per_episode = 3 * 4 * 12 * 12

  def total(fn):
    def one(g, y, wf, wd):
      focal, dice = fn(g, y, wf, wd)
      return jnp.sum(focal * jnp.arange(1.0, 4.0)) + 2.0 * jnp.sum(dice)

    return jax.vmap(jax.value_and_grad(one))

  fused = total(lambda g, y, wf, wd: losses.upsampled_map_losses(
      g, y, focal_weights=wf, dice_weights=wd,
      chunk_elements=chunk_episodes * per_episode))  # fmt: skip
  ref = total(lambda g, y, wf, wd: _upsampled_reference(g, y, wf, wd, 2.0))
  (vf, gf), (vr, gr) = jax.jit(fused)(g, y, wf, wd), ref(g, y, wf, wd)
  np.testing.assert_allclose(vf, vr, rtol=1e-6)
  np.testing.assert_allclose(gf, gr, atol=1e-5 * float(jnp.abs(gr).max()))
  text = jax.jit(fused).lower(g, y, wf, wd).as_text()
  assert ("while" in text) == (chunk_episodes < 6)
