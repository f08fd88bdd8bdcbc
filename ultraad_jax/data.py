"""The data layer: datasets, random-access splits, few-shot episodes.

Four datasets share one schema (see `features`): BUSI, BUS-UCLM and BUS-BRA,
built from their manual downloads, and a procedural phantom. Each is a TFDS
builder under `datasets/<name>/<name>.py`, stored as array_record and read
without TensorFlow through `builder.as_data_source()`.

Sections:
- builder machinery shared by the builders (features, PNG checks, bad-input
  handling, near-duplicate removal), imported by `datasets/*/*.py`;
- the registry and `load(name, ...)`, which prepares a dataset when needed and
  returns one random-access `Source` per split;
- small fields (labels, patient and image ids) without decoding images;
- few-shot episodes and shot-list files.

The builders are loaded by file path, never imported as `datasets.<name>`: a
top-level package called `datasets` would collide with Hugging Face's library.

Command line (prepare a dataset and print its splits):
  python -m ultraad_jax.data busi --data_dir ~/tfds \
      --manual_dir /path/to/Dataset_BUSI_with_GT [--skip_bad] [--dedupe]
"""

from __future__ import annotations

import abc
import argparse
import collections
import collections.abc
import concurrent.futures
import dataclasses
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import pathlib
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError
import scipy.fft
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import array_record

logger = logging.getLogger(__name__)


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

CLASS_NAMES = ("normal", "benign", "malignant")
NORMAL, BENIGN, MALIGNANT = 0, 1, 2
DATASET_NAMES = ("busi", "bus_uclm", "bus_bra", "us_phantom")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATASETS_DIR = REPO_ROOT / "datasets"
# Reports written next to the prepared data (in builder.data_dir).
BAD_INPUTS_REPORT = "bad_inputs.json"
DEDUPE_REPORT = "dedupe.json"
# Stored split of datasets without an official partition; users see it as
# "all" (TFDS reserves that name for the union of the stored splits).
FULL_SPLIT = "full"
# Default Hamming distance (of 64) at which two perceptual hashes are the same
# picture. On BUSI, pairs at distance <= 8 that we inspected were all the same
# frame (re-cropped, rescaled or with overlays); at 12-16 distinct frames of
# one lesion start to appear.
DEDUPE_THRESHOLD = 8
# Bad files listed in one error message (the report lists all of them).
_MAX_LISTED = 50

# ---------------------------------------------------------------------------
# Builder machinery (used by datasets/*/*.py).
# ---------------------------------------------------------------------------


def features() -> tfds.features.FeaturesDict:
  """The feature dict every dataset uses.

  Returns:
    FeaturesDict with "image" uint8 [H, W, 3] (native size), "mask" uint8
    [H, W, 1] in {0, 1}, "label" ClassLabel(normal, benign, malignant),
    "image_id" (the file stem, unique) and "patient_id" ("" when unknown).
  """
  return tfds.features.FeaturesDict(
      {
          "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
          "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
          "image_id": tfds.features.Text(),
          "patient_id": tfds.features.Text(),
      }
  )


class BadInputError(ValueError):
  """Input files that cannot be used; the message lists file and problem."""


class FileProblem(Exception):
  """One unusable input file, raised while reading it (caught by builders)."""

  def __init__(self, path: os.PathLike | str, problem: str):
    super().__init__(f"{path}: {problem}")
    self.path = str(path)
    self.problem = problem


def open_png(path: os.PathLike | str) -> Image.Image:
  """Opens, checks and fully decodes an image file.

  Args:
    path: file to read.

  Returns:
    The decoded PIL image.

  Raises:
    FileProblem: when the file is empty, not an image, corrupt or truncated.
  """
  path = pathlib.Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise FileProblem(path, f"cannot read the file ({e})") from e
  if not data:
    raise FileProblem(path, "file is empty (0 bytes)")
  try:
    # verify() checks the chunk checksums; it consumes the image, so the
    # pixels are then decoded from a second handle.
    with Image.open(io.BytesIO(data)) as probe:
      probe.verify()
    image = Image.open(io.BytesIO(data))
    image.load()
  except UnidentifiedImageError as e:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
      raise FileProblem(
          path, "corrupt or truncated PNG (valid signature, unreadable header)"
      ) from e
    raise FileProblem(
        path, "not an image file (PIL cannot identify its format)"
    ) from e
  except (OSError, SyntaxError, ValueError) as e:
    raise FileProblem(path, f"corrupt or truncated image ({e})") from e
  except Image.DecompressionBombError as e:
    raise FileProblem(path, f"image too large to decode safely ({e})") from e
  image.info["source_bytes"] = data
  return image


def to_8bit(image: Image.Image) -> Image.Image:
  """Any PIL image -> mode "L" or "RGB" (alpha composited over black).

  Args:
    image: decoded PIL image of any mode (1, L, LA, P, RGB, RGBA, I;16, ...).

  Returns:
    An 8-bit "L" or "RGB" image (16-bit grey scaled to 8 bits).
  """
  if image.mode in ("L", "RGB"):
    return image
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    array = np.asarray(image, np.float64)
    top = 65535.0 if array.max() > 255 else 255.0
    return Image.fromarray(np.round(array / top * 255).astype(np.uint8), "L")
  if image.mode == "P":
    image = image.convert("RGBA")
  if image.mode in ("LA", "RGBA", "PA"):
    array = np.asarray(image, np.float64)
    colour = array[..., :-1] * (array[..., -1:] / 255.0)
    colour = np.round(colour).astype(np.uint8)
    return Image.fromarray(colour[..., 0] if colour.shape[-1] == 1 else colour)
  return image.convert("RGB")


def image_payload(image: Image.Image) -> bytes:
  """PNG bytes to store for an image opened with `open_png`.

  8-bit greyscale and RGB PNGs are stored as read (no re-encoding, which
  dominates preparation time); other modes are converted to 8-bit grey or RGB
  first. Greyscale is kept single-channel: the reader expands it to 3
  identical channels.

  Args:
    image: image from `open_png`.

  Returns:
    Encoded PNG.
  """
  source = image.info.get("source_bytes")
  if image.format == "PNG" and image.mode in ("L", "RGB") and source:
    return source
  return encode_png(np.asarray(to_8bit(image)))


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
  """uint8 [H, W] or [H, W, 3] -> PNG bytes (fast compression)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(
      buffer, format="PNG", compress_level=compress_level
  )
  return buffer.getvalue()


def binary_mask(image: Image.Image) -> np.ndarray:
  """Any mask image -> bool [H, W]: True where any colour channel is nonzero.

  Transparent pixels (alpha 0) count as background.

  Args:
    image: decoded mask.

  Returns:
    bool [H, W].
  """
  if image.mode == "1":
    return np.array(image, bool)
  array = np.asarray(to_8bit(image))
  if array.ndim == 2:
    return array > 0
  # Channel by channel: reductions over a last axis of 3 are ~8x slower.
  merged = array[..., 0].copy()
  for channel in range(1, array.shape[-1]):
    merged |= array[..., channel]
  return merged > 0


def encode_mask(mask: np.ndarray) -> bytes:
  """bool/uint8 [H, W] -> PNG of a {0, 1} single-channel image."""
  return encode_png(np.asarray(mask, bool).astype(np.uint8), compress_level=6)


def perceptual_hash(image: Image.Image) -> int:
  """64-bit DCT perceptual hash (pHash) of an image.

  Grey 32x32 thumbnail, 2-D DCT, the 8x8 lowest frequencies (DC excluded,
  63 bits) compared with their median. Robust to rescaling, small crops,
  compression and thin overlays.

  Args:
    image: any PIL image.

  Returns:
    The hash as a Python int (bit 63 is always 0).
  """
  grey = to_8bit(image).convert("L").resize((32, 32), Image.Resampling.BOX)
  coeffs = scipy.fft.dctn(np.asarray(grey, np.float64), norm="ortho")
  low = coeffs[:8, :8].ravel()[1:]
  bits = np.concatenate([[False], low > np.median(low)])
  return int.from_bytes(np.packbits(bits).tobytes(), "big")


def find_duplicates(
    hashes: Sequence[int],
    labels: Sequence[int],
    image_ids: Sequence[str],
    threshold: int = DEDUPE_THRESHOLD,
) -> tuple[set[int], dict[str, Any]]:
  """Groups near-identical images by perceptual hash.

  Images whose hashes differ in at most `threshold` bits are linked; groups
  are the connected components. A group with one label keeps its first
  member; a group with several labels is dropped entirely (which label is
  right cannot be known).

  Args:
    hashes: `perceptual_hash` per image.
    labels: class per image.
    image_ids: id per image (for the report).
    threshold: largest Hamming distance counted as a duplicate.

  Returns:
    (positions to drop, report dict with "groups" and "conflicting" lists).
  """
  num = len(hashes)
  drop: set[int] = set()
  report = {
      "hash": "pHash, 64-bit DCT",
      "threshold": threshold,
      "groups": [],
      "conflicting": [],
  }
  if num == 0:
    return drop, report
  words = np.array(hashes, dtype=np.uint64)
  distance = np.bitwise_count(words[:, None] ^ words[None, :])
  parent = list(range(num))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for a, b in zip(*np.nonzero(np.triu(distance <= threshold, k=1))):
    parent[root(a)] = root(b)
  groups = collections.defaultdict(list)
  for i in range(num):
    groups[root(i)].append(i)
  for members in sorted(groups.values()):
    if len(members) < 2:
      continue
    entry = {
        "image_ids": [image_ids[i] for i in members],
        "labels": [CLASS_NAMES[labels[i]] for i in members],
    }
    if len({labels[i] for i in members}) > 1:
      drop.update(members)
      entry["dropped"] = entry["image_ids"]
      report["conflicting"].append(entry)
    else:
      drop.update(members[1:])
      entry["kept"] = image_ids[members[0]]
      entry["dropped"] = [image_ids[i] for i in members[1:]]
      report["groups"].append(entry)
  report["num_dropped"] = len(drop)
  return drop, report


@dataclasses.dataclass
class Record:
  """One example before decoding: its files and what the layout tells.

  Attributes:
    image_id: unique id (the image file stem).
    image_path: the image file.
    mask_paths: mask files to OR-merge (may be empty).
    label: class index, or None when the builder reads it from the mask.
    patient_id: "" when unknown.
    split: stored split name.
  """

  image_id: str
  image_path: pathlib.Path
  mask_paths: tuple[pathlib.Path, ...] = ()
  label: int | None = None
  patient_id: str = ""
  split: str = FULL_SPLIT


@dataclasses.dataclass(frozen=True)
class Problem:
  """A bad input found while building: which file and what is wrong."""

  file: str
  problem: str


def natural_key(text: str) -> tuple:
  """Sort key that orders "x (2)" before "x (10)"."""
  return tuple(
      int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)
  )


class ImageMaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of every builder here: the shared schema, splits and options.

  Subclasses set VERSION, DESCRIPTION, HOMEPAGE, CITATION, OFFICIAL_SPLITS
  (stored splits; empty when the dataset has no official partition, then one
  split FULL_SPLIT is stored) and implement `config_for` and
  `_split_generators`. Users always see a split "all" (TFDS's union of the
  stored splits) plus the official ones.
  """

  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""
  OFFICIAL_SPLITS: tuple[str, ...] = ()

  @classmethod
  @abc.abstractmethod
  def config_for(cls, **options) -> tfds.core.BuilderConfig:
    """The builder config for user options (see `load`)."""

  @classmethod
  def stored_splits(cls) -> tuple[str, ...]:
    return cls.OFFICIAL_SPLITS or (FULL_SPLIT,)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs needs the builder to be a
    # package, and ours are plain modules loaded by path.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=features(),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        # Keep the order of _split_generators: index i is reproducible and
        # readable (BUSI "benign (1)" first), not a hash order.
        disable_shuffling=True,
    )

  def _generate_examples(self, examples):
    for example in examples:
      yield example["image_id"], {key: example[key] for key in _FEATURE_KEYS}


_FEATURE_KEYS = ("image", "mask", "label", "image_id", "patient_id")


@dataclasses.dataclass(eq=False)
class ManualConfig(tfds.core.BuilderConfig):
  """Options of datasets built from files (see ManualBuilder).

  Attributes:
    skip_bad: skip unusable files (listed in bad_inputs.json) instead of
      failing.
    dedupe: drop near-duplicate images (see `find_duplicates`).
    dedupe_threshold: Hamming distance for `dedupe`.
  """

  skip_bad: bool = False
  dedupe: bool = False
  dedupe_threshold: int = DEDUPE_THRESHOLD


def manual_config_name(skip_bad: bool, dedupe: bool, threshold: int) -> str:
  """Config (and directory) name of a combination of options."""
  parts = []
  if dedupe:
    parts.append(f"dedupe{threshold}")
  if skip_bad:
    parts.append("skip_bad")
  return "-".join(parts) or "default"


def _manual_configs() -> list[ManualConfig]:
  return [
      ManualConfig(
          name=manual_config_name(skip_bad, dedupe, DEDUPE_THRESHOLD),
          description=(
              f"skip_bad={skip_bad}, dedupe={dedupe}"
              + (f" (threshold {DEDUPE_THRESHOLD})" if dedupe else "")
          ),
          skip_bad=skip_bad,
          dedupe=dedupe,
      )
      for dedupe in (False, True)
      for skip_bad in (False, True)
  ]


class ManualBuilder(ImageMaskBuilder, skip_registration=True):
  """A dataset built from manually downloaded image and mask files.

  Subclasses set ROOT_NAME (the folder the download unpacks to),
  ROOT_ENTRIES (names that must exist inside it), MANUAL_DOWNLOAD_INSTRUCTIONS,
  and implement `_scan` (the layout: which files form an example). `_read_mask`
  can be overridden (BUS-UCLM reads the label from mask colours).

  Preparation reads every file (in threads), collects every problem, then
  either raises one BadInputError listing them all or, with skip_bad, drops
  the affected examples and writes bad_inputs.json next to the data.
  """

  BUILDER_CONFIGS = _manual_configs()
  ROOT_NAME = ""
  ROOT_ENTRIES: tuple[str, ...] = ()

  @classmethod
  def config_for(
      cls,
      *,
      builder_config: str | None = None,
      skip_bad: bool | None = None,
      dedupe: bool | None = None,
      dedupe_threshold: int | None = None,
  ) -> ManualConfig:
    """The config for these options (a predefined one when it exists).

    Args:
      builder_config: name of a predefined config to start from ("default",
        "skip_bad", "dedupe8", "dedupe8-skip_bad"); None or "" = "default".
      skip_bad: overrides the preset when not None.
      dedupe: overrides the preset when not None.
      dedupe_threshold: overrides the preset when not None.

    Returns:
      The ManualConfig.
    """
    presets = {c.name: c for c in cls.BUILDER_CONFIGS}
    preset = presets.get(builder_config or "default")
    if preset is None:
      raise ValueError(
          f"Unknown {cls.name} builder_config {builder_config!r}; predefined:"
          f" {sorted(presets)} (or pass skip_bad / dedupe / dedupe_threshold)."
      )
    skip_bad = preset.skip_bad if skip_bad is None else bool(skip_bad)
    dedupe = preset.dedupe if dedupe is None else bool(dedupe)
    threshold = (
        preset.dedupe_threshold
        if dedupe_threshold is None
        else int(dedupe_threshold)
    )
    if not 0 <= threshold <= 63:
      raise ValueError(
          f"dedupe_threshold={dedupe_threshold!r}: expected 0..63 bits."
      )
    name = manual_config_name(skip_bad, dedupe, threshold)
    if name in presets:
      return presets[name]
    return ManualConfig(
        name=name,
        description=(
            f"skip_bad={skip_bad}, dedupe={dedupe} (threshold {threshold})"
        ),
        skip_bad=skip_bad,
        dedupe=dedupe,
        dedupe_threshold=threshold,
    )

  @abc.abstractmethod
  def _scan(self, root: pathlib.Path) -> tuple[list[Record], list[Problem]]:
    """Lists the examples under root (layout problems go in the 2nd list)."""

  @classmethod
  def missing_data_message(cls, what: str) -> str:
    """Error text for missing manual data: what, the layout, where to get it."""
    return (
        f"{cls.name}: {what}.\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}\n"
        f"Then prepare it with:\n  python -m ultraad_jax.data {cls.name} "
        "--data_dir <DATA_DIR> --manual_dir <MANUAL_DIR>"
    )

  @classmethod
  def find_root(cls, manual_dir: os.PathLike | str) -> pathlib.Path:
    """The dataset folder: manual_dir/ROOT_NAME, or manual_dir itself.

    Args:
      manual_dir: the folder the user passed.

    Returns:
      The folder holding ROOT_ENTRIES.

    Raises:
      FileNotFoundError: naming what is missing, the expected layout and the
        download location.
    """
    manual_dir = pathlib.Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
      raise FileNotFoundError(
          cls.missing_data_message(f"manual folder {manual_dir} does not exist")
      )
    for root in (manual_dir / cls.ROOT_NAME, manual_dir):
      if all((root / entry).exists() for entry in cls.ROOT_ENTRIES):
        return root
    root = manual_dir / cls.ROOT_NAME
    if not root.is_dir():
      root = manual_dir
    missing = [e for e in cls.ROOT_ENTRIES if not (root / e).exists()]
    raise FileNotFoundError(
        cls.missing_data_message(
            f"{', '.join(str(root / m) for m in missing)} not found (looked in "
            f"{manual_dir / cls.ROOT_NAME} and {manual_dir})"
        )
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:  # TFDS: missing or empty manual folder.
      first_line = str(e).splitlines()[0] if str(e) else "no manual folder"
      raise FileNotFoundError(self.missing_data_message(first_line)) from e
    root = self.find_root(manual_dir)
    records, problems = self._scan(root)
    problems = list(problems)

    by_id = collections.defaultdict(list)
    for record in records:
      by_id[record.image_id].append(record)
    duplicated = set()
    for image_id, group in by_id.items():
      if len(group) > 1:
        duplicated.add(image_id)
        files = [str(r.image_path) for r in group]
        for record in group:
          others = ", ".join(f for f in files if f != str(record.image_path))
          problems.append(
              Problem(
                  str(record.image_path),
                  f"duplicate image id {image_id!r} (also {others}); "
                  "image ids (file stems) must be unique",
              )
          )
    records = [r for r in records if r.image_id not in duplicated]

    with concurrent.futures.ThreadPoolExecutor(_num_workers()) as pool:
      results = list(pool.map(self._process, records))
    examples = []
    for result in results:
      if isinstance(result, Problem):
        problems.append(result)
      else:
        examples.append(result)

    config = self.builder_config
    self._reports = {}
    if problems:
      if not config.skip_bad:
        lines = "\n".join(
            f"  {p.file}: {p.problem}" for p in problems[:_MAX_LISTED]
        )
        if len(problems) > _MAX_LISTED:
          lines += f"\n  ... and {len(problems) - _MAX_LISTED} more"
        raise BadInputError(
            f"{self.name}: {len(problems)} bad input file(s) under {root}:\n"
            f"{lines}\nFix or remove these files, or pass skip_bad=True to "
            f"skip them (they are then listed in {BAD_INPUTS_REPORT} next to "
            "the prepared data)."
        )
    self._reports[BAD_INPUTS_REPORT] = {
        "dataset": self.name,
        "config": config.name,
        "source": str(root),
        "skip_bad": config.skip_bad,
        "num_examples": len(examples),
        "num_skipped": len(problems),
        "skipped": [dataclasses.asdict(p) for p in problems],
    }

    if config.dedupe:
      drop, report = find_duplicates(
          [e["_hash"] for e in examples],
          [e["label"] for e in examples],
          [e["image_id"] for e in examples],
          config.dedupe_threshold,
      )
      report["num_before"] = len(examples)
      examples = [e for i, e in enumerate(examples) if i not in drop]
      report["num_after"] = len(examples)
      self._reports[DEDUPE_REPORT] = report

    splits = {name: [] for name in self.stored_splits()}
    for example in examples:
      splits[example["_split"]].append(example)
    for name, members in splits.items():
      if not members:
        raise BadInputError(
            f"{self.name}: split {name!r} would be empty after skipping "
            f"{len(problems)} bad file(s) under {root}; nothing to prepare."
        )
    return {name: self._generate_examples(m) for name, m in splits.items()}

  def _process(self, record: Record) -> dict | Problem:
    """Reads and checks one example; a Problem instead of raising."""
    try:
      image = open_png(record.image_path)
      mask, label = self._read_mask(record, image.size)
      example = {
          "image": image_payload(image),
          "mask": encode_mask(mask),
          "label": label,
          "image_id": record.image_id,
          "patient_id": record.patient_id,
          "_split": record.split,
      }
      if self.builder_config.dedupe:
        example["_hash"] = perceptual_hash(image)
      return example
    except FileProblem as e:
      return Problem(e.path, e.problem)

  def _read_mask(
      self, record: Record, size: tuple[int, int]
  ) -> tuple[np.ndarray, int]:
    """OR-merges the record's masks (any nonzero pixel is lesion).

    Args:
      record: the example.
      size: (width, height) of its image.

    Returns:
      (bool mask [H, W], label).

    Raises:
      FileProblem: missing lesion mask, size mismatch, empty lesion mask,
        non-empty normal mask, unreadable mask.
    """
    width, height = size
    label = record.label
    merged = np.zeros((height, width), bool)
    if not record.mask_paths:
      if label == NORMAL:
        return merged, label
      raise FileProblem(
          record.image_path,
          f"{CLASS_NAMES[label]} image without a mask file "
          f"({self._mask_hint(record)})",
      )
    for path in record.mask_paths:
      mask = open_png(path)
      check_same_size(path, mask.size, size)
      merged |= binary_mask(mask)
    if label == NORMAL and merged.any():
      raise FileProblem(
          record.mask_paths[0],
          f"mask of a normal image has {int(merged.sum())} nonzero pixels; "
          "normal images must have empty masks",
      )
    if label != NORMAL and not merged.any():
      raise FileProblem(
          record.mask_paths[0],
          f"mask of a {CLASS_NAMES[label]} image is empty (all zero)",
      )
    return merged, label

  def _mask_hint(self, record: Record) -> str:
    return "expected a mask file next to it"

  def _post_download_and_prepare_hook(self) -> None:
    # Runs once the prepared directory has its final name.
    for filename, report in getattr(self, "_reports", {}).items():
      path = pathlib.Path(self.data_dir) / filename
      path.write_text(json.dumps(report, indent=1) + "\n")
    report = getattr(self, "_reports", {}).get(BAD_INPUTS_REPORT)
    if report and report["num_skipped"]:
      _warn_skipped(self.name, report, pathlib.Path(self.data_dir))


def check_same_size(
    mask_path: os.PathLike | str,
    mask_size: tuple[int, int],
    image_size: tuple[int, int],
) -> None:
  """Raises FileProblem when a mask and its image differ in size."""
  if tuple(mask_size) != tuple(image_size):
    raise FileProblem(
        mask_path,
        f"mask is {mask_size[0]}x{mask_size[1]} px but its image is "
        f"{image_size[0]}x{image_size[1]} px (width x height); they must match",
    )


def _warn_skipped(name: str, report: Mapping, data_dir: pathlib.Path) -> None:
  logger.warning(
      "%s: %d bad input file(s) were skipped (%d examples kept); the list is"
      " in %s",
      name,
      report["num_skipped"],
      report["num_examples"],
      data_dir / BAD_INPUTS_REPORT,
  )


def _num_workers() -> int:
  # PIL decodes and encodes without the GIL, so threads use every core.
  return max(2, min(8, os.cpu_count() or 2))


# ---------------------------------------------------------------------------
# Registry and loading.
# ---------------------------------------------------------------------------

_BUILDER_CLASSES: dict[str, type] = {}


def builder_class(name: str) -> type[ImageMaskBuilder]:
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
      and issubclass(value, ImageMaskBuilder)
      and value.__module__ == module_name
  ]
  if len(classes) != 1:
    raise TypeError(f"{path} must define exactly one builder class.")
  _BUILDER_CLASSES[name] = classes[0]
  return classes[0]


def make_builder(
    name: str, *, data_dir: os.PathLike | str, **options
) -> ImageMaskBuilder:
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
    if isinstance(builder, ManualBuilder):
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
    report_path = pathlib.Path(builder.data_dir) / BAD_INPUTS_REPORT
    if report_path.exists():
      report = json.loads(report_path.read_text())
      if report.get("num_skipped"):
        _warn_skipped(name, report, pathlib.Path(builder.data_dir))
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

  def __init__(self, builder: ImageMaskBuilder, split: str):
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
# Few-shot episodes.
# ---------------------------------------------------------------------------

SETTINGS = {
    # setting -> classes that give support shots
    "per_class": (NORMAL, BENIGN, MALIGNANT),
    "normal_only": (NORMAL,),
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
  bad = sorted(set(np.unique(labels).tolist()) - set(range(len(CLASS_NAMES))))
  if bad:
    raise ValueError(f"labels must be in 0..2 {CLASS_NAMES}, found {bad}.")
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
      raise ValueError(
          f"Setting {setting!r} needs {shots} {CLASS_NAMES[cls]} image(s) per"
          f" episode but the split has only {len(pool)} {CLASS_NAMES[cls]} "
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
  # Run through the package module so that builders and this entry point
  # share one copy of the classes above.
  from ultraad_jax import data as _data  # pylint: disable=g-import-not-at-top

  _data.main()
