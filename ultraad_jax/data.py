"""The data layer: the dataset registry, loading, random-access splits.

Four datasets share one schema (see `builder_base.features`): BUSI, BUS-UCLM
and BUS-BRA, built from their manual downloads, and a procedural phantom.
Each is a TFDS builder under `datasets/<name>/<name>.py`, stored as
array_record and read without TensorFlow through `builder.as_data_source()`.

Sections:
- the registry and `load(name, ...)`, which prepares a dataset when needed and
  returns one random-access `Source` per split (`ArraySource` holds arrays
  already in memory);
- small fields (labels, patient and image ids) without decoding images;
- the command line.

Related modules: `builder_base` (the machinery the builders share: schema,
file checks, bad inputs, near-duplicate removal) and `episodes` (few-shot
episodes and shot-list files). This module re-exports the names of both that
users of the data layer need (`Episode`, `sample_episodes`, `save_shots`,
`load_shots`, `query_for`, `BadInputError`, the class and report names), so
`ultraad_jax.data` stays the one entry point.

The builders are loaded by file path, never imported as `datasets.<name>`: a
top-level package called `datasets` would collide with Hugging Face's library.

Command line (prepare a dataset and print its splits):
  python -m ultraad_jax.data busi --data_dir ~/tfds \
      --manual_dir /path/to/Dataset_BUSI_with_GT [--skip_bad] [--dedupe]
"""

from __future__ import annotations

import argparse
import collections.abc
import importlib.util
import inspect
import json
import logging
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import array_record

from ultraad_jax import builder_base
from ultraad_jax import episodes as episodes_lib


class _DropHarmlessTfdsWarnings(logging.Filter):
  """Drops TFDS warnings that every use of this module triggers by design."""

  _PREFIXES = (
      "Using custom data configuration",  # Options map to custom configs.
      "Variant folder",  # Checked before every first preparation.
      "OpenCV is not installed",  # PIL decodes PNGs; no OpenCV needed.
  )

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._PREFIXES)


logging.getLogger("absl").addFilter(_DropHarmlessTfdsWarnings())

DATASET_NAMES = ("busi", "bus_uclm", "bus_bra", "us_phantom")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATASETS_DIR = REPO_ROOT / "datasets"

# Names re-exported for users of the data layer (see the module docstring).
CLASS_NAMES = builder_base.CLASS_NAMES
NORMAL = builder_base.NORMAL
BENIGN = builder_base.BENIGN
MALIGNANT = builder_base.MALIGNANT
FULL_SPLIT = builder_base.FULL_SPLIT
BAD_INPUTS_REPORT = builder_base.BAD_INPUTS_REPORT
DEDUPE_REPORT = builder_base.DEDUPE_REPORT
DEDUPE_THRESHOLD = builder_base.DEDUPE_THRESHOLD
BadInputError = builder_base.BadInputError
ImageMaskBuilder = builder_base.ImageMaskBuilder
SETTINGS = episodes_lib.SETTINGS
SHOTS_FORMAT = episodes_lib.SHOTS_FORMAT
Episode = episodes_lib.Episode
query_for = episodes_lib.query_for
sample_episodes = episodes_lib.sample_episodes
save_shots = episodes_lib.save_shots
load_shots = episodes_lib.load_shots

# ---------------------------------------------------------------------------
# Registry and loading.
# ---------------------------------------------------------------------------

_BUILDER_CLASSES: dict[str, type] = {}


def builder_class(name: str) -> type[builder_base.ImageMaskBuilder]:
  """Loads the builder class of a dataset from datasets/<name>/<name>.py.

  Loaded by file path (the folder `datasets` must not be imported as a
  package: that name belongs to Hugging Face's library), once per process,
  without TFDS's global registration (so it never clashes with `tfds build`).

  Args:
    name: one of DATASET_NAMES.

  Returns:
    The builder class.

  Raises:
    KeyError: for an unknown dataset name.
  """
  if name in _BUILDER_CLASSES:
    return _BUILDER_CLASSES[name]
  if name not in DATASET_NAMES:
    raise KeyError(
        f"Unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}."
        " To add one, see docs/DATA.md."
    )
  path = DATASETS_DIR / name / f"{name}.py"
  # A flat name: TFDS treats a dotted one as a package to look files up in.
  module_name = f"ultraad_jax_builder_{name}"
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  try:
    with tfds.core.registered.skip_registration():
      spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]
    raise
  classes = [
      value
      for value in vars(module).values()
      if isinstance(value, type)
      and issubclass(value, builder_base.ImageMaskBuilder)
      and value.__module__ == module_name
  ]
  if len(classes) != 1:
    raise TypeError(f"{path} must define exactly one builder class.")
  _BUILDER_CLASSES[name] = classes[0]
  return classes[0]


def make_builder(
    name: str, *, data_dir: os.PathLike | str, **options
) -> builder_base.ImageMaskBuilder:
  """A builder instance for `name` with these options (not prepared).

  Args:
    name: dataset name.
    data_dir: root of the prepared datasets; the data go to
      <data_dir>/<name>/<config name>/<version>/, so that different options
      never share a directory.
    **options: builder options (see `load`).

  Returns:
    The builder.

  Raises:
    TypeError: for an option the dataset does not have (the message lists
      the valid ones).
  """
  cls = builder_class(name)
  valid = list(inspect.signature(cls.config_for).parameters)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise TypeError(
        f"{name}: unknown option(s) {unknown}; valid options: {valid}."
    )
  config = cls.config_for(**options)
  return cls(
      data_dir=os.fspath(pathlib.Path(data_dir).expanduser()),
      config=config,
      file_format="array_record",
  )


def load(
    name: str,
    *,
    data_dir: os.PathLike | str,
    manual_dir: os.PathLike | str | None = None,
    **options,
) -> dict[str, "Source"]:
  """Loads a dataset as random-access splits, preparing it first if needed.

  Args:
    name: "busi", "bus_uclm", "bus_bra" or "us_phantom".
    data_dir: where prepared datasets live (created if needed).
    manual_dir: the manual download (manual datasets; default
      <data_dir>/downloads/manual). Only read when preparing.
    **options: every dataset: builder_config (a predefined config name to
      start from) and skip_bad, dedupe (bool; no effect on the phantom).
      Manual datasets: dedupe_threshold (int). us_phantom: image_size,
      n_per_class, difficulty, seed (presets "demo", the default, and
      "large").

  Returns:
    {"all": Source, <official split>: Source, ...}; each Source reads
    examples as numpy dicts (see `Source`).

  Raises:
    FileNotFoundError: missing manual data (the message says what, the
      expected layout and where to download it).
    BadInputError: unusable files (each named with its problem) unless
      skip_bad=True.
  """
  builder = make_builder(name, data_dir=data_dir, **options)
  if not builder.is_prepared():
    if isinstance(builder, builder_base.ManualBuilder):
      # Fail early, with the layout and download location in the message.
      default = pathlib.Path(data_dir).expanduser() / "downloads" / "manual"
      if manual_dir is None and not default.is_dir():
        raise FileNotFoundError(
            builder.missing_data_message(
                f"no manual_dir was given and the default manual folder "
                f"{default} does not exist"
            )
        )
      builder.find_root(default if manual_dir is None else manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir)
        )
    )
  else:
    report_path = (
        pathlib.Path(builder.data_dir) / builder_base.BAD_INPUTS_REPORT
    )
    if report_path.exists():
      report = json.loads(report_path.read_text())
      if report.get("num_skipped"):
        builder_base.warn_skipped(name, report, pathlib.Path(builder.data_dir))
  splits = ("all",) + tuple(builder.OFFICIAL_SPLITS)
  return {split: Source(builder, split) for split in splits}


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _index(index, length: int) -> int:
  """Validates one index (numpy ints and negatives accepted)."""
  try:
    index = (
        int(np.asarray(index).item()) if not isinstance(index, int) else index
    )
  except (TypeError, ValueError) as e:
    raise TypeError(f"index must be an integer, got {index!r}") from e
  if not -length <= index < length:
    raise IndexError(f"index {index} out of range for {length} examples")
  return index % length


class Source(collections.abc.Sequence):
  """One split of a prepared dataset: random access, numpy dicts.

  `source[i]` is {"image": uint8 [H, W, 3], "mask": uint8 [H, W, 1] in {0, 1},
  "label": int, "image_id": str, "patient_id": str}. The small fields are
  available for the whole split without decoding images (`labels`,
  `image_ids`, `patient_ids`), and `encoded(i)` returns the stored PNG bytes
  for fast resizing (see pipeline.load_arrays).

  Attributes:
    dataset: dataset name.
    config: builder config name.
    split: split name ("all", "train", ...).
    data_dir: the prepared directory (reports lie there).
    tfds_source: the underlying TFDS ArrayRecordDataSource.
  """

  def __init__(self, builder: builder_base.ImageMaskBuilder, split: str):
    self.dataset = builder.name
    self.config = builder.builder_config.name
    self.split = split
    self.data_dir = pathlib.Path(builder.data_dir)
    self.tfds_source = builder.as_data_source(split=split)
    self._encoded = builder.as_data_source(
        split=split,
        decoders={
            "image": tfds.decode.SkipDecoding(),
            "mask": tfds.decode.SkipDecoding(),
        },
    )
    self._small = None

  def __len__(self) -> int:
    return len(self.tfds_source)

  def __repr__(self) -> str:
    return (
        f"Source({self.dataset}/{self.config}, split={self.split!r}, "
        f"{len(self)} examples)"
    )

  def __getitem__(self, index) -> dict[str, Any]:
    if isinstance(index, slice):
      return self.__getitems__(range(len(self))[index])
    return _clean(self.tfds_source[_index(index, len(self))])

  def __getitems__(self, indices: Iterable[int]) -> list[dict[str, Any]]:
    indices = [_index(i, len(self)) for i in indices]
    return [_clean(e) for e in self.tfds_source.__getitems__(indices)]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def encoded(self, indices: Iterable[int]) -> list[dict[str, Any]]:
    """Examples with "image" and "mask" left as stored PNG bytes."""
    indices = [_index(i, len(self)) for i in indices]
    if not indices:
      return []
    return [_clean(e) for e in self._encoded.__getitems__(indices)]

  @property
  def small_fields(self) -> dict[str, Any]:
    """{"label": int32 [N], "image_id": [str], "patient_id": [str]}, cached."""
    if self._small is None:
      labels, image_ids, patient_ids = [], [], []
      for start in range(0, len(self), 256):
        for example in self.encoded(range(start, min(len(self), start + 256))):
          labels.append(example["label"])
          image_ids.append(example["image_id"])
          patient_ids.append(example["patient_id"])
      self._small = {
          "label": np.asarray(labels, np.int32),
          "image_id": image_ids,
          "patient_id": patient_ids,
      }
    return self._small

  @property
  def labels(self) -> np.ndarray:
    return self.small_fields["label"]

  @property
  def image_ids(self) -> list[str]:
    return self.small_fields["image_id"]

  @property
  def patient_ids(self) -> list[str]:
    return self.small_fields["patient_id"]


def _clean(example: Mapping[str, Any]) -> dict[str, Any]:
  """TFDS numpy example -> Python-friendly dict (str ids, int label)."""
  out = dict(example)
  out["label"] = int(out["label"])
  out["image_id"] = _as_str(out["image_id"])
  out["patient_id"] = _as_str(out["patient_id"])
  return out


class ArraySource(collections.abc.Sequence):
  """In-memory source with the same interface as `Source` (no TFDS).

  For arrays that are already in memory, e.g. `ArraySource(**phantom.
  generate(...))` in tests and demos.

  Attributes:
    images: uint8 [N, H, W, 3].
    masks: uint8 [N, H, W] in {0, 1}.
    labels: int32 [N].
    image_ids: list of N str.
    patient_ids: list of N str.
  """

  def __init__(
      self,
      images: np.ndarray,
      masks: np.ndarray,
      labels: Sequence[int],
      image_ids: Sequence[str] | None = None,
      patient_ids: Sequence[str] | None = None,
  ):
    images = np.asarray(images)
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
      masks = masks[..., 0]
    num = len(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(
          f"images must be uint8 [N, H, W, 3], got {images.dtype} "
          f"{images.shape}."
      )
    if masks.shape != images.shape[:3]:
      raise ValueError(
          f"masks must be [N, H, W] = {images.shape[:3]}, got {masks.shape}."
      )
    self.images = images
    self.masks = masks.astype(np.uint8)
    self.labels = np.asarray(labels, np.int32)
    self.image_ids = (
        [f"{i:05d}" for i in range(num)]
        if image_ids is None
        else [str(i) for i in image_ids]
    )
    self.patient_ids = (
        [""] * num if patient_ids is None else [str(p) for p in patient_ids]
    )
    for field, values in (
        ("labels", self.labels),
        ("image_ids", self.image_ids),
        ("patient_ids", self.patient_ids),
    ):
      if len(values) != num:
        raise ValueError(f"{field} has {len(values)} entries, images {num}.")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index) -> dict[str, Any]:
    i = _index(index, len(self))
    return {
        "image": self.images[i],
        "mask": self.masks[i][..., None],
        "label": int(self.labels[i]),
        "image_id": self.image_ids[i],
        "patient_id": self.patient_ids[i],
    }

  def __getitems__(self, indices: Iterable[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  @property
  def small_fields(self) -> dict[str, Any]:
    return {
        "label": self.labels,
        "image_id": self.image_ids,
        "patient_id": self.patient_ids,
    }


# ---------------------------------------------------------------------------
# Small fields.
# ---------------------------------------------------------------------------


def _small_fields(source) -> dict[str, Any]:
  """Labels and ids of every example, decoding images only as a last resort."""
  if hasattr(source, "small_fields"):
    return source.small_fields
  encoded = source
  data_source_cls = array_record.ArrayRecordDataSource
  if isinstance(source, data_source_cls):
    # A raw TFDS data source: read a twin that skips image decoding.
    encoded = data_source_cls(
        dataset_info=source.dataset_info,
        split=source.split,
        decoders={
            "image": tfds.decode.SkipDecoding(),
            "mask": tfds.decode.SkipDecoding(),
        },
    )
  labels, image_ids, patient_ids = [], [], []
  for i in range(len(encoded)):
    example = encoded[i]
    labels.append(int(example["label"]))
    image_ids.append(_as_str(example.get("image_id", f"{i:05d}")))
    patient_ids.append(_as_str(example.get("patient_id", "")))
  return {
      "label": np.asarray(labels, np.int32),
      "image_id": image_ids,
      "patient_id": patient_ids,
  }


def labels_of(source) -> np.ndarray:
  """Class index of every example, int32 [N] (cached by `Source`)."""
  return np.asarray(_small_fields(source)["label"], np.int32)


def image_ids_of(source) -> list[str]:
  """Image id of every example."""
  return list(_small_fields(source)["image_id"])


def patient_ids_of(source) -> list[str]:
  """Patient id of every example ("" when unknown)."""
  return list(_small_fields(source)["patient_id"])


def read_indices(source, indices: Iterable[int]) -> dict[str, Any]:
  """Reads some examples at native size.

  Args:
    source: a `Source`, `ArraySource` or any sequence of example dicts.
    indices: positions to read.

  Returns:
    {"image": list of uint8 [H, W, 3], "mask": list of uint8 [H, W] in {0,1},
    "label": int32 [K], "image_id": list of str, "patient_id": list of str}.
    Images keep their own sizes; `pipeline.load_arrays` returns stacked,
    resized arrays.
  """
  indices = [int(i) for i in np.asarray(list(indices), np.int64).ravel()]
  if hasattr(source, "__getitems__"):
    examples = source.__getitems__(indices)
  else:
    examples = [source[i] for i in indices]
  return {
      "image": [np.asarray(e["image"]) for e in examples],
      "mask": [
          np.asarray(e["mask"]).reshape(e["mask"].shape[:2]) for e in examples
      ],
      "label": np.asarray([int(e["label"]) for e in examples], np.int32),
      "image_id": [_as_str(e.get("image_id", "")) for e in examples],
      "patient_id": [_as_str(e.get("patient_id", "")) for e in examples],
  }


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _parse_value(text: str):
  for convert in (int, float):
    try:
      return convert(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: Sequence[str] | None = None) -> None:
  """Prepares a dataset and prints its splits and class counts."""
  parser = argparse.ArgumentParser(
      prog="python -m ultraad_jax.data", description=main.__doc__
  )
  parser.add_argument("name", choices=DATASET_NAMES)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--manual_dir", default=None)
  parser.add_argument("--skip_bad", action="store_true")
  parser.add_argument("--dedupe", action="store_true")
  parser.add_argument(
      "--option",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="other builder options, e.g. --option image_size=224",
  )
  args = parser.parse_args(argv)
  options = {}
  if args.skip_bad:
    options["skip_bad"] = True
  if args.dedupe:
    options["dedupe"] = True
  for item in args.option:
    key, _, value = item.partition("=")
    options[key] = _parse_value(value)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  splits = load(
      args.name, data_dir=args.data_dir, manual_dir=args.manual_dir, **options
  )
  for split, source in splits.items():
    counts = np.bincount(source.labels, minlength=3)
    print(
        f"{args.name}/{source.config} {split}: {len(source)} images "
        + ", ".join(f"{n} {c}" for c, n in zip(CLASS_NAMES, counts))
    )
  print(f"prepared in {splits['all'].data_dir}")


if __name__ == "__main__":
  # Run through the package module so that the registry and the classes
  # above exist once, as `ultraad_jax.data`, whatever else imports it.
  from ultraad_jax import data as _data  # pylint: disable=g-import-not-at-top

  _data.main()
