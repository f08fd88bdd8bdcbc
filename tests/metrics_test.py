"""Tests for ultraad_jax.metrics: exactness against scikit-learn and by hand."""

import math
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from ultraad_jax import metrics

TOL = 1e-6
SEEDS = (0, 1, 2)
# How scores are drawn: rounding makes heavy ties, float32 makes ties between
# nearly equal values, integers are all ties.
TIE_MODES = ("round1", "round2", "continuous", "float32", "integers")


def _scores(rng, shape, mode):
  x = rng.normal(size=shape)
  if mode == "round1":
    return np.round(rng.random(shape), 1)
  if mode == "round2":
    return np.round(rng.random(shape), 2)
  if mode == "float32":
    return (x * 1e-3).astype(np.float32)
  if mode == "integers":
    return rng.integers(0, 4, shape)
  return x


def _sk_f1_max(labels, scores):
  precision, recall, _ = skm.precision_recall_curve(labels, scores)
  denominator = precision + recall
  f1 = np.divide(
      2 * precision * recall,
      denominator,
      out=np.zeros_like(denominator),
      where=denominator > 0,
  )
  return float(f1.max())


def _binary_case(seed, mode, n=300, pos_rate=0.3):
  rng = np.random.default_rng(seed)
  labels = rng.random(n) < pos_rate
  scores = _scores(rng, n, mode)
  # Make positives score higher on average, so all curves are non-trivial.
  if scores.dtype.kind == "f":
    scores = scores + scores.dtype.type(0.1) * labels
  else:
    scores = scores + labels
  return scores, labels


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", TIE_MODES)
def test_binary_metrics_match_sklearn(seed, mode):
  scores, labels = _binary_case(seed, mode)
  assert metrics.auroc(scores, labels) == pytest.approx(
      skm.roc_auc_score(labels, scores), abs=TOL
  )
  assert metrics.average_precision(scores, labels) == pytest.approx(
      skm.average_precision_score(labels, scores), abs=TOL
  )
  assert metrics.f1_max(scores, labels) == pytest.approx(
      _sk_f1_max(labels, scores), abs=TOL
  )


@pytest.mark.parametrize("seed", SEEDS)
def test_tiny_inputs_and_integer_labels(seed):
  rng = np.random.default_rng(seed)
  scores = np.round(rng.random(6), 1)
  labels = np.array([0, 1, 0, 1, 1, 0])
  assert metrics.auroc(scores, labels) == pytest.approx(
      skm.roc_auc_score(labels, scores), abs=TOL
  )
  assert metrics.average_precision(scores, labels.astype(float)) == (
      pytest.approx(skm.average_precision_score(labels, scores), abs=TOL)
  )


def test_f1_max_threshold_reaches_f1_max():
  scores, labels = _binary_case(3, "round1")
  best, threshold = metrics.f1_max_threshold(scores, labels)
  assert threshold in set(scores[labels])
  assert skm.f1_score(labels, scores >= threshold) == pytest.approx(best)


def test_roc_curve_matches_sklearn():
  scores, labels = _binary_case(4, "round1")
  fpr, tpr, thr = metrics.roc_curve(scores, labels)
  sk_fpr, sk_tpr, sk_thr = skm.roc_curve(
      labels, scores, drop_intermediate=False
  )
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  np.testing.assert_array_equal(thr[1:], sk_thr[1:])
  assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(scores, labels))


def test_perfect_and_reversed_ranking():
  labels = np.array([0, 0, 1, 1, 1])
  scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
  assert metrics.auroc(scores, labels) == 1.0
  assert metrics.average_precision(scores, labels) == 1.0
  assert metrics.f1_max(scores, labels) == 1.0
  assert metrics.auroc(-scores, labels) == 0.0
  assert metrics.auroc(np.zeros(5), labels) == 0.5


# --------------------------------------------------------------------------
# Pixel metrics.
# --------------------------------------------------------------------------


def _pixel_case(seed, mode, n=6, h=12, w=10):
  rng = np.random.default_rng(seed)
  masks = np.zeros((n, h, w), bool)
  for i in range(1, n):  # image 0 is normal
    y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
    masks[i, y : y + rng.integers(2, 5), x : x + rng.integers(2, 5)] = True
  maps = _scores(rng, (n, h, w), mode)
  if maps.dtype.kind == "f":
    maps = maps + maps.dtype.type(0.3) * masks
  else:
    maps = maps + masks
  return maps, masks


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", TIE_MODES)
def test_pixel_metrics_match_sklearn_on_flattened(seed, mode):
  maps, masks = _pixel_case(seed, mode)
  flat_maps, flat_masks = maps.ravel(), masks.ravel()
  assert metrics.pixel_auroc(maps, masks) == pytest.approx(
      skm.roc_auc_score(flat_masks, flat_maps), abs=TOL
  )
  assert metrics.pixel_average_precision(maps, masks) == pytest.approx(
      skm.average_precision_score(flat_masks, flat_maps), abs=TOL
  )
  assert metrics.dice_at_f1_max(maps, masks) == pytest.approx(
      _sk_f1_max(flat_masks, flat_maps), abs=TOL
  )


def test_pooled_dice_is_dice_at_best_threshold():
  maps, masks = _pixel_case(5, "round1")
  _, threshold = metrics.f1_max_threshold(maps.ravel(), masks.ravel())
  pred = maps >= threshold
  dice = 2 * np.sum(pred & masks) / (pred.sum() + masks.sum())
  assert metrics.dice_at_f1_max(maps, masks) == pytest.approx(dice)


def test_per_image_dice_by_hand():
  masks = np.zeros((3, 4, 4), bool)
  masks[0, :2, :2] = True  # 4 lesion pixels
  masks[1, 0, 0] = True  # 1 lesion pixel
  maps = np.zeros((3, 4, 4))
  maps[0, :2, :2] = 1.0  # found exactly
  maps[1, 3, 3] = 1.0  # a false positive; its lesion is missed
  # Pooled F1 is best at threshold 1.0: tp=4, fp=1, fn=1 -> 8 / 10.
  assert metrics.dice_at_f1_max(maps, masks) == pytest.approx(0.8)
  # Per image at that threshold: image 0 -> 1, image 1 -> 0, image 2 (no
  # lesion) left out.
  assert metrics.dice_at_f1_max(
      maps, masks, reduction="per_image"
  ) == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ("round1", "float32"))
def test_pixel_metrics_independent_of_chunk_size_and_order(mode):
  maps, masks = _pixel_case(7, mode, n=8)
  reference = {
      "auroc": metrics.pixel_auroc(maps, masks),
      "ap": metrics.pixel_average_precision(maps, masks),
      "dice": metrics.dice_at_f1_max(maps, masks),
      "dice_img": metrics.dice_at_f1_max(maps, masks, reduction="per_image"),
      "aupro": metrics.aupro(maps, masks),
  }
  perm = np.random.default_rng(0).permutation(len(maps))
  for chunk_size in (1, 7, 120, 10**6):
    for m, k in ((maps, masks), (maps[perm], masks[perm])):
      kw = {"chunk_size": chunk_size}
      # AUROC is accumulated in integers: bit-identical.
      assert metrics.pixel_auroc(m, k, **kw) == reference["auroc"]
      assert metrics.pixel_average_precision(m, k, **kw) == pytest.approx(
          reference["ap"], abs=1e-12
      )
      assert metrics.dice_at_f1_max(m, k, **kw) == pytest.approx(
          reference["dice"], abs=1e-12
      )
      assert metrics.dice_at_f1_max(
          m, k, reduction="per_image", **kw
      ) == pytest.approx(reference["dice_img"], abs=1e-12)
      assert metrics.aupro(m, k, **kw) == pytest.approx(
          reference["aupro"], abs=1e-12
      )


def test_non_contiguous_and_numeric_masks():
  maps, masks = _pixel_case(8, "round2")
  expected = metrics.pixel_auroc(maps, masks)
  assert metrics.pixel_auroc(maps, masks.astype(np.uint8)) == expected
  assert metrics.pixel_auroc(maps, masks.astype(np.float32)) == expected
  transposed = metrics.pixel_auroc(
      np.swapaxes(maps, 1, 2), np.swapaxes(masks, 1, 2)
  )
  assert transposed == expected


def test_valid_mask_drops_pixels_and_images():
  maps, masks = _pixel_case(9, "round1")
  rng = np.random.default_rng(1)
  valid = rng.random(maps.shape) < 0.7
  assert metrics.pixel_auroc(maps, masks, valid=valid) == pytest.approx(
      skm.roc_auc_score(masks[valid], maps[valid]), abs=TOL
  )
  assert metrics.pixel_average_precision(
      maps, masks, valid=valid
  ) == pytest.approx(
      skm.average_precision_score(masks[valid], maps[valid]), abs=TOL
  )
  per_image = np.array([True, True, False, True, False, True])
  assert metrics.pixel_auroc(
      maps, masks, valid=per_image
  ) == metrics.pixel_auroc(maps[per_image], masks[per_image])
  assert metrics.aupro(maps, masks, valid=per_image) == pytest.approx(
      metrics.aupro(maps[per_image], masks[per_image]), abs=1e-12
  )


def test_pixel_auroc_memory_is_one_copy_plus_chunks():
  rng = np.random.default_rng(0)
  maps = rng.random((64, 128, 128), dtype=np.float32)
  masks = rng.random((64, 128, 128)) < 0.2
  chunk_size = 1 << 13
  tracemalloc.start()
  try:
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    metrics.pixel_auroc(maps, masks, chunk_size=chunk_size)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # One float32 copy of the pixels (4 MiB) plus O(chunk_size) temporaries
  # (1 MiB); an argsort-based AUROC needs 8 MiB for its index alone.
  assert peak - before < maps.nbytes + 128 * chunk_size


# --------------------------------------------------------------------------
# AUPRO.
# --------------------------------------------------------------------------


def _reference_aupro(maps, masks, fpr_limit, connectivity=8):
  """Straightforward MVTec-style AUPRO: sort every pixel, build the curve."""
  structure = ndimage.generate_binary_structure(
      2, 2 if connectivity == 8 else 1
  )
  weights = np.zeros(maps.shape)
  n_regions = 0
  for i in range(len(maps)):
    regions, n = ndimage.label(masks[i], structure=structure)
    for r in range(1, n + 1):
      weights[i][regions == r] = 1.0 / np.sum(regions == r)
    n_regions += n
  normal = ~masks
  scores = maps.ravel()
  order = np.argsort(-scores, kind="stable")
  scores = scores[order]
  fpr = np.cumsum(normal.ravel()[order]) / normal.sum()
  pro = np.cumsum(weights.ravel()[order]) / n_regions
  last_of_tie = np.append(np.diff(scores) != 0, True)
  fpr = np.concatenate([[0.0], fpr[last_of_tie]])
  pro = np.concatenate([[0.0], pro[last_of_tie]])
  area = 0.0
  for k in range(1, len(fpr)):
    f0, f1, p0, p1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
    if f0 >= fpr_limit:
      break
    if f1 > fpr_limit:
      p1 = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
      f1 = fpr_limit
    area += (f1 - f0) * (p0 + p1) / 2
  return area / fpr_limit


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ("round1", "round2", "continuous"))
@pytest.mark.parametrize("fpr_limit", (0.05, 0.3, 1.0))
def test_aupro_matches_reference_curve(seed, mode, fpr_limit):
  maps, masks = _pixel_case(seed, mode)
  value = metrics.aupro(maps, masks, fpr_limit=fpr_limit)
  assert value == pytest.approx(
      _reference_aupro(maps, masks, fpr_limit), abs=TOL
  )
  assert 0.0 <= value <= 1.0


def test_aupro_with_four_connectivity_matches_reference():
  maps, masks = _pixel_case(11, "round1")
  assert metrics.aupro(maps, masks, connectivity=4) == pytest.approx(
      _reference_aupro(maps, masks, 0.3, connectivity=4), abs=TOL
  )


def _two_regions():
  masks = np.zeros((1, 10, 10), bool)
  masks[0, 0:2, 0:2] = True  # region A: 4 pixels
  masks[0, 5:9, 5:9] = True  # region B: 16 pixels
  return masks


def test_aupro_hand_cases():
  masks = _two_regions()
  assert metrics.aupro(masks.astype(float), masks) == 1.0  # perfect map
  # A constant map: one segment from (0, 0) to (1, 1); area L^2/2, over L.
  assert metrics.aupro(np.zeros((1, 10, 10)), masks) == pytest.approx(0.15)
  # A found at 1, B at 0.5, background 0: PRO reaches 1 at FPR 0.
  maps = np.zeros((1, 10, 10))
  maps[0, 0:2, 0:2] = 1.0
  maps[0, 5:9, 5:9] = 0.5
  assert metrics.aupro(maps, masks) == pytest.approx(1.0)
  # Only A found: PRO jumps to 1/2, then rises linearly with B and the
  # background together to (1, 1): PRO(f) = 0.5 + 0.5 f.
  maps = masks.astype(float)
  maps[0, 5:9, 5:9] = 0.0
  expected = (0.5 * 0.3 + 0.25 * 0.3**2) / 0.3
  assert metrics.aupro(maps, masks) == pytest.approx(expected)
  # Half of B found as well: regions are averaged (PRO = (1 + 0.5) / 2 at
  # FPR 0), not pixels (that would be (4 + 8) / 20).
  maps[0, 5:7, 5:9] = 1.0
  expected = (0.75 * 0.3 + 0.125 * 0.3**2) / 0.3
  assert metrics.aupro(maps, masks) == pytest.approx(expected)


def test_aupro_connectivity_decides_regions():
  masks = np.zeros((1, 6, 6), bool)
  masks[0, 1, 1] = True
  masks[0, 2, 2] = True
  masks[0, 3, 3] = True  # a diagonal: one region (8) or three (4)
  masks[0, 3, 2] = True  # joins (2, 2) and (3, 3) side by side
  maps = np.zeros((1, 6, 6))
  maps[0, 1, 1] = 1.0
  # 8-connectivity: one region of 4 pixels, 1/4 found at FPR 0.
  # 4-connectivity: regions {(1,1)} found and {(2,2),(3,2),(3,3)} not: 1/2.
  # Everything else ties at 0, so PRO(f) = p0 + (1 - p0) f.
  for connectivity, p0 in ((8, 0.25), (4, 0.5)):
    expected = (p0 * 0.3 + (1 - p0) * 0.3**2 / 2) / 0.3
    assert metrics.aupro(
        maps, masks, connectivity=connectivity
    ) == pytest.approx(expected)


def test_aupro_never_above_one_with_heavy_ties():
  masks = _two_regions()
  maps = np.round(masks + 1e-9 * np.arange(100).reshape(1, 10, 10), 3)
  for limit in (1e-3, 0.3, 1.0):
    assert metrics.aupro(maps, masks, fpr_limit=limit) <= 1.0


# --------------------------------------------------------------------------
# Classification.
# --------------------------------------------------------------------------


def _classification_case(seed, n=40, num_classes=3):
  rng = np.random.default_rng(seed)
  labels = np.concatenate(
      [np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)]
  )
  logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
  logits = np.round(logits, 1)  # ties in the columns
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return probs, labels


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_metrics_match_sklearn(seed):
  probs, labels = _classification_case(seed)
  pred = probs.argmax(1)
  assert metrics.macro_auroc(probs, labels) == pytest.approx(
      skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
      abs=TOL,
  )
  assert metrics.accuracy(probs, labels) == pytest.approx(
      skm.accuracy_score(labels, pred)
  )
  assert metrics.balanced_accuracy(probs, labels) == pytest.approx(
      skm.balanced_accuracy_score(labels, pred)
  )
  assert metrics.macro_f1(probs, labels) == pytest.approx(
      skm.f1_score(labels, pred, labels=[0, 1, 2], average="macro"), abs=TOL
  )


@pytest.mark.parametrize("zero_division", (0.0, 1.0, float("nan")))
def test_macro_f1_zero_division_matches_sklearn(zero_division):
  # Class 2 is neither present nor predicted: its F1 is 0/0.
  probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
  labels = np.array([0, 1, 1])
  expected = skm.f1_score(
      labels,
      probs.argmax(1),
      labels=[0, 1, 2],
      average="macro",
      zero_division=zero_division,
  )
  assert metrics.macro_f1(
      probs, labels, zero_division=zero_division
  ) == pytest.approx(expected)


# scikit-learn warns that class 2 is predicted but absent; that is the case.
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_missing_class_policy():
  probs, labels = _classification_case(0)
  keep = labels != 2
  probs, labels = probs[keep], labels[keep]
  # Class 2 is absent: the mean runs over the one-vs-rest AUROCs of 0 and 1.
  expected = np.mean(
      [skm.roc_auc_score(labels == c, probs[:, c]) for c in (0, 1)]
  )
  assert metrics.macro_auroc(probs, labels) == pytest.approx(expected)
  assert metrics.balanced_accuracy(probs, labels) == pytest.approx(
      skm.balanced_accuracy_score(labels, probs.argmax(1))
  )
  assert math.isnan(metrics.macro_auroc(probs, np.zeros(len(probs), int)))


# --------------------------------------------------------------------------
# Degenerate inputs: NaN for undefined metrics, ValueError for bad input.
# --------------------------------------------------------------------------


def test_undefined_metrics_return_nan():
  scores = np.array([0.1, 0.5, 0.3])
  for labels in (np.zeros(3, bool), np.ones(3, bool)):
    assert math.isnan(metrics.auroc(scores, labels))
  no_pos = np.zeros(3, bool)
  assert math.isnan(metrics.average_precision(scores, no_pos))
  assert math.isnan(metrics.f1_max(scores, no_pos))
  # Only positives: AP and F1 are defined (every prediction is right).
  assert metrics.average_precision(scores, np.ones(3, bool)) == 1.0
  assert metrics.f1_max(scores, np.ones(3, bool)) == 1.0
  maps = np.random.default_rng(0).random((2, 4, 4))
  empty = np.zeros((2, 4, 4), bool)
  assert math.isnan(metrics.pixel_auroc(maps, empty))
  assert math.isnan(metrics.pixel_average_precision(maps, empty))
  assert math.isnan(metrics.dice_at_f1_max(maps, empty))
  assert math.isnan(metrics.dice_at_f1_max(maps, empty, reduction="per_image"))
  assert math.isnan(metrics.aupro(maps, empty))
  assert math.isnan(metrics.aupro(maps, ~empty))  # no normal pixel


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: metrics.auroc(np.zeros(3), np.zeros(4)),
            r"scores.*\(3,\).*\(4,\)",
        ),
        (lambda: metrics.auroc(np.zeros((3, 2)), np.zeros((3, 2))), "1-D"),
        (lambda: metrics.auroc(np.array([0.1, np.nan]), [0, 1]), "scores.*NaN"),
        (lambda: metrics.auroc(np.zeros(0), np.zeros(0)), "empty"),
        (lambda: metrics.auroc(["a", "b"], [0, 1]), "real-valued"),
        (lambda: metrics.auroc([0.1, 0.2], [0, 2]), "labels.*binary"),
        (
            lambda: metrics.pixel_auroc(
                np.zeros((2, 4, 4)), np.zeros((2, 4, 5))
            ),
            r"maps.*\(2, 4, 4\).*masks.*\(2, 4, 5\)",
        ),
        (
            lambda: metrics.pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4))),
            r"\[N, H, W\]",
        ),
        (
            lambda: metrics.pixel_auroc(
                np.full((1, 2, 2), np.inf), np.eye(2)[None]
            ),
            "maps.*NaN/Inf",
        ),
        (
            lambda: metrics.aupro(
                np.array([[[0.0, np.nan], [0.0, 0.0]]]),
                np.array([[[0, 1], [0, 0]]]),
            ),
            "maps.*NaN/Inf",
        ),
        (
            lambda: metrics.pixel_auroc(
                np.zeros((1, 2, 2)), np.full((1, 2, 2), 255)
            ),
            r"masks.*255.*masks > 0",
        ),
        (
            lambda: metrics.pixel_auroc(
                np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), valid=np.ones(3, bool)
            ),
            "valid",
        ),
        (
            lambda: metrics.aupro(np.zeros((1, 2, 2)), np.eye(2)[None], 0.0),
            "fpr_limit",
        ),
        (
            lambda: metrics.aupro(
                np.zeros((1, 2, 2)), np.eye(2)[None], connectivity=6
            ),
            "connectivity",
        ),
        (
            lambda: metrics.pixel_auroc(
                np.zeros((1, 2, 2)), np.eye(2)[None], chunk_size=0
            ),
            "chunk_size",
        ),
        (
            lambda: metrics.dice_at_f1_max(
                np.zeros((1, 2, 2)), np.eye(2)[None], reduction="mean"
            ),
            "reduction",
        ),
        (
            lambda: metrics.accuracy(np.zeros((3, 3)), [0, 1, 3]),
            r"labels.*\[0, 3\)",
        ),
        (lambda: metrics.accuracy(np.zeros((3, 3)), [0, 1]), r"labels.*\(2,\)"),
        (lambda: metrics.accuracy(np.zeros(3), [0, 1, 2]), r"probs.*\[N, C\]"),
        (lambda: metrics.macro_f1(np.zeros((2, 3)), [0.5, 1]), "integer"),
        (
            lambda: metrics.macro_auroc(np.full((2, 3), np.nan), [0, 1]),
            "probs.*NaN",
        ),
        (
            lambda: metrics.macro_f1(np.zeros((2, 3)), [0, 1], zero_division=2),
            "zero",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
