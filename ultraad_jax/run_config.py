"""Checks a run configuration before anything is loaded or compiled.

ml_collections already rejects unknown keys and wrong types given on the
command line (the config is locked). This module adds what it cannot know:
impossible values and combinations, each reported with the key to change,
before a dataset is prepared or a program compiled. It also fingerprints the
training-relevant part of a config, so that a workdir is never resumed by a
different experiment.
"""

import hashlib
import json
import os

import jax

from ultraad_jax import baselines
from ultraad_jax import episodes

# The single sources of truth for the allowed values.
SETTINGS = tuple(episodes.SETTINGS)
BASELINES = baselines.NAMES
# Values of precision.frozen / precision.head (jax.default_matmul_precision).
MATMUL_PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16")
# Keys that do not change what is trained; a resumed run may differ in them.
_NON_TRAINING_KEYS = (
    "mode",
    "sweep",
    "eval",
    "profile_steps",
    "dump_hlo",
    "checkpoint",
    "train.log_every",
    "train.episode_chunk",  # how episodes are batched, not what is trained
    "train.steps_per_call",  # how steps are dispatched, likewise
    "cache.batch_size",
    "cache.memory_budget_gb",
    "data.data_dir",
    "data.manual_dir",
    "data.test_manual_dir",
    "mesh",
)


def default_data_dir():
  """Where prepared TFDS data live unless data.data_dir says otherwise."""
  return os.environ.get(
      "ULTRAAD_DATA_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "ultraad_jax", "tfds"),
  )


def divisors(n: int) -> list[int]:
  """The divisors of n, ascending (episode chunk sizes that split n evenly)."""
  return [d for d in range(1, n + 1) if n % d == 0]


def _fail(key, value, expected):
  raise ValueError(f"config.{key}={value!r} is invalid: {expected}")


def _check_schema(config, reference, prefix=""):
  """Unknown keys and wrong types against the base config (model excluded)."""
  for key in config.keys():
    path = prefix + key
    if path in ("model", "data.options", "data.test_options"):
      continue  # checked by ModelConfig.from_dict / the dataset builder
    if key not in reference:
      raise ValueError(
          f"Unknown config key config.{path}; known keys here: "
          f"{sorted(reference.keys())}."
      )
    value, ref = config[key], reference[key]
    if hasattr(ref, "keys"):
      if not hasattr(value, "keys"):
        _fail(path, value, "expected a nested config")
      _check_schema(value, ref, path + ".")
    elif ref is not None and value is not None:
      ok = (
          isinstance(value, type(ref))
          or (isinstance(ref, float) and isinstance(value, int))
          or (
              isinstance(ref, (tuple, list))
              and isinstance(value, (tuple, list))
          )
      )
      if isinstance(ref, int) and isinstance(value, bool) != isinstance(
          ref, bool
      ):
        ok = False
      if not ok:
        _fail(path, value, f"expected {type(ref).__name__}")


def validate(config):
  """Rejects impossible values before any data loading or compilation.

  Args:
    config: the run's ConfigDict.

  Raises:
    ValueError: naming the key, its value and what is expected.
  """
  try:
    from configs import common  # pylint: disable=g-import-not-at-top

    _check_schema(config, common.get_base_config())
  except ImportError:  # used outside the repository root: flags checked types
    pass
  # The model's keys, types and static ranges (its own checks, no backbone).
  from ultraad_jax import model  # pylint: disable=g-import-not-at-top

  try:
    model.ModelConfig.from_dict(config.model)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model is invalid: {e}") from e
  if config.mode not in ("train", "eval"):
    _fail("mode", config.mode, "expected 'train' or 'eval'")
  e = config.episodes
  if e.setting not in SETTINGS:
    _fail("episodes.setting", e.setting, f"expected one of {SETTINGS}")
  if e.shots <= 0:
    _fail("episodes.shots", e.shots, "the number of shots must be >= 1")
  if e.num_episodes <= 0:
    _fail("episodes.num_episodes", e.num_episodes, "must be >= 1")
  if e.shots_file and not os.path.exists(e.shots_file):
    _fail("episodes.shots_file", e.shots_file, "no such file")
  if config.data.num_views < 1:
    _fail("data.num_views", config.data.num_views, "must be >= 1")
  if config.data.resize_mode not in ("pad", "stretch"):
    _fail("data.resize_mode", config.data.resize_mode, "pad or stretch")
  t = config.train
  if t.steps < 0:
    _fail("train.steps", t.steps, "must be >= 0")
  if t.batch_size < 0:
    _fail("train.batch_size", t.batch_size, "must be >= 0 (0 = all)")
  if t.learning_rate <= 0:
    _fail("train.learning_rate", t.learning_rate, "must be > 0")
  if not 0 <= t.val_fraction < 1:
    _fail("train.val_fraction", t.val_fraction, "must be in [0, 1)")
  if t.log_every <= 0:
    _fail("train.log_every", t.log_every, "must be >= 1")
  if t.steps_per_call < 0:
    _fail("train.steps_per_call", t.steps_per_call, "must be >= 0 (0 = auto)")
  if config.checkpoint.every_steps <= 0:
    _fail("checkpoint.every_steps", config.checkpoint.every_steps, ">= 1")
  if config.cache.dtype not in ("float32", "bfloat16"):
    _fail("cache.dtype", config.cache.dtype, "float32 or bfloat16")
  if config.cache.batch_size <= 0 or config.eval.batch_size <= 0:
    _fail(
        "cache.batch_size/eval.batch_size",
        (config.cache.batch_size, config.eval.batch_size),
        "must be >= 1",
    )
  unknown = set(config.eval.baselines) - set(BASELINES)
  if unknown:
    _fail(
        "eval.baselines",
        tuple(config.eval.baselines),
        f"unknown {sorted(unknown)}; known {BASELINES}",
    )
  if config.backbone.image_size < 0:
    _fail("backbone.image_size", config.backbone.image_size, ">= 0")
  for part in ("frozen", "head"):
    if config.precision[part] not in MATMUL_PRECISIONS:
      _fail(
          f"precision.{part}",
          config.precision[part],
          f"expected one of {MATMUL_PRECISIONS}",
      )
  # Devices and the episode axis of the mesh.
  available = len(jax.devices())
  n = config.mesh.num_devices or available
  if n > available:
    _fail(
        "mesh.num_devices",
        config.mesh.num_devices,
        f"only {available} device(s) exist here",
    )
  if config.mesh.data <= 0 or n % config.mesh.data:
    _fail("mesh.data", config.mesh.data, f"must divide the {n} devices in use")
  if config.eval.batch_size % config.mesh.data:
    _fail(
        "eval.batch_size",
        config.eval.batch_size,
        f"must be a multiple of mesh.data={config.mesh.data} (the query "
        "batch is sharded over the data axis)",
    )
  episode_axis = n // config.mesh.data
  if e.num_episodes % episode_axis:
    _fail(
        "episodes.num_episodes",
        e.num_episodes,
        f"must be a multiple of the episode mesh axis ({episode_axis} "
        "devices); change it, or set mesh.num_devices / mesh.data",
    )
  local = e.num_episodes // episode_axis
  if t.episode_chunk < 0 or (t.episode_chunk and local % t.episode_chunk):
    _fail(
        "train.episode_chunk",
        t.episode_chunk,
        f"must be 0 (automatic) or divide the {local} episode(s) per device: "
        f"one of {divisors(local)}",
    )
  # Sizes and layers against the backbone's own config (no weights loaded).
  dims = backbone_dims(config)
  if dims is not None:
    _check_dims(config, **dims)


# OpenAI's checkpoints on the Hugging Face hub, by their clip.openai_config
# names: their sizes are known without downloading anything.
_OPENAI_HUB_NAMES = {
    "openai/clip-vit-base-patch32": "ViT-B/32",
    "openai/clip-vit-base-patch16": "ViT-B/16",
    "openai/clip-vit-large-patch14": "ViT-L/14",
    "openai/clip-vit-large-patch14-336": "ViT-L/14@336",
}


def backbone_dims(config):
  """The backbone's sizes from its config alone (no weights, no compile).

  Args:
    config: the run's ConfigDict (backbone.name, backbone.image_size).

  Returns:
    {"image_size", "patch_size", "num_layers"} with image_size the input size
    the run will use, or None when they cannot be known without loading the
    checkpoint (an unknown hub name, an unreadable folder: the loader then
    reports the problem).
  """
  from ultraad_jax import clip  # pylint: disable=g-import-not-at-top

  bc = config.backbone
  name = str(bc.name)
  vision = None
  if name == "tiny":
    overrides = {"image_size": bc.image_size} if bc.image_size else {}
    vision = clip.tiny_config(**overrides).vision_config
  elif name.removeprefix("hf://") in _OPENAI_HUB_NAMES and not os.path.isdir(
      os.path.expanduser(name)
  ):
    vision = clip.openai_config(
        _OPENAI_HUB_NAMES[name.removeprefix("hf://")]
    ).vision_config
  else:
    path = os.path.join(os.path.expanduser(name), "config.json")
    try:
      import transformers  # pylint: disable=g-import-not-at-top

      with open(path, encoding="utf-8") as f:
        raw = json.load(f)
      vision = transformers.CLIPConfig.from_dict(raw).vision_config
    except Exception:  # pylint: disable=broad-except
      return None  # clip.load names the problem with the folder
  return {
      "image_size": int(bc.image_size or vision.image_size),
      "patch_size": int(vision.patch_size),
      "num_layers": int(vision.num_hidden_layers),
  }


def _check_dims(config, *, image_size, patch_size, num_layers):
  """Input size and tapped layers against the backbone's sizes."""
  if image_size % patch_size:
    _fail(
        "backbone.image_size",
        image_size,
        f"must be a multiple of the patch size {patch_size} of backbone "
        f"{config.backbone.name!r}",
    )
  bad = [l for l in config.model.layers if not 1 <= int(l) <= num_layers]
  if bad:
    _fail(
        "model.layers",
        tuple(config.model.layers),
        f"layers {bad} do not exist; backbone {config.backbone.name!r} has "
        f"blocks 1..{num_layers}",
    )


def validate_against_backbone(config, backbone):
  """Checks the config against the built backbone (sizes, layers)."""
  _check_dims(
      config,
      image_size=config.backbone.image_size or backbone.image_size,
      patch_size=backbone.patch_size,
      num_layers=backbone.num_layers,
  )


def validate_against_data(config, labels):
  """Checks that every class the setting needs has enough images."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  counts = np.bincount(np.asarray(labels), minlength=3)
  names = ("normal", "benign", "malignant")
  needed = (0,) if config.episodes.setting == "normal_only" else (0, 1, 2)
  for c in needed:
    if counts[c] <= config.episodes.shots:
      raise ValueError(
          f"config.episodes.shots={config.episodes.shots} needs more than "
          f"{config.episodes.shots} {names[c]} images in "
          f"{config.data.name}/{config.data.split} (support plus at least one "
          f"query), but it has {counts[c]}. Lower episodes.shots."
      )


def fingerprint(config):
  """A hash of the training-relevant keys (see _NON_TRAINING_KEYS)."""
  flat = {}

  def walk(node, prefix):
    for key in sorted(node.keys()):
      path = prefix + key
      if path in _NON_TRAINING_KEYS:
        continue
      if hasattr(node[key], "keys"):
        walk(node[key], path + ".")
      else:
        value = node[key]
        flat[path] = list(value) if isinstance(value, tuple) else value

  walk(config, "")
  return hashlib.sha256(
      json.dumps(flat, sort_keys=True, default=str).encode()
  ).hexdigest()[:16]
