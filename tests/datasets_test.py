"""Tests of the TFDS builders under datasets/ on tiny fixtures and real BUSI.

Each fixture writes a few tiny PNGs in a dataset's original layout under
tmp_path; bad-input cases then damage one file and check both behaviours:
a BadInputError naming the file and problem, or (skip_bad=True) a skip that
is counted, listed in bad_inputs.json and logged.
"""

import io
import json
import logging
import os
import pathlib
import shutil

import numpy as np
from PIL import Image
import pytest

from ultraad_jax import data

REAL_BUSI = pathlib.Path(
    os.environ.get(
        "ULTRAAD_BUSI_DIR",
        pathlib.Path(__file__).resolve().parents[2]
        / "shared"
        / "data"
        / "Dataset_BUSI_with_GT",
    )
)


def _png(path: pathlib.Path, array, mode=None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def _texture(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _box(height, width, top, left, bottom, right, value=255) -> np.ndarray:
  mask = np.zeros((height, width), np.uint8)
  mask[top:bottom, left:right] = value
  return mask


# ---------------------------------------------------------------------------
# BUSI fixture.
# ---------------------------------------------------------------------------


def make_busi(root: pathlib.Path) -> pathlib.Path:
  """Writes a 6-image BUSI layout; returns the Dataset_BUSI_with_GT folder."""
  busi = root / "Dataset_BUSI_with_GT"
  # benign (1): RGB image, two masks (L and mode "1") to OR-merge.
  _png(busi / "benign" / "benign (1).png", _texture(1, (16, 20, 3)))
  _png(busi / "benign" / "benign (1)_mask.png", _box(16, 20, 2, 2, 6, 6))
  Image.fromarray(_box(16, 20, 10, 12, 14, 18) > 0).save(
      busi / "benign" / "benign (1)_mask_1.png"
  )
  # benign (2): greyscale image, RGBA mask (opaque white box).
  _png(busi / "benign" / "benign (2).png", _texture(2, (12, 10)))
  rgba = np.zeros((12, 10, 4), np.uint8)
  rgba[..., 3] = 255
  rgba[3:7, 2:5, :3] = 255
  _png(busi / "benign" / "benign (2)_mask.png", rgba, "RGBA")
  # malignant (1): RGBA image (opaque), RGB mask.
  image = np.concatenate(
      [_texture(3, (14, 14, 3)), np.full((14, 14, 1), 255, np.uint8)], -1
  )
  _png(busi / "malignant" / "malignant (1).png", image, "RGBA")
  _png(
      busi / "malignant" / "malignant (1)_mask.png",
      np.repeat(_box(14, 14, 4, 4, 9, 10)[..., None], 3, -1),
  )
  # malignant (10): natural order puts it after malignant (2).
  _png(busi / "malignant" / "malignant (2).png", _texture(4, (10, 12)))
  _png(busi / "malignant" / "malignant (2)_mask.png", _box(10, 12, 1, 1, 5, 5))
  # normal (1): empty RGB mask; normal (2): no mask file at all.
  _png(busi / "normal" / "normal (1).png", _texture(5, (10, 10)))
  _png(busi / "normal" / "normal (1)_mask.png", np.zeros((10, 10, 3)))
  _png(busi / "normal" / "normal (2).png", _texture(6, (8, 12)))
  return busi


def test_busi_builder_reads_every_format(tmp_path):
  busi = make_busi(tmp_path / "manual")
  source = data.load("busi", data_dir=tmp_path / "tfds", manual_dir=busi)["all"]
  assert len(source) == 6
  assert source.image_ids == [
      "normal (1)",
      "normal (2)",
      "benign (1)",
      "benign (2)",
      "malignant (1)",
      "malignant (2)",
  ]
  np.testing.assert_array_equal(source.labels, [0, 0, 1, 1, 2, 2])
  assert source.patient_ids == [""] * 6
  by_id = {e["image_id"]: e for e in source}
  for example in by_id.values():
    assert example["image"].dtype == np.uint8
    assert example["image"].ndim == 3 and example["image"].shape[-1] == 3
    assert example["mask"].shape == example["image"].shape[:2] + (1,)
    assert set(np.unique(example["mask"])) <= {0, 1}
  # RGB image unchanged; greyscale -> 3 equal channels; RGBA -> its RGB.
  np.testing.assert_array_equal(
      by_id["benign (1)"]["image"], _texture(1, (16, 20, 3))
  )
  grey = by_id["benign (2)"]["image"]
  np.testing.assert_array_equal(grey[..., 0], _texture(2, (12, 10)))
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  np.testing.assert_array_equal(
      by_id["malignant (1)"]["image"], _texture(3, (14, 14, 3))
  )
  # Multi-mask image: the OR of both masks.
  union = (_box(16, 20, 2, 2, 6, 6) > 0) | (_box(16, 20, 10, 12, 14, 18) > 0)
  np.testing.assert_array_equal(by_id["benign (1)"]["mask"][..., 0], union)
  np.testing.assert_array_equal(
      by_id["benign (2)"]["mask"][..., 0], _box(12, 10, 3, 2, 7, 5) > 0
  )
  np.testing.assert_array_equal(
      by_id["malignant (1)"]["mask"][..., 0], _box(14, 14, 4, 4, 9, 10) > 0
  )
  assert not by_id["normal (1)"]["mask"].any()
  assert not by_id["normal (2)"]["mask"].any()
  report = json.loads((source.data_dir / data.BAD_INPUTS_REPORT).read_text())
  assert report["num_skipped"] == 0 and report["num_examples"] == 6


def test_busi_accepts_parent_folder_and_reuses_prepared_data(tmp_path):
  make_busi(tmp_path / "manual")
  first = data.load(
      "busi", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual"
  )
  assert len(first["all"]) == 6
  # Second load: no manual folder needed, same data.
  shutil.rmtree(tmp_path / "manual")
  second = data.load("busi", data_dir=tmp_path / "tfds")
  assert second["all"].image_ids == first["all"].image_ids


def test_options_get_distinct_directories(tmp_path):
  busi = make_busi(tmp_path / "manual")
  plain = data.load("busi", data_dir=tmp_path / "tfds", manual_dir=busi)
  skip = data.load(
      "busi", data_dir=tmp_path / "tfds", manual_dir=busi, skip_bad=True
  )
  dedupe = data.load(
      "busi", data_dir=tmp_path / "tfds", manual_dir=busi, dedupe=True
  )
  dirs = {s["all"].data_dir for s in (plain, skip, dedupe)}
  assert len(dirs) == 3
  assert [s["all"].config for s in (plain, skip, dedupe)] == [
      "default",
      "skip_bad",
      f"dedupe{data.DEDUPE_THRESHOLD}",
  ]
  # A preset name gives the same config as the equivalent options.
  by_name = data.make_builder(
      "busi", data_dir=tmp_path / "tfds", builder_config="dedupe8-skip_bad"
  )
  by_options = data.make_builder(
      "busi", data_dir=tmp_path / "tfds", skip_bad=True, dedupe=True
  )
  assert by_name.builder_config is by_options.builder_config
  custom = data.make_builder(
      "busi", data_dir=tmp_path / "tfds", dedupe=True, dedupe_threshold=4
  )
  assert custom.builder_config.name == "dedupe4"


def test_missing_manual_folder_message(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as info:
    data.load("busi", data_dir=tmp_path / "tfds", manual_dir=missing)
  message = str(info.value)
  assert str(missing) in message
  assert "Dataset_BUSI_with_GT/benign/benign (1).png" in message
  assert "https://" in message
  # Default manual folder, not given and absent.
  with pytest.raises(FileNotFoundError, match="downloads/manual"):
    data.load("busi", data_dir=tmp_path / "tfds")


def test_incomplete_layout_names_missing_folder(tmp_path):
  busi = make_busi(tmp_path / "manual")
  shutil.rmtree(busi / "malignant")
  with pytest.raises(FileNotFoundError) as info:
    data.load("busi", data_dir=tmp_path / "tfds", manual_dir=busi)
  assert str(busi / "malignant") in str(info.value)


def _corrupt(path):
  raw = bytearray(path.read_bytes())
  for k in range(len(raw) // 2, len(raw) // 2 + 8):
    raw[k] ^= 0xFF
  path.write_bytes(bytes(raw))


def _truncate(path):
  path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


# (case id, damage(busi folder) -> damaged file, words in the problem,
#  examples left when skipping)
BUSI_BAD_CASES = [
    (
        "corrupt",
        lambda b: (_corrupt(p := b / "benign" / "benign (1).png"), p)[1],
        "corrupt",
        5,
    ),
    (
        "truncated",
        lambda b: (_truncate(p := b / "benign" / "benign (1).png"), p)[1],
        "truncated",
        5,
    ),
    (
        "zero_bytes",
        lambda b: (
            (p := b / "malignant" / "malignant (2).png").write_bytes(b""),
            p,
        )[1],
        "empty",
        5,
    ),
    (
        "not_an_image",
        lambda b: (
            (p := b / "normal" / "normal (1).png").write_text("hello"),
            p,
        )[1],
        "not an image",
        5,
    ),
    (
        "lesion_without_mask",
        lambda b: (
            (b / "malignant" / "malignant (1)_mask.png").unlink(),
            b / "malignant" / "malignant (1).png",
        )[1],
        "without a mask",
        5,
    ),
    (
        "size_mismatch",
        lambda b: (
            _png(p := b / "benign" / "benign (2)_mask.png", np.ones((5, 5))),
            p,
        )[1],
        "mask is 5x5 px but its image is 10x12",
        5,
    ),
    (
        "corrupt_mask",
        lambda b: (_truncate(p := b / "benign" / "benign (1)_mask_1.png"), p)[
            1
        ],
        "truncated",
        5,
    ),
    (
        "duplicate_id",
        lambda b: (
            shutil.copy(
                b / "benign" / "benign (2).png",
                b / "malignant" / "benign (2).png",
            ),
            shutil.copy(
                b / "benign" / "benign (2)_mask.png",
                b / "malignant" / "benign (2)_mask.png",
            ),
            b / "malignant" / "benign (2).png",
        )[2],
        "duplicate image id 'benign (2)'",
        5,  # Both copies are dropped.
    ),
    (
        "orphan_mask",
        lambda b: (
            _png(p := b / "benign" / "benign (9)_mask.png", np.ones((4, 4))),
            p,
        )[1],
        "mask without an image",
        6,
    ),
    (
        "non_empty_normal_mask",
        lambda b: (
            _png(
                p := b / "normal" / "normal (1)_mask.png",
                _box(10, 10, 1, 1, 3, 3),
            ),
            p,
        )[1],
        "normal image",
        5,
    ),
]


@pytest.mark.parametrize(
    "case, damage, words, kept",
    BUSI_BAD_CASES,
    ids=[c[0] for c in BUSI_BAD_CASES],
)
def test_busi_bad_input_raises(tmp_path, case, damage, words, kept):
  del case, kept
  busi = make_busi(tmp_path / "manual")
  bad_file = damage(busi)
  with pytest.raises(data.BadInputError) as info:
    data.load("busi", data_dir=tmp_path / "tfds", manual_dir=busi)
  message = str(info.value)
  assert str(bad_file) in message
  assert words in message
  assert "skip_bad=True" in message


@pytest.mark.parametrize(
    "case, damage, words, kept",
    BUSI_BAD_CASES,
    ids=[c[0] for c in BUSI_BAD_CASES],
)
def test_busi_bad_input_skipped_and_reported(
    tmp_path, caplog, case, damage, words, kept
):
  del case
  busi = make_busi(tmp_path / "manual")
  bad_file = damage(busi)
  with caplog.at_level(logging.WARNING):
    source = data.load(
        "busi", data_dir=tmp_path / "tfds", manual_dir=busi, skip_bad=True
    )["all"]
  assert len(source) == kept
  report = json.loads((source.data_dir / data.BAD_INPUTS_REPORT).read_text())
  assert report["num_skipped"] >= 1
  assert report["num_examples"] == kept
  listed = {entry["file"]: entry["problem"] for entry in report["skipped"]}
  assert str(bad_file) in listed
  assert words in listed[str(bad_file)]
  assert any("skipped" in r.getMessage() for r in caplog.records)
  # Loading again warns again: skipped files are never silent.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    data.load("busi", data_dir=tmp_path / "tfds", skip_bad=True)
  assert any("skipped" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# BUS-UCLM fixture.
# ---------------------------------------------------------------------------

GREEN, RED = (0, 255, 0), (255, 0, 0)


def _colour_mask(shape, box, colour):
  mask = np.zeros(shape + (3,), np.uint8)
  if box is not None:
    top, left, bottom, right = box
    mask[top:bottom, left:right] = colour
  return mask


def make_uclm(root: pathlib.Path) -> pathlib.Path:
  """BUS-UCLM layout: 2 train patients, 1 test patient (COPE)."""
  uclm = root / "BUS-UCLM"
  cases = [
      ("ALPH_001", (12, 16), (2, 3, 6, 9), GREEN),
      ("ALPH_002", (12, 16), None, None),
      ("BETA_001", (10, 10), (1, 1, 8, 4), RED),
      ("COPE_001", (12, 12), (4, 4, 8, 8), GREEN),
      ("COPE_002", (12, 12), None, None),
  ]
  for k, (name, shape, box, colour) in enumerate(cases):
    _png(uclm / "images" / f"{name}.png", _texture(10 + k, shape))
    _png(uclm / "masks" / f"{name}.png", _colour_mask(shape, box, colour))
  return uclm


def test_bus_uclm_labels_patients_and_splits(tmp_path):
  uclm = make_uclm(tmp_path / "manual")
  splits = data.load("bus_uclm", data_dir=tmp_path / "tfds", manual_dir=uclm)
  assert set(splits) == {"all", "train", "test"}
  assert len(splits["all"]) == 5
  assert splits["test"].image_ids == ["COPE_001", "COPE_002"]
  assert set(splits["train"].patient_ids) == {"ALPH", "BETA"}
  labels = dict(zip(splits["all"].image_ids, splits["all"].labels))
  assert labels == {
      "ALPH_001": 1,
      "ALPH_002": 0,
      "BETA_001": 2,
      "COPE_001": 1,
      "COPE_002": 0,
  }
  by_id = {e["image_id"]: e for e in splits["all"]}
  np.testing.assert_array_equal(
      by_id["BETA_001"]["mask"][..., 0], _box(10, 10, 1, 1, 8, 4) > 0
  )
  assert not by_id["ALPH_002"]["mask"].any()


@pytest.mark.parametrize(
    "mask, words",
    [
        (
            np.full((12, 16, 3), 255, np.uint8),
            "unexpected mask colours (192 px: (255, 255, 255) x192",
        ),
        (_colour_mask((12, 16), (0, 0, 3, 3), (0, 0, 255)), "unexpected"),
        (
            _colour_mask((12, 16), (0, 0, 3, 3), GREEN)
            + _colour_mask((12, 16), (6, 6, 9, 9), RED),
            "both green",
        ),
    ],
    ids=["white", "blue", "green_and_red"],
)
def test_bus_uclm_bad_mask_colours(tmp_path, mask, words):
  uclm = make_uclm(tmp_path / "manual")
  bad = uclm / "masks" / "ALPH_001.png"
  _png(bad, mask)
  with pytest.raises(data.BadInputError) as info:
    data.load("bus_uclm", data_dir=tmp_path / "tfds", manual_dir=uclm)
  assert str(bad) in str(info.value)
  assert words in str(info.value)
  source = data.load(
      "bus_uclm", data_dir=tmp_path / "tfds", manual_dir=uclm, skip_bad=True
  )["all"]
  assert "ALPH_001" not in source.image_ids and len(source) == 4


def test_bus_uclm_missing_mask(tmp_path):
  uclm = make_uclm(tmp_path / "manual")
  (uclm / "masks" / "BETA_001.png").unlink()
  with pytest.raises(data.BadInputError, match="BETA_001.png: image without"):
    data.load("bus_uclm", data_dir=tmp_path / "tfds", manual_dir=uclm)


# ---------------------------------------------------------------------------
# BUS-BRA fixture.
# ---------------------------------------------------------------------------


def make_busbra(root: pathlib.Path, *, patient_column: bool = False):
  busbra = root / "BUSBRA"
  rows = [
      ("bus_0001-l", "benign", "3"),
      ("bus_0001-r", "malignant", "5"),
      ("bus_0002-s", "benign", "2"),
  ]
  header = "ID,Histology,Pathology,BIRADS" + (",Case" if patient_column else "")
  lines = [header]
  for k, (image_id, pathology, birads) in enumerate(rows):
    _png(busbra / "Images" / f"{image_id}.png", _texture(20 + k, (10, 12)))
    _png(
        busbra / "Masks" / f"mask_{image_id[4:]}.png",
        _box(10, 12, 2, 2, 6, 5 + k),
    )
    line = f"{image_id},x,{pathology},{birads}"
    lines.append(line + (f",{100 + k}" if patient_column else ""))
  (busbra / "bus_data.csv").write_text("\n".join(lines) + "\n")
  return busbra


def test_bus_bra_labels_and_patients(tmp_path):
  busbra = make_busbra(tmp_path / "manual")
  splits = data.load("bus_bra", data_dir=tmp_path / "tfds", manual_dir=busbra)
  assert set(splits) == {"all"}
  source = splits["all"]
  assert source.image_ids == ["bus_0001-l", "bus_0001-r", "bus_0002-s"]
  np.testing.assert_array_equal(source.labels, [1, 2, 1])
  assert source.patient_ids == ["0001", "0001", "0002"]
  np.testing.assert_array_equal(
      source[1]["mask"][..., 0], _box(10, 12, 2, 2, 6, 6) > 0
  )


def test_bus_bra_patient_column(tmp_path):
  busbra = make_busbra(tmp_path / "manual", patient_column=True)
  source = data.load("bus_bra", data_dir=tmp_path / "tfds", manual_dir=busbra)
  assert source["all"].patient_ids == ["100", "101", "102"]


def test_bus_bra_missing_files(tmp_path):
  busbra = make_busbra(tmp_path / "manual")
  (busbra / "bus_data.csv").unlink()
  with pytest.raises(FileNotFoundError) as info:
    data.load("bus_bra", data_dir=tmp_path / "tfds", manual_dir=busbra)
  assert str(busbra / "bus_data.csv") in str(info.value)
  assert "zenodo.org/records/8231412" in str(info.value)

  busbra = make_busbra(tmp_path / "manual2")
  (busbra / "Images" / "bus_0001-r.png").unlink()
  (busbra / "Masks" / "mask_0002-s.png").unlink()
  with pytest.raises(data.BadInputError) as info:
    data.load("bus_bra", data_dir=tmp_path / "tfds2", manual_dir=busbra)
  message = str(info.value)
  assert f"{busbra / 'Images' / 'bus_0001-r.png'}: listed in" in message
  assert str(busbra / "Masks" / "mask_0002-s.png") in message


# ---------------------------------------------------------------------------
# Phantom builder.
# ---------------------------------------------------------------------------


def test_phantom_builder_matches_generator(tmp_path):
  from ultraad_jax import phantom  # pylint: disable=g-import-not-at-top

  source = data.load(
      "us_phantom",
      data_dir=tmp_path,
      image_size=40,
      n_per_class=2,
      difficulty=0.2,
      seed=3,
  )["all"]
  arrays = phantom.generate(2, 40, 3, 0.2)
  assert source.config == "s40-n2-d0p2-seed3"
  assert len(source) == 6
  np.testing.assert_array_equal(source.labels, arrays["labels"])
  assert source.image_ids == list(arrays["image_ids"])
  for i in (0, 3, 5):
    np.testing.assert_array_equal(source[i]["image"], arrays["images"][i])
    np.testing.assert_array_equal(source[i]["mask"][..., 0], arrays["masks"][i])


def test_phantom_presets_and_bad_options(tmp_path):
  builder = data.make_builder("us_phantom", data_dir=tmp_path)
  assert builder.builder_config.name == "demo"
  assert builder.builder_config.image_size == 96
  large = data.make_builder(
      "us_phantom", data_dir=tmp_path, builder_config="large"
  )
  assert large.builder_config.image_size == 224
  # Options every dataset accepts (the training loop passes them).
  plain = data.make_builder(
      "us_phantom", data_dir=tmp_path, skip_bad=False, dedupe=False
  )
  assert plain.builder_config.name == "demo"
  # Overrides that equal a preset map back to it.
  same = data.make_builder("us_phantom", data_dir=tmp_path, n_per_class=40)
  assert same.builder_config.name == "demo"
  with pytest.raises(ValueError, match="difficulty=2"):
    data.make_builder("us_phantom", data_dir=tmp_path, difficulty=2)
  with pytest.raises(TypeError, match="valid options"):
    data.make_builder("us_phantom", data_dir=tmp_path, dedupe_threshold=3)
  with pytest.raises(ValueError, match="builder_config 'huge'"):
    data.make_builder("us_phantom", data_dir=tmp_path, builder_config="huge")
  with pytest.raises(KeyError, match="Unknown dataset 'busy'"):
    data.make_builder("busy", data_dir=tmp_path)


# ---------------------------------------------------------------------------
# Real BUSI (skipped when the copy is absent).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_busi(tmp_path_factory):
  if not REAL_BUSI.is_dir():
    pytest.skip(f"real BUSI copy not found at {REAL_BUSI}")
  return data.load(
      "busi",
      data_dir=tmp_path_factory.mktemp("busi_tfds"),
      manual_dir=REAL_BUSI,
  )["all"]


def _union_of_files(stem: str, folder: str) -> np.ndarray:
  union = None
  for path in sorted((REAL_BUSI / folder).glob(f"{stem}_mask*.png")):
    mask = np.asarray(Image.open(path).convert("L")) > 0
    union = mask if union is None else union | mask
  return union


def test_real_busi_counts_and_masks(real_busi):
  assert len(real_busi) == 780
  np.testing.assert_array_equal(np.bincount(real_busi.labels), [133, 437, 210])
  assert len(set(real_busi.image_ids)) == 780
  # Multi-mask images: the stored mask is the union of every mask file.
  for stem in ("benign (100)", "benign (195)"):
    example = real_busi[real_busi.image_ids.index(stem)]
    union = _union_of_files(stem, "benign")
    first = np.asarray(
        Image.open(REAL_BUSI / "benign" / f"{stem}_mask.png").convert("L")
    )
    np.testing.assert_array_equal(example["mask"][..., 0], union)
    assert union.sum() > (first > 0).sum()  # The extra masks add pixels.
  # Normal masks are all zero; lesion masks are not.
  normal = np.flatnonzero(real_busi.labels == data.NORMAL)
  for example in real_busi.encoded(normal):
    with Image.open(io.BytesIO(example["mask"])) as mask:
      assert not np.asarray(mask).any()
  lesion = real_busi[int(np.flatnonzero(real_busi.labels == data.MALIGNANT)[0])]
  assert lesion["mask"].any()


def test_real_busi_dedupe(tmp_path):
  if not REAL_BUSI.is_dir():
    pytest.skip(f"real BUSI copy not found at {REAL_BUSI}")
  source = data.load(
      "busi", data_dir=tmp_path, manual_dir=REAL_BUSI, dedupe=True
  )["all"]
  report = json.loads((source.data_dir / data.DEDUPE_REPORT).read_text())
  assert report["num_before"] == 780
  assert report["num_after"] == len(source) == 780 - report["num_dropped"]
  # BUSI is known to hold many re-cropped copies, some across classes.
  assert 100 < report["num_dropped"] < 260
  assert report["conflicting"]
  kept = set(source.image_ids)
  for group in report["groups"]:
    assert group["kept"] in kept
    assert not kept & set(group["dropped"])
  for group in report["conflicting"]:
    assert not kept & set(group["image_ids"])
