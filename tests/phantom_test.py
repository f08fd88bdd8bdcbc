"""Tests of ultraad_jax.phantom: determinism, masks, BI-RADS-like shapes."""

import numpy as np
from scipy import ndimage
import pytest

from ultraad_jax import phantom

N = 12  # images per class in the module-wide sample


@pytest.fixture(scope="module")
def sample():
  return phantom.generate(n_per_class=N, image_size=64, seed=0, difficulty=0.0)


def test_shapes_dtypes_and_balance(sample):
  assert sample["images"].shape == (3 * N, 64, 64, 3)
  assert sample["images"].dtype == np.uint8
  assert sample["masks"].shape == (3 * N, 64, 64)
  assert sample["masks"].dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(sample["labels"]), [N, N, N])
  assert sample["labels"].dtype == np.int32
  assert len(set(sample["image_ids"])) == 3 * N
  assert sample["image_ids"][N] == "benign_0000"
  assert list(sample["patient_ids"]) == [""] * 3 * N
  images = sample["images"]
  np.testing.assert_array_equal(images[..., 0], images[..., 1])
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  # Not blank, not saturated: a usable grey range.
  assert 40 < images.mean() < 200 and images.std() > 20


def test_deterministic_per_seed_and_prefix_stable():
  a = phantom.generate(3, 48, seed=4, difficulty=0.5)
  b = phantom.generate(3, 48, seed=4, difficulty=0.5)
  c = phantom.generate(3, 48, seed=5, difficulty=0.5)
  for key in ("images", "masks", "labels"):
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["images"], c["images"])
  # More images per class keep the first ones unchanged.
  more = phantom.generate(5, 48, seed=4, difficulty=0.5)
  for cls in range(3):
    np.testing.assert_array_equal(
        more["images"][5 * cls : 5 * cls + 3],
        a["images"][3 * cls : 3 * cls + 3],
    )


def test_masks_exact_binary_and_empty_for_normal(sample):
  masks, labels = sample["masks"], sample["labels"]
  assert set(np.unique(masks)) == {0, 1}
  assert not masks[labels == 0].any()
  for mask in masks[labels > 0]:
    assert mask.sum() >= 8
    # One lesion: one main connected component.
    components, count = ndimage.label(mask)
    sizes = np.bincount(components.ravel())[1:]
    assert sizes.max() >= 0.9 * mask.sum()


def _height_over_width(mask):
  rows, cols = np.nonzero(mask)
  return (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1)


def test_benign_wider_than_tall_malignant_taller_than_wide(sample):
  masks, labels = sample["masks"], sample["labels"]
  benign = [_height_over_width(m) for m in masks[labels == 1]]
  malignant = [_height_over_width(m) for m in masks[labels == 2]]
  assert np.mean(benign) < 0.85
  assert np.mean(malignant) > 1.15


def test_malignant_outlines_are_irregular(sample):
  # Irregular, spiculated outlines fill less of their convex hull region
  # (approximated by the filled bounding ellipse) than circumscribed ovals.
  def solidity(mask):
    filled = ndimage.binary_fill_holes(mask)
    rows, cols = np.nonzero(filled)
    ellipse_area = (
        np.pi
        * (rows.max() - rows.min() + 1)
        * (cols.max() - cols.min() + 1)
        / 4
    )
    return filled.sum() / ellipse_area

  masks, labels = sample["masks"], sample["labels"]
  benign = np.mean([solidity(m) for m in masks[labels == 1]])
  malignant = np.mean([solidity(m) for m in masks[labels == 2]])
  assert malignant < benign


def test_lesions_hypoechoic_with_posterior_features(sample):
  images = sample["images"][..., 0].astype(np.float64)
  masks, labels = sample["masks"].astype(bool), sample["labels"]
  below_ratio = {1: [], 2: []}
  for image, mask, label in zip(images, masks, labels):
    if label == 0:
      continue
    ring = ndimage.binary_dilation(
        mask, iterations=4
    ) & ~ndimage.binary_dilation(mask, iterations=1)
    assert image[mask].mean() < image[ring].mean()
    # Posterior band: the columns of the lesion, below it, against the
    # same rows a little to the side.
    rows, cols = np.nonzero(mask)
    bottom, left, right = rows.max() + 2, cols.min(), cols.max() + 1
    width = right - left
    if bottom + 6 > image.shape[0]:
      continue
    band = image[bottom : bottom + 10, left:right].mean()
    side = image[bottom : bottom + 10]
    side_cols = np.r_[
        max(0, left - width) : left, right : min(64, right + width)
    ]
    below_ratio[label].append(band / side[:, side_cols].mean())
  # Enhancement behind benign lesions, shadowing behind malignant ones.
  assert np.mean(below_ratio[1]) > 1.05
  assert np.mean(below_ratio[2]) < 0.8


def test_lesion_positions_vary(sample):
  masks, labels = sample["masks"], sample["labels"]
  centres = (
      np.array([ndimage.center_of_mass(m) for m in masks[labels > 0]]) / 64.0
  )
  assert centres[:, 1].std() > 0.12  # Across the width.
  assert centres[:, 0].std() > 0.05  # And in depth.
  assert centres[:, 1].min() < 0.35 and centres[:, 1].max() > 0.65


def test_difficulty_shrinks_and_blurs_lesions():
  easy = phantom.generate(8, 64, seed=1, difficulty=0.0)
  hard = phantom.generate(8, 64, seed=1, difficulty=1.0)
  lesion = easy["labels"] > 0
  assert hard["masks"][lesion].sum() < 0.7 * easy["masks"][lesion].sum()

  def contrast(arrays):
    images = arrays["images"][..., 0].astype(np.float64)
    values = []
    for image, mask in zip(
        images[lesion], arrays["masks"][lesion].astype(bool)
    ):
      ring = ndimage.binary_dilation(mask, iterations=4) & ~mask
      values.append(image[ring].mean() - image[mask].mean())
    return np.mean(values)

  assert contrast(hard) < 0.6 * contrast(easy)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_per_class=0), "n_per_class=0"),
        (dict(image_size=16), "image_size=16"),
        (dict(difficulty=1.5), "difficulty=1.5"),
        (dict(seed=-1), "seed=-1"),
        (dict(n_per_class=2.5), "n_per_class=2.5"),
    ],
)
def test_bad_arguments(kwargs, words):
  with pytest.raises(ValueError, match=words):
    phantom.generate(**kwargs)
