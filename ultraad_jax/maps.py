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
  """Combines [L, B, H, W] layer maps in [0, 1] into [B, H, W].

  Written as L - 1 elementwise steps over the layers rather than a
  reduction over the leading axis: XLA fuses them (and the sigmoid that
  makes the maps) into one elementwise pass, where the reduction became a
  library reduce fusion 5x slower than reading the maps (ViT-B/16
  evaluation, docs/PERFORMANCE.md round 7).
  """
  layers = [layer_maps[i] for i in range(layer_maps.shape[0])]
  if how == "mean":
    return functools.reduce(jnp.add, layers) / len(layers)
  if how == "max":
    return functools.reduce(jnp.maximum, layers)
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


def smoothing_matrix(size: int, sigma: float, truncate: float = 4.0):
  """[size, size] matrix of a zero-padded, border-normalised 1-D Gaussian.

  Row i holds the Gaussian weights of the pixels within reach of pixel i,
  divided by their sum, so weights that would fall outside the map are
  given back to the pixels inside (each output is a convex combination).

  Args:
    size: the map's side along the smoothed axis.
    sigma: standard deviation in pixels (> 0).
    truncate: the kernel's radius is ceil(truncate * sigma).

  Returns:
    float32 [size, size], banded, rows summing to 1.
  """
  k = gaussian_kernel(sigma, truncate).astype(np.float64)
  r = (len(k) - 1) // 2
  m = np.zeros((size, size), np.float64)
  for offset in range(-r, r + 1):
    m += k[offset + r] * np.eye(size, k=offset)
  return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def gaussian_smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian smoothing of [B, H, W] maps, border-normalised.

  Computed as A_h @ map @ A_w^T with `smoothing_matrix`: the same values as
  two zero-padded 1-D convolutions divided by the smoothing of a map of
  ones (up to rounding), but as dense products, which every backend runs
  near its peak. XLA:CPU ran the convolutions of single-channel maps at
  about 1 GFLOP/s: 1.2 s for 256 maps of 224 x 224, most of the
  evaluation's time at ViT-B/16 (docs/PERFORMANCE.md, round 7).

  Args:
    maps: [B, H, W].
    sigma: standard deviation in pixels (static); <= 0 returns the maps.

  Returns:
    [B, H, W]; each pixel is a convex combination of input pixels.
  """
  if sigma <= 0:
    return maps
  rows = jnp.asarray(smoothing_matrix(maps.shape[-2], sigma), maps.dtype)
  cols = jnp.asarray(smoothing_matrix(maps.shape[-1], sigma), maps.dtype)
  return jnp.einsum(
      "hi,bij,wj->bhw", rows, maps, cols, precision=lax.Precision.HIGHEST
  )


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
