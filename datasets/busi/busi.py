"""BUSI: Breast Ultrasound Images (Al-Dhabyani et al., 2020), TFDS builder.

780 images (133 normal, 437 benign, 210 malignant) from a GE LOGIQ E9, with
lesion masks; no patient ids and no official split. Multifocal lesions have
several mask files; they are OR-merged into one mask. Normal images get
all-zero masks.

Prepare:
  python -m ultraad_jax.data busi --data_dir <DATA_DIR> \
      --manual_dir <folder holding Dataset_BUSI_with_GT>
Options: skip_bad, dedupe (near-duplicate removal, see docs/DATA.md).
"""

import pathlib
import re

import tensorflow_datasets as tfds

from ultraad_jax import builder_base

_MASK_NAME = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<k>\d+))?$")


class Busi(builder_base.ManualBuilder):
  """BUSI from the original Dataset_BUSI_with_GT folder layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = __doc__
  HOMEPAGE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
  CITATION = """@article{aldhabyani2020busi,
  title={Dataset of breast ultrasound images},
  author={Al-Dhabyani, Walid and Gomaa, Mohammed and Khaled, Hussien and
          Fahmy, Aly},
  journal={Data in Brief}, volume={28}, pages={104863}, year={2020}}"""
  ROOT_NAME = "Dataset_BUSI_with_GT"
  ROOT_ENTRIES = ("normal", "benign", "malignant")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
BUSI (Dataset_BUSI_with_GT, CC BY 4.0) is downloaded by hand from
  https://scholar.cu.edu.eg/?q=afahmy/pages/dataset
  or its Kaggle mirror
  https://www.kaggle.com/datasets/aryashah2k/breast-ultrasound-images-dataset
Unzip it so that the manual folder looks like this:
  <manual_dir>/Dataset_BUSI_with_GT/benign/benign (1).png
  <manual_dir>/Dataset_BUSI_with_GT/benign/benign (1)_mask.png
  <manual_dir>/Dataset_BUSI_with_GT/benign/benign (100)_mask_1.png  (more
      masks of a multifocal lesion: _mask_1, _mask_2, ...)
  <manual_dir>/Dataset_BUSI_with_GT/malignant/malignant (1).png, ..._mask.png
  <manual_dir>/Dataset_BUSI_with_GT/normal/normal (1).png, ..._mask.png
(manual_dir may also be the Dataset_BUSI_with_GT folder itself.)
"""

  def _scan(self, root: pathlib.Path):
    records, problems, ignored = [], [], []
    for label, class_name in enumerate(builder_base.CLASS_NAMES):
      folder = root / class_name
      pngs, skipped = builder_base.list_pngs(folder)
      ignored.extend(skipped)
      # Lists per stem: X.png and X.PNG (a case-sensitive file system) are
      # two images with one id, which the base class reports; a dict of
      # single paths would keep one of them silently.
      images, masks = {}, {}
      for path in pngs:
        match = _MASK_NAME.match(path.stem)
        if match:
          masks.setdefault(match["stem"], []).append(path)
        else:
          images.setdefault(path.stem, []).append(path)
      for stem in sorted(images, key=builder_base.natural_key):
        mask_paths = tuple(
            sorted(
                masks.get(stem, ()),
                key=lambda p: builder_base.natural_key(p.name),
            )
        )
        for image_path in images[stem]:
          records.append(
              builder_base.Record(
                  image_id=stem,
                  image_path=image_path,
                  mask_paths=mask_paths,
                  label=label,
              )
          )
      for stem in sorted(
          set(masks) - set(images), key=builder_base.natural_key
      ):
        for path in masks[stem]:
          problems.append(
              builder_base.Problem(
                  str(path),
                  "mask without an image (expected "
                  f"{folder / (stem + '.png')})",
              )
          )
    return records, problems, ignored

  def _mask_hint(self, record):
    return (
        f"expected {record.image_path.with_name(record.image_id + '_mask.png')}"
    )
