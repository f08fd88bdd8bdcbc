"""Tests for the baselines (zero-shot, patch memory, linear probe, prior)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultraad_jax import baselines
from ultraad_jax import clip
from ultraad_jax import maps

L, N, D, H = 2, 16, 64, 32


@pytest.fixture(scope="module")
def text():
  bb = clip.tiny()
  return jax.jit(functools.partial(baselines.zero_shot_text, bb))(bb.params)


def test_zero_shot_text_ensembles(text):
  anomaly, classes = text
  assert anomaly.shape == (2, D) and classes.shape == (3, D)
  np.testing.assert_allclose(jnp.linalg.norm(anomaly, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(anomaly[0], classes[0], rtol=1e-6)  # same words
  assert float(jnp.abs(anomaly[0] - anomaly[1]).max()) > 1e-4


def test_zero_shot_maps_scores_and_classes(text):
  anomaly, classes = text
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(3, D)), jnp.float32)
  p = jnp.asarray(rng.normal(size=(L, 3, N, D)), jnp.float32)
  run = jax.jit(functools.partial(baselines.zero_shot, temperature=0.01,
                                  image_size=H))  # fmt: skip
  m, s, c = run(g, p, anomaly, classes)
  assert m.shape == (3, H, H) and s.shape == (3,) and c.shape == (3, 3)
  assert float(m.min()) >= 0 and float(m.max()) <= 1
  np.testing.assert_allclose(c.sum(-1), 1, rtol=1e-5)
  want = jax.nn.sigmoid(maps.upsample(maps.text_logits(p, anomaly, 0.01), H))
  np.testing.assert_allclose(m, want.mean(0), atol=1e-5)
  cos = maps.l2_normalize(g) @ anomaly.T
  np.testing.assert_allclose(
      s, jax.nn.sigmoid((cos[:, 1] - cos[:, 0]) / 0.01), rtol=1e-4
  )


def test_patch_memory_zero_on_known_normal_patches():
  rng = np.random.default_rng(1)
  mem = maps.l2_normalize(jnp.asarray(rng.normal(size=(L, 4, N, D)),
                                      jnp.float32))  # fmt: skip
  normal = jnp.asarray([True, True, False, False])
  query = jnp.concatenate([mem[:, :1], mem[:, 2:3]], axis=1)
  run = jax.jit(functools.partial(baselines.patch_memory, image_size=H))
  m, s = run(query, mem, normal)
  assert m.shape == (2, H, H)
  np.testing.assert_allclose(m[0], 0.0, atol=1e-5)  # a normal sample
  assert float(s[1]) > 0.1  # an abnormal sample is not in the memory
  assert float(m.min()) >= 0 and float(m.max()) <= 1


def test_linear_probe_fits_separable_support_and_vmaps():
  rng = np.random.default_rng(2)
  centers = rng.normal(size=(3, D)) * 3
  labels = np.repeat([0, 1, 2], 4)
  sup = centers[labels] + rng.normal(size=(12, D))
  qry = centers[[0, 1, 2]] + rng.normal(size=(3, D))
  run = jax.jit(baselines.linear_probe)
  probs, score = run(jnp.asarray(qry, jnp.float32),
                     jnp.asarray(sup, jnp.float32), labels)  # fmt: skip
  np.testing.assert_array_equal(np.argmax(probs, -1), [0, 1, 2])
  np.testing.assert_allclose(score, 1 - probs[:, 0], rtol=1e-6)
  again, _ = run(jnp.asarray(qry, jnp.float32),
                 jnp.asarray(sup, jnp.float32), labels)  # fmt: skip
  np.testing.assert_array_equal(probs, again)  # fixed schedule: deterministic
  # Two episodes at once give the per-episode answers.
  stack = lambda a: jnp.stack([jnp.asarray(a, jnp.float32)] * 2)
  both, _ = jax.jit(jax.vmap(baselines.linear_probe))(
      stack(qry), stack(sup), jnp.stack([labels, labels])
  )
  np.testing.assert_allclose(both[0], probs, atol=1e-5)


def test_center_prior_is_mean_mask():
  masks = np.zeros((3, H, H), np.float32)
  masks[0, 8:16, 8:16] = 1
  masks[1, 12:20, 12:20] = 1
  m, s = baselines.center_prior(jnp.asarray(masks), 5)
  assert m.shape == (5, H, H)
  np.testing.assert_allclose(m[2], masks.mean(0))
  np.testing.assert_allclose(s, 2 / 3, rtol=1e-6)
  m, _ = baselines.center_prior(
      jnp.asarray(masks), 1, jnp.asarray([True, False, False])
  )
  np.testing.assert_allclose(m[0], masks[0])
