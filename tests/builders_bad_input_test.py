"""Bad input files, builder by builder: a clear error, or a listed skip.

For each manual builder (busi, bus_uclm, bus_bra) a tiny layout of 8x8 PNGs
is written under tmp_path, one case damages it, and two tests check the two
behaviours of `data.load`:
- by default, a BadInputError whose message names every bad file with its
  problem and says how to fix it (and nothing is prepared);
- with skip_bad=True, the dataset loads without the affected examples and
  without losing any other, bad_inputs.json lists exactly the bad files with
  their problems, and a warning says that files were skipped.

The checks live in ultraad_jax/builder_base.py and are shared, but each
builder describes its own layout (`_scan`, `_read_mask`), so every case runs
against every builder it applies to. Files that are not inputs (a JPEG, a
.DS_Store, a sub-folder) are a third behaviour: never fatal, always logged
and listed under "ignored" in bad_inputs.json.
"""

import collections
import dataclasses
import json
import logging
import pathlib
import shutil
import struct
from typing import Callable

import numpy as np
from PIL import Image
import pytest

from ultraad_jax import builder_base
from ultraad_jax import data

SIZE = 8
GREEN, RED, BLUE = (0, 255, 0), (255, 0, 0), (0, 0, 255)
# The text every BadInputError ends with: how to fix, or how to skip.
FIX_HINT = "Fix or remove these files, or pass skip_bad=True to skip them"

# ---------------------------------------------------------------------------
# Tiny files.
# ---------------------------------------------------------------------------


def _write_png(path: pathlib.Path, array) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _texture(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)


def _grey_mask(lesion: bool, shape=(SIZE, SIZE)) -> np.ndarray:
  """0/255 mask; the lesion is a small box near the top-left corner."""
  mask = np.zeros(shape, np.uint8)
  if lesion:
    mask[1:4, 1:4] = 255
  return mask


def _colour_mask(colour, shape=(SIZE, SIZE)) -> np.ndarray:
  """BUS-UCLM mask: black, with a box of `colour` unless it is None."""
  mask = np.zeros(shape + (3,), np.uint8)
  if colour is not None:
    mask[1:4, 1:4] = colour
  return mask


def _idat(raw: bytes) -> tuple[int, int]:
  """(offset, length) of the data of the first IDAT chunk of a PNG."""
  pos = 8  # After the signature: chunks of length, type, data, CRC.
  while pos < len(raw):
    (length,) = struct.unpack(">I", raw[pos : pos + 4])
    if raw[pos + 4 : pos + 8] == b"IDAT":
      return pos + 8, length
    pos += 12 + length
  raise AssertionError("fixture PNG without an IDAT chunk")


def _corrupt(path: pathlib.Path) -> None:
  # One flipped byte inside the pixel data: the chunk checksum no longer
  # matches, as after a bad copy.
  raw = bytearray(path.read_bytes())
  start, length = _idat(bytes(raw))
  raw[start + length // 2] ^= 0xFF
  path.write_bytes(bytes(raw))


def _truncate(path: pathlib.Path) -> None:
  # Cut inside the pixel data, as an interrupted download or unzip leaves it.
  raw = path.read_bytes()
  start, length = _idat(raw)
  path.write_bytes(raw[: start + length // 2])


def _empty(path: pathlib.Path) -> None:
  path.write_bytes(b"")


def _text(path: pathlib.Path) -> None:
  path.write_text("not a picture, only a .png name\n")


# ---------------------------------------------------------------------------
# The three layouts.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """A builder's folder layout, written small.

  Attributes:
    name: dataset name for `data.load`.
    folder: the dataset folder (the builder's ROOT_NAME).
    image_ids: every example the layout holds.
    lesion_id: the example the cases damage: a lesion image (in a split that
      keeps other examples, so that skipping never empties a split).
    write: writes the layout into a dataset folder.
    image: (dataset folder, image id) -> image file.
    mask: (dataset folder, image id) -> mask file.
    lesion_mask: shape -> a valid mask array for `lesion_id`.
  """

  name: str
  folder: str
  image_ids: tuple[str, ...]
  lesion_id: str
  write: Callable[[pathlib.Path], None]
  image: Callable[[pathlib.Path, str], pathlib.Path]
  mask: Callable[[pathlib.Path, str], pathlib.Path]
  lesion_mask: Callable[[tuple[int, int]], np.ndarray]


# BUSI: <class>/<class> (k).png with <class> (k)_mask.png beside it.
_BUSI_IDS = (
    "normal (1)",
    "normal (2)",
    "benign (1)",
    "benign (2)",
    "malignant (1)",
    "malignant (2)",
)


def _busi_image(root, image_id):
  return root / image_id.split(" (")[0] / f"{image_id}.png"


def _busi_mask(root, image_id):
  return root / image_id.split(" (")[0] / f"{image_id}_mask.png"


def _write_busi(root):
  for seed, image_id in enumerate(_BUSI_IDS):
    _write_png(_busi_image(root, image_id), _texture(seed))
    lesion = not image_id.startswith("normal")
    _write_png(_busi_mask(root, image_id), _grey_mask(lesion))


# BUS-UCLM: images/<NAME>.png and masks/<NAME>.png; the mask colour is the
# label, the first 4 characters the patient; COPE is a test patient.
_UCLM_COLOURS = {
    "ALPH_001": GREEN,
    "ALPH_002": None,
    "BETA_001": RED,
    "COPE_001": GREEN,
    "COPE_002": None,
}


def _uclm_image(root, image_id):
  return root / "images" / f"{image_id}.png"


def _uclm_mask(root, image_id):
  return root / "masks" / f"{image_id}.png"


def _write_uclm(root):
  for seed, (image_id, colour) in enumerate(_UCLM_COLOURS.items()):
    _write_png(_uclm_image(root, image_id), _texture(seed))
    _write_png(_uclm_mask(root, image_id), _colour_mask(colour))


# BUS-BRA: Images/bus_XXXX-Y.png, Masks/mask_XXXX-Y.png, bus_data.csv.
_BRA_PATHOLOGY = {
    "bus_0001-l": "benign",
    "bus_0001-r": "malignant",
    "bus_0002-s": "benign",
}


def _bra_image(root, image_id):
  return root / "Images" / f"{image_id}.png"


def _bra_mask(root, image_id):
  return root / "Masks" / f"mask_{image_id.removeprefix('bus_')}.png"


def _bra_csv(root):
  return root / "bus_data.csv"


def _write_bra(root):
  lines = ["ID,Pathology,BIRADS"]
  for seed, (image_id, pathology) in enumerate(_BRA_PATHOLOGY.items()):
    _write_png(_bra_image(root, image_id), _texture(seed))
    _write_png(_bra_mask(root, image_id), _grey_mask(True))
    lines.append(f"{image_id},{pathology},4")
  _bra_csv(root).write_text("\n".join(lines) + "\n")


LAYOUTS = {
    "busi": Layout(
        name="busi",
        folder="Dataset_BUSI_with_GT",
        image_ids=_BUSI_IDS,
        lesion_id="benign (1)",
        write=_write_busi,
        image=_busi_image,
        mask=_busi_mask,
        lesion_mask=lambda shape: _grey_mask(True, shape),
    ),
    "bus_uclm": Layout(
        name="bus_uclm",
        folder="BUS-UCLM",
        image_ids=tuple(_UCLM_COLOURS),
        lesion_id="ALPH_001",  # A train patient; COPE keeps "test" filled.
        write=_write_uclm,
        image=_uclm_image,
        mask=_uclm_mask,
        lesion_mask=lambda shape: _colour_mask(GREEN, shape),
    ),
    "bus_bra": Layout(
        name="bus_bra",
        folder="BUSBRA",
        image_ids=tuple(_BRA_PATHOLOGY),
        lesion_id="bus_0001-l",
        write=_write_bra,
        image=_bra_image,
        mask=_bra_mask,
        lesion_mask=lambda shape: _grey_mask(True, shape),
    ),
}
BUILDERS = tuple(LAYOUTS)

# ---------------------------------------------------------------------------
# Cases: each damages a written layout and says what must be reported.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Expected:
  """What a damaged layout must produce.

  Attributes:
    bad: (file, words its problem must contain), one entry per problem the
      builder reports (a file may appear twice when it is one problem twice).
    dropped: image ids that must be missing with skip_bad=True; every other
      id of the layout must be kept.
  """

  bad: list[tuple[pathlib.Path, tuple[str, ...]]]
  dropped: set[str]


def _damaged_image(damage, words):
  def case(layout, root):
    path = layout.image(root, layout.lesion_id)
    damage(path)
    return Expected([(path, words)], {layout.lesion_id})

  return case


def _damaged_mask(damage, words):
  def case(layout, root):
    path = layout.mask(root, layout.lesion_id)
    damage(path)
    return Expected([(path, words)], {layout.lesion_id})

  return case


def _mask_missing(layout, root):
  mask = layout.mask(root, layout.lesion_id)
  mask.unlink()
  # Named: the image; the fix: the mask file the builder looked for.
  words = ("without a mask file", f"expected {mask}")
  return Expected(
      [(layout.image(root, layout.lesion_id), words)], {layout.lesion_id}
  )


def _mask_size(layout, root):
  mask = layout.mask(root, layout.lesion_id)
  _write_png(mask, layout.lesion_mask((5, 6)))
  words = (f"mask is 6x5 px but its image is {SIZE}x{SIZE} px", "must match")
  return Expected([(mask, words)], {layout.lesion_id})


def _lesion_mask_empty(layout, root):
  mask = layout.mask(root, layout.lesion_id)
  _write_png(mask, _grey_mask(False))
  return Expected(
      [(mask, ("mask of a benign image is empty (all zero)",))],
      {layout.lesion_id},
  )


def _normal_mask_not_empty(layout, root):
  del layout
  mask = _busi_mask(root, "normal (1)")
  _write_png(mask, _grey_mask(True))
  words = (
      "mask of a normal image has 9 nonzero pixels",
      "normal images must have empty masks",
  )
  return Expected([(mask, words)], {"normal (1)"})


def _mask_colour(colour_mask, words):
  def case(layout, root):
    mask = layout.mask(root, layout.lesion_id)
    _write_png(mask, colour_mask)
    return Expected([(mask, words)], {layout.lesion_id})

  return case


_UCLM_COLOUR_FIX = (
    "expected black (0,0,0) background, green (0,255,0) benign or red "
    "(255,0,0) malignant"
)


def _busi_id_in_two_classes(layout, root):
  # The same stem under benign/ and malignant/: which label is right cannot
  # be known, so both copies go.
  del layout
  first = _busi_image(root, "benign (1)")
  second = root / "malignant" / first.name
  shutil.copy(first, second)
  shutil.copy(
      _busi_mask(root, "benign (1)"), second.with_name("benign (1)_mask.png")
  )
  words = ("duplicate image id 'benign (1)'", "must be unique")
  return Expected(
      [
          (first, words + (f"also {second}",)),
          (second, words + (f"also {first}",)),
      ],
      {"benign (1)"},
  )


def _bra_row_twice(layout, root):
  # The CSV lists one ID on two lines (header line 1, rows 2-4, the repeat on
  # line 5), with another pathology: both rows go, the repeat is named with
  # the CSV, both lines and the ID.
  with _bra_csv(root).open("a") as f:
    f.write(f"{layout.lesion_id},malignant,5\n")
  row = f"{_bra_csv(root)} (line 5, ID {layout.lesion_id})"
  words = (
      f"ID {layout.lesion_id!r} listed again (first on line 2)",
      "list each image once",
  )
  return Expected([(row, words)], {layout.lesion_id})


def _image_case_twin(layout, root):
  # X.png and X.PNG in one folder (a case-sensitive file system): both have
  # the image id X, so one of them cannot be kept silently.
  image = layout.image(root, layout.lesion_id)
  twin = image.with_suffix(".PNG")
  shutil.copy(image, twin)
  words = (f"duplicate image id {layout.lesion_id!r}",)
  return Expected([(image, words), (twin, words)], {layout.lesion_id})


def _uclm_mask_case_twin(layout, root):
  # masks/X.png (green, benign) and masks/X.PNG (red, malignant): the label
  # depends on which one is read.
  mask = layout.mask(root, layout.lesion_id)
  twin = mask.with_suffix(".PNG")
  _write_png(twin, _colour_mask(RED))
  words = (
      f"2 mask files for image id {layout.lesion_id!r}",
      "keep exactly one",
  )
  return Expected(
      [(mask, words + (f"also {twin}",)), (twin, words + (f"also {mask}",))],
      {layout.lesion_id},
  )


def _grey_picture_as_mask(layout, root):
  # An ultrasound frame saved under the mask's name: 0/255 is what BUSI's
  # masks hold (all 798 real mask files), dozens of grey levels are not a mask.
  mask = layout.mask(root, layout.lesion_id)
  _write_png(mask, _texture(99))
  words = (
      "unexpected mask values {",
      "distinct values)",
      "expected 0 background and 255 (or 1) lesion",
  )
  return Expected([(mask, words)], {layout.lesion_id})


# name -> (case, builders it applies to).
# Why some pairs are absent:
# - lesion_mask_empty: BUS-UCLM reads the label from the mask, so an all-black
#   mask is a valid normal example, not an empty lesion mask.
# - normal_mask_not_empty: only BUSI has normal images with a separate label;
#   BUS-BRA has no normal class, BUS-UCLM's label is the mask colour.
# - mask_colour_*: only BUS-UCLM defines mask colours; BUSI and BUS-BRA masks
#   are "nonzero is lesion" (see grey_picture_as_mask for that gap).
# - duplicates: BUSI can repeat a stem across class folders, BUS-BRA can list
#   an ID twice in its CSV; BUS-UCLM has one flat images/ folder, so only the
#   X.png / X.PNG twin (image_case_twin) can repeat an id there.
CASES = {
    "image_corrupt": (
        _damaged_image(_corrupt, ("corrupt or truncated image",)),
        BUILDERS,
    ),
    "image_truncated": (
        _damaged_image(_truncate, ("corrupt or truncated image",)),
        BUILDERS,
    ),
    "image_zero_bytes": (
        _damaged_image(_empty, ("file is empty (0 bytes)",)),
        BUILDERS,
    ),
    "image_not_png": (
        _damaged_image(_text, ("not an image file",)),
        BUILDERS,
    ),
    "mask_corrupt": (
        _damaged_mask(_corrupt, ("corrupt or truncated image",)),
        BUILDERS,
    ),
    "mask_truncated": (
        _damaged_mask(_truncate, ("corrupt or truncated image",)),
        BUILDERS,
    ),
    "mask_zero_bytes": (
        _damaged_mask(_empty, ("file is empty (0 bytes)",)),
        BUILDERS,
    ),
    "mask_not_png": (
        _damaged_mask(_text, ("not an image file",)),
        BUILDERS,
    ),
    "mask_missing": (_mask_missing, BUILDERS),
    "mask_size_mismatch": (_mask_size, BUILDERS),
    "lesion_mask_empty": (_lesion_mask_empty, ("busi", "bus_bra")),
    "normal_mask_not_empty": (_normal_mask_not_empty, ("busi",)),
    "mask_colour_blue": (
        _mask_colour(
            _colour_mask(BLUE),
            (
                "unexpected mask colours (9 px: (0, 0, 255) x9)",
                _UCLM_COLOUR_FIX,
            ),
        ),
        ("bus_uclm",),
    ),
    "mask_colour_white": (
        _mask_colour(
            _colour_mask((255, 255, 255)),
            ("unexpected mask colours", _UCLM_COLOUR_FIX),
        ),
        ("bus_uclm",),
    ),
    "mask_green_and_red": (
        _mask_colour(
            _colour_mask(GREEN) + _colour_mask(RED)[::-1],
            ("both green (benign, 9 px) and red", "expected one lesion class"),
        ),
        ("bus_uclm",),
    ),
    "duplicate_id_in_two_classes": (_busi_id_in_two_classes, ("busi",)),
    "duplicate_id_csv_row": (_bra_row_twice, ("bus_bra",)),
    "image_case_twin": (_image_case_twin, BUILDERS),
    "mask_case_twin": (_uclm_mask_case_twin, ("bus_uclm",)),
    "grey_picture_as_mask": (_grey_picture_as_mask, ("busi", "bus_bra")),
}


def _params():
  return [
      pytest.param(LAYOUTS[builder], case, id=f"{builder}-{case_name}")
      for case_name, (case, builders) in CASES.items()
      for builder in builders
  ]


def _damaged(tmp_path, layout, case):
  root = tmp_path / "manual" / layout.folder
  layout.write(root)
  return root, case(layout, root)


# ---------------------------------------------------------------------------
# The two behaviours.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout, case", _params())
def test_bad_input_raises_naming_file_and_fix(tmp_path, layout, case):
  root, expected = _damaged(tmp_path, layout, case)
  with pytest.raises(data.BadInputError) as info:
    data.load(layout.name, data_dir=tmp_path / "tfds", manual_dir=root)
  message = str(info.value)
  assert f"{layout.name}: {len(expected.bad)} bad input file(s)" in message
  lines = message.splitlines()
  for path, words in expected.bad:
    listed = [line for line in lines if line.startswith(f"  {path}: ")]
    assert listed, f"{path} not named in:\n{message}"
    for word in words:
      assert any(word in line for line in listed), (word, listed)
  assert FIX_HINT in message
  assert not data.make_builder(
      layout.name, data_dir=tmp_path / "tfds"
  ).is_prepared()


@pytest.mark.parametrize("layout, case", _params())
def test_bad_input_skipped_and_reported(tmp_path, caplog, layout, case):
  root, expected = _damaged(tmp_path, layout, case)
  with caplog.at_level(logging.WARNING):
    source = data.load(
        layout.name,
        data_dir=tmp_path / "tfds",
        manual_dir=root,
        skip_bad=True,
    )["all"]
  assert set(source.image_ids) == set(layout.image_ids) - expected.dropped
  assert len(source) == len(layout.image_ids) - len(expected.dropped)
  report_path = source.data_dir / data.BAD_INPUTS_REPORT
  report = json.loads(report_path.read_text())
  assert report["skip_bad"] is True
  assert report["num_examples"] == len(source)
  assert report["num_skipped"] == len(report["skipped"])
  # A damaged input is a skip, never an ignored entry.
  assert report["num_ignored"] == 0 and report["ignored"] == []
  listed = collections.Counter(entry["file"] for entry in report["skipped"])
  assert listed == collections.Counter(str(path) for path, _ in expected.bad)
  problems = collections.defaultdict(list)
  for entry in report["skipped"]:
    problems[entry["file"]].append(entry["problem"])
  for path, words in expected.bad:
    for word in words:
      assert any(word in p for p in problems[str(path)]), (word, problems)
  warnings = [r.getMessage() for r in caplog.records]
  assert any(
      "were skipped" in w and str(report_path) in w for w in warnings
  ), warnings


# ---------------------------------------------------------------------------
# Files that are not inputs, the repeated CSV row, two-level masks.
# ---------------------------------------------------------------------------


def _strays(layout, root):
  """Writes files that are not inputs beside the images (and the masks)."""
  folders = {layout.image(root, layout.lesion_id).parent}
  folders.add(layout.mask(root, layout.lesion_id).parent)
  strays = {}
  for folder in sorted(folders):
    jpeg = folder / "extra.jpg"
    Image.fromarray(_texture(7)).save(jpeg, format="JPEG")
    strays[jpeg] = "not a PNG file (suffix '.jpg')"
    (folder / "Thumbs.db").write_bytes(b"\0" * 16)
    strays[folder / "Thumbs.db"] = "not a PNG file (suffix '.db')"
    (folder / ".DS_Store").write_bytes(b"\0" * 16)
    strays[folder / ".DS_Store"] = "hidden file"
    (folder / "old").mkdir()
    strays[folder / "old"] = "a folder"
  return strays


@pytest.mark.parametrize("skip_bad", [False, True], ids=["default", "skip_bad"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=BUILDERS)
def test_files_that_are_not_inputs_are_listed_never_fatal(
    tmp_path, caplog, layout, skip_bad
):
  # A JPEG, Thumbs.db, .DS_Store and a sub-folder among the images and the
  # masks: not read, not a reason to stop, but named in a warning and in
  # bad_inputs.json.
  root = tmp_path / "manual" / layout.folder
  layout.write(root)
  strays = _strays(layout, root)
  with caplog.at_level(logging.WARNING):
    source = data.load(
        layout.name,
        data_dir=tmp_path / "tfds",
        manual_dir=root,
        skip_bad=skip_bad,
    )["all"]
  assert set(source.image_ids) == set(layout.image_ids)
  report = json.loads((source.data_dir / data.BAD_INPUTS_REPORT).read_text())
  assert report["num_skipped"] == 0 and report["skipped"] == []
  assert report["num_ignored"] == len(strays)
  reasons = {entry["file"]: entry["reason"] for entry in report["ignored"]}
  assert set(reasons) == {str(path) for path in strays}
  for path, words in strays.items():
    assert words in reasons[str(path)], (path, reasons[str(path)])
  warnings = [r.getMessage() for r in caplog.records]
  ignored = [w for w in warnings if "not inputs" in w]
  assert ignored, warnings
  for path in strays:
    assert any(str(path) in w for w in ignored), (path, ignored)
  assert not any("were skipped" in w for w in warnings), warnings


def test_bus_bra_listed_image_in_another_format_says_convert(tmp_path):
  layout = LAYOUTS["bus_bra"]
  root = tmp_path / "manual" / layout.folder
  layout.write(root)
  image = layout.image(root, layout.lesion_id)
  jpeg = image.with_suffix(".jpg")
  Image.open(image).save(jpeg, format="JPEG")
  image.unlink()
  with pytest.raises(data.BadInputError) as info:
    data.load(layout.name, data_dir=tmp_path / "tfds", manual_dir=root)
  assert f"  {image}: listed in {_bra_csv(root)} (line 2)" in str(info.value)
  assert f"(found {jpeg}; convert it to PNG)" in str(info.value)


def test_bus_bra_repeated_csv_row_names_the_csv(tmp_path):
  layout = LAYOUTS["bus_bra"]
  root = tmp_path / "manual" / layout.folder
  layout.write(root)
  _bra_row_twice(layout, root)
  with pytest.raises(data.BadInputError) as info:
    data.load(layout.name, data_dir=tmp_path / "tfds", manual_dir=root)
  message = str(info.value)
  assert str(_bra_csv(root)) in message
  assert "line 5" in message and "first on line 2" in message
  assert "(also )" not in message


@pytest.mark.parametrize(
    "values, ok",
    [
        ((0,), True),
        ((0, 255), True),
        ((0, 1), True),
        ((0, 128), True),
        ((0, 1, 255), True),
        ((0, 1, 2), False),
        ((0, 128, 255), False),
        (tuple(range(0, 256, 16)), False),
    ],
)
def test_mask_values_must_be_two_level(tmp_path, values, ok):
  array = np.resize(np.array(values, np.uint8), (SIZE, SIZE))
  mask = Image.fromarray(array)
  if ok:
    builder_base.check_mask_levels(tmp_path / "m.png", mask)
    return
  with pytest.raises(builder_base.FileProblem) as info:
    builder_base.check_mask_levels(tmp_path / "m.png", mask)
  listed = ", ".join(str(v) for v in values[:8])
  assert f"unexpected mask values {{{listed}" in str(info.value)
  assert str(tmp_path / "m.png") in str(info.value)


def test_coloured_and_one_bit_masks_are_two_level(tmp_path):
  red = np.zeros((SIZE, SIZE, 3), np.uint8)
  red[2:5, 2:5] = (255, 0, 0)
  builder_base.check_mask_levels(tmp_path / "m.png", Image.fromarray(red))
  bits = Image.fromarray(_texture(3) > 100)
  builder_base.check_mask_levels(tmp_path / "m.png", bits)
