"""Procedural breast-ultrasound phantom (ultraad_jax.phantom), TFDS builder.

No download. Balanced normal / benign / malignant images with exact lesion
masks, deterministic per seed; see ultraad_jax/phantom.py for the model.

Configs:
  demo   96 x 96 px, 40 images per class, difficulty 0.5, seed 0 (default;
         generated in about a second)
  large  224 x 224 px, 100 images per class, difficulty 0.5, seed 0
Any other combination of image_size, n_per_class, difficulty and seed gets
its own config (and directory), named like "s64-n10-d0p3-seed2".

Prepare:
  python -m ultraad_jax.data us_phantom --data_dir <DATA_DIR> \
      [--option builder_config=large] [--option image_size=128 ...]
"""

import dataclasses

import tensorflow_datasets as tfds

from ultraad_jax import builder_base
from ultraad_jax import phantom


@dataclasses.dataclass(eq=False)
class PhantomConfig(tfds.core.BuilderConfig):
  """Phantom options (see ultraad_jax.phantom.generate)."""

  image_size: int = 96
  n_per_class: int = 40
  difficulty: float = 0.5
  seed: int = 0


def _name(image_size, n_per_class, difficulty, seed) -> str:
  difficulty = f"{float(difficulty):g}".replace(".", "p").replace("-", "m")
  return f"s{image_size}-n{n_per_class}-d{difficulty}-seed{seed}"


_PRESETS = {
    "demo": dict(image_size=96, n_per_class=40, difficulty=0.5, seed=0),
    "large": dict(image_size=224, n_per_class=100, difficulty=0.5, seed=0),
}


class UsPhantom(builder_base.ImageMaskBuilder):
  """Phantom images generated at preparation time."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = __doc__
  BUILDER_CONFIGS = [
      PhantomConfig(name=name, description=str(values), **values)
      for name, values in _PRESETS.items()
  ]

  @classmethod
  def config_for(
      cls,
      *,
      builder_config: str | None = None,
      image_size: int | None = None,
      n_per_class: int | None = None,
      difficulty: float | None = None,
      seed: int | None = None,
      skip_bad: bool = False,
      dedupe: bool = False,
  ) -> PhantomConfig:
    """A preset ("demo" by default), optionally with fields overridden.

    Args:
      builder_config: "demo" (default when None or "") or "large".
      image_size: overrides the preset when not None.
      n_per_class: overrides the preset when not None.
      difficulty: overrides the preset when not None.
      seed: overrides the preset when not None.
      skip_bad: accepted for a uniform interface; generated data has no bad
        files.
      dedupe: accepted for a uniform interface; phantom images are distinct.

    Returns:
      The PhantomConfig.
    """
    del skip_bad, dedupe  # Nothing to skip or de-duplicate.
    preset = builder_config or "demo"
    if preset not in _PRESETS:
      raise ValueError(
          f"Unknown us_phantom builder_config {preset!r}; presets: "
          f"{sorted(_PRESETS)}."
      )
    values = dict(_PRESETS[preset])
    for key, value in (
        ("image_size", image_size),
        ("n_per_class", n_per_class),
        ("difficulty", difficulty),
        ("seed", seed),
    ):
      if value is not None:
        values[key] = value
    values = dict(
        zip(
            ("n_per_class", "image_size", "seed", "difficulty"),
            phantom.check_options(
                values["n_per_class"],
                values["image_size"],
                values["seed"],
                values["difficulty"],
            ),
        )
    )
    for builder_config in cls.BUILDER_CONFIGS:
      if all(getattr(builder_config, k) == v for k, v in values.items()):
        return builder_config
    return PhantomConfig(
        name=_name(**values), description=str(values), **values
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    arrays = phantom.generate(
        n_per_class=config.n_per_class,
        image_size=config.image_size,
        seed=config.seed,
        difficulty=config.difficulty,
    )
    examples = [
        {
            # The phantom is grey: stored single-channel, read as 3 channels.
            "image": builder_base.encode_png(arrays["images"][i, ..., 0]),
            "mask": builder_base.encode_mask(arrays["masks"][i]),
            "label": int(arrays["labels"][i]),
            "image_id": str(arrays["image_ids"][i]),
            "patient_id": str(arrays["patient_ids"][i]),
        }
        for i in range(len(arrays["labels"]))
    ]
    return {builder_base.FULL_SPLIT: self._generate_examples(examples)}
