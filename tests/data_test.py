"""Tests of ultraad_jax.data and builder_base: sources, registry, dedupe."""

import io

import numpy as np
from PIL import Image
import pytest

from ultraad_jax import builder_base
from ultraad_jax import data
from ultraad_jax import episodes as episodes_lib
from ultraad_jax import phantom


def test_public_names_are_re_exported():
  # ultraad_jax.data.sample_episodes(...) and friends are promised API.
  for name in (
      "Episode",
      "query_for",
      "sample_episodes",
      "save_shots",
      "load_shots",
      "SETTINGS",
      "SHOTS_FORMAT",
  ):
    assert getattr(data, name) is getattr(episodes_lib, name), name
  for name in (
      "CLASS_NAMES",
      "NORMAL",
      "BENIGN",
      "MALIGNANT",
      "FULL_SPLIT",
      "BAD_INPUTS_REPORT",
      "DEDUPE_REPORT",
      "DEDUPE_THRESHOLD",
      "BadInputError",
      "ImageMaskBuilder",
  ):
    assert getattr(data, name) is getattr(builder_base, name), name


def test_array_source_and_small_fields():
  arrays = phantom.generate(n_per_class=2, image_size=32, seed=0)
  source = data.ArraySource(**arrays)
  assert len(source) == 6
  np.testing.assert_array_equal(data.labels_of(source), [0, 0, 1, 1, 2, 2])
  assert data.image_ids_of(source)[2] == "benign_0000"
  assert data.patient_ids_of(source) == [""] * 6
  example = source[-1]
  assert example["mask"].shape == (32, 32, 1)
  assert example["label"] == 2
  read = data.read_indices(source, [4, 0])
  np.testing.assert_array_equal(read["label"], [2, 0])
  np.testing.assert_array_equal(read["image"][0], arrays["images"][4])
  assert read["mask"][0].shape == (32, 32)
  with pytest.raises(IndexError):
    source[6]
  with pytest.raises(ValueError, match="masks must be"):
    data.ArraySource(arrays["images"], arrays["masks"][:, :8], arrays["labels"])


def test_small_fields_of_generic_and_tfds_sources(tmp_path):
  examples = [
      {"image": None, "mask": None, "label": 2, "image_id": "a"},
      {"image": None, "mask": None, "label": 0, "image_id": b"b"},
  ]
  np.testing.assert_array_equal(data.labels_of(examples), [2, 0])
  assert data.image_ids_of(examples) == ["a", "b"]
  assert data.patient_ids_of(examples) == ["", ""]
  # A raw TFDS data source works too (read without decoding images).
  splits = data.load(
      "us_phantom", data_dir=tmp_path, image_size=32, n_per_class=2
  )
  raw = splits["all"].tfds_source
  np.testing.assert_array_equal(data.labels_of(raw), splits["all"].labels)
  assert data.image_ids_of(raw) == splits["all"].image_ids


def test_source_indexing(tmp_path):
  source = data.load(
      "us_phantom", data_dir=tmp_path, image_size=32, n_per_class=2
  )["all"]
  assert source[np.int64(1)]["image_id"] == source.image_ids[1]
  assert source[-1]["image_id"] == source.image_ids[-1]
  assert [e["label"] for e in source[1:3]] == list(source.labels[1:3])
  assert [e["label"] for e in source.__getitems__([5, 0])] == [2, 0]
  encoded = source.encoded([0])[0]
  assert isinstance(encoded["image"], bytes)
  with pytest.raises(IndexError, match="out of range"):
    source[len(source)]
  assert "us_phantom" in repr(source)


def test_perceptual_hash_matches_rescaled_copies():
  image = phantom.generate(1, 64, seed=0)["images"][2]
  other = phantom.generate(1, 64, seed=1)["images"][2]
  base = builder_base.perceptual_hash(Image.fromarray(image))
  rescaled = builder_base.perceptual_hash(
      Image.fromarray(image).resize((90, 80))
  )
  cropped = builder_base.perceptual_hash(Image.fromarray(image[1:-1, 2:-1]))
  different = builder_base.perceptual_hash(Image.fromarray(other))

  def distance(a, b):
    return bin(a ^ b).count("1")

  assert distance(base, rescaled) <= builder_base.DEDUPE_THRESHOLD
  assert distance(base, cropped) <= builder_base.DEDUPE_THRESHOLD
  assert distance(base, different) > builder_base.DEDUPE_THRESHOLD


def test_find_duplicates_groups_and_conflicts():
  hashes = [0b0, 0b1, 0b11, (1 << 40) - 1, (1 << 40) - 2, 0xFFFF << 44]
  labels = [1, 1, 1, 1, 2, 0]
  ids = ["a", "b", "c", "d", "e", "f"]
  drop, report = builder_base.find_duplicates(hashes, labels, ids, threshold=2)
  # a-b-c: one group (kept a); d-e: conflicting labels, both dropped.
  assert drop == {1, 2, 3, 4}
  assert report["groups"] == [
      {
          "image_ids": ["a", "b", "c"],
          "labels": ["benign"] * 3,
          "kept": "a",
          "dropped": ["b", "c"],
      }
  ]
  assert report["conflicting"][0]["image_ids"] == ["d", "e"]
  assert report["num_dropped"] == 4


def test_dataset_registry():
  for name in data.DATASET_NAMES:
    cls = data.builder_class(name)
    assert cls.name == name
    assert issubclass(cls, data.ImageMaskBuilder)
  assert data.builder_class("busi") is data.builder_class("busi")
  assert (
      "Dataset_BUSI_with_GT"
      in data.builder_class("busi").MANUAL_DOWNLOAD_INSTRUCTIONS
  )


def test_command_line(tmp_path, capsys):
  data.main(
      [
          "us_phantom",
          "--data_dir",
          str(tmp_path),
          "--option",
          "image_size=32",
          "--option",
          "n_per_class=2",
      ]
  )
  out = capsys.readouterr().out
  assert "us_phantom/s32-n2-d0p5-seed0 all: 6 images" in out
  assert "2 normal, 2 benign, 2 malignant" in out


@pytest.mark.parametrize("mode", ["P", "I;16", "LA", "RGBA", "1", "L", "RGB"])
def test_image_modes_become_8bit(tmp_path, mode):
  grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10) * 2
  if mode == "P":
    image = Image.fromarray(grey).convert("P")
  elif mode == "I;16":
    image = Image.fromarray(grey.astype(np.uint16) * 257)
  elif mode == "LA":
    image = Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), "LA")
  elif mode == "RGBA":
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], -1)
    image = Image.fromarray(rgba, "RGBA")
  elif mode == "1":
    image = Image.fromarray(grey > 100)
  else:
    image = Image.fromarray(grey).convert(mode)
  path = tmp_path / "x.png"
  image.save(path)
  opened = builder_base.open_png(path)
  with Image.open(io.BytesIO(builder_base.image_payload(opened))) as out:
    array = np.asarray(out.convert("RGB"))
  assert array.shape == (12, 10, 3)
  expected = (grey > 100) * 255 if mode == "1" else grey
  np.testing.assert_allclose(array[..., 0], expected, atol=1)
  np.testing.assert_array_equal(builder_base.binary_mask(opened), expected > 0)


def test_transparent_mask_pixels_are_background():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., :3] = 255
  rgba[:2, :, 3] = 255  # Only the top half is opaque.
  mask = builder_base.binary_mask(Image.fromarray(rgba, "RGBA"))
  assert mask[:2].all() and not mask[2:].any()
