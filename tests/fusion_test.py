"""Tests for the prompt-patch fusion and the per-layer adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultraad_jax import fusion

L, B, N, D = 3, 2, 5, 16


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = fusion.rms_normalize(jnp.asarray(rng.normal(size=(L, B, N, D))))
  t = jnp.asarray(rng.normal(size=(B, 2, D)), jnp.float32)
  return x, t


_apply = jax.jit(fusion.apply, static_argnames=("mode", "temperature"))


def test_rms_normalize_scale():
  x = fusion.rms_normalize(jnp.asarray([[3.0, 4.0, 0.0, 0.0]]))
  np.testing.assert_allclose(jnp.linalg.norm(x), 2.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["cross_attention", "gated"])
def test_zero_init_is_identity_and_prompts_matter(mode):
  x, t = _inputs()
  p0 = fusion.init(jax.random.key(0), mode=mode, num_layers=L, dim=D,
                   reduction=4, init_scale=0.0)  # fmt: skip
  np.testing.assert_allclose(
      _apply(p0, x, t, mode=mode, temperature=0.1), x, atol=1e-6
  )
  p = fusion.init(jax.random.key(0), mode=mode, num_layers=L, dim=D,
                  reduction=4, init_scale=1.0)  # fmt: skip
  for leaf in jax.tree.leaves(p):
    assert leaf.shape[0] == L
  out = _apply(p, x, t, mode=mode, temperature=0.1)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  assert float(jnp.abs(out - x).max()) > 1e-3
  # Each query's tokens depend on its own prompts only.
  t2 = t.at[1].set(-t[1])
  out2 = _apply(p, x, t2, mode=mode, temperature=0.1)
  np.testing.assert_allclose(out2[:, 0], out[:, 0], atol=1e-6)
  assert float(jnp.abs(out2[:, 1] - out[:, 1]).max()) > 1e-3


def test_layers_use_their_own_weights():
  x, t = _inputs(1)
  mode = "cross_attention"
  p = fusion.init(jax.random.key(1), mode=mode, num_layers=L, dim=D,
                  reduction=4, init_scale=1.0)  # fmt: skip
  full = _apply(p, x, t, mode=mode, temperature=0.1)
  for l in range(L):
    one = jax.tree.map(lambda a, l=l: a[l : l + 1], p)
    np.testing.assert_allclose(
        _apply(one, x[l : l + 1], t, mode=mode, temperature=0.1)[0], full[l],
        atol=1e-5)  # fmt: skip


def test_none_mode_and_adapter_residual():
  x, t = _inputs(2)
  assert fusion.init(jax.random.key(0), mode="none", num_layers=L, dim=D,
                     reduction=4, init_scale=1.0) == {}  # fmt: skip
  np.testing.assert_array_equal(
      fusion.apply({}, x, t, mode="none", temperature=0.1), x
  )
  a = fusion.adapter_init(jax.random.key(3), num_layers=L, dim=D, reduction=4,
                          init_scale=1.0)  # fmt: skip
  assert a["w1"].shape == (L, D, D // 4) and a["w2"].shape == (L, D // 4, D)
  adapt = jax.jit(fusion.adapter_apply, static_argnames="residual")
  np.testing.assert_allclose(adapt(a, x, residual=1.0), x, atol=1e-6)
  mixed = adapt(a, x, residual=0.8)
  pure = adapt(a, x, residual=0.0)
  np.testing.assert_allclose(mixed, 0.8 * x + 0.2 * pure, atol=1e-5)


def test_unknown_mode_raises():
  with pytest.raises(ValueError, match="fusion='bogus'"):
    fusion.init(jax.random.key(0), mode="bogus", num_layers=L, dim=D,
                reduction=4, init_scale=1.0)  # fmt: skip


def test_cross_attention_equals_the_textbook_form():
  # The reassociated layer against q/k/v projections of every token.
  rng = np.random.default_rng(7)
  x, t = _inputs(7)
  t = fusion.rms_normalize(t)
  p = fusion.init(jax.random.key(7), mode="cross_attention", num_layers=L,
                  dim=D, reduction=4, init_scale=1.0)  # fmt: skip
  p["bo"] = jnp.asarray(rng.normal(size=p["bo"].shape), jnp.float32)
  for l in range(L):
    pl = jax.tree.map(lambda a, l=l: a[l], p)
    q, k, v = x[l] @ pl["wq"], t @ pl["wk"], t @ pl["wv"]
    att = jax.nn.softmax(
        jnp.einsum("bnk,bck->bnc", q, k) / np.sqrt(q.shape[-1]), axis=-1
    )
    want = x[l] + jnp.einsum("bnc,bck->bnk", att, v) @ pl["wo"] + pl["bo"]
    got = jax.jit(fusion._cross_attention)(pl, x[l], t)  # pylint: disable=protected-access
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_narrow_products_and_their_gradients_equal_einsum():
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 6, 2)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(3, 7, 2)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, 2, 6)), jnp.float32)
  cases = (
      (fusion.project, lambda x, w: jnp.einsum("bnd,bdc->bnc", x, w), x, w),
      (fusion.combine, lambda a, v: jnp.einsum("bnc,bcd->bnd", a, v), a, v),
  )
  for fn, ref, u, z in cases:
    np.testing.assert_allclose(fn(u, z), ref(u, z), rtol=1e-5, atol=1e-5)
    out = jnp.asarray(rng.normal(size=ref(u, z).shape), jnp.float32)
    loss = lambda f: lambda u, z: jnp.sum(out * f(u, z) ** 2)
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(u, z)
    want = jax.grad(loss(ref), argnums=(0, 1))(u, z)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  # Under vmap, as the model maps it over layers and episodes.
  got = jax.vmap(fusion.project)(jnp.stack([x, -x]), jnp.stack([w, w]))
  np.testing.assert_allclose(got[1], -fusion.project(x, w), atol=1e-5)


def test_dense_and_its_gradients_equal_matmul():
  # Leading axes are flattened for the weight gradient; under vmap (layers,
  # episodes) every batch element keeps its own weight gradient.
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(2, 3, 7, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
  out = jnp.asarray(rng.normal(size=(2, 3, 7, 4)), jnp.float32)

  def loss(f):
    return lambda x, w: jnp.sum(out * jnp.tanh(jax.vmap(f)(x, w)))

  ref = lambda x, w: x @ w
  np.testing.assert_allclose(
      jax.vmap(fusion.dense)(x, w), jax.vmap(ref)(x, w), rtol=1e-6
  )
  got = jax.jit(jax.grad(loss(fusion.dense), argnums=(0, 1)))(x, w)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got[1][0] - got[1][1])).max() > 1e-3
