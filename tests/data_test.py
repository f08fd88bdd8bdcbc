"""Tests of ultraad_jax.data: episodes, shot lists, small fields, dedupe."""

import io
import json

import numpy as np
from PIL import Image
import pytest

from ultraad_jax import data
from ultraad_jax import phantom

# 12 normal, 9 benign, 6 malignant, in a shuffled order.
LABELS = np.random.default_rng(0).permutation(
    np.repeat(np.arange(3), [12, 9, 6])
)
# Patients of 1-3 images each; a few images without a patient id.
PATIENTS = [f"P{i // 2}" if i % 7 else "" for i in range(len(LABELS))]


def _support_classes(episode, labels):
  return np.bincount(labels[episode.support], minlength=3)


@pytest.mark.parametrize(
    "setting, shots, expected",
    [
        ("per_class", 1, [1, 1, 1]),
        ("per_class", 4, [4, 4, 4]),
        ("normal_only", 2, [2, 0, 0]),
        ("normal_only", 8, [8, 0, 0]),
    ],
)
def test_episode_class_counts_and_disjointness(setting, shots, expected):
  episodes = data.sample_episodes(
      LABELS, shots=shots, setting=setting, num_episodes=6, seed=1
  )
  assert len(episodes) == 6
  for episode in episodes:
    np.testing.assert_array_equal(_support_classes(episode, LABELS), expected)
    # Without replacement, disjoint, and the query is everything else.
    assert len(set(episode.support.tolist())) == len(episode.support)
    assert not set(episode.support) & set(episode.query)
    assert sorted(set(episode.support) | set(episode.query)) == list(
        range(len(LABELS))
    )
    assert episode.support.dtype == np.int64
    assert np.all(np.diff(episode.query) > 0)


def test_episodes_are_deterministic_and_seeded():
  kwargs = dict(shots=2, setting="per_class", num_episodes=5)
  first = data.sample_episodes(LABELS, seed=7, **kwargs)
  again = data.sample_episodes(LABELS, seed=7, **kwargs)
  other = data.sample_episodes(LABELS, seed=8, **kwargs)
  assert first == again
  assert first != other


def test_episode_i_does_not_depend_on_num_episodes():
  kwargs = dict(shots=3, setting="per_class", seed=3)
  short = data.sample_episodes(LABELS, num_episodes=2, **kwargs)
  long = data.sample_episodes(LABELS, num_episodes=9, **kwargs)
  assert short == long[:2]


def test_episodes_of_one_draw_differ_even_when_collisions_are_likely():
  # 3 images per class, 2 shots: 3**3 = 27 distinct supports in all.
  labels = np.repeat(np.arange(3), 3)
  episodes = data.sample_episodes(
      labels, shots=2, setting="per_class", num_episodes=27, seed=0
  )
  supports = {e.support.tobytes() for e in episodes}
  assert len(supports) == 27
  with pytest.raises(ValueError, match="only 27 distinct"):
    data.sample_episodes(
        labels, shots=2, setting="per_class", num_episodes=28, seed=0
    )


def test_patient_disjoint_query():
  episodes = data.sample_episodes(
      LABELS,
      shots=2,
      setting="per_class",
      num_episodes=10,
      seed=0,
      patient_ids=PATIENTS,
  )
  patients = np.array(PATIENTS)
  for episode in episodes:
    support_patients = set(patients[episode.support]) - {""}
    query_patients = set(patients[episode.query])
    assert not support_patients & query_patients
    assert not set(episode.support) & set(episode.query)
    # Images without a patient id only exclude themselves.
    for i in range(len(LABELS)):
      if i not in episode.support and patients[i] not in support_patients:
        assert i in episode.query
  # Some support patient has a second image, which the plain query would keep.
  plain = data.sample_episodes(
      LABELS, shots=2, setting="per_class", num_episodes=10, seed=0
  )
  assert [e.support.tolist() for e in plain] == [
      e.support.tolist() for e in episodes
  ]
  assert any(len(p.query) > len(e.query) for p, e in zip(plain, episodes))


def test_empty_patient_ids_mean_unknown():
  with_empty = data.sample_episodes(
      LABELS,
      shots=1,
      setting="per_class",
      num_episodes=3,
      seed=0,
      patient_ids=[""] * len(LABELS),
  )
  without = data.sample_episodes(
      LABELS, shots=1, setting="per_class", num_episodes=3, seed=0
  )
  assert with_empty == without


@pytest.mark.parametrize(
    "labels, setting, shots, words",
    [
        (LABELS, "per_class", 7, ["7", "malignant", "only 6"]),
        (LABELS, "per_class", 10, ["10", "benign", "only 9"]),
        (LABELS, "normal_only", 13, ["13", "normal", "only 12"]),
        (np.array([1, 1, 2, 2]), "normal_only", 1, ["1", "normal", "only 0"]),
        (np.array([0, 0, 1, 1]), "per_class", 1, ["malignant", "only 0"]),
    ],
    ids=["malignant", "benign", "normal", "no_normal", "no_malignant"],
)
def test_too_few_images_error(labels, setting, shots, words):
  with pytest.raises(ValueError) as info:
    data.sample_episodes(
        labels, shots=shots, setting=setting, num_episodes=1, seed=0
    )
  for word in words:
    assert word in str(info.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(setting="one_class"), "one_class"),
        (dict(shots=0), "shots=0"),
        (dict(num_episodes=0), "num_episodes=0"),
        (dict(patient_ids=["a"]), "patient_ids has 1"),
    ],
)
def test_bad_episode_arguments(kwargs, words):
  args = dict(shots=1, setting="per_class", num_episodes=1, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=words):
    data.sample_episodes(LABELS, **args)


def test_bad_labels():
  with pytest.raises(ValueError, match=r"found \[3\]"):
    data.sample_episodes(
        np.array([0, 1, 2, 3]),
        shots=1,
        setting="per_class",
        num_episodes=1,
        seed=0,
    )


def test_empty_query_error():
  with pytest.raises(ValueError, match="empty query"):
    data.sample_episodes(
        np.array([0, 1, 2]),
        shots=1,
        setting="per_class",
        num_episodes=1,
        seed=0,
    )


def test_shot_files_round_trip(tmp_path):
  image_ids = [f"img{i:03d}" for i in range(len(LABELS))]
  episodes = data.sample_episodes(
      LABELS,
      shots=2,
      setting="per_class",
      num_episodes=4,
      seed=5,
      patient_ids=PATIENTS,
  )
  path = tmp_path / "shots" / "busi_2shot.json"
  meta = {"dataset": "busi", "split": "all", "shots": 2, "seed": 5}
  data.save_shots(path, episodes, image_ids, meta=meta)
  document = json.loads(path.read_text())
  assert document["meta"] == meta
  assert [e["index"] for e in document["episodes"]] == [0, 1, 2, 3]
  assert document["episodes"][1]["seed"] == 5
  assert document["episodes"][1]["support_ids"] == [
      image_ids[i] for i in episodes[1].support
  ]
  loaded = data.load_shots(path, image_ids, patient_ids=PATIENTS)
  assert loaded == episodes
  # The ids, not the positions, define the episode: reorder the split.
  order = np.random.default_rng(1).permutation(len(image_ids))
  shuffled = data.load_shots(path, [image_ids[i] for i in order])
  for original, moved in zip(episodes, shuffled):
    assert sorted(order[moved.support]) == sorted(original.support)


def test_shot_files_errors(tmp_path):
  image_ids = [f"img{i:03d}" for i in range(len(LABELS))]
  episodes = data.sample_episodes(
      LABELS, shots=1, setting="per_class", num_episodes=2, seed=0
  )
  path = tmp_path / "shots.json"
  data.save_shots(path, episodes, image_ids, meta={"seed": 0})
  missing = image_ids[int(episodes[0].support[0])]
  with pytest.raises(KeyError) as info:
    data.load_shots(path, [i for i in image_ids if i != missing])
  assert missing in str(info.value)
  with pytest.raises(ValueError, match="appears twice"):
    data.load_shots(path, image_ids + image_ids[:1])
  (tmp_path / "other.json").write_text('{"hello": 1}')
  with pytest.raises(ValueError, match="not a shot list"):
    data.load_shots(tmp_path / "other.json", image_ids)
  with pytest.raises(FileNotFoundError):
    data.load_shots(tmp_path / "absent.json", image_ids)


def test_episode_equality_and_hash():
  a = data.Episode(support=np.array([1, 2]), query=np.array([0, 3]))
  b = data.Episode(support=np.array([1, 2]), query=np.array([0, 3]))
  c = data.Episode(support=np.array([1, 3]), query=np.array([0, 2]))
  assert a == b and a != c
  assert len({a, b, c}) == 2


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
  base = data.perceptual_hash(Image.fromarray(image))
  rescaled = data.perceptual_hash(Image.fromarray(image).resize((90, 80)))
  cropped = data.perceptual_hash(Image.fromarray(image[1:-1, 2:-1]))
  different = data.perceptual_hash(Image.fromarray(other))

  def distance(a, b):
    return bin(a ^ b).count("1")

  assert distance(base, rescaled) <= data.DEDUPE_THRESHOLD
  assert distance(base, cropped) <= data.DEDUPE_THRESHOLD
  assert distance(base, different) > data.DEDUPE_THRESHOLD


def test_find_duplicates_groups_and_conflicts():
  hashes = [0b0, 0b1, 0b11, (1 << 40) - 1, (1 << 40) - 2, 0xFFFF << 44]
  labels = [1, 1, 1, 1, 2, 0]
  ids = ["a", "b", "c", "d", "e", "f"]
  drop, report = data.find_duplicates(hashes, labels, ids, threshold=2)
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
  opened = data.open_png(path)
  with Image.open(io.BytesIO(data.image_payload(opened))) as out:
    array = np.asarray(out.convert("RGB"))
  assert array.shape == (12, 10, 3)
  expected = (grey > 100) * 255 if mode == "1" else grey
  np.testing.assert_allclose(array[..., 0], expected, atol=1)
  np.testing.assert_array_equal(data.binary_mask(opened), expected > 0)


def test_transparent_mask_pixels_are_background():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., :3] = 255
  rgba[:2, :, 3] = 255  # Only the top half is opaque.
  mask = data.binary_mask(Image.fromarray(rgba, "RGBA"))
  assert mask[:2].all() and not mask[2:].any()
