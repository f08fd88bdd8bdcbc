"""BUS-UCLM (Vallez et al., Scientific Data 2025), TFDS builder.

683 breast ultrasound images of 38 patients (419 normal, 174 benign, 90
malignant), Siemens ACUSON S2000. Masks are RGB: black background, green
benign lesion, red malignant lesion; the label is read from the mask colour.
The patient is the first 4 characters of the file name.

Splits: "all", and the patient-disjoint official partition "train" / "test",
where test = the five patients COPE, ANFO, ELCO, CRCI, FLKA (the test
patients named in the project's method notes; check them against the
dataset paper before reporting numbers as "official").

Prepare:
  python -m ultraad_jax.data bus_uclm --data_dir <DATA_DIR> \
      --manual_dir <folder holding BUS-UCLM>
"""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from ultraad_jax import builder_base

TEST_PATIENTS = ("COPE", "ANFO", "ELCO", "CRCI", "FLKA")
# A pixel is black when no channel exceeds this; green or red when that
# channel exceeds it and is at least twice each other channel (tolerates
# anti-aliased, darker edges of the painted regions).
_DARK = 40


class BusUclm(builder_base.ManualBuilder):
  """BUS-UCLM from BUS-UCLM/images/*.png and BUS-UCLM/masks/*.png."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = __doc__
  HOMEPAGE = "https://doi.org/10.17632/7fvgj4jsp7.1"
  CITATION = """@article{vallez2025busuclm,
  title={{BUS-UCLM}: Breast ultrasound lesion segmentation dataset},
  author={Vallez, Noelia and others},
  journal={Scientific Data}, year={2025}}"""
  OFFICIAL_SPLITS = ("train", "test")
  ROOT_NAME = "BUS-UCLM"
  ROOT_ENTRIES = ("images", "masks")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
BUS-UCLM is downloaded by hand from Mendeley Data (read its licence there):
  https://data.mendeley.com/datasets/7fvgj4jsp7/1
Unzip it so that the manual folder looks like this:
  <manual_dir>/BUS-UCLM/images/<NAME>.png   (the first 4 characters of NAME
                                             are the patient code, e.g. COPE)
  <manual_dir>/BUS-UCLM/masks/<NAME>.png    (same file name; RGB: black
                                             background, green benign lesion,
                                             red malignant lesion)
(manual_dir may also be the BUS-UCLM folder itself.)
"""

  def _scan(self, root: pathlib.Path):
    image_files, ignored = builder_base.list_pngs(root / "images")
    mask_files, ignored_masks = builder_base.list_pngs(root / "masks")
    ignored += ignored_masks
    # Lists per stem: X.png and X.PNG (a case-sensitive file system) must
    # not replace each other silently. Two images with one id are reported
    # by the base class; two masks of one image are reported here, since
    # the label is the mask colour and could differ between them.
    images, masks = {}, {}
    for path in image_files:
      images.setdefault(path.stem, []).append(path)
    for path in mask_files:
      masks.setdefault(path.stem, []).append(path)
    records, problems = [], []
    for stem in sorted(images, key=builder_base.natural_key):
      mask_paths = masks.get(stem, [])
      if len(mask_paths) > 1:
        for path in mask_paths:
          others = ", ".join(str(m) for m in mask_paths if m != path)
          problems.append(
              builder_base.Problem(
                  str(path),
                  f"{len(mask_paths)} mask files for image id {stem!r} "
                  f"(also {others}); the label is read from the mask, so "
                  "keep exactly one",
              )
          )
        continue
      patient = stem[:4]
      for image_path in images[stem]:
        records.append(
            builder_base.Record(
                image_id=stem,
                image_path=image_path,
                mask_paths=tuple(mask_paths),
                label=None,
                patient_id=patient,
                split="test" if patient.upper() in TEST_PATIENTS else "train",
            )
        )
    for stem in sorted(set(masks) - set(images), key=builder_base.natural_key):
      for path in masks[stem]:
        problems.append(
            builder_base.Problem(
                str(path),
                "mask without an image (expected "
                f"{root / 'images' / (stem + '.png')})",
            )
        )
    return records, problems, ignored

  def _read_mask(self, record, size):
    if not record.mask_paths:
      raise builder_base.FileProblem(
          record.image_path,
          "image without a mask file (the label is read from the mask; "
          f"expected {_mask_path(record.image_path)})",
      )
    path = record.mask_paths[0]
    image = builder_base.open_png(path)
    builder_base.check_same_size(path, image.size, size)
    mask, label = mask_and_label(image, path)
    return mask, label

  def _mask_hint(self, record):
    return f"expected {_mask_path(record.image_path)}"


def _mask_path(image_path: pathlib.Path) -> pathlib.Path:
  return image_path.parent.parent / "masks" / image_path.name


def mask_and_label(image, path) -> tuple[np.ndarray, int]:
  """Reads a BUS-UCLM colour mask.

  Args:
    image: the decoded mask (any mode; converted to RGB).
    path: its file, for error messages.

  Returns:
    (bool lesion mask [H, W], label: normal without coloured pixels, benign
    for green, malignant for red).

  Raises:
    builder_base.FileProblem: colours other than black/green/red, or both
      green and red in one mask.
  """
  rgb = np.asarray(builder_base.to_8bit(image).convert("RGB")).astype(np.int16)
  red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  black = (red <= _DARK) & (green <= _DARK) & (blue <= _DARK)
  is_green = (green > _DARK) & (green >= 2 * red) & (green >= 2 * blue)
  is_red = (red > _DARK) & (red >= 2 * green) & (red >= 2 * blue)
  unexpected = ~(black | is_green | is_red)
  if unexpected.any():
    colours, counts = np.unique(
        rgb[unexpected].reshape(-1, 3), axis=0, return_counts=True
    )
    top = np.argsort(-counts)[:5]
    listed = ", ".join(
        f"{tuple(int(c) for c in colours[k])} x{int(counts[k])}" for k in top
    )
    raise builder_base.FileProblem(
        path,
        f"unexpected mask colours ({int(unexpected.sum())} px: {listed}); "
        "expected black (0,0,0) background, green (0,255,0) benign or red "
        "(255,0,0) malignant",
    )
  if is_green.any() and is_red.any():
    raise builder_base.FileProblem(
        path,
        f"mask has both green (benign, {int(is_green.sum())} px) and red "
        f"(malignant, {int(is_red.sum())} px) pixels; expected one lesion "
        "class",
    )
  if is_green.any():
    return is_green, builder_base.BENIGN
  if is_red.any():
    return is_red, builder_base.MALIGNANT
  return np.zeros(black.shape, bool), builder_base.NORMAL
