"""The base of every dataset builder: schema, file checks, dedupe, classes.

Each dataset under `datasets/<name>/<name>.py` is a TFDS builder that
subclasses one of the two classes here:
- `ImageMaskBuilder`: the shared schema (see `features`), stored splits and
  the config interface that `ultraad_jax.data.load` calls;
- `ManualBuilder`: datasets built from manually downloaded image and mask
  files. Subclasses only describe the folder layout (`_scan`); reading and
  checking every file, collecting bad inputs (`skip_bad`), listing the files
  that are not inputs (ignored, never fatal), near-duplicate removal
  (`dedupe`) and the reports written next to the prepared data are done here.

The helpers (`open_png`, `to_8bit`, `binary_mask`, `perceptual_hash`, ...) are
public so that builders with unusual layouts can reuse them. Builders are
loaded by file path through `ultraad_jax.data.builder_class`, never imported
as `datasets.<name>`.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError
import scipy.fft
import tensorflow_datasets as tfds

logger = logging.getLogger(__name__)

# The label vocabulary of every dataset, in ClassLabel order.
CLASS_NAMES = ("normal", "benign", "malignant")
NORMAL, BENIGN, MALIGNANT = 0, 1, 2
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
# Ignored files named in the preparation warning (the report lists all).
_MAX_IGNORED_LOGGED = 10
# Mask pixel values read as "0 background, 1 lesion" or "0 / 255" or a mix
# of both (some tools write 1, others 255); any other set must have a single
# nonzero level.
_MASK_LEVELS = frozenset({0, 1, 255})
# Distinct values quoted when a mask has too many.
_MAX_LEVELS_LISTED = 8


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


def check_mask_levels(path: os.PathLike | str, image: Image.Image) -> None:
  """Raises FileProblem unless a mask holds 0 and at most one lesion value.

  A mask is a two-level picture: 0 background and one lesion value (255 or
  1; values 0, 1 and 255 together are also accepted). A grey-level picture
  saved under a mask's name would otherwise pass as a huge lesion, since
  `binary_mask` counts every nonzero pixel. The values are those of the
  8-bit image (`to_8bit`: alpha composited over black) over all its
  channels, so a coloured lesion such as (255, 0, 0) is two-level too.
  All 798 mask files of the real BUSI hold 0/255 (or are 1-bit).

  Args:
    path: the mask file, for the message.
    image: the decoded mask.

  Raises:
    FileProblem: naming the values found and the values expected.
  """
  if image.mode == "1":
    return
  array = np.asarray(to_8bit(image))
  # bincount is linear in the pixel count (np.unique sorts).
  levels = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
  nonzero = levels[levels > 0]
  if nonzero.size <= 1 or set(levels.tolist()) <= _MASK_LEVELS:
    return
  listed = ", ".join(str(int(v)) for v in levels[:_MAX_LEVELS_LISTED])
  if levels.size > _MAX_LEVELS_LISTED:
    listed += f", ... ({levels.size} distinct values)"
  raise FileProblem(
      path,
      f"unexpected mask values {{{listed}}}; expected 0 background and 255 "
      "(or 1) lesion (a mask holds two values; is this a picture saved "
      "under the mask's name?)",
  )


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


@dataclasses.dataclass(frozen=True)
class Ignored:
  """An entry of a dataset folder that is not an input: listed, never read.

  Ignored entries (a stray .DS_Store, Thumbs.db, a JPEG copy, a sub-folder)
  never make preparation fail, with or without skip_bad; they are logged
  and listed under "ignored" in bad_inputs.json.
  """

  file: str
  reason: str


def list_pngs(
    folder: os.PathLike | str,
) -> tuple[list[pathlib.Path], list[Ignored]]:
  """The PNG files of a folder, and every other entry of it as ignored.

  The suffix is matched case-insensitively (X.png and X.PNG are both
  returned: the builder decides what two files with one stem mean).

  Args:
    folder: a dataset folder.

  Returns:
    (PNG files sorted by name, the other entries: hidden files such as
    .DS_Store or AppleDouble "._X.png", files of other formats, sub-folders).
  """
  pngs, ignored = [], []
  for path in sorted(pathlib.Path(folder).iterdir()):
    if path.is_dir():
      ignored.append(Ignored(str(path), "a folder; sub-folders are not read"))
    elif path.name.startswith("."):
      ignored.append(
          Ignored(str(path), "hidden file (name starts with '.'); not read")
      )
    elif path.suffix.lower() != ".png":
      ignored.append(
          Ignored(
              str(path),
              f"not a PNG file (suffix {path.suffix!r}); only .png files are "
              "read (convert it to PNG if it is an input)",
          )
      )
    else:
      pngs.append(path)
  return pngs, ignored


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
    """The builder config for user options (see `ultraad_jax.data.load`)."""

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
  def _scan(
      self, root: pathlib.Path
  ) -> tuple[list[Record], list[Problem], list[Ignored]]:
    """Lists the examples under root.

    Args:
      root: the dataset folder (`find_root`).

    Returns:
      (records, layout problems (skippable bad inputs), entries of the
      dataset folders that are not inputs (see `list_pngs`)).
    """

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
    records, problems, ignored = self._scan(root)
    problems = list(problems)
    if ignored:
      self._warn_ignored(ignored)

    by_id = collections.defaultdict(list)
    for record in records:
      by_id[record.image_id].append(record)
    duplicated = set()
    for image_id, group in by_id.items():
      if len(group) > 1:
        duplicated.add(image_id)
        files = [str(r.image_path) for r in group]
        for index, record in enumerate(group):
          others = ", ".join(f for k, f in enumerate(files) if k != index)
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
        "num_ignored": len(ignored),
        "ignored": [dataclasses.asdict(i) for i in ignored],
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

  def _warn_ignored(self, ignored: Sequence[Ignored]) -> None:
    """Logs the entries that are not inputs (they never fail preparation)."""
    listed = "; ".join(
        f"{i.file} ({i.reason})" for i in ignored[:_MAX_IGNORED_LOGGED]
    )
    if len(ignored) > _MAX_IGNORED_LOGGED:
      listed += f"; ... and {len(ignored) - _MAX_IGNORED_LOGGED} more"
    logger.warning(
        "%s: ignored %d file(s) or folder(s) in the dataset folders that are"
        ' not inputs: %s. They are listed under "ignored" in %s next to'
        " the prepared data; remove them to silence this warning.",
        self.name,
        len(ignored),
        listed,
        BAD_INPUTS_REPORT,
    )

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
    """OR-merges the record's masks (two-level masks, nonzero is lesion).

    Args:
      record: the example.
      size: (width, height) of its image.

    Returns:
      (bool mask [H, W], label).

    Raises:
      FileProblem: missing lesion mask, size mismatch, mask values other
        than 0 and one lesion value (`check_mask_levels`), empty lesion mask,
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
      check_mask_levels(path, mask)
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
      warn_skipped(self.name, report, pathlib.Path(self.data_dir))


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


def warn_skipped(name: str, report: Mapping, data_dir: pathlib.Path) -> None:
  """Logs that a prepared dataset lacks the bad input files it skipped.

  Args:
    name: dataset name.
    report: the content of BAD_INPUTS_REPORT.
    data_dir: the prepared directory that holds the report.
  """
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
