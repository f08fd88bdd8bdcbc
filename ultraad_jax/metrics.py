"""Exact, memory-bounded evaluation metrics (image, pixel and classification).

Every metric here is exact: ties between scores are grouped the way
scikit-learn groups them, and no score is quantised or binned. Results agree
with scikit-learn to floating-point rounding (far below 1e-6) where it has the
metric, and they do not depend on `chunk_size`, which only bounds memory.

How the pixel metrics stay within memory. A pixel AUROC over 1,000 maps of
336x336 scores 113M pixels. Sorting them with their labels through an int64
`argsort` (as scikit-learn does) costs several gigabytes. Here the scores are
split into two float copies, the positives and the negatives, each sorted in
place; together they are one copy of the scores (4 bytes a pixel for float32
maps). Every count that the ROC and precision-recall curves need is then a
`np.searchsorted` of the distinct positive scores into the sorted negatives,
done chunk by chunk:

* AUROC = (sum over positives of #neg below + 0.5 #neg tied) / (P N), the
  Mann-Whitney form of the trapezoid over the tie-grouped ROC, accumulated in
  integers, so it is exact up to the final division.
* AP and F1 change only at thresholds equal to a positive score, so one pass
  over the distinct positive scores gives both.
* AUPRO integrates each positive pixel's contribution to the piecewise-linear
  PRO-vs-FPR curve in closed form (see `aupro`), so positives need no sorting.

Scores keep their floating dtype (float16 is widened to float32, integers and
booleans to float64), because ties are decided in the dtype given: rounding
float64 scores to float32 would create ties scikit-learn does not see.

Degenerate inputs, one policy throughout:
* Malformed inputs raise `ValueError` naming the argument: shape mismatches,
  NaN or Inf scores, labels that are not binary (pixel masks) or not in
  [0, C) (classes), empty inputs, bad parameters.
* A metric that is undefined for well-formed data returns `float('nan')`
  instead: an AUROC when only one class is present, AP / F1 / Dice / AUPRO
  when there is no positive (anomalous) pixel or image, AUPRO when there is no
  normal pixel. A few-shot episode whose query lacks a class is legitimate;
  reporting (`report.summarize`) skips NaN and counts only finite episodes.
"""

from collections.abc import Iterator
import dataclasses
import math
from typing import Any

import numpy as np
from scipy import ndimage

# Pixels (or scores) handled per chunk. Only memory depends on it: every
# metric returns the same value for any chunk size.
DEFAULT_CHUNK_SIZE = 1 << 21

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "accuracy",
    "aupro",
    "auroc",
    "average_precision",
    "balanced_accuracy",
    "dice_at_f1_max",
    "f1_max",
    "f1_max_threshold",
    "macro_auroc",
    "macro_f1",
    "pixel_auroc",
    "pixel_average_precision",
    "roc_curve",
]


# --------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------


def _as_scores(x: Any, name: str) -> np.ndarray:
  """Returns `x` as a float array whose dtype decides ties (no rounding)."""
  x = np.asarray(x)
  if x.dtype == np.float16:
    return x.astype(np.float32)
  if x.dtype.kind == "f":
    return x
  if x.dtype.kind in "biu":
    return x.astype(np.float64)
  raise ValueError(
      f"{name} must be a real-valued array, got dtype {x.dtype}; pass the "
      "scores as a float array."
  )


def _check_chunk_size(chunk_size: int) -> int:
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
  return int(chunk_size)


def _row_slices(n_rows: int, row_size: int, chunk_size: int) -> Iterator[slice]:
  """Slices over axis 0 holding about `chunk_size` elements each."""
  step = max(1, chunk_size // max(1, row_size))
  for start in range(0, n_rows, step):
    yield slice(start, min(n_rows, start + step))


def _binary_chunk(labels: np.ndarray, name: str) -> np.ndarray:
  """Returns a boolean view/copy of one chunk of 0/1 labels, checking them."""
  if labels.dtype == np.bool_:
    return labels
  if labels.dtype.kind not in "biuf":
    raise ValueError(f"{name} must be boolean or 0/1, got dtype {labels.dtype}")
  bad = (labels != 0) & (labels != 1)
  if bad.any():
    value = labels[bad].flat[0]
    raise ValueError(
        f"{name} must be binary (bool or 0/1), found the value {value!r}; "
        f"binarise it first, e.g. `{name} > 0`."
    )
  return labels != 0


def _check_same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
  if a.shape != b.shape:
    raise ValueError(
        f"{na} and {nb} must have the same shape, got {na}.shape={a.shape} "
        f"and {nb}.shape={b.shape}."
    )


def _check_nonempty(a: np.ndarray, name: str) -> None:
  if a.size == 0:
    raise ValueError(f"{name} is empty (shape {a.shape}); nothing to score.")


def _check_binary_inputs(
    scores: Any, labels: Any
) -> tuple[np.ndarray, np.ndarray]:
  scores = _as_scores(scores, "scores")
  labels = np.asarray(labels)
  _check_same_shape(scores, labels, "scores", "labels")
  if scores.ndim != 1:
    raise ValueError(
        f"scores and labels must be 1-D [N], got shape {scores.shape}; use "
        "the pixel_* functions for maps [N, H, W]."
    )
  _check_nonempty(scores, "scores")
  return scores, labels


def _check_pixel_inputs(
    maps: Any, masks: Any, valid: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  maps = _as_scores(maps, "maps")
  masks = np.asarray(masks)
  _check_same_shape(maps, masks, "maps", "masks")
  if maps.ndim != 3:
    raise ValueError(
        f"maps and masks must be [N, H, W], got shape {maps.shape}; squeeze "
        "channel axes or add a leading image axis."
    )
  _check_nonempty(maps, "maps")
  if valid is not None:
    valid = np.asarray(valid)
    if valid.dtype != np.bool_:
      raise ValueError(f"valid must be boolean, got dtype {valid.dtype}")
    if valid.shape not in (maps.shape, maps.shape[:1]):
      raise ValueError(
          f"valid must have shape {maps.shape} (per pixel) or "
          f"{maps.shape[:1]} (per image), got {valid.shape}."
      )
  return maps, masks, valid


def _valid_chunk(valid: np.ndarray | None, rows: slice, ndim: int):
  if valid is None:
    return None
  v = valid[rows]
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _raise_non_finite(values: np.ndarray, name: str) -> None:
  bad = int(np.count_nonzero(~np.isfinite(values)))
  raise ValueError(
      f"{name} contains {bad} NaN/Inf values; scores must be finite. Check "
      "the model output for overflow, or replace them before scoring."
  )


def _check_sorted_finite(values: np.ndarray, name: str) -> None:
  # NumPy sorts NaN last and -Inf/+Inf to the ends, so the two ends decide.
  if values.size and not (np.isfinite(values[0]) and np.isfinite(values[-1])):
    _raise_non_finite(values, name)


# --------------------------------------------------------------------------
# Shared core: split into sorted positives and negatives, then count.
# --------------------------------------------------------------------------


def _split_sorted(
    scores: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray | None,
    chunk_size: int,
    name: str,
    label_name: str,
    want_pos: bool = True,
) -> tuple[np.ndarray | None, np.ndarray]:
  """Copies positive and negative scores out and sorts each in place.

  The copies are sized by a first counting pass and filled chunk by chunk, so
  no temporary of the full input size (a full boolean mask, an index array)
  is ever allocated.

  Returns:
    (pos, neg): ascending copies in the dtype of `scores`; pos is None when
    `want_pos` is False.
  """
  n_rows = scores.shape[0]
  row_size = int(np.prod(scores.shape[1:], dtype=np.int64))
  n_pos = n_neg = 0
  for rows in _row_slices(n_rows, row_size, chunk_size):
    lab = _binary_chunk(labels[rows], label_name)
    v = _valid_chunk(valid, rows, scores.ndim)
    if v is None:
      k = int(np.count_nonzero(lab))
      n_pos += k
      n_neg += lab.size - k
    else:
      n_pos += int(np.count_nonzero(lab & v))
      n_neg += int(np.count_nonzero(~lab & v))
  pos = np.empty(n_pos, scores.dtype) if want_pos else None
  neg = np.empty(n_neg, scores.dtype)
  ip = ineg = 0
  for rows in _row_slices(n_rows, row_size, chunk_size):
    lab = _binary_chunk(labels[rows], label_name)
    v = _valid_chunk(valid, rows, scores.ndim)
    chunk = scores[rows]
    not_lab = ~lab if v is None else ~lab & v
    if v is not None:
      lab = lab & v
    part = chunk[not_lab]
    neg[ineg : ineg + part.size] = part
    ineg += part.size
    if want_pos:
      part = chunk[lab]
      pos[ip : ip + part.size] = part
      ip += part.size
  neg.sort()
  _check_sorted_finite(neg, name)
  if want_pos:
    pos.sort()
    _check_sorted_finite(pos, name)
  return pos, neg


def _windowed_searchsorted(
    sorted_arr: np.ndarray, queries: np.ndarray, side: str
) -> np.ndarray:
  """np.searchsorted for ascending queries, searching only the window they span.

  Restricting the search to the slice between the smallest and largest query
  keeps it in cache when `sorted_arr` is hundreds of megabytes.
  """
  lo = int(np.searchsorted(sorted_arr, queries[0], "left"))
  hi = int(np.searchsorted(sorted_arr, queries[-1], "right"))
  return np.searchsorted(sorted_arr[lo:hi], queries, side) + lo


@dataclasses.dataclass(frozen=True)
class _RankStats:
  """Curve summaries from one pass over the distinct positive scores."""

  auroc: float
  average_precision: float
  f1_max: float
  f1_threshold: float


def _rank_stats(
    pos: np.ndarray, neg: np.ndarray, chunk_size: int
) -> _RankStats:
  """AUROC, AP, F1-max from ascending positive and negative scores.

  For a distinct positive score v (threshold: score >= v), with P positives
  and N negatives:
    tp(v) = #pos >= v, fp(v) = #neg >= v, n_eq(v) = #pos == v.
  AP = sum_v (n_eq / P) * tp / (tp + fp): recall only moves at positive
  scores, by n_eq / P (scikit-learn's step-wise sum with ties grouped).
  F1(v) = 2 tp / (tp + fp + P); for a fixed tp, F1 falls as fp grows, so its
  maximum over all thresholds is reached at a positive score.
  """
  n_pos, n_neg = pos.size, neg.size
  nan = float("nan")
  if n_pos == 0:
    return _RankStats(nan, nan, nan, nan)
  twice_u = 0  # Python int: exact, no overflow.
  ap_sum = 0.0
  best_f1, best_thr = -1.0, nan
  for i0 in range(0, n_pos, chunk_size):
    i1 = min(n_pos, i0 + chunk_size)
    block = pos[i0:i1]
    is_start = np.empty(block.size, np.bool_)
    is_start[0] = i0 == 0 or block[0] != pos[i0 - 1]
    np.not_equal(block[1:], block[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    if starts.size == 0:  # the block continues a tie group started earlier
      continue
    values = block[starts]
    below = starts + i0  # #pos < v
    upto = np.empty_like(below)  # #pos <= v: the next group's start.
    upto[:-1] = below[1:]
    upto[-1] = np.searchsorted(pos, values[-1], "right")
    n_eq = upto - below
    del starts, is_start, upto
    if n_neg:
      neg_lt = _windowed_searchsorted(neg, values, "left")
      neg_le = _windowed_searchsorted(neg, values, "right")
      twice_u += int(np.dot(n_eq, neg_lt + neg_le))
      del neg_le
      fp = n_neg - neg_lt
      del neg_lt
    else:
      fp = np.zeros_like(n_eq)
    tp = n_pos - below
    ap_sum += float(np.dot(n_eq, tp / (tp + fp)))
    f1 = 2.0 * tp / (tp + fp + n_pos)
    # Among equal maxima keep the highest threshold (fewest positives
    # predicted); blocks run in ascending order, hence `>=` and the last index.
    k = f1.size - 1 - int(np.argmax(f1[::-1]))
    if f1[k] >= best_f1:
      best_f1, best_thr = float(f1[k]), float(values[k])
  auroc = twice_u / (2.0 * n_pos * n_neg) if n_neg else nan
  return _RankStats(auroc, ap_sum / n_pos, best_f1, best_thr)


def _binary_stats(scores: Any, labels: Any) -> _RankStats:
  scores, labels = _check_binary_inputs(scores, labels)
  pos, neg = _split_sorted(
      scores, labels, None, DEFAULT_CHUNK_SIZE, "scores", "labels"
  )
  return _rank_stats(pos, neg, DEFAULT_CHUNK_SIZE)


def _pixel_stats(maps, masks, valid, chunk_size) -> _RankStats:
  chunk_size = _check_chunk_size(chunk_size)
  maps, masks, valid = _check_pixel_inputs(maps, masks, valid)
  pos, neg = _split_sorted(maps, masks, valid, chunk_size, "maps", "masks")
  return _rank_stats(pos, neg, chunk_size)


# --------------------------------------------------------------------------
# Binary (image-level) metrics.
# --------------------------------------------------------------------------


def auroc(scores: Any, labels: Any) -> float:
  """Area under the ROC curve, as sklearn.metrics.roc_auc_score.

  Args:
    scores: [N] real scores, higher means more likely positive.
    labels: [N] binary labels (bool or 0/1).

  Returns:
    The AUROC (tied scores count one half), or NaN when `labels` holds a
    single class.
  """
  return _binary_stats(scores, labels).auroc


def average_precision(scores: Any, labels: Any) -> float:
  """Average precision, as sklearn.metrics.average_precision_score.

  AP = sum_n (R_n - R_{n-1}) P_n over thresholds, with tied scores forming one
  threshold.

  Args:
    scores: [N] real scores.
    labels: [N] binary labels (bool or 0/1).

  Returns:
    The AP, or NaN when there is no positive label (1.0 when every label is
    positive).
  """
  return _binary_stats(scores, labels).average_precision


def f1_max(scores: Any, labels: Any) -> float:
  """Maximum F1 over the thresholds of sklearn's precision_recall_curve.

  A threshold t predicts positive where score >= t.

  Args:
    scores: [N] real scores.
    labels: [N] binary labels (bool or 0/1).

  Returns:
    max_t F1(t), or NaN when there is no positive label.
  """
  return _binary_stats(scores, labels).f1_max


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
  """The F1-max and the threshold reaching it (score >= threshold).

  Args:
    scores: [N] real scores.
    labels: [N] binary labels (bool or 0/1).

  Returns:
    (f1_max, threshold); among thresholds with equal F1 the highest is
    returned. Both are NaN when there is no positive label.
  """
  stats = _binary_stats(scores, labels)
  return stats.f1_max, stats.f1_threshold


def roc_curve(
    scores: Any, labels: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The ROC curve with tied scores grouped (for plots of image-level scores).

  Unlike sklearn's default, no collinear point is dropped. Memory grows with
  the number of distinct scores, so it is meant for image-level curves.

  Args:
    scores: [N] real scores.
    labels: [N] binary labels (bool or 0/1) with both classes present.

  Returns:
    (fpr, tpr, thresholds): the curve starts at (0, 0) with threshold +inf and
    ends at (1, 1); thresholds decrease.
  """
  scores, labels = _check_binary_inputs(scores, labels)
  pos, neg = _split_sorted(
      scores, labels, None, DEFAULT_CHUNK_SIZE, "scores", "labels"
  )
  if pos.size == 0 or neg.size == 0:
    raise ValueError(
        f"roc_curve needs both classes in labels, got {pos.size} positive "
        f"and {neg.size} negative labels."
    )
  thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
  tps = pos.size - np.searchsorted(pos, thresholds, "left")
  fps = neg.size - np.searchsorted(neg, thresholds, "left")
  fpr = np.concatenate([[0.0], fps / neg.size])
  tpr = np.concatenate([[0.0], tps / pos.size])
  thresholds = np.concatenate([[np.inf], thresholds.astype(np.float64)])
  return fpr, tpr, thresholds


# --------------------------------------------------------------------------
# Pixel-level metrics (maps and masks [N, H, W], all pixels pooled).
# --------------------------------------------------------------------------


def pixel_auroc(
    maps: Any,
    masks: Any,
    *,
    valid: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
  """Pixel AUROC over all pixels pooled, as roc_auc_score on flattened arrays.

  Peak extra memory: one copy of the scored pixels (4 bytes each for float32
  maps) plus O(chunk_size) temporaries.

  Args:
    maps: [N, H, W] anomaly maps (higher = more anomalous).
    masks: [N, H, W] ground truth, bool or 0/1.
    valid: optional bool, [N, H, W] or [N]; pixels (or images) where it is
      False are left out, e.g. padding.
    chunk_size: pixels processed at a time; only memory depends on it.

  Returns:
    The pixel AUROC, or NaN when the pixels hold a single class.
  """
  return _pixel_stats(maps, masks, valid, chunk_size).auroc


def pixel_average_precision(
    maps: Any,
    masks: Any,
    *,
    valid: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
  """Pixel AP over all pixels pooled, as average_precision_score flattened.

  Args:
    maps: [N, H, W] anomaly maps.
    masks: [N, H, W] ground truth, bool or 0/1.
    valid: optional bool, [N, H, W] or [N]; False pixels are left out.
    chunk_size: pixels processed at a time; only memory depends on it.

  Returns:
    The pixel AP, or NaN when no pixel is anomalous.
  """
  return _pixel_stats(maps, masks, valid, chunk_size).average_precision


def dice_at_f1_max(
    maps: Any,
    masks: Any,
    *,
    reduction: str = "pooled",
    valid: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
  """Dice of the maps binarised at the pixel-F1-maximising threshold.

  The threshold t* maximises F1 over all pixels pooled (a pixel is predicted
  anomalous where map >= t*). Then:
  * reduction="pooled": Dice = 2|pred & gt| / (|pred| + |gt|) over all pixels
    pooled. Dice and F1 are the same formula, so this equals the pooled pixel
    F1-max.
  * reduction="per_image": the mean over images whose mask has at least one
    anomalous (valid) pixel of that image's Dice at the same global t*; images
    with an empty mask are left out because their Dice is undefined or
    trivially 0.

  Args:
    maps: [N, H, W] anomaly maps.
    masks: [N, H, W] ground truth, bool or 0/1.
    reduction: "pooled" or "per_image".
    valid: optional bool, [N, H, W] or [N]; False pixels are left out.
    chunk_size: pixels processed at a time; only memory depends on it.

  Returns:
    The Dice in [0, 1], or NaN when no pixel is anomalous.
  """
  if reduction not in ("pooled", "per_image"):
    raise ValueError(
        f"reduction must be 'pooled' or 'per_image', got {reduction!r}"
    )
  stats = _pixel_stats(maps, masks, valid, chunk_size)
  if reduction == "pooled" or math.isnan(stats.f1_threshold):
    return stats.f1_max
  maps, masks, valid = _check_pixel_inputs(maps, masks, valid)
  threshold = maps.dtype.type(stats.f1_threshold)  # exact: it is a map value
  dices = []
  row_size = maps.shape[1] * maps.shape[2]
  for rows in _row_slices(maps.shape[0], row_size, chunk_size):
    gt = _binary_chunk(masks[rows], "masks")
    pred = maps[rows] >= threshold
    v = _valid_chunk(valid, rows, 3)
    if v is not None:
      gt, pred = gt & v, pred & v
    inter = np.count_nonzero(gt & pred, axis=(1, 2))
    n_gt = np.count_nonzero(gt, axis=(1, 2))
    n_pred = np.count_nonzero(pred, axis=(1, 2))
    keep = n_gt > 0
    dices.append(2.0 * inter[keep] / (n_gt[keep] + n_pred[keep]))
  return float(np.mean(np.concatenate(dices)))


def _pro_integral(
    s: np.ndarray, neg: np.ndarray, fpr_limit: float
) -> np.ndarray:
  """Each pixel's area under its step of the PRO-vs-FPR curve, over the limit.

  Along the tie-grouped curve a positive pixel with score s switches on
  linearly while the FPR runs from a = #neg > s / N to b = #neg >= s / N (a
  jump when a == b), and stays on after. Its contribution to the integral of
  PRO over FPR in [0, L] is therefore the integral of clip((f-a)/(b-a), 0, 1):
    0 if L <= a;  L - (a + b) / 2 if L >= b;  (L - a)^2 / (2 (b - a)) else.
  The curve is linear between tie groups, so the area under it is the
  weighted sum of these pieces, identical to the trapezoid rule with linear
  interpolation at L used by the MVTec AD evaluation code.

  Returns:
    [len(s)] float64 integrals, already divided by L.
  """
  n = neg.size
  order = np.argsort(s)  # ascending queries keep the searches in cache
  sorted_s = s[order]
  a = np.empty(s.size)
  b = np.empty(s.size)
  a[order] = (n - _windowed_searchsorted(neg, sorted_s, "right")) / n
  b[order] = (n - _windowed_searchsorted(neg, sorted_s, "left")) / n
  # Divided by L here already, so that a perfect map gives exactly 1.
  out = np.zeros(s.size)
  full = b <= fpr_limit
  out[full] = 1.0 - (a[full] + b[full]) / (2.0 * fpr_limit)
  part = ~full & (a < fpr_limit)
  out[part] = (fpr_limit - a[part]) ** 2 / (
      2.0 * fpr_limit * (b[part] - a[part])
  )
  return out


def aupro(
    maps: Any,
    masks: Any,
    fpr_limit: float = 0.3,
    *,
    connectivity: int = 8,
    valid: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
  """Area under the per-region-overlap curve up to an FPR limit, normalised.

  MVTec AD definition. Ground-truth regions are the connected components of
  each mask (scipy.ndimage.label; 8-connectivity by default, as the MVTec AD
  evaluation code, so diagonal neighbours join one region). At a threshold t
  (anomalous where map >= t):
    PRO(t) = mean over all regions R of all images of |{map >= t} & R| / |R|,
    FPR(t) = |{map >= t} & normal| / |normal|, over every normal pixel of
    every image (normal images included).
  Tied scores form one threshold, the curve is linear between thresholds,
  starts at (0, 0), and is integrated over FPR in [0, fpr_limit] with
  linear interpolation at the limit, then divided by fpr_limit. The result
  lies in [0, 1]: 1 for a map that ranks every region pixel above every
  normal pixel, fpr_limit / 2 for a constant map.

  Args:
    maps: [N, H, W] anomaly maps.
    masks: [N, H, W] ground truth, bool or 0/1.
    fpr_limit: upper FPR limit of the integral, in (0, 1].
    connectivity: 8 (diagonal neighbours connect) or 4.
    valid: optional bool, [N, H, W] or [N]; False pixels are removed before
      the regions are labelled and are neither normal nor anomalous.
    chunk_size: pixels processed at a time; only memory depends on it.

  Returns:
    The normalised AUPRO, or NaN when there is no region or no normal pixel.
  """
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
  if connectivity not in (4, 8):
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
  chunk_size = _check_chunk_size(chunk_size)
  maps, masks, valid = _check_pixel_inputs(maps, masks, valid)
  _, neg = _split_sorted(
      maps, masks, valid, chunk_size, "maps", "masks", want_pos=False
  )
  if neg.size == 0:
    return float("nan")
  # A 3-D structure with only its middle slice set labels every image on its
  # own in one call, with labels unique across the chunk.
  structure = np.zeros((3, 3, 3), np.int8)
  structure[1] = ndimage.generate_binary_structure(
      2, 2 if connectivity == 8 else 1
  )
  region_means = []
  row_size = maps.shape[1] * maps.shape[2]
  for rows in _row_slices(maps.shape[0], row_size, chunk_size):
    gt = _binary_chunk(masks[rows], "masks")
    v = _valid_chunk(valid, rows, 3)
    if v is not None:
      gt = gt & v
    regions, n_regions = ndimage.label(gt, structure=structure)
    if n_regions == 0:
      continue
    inside = regions > 0
    s = maps[rows][inside]
    if not np.isfinite(s).all():
      _raise_non_finite(s, "maps")
    ids = regions[inside]
    del regions, inside
    sums = np.bincount(ids, _pro_integral(s, neg, fpr_limit), n_regions + 1)
    sizes = np.bincount(ids, minlength=n_regions + 1)
    region_means.append(sums[1:] / sizes[1:])
  if not region_means:
    return float("nan")
  value = float(np.mean(np.concatenate(region_means)))
  # Rounding alone can push a perfect map a few ulps past 1.
  return min(max(value, 0.0), 1.0)


# --------------------------------------------------------------------------
# Classification metrics (probabilities [N, C], integer labels [N]).
# --------------------------------------------------------------------------


def _check_classification(
    probs: Any, labels: Any
) -> tuple[np.ndarray, np.ndarray]:
  probs = _as_scores(probs, "probs")
  labels = np.asarray(labels)
  if probs.ndim != 2:
    raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
  if labels.shape != probs.shape[:1]:
    raise ValueError(
        f"labels must be [N] with N = probs.shape[0], got labels.shape="
        f"{labels.shape} and probs.shape={probs.shape}."
    )
  _check_nonempty(probs, "probs")
  if not np.isfinite(probs).all():
    _raise_non_finite(probs, "probs")
  if labels.dtype.kind not in "iub" and not (
      labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels))
  ):
    raise ValueError(
        f"labels must be integer class indices, got dtype {labels.dtype}"
    )
  labels = labels.astype(np.int64)
  num_classes = probs.shape[1]
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
        f"labels must lie in [0, {num_classes}) for probs with {num_classes} "
        f"columns, found values in [{labels.min()}, {labels.max()}]."
    )
  return probs, labels


def macro_auroc(probs: Any, labels: Any) -> float:
  """One-vs-rest AUROC averaged over the classes present in `labels`.

  With every class present this equals sklearn's roc_auc_score(labels, probs,
  multi_class="ovr", average="macro"). A class absent from `labels` has no
  one-vs-rest AUROC and is left out of the mean (sklearn raises instead).
  Rows need not sum to one: each column is only ranked.

  Args:
    probs: [N, C] class scores.
    labels: [N] integer labels in [0, C).

  Returns:
    The macro AUROC, or NaN when fewer than two classes are present.
  """
  probs, labels = _check_classification(probs, labels)
  values = []
  for c in range(probs.shape[1]):
    is_c = labels == c
    if is_c.any() and not is_c.all():
      values.append(auroc(probs[:, c], is_c))
  return float(np.mean(values)) if values else float("nan")


def accuracy(probs: Any, labels: Any) -> float:
  """Fraction of argmax predictions equal to the label.

  Args:
    probs: [N, C] class scores (argmax ties go to the lower class index).
    labels: [N] integer labels in [0, C).

  Returns:
    The accuracy in [0, 1].
  """
  probs, labels = _check_classification(probs, labels)
  return float(np.mean(np.argmax(probs, axis=1) == labels))


def balanced_accuracy(probs: Any, labels: Any) -> float:
  """Mean per-class recall over the classes present in `labels`.

  Matches sklearn's balanced_accuracy_score(labels, argmax(probs)) (which also
  drops classes that have no true sample).

  Args:
    probs: [N, C] class scores.
    labels: [N] integer labels in [0, C).

  Returns:
    The balanced accuracy in [0, 1].
  """
  probs, labels = _check_classification(probs, labels)
  pred = np.argmax(probs, axis=1)
  recalls = [
      np.mean(pred[labels == c] == c)
      for c in range(probs.shape[1])
      if np.any(labels == c)
  ]
  return float(np.mean(recalls))


def macro_f1(probs: Any, labels: Any, *, zero_division: float = 0.0) -> float:
  """Macro F1 of argmax predictions over all C classes.

  Matches sklearn's f1_score(labels, argmax(probs), labels=range(C),
  average="macro", zero_division=zero_division). A class that is neither
  present nor predicted has F1 = 0/0; it counts as `zero_division`: 0.0
  (sklearn's default, which pulls the mean down), 1.0, or NaN, which leaves
  the class out of the mean.

  Args:
    probs: [N, C] class scores.
    labels: [N] integer labels in [0, C).
    zero_division: 0.0, 1.0 or float("nan").

  Returns:
    The macro F1 in [0, 1] (NaN if zero_division is NaN and no class has a
    defined F1, which cannot happen for N > 0).
  """
  if not (zero_division in (0.0, 1.0) or math.isnan(zero_division)):
    raise ValueError(
        f"zero_division must be 0.0, 1.0 or nan, got {zero_division!r}"
    )
  probs, labels = _check_classification(probs, labels)
  num_classes = probs.shape[1]
  pred = np.argmax(probs, axis=1)
  scores = []
  for c in range(num_classes):
    tp = np.count_nonzero((pred == c) & (labels == c))
    denominator = np.count_nonzero(pred == c) + np.count_nonzero(labels == c)
    scores.append(2.0 * tp / denominator if denominator else zero_division)
  scores = np.asarray(scores)
  scores = scores[~np.isnan(scores)]
  return float(np.mean(scores)) if scores.size else float("nan")
