"""Input pipeline: resize, read whole splits as arrays, augment, pad batches.

Everything here is numpy + PIL on the host and returns uint8 pixels; CLIP
normalisation is `ultraad_jax.clip.normalize`, applied by the caller.

Resizing (`resize_example`):
- images: bicubic (PIL, antialiased when shrinking); masks: nearest, so they
  stay exactly {0, 1};
- mode "pad" (the default) scales the longer side to `size` and pads the
  shorter one symmetrically with PAD_VALUE (0, black, like the area outside
  an ultrasound field of view) to a square, so lesion shapes keep their
  aspect ratio: "taller than wide" is a malignancy sign that stretching
  would distort. Mode "stretch" resizes each side to `size` independently.

Inference batches are padded to a multiple of the device count with
`pad_batch`, which also returns the validity mask the metrics need.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

MODES = ("pad", "stretch")
DEFAULT_MODE = "pad"
PAD_VALUE = 0
_CHUNK = 64


def _check(size: int, mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"Unknown resize mode {mode!r}; expected one of {MODES}.")
  if isinstance(size, bool) or int(size) != size or size < 1:
    raise ValueError(f"size={size!r}: expected a positive integer.")


def _fit(image: Image.Image, size: int, mode: str, resample) -> Image.Image:
  """Resizes one PIL image to size x size (pad or stretch)."""
  width, height = image.size
  if mode == "stretch" or width == height:
    if (width, height) == (size, size):
      return image
    return image.resize((size, size), resample)
  scale = size / max(width, height)
  new_w = min(size, max(1, round(width * scale)))
  new_h = min(size, max(1, round(height * scale)))
  canvas = Image.new(image.mode, (size, size), PAD_VALUE)
  canvas.paste(
      image.resize((new_w, new_h), resample),
      ((size - new_w) // 2, (size - new_h) // 2),
  )
  return canvas


def _image_array(image: Image.Image) -> np.ndarray:
  """PIL image ("L" or "RGB") -> uint8 [H, W, 3]."""
  array = np.asarray(image)
  if array.ndim == 2:
    return np.repeat(array[..., None], 3, axis=-1)
  return array


def _as_pil_image(image: np.ndarray) -> Image.Image:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got {image.dtype}.")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 3 and image.shape[-1] == 3:
    # Grey stored as 3 equal channels is resized once, not three times.
    if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(
        image[..., 0], image[..., 2]
    ):
      return Image.fromarray(np.ascontiguousarray(image[..., 0]), "L")
    return Image.fromarray(image, "RGB")
  if image.ndim == 2:
    return Image.fromarray(image, "L")
  raise ValueError(
      f"image must be [H, W, 3], [H, W, 1] or [H, W], got {image.shape}."
  )


def _as_pil_mask(mask: np.ndarray, shape: tuple[int, int]) -> Image.Image:
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.shape != tuple(shape):
    raise ValueError(
        f"mask shape {mask.shape} does not match image shape {tuple(shape)}."
    )
  return Image.fromarray((mask != 0).astype(np.uint8), "L")


def resize_example(
    image: np.ndarray,
    mask: np.ndarray | None,
    size: int,
    *,
    mode: str = DEFAULT_MODE,
) -> tuple[np.ndarray, np.ndarray]:
  """Resizes one image (bicubic) and its mask (nearest) to size x size.

  Args:
    image: uint8 [H, W, 3], [H, W, 1] or [H, W].
    mask: [H, W] or [H, W, 1] (nonzero = lesion), or None (all background).
    size: output side in pixels.
    mode: "pad" (keep aspect ratio, pad with PAD_VALUE) or "stretch".

  Returns:
    (uint8 [size, size, 3], uint8 [size, size] in {0, 1}).
  """
  _check(size, mode)
  pil_image = _as_pil_image(image)
  out_image = _image_array(
      _fit(pil_image, size, mode, Image.Resampling.BICUBIC)
  )
  if mask is None:
    return out_image, np.zeros((size, size), np.uint8)
  pil_mask = _as_pil_mask(mask, np.asarray(image).shape[:2])
  out_mask = np.asarray(_fit(pil_mask, size, mode, Image.Resampling.NEAREST))
  return out_image, out_mask.astype(np.uint8)


def _resize_encoded(
    example: dict[str, Any], size: int, mode: str
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes stored PNG bytes and resizes, without an intermediate array."""
  with Image.open(io.BytesIO(example["image"])) as image:
    image.load()
    if image.mode not in ("L", "RGB"):
      image = image.convert("RGB")
    out_image = _image_array(_fit(image, size, mode, Image.Resampling.BICUBIC))
  with Image.open(io.BytesIO(example["mask"])) as mask:
    mask.load()
    out_mask = np.asarray(_fit(mask, size, mode, Image.Resampling.NEAREST))
  return out_image, (out_mask != 0).astype(np.uint8)


def load_arrays(
    source: Sequence[dict[str, Any]],
    indices: Iterable[int] | None,
    size: int,
    *,
    mode: str = DEFAULT_MODE,
    progress: Callable[[int, int], None] | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads examples of a split as fixed-size arrays.

  Decoding and resizing run in a thread pool (PIL releases the GIL). For a
  `data.Source` the stored PNG bytes are decoded straight into the resize.

  Args:
    source: a `data.Source`, `data.ArraySource` or any sequence of example
      dicts with "image", "mask" and "label".
    indices: positions to read, in order; None reads the whole split.
    size: output side in pixels.
    mode: "pad" or "stretch" (see `resize_example`).
    progress: called as progress(done, total) after each chunk of images.
    num_threads: worker threads (default: number of CPUs, at most 8).

  Returns:
    (images uint8 [N, size, size, 3], masks uint8 [N, size, size] in {0, 1},
    labels int32 [N]).
  """
  _check(size, mode)
  if indices is None:
    indices = range(len(source))
  indices = [int(i) for i in np.asarray(list(indices), np.int64).ravel()]
  total = len(indices)
  images = np.zeros((total, size, size, 3), np.uint8)
  masks = np.zeros((total, size, size), np.uint8)
  labels = np.zeros((total,), np.int32)
  workers = num_threads or max(1, min(8, os.cpu_count() or 1))
  encoded = hasattr(source, "encoded")

  def work(example):
    if encoded:
      return _resize_encoded(example, size, mode)
    return resize_example(example["image"], example["mask"], size, mode=mode)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, total, _CHUNK):
      chunk = indices[start : start + _CHUNK]
      if encoded:
        examples = source.encoded(chunk)
      elif hasattr(source, "__getitems__"):
        examples = source.__getitems__(chunk)
      else:
        examples = [source[i] for i in chunk]
      for j, (image, mask) in enumerate(pool.map(work, examples)):
        images[start + j] = image
        masks[start + j] = mask
        labels[start + j] = int(examples[j]["label"])
      if progress is not None:
        progress(start + len(chunk), total)
  return images, masks, labels


def _affine(size: int, flip: bool, angle_deg: float, shift) -> tuple:
  """PIL AFFINE coefficients (output -> input) of flip, rotate, shift.

  The forward map flips horizontally and rotates about the image centre,
  then shifts by `shift` pixels (x, y); PIL wants its inverse.
  """
  centre = np.array([[1, 0, size / 2], [0, 1, size / 2], [0, 0, 1]], float)
  uncentre = np.array([[1, 0, -size / 2], [0, 1, -size / 2], [0, 0, 1]], float)
  flip_m = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
  theta = np.deg2rad(angle_deg)
  rotate = np.array(
      [
          [np.cos(theta), -np.sin(theta), 0],
          [np.sin(theta), np.cos(theta), 0],
          [0, 0, 1],
      ]
  )
  move = np.array([[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]], float)
  forward = move @ centre @ rotate @ flip_m @ uncentre
  inverse = np.linalg.inv(forward)
  return tuple(inverse[:2].ravel())


def augment(
    images: np.ndarray,
    masks: np.ndarray,
    num_views: int,
    seed: int,
    *,
    max_rotation: float = 15.0,
    max_shift: float = 0.1,
    flip_probability: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
  """Augmented views of support images (as MVFA's multi-view support).

  View 0 is the original. View v >= 1 of image i applies, with an RNG seeded
  by (seed, i, v): a horizontal flip with probability flip_probability, a
  rotation uniform in +-max_rotation degrees and a shift uniform in
  +-max_shift of the side, the same geometric transform to image (bicubic)
  and mask (nearest). Uncovered pixels are PAD_VALUE / background.

  Args:
    images: uint8 [N, S, S, 3].
    masks: [N, S, S] (or [N, S, S, 1]) in {0, 1}.
    num_views: V >= 1 views per image, the original included.
    seed: integer seed.
    max_rotation: degrees.
    max_shift: fraction of the image side.
    flip_probability: probability of a horizontal flip.

  Returns:
    (images uint8 [N, V, S, S, 3], masks uint8 [N, V, S, S]).
  """
  images = np.asarray(images)
  masks = np.asarray(masks)
  if masks.ndim == 4 and masks.shape[-1] == 1:
    masks = masks[..., 0]
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(
        f"images must be uint8 [N, S, S, 3], got {images.dtype} {images.shape}."
    )
  num, height, width = images.shape[:3]
  if height != width:
    raise ValueError(f"images must be square, got {height}x{width}.")
  if masks.shape != images.shape[:3]:
    raise ValueError(
        f"masks must be {images.shape[:3]} to match images, got {masks.shape}."
    )
  if int(num_views) != num_views or num_views < 1:
    raise ValueError(f"num_views={num_views!r}: expected an integer >= 1.")
  size = height
  out_images = np.empty((num, num_views) + images.shape[1:], np.uint8)
  out_masks = np.empty((num, num_views, size, size), np.uint8)
  out_images[:, 0] = images
  out_masks[:, 0] = masks != 0
  for i in range(num):
    image = Image.fromarray(images[i], "RGB")
    mask = Image.fromarray((masks[i] != 0).astype(np.uint8), "L")
    for v in range(1, num_views):
      rng = np.random.default_rng([int(seed), i, v])
      coeffs = _affine(
          size,
          flip=bool(rng.uniform() < flip_probability),
          angle_deg=rng.uniform(-max_rotation, max_rotation),
          shift=rng.uniform(-max_shift, max_shift, size=2) * size,
      )
      out_images[i, v] = np.asarray(
          image.transform(
              (size, size),
              Image.Transform.AFFINE,
              coeffs,
              resample=Image.Resampling.BICUBIC,
              fillcolor=(PAD_VALUE,) * 3,
          )
      )
      out_masks[i, v] = np.asarray(
          mask.transform(
              (size, size),
              Image.Transform.AFFINE,
              coeffs,
              resample=Image.Resampling.NEAREST,
              fillcolor=0,
          )
      )
  return out_images, out_masks


def pad_batch(arrays, multiple: int):
  """Pads the leading axis to a multiple (e.g. of the device count).

  Args:
    arrays: an array, or a dict / list / tuple (nested) of arrays sharing
      their leading dimension N.
    multiple: pad N up to a multiple of this (>= 1).

  Returns:
    (padded, valid): the same structure with leading dimension
    ceil(N / multiple) * multiple, padded with zeros, and a bool [padded N]
    mask that is True for the N real rows.
  """
  if isinstance(multiple, bool) or int(multiple) != multiple or multiple < 1:
    raise ValueError(f"multiple={multiple!r}: expected an integer >= 1.")
  leaves = []

  def collect(tree):
    if isinstance(tree, dict):
      for value in tree.values():
        collect(value)
    elif isinstance(tree, (list, tuple)):
      for value in tree:
        collect(value)
    else:
      leaves.append(np.asarray(tree))

  collect(arrays)
  if not leaves:
    raise ValueError("pad_batch got no arrays.")
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        "pad_batch needs arrays with one common leading dimension, got shapes"
        f" {[leaf.shape for leaf in leaves]}."
    )
  num = sizes.pop()
  padded_num = -(-num // int(multiple)) * int(multiple)

  def pad(tree):
    if isinstance(tree, dict):
      return type(tree)((k, pad(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
      return type(tree)(pad(v) for v in tree)
    leaf = np.asarray(tree)
    widths = [(0, padded_num - num)] + [(0, 0)] * (leaf.ndim - 1)
    return np.pad(leaf, widths)

  valid = np.arange(padded_num) < num
  return pad(arrays), valid
