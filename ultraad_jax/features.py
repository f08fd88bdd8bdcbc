"""The frozen-feature cache: one backbone pass per (image, augmentation view).

CLIP is frozen, so the image side of every episode's training and evaluation
only ever needs the global embedding and the tapped patch tokens of each image
view. They are computed once here and stored row by row; episodes then gather
rows by index. A row is one (image, view) pair:

* view 0 of every image in the split (the query side and the support side);
* views 1..V-1 only for images that some episode uses as support.

The memory needed is estimated before extraction (`estimate_bytes`), so a run
that would not fit stops with the estimate instead of dying half-way.
"""

import dataclasses
import functools
import math
import time
from typing import Callable
import weakref

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ultraad_jax import clip


@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """Cached frozen features, one row per (image, view).

  Attributes:
    global_embed: [M, D] projected global (class-token) embeddings.
    patch_tokens: [L, M, N, D] projected patch tokens of the tapped layers.
    masks: [M, H, W] uint8 lesion masks of each row, at the backbone size.
    rows: [num_images, V] int32 row of (image, view), -1 where not extracted.
  """

  global_embed: jax.Array
  patch_tokens: jax.Array
  masks: np.ndarray
  rows: np.ndarray

  def row(self, image_index, view=0):
    """Returns the cache row(s) of the given image index (array) and view."""
    r = self.rows[np.asarray(image_index), view]
    if np.any(r < 0):
      raise KeyError(
          f"Images {np.asarray(image_index)[r < 0]} have no cached"
          f" view {view}."
      )
    return r


def estimate_bytes(num_rows, backbone, num_layers, dtype):
  """Bytes of a cache of `num_rows` rows (features and masks).

  Args:
    num_rows: number of (image, view) rows.
    backbone: the clip.Backbone (its grid and embedding sizes).
    num_layers: number of tapped layers.
    dtype: storage dtype of the features.

  Returns:
    The estimated size in bytes.
  """
  item = jnp.dtype(dtype).itemsize
  d, n = backbone.embed_dim, backbone.grid_size**2
  per_row = item * d * (1 + num_layers * n) + backbone.image_size**2
  return int(num_rows) * per_row


def format_bytes(num_bytes):
  """A byte count for people: GiB from 1 GiB up, else MiB (2 decimals)."""
  if num_bytes >= 2**30:
    return f"{num_bytes / 2**30:.2f} GiB"
  return f"{num_bytes / 2**20:.2f} MiB"


# Each backbone's parameter-free twin (below), for as long as it lives.
_TWINS = weakref.WeakKeyDictionary()


def _without_params(backbone):
  """The backbone minus its parameters, as a static argument of `encode`.

  jit keeps static arguments alive in its cache: the Backbone itself there
  would keep its weights in memory after the caller let go of them. The
  twin holds only the configuration, and one twin per backbone keeps
  `encode` compiled once per backbone.
  """
  twin = _TWINS.get(backbone)
  if twin is None:
    twin = dataclasses.replace(backbone, params=None)
    _TWINS[backbone] = twin
  return twin


@functools.partial(jax.jit, static_argnames=("backbone", "layers", "store"))
def encode(params, images, *, backbone, layers, store):
  """One backbone pass: uint8 images -> (global [B, D], tokens [L, B, N, D]).

  The parameters are an argument, never closed over: a jitted closure would
  embed them in the program as constants (ViT-B/16: 690 MB of program text,
  and 15 s to compile against 0.6 s with them as an argument), once more for
  every call. Compiled once per backbone, layers, dtype and batch shape.

  Args:
    params: the backbone's frozen parameters.
    images: [B, S, S, 3] uint8 images at the backbone size.
    backbone: the clip.Backbone (static: identity-hashed; its params are
      not read, `build` passes a twin without them).
    layers: tapped block indices (a tuple).
    store: the dtype the features are returned in.

  Returns:
    (global_embed [B, D], patch_tokens [L, B, N, D]) as `store`.
  """
  feats = backbone.encode_image(params, clip.normalize(images), layers)
  return feats.global_embed.astype(store), feats.patch_tokens.astype(store)


def build(
    backbone,
    params,
    images,
    masks,
    view_fn: Callable[[np.ndarray, np.ndarray, int], tuple] | None,
    views_needed: np.ndarray,
    *,
    layers,
    num_views,
    batch_size=32,
    dtype="float32",
    memory_budget_gb=8.0,
    sharding=None,
):
  """Extracts the cache: backbone passes over every needed (image, view).

  Args:
    backbone: the clip.Backbone.
    params: its frozen parameters.
    images: [num_images, S, S, 3] uint8, already at the backbone size.
    masks: [num_images, S, S] uint8 in {0, 1}.
    view_fn: `(images, masks, num_views) -> (images [n, V, ...], masks)`, the
      support augmentation (view 0 must be the original); None if V == 1.
    views_needed: [num_images] bool, images that need all `num_views` views.
    layers: tapped block indices.
    num_views: V.
    batch_size: images per backbone call (one compile: the last batch is
      padded).
    dtype: "float32" or "bfloat16" storage.
    memory_budget_gb: refuse (with the estimate) above this size.
    sharding: optional sharding of the cached arrays (replicated by default).

  Returns:
    A FeatureCache.

  Raises:
    MemoryError: when the estimate exceeds the budget; the message gives the
      estimate and the knobs that shrink it.
  """
  n_img = images.shape[0]
  extra = np.flatnonzero(views_needed) if num_views > 1 else np.zeros(0, int)
  num_rows = n_img + len(extra) * (num_views - 1)
  need = estimate_bytes(num_rows, backbone, len(layers), dtype)
  budget = memory_budget_gb * 2**30
  logging.info(
      "Feature cache: %d rows (%d images, %d with %d views), %.1f MiB as %s.",
      num_rows,
      n_img,
      len(extra),
      num_views,
      need / 2**20,
      dtype,
  )
  if need > budget:
    raise MemoryError(
        f"The feature cache needs {format_bytes(need)} ({need} bytes: "
        f"{num_rows} rows of {len(layers)} layers x {backbone.grid_size**2} "
        f"patches x {backbone.embed_dim} dims as {dtype}, plus masks) but "
        f"cache.memory_budget_gb is {memory_budget_gb} "
        f"({format_bytes(budget)}). Nothing was extracted. Raise the budget, "
        "set cache.dtype=bfloat16, tap fewer layers, use fewer "
        "data.num_views, or fewer images."
    )

  # Row table: view 0 of image i is row i; extra views follow.
  rows = np.full((n_img, num_views), -1, np.int32)
  rows[:, 0] = np.arange(n_img)
  all_images, all_masks = [images], [masks]
  if len(extra):
    v_img, v_msk = view_fn(images[extra], masks[extra], num_views)
    all_images.append(v_img[:, 1:].reshape((-1,) + images.shape[1:]))
    all_masks.append(v_msk[:, 1:].reshape((-1,) + masks.shape[1:]))
    rows[extra, 1:] = n_img + np.arange(len(extra) * (num_views - 1)).reshape(
        len(extra), num_views - 1
    )
  all_images = np.concatenate(all_images)
  all_masks = np.concatenate(all_masks).astype(np.uint8)

  store = jnp.dtype(dtype)
  layers = tuple(layers)
  static_backbone = _without_params(backbone)
  g_out, p_out = [], []
  num_batches = math.ceil(num_rows / batch_size)
  start = time.time()
  for b in range(num_batches):
    chunk = all_images[b * batch_size : (b + 1) * batch_size]
    valid = len(chunk)
    if valid < batch_size:  # pad: one compiled shape for every batch
      pad = np.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    g, p = encode(
        params, chunk, backbone=static_backbone, layers=layers, store=store
    )
    g_out.append(np.asarray(g)[:valid])
    p_out.append(np.asarray(p)[:, :valid])
    if b == 0 or (b + 1) % max(1, num_batches // 10) == 0:
      done = b + 1
      rate = done * batch_size / max(time.time() - start, 1e-9)
      logging.info(
          "Feature extraction %d/%d batches (%.1f images/s).",
          done,
          num_batches,
          rate,
      )
  global_embed = np.concatenate(g_out)
  patch_tokens = np.concatenate(p_out, axis=1)
  if sharding is not None:
    global_embed = jax.device_put(global_embed, sharding)
    patch_tokens = jax.device_put(patch_tokens, sharding)
  else:
    global_embed, patch_tokens = jnp.asarray(global_embed), jnp.asarray(
        patch_tokens
    )
  return FeatureCache(global_embed, patch_tokens, all_masks, rows)
