"""Every experiment file in configs/ loads, its variants parse and validate.

Also checks, with `jax.eval_shape` only (no weights, no compute), that the
full-size BUSI config's model, train step and predict step fit together at
ViT-L/14@336 shapes, and that every config's feature cache fits its memory
budget on its dataset.
"""

import functools
import importlib
import pathlib
import re
import sys
import types

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import pytest

from configs import common
import engine_helpers
from ultraad_jax import clip
from ultraad_jax import features
from ultraad_jax import model
from ultraad_jax import run_config
from ultraad_jax import train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(
    p.stem
    for p in CONFIG_DIR.glob("*.py")
    if p.stem not in ("__init__", "common")
)

# Each file's variants and what each must change. A variant added to a file
# without an entry here fails test_variant_table_is_complete.
VARIANTS = {
    "demo": {
        "quick": {"train.steps": 2, "episodes.num_episodes": 2,
                  "mesh.num_devices": 1},  # fmt: skip
    },
    "busi": {
        "tiny": {"backbone.name": "tiny", "backbone.image_size": 96},
        "shots=1": {"episodes.shots": 1},
        "shots=16": {"episodes.shots": 16},
        "normal_only": {"episodes.setting": "normal_only"},
        "tiny,shots=8,normal_only": {
            "backbone.name": "tiny",
            "episodes.shots": 8,
            "episodes.setting": "normal_only",
        },
    },
    "bus_uclm": {
        "tiny": {"backbone.name": "tiny", "backbone.image_size": 96},
        "shots=2": {"episodes.shots": 2},
    },
    "cross_uclm_to_busi": {
        "tiny": {"backbone.name": "tiny", "backbone.image_size": 96},
        "shots=8": {"episodes.shots": 8},
    },
    "sweep_busi": {
        "tiny": {"backbone.name": "tiny", "sweep.shots": (1, 2, 4, 8, 16)},
        "episodes=8": {"episodes.num_episodes": 8},
    },
}

# Images per dataset (all splits), for the cache-size check.
DATASET_IMAGES = {"busi": 780, "bus_uclm": 683, "us_phantom": 300}


def _load(name):
  return importlib.import_module(f"configs.{name}")


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def test_every_config_file_has_a_table_entry():
  assert NAMES == sorted(VARIANTS)


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_and_validates(name):
  module = _load(name)
  # The docstring holds the command that runs it (STYLE.md).
  assert f"python main.py --config configs/{name}.py" in module.__doc__
  config = module.get_config()
  assert set(config.keys()) == set(common.get_base_config().keys())
  run_config.validate(config)
  model.ModelConfig.from_dict(config.model)
  # Two loads are equal and independent.
  again = module.get_config()
  assert run_config.fingerprint(again) == run_config.fingerprint(config)
  again.train.steps += 1
  assert config.train.steps == module.get_config().train.steps


@pytest.mark.parametrize(
    "name, variant",
    [(n, v) for n in sorted(VARIANTS) for v in VARIANTS[n]],
)
def test_variant_parses_validates_and_applies(name, variant):
  config = _load(name).get_config(variant)
  run_config.validate(config)
  for key, value in VARIANTS[name][variant].items():
    assert _get(config, key) == value, key
  assert run_config.fingerprint(config) != run_config.fingerprint(
      _load(name).get_config()
  )


@pytest.mark.parametrize("name", NAMES)
def test_variant_table_is_complete(name):
  with pytest.raises(ValueError, match="allowed") as err:
    _load(name).get_config("no_such_variant")
  allowed = set(re.findall(r"'(\w+)'", str(err.value).split("allowed")[1]))
  listed = {
      part.split("=")[0]
      for variant in VARIANTS[name]
      for part in variant.split(",")
  }
  assert allowed == listed


def test_bad_variant_values():
  with pytest.raises(ValueError, match="shots=3"):
    _load("busi").get_config("shots=3")
  with pytest.raises(ValueError, match="true or false"):
    _load("busi").get_config("tiny=maybe")
  with pytest.raises(ValueError):
    _load("busi").get_config("shots=four")


def _parse_command_line(argv, monkeypatch):
  """The config main.py would get from `argv` (its flag definition)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "test", flag_values=values, lock_config=True
  )
  # The overrides (--config.x=...) are read from sys.argv.
  monkeypatch.setattr(sys, "argv", argv)
  values(argv)
  return values.config


def test_command_line_flags_load_a_config(monkeypatch):
  path = CONFIG_DIR / "busi.py"
  config = _parse_command_line(
      ["main.py", "--config", f"{path}:tiny,shots=8",
       "--config.train.steps=7", "--config.model.fusion=gated"],
      monkeypatch,
  )  # fmt: skip
  assert (config.backbone.name, config.episodes.shots) == ("tiny", 8)
  assert (config.train.steps, config.model.fusion) == (7, "gated")
  run_config.validate(config)
  # A locked config refuses unknown keys and wrong types on the command line.
  # (ml_collections raises AttributeError for the former, a flags.Error for
  # the latter; main.py exits non-zero with either message.)
  for bad, words in [("--config.train.stepz=7", "stepz"),
                     ("--config.train.steps=seven", "seven")]:  # fmt: skip
    with pytest.raises((flags.Error, AttributeError), match=words):
      _parse_command_line(["main.py", "--config", str(path), bad], monkeypatch)


def test_negative_steps_per_call_is_refused_by_name():
  config = _load("demo").get_config()
  config.train.steps_per_call = -1
  with pytest.raises(ValueError, match=r"config.train.steps_per_call=-1"):
    run_config.validate(config)


def test_fingerprint_ignores_only_non_training_keys():
  config = _load("demo").get_config()
  base = run_config.fingerprint(config)
  for key, value in [("mode", "eval"), ("data.data_dir", "/elsewhere"),
                     ("checkpoint.every_steps", 7), ("mesh.num_devices", 1),
                     ("eval.baselines", ()), ("train.log_every", 3),
                     ("train.steps_per_call", 1)]:  # fmt: skip
    changed = _load("demo").get_config()
    engine_helpers.set_key(changed, key, value)
    assert run_config.fingerprint(changed) == base, key
  for key, value in [("train.steps", 7), ("seed", 3), ("episodes.shots", 2),
                     ("data.num_views", 2), ("model.fusion", "gated")]:  # fmt: skip
    changed = _load("demo").get_config()
    engine_helpers.set_key(changed, key, value)
    assert run_config.fingerprint(changed) != base, key


@pytest.mark.parametrize("name", NAMES)
def test_feature_cache_fits_its_budget(name):
  config = _load(name).get_config()
  dims = run_config.backbone_dims(config)
  if config.backbone.name == "tiny":
    projection = clip.tiny_config().projection_dim
  else:
    projection = clip.openai_config("ViT-L/14@336").projection_dim
  grid = dims["image_size"] // dims["patch_size"]
  sizes = types.SimpleNamespace(
      embed_dim=projection, grid_size=grid, image_size=dims["image_size"]
  )
  images = max(
      DATASET_IMAGES[config.data.name],
      DATASET_IMAGES.get(config.data.test_name, 0),
  )
  # Worst case: every image is also a support image with all its views.
  rows = images * config.data.num_views
  need = features.estimate_bytes(
      rows, sizes, len(config.model.layers), config.cache.dtype
  )
  assert need <= config.cache.memory_budget_gb * 2**30, (
      name,
      features.format_bytes(need),
  )


def test_full_size_busi_step_shapes():
  """ViT-L/14@336 shapes through init, train_step and predict_step."""
  config = _load("busi").get_config()
  cfg = model.ModelConfig.from_dict(config.model)
  vision = clip.openai_config("ViT-L/14@336")
  params = jax.eval_shape(
      functools.partial(clip.init_params, vision), jax.random.key(0)
  )
  backbone = clip.Backbone(config=vision, params=params)
  cfg.validate(backbone)
  run_config.validate_against_backbone(config, backbone)

  e = 2  # the episode axis is vmapped: its size does not change the shapes
  s = config.episodes.shots * 3 * config.data.num_views
  rows = 780 + s
  num_layers, n, d = len(cfg.layers), backbone.grid_size**2, backbone.embed_dim
  size = backbone.image_size
  f32, i32 = jnp.float32, jnp.int32
  sds = jax.ShapeDtypeStruct
  cache = (
      sds((rows, d), jnp.bfloat16),
      sds((num_layers, rows, n, d), jnp.bfloat16),
      sds((rows, size, size), jnp.uint8),
  )
  ep_data = {
      "rows": sds((e, s), i32),
      "labels": sds((e, s), i32),
      "group": sds((e, s), i32),
      "text_embed": sds((e, s, d), f32),
  }
  tx = train.make_optimizer(config.train)

  def init_one(key, ep, cache_arrays, clip_params):
    support = train.gather_support(cache_arrays, ep)
    p = model.init(key, cfg, backbone, clip_params, support)
    return p, tx.init(p), model.frozen(cfg, backbone, clip_params, support)

  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), e))
  p, opt, frozen = jax.eval_shape(
      jax.vmap(init_one, in_axes=(0, 0, None, None)),
      keys,
      ep_data,
      cache,
      params,
  )
  state = {"params": p, "opt": opt, "step": sds((), i32)}
  new_state, metrics = jax.eval_shape(
      functools.partial(train.train_step, tx=tx, cfg=cfg, backbone=backbone),
      state,
      ep_data,
      frozen,
      cache,
      params,
      jax.eval_shape(lambda: jax.random.key(0)),
  )
  # The state keeps its structure, shapes and dtypes across a step.
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert (old.shape, old.dtype) == (new.shape, new.dtype)
  assert {"loss", "grad_norm"} <= set(metrics)
  assert all(m.shape == (e,) for m in metrics.values())

  b = config.eval.batch_size
  preds = jax.eval_shape(
      functools.partial(
          train.predict_step, cfg=cfg, backbone=backbone, method="ultraad"
      ),
      p,
      frozen,
      ep_data,
      cache,
      sds((b, d), jnp.bfloat16),
      sds((num_layers, b, n, d), jnp.bfloat16),
      params,
  )
  assert preds.maps.shape == (e, b, size, size)
  assert preds.image_score.shape == (e, b)
  assert preds.class_probs.shape == (e, b, 3)
