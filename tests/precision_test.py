"""The precision switches reach the programs they govern.

CPUs compute f32 products in f32 whatever the precision, so the numbers
cannot show it here; what is checked is the precision each program is traced
under (the frozen CLIP's one-off passes) and the operand precision in the
compiled train step's HLO (the head).
"""

import re

import jax

import engine_helpers
from engine_helpers import tiny_config
from ultraad_jax import features
from ultraad_jax import model
from ultraad_jax import train


def _recording(calls, name, fn):
  def wrapper(*args, **kwargs):
    calls.append((name, jax.config.jax_default_matmul_precision))
    return fn(*args, **kwargs)

  return wrapper


def test_frozen_passes_and_head_run_at_their_own_precision(
    data_dir, tmp_path, monkeypatch
):
  calls = []
  monkeypatch.setattr(
      features, "build", _recording(calls, "features", features.build)
  )
  monkeypatch.setattr(
      model,
      "encode_descriptions",
      _recording(calls, "descriptions", model.encode_descriptions),
  )
  config = tiny_config(
      data_dir,
      {
          "precision.frozen": "float32",
          "precision.head": "tensorfloat32",
          "dump_hlo": True,
          "train.steps": 1,
          "checkpoint.every_steps": 1,
      },
  )
  train.train_and_evaluate(config, str(tmp_path))

  assert {name for name, _ in calls} == {"features", "descriptions"}
  assert all(p == "float32" for _, p in calls), calls
  # After the frozen passes, the head's precision again.
  hlo = (tmp_path / "hlo" / "train_step.txt").read_text()
  found = re.findall(r"operand_precision=\{(\w+),(\w+)\}", hlo)
  # The prompt text tower, the fusion and the read-out: TF32 ("high"). The
  # only f32 ("highest") products are the maps' bilinear upsampling, which
  # sets its precision itself (maps.py).
  assert ("high", "high") in found
  assert set(found) <= {("high", "high"), ("highest", "highest")}
  assert engine_helpers.complete_steps(tmp_path) == [1]


def test_default_head_precision_leaves_the_platform_default(data_dir, tmp_path):
  config = tiny_config(data_dir, {"dump_hlo": True, "train.steps": 1})
  assert config.precision.frozen == "float32"
  assert config.precision.head == "default"
  train.train_and_evaluate(config, str(tmp_path))
  hlo = (tmp_path / "hlo" / "train_step.txt").read_text()
  found = set(re.findall(r"operand_precision=\{(\w+),(\w+)\}", hlo))
  assert ("high", "high") not in found
