"""Layer logits of the localization head without materialising fused tokens.

The reference path (model._forward with `fused_logits=False`) runs, per
tapped layer and patch token,

  x0 = rms_normalize(p)                                  (frozen input)
  x1 = a x0 + (1 - a) (gelu(x0 W1 + b1) W2 + b2)          (adapter)
  x2 = x1 + softmax(x1 . qk) vo + bo                     (cross-attention)
  logit = (x2 . dir) / (|x2| tau)                        (text similarity)

and writes x0, x1 and x2, each [L, B, N, D], plus their D-wide gradients:
at ViT-B/16 those elementwise passes were about 60 % of the train step on
a CPU. Nothing downstream needs x1 or x2 themselves, only a handful of their
dot products: with the columns V = [qk0, qk1, dir, vo0, vo1, bo] of each
query image,

  x1 . v = a x0 . v + (1 - a) (h . (W2 v) + b2 . v),   h = gelu(x0 W1 + b1)
  |x1|^2 = a^2 |x0|^2 + 2 a (1 - a) x0 . m + (1 - a)^2 |m|^2,  m = h W2 + b2
  x0 . m = h . (x0 W2^T) + x0 . b2
  |m|^2  = h . (h W2 W2^T + 2 W2 b2) + |b2|^2

and x2 . dir, |x2|^2 follow from the x1 dot products and the 3 x 3 Gram
matrix of [vo0, vo1, bo]. So the only D-wide work left is one product of
the raw tokens with [W1 | W2^T | b2 | V] (H = D / r wide each) and a
squared norm, then one H-wide product of h with [W2 W2^T | W2 V]; x0 is
never written either, because x0 = s p with a per-token scale s that
multiplies the products' outputs.
The frozen tokens need no gradient, so the backward pass has no D-wide
output at all. The function is the same; the floating-point results differ
from the reference path by rounding (tests/fused_logits_test.py).

Used for fusion "cross_attention" and "none", with or without the adapter;
"gated" normalises x1 inside the fusion and keeps the reference path.
"""

import jax
import jax.numpy as jnp

from ultraad_jax import fusion
from ultraad_jax import maps

SUPPORTED_FUSION = ("cross_attention", "none")

# The norm floors of the reference path: rms_normalize's and text_logits'.
_RMS_EPS = 1e-6
_NORM_EPS = 1e-6
# Per-image columns ride along in the shared product while they are at most
# as many as the shared columns, or at most this many (tests set it).
_MIN_RIDE_ALONG = 0


def _row_dot(x, y):
  return jnp.sum(x * y, axis=-1)


def _products(x, shared, per_image):
  """x @ shared and each image's x[b] @ per_image[b], in as few passes.

  While the per-image columns are few, they ride along in the shared
  product: every image's rows are multiplied by every image's columns and
  each image's own columns gathered from the result. That wastes B - 1 of
  B column blocks but reads x once; the separate per-image projection
  (`fusion.project`) reads it once per column. At ViT-B/16 (B = 12 support
  images, C = 6 columns, 257 shared) the one-episode train step took 0.22
  instead of 0.72 s (XLA:CPU ran those projections' reductions far below
  memory speed at that size); at 8 episodes both took 0.83 s. Beyond as
  many per-image columns as shared ones the projection is used: at the tiny
  config (33 shared, 72 per-image columns) riding along made the 64-episode
  step 1.34x slower.

  Args:
    x: [B, N, K] rows of B images.
    shared: [K, M] columns for every image, or None.
    per_image: [B, K, C] columns of each image.

  Returns:
    ([B, N, M] or None, [B, N, C]).
  """
  num_images, dim, num_cols = per_image.shape
  width = 0 if shared is None else shared.shape[-1]
  if num_images * num_cols > max(width, _MIN_RIDE_ALONG):
    return (
        None if shared is None else fusion.dense(x, shared),
        fusion.project(x, per_image),
    )
  cols = jnp.swapaxes(per_image, 0, 1).reshape(dim, num_images * num_cols)
  if shared is not None:
    cols = jnp.concatenate([shared, cols], axis=-1)
  z = fusion.dense(x, cols)
  # Image b's own columns: width + b C + c. Gathered rather than cut out as
  # [B, N, B, C] blocks and reduced against an identity, which copied all B
  # blocks (ViT-B/16 train step, 16 episodes: 72 -> 65 ms per episode).
  own = (
      width + num_cols * jnp.arange(num_images)[:, None] + jnp.arange(num_cols)
  )
  return (None if shared is None else z[..., :width]), jnp.take_along_axis(
      z, own[:, None, :], axis=-1
  )


def _one_layer(adapter, attn, p, t_rms, direction, *, residual, temperature):
  """Logits [B, N] of one layer; see the module docstring for the algebra."""
  dim = p.shape[-1]
  sq = jnp.sum(jnp.square(p), axis=-1)  # [B, N]
  norm = jnp.sqrt(sq)
  s = jnp.sqrt(float(dim)) / jnp.maximum(norm, _RMS_EPS)  # x0 = s p
  x0_sq = jnp.square(s) * sq

  # Columns whose dot products with x1 are needed, per query image.
  cols = [direction]  # [B, D] each
  if attn is not None:
    k = t_rms @ attn["wk"]  # [B, 2, K]
    vo = (t_rms @ attn["wv"]) @ attn["wo"]  # [B, 2, D]
    qk = jnp.einsum("dk,bck->bcd", attn["wq"], k) / jnp.sqrt(
        float(k.shape[-1])
    )  # [B, 2, D]
    bo = jnp.broadcast_to(attn["bo"], direction.shape)
    cols += [qk[:, 0], qk[:, 1], vo[:, 0], vo[:, 1], bo]
  v = jnp.stack(cols, axis=-1)  # [B, D, C]

  if adapter is None:
    _, x0_v = _products(p, None, v)
    x1_v = s[..., None] * x0_v  # [B, N, C]
    x1_sq = x0_sq
  else:
    a = residual
    w1, w2, b1, b2 = adapter["w1"], adapter["w2"], adapter["b1"], adapter["b2"]
    hidden = w1.shape[-1]
    # One pass over the tokens: x0 W1, x0 W2^T, x0 . b2 and x0 . v.
    z, x0_v = _products(p, jnp.concatenate([w1, w2.T, b2[:, None]], -1), v)
    z, x0_v = s[..., None] * z, s[..., None] * x0_v
    h = jax.nn.gelu(z[..., :hidden] + b1)
    u = z[..., hidden : 2 * hidden]  # x0 W2^T
    x0_b2 = z[..., 2 * hidden]
    # And one over h: h W2 W2^T and h . (W2 v).
    gram_h, h_w2v = _products(h, w2 @ w2.T, jnp.einsum("hd,bdc->bhc", w2, v))
    m_v = h_w2v + jnp.einsum("d,bdc->bc", b2, v)[:, None, :]  # m . v
    x1_v = a * x0_v + (1.0 - a) * m_v
    x0_m = _row_dot(u, h) + x0_b2
    m_sq = _row_dot(h, gram_h + 2.0 * (w2 @ b2)) + jnp.sum(jnp.square(b2))
    x1_sq = a * a * x0_sq + 2.0 * a * (1.0 - a) * x0_m + (1.0 - a) ** 2 * m_sq

  x1_dir = x1_v[..., 0]
  if attn is None:
    x2_dir, x2_sq = x1_dir, x1_sq
  else:
    att = jax.nn.softmax(x1_v[..., 1:3], axis=-1)  # [B, N, 2]
    a0, a1 = att[..., 0], att[..., 1]
    x1_vo0, x1_vo1, x1_bo = x1_v[..., 3], x1_v[..., 4], x1_v[..., 5]
    # delta = a0 vo0 + a1 vo1 + bo, the cross-attention's residual update.
    gv = jnp.stack([vo[:, 0], vo[:, 1], bo], axis=1)  # [B, 3, D]
    gram = jnp.einsum("bid,bjd->bij", gv, gv)[:, None]  # [B, 1, 3, 3]
    delta_dir = jnp.einsum("bid,bd->bi", gv, direction)[:, None]  # [B, 1, 3]
    x2_dir = (
        x1_dir + a0 * delta_dir[..., 0] + a1 * delta_dir[..., 1]
        + delta_dir[..., 2]
    )  # fmt: skip
    delta_sq = (
        a0 * a0 * gram[..., 0, 0] + a1 * a1 * gram[..., 1, 1] + gram[..., 2, 2]
        + 2.0 * (a0 * a1 * gram[..., 0, 1] + a0 * gram[..., 0, 2]
                 + a1 * gram[..., 1, 2])
    )  # fmt: skip
    x2_sq = x1_sq + 2.0 * (a0 * x1_vo0 + a1 * x1_vo1 + x1_bo) + delta_sq
  # The reference floors |x2| at 1e-6; flooring its square keeps the sqrt's
  # gradient finite where rounding drives the expanded square below zero.
  x2_norm = jnp.sqrt(jnp.maximum(x2_sq, _NORM_EPS * _NORM_EPS))
  return x2_dir / (x2_norm * temperature)


def layer_logits(
    adapter_params,
    fusion_params,
    patches: jax.Array,
    text: jax.Array,
    *,
    residual: float,
    temperature: float,
) -> jax.Array:
  """Per-layer abnormality logits, equal to the reference path's.

  Equals `maps.text_logits(fusion.apply(fusion_params,
  fusion.adapter_apply(adapter_params, fusion.rms_normalize(patches),
  residual), text, mode=...), text, temperature)` up to rounding.

  Args:
    adapter_params: `fusion.adapter_init`'s parameters, or None (no adapter).
    fusion_params: `fusion.init`'s parameters for "cross_attention", or None
      (fusion "none").
    patches: [L, B, N, D] raw patch tokens (treated as frozen: no gradient
      flows to them).
    text: [B, 2, D] per-query [normal, abnormal] prompt features.
    residual: the adapter's a.
    temperature: the map temperature tau.

  Returns:
    [L, B, N] logits (cos_abn - cos_norm) / tau of the fused tokens.
  """
  # At least float32 (a bfloat16 cache is widened, float64 is kept).
  dtype = jnp.promote_types(patches.dtype, jnp.float32)
  p = jax.lax.stop_gradient(patches).astype(dtype)
  text = text.astype(dtype)
  unit = maps.l2_normalize(text)
  direction = unit[:, 1] - unit[:, 0]
  t_rms = unit * jnp.sqrt(float(text.shape[-1]))  # rms_normalize, any dtype

  def one(ad, at, pl):
    return _one_layer(ad, at, pl, t_rms, direction, residual=residual,
                      temperature=temperature)  # fmt: skip

  return jax.vmap(one)(adapter_params, fusion_params or None, p)
