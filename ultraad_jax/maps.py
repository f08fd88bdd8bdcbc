"""Anomaly maps: text maps, normal patch memory, smoothing and image scores.

Per tapped layer, each patch's abnormality is a softmax over its cosine
similarities to the [normal, abnormal] prompt features divided by a
temperature. A 2-way softmax is a sigmoid of the difference, so we keep the
layer map as a logit `(cos_abn - cos_norm) / tau` for as long as possible
(losses work from it), upsample the logits bilinearly to image size and only
then take the sigmoid. Layer maps are combined by their mean (or max), which
keeps the result in [0, 1].

The few-shot normal patch memory map is 1 - (max cosine to the normal support
patches of the same layer), averaged over layers, clipped to [0, 1] and
upsampled; it is fused with the text map as a convex combination. Gaussian
smoothing normalises by the filtered constant image at the borders, so it is a
convex combination of pixels and keeps maps in [0, 1].

All functions are pure and vmap/jit-friendly; hyperparameters that change the
computation's structure (sizes, modes, sigma) are static Python values.
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

LAYER_COMBINE = ("mean", "max")
SCORE_REDUCE = ("max", "topk_mean")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6):
  """x / max(|x|, eps) along `axis` (stable at 0, with a finite gradient)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def text_logits(
    patches: jax.Array, text: jax.Array, temperature: float
) -> jax.Array:
  """Abnormality logits of patches against [normal, abnormal] text features.

  Args:
    patches: [L, B, N, D] patch features (any scale; normalised here).
    text: [B, 2, D] per-query [normal, abnormal] text features, or [2, D].
    temperature: the softmax temperature tau (CLIP's 1/100 by default).

  Returns:
    [L, B, N] logits (cos_abn - cos_norm) / tau; sigmoid gives the softmax
    probability of "abnormal".
  """
  t = l2_normalize(text.astype(jnp.float32))
  if t.ndim == 2:
    t = jnp.broadcast_to(t, (patches.shape[1],) + t.shape)
  direction = t[:, 1] - t[:, 0]  # [B, D]
  # cos_abn - cos_norm = (p . direction) / |p|: two reductions over D, so
  # the normalised copy of the [L, B, N, D] tokens is never written (nor
  # read back in the backward pass), which is most of this function's cost.
  p = patches.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(p), axis=-1))
  dot = jnp.einsum("lbnd,bd->lbn", p, direction)
  return dot / (jnp.maximum(norm, 1e-6) * temperature)


@functools.lru_cache(maxsize=None)
def bilinear_matrix(grid: int, size: int) -> np.ndarray:
  """[size, grid] weights of 1-D bilinear upsampling (half-pixel centres).

  Bilinear resizing is linear and separable, so upsampling a [g, g] grid is
  A @ grid @ A.T with this A. The matrix is read off `jax.image.resize`
  applied to the identity, so it matches that function exactly (including
  its edge handling).

  Args:
    grid: input side g.
    size: output side H.

  Returns:
    A float32 numpy array [H, g].
  """
  # Evaluated eagerly even when called under jit: the matrix is a constant.
  with jax.ensure_compile_time_eval():
    eye = jnp.eye(grid, dtype=jnp.float32)
    cols = jax.image.resize(eye, (size, grid), method="bilinear")
    return np.asarray(cols, np.float32)


def upsample(patch_values: jax.Array, image_size: int) -> jax.Array:
  """Bilinear upsampling of patch-grid values to image size.

  Computed as two small matrix products with `bilinear_matrix` rather than
  `jax.image.resize`: same values, but XLA runs it (and its transpose in the
  backward pass) as dense dots instead of gathers and scatter-adds.

  Args:
    patch_values: [..., N] values on a square grid (N = g * g), row-major.
    image_size: the output side H = W.

  Returns:
    [..., H, W] values.
  """
  n = patch_values.shape[-1]
  g = int(round(math.sqrt(n)))
  if g * g != n:
    raise ValueError(f"{n} patches do not form a square grid.")
  a = jnp.asarray(bilinear_matrix(g, image_size))
  grid = patch_values.reshape(patch_values.shape[:-1] + (g, g))
  return jnp.einsum(
      "hi,...ij,wj->...hw", a, grid, a, precision=lax.Precision.HIGHEST
  )


def combine_layers(layer_maps: jax.Array, how: str = "mean") -> jax.Array:
  """Combines [L, B, H, W] layer maps in [0, 1] into [B, H, W]."""
  if how == "mean":
    return jnp.mean(layer_maps, axis=0)
  if how == "max":
    return jnp.max(layer_maps, axis=0)
  raise ValueError(f"layer_combine={how!r}; expected one of {LAYER_COMBINE}.")


def memory_distance(
    query_patches: jax.Array,
    memory: jax.Array,
    keep: jax.Array,
) -> jax.Array:
  """Patch-level normal-memory anomaly: 1 - max cosine, mean over layers.

  Args:
    query_patches: [L, B, N, D] query patch tokens (normalised here).
    memory: [L, S, M, D] L2-normalised support patch tokens.
    keep: [B, S] (or [S]) bool: which support samples a query may match
      (normal ones, minus any excluded for leave-one-out).

  Returns:
    [B, N] values in [0, 1]; 1 where a query has no allowed memory entry.
  """
  q = l2_normalize(query_patches.astype(jnp.float32))
  b = q.shape[1]
  keep = jnp.broadcast_to(keep, (b, memory.shape[1]))

  def one_layer(args):
    ql, ml = args
    sim = jnp.einsum("bnd,smd->bnsm", ql, ml.astype(jnp.float32))
    best = jnp.max(sim, axis=-1)  # [B, N, S]
    best = jnp.where(keep[:, None, :], best, -1.0)
    return 1.0 - jnp.max(best, axis=-1)

  # lax.map: one layer's [B, N, S, M] similarity block in memory at a time.
  dist = lax.map(one_layer, (q, memory))
  return jnp.clip(jnp.mean(dist, axis=0), 0.0, 1.0)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """A normalised 1-D Gaussian of radius ceil(truncate * sigma)."""
  radius = max(1, int(math.ceil(truncate * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def _conv_axis(x: jax.Array, kernel: np.ndarray, axis: int) -> jax.Array:
  """Zero-padded 'same' 1-D convolution of [B, H, W] along axis 1 or 2."""
  r = (len(kernel) - 1) // 2
  shape = (1, 1, len(kernel), 1) if axis == 1 else (1, 1, 1, len(kernel))
  pad = ((r, r), (0, 0)) if axis == 1 else ((0, 0), (r, r))
  out = lax.conv_general_dilated(
      x[:, None],
      jnp.asarray(kernel).reshape(shape),
      window_strides=(1, 1),
      padding=pad,
      precision=lax.Precision.HIGHEST,
  )
  return out[:, 0]


def gaussian_smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian smoothing of [B, H, W] maps, border-normalised.

  Args:
    maps: [B, H, W].
    sigma: standard deviation in pixels (static); <= 0 returns the maps.

  Returns:
    [B, H, W]; each pixel is a convex combination of input pixels.
  """
  if sigma <= 0:
    return maps
  k = gaussian_kernel(sigma)
  smooth = lambda x: _conv_axis(_conv_axis(x, k, 1), k, 2)
  ones = jnp.ones((1,) + maps.shape[1:], maps.dtype)
  return smooth(maps) / smooth(ones)


def image_score(maps: jax.Array, reduce: str = "max", topk: int = 100):
  """Image anomaly score from maps.

  Args:
    maps: [B, H, W].
    reduce: "max" or "topk_mean" (mean of the `topk` largest pixels).
    topk: pixels averaged by "topk_mean" (capped at H * W).

  Returns:
    [B] scores.
  """
  flat = maps.reshape(maps.shape[0], -1)
  if reduce == "max":
    return jnp.max(flat, axis=-1)
  if reduce == "topk_mean":
    k = max(1, min(int(topk), flat.shape[-1]))
    return jnp.mean(lax.top_k(flat, k)[0], axis=-1)
  raise ValueError(f"score_reduce={reduce!r}; expected one of {SCORE_REDUCE}.")
