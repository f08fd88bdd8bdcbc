"""Few-shot episodes: support / query draws and shot-list files.

An episode is a pair of index arrays into one split: the support (the shots
the model adapts on) and the query (every other image, minus the images of
the support patients). `sample_episodes` draws them reproducibly from the
labels alone; `save_shots` / `load_shots` store the draws by image id, so
that a published shot list stays valid when the data are re-prepared.

Everything here is numpy on labels and ids, which come from
`ultraad_jax.data` (`labels_of`, `image_ids_of`, `patient_ids_of`); that
module also re-exports the public names below. The class indices are those
of the dataset schema (`builder_base.CLASS_NAMES`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from ultraad_jax import builder_base

SETTINGS = {
    # setting -> classes that give support shots
    "per_class": (
        builder_base.NORMAL,
        builder_base.BENIGN,
        builder_base.MALIGNANT,
    ),
    "normal_only": (builder_base.NORMAL,),
}
_MAX_ATTEMPTS = 1000


@dataclasses.dataclass(frozen=True)
class Episode:
  """A few-shot episode: index arrays into one split.

  Attributes:
    support: int64 [K] indices of the support (shot) images, class by class
      in SETTINGS order, sorted within a class.
    query: int64 [Q] sorted indices of the query images: every other image of
      the split, minus all images of the support patients.
  """

  support: np.ndarray
  query: np.ndarray

  def __eq__(self, other) -> bool:
    if not isinstance(other, Episode):
      return NotImplemented
    return np.array_equal(self.support, other.support) and np.array_equal(
        self.query, other.query
    )

  def __hash__(self) -> int:
    return hash((self.support.tobytes(), self.query.tobytes()))


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"labels must be a 1-D integer array, got {labels.dtype} "
        f"{labels.shape}."
    )
  names = builder_base.CLASS_NAMES
  bad = sorted(set(np.unique(labels).tolist()) - set(range(len(names))))
  if bad:
    raise ValueError(f"labels must be in 0..2 {names}, found {bad}.")
  return labels


def _patient_keys(patient_ids, num: int) -> np.ndarray | None:
  """Patient key per image, or None when no patient ids are known.

  Images with an empty id count as their own patient.
  """
  if patient_ids is None:
    return None
  patient_ids = [str(p) for p in patient_ids]
  if len(patient_ids) != num:
    raise ValueError(
        f"patient_ids has {len(patient_ids)} entries but labels has {num}."
    )
  if not any(patient_ids):
    return None
  return np.array(
      [p if p else f"\0image{i}" for i, p in enumerate(patient_ids)]
  )


def query_for(
    support: np.ndarray, num: int, patient_ids: Sequence[str] | None = None
) -> np.ndarray:
  """The query of a support set: the rest, minus the support patients.

  Args:
    support: support indices.
    num: number of images in the split.
    patient_ids: per-image patient ids, or None.

  Returns:
    Sorted int64 indices.
  """
  keep = np.ones(num, bool)
  keep[np.asarray(support, np.int64)] = False
  keys = _patient_keys(patient_ids, num)
  if keys is not None:
    keep &= ~np.isin(keys, keys[np.asarray(support, np.int64)])
  return np.nonzero(keep)[0].astype(np.int64)


def sample_episodes(
    labels,
    *,
    shots: int,
    setting: str,
    num_episodes: int,
    seed: int,
    patient_ids: Sequence[str] | None = None,
) -> list[Episode]:
  """Draws few-shot episodes from one split.

  Support images are drawn without replacement, class by class. Episode i
  uses np.random.default_rng([seed, i]) and is the same whatever
  num_episodes is. Two episodes of one draw never have the same support: a
  collision is redrawn (bounded attempts).

  Args:
    labels: int [N] class per image (0 normal, 1 benign, 2 malignant).
    shots: support images per class ("per_class") or normal images
      ("normal_only").
    setting: "per_class" or "normal_only".
    num_episodes: how many episodes.
    seed: integer seed.
    patient_ids: optional [N] patient per image ("" = unknown). When any is
      non-empty, the query excludes every image of the support patients.

  Returns:
    num_episodes Episodes.

  Raises:
    ValueError: unknown setting; a class with fewer images than shots (the
      message gives the class, its count and the shots asked); more episodes
      than distinct supports exist; an empty query.
  """
  labels = _check_labels(labels)
  if setting not in SETTINGS:
    raise ValueError(
        f"Unknown episode setting {setting!r}; expected one of "
        f"{sorted(SETTINGS)}."
    )
  if isinstance(shots, bool) or int(shots) != shots or shots < 1:
    raise ValueError(f"shots={shots!r}: expected an integer >= 1.")
  if int(num_episodes) != num_episodes or num_episodes < 1:
    raise ValueError(f"num_episodes={num_episodes!r}: expected >= 1.")
  shots, num_episodes, seed = int(shots), int(num_episodes), int(seed)
  num = len(labels)
  _patient_keys(patient_ids, num)  # Validates the length early.

  pools = []
  for cls in SETTINGS[setting]:
    pool = np.nonzero(labels == cls)[0]
    if len(pool) < shots:
      class_name = builder_base.CLASS_NAMES[cls]
      raise ValueError(
          f"Setting {setting!r} needs {shots} {class_name} image(s) per"
          f" episode but the split has only {len(pool)} {class_name} "
          f"image(s) (of {num}). Use fewer shots or a larger split."
      )
    pools.append(pool)
  possible = math.prod(math.comb(len(pool), shots) for pool in pools)
  if num_episodes > possible:
    raise ValueError(
        f"{num_episodes} distinct episodes asked, but only {possible} distinct"
        f" {shots}-shot supports exist in this split (setting {setting!r})."
    )

  episodes, seen = [], set()
  for i in range(num_episodes):
    rng = np.random.default_rng([seed, i])
    for _ in range(_MAX_ATTEMPTS):
      support = np.concatenate(
          [
              np.sort(rng.choice(pool, size=shots, replace=False))
              for pool in pools
          ]
      ).astype(np.int64)
      if support.tobytes() not in seen:
        break
    else:
      raise ValueError(
          f"Could not draw episode {i} distinct from the previous ones in "
          f"{_MAX_ATTEMPTS} attempts ({possible} distinct supports exist); ask"
          " for fewer episodes."
      )
    seen.add(support.tobytes())
    query = query_for(support, num, patient_ids)
    if not len(query):
      raise ValueError(
          f"Episode {i} has an empty query: the support patients cover the "
          "whole split."
      )
    episodes.append(Episode(support=support, query=query))
  return episodes


SHOTS_FORMAT = "ultraad_jax.shots/1"


def save_shots(
    path: os.PathLike | str,
    episodes: Sequence[Episode],
    image_ids: Sequence[str],
    *,
    meta: Mapping[str, Any],
) -> None:
  """Writes the support image ids of every episode to a JSON file.

  Ids (not indices) make the file valid across re-preparations and
  orderings of the same data.

  Args:
    path: output file.
    episodes: the episodes.
    image_ids: image id per index of the split the episodes index.
    meta: JSON-serialisable facts about the draw (dataset, split, setting,
      shots, seed, ...); "seed" is also copied into every entry.
  """
  image_ids = [str(i) for i in image_ids]
  entries = [
      {
          "index": i,
          "seed": meta.get("seed"),
          "support_ids": [image_ids[j] for j in episode.support],
      }
      for i, episode in enumerate(episodes)
  ]
  document = {"format": SHOTS_FORMAT, "meta": dict(meta), "episodes": entries}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(document, indent=1) + "\n")


def load_shots(
    path: os.PathLike | str,
    image_ids: Sequence[str],
    *,
    patient_ids: Sequence[str] | None = None,
) -> list[Episode]:
  """Reads a shot-list file back into Episodes of the given split.

  Args:
    path: file written by `save_shots`.
    image_ids: image id per index of the split to index into.
    patient_ids: per-image patient ids (for the patient-disjoint query).

  Returns:
    One Episode per entry, the query recomputed as in `sample_episodes`.

  Raises:
    FileNotFoundError: missing file.
    ValueError: not a shot-list file, or duplicated ids in image_ids.
    KeyError: support ids absent from image_ids (all of them named).
  """
  path = pathlib.Path(path)
  try:
    document = json.loads(path.read_text())
  except FileNotFoundError:
    raise
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable JSON shot list ({e}).") from e
  if not isinstance(document, dict) or "episodes" not in document:
    raise ValueError(
        f"{path}: not a shot list (expected a JSON object with 'episodes', "
        "as written by ultraad_jax.data.save_shots)."
    )
  position = {}
  for i, image_id in enumerate(str(x) for x in image_ids):
    if image_id in position:
      raise ValueError(
          f"image id {image_id!r} appears twice (indices {position[image_id]} "
          f"and {i}); shot lists need unique ids."
      )
    position[image_id] = i
  unknown = sorted(
      {
          support_id
          for entry in document["episodes"]
          for support_id in entry["support_ids"]
          if support_id not in position
      }
  )
  if unknown:
    raise KeyError(
        f"{path}: {len(unknown)} support id(s) are not in this split: "
        f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}. Was the file "
        "written for another dataset, split or dedupe setting?"
    )
  episodes = []
  for entry in document["episodes"]:
    support = np.array(
        [position[s] for s in entry["support_ids"]], dtype=np.int64
    )
    episodes.append(
        Episode(
            support=support,
            query=query_for(support, len(position), patient_ids),
        )
    )
  return episodes
