"""Tests for the BI-RADS description library and its assignment rule."""

import numpy as np
import pytest

from ultraad_jax import clip
from ultraad_jax import descriptions


def test_every_class_has_distinct_descriptions():
  lib = descriptions.library()
  assert sorted(lib) == [0, 1, 2]
  for c, texts in lib.items():
    assert len(texts) >= 12, c
    assert len(set(texts)) == len(texts), c
  # Key descriptors separate the classes.
  assert all("circumscribed" in t for t in lib[1])
  assert not any("irregular" in t or "spiculated" in t for t in lib[1])
  assert all("irregular" in t for t in lib[2])
  for word in ("irregular", "spiculated", "angular", "lesion:"):
    assert not any(word in t for t in lib[0]), word


def test_descriptions_fit_the_clip_context():
  tok = clip.build_tokenizer()
  for texts in descriptions.library().values():
    lengths = [len(ids) for ids in tok(list(texts))["input_ids"]]
    assert max(lengths) <= clip.CONTEXT_LENGTH, max(lengths)


def test_assignment_covers_each_sample_with_its_class():
  labels = [0, 1, 2, 2, 1, 0, 0]
  out = descriptions.assign_descriptions(labels, seed=3)
  lib = descriptions.library()
  assert len(out) == len(labels)
  for label, text in zip(labels, out):
    assert text in lib[label]
  # Distinct within a class while the library lasts.
  normals = [t for l, t in zip(labels, out) if l == 0]
  assert len(set(normals)) == len(normals)


def test_assignment_deterministic_and_varies_with_seed():
  labels = np.repeat([0, 1, 2], 4)
  a = descriptions.assign_descriptions(labels, seed=0)
  b = descriptions.assign_descriptions(labels, seed=0)
  assert a == b
  others = [descriptions.assign_descriptions(labels, seed=s)
            for s in range(1, 4)]  # fmt: skip
  assert all(o != a for o in others)


def test_views_of_one_image_share_a_description():
  labels = [0, 0, 1, 1, 2, 2]
  group = [0, 0, 1, 1, 2, 2]
  out = descriptions.assign_descriptions(labels, seed=5, group=group)
  assert out[0] == out[1] and out[2] == out[3] and out[4] == out[5]
  # The same images without views get the same descriptions.
  single = descriptions.assign_descriptions([0, 1, 2], seed=5)
  assert single == [out[0], out[2], out[4]]


def test_bad_labels_and_groups_raise():
  with pytest.raises(ValueError, match="labels hold"):
    descriptions.assign_descriptions([0, 3], seed=0)
  with pytest.raises(ValueError, match="group"):
    descriptions.assign_descriptions([0, 1], seed=0, group=[0])
  with pytest.raises(ValueError, match="share its label"):
    descriptions.assign_descriptions([0, 1], seed=0, group=[7, 7])
