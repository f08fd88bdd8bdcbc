"""BUS-BRA (Gomez-Flores et al., Medical Physics 2024), TFDS builder.

1,875 breast ultrasound images of 1,064 patients, biopsy-proven benign or
malignant, with BI-RADS categories and lesion masks; no normal images.

Layout assumed (the Zenodo release, record 8231412):
  BUSBRA/Images/bus_XXXX-Y.png    the images (XXXX a number, Y a letter)
  BUSBRA/Masks/mask_XXXX-Y.png    the binary masks
  BUSBRA/bus_data.csv             one row per image; columns used:
      ID         image stem, e.g. bus_0001-l
      Pathology  benign / malignant
      a patient column if present (the first of: Case, Patient, PatientID,
      Patient_ID, case_id, matched case-insensitively); otherwise the
      patient is the number XXXX of the ID (bus_0001-l and bus_0001-r are
      then one patient).
Other columns (BIRADS, Histology, Device, ...) are not stored. The release
has no single official train/test split (its paper uses cross-validation),
so only "all" is provided; episodes keep patients disjoint.

Prepare:
  python -m ultraad_jax.data bus_bra --data_dir <DATA_DIR> \
      --manual_dir <folder holding BUSBRA>
"""

import csv
import pathlib
import re

import tensorflow_datasets as tfds

from ultraad_jax import builder_base

CSV_NAME = "bus_data.csv"
_PATIENT_COLUMNS = ("case", "patient", "patientid", "patient_id", "case_id")
_ID_NUMBER = re.compile(r"^bus_(\d+)")


class BusBra(builder_base.ManualBuilder):
  """BUS-BRA from BUSBRA/{Images,Masks,bus_data.csv}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = __doc__
  HOMEPAGE = "https://zenodo.org/records/8231412"
  CITATION = """@article{gomezflores2024busbra,
  title={{BUS-BRA}: A breast ultrasound dataset for assessing computer-aided
         diagnosis systems},
  author={G{\\'o}mez-Flores, Wilfrido and Gregorio-Calas, Maria Julia and
          Coelho de Albuquerque Pereira, Wagner},
  journal={Medical Physics}, year={2024}}"""
  ROOT_NAME = "BUSBRA"
  ROOT_ENTRIES = ("Images", "Masks", CSV_NAME)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
BUS-BRA is downloaded by hand from Zenodo (record 8231412):
  https://zenodo.org/records/8231412
Unzip it so that the manual folder looks like this:
  <manual_dir>/BUSBRA/Images/bus_0001-l.png
  <manual_dir>/BUSBRA/Masks/mask_0001-l.png
  <manual_dir>/BUSBRA/bus_data.csv   (columns ID, Pathology, BIRADS, ...)
(manual_dir may also be the BUSBRA folder itself.)
"""

  def _scan(self, root: pathlib.Path):
    csv_path = root / CSV_NAME
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      columns = {c.strip().lower(): c for c in reader.fieldnames or ()}
      missing = [c for c in ("id", "pathology") if c not in columns]
      if missing:
        raise builder_base.BadInputError(
            f"{csv_path}: missing column(s) {missing}; found "
            f"{reader.fieldnames}. Expected at least ID and Pathology."
        )
      patient_column = next(
          (columns[c] for c in _PATIENT_COLUMNS if c in columns), None
      )
      rows = list(reader)

    images_dir, masks_dir = root / "Images", root / "Masks"
    image_files, ignored = builder_base.list_pngs(images_dir)
    # Masks are looked up by name, but the folder is listed too so that a
    # stray file there is named like one under Images/.
    ignored += builder_base.list_pngs(masks_dir)[1]
    # Lists per stem: X.png and X.PNG (a case-sensitive file system) become
    # two records with one id, which the base class reports.
    on_disk = {}
    for path in image_files:
      on_disk.setdefault(path.stem, []).append(path)
    other_formats = {
        pathlib.Path(i.file).stem: i.file
        for i in ignored
        if pathlib.Path(i.file).parent == images_dir
    }

    # An ID on two lines: both rows point at one file, and which Pathology
    # is right cannot be known, so every row of that ID is dropped.
    first_line, repeated = {}, set()
    problems = []
    for line, row in enumerate(rows, start=2):
      image_id = (row[columns["id"]] or "").strip()
      if image_id in first_line:
        repeated.add(image_id)
        problems.append(
            builder_base.Problem(
                f"{csv_path} (line {line}, ID {image_id})",
                f"ID {image_id!r} listed again (first on line "
                f"{first_line[image_id]}); list each image once",
            )
        )
      else:
        first_line[image_id] = line

    records = []
    for line, row in enumerate(rows, start=2):
      image_id = (row[columns["id"]] or "").strip()
      if image_id in repeated:
        continue
      image_path = images_dir / f"{image_id}.png"
      pathology = (row[columns["pathology"]] or "").strip().lower()
      if pathology not in ("benign", "malignant"):
        problems.append(
            builder_base.Problem(
                f"{csv_path} (line {line}, ID {image_id})",
                f"Pathology is {pathology!r}; expected benign or malignant",
            )
        )
        continue
      if image_id not in on_disk:
        found = other_formats.get(image_id)
        problems.append(
            builder_base.Problem(
                str(image_path),
                f"listed in {csv_path} (line {line}) but the image file is "
                "missing"
                + (f" (found {found}; convert it to PNG)" if found else ""),
            )
        )
        continue
      mask_path = masks_dir / f"mask_{image_id.removeprefix('bus_')}.png"
      if patient_column is not None and row[patient_column].strip():
        patient = row[patient_column].strip()
      else:
        match = _ID_NUMBER.match(image_id)
        patient = match[1] if match else ""
      for path in on_disk[image_id]:
        records.append(
            builder_base.Record(
                image_id=image_id,
                image_path=path,
                mask_paths=(mask_path,) if mask_path.exists() else (),
                label=(
                    builder_base.BENIGN
                    if pathology == "benign"
                    else builder_base.MALIGNANT
                ),
                patient_id=patient,
            )
        )
    for stem in sorted(
        set(on_disk) - set(first_line), key=builder_base.natural_key
    ):
      for path in on_disk[stem]:
        problems.append(
            builder_base.Problem(str(path), f"image not listed in {csv_path}")
        )
    records.sort(key=lambda r: builder_base.natural_key(r.image_id))
    return records, problems, ignored

  def _mask_hint(self, record):
    name = f"mask_{record.image_id.removeprefix('bus_')}.png"
    return f"expected {record.image_path.parent.parent / 'Masks' / name}"
