"""Tests of ultraad_jax.pipeline: resize, load_arrays, augment, pad_batch."""

import numpy as np
import pytest

from ultraad_jax import data
from ultraad_jax import phantom
from ultraad_jax import pipeline


def _example(height=40, width=20, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  mask[10:30, 5:15] = 255
  return image, mask


@pytest.mark.parametrize("mode", ["pad", "stretch"])
@pytest.mark.parametrize(
    "shape", [(40, 20, 3), (40, 20, 1), (40, 20), (20, 40, 3), (16, 16, 3)]
)
def test_resize_shapes_dtypes_and_binary_masks(mode, shape):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  mask = np.zeros(shape[:2], np.uint8)
  mask[4:12, 3:9] = 7  # Any nonzero value is lesion.
  out_image, out_mask = pipeline.resize_example(image, mask, 24, mode=mode)
  assert out_image.shape == (24, 24, 3) and out_image.dtype == np.uint8
  assert out_mask.shape == (24, 24) and out_mask.dtype == np.uint8
  assert set(np.unique(out_mask)) == {0, 1}
  if len(shape) == 2 or shape[-1] == 1:
    np.testing.assert_array_equal(out_image[..., 0], out_image[..., 2])


def test_pad_keeps_aspect_ratio_and_stretch_does_not():
  image = np.full((40, 20, 3), 200, np.uint8)
  mask = np.ones((40, 20), np.uint8)
  padded, padded_mask = pipeline.resize_example(image, mask, 20, mode="pad")
  # 40x20 -> 20x10 centred: columns 0-4 and 15-19 are padding.
  assert np.all(padded[:, :5] == pipeline.PAD_VALUE)
  assert np.all(padded[:, 15:] == pipeline.PAD_VALUE)
  assert np.all(padded[:, 5:15] == 200)
  np.testing.assert_array_equal(
      padded_mask.sum(axis=0) > 0, padded[0, :, 0] > 0
  )
  stretched, stretched_mask = pipeline.resize_example(
      image, mask, 20, mode="stretch"
  )
  assert np.all(stretched == 200) and np.all(stretched_mask == 1)
  assert pipeline.DEFAULT_MODE == "pad"


def test_resize_mask_none_and_errors():
  image, mask = _example()
  _, empty = pipeline.resize_example(image, None, 8)
  assert not empty.any()
  with pytest.raises(ValueError, match="does not match"):
    pipeline.resize_example(image, mask[:10], 8)
  with pytest.raises(ValueError, match="Unknown resize mode 'crop'"):
    pipeline.resize_example(image, mask, 8, mode="crop")
  with pytest.raises(ValueError, match="uint8"):
    pipeline.resize_example(image.astype(np.float32), mask, 8)


@pytest.fixture(scope="module")
def phantom_source(tmp_path_factory):
  return data.load(
      "us_phantom",
      data_dir=tmp_path_factory.mktemp("tfds"),
      image_size=48,
      n_per_class=3,
  )["all"]


@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_load_arrays_fast_path_matches_per_example_resize(phantom_source, mode):
  indices = [8, 0, 4, 4]
  calls = []
  images, masks, labels = pipeline.load_arrays(
      phantom_source,
      indices,
      32,
      mode=mode,
      progress=lambda done, total: calls.append((done, total)),
  )
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
  assert masks.shape == (4, 32, 32) and masks.dtype == np.uint8
  np.testing.assert_array_equal(labels, phantom_source.labels[indices])
  assert labels.dtype == np.int32
  assert calls[-1] == (4, 4)
  for row, index in enumerate(indices):
    example = phantom_source[index]
    image, mask = pipeline.resize_example(
        example["image"], example["mask"], 32, mode=mode
    )
    np.testing.assert_array_equal(images[row], image)
    np.testing.assert_array_equal(masks[row], mask)
  assert masks[labels > 0].any() and not masks[labels == 0].any()


def test_load_arrays_on_array_and_list_sources(phantom_source):
  arrays = phantom.generate(n_per_class=2, image_size=40, seed=1)
  source = data.ArraySource(**arrays)
  images, masks, labels = pipeline.load_arrays(source, None, 40)
  np.testing.assert_array_equal(images, arrays["images"])
  np.testing.assert_array_equal(masks, arrays["masks"])
  np.testing.assert_array_equal(labels, arrays["labels"])
  as_list = [source[i] for i in range(len(source))]
  images2, _, _ = pipeline.load_arrays(as_list, [1, 2], 20, mode="stretch")
  assert images2.shape == (2, 20, 20, 3)
  empty = pipeline.load_arrays(phantom_source, [], 16)
  assert empty[0].shape == (0, 16, 16, 3) and empty[2].shape == (0,)


def _bright_square(num=3, size=32):
  images = np.zeros((num, size, size, 3), np.uint8)
  masks = np.zeros((num, size, size), np.uint8)
  for i in range(num):
    top, left = 6 + 2 * i, 8 + i
    images[i, top : top + 12, left : left + 8] = 255
    masks[i, top : top + 12, left : left + 8] = 1
  return images, masks


def test_augment_views():
  images, masks = _bright_square()
  out_images, out_masks = pipeline.augment(images, masks, 4, seed=0)
  assert out_images.shape == (3, 4, 32, 32, 3) and out_images.dtype == np.uint8
  assert out_masks.shape == (3, 4, 32, 32) and out_masks.dtype == np.uint8
  np.testing.assert_array_equal(out_images[:, 0], images)
  np.testing.assert_array_equal(out_masks[:, 0], masks)
  assert set(np.unique(out_masks)) <= {0, 1}
  again = pipeline.augment(images, masks, 4, seed=0)
  np.testing.assert_array_equal(again[0], out_images)
  np.testing.assert_array_equal(again[1], out_masks)
  other = pipeline.augment(images, masks, 4, seed=1)
  assert not np.array_equal(other[0][:, 1:], out_images[:, 1:])
  for i in range(3):
    for v in range(1, 4):
      assert not np.array_equal(out_masks[i, v], masks[i])
      # Image and mask moved together: the bright square is the mask.
      inside = out_images[i, v, ..., 0][out_masks[i, v] == 1]
      outside = out_images[i, v, ..., 0][out_masks[i, v] == 0]
      assert inside.mean() > 200 and outside.mean() < 30


def test_augment_single_view_and_errors():
  images, masks = _bright_square()
  out_images, out_masks = pipeline.augment(images, masks[..., None], 1, seed=0)
  np.testing.assert_array_equal(out_images[:, 0], images)
  with pytest.raises(ValueError, match="num_views"):
    pipeline.augment(images, masks, 0, seed=0)
  with pytest.raises(ValueError, match="square"):
    pipeline.augment(images[:, :, :20], masks[:, :, :20], 2, seed=0)


@pytest.mark.parametrize(
    "num, multiple, padded", [(5, 8, 8), (8, 8, 8), (9, 8, 16), (3, 1, 3)]
)
def test_pad_batch(num, multiple, padded):
  batch = {
      "images": np.ones((num, 4, 4, 3), np.uint8),
      "labels": np.arange(num, dtype=np.int32) + 1,
      "extra": [np.ones((num, 2), np.float32)],
  }
  out, valid = pipeline.pad_batch(batch, multiple)
  assert out["images"].shape == (padded, 4, 4, 3)
  assert out["images"].dtype == np.uint8
  assert out["extra"][0].shape == (padded, 2)
  assert valid.dtype == bool and valid.shape == (padded,)
  assert valid.sum() == num and valid[:num].all()
  np.testing.assert_array_equal(out["labels"][:num], batch["labels"])
  assert not out["labels"][num:].any()
  single, valid_single = pipeline.pad_batch(np.zeros((num, 3)), multiple)
  assert single.shape == (padded, 3) and valid_single.sum() == num


def test_pad_batch_errors():
  with pytest.raises(ValueError, match="common leading dimension"):
    pipeline.pad_batch((np.zeros((3, 2)), np.zeros((4, 2))), 8)
  with pytest.raises(ValueError, match="multiple=0"):
    pipeline.pad_batch(np.zeros((3, 2)), 0)
