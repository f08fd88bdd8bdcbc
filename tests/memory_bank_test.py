"""Tests for the Ft / Pt / Lt memory bank read-out and the mini-net."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultraad_jax import memory_bank

D = 16


def _bank(seed=0, s=9):
  rng = np.random.default_rng(seed)
  ft = jnp.asarray(rng.normal(size=(s, D)), jnp.float32)
  pt = jnp.asarray(rng.normal(size=(s, D)), jnp.float32)
  labels = np.arange(s) % 3
  lt = jax.nn.one_hot(labels, 3)
  q = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
  return q, ft, pt, lt, labels


_logits = jax.jit(
    functools.partial(memory_bank.logits, beta=5.5, lam=1.0, scale=10.0),
    static_argnames="readout",
)


@pytest.mark.parametrize("readout", memory_bank.READOUTS)
def test_logits_invariant_to_support_order(readout):
  q, ft, pt, lt, _ = _bank()
  exclude = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 9)) > 0.7)
  a, _ = _logits(q, ft, pt, lt, readout=readout, exclude=exclude)
  perm = np.random.default_rng(2).permutation(9)
  b, _ = _logits(q, ft[perm], pt[perm], lt[perm], readout=readout,
                 exclude=exclude[:, perm])  # fmt: skip
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tip_adapter_formula_and_mean_readout():
  q, ft, pt, lt, labels = _bank()
  got, counts = _logits(q, ft, pt, lt, readout="sum")
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  a = lambda k: np.exp(-5.5 * (1 - unit(np.asarray(q)) @ unit(np.asarray(k)).T))
  want = 10.0 * (a(ft) @ np.asarray(lt) + a(pt) @ np.asarray(lt))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(counts, np.full((4, 3), 3.0))
  mean, _ = _logits(q, ft, pt, lt, readout="mean")
  np.testing.assert_allclose(mean, want / 3.0, rtol=1e-5)


def test_exclusion_removes_entries_completely():
  q, ft, pt, lt, _ = _bank()
  exclude = jnp.zeros((4, 9), bool).at[:, 0].set(True)
  a, counts = _logits(q, ft, pt, lt, readout="mean", exclude=exclude)
  # Whatever the excluded entry holds, the read-out does not change.
  b, _ = _logits(q, ft.at[0].set(q[0]), pt.at[0].set(q[0]), lt,
                 readout="mean", exclude=exclude)  # fmt: skip
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(counts[:, 0], 2.0)  # Entry 0 is class 0.
  # Gradients do not reach excluded keys.
  g = jax.grad(lambda k: jnp.sum(_logits(q, k, pt, lt, readout="mean",
                                         exclude=exclude)[0]))(ft)  # fmt: skip
  assert np.all(g[0] == 0) and np.any(g[1] != 0)


def test_absent_class_gets_zero_probability_without_nan():
  q, ft, pt, _, _ = _bank()
  lt = jax.nn.one_hot(jnp.zeros(9, jnp.int32), 3)  # normal_only bank
  logits, counts = _logits(q, ft, pt, lt, readout="mean")
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(probs[:, 0], 1.0)
  assert np.all(counts[:, 1:] == 0) and np.all(np.isfinite(logits))


def test_mininet_is_identity_at_init_and_affinity_range():
  params = memory_bank.mininet_init(jax.random.key(0), dim=D, reduction=4)
  assert params["w1"].shape == (D, 4) and not np.any(params["w2"])
  f = jnp.asarray(np.random.default_rng(3).normal(size=(5, D)), jnp.float32)
  out = memory_bank.mininet_apply(params, f)
  cos = np.sum(np.asarray(out) * np.asarray(f), -1) / (
      np.linalg.norm(out, axis=-1) * np.linalg.norm(f, axis=-1)
  )
  np.testing.assert_allclose(cos, 1.0, rtol=1e-6)
  a = memory_bank.affinity(f, jnp.concatenate([f[:1], -f[:1]]), beta=2.0)
  np.testing.assert_allclose(a[0], [1.0, np.exp(-4.0)], rtol=1e-5)
