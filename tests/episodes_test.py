"""Tests of ultraad_jax.episodes: episode draws and shot-list files."""

import json

import numpy as np
import pytest

from ultraad_jax import episodes as episodes_lib

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
  episodes = episodes_lib.sample_episodes(
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
  first = episodes_lib.sample_episodes(LABELS, seed=7, **kwargs)
  again = episodes_lib.sample_episodes(LABELS, seed=7, **kwargs)
  other = episodes_lib.sample_episodes(LABELS, seed=8, **kwargs)
  assert first == again
  assert first != other


def test_episode_i_does_not_depend_on_num_episodes():
  kwargs = dict(shots=3, setting="per_class", seed=3)
  short = episodes_lib.sample_episodes(LABELS, num_episodes=2, **kwargs)
  long = episodes_lib.sample_episodes(LABELS, num_episodes=9, **kwargs)
  assert short == long[:2]


def test_episodes_of_one_draw_differ_even_when_collisions_are_likely():
  # 3 images per class, 2 shots: 3**3 = 27 distinct supports in all.
  labels = np.repeat(np.arange(3), 3)
  episodes = episodes_lib.sample_episodes(
      labels, shots=2, setting="per_class", num_episodes=27, seed=0
  )
  supports = {e.support.tobytes() for e in episodes}
  assert len(supports) == 27
  with pytest.raises(ValueError, match="only 27 distinct"):
    episodes_lib.sample_episodes(
        labels, shots=2, setting="per_class", num_episodes=28, seed=0
    )


def test_patient_disjoint_query():
  episodes = episodes_lib.sample_episodes(
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
  plain = episodes_lib.sample_episodes(
      LABELS, shots=2, setting="per_class", num_episodes=10, seed=0
  )
  assert [e.support.tolist() for e in plain] == [
      e.support.tolist() for e in episodes
  ]
  assert any(len(p.query) > len(e.query) for p, e in zip(plain, episodes))


def test_empty_patient_ids_mean_unknown():
  with_empty = episodes_lib.sample_episodes(
      LABELS,
      shots=1,
      setting="per_class",
      num_episodes=3,
      seed=0,
      patient_ids=[""] * len(LABELS),
  )
  without = episodes_lib.sample_episodes(
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
    episodes_lib.sample_episodes(
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
    episodes_lib.sample_episodes(LABELS, **args)


def test_bad_labels():
  with pytest.raises(ValueError, match=r"found \[3\]"):
    episodes_lib.sample_episodes(
        np.array([0, 1, 2, 3]),
        shots=1,
        setting="per_class",
        num_episodes=1,
        seed=0,
    )


def test_empty_query_error():
  with pytest.raises(ValueError, match="empty query"):
    episodes_lib.sample_episodes(
        np.array([0, 1, 2]),
        shots=1,
        setting="per_class",
        num_episodes=1,
        seed=0,
    )


def test_shot_files_round_trip(tmp_path):
  image_ids = [f"img{i:03d}" for i in range(len(LABELS))]
  episodes = episodes_lib.sample_episodes(
      LABELS,
      shots=2,
      setting="per_class",
      num_episodes=4,
      seed=5,
      patient_ids=PATIENTS,
  )
  path = tmp_path / "shots" / "busi_2shot.json"
  meta = {"dataset": "busi", "split": "all", "shots": 2, "seed": 5}
  episodes_lib.save_shots(path, episodes, image_ids, meta=meta)
  document = json.loads(path.read_text())
  assert document["meta"] == meta
  assert [e["index"] for e in document["episodes"]] == [0, 1, 2, 3]
  assert document["episodes"][1]["seed"] == 5
  assert document["episodes"][1]["support_ids"] == [
      image_ids[i] for i in episodes[1].support
  ]
  loaded = episodes_lib.load_shots(path, image_ids, patient_ids=PATIENTS)
  assert loaded == episodes
  # The ids, not the positions, define the episode: reorder the split.
  order = np.random.default_rng(1).permutation(len(image_ids))
  shuffled = episodes_lib.load_shots(path, [image_ids[i] for i in order])
  for original, moved in zip(episodes, shuffled):
    assert sorted(order[moved.support]) == sorted(original.support)


def test_shot_files_errors(tmp_path):
  image_ids = [f"img{i:03d}" for i in range(len(LABELS))]
  episodes = episodes_lib.sample_episodes(
      LABELS, shots=1, setting="per_class", num_episodes=2, seed=0
  )
  path = tmp_path / "shots.json"
  episodes_lib.save_shots(path, episodes, image_ids, meta={"seed": 0})
  missing = image_ids[int(episodes[0].support[0])]
  with pytest.raises(KeyError) as info:
    episodes_lib.load_shots(path, [i for i in image_ids if i != missing])
  assert missing in str(info.value)
  with pytest.raises(ValueError, match="appears twice"):
    episodes_lib.load_shots(path, image_ids + image_ids[:1])
  (tmp_path / "other.json").write_text('{"hello": 1}')
  with pytest.raises(ValueError, match="not a shot list"):
    episodes_lib.load_shots(tmp_path / "other.json", image_ids)
  with pytest.raises(FileNotFoundError):
    episodes_lib.load_shots(tmp_path / "absent.json", image_ids)


def test_episode_equality_and_hash():
  a = episodes_lib.Episode(support=np.array([1, 2]), query=np.array([0, 3]))
  b = episodes_lib.Episode(support=np.array([1, 2]), query=np.array([0, 3]))
  c = episodes_lib.Episode(support=np.array([1, 3]), query=np.array([0, 2]))
  assert a == b and a != c
  assert len({a, b, c}) == 2
