"""The fused layer logits against the reference path, values and gradients."""

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from ultraad_jax import fused_logits
from ultraad_jax import fusion
from ultraad_jax import maps

L, B, N, D = 3, 2, 7, 16
TAU = 0.07


def _reference(adapter, attn, patches, text, residual):
  x = fusion.rms_normalize(patches)
  if adapter is not None:
    x = fusion.adapter_apply(adapter, x, residual)
  mode = "none" if attn is None else "cross_attention"
  x = fusion.apply(attn or {}, x, text, mode=mode, temperature=TAU)
  return maps.text_logits(x, text, TAU)


def _fused(adapter, attn, patches, text, residual):
  return fused_logits.layer_logits(adapter, attn, patches, text,
                                   residual=residual, temperature=TAU)  # fmt: skip


def _inputs(seed, dtype, adapter_on, attn_on):
  rng = np.random.default_rng(seed)
  k1, k2 = jax.random.split(jax.random.key(seed))
  # init_scale 1: every residual branch moves the tokens well away from x0.
  adapter = (
      fusion.adapter_init(k1, num_layers=L, dim=D, reduction=4, init_scale=1.0)
      if adapter_on else None
  )  # fmt: skip
  attn = (
      fusion.init(k2, mode="cross_attention", num_layers=L, dim=D,
                  reduction=4, init_scale=1.0)  # fmt: skip
      if attn_on
      else None
  )
  # Non-zero biases: a zero token then still maps to a non-zero fused token
  # (at exactly zero both paths sit on the norm floor, where the gradient is
  # meaningless).
  bias = lambda t: t and {
      k: (rng.normal(size=a.shape) * 0.5 if k.startswith("b") else a)
      for k, a in t.items()
  }  # fmt: skip
  adapter, attn = bias(adapter), bias(attn)
  # Random token norms, one token exactly zero (rms_normalize's floor).
  patches = rng.normal(size=(L, B, N, D)) * rng.uniform(0.1, 10, (L, B, N, 1))
  patches[0, 1, 3] = 0.0
  text = rng.normal(size=(B, 2, D))
  cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
  return cast(adapter), cast(attn), cast(patches), cast(text)


CASES = [(True, True), (True, False), (False, True), (False, False)]


def _check(adapter_on, attn_on, residual, dtype, rtol, atol, seed=0):
  adapter, attn, patches, text = _inputs(seed, dtype, adapter_on, attn_on)
  ref = jax.jit(_reference, static_argnums=4)(adapter, attn, patches, text,
                                              residual)  # fmt: skip
  # A fresh function per call: jit's cache must not serve a trace made
  # under the other _MIN_RIDE_ALONG.
  got = jax.jit(lambda *a: _fused(*a), static_argnums=4)(
      adapter, attn, patches, text, residual
  )
  assert got.shape == (L, B, N) and got.dtype == dtype
  np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)

  # Gradients of a loss that weighs every logit differently, with respect to
  # everything trainable (adapter, fusion and the prompt features).
  weights = jnp.asarray(np.random.default_rng(seed + 1).normal(size=ref.shape),
                        dtype)  # fmt: skip

  def loss(fn, ad, at, t):
    return jnp.sum(weights * jnp.tanh(fn(ad, at, patches, t, residual) / 50))

  g_ref = jax.jit(jax.grad(lambda *a: loss(_reference, *a), (0, 1, 2)))(
      adapter, attn, text)  # fmt: skip
  g_got = jax.jit(jax.grad(lambda *a: loss(_fused, *a), (0, 1, 2)))(
      adapter, attn, text)  # fmt: skip
  for (path, r), g in zip(
      jax.tree_util.tree_flatten_with_path(g_ref)[0], jax.tree.leaves(g_got)
  ):
    scale = float(jnp.abs(r).max())
    assert scale > 0, path
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol * scale,
                               err_msg=str(path))  # fmt: skip


def _textbook(adapter, attn, patches, text, residual):
  """The head in float64 numpy, written the textbook way (q, k, v per token)."""
  f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
  adapter, attn, p, t = f64(adapter), f64(attn), f64(patches), f64(text)
  unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True),
                                  1e-6)  # fmt: skip
  gelu = lambda v: 0.5 * v * (
      1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))  # fmt: skip
  out = np.zeros(p.shape[:3])
  for l in range(L):
    x = unit(p[l]) * np.sqrt(D)  # [B, N, D]
    if adapter is not None:
      h = gelu(x @ adapter["w1"][l] + adapter["b1"][l])
      mlp = h @ adapter["w2"][l] + adapter["b2"][l]
      x = residual * x + (1 - residual) * mlp
    if attn is not None:
      t_rms = unit(t) * np.sqrt(D)
      q = x @ attn["wq"][l]  # [B, N, K]
      k, v = t_rms @ attn["wk"][l], t_rms @ attn["wv"][l]  # [B, 2, K]
      s = np.einsum("bnk,bck->bnc", q, k) / np.sqrt(k.shape[-1])
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      x = x + np.einsum("bnc,bck->bnk", w, v) @ attn["wo"][l] + attn["bo"][l]
    cos = np.einsum("bnd,bcd->bnc", unit(x), unit(t))
    out[l] = (cos[..., 1] - cos[..., 0]) / TAU
  return out


@pytest.mark.parametrize("adapter_on,attn_on", CASES)
@pytest.mark.parametrize("residual", [0.8, 0.3])
@pytest.mark.parametrize("ride_along", [True, False])
def test_algebra_exact_in_float64(adapter_on, attn_on, residual, ride_along,
                                  monkeypatch):  # fmt: skip
  monkeypatch.setattr(fused_logits, "_MIN_RIDE_ALONG", 10**6 if ride_along
                      else 0)  # fmt: skip
  # In float64 only rounding at ~1e-15 separates the fused algebra from the
  # textbook form; an error in the algebra would show at 1e-2.
  with jax.enable_x64(True):
    adapter, attn, patches, text = _inputs(3, jnp.float64, adapter_on,
                                           attn_on)  # fmt: skip
    got = _fused(adapter, attn, patches, text, residual)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(
        got, _textbook(adapter, attn, patches, text, residual), rtol=1e-10,
        atol=1e-10)  # fmt: skip
    # Autodiff of the fused form against finite differences.
    args = tuple(a for a in (adapter, attn, text) if a is not None)

    def fn(*a):
      it = iter(a)
      ad = next(it) if adapter_on else None
      at = next(it) if attn_on else None
      return _fused(ad, at, patches, next(it), residual)

    jax.test_util.check_grads(fn, args, order=1, modes=["rev"], atol=1e-5,
                              rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("adapter_on,attn_on", CASES)
@pytest.mark.parametrize("ride_along", [True, False])
def test_float32_close_to_reference(adapter_on, attn_on, ride_along,
                                    monkeypatch):  # fmt: skip
  # Both ways of computing the per-image products (`_products`).
  monkeypatch.setattr(fused_logits, "_MIN_RIDE_ALONG", 10**6 if ride_along
                      else 0)  # fmt: skip
  _check(adapter_on, attn_on, 0.8, jnp.float32, rtol=2e-4, atol=2e-4, seed=5)


def test_under_episode_vmap_each_episode_matches():
  adapter, attn, patches, text = _inputs(7, jnp.float32, True, True)
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a, -0.5 * a]), t)
  eps = (stack(adapter), stack(attn), stack(patches), stack(text))
  got = jax.jit(jax.vmap(lambda *a: _fused(*a, 0.8)))(*eps)
  for e in range(2):
    one = jax.tree.map(lambda a, e=e: a[e], eps)
    np.testing.assert_allclose(got[e], _reference(*one, 0.8), rtol=2e-4,
                               atol=2e-4)  # fmt: skip


def test_patches_get_no_gradient():
  adapter, attn, patches, text = _inputs(9, jnp.float32, True, True)
  g = jax.grad(lambda p: jnp.sum(_fused(adapter, attn, p, text, 0.8)))(patches)
  assert float(jnp.abs(g).max()) == 0.0
