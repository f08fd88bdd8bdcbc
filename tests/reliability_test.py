"""Reliability of the engine (issue 7): every failure mode proved by a test.

1. Data: too few images for the shots, an empty class (file-level problems
   are in datasets_test.py and data_test.py).
2. Config: rejected before anything is loaded or compiled, naming the key;
   also through main.py on the command line.
3. Numerics: NaN/Inf stops training with TrainingDiverged naming the step,
   the episodes and the last good checkpoint, which stays restorable.
4. Interruption: SIGTERM/SIGINT stop cleanly at a saved step; SIGKILL during
   training and during evaluation, and half-written checkpoints, all resume
   to results identical to an uninterrupted run (main.py subprocesses).
5. Determinism: the same seed gives identical results (here after every
   interruption; a plain rerun is in train_test.py); other seeds other shots.
6. Resources: the feature cache's size is estimated and refused before any
   extraction.
7. Weights whose config.json does not match them (wrong patch size, wrong
   widths) are refused by clip.load: covered by
   clip_test.py::test_config_that_does_not_match_weights.
"""

import json
import pathlib
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

import engine_helpers
from engine_helpers import tiny_config
from ultraad_jax import checkpoint as ckpt_lib
from ultraad_jax import clip
from ultraad_jax import features
from ultraad_jax import train


class _Reached(Exception):
  """Raised by a stand-in to prove the engine got that far."""


# ---------------------------------------------------------------------------
# 1. Data.
# ---------------------------------------------------------------------------
def test_too_few_images_for_the_shots_names_both_numbers(data_dir, tmp_path):
  before = dict(train.TRACE_COUNTS)
  with pytest.raises(ValueError, match="episodes.shots") as err:
    train.train_and_evaluate(
        tiny_config(data_dir, {"episodes.shots": 13}), str(tmp_path)
    )
  message = str(err.value)
  assert "13" in message and "has 12" in message  # asked, and available
  assert train.TRACE_COUNTS == before
  assert not (tmp_path / "shots.json").exists()


def _write_busi(root, counts):
  """A BUSI-layout folder with `counts[class]` tiny images per class."""
  rng = np.random.default_rng(0)
  for name, count in counts.items():
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(1, count + 1):
      image = rng.integers(0, 256, (40, 48), dtype=np.uint8)
      Image.fromarray(image).save(folder / f"{name} ({i}).png")
      mask = np.zeros((40, 48), np.uint8)
      if name != "normal":
        mask[10:20, 12:30] = 255
      Image.fromarray(mask).save(folder / f"{name} ({i})_mask.png")
  return root


def test_empty_class_is_reported(tmp_path):
  manual = _write_busi(
      tmp_path / "Dataset_BUSI_with_GT",
      {"normal": 3, "benign": 3, "malignant": 0},
  )
  config = tiny_config(tmp_path / "tfds", {"episodes.shots": 1})
  config.data.name = "busi"
  config.data.manual_dir = str(manual)
  config.data.options = ml_collections.ConfigDict()
  with pytest.raises(ValueError, match="malignant") as err:
    train.train_and_evaluate(config, str(tmp_path / "work"))
  assert "has 0" in str(err.value)
  assert "episodes.shots" in str(err.value)


# ---------------------------------------------------------------------------
# 2. Config.
# ---------------------------------------------------------------------------
def _unknown_key(c):
  c.train.learning_rat = 0.1


def _wrong_type(c):
  # ConfigDict refuses the assignment itself (next test); a config built
  # some other way reaches validate.
  c.train = ml_collections.ConfigDict({**c.train.to_dict(), "steps": "ten"})


def _unknown_model_key(c):
  c.model.fusoin = "gated"


BAD_CONFIGS = {
    "unknown_key": (_unknown_key, "config.train.learning_rat"),
    "wrong_type": (_wrong_type, "config.train.steps='ten'"),
    "unknown_model_key": (_unknown_model_key, "fusoin"),
    "zero_shots": ({"episodes.shots": 0}, "config.episodes.shots=0"),
    "negative_shots": ({"episodes.shots": -2}, "config.episodes.shots=-2"),
    "layer_missing": ({"model.layers": (1, 9)}, "config.model.layers"),
    "layer_zero": ({"model.layers": (0, 2)}, "config.model.layers"),
    "size_not_patch_multiple": (
        {"backbone.image_size": 36},
        "config.backbone.image_size=36",
    ),
    "too_many_devices": ({"mesh.num_devices": 16}, "config.mesh.num_devices"),
    "unknown_precision": (
        {"precision.frozen": "fp32"},
        "config.precision.frozen='fp32'",
    ),
    "episodes_not_divisible": (
        {"mesh.num_devices": 2, "episodes.num_episodes": 3},
        "config.episodes.num_episodes=3",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_rejected_before_anything_runs(
    case, data_dir, tmp_path, monkeypatch
):
  change, key = BAD_CONFIGS[case]
  config = tiny_config(data_dir)
  if callable(change):
    change(config)
  else:
    for name, value in change.items():
      engine_helpers.set_key(config, name, value)

  def reached(*args, **kwargs):
    raise _Reached("config accepted: the engine went on to build the backbone")

  monkeypatch.setattr(train, "build_backbone", reached)
  before = dict(train.TRACE_COUNTS)
  workdir = tmp_path / "work"
  with engine_helpers.compile_events() as events:
    with pytest.raises(ValueError) as err:
      train.train_and_evaluate(config, str(workdir))
  assert key in str(err.value)
  # Nothing traced or compiled, no backbone, not even the workdir.
  assert events == []
  assert train.TRACE_COUNTS == before
  assert not workdir.exists()


def test_config_dict_refuses_wrong_types():
  config = tiny_config("unused")
  with pytest.raises(TypeError, match="steps"):
    config.train.steps = "ten"


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--config.episodes.shots=0", "config.episodes.shots=0"),
        ("--config.nonexistent=1", "nonexistent"),
    ],
    ids=["zero_shots", "unknown_key"],
)
def test_command_line_rejects_bad_config(flag, words, data_dir, tmp_path):
  workdir = tmp_path / "work"
  code, log = engine_helpers.run_main(
      engine_helpers.main_flags(data_dir) + [flag, f"--workdir={workdir}"],
      tmp_path / "log.txt",
  )
  assert code != 0
  assert words in log
  assert not workdir.exists()


# ---------------------------------------------------------------------------
# 3. Numerics.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("steps_per_call", [1, 0])
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch, steps_per_call
):
  # At step 3 the parameters of episode 1 turn NaN (so its loss and
  # gradients do) and episode 0 reports an infinite gradient norm. Step 3 is
  # neither logged nor saved. One step a call, its check is the deferred
  # one, made while step 4 runs, before anything is saved. With steps 3 and
  # 4 in one call (which ends at the checkpoint of step 4), the check of
  # that call's rows finds step 3 before step 4 is saved.
  step_fn = train.train_step

  def poisoned(state, *args, **kwargs):
    bad_step = state["step"] + 1 == 3
    num = jax.tree.leaves(state["params"])[0].shape[0]
    episode = jnp.arange(num)

    def poison(x):
      if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
      hit = (bad_step & (episode == 1)).reshape((-1,) + (1,) * (x.ndim - 1))
      return jnp.where(hit, jnp.nan, x)

    state = {**state, "params": jax.tree.map(poison, state["params"])}
    state, metrics = step_fn(state, *args, **kwargs)
    metrics = dict(metrics)
    metrics["grad_norm"] = jnp.where(
        bad_step & (episode == 0), jnp.inf, metrics["grad_norm"]
    )
    return state, metrics

  monkeypatch.setattr(train, "train_step", poisoned)
  config = tiny_config(
      data_dir,
      {
          "train.steps": 6,
          "checkpoint.every_steps": 2,
          "train.log_every": 100,
          "train.steps_per_call": steps_per_call,
      },
  )
  with pytest.raises(train.TrainingDiverged) as err:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(err.value)
  assert "at step 3" in message
  assert "episode(s) [0, 1]" in message
  assert "checkpoint is step 2" in message
  assert str(tmp_path / "checkpoints") in message
  assert not (tmp_path / "results.json").exists()

  # Step 2 is intact and restorable; nothing later was saved.
  assert engine_helpers.complete_steps(tmp_path) == [2]
  assert ckpt_lib.Checkpointer(tmp_path / "checkpoints").latest_step() == 2
  state = ocp.StandardCheckpointer().restore(
      tmp_path / "checkpoints" / "2" / "state"
  )
  assert int(state["step"]) == 2
  leaves = jax.tree.leaves(state["params"])
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


# ---------------------------------------------------------------------------
# 4. Interruption.
# ---------------------------------------------------------------------------
# 100 steps with a checkpoint every 10: a few seconds of training, long
# enough to signal a run between two checkpoints. Two baselines keep the
# evaluation busy after UltraAD's own, for the kill during evaluation.
CHAIN = {
    "train.steps": 100,
    "train.warmup_steps": 5,
    "train.log_every": 10,
    "checkpoint.every_steps": 10,
    "checkpoint.max_to_keep": 3,
    "eval.baselines": ("zero_shot", "center_prior"),
}


def _stopped_at(log):
  found = re.findall(r"Stopped at step (\d+)", log)
  assert len(found) == 1, log[-3000:]
  return int(found[0])


def _resumed_from(log):
  found = re.findall(r"Resumed from step (\d+)", log)
  assert len(found) == 1, log[-3000:]
  return int(found[0])


def _plant_half_written(workdir, source_step, step):
  """Leaves what a write killed half-way (or a broken copy) would leave.

  A step folder without its commit marker and with its arrays cut short,
  and an orbax temporary folder of the step after it.
  """
  ckpts = workdir / "checkpoints"
  broken = ckpts / str(step)
  shutil.copytree(ckpts / str(source_step), broken)
  (broken / engine_helpers.COMMIT_MARKER).unlink()
  for path in (broken / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 16:
      path.write_bytes(path.read_bytes()[:16])
  tmp = ckpts / f"{step + 10}.orbax-checkpoint-tmp"
  shutil.copytree(ckpts / str(source_step), tmp)
  shutil.rmtree(tmp / "state")


def test_interruptions_resume_to_identical_results(data_dir, tmp_path):
  flags = engine_helpers.main_flags(data_dir, CHAIN)
  total = CHAIN["train.steps"]

  # The uninterrupted reference.
  code, log = engine_helpers.run_main(
      flags + [f"--workdir={tmp_path / 'reference'}"], tmp_path / "ref.log"
  )
  assert code == 0, log[-3000:]
  reference = engine_helpers.results_text(tmp_path / "reference")

  workdir = tmp_path / "work"
  args = flags + [f"--workdir={workdir}"]

  def latest():
    steps = engine_helpers.complete_steps(workdir)
    return steps[-1] if steps else 0

  # SIGTERM, then SIGINT: the step in progress finishes, is saved, exit 0.
  reached = 0
  for number, signum in enumerate((signal.SIGTERM, signal.SIGINT)):
    run = engine_helpers.MainRun(args, tmp_path / f"run{number}.log")
    start = reached
    run.wait_until(lambda: latest() > start, f"a checkpoint after {start}")
    run.send(signum)
    code = run.finish()
    log = run.log()
    assert code == 0, log[-3000:]
    if number:
      assert _resumed_from(log) == reached
    reached = _stopped_at(log)
    assert start < reached < total
    assert latest() == reached  # saved at the step reached
    assert engine_helpers.metric_steps(workdir)[-1] == reached
    assert not (workdir / "results.json").exists()

  # SIGKILL during training: nothing is saved on the way out.
  run = engine_helpers.MainRun(args, tmp_path / "run2.log")
  start = reached
  run.wait_until(lambda: latest() > start, f"a checkpoint after {start}")
  assert run.kill() == -signal.SIGKILL
  reached = latest()
  assert start < reached < total
  assert not (workdir / "results.json").exists()

  # What a kill during a checkpoint write (or a broken copy) leaves behind
  # must never be loaded.
  _plant_half_written(workdir, reached, reached + 10)

  # SIGKILL during evaluation: once the last checkpoint is complete, the run
  # evaluates three methods (about a second here) before writing results.
  run = engine_helpers.MainRun(args, tmp_path / "run3.log")
  run.wait_until(lambda: latest() == total, "the last checkpoint")
  assert run.kill() == -signal.SIGKILL
  log = run.log()
  assert not (workdir / "results.json").exists(), "killed too late"
  assert _resumed_from(log) == reached
  assert f"{reached + 10} has no commit_success.txt" in log

  # The last run only evaluates the final checkpoint.
  code, log = engine_helpers.run_main(args, tmp_path / "run4.log")
  assert code == 0, log[-3000:]
  assert _resumed_from(log) == total
  assert engine_helpers.results_text(workdir) == reference


def test_signal_at_any_point_of_a_step_saves_the_step_it_stops_at(tmp_path):
  # The signal lands after the step's "is this the last step?" decision (in
  # the validation call), where a second read of the flag would end the loop
  # on an unsaved step. The loop must run one more step and save that one.
  os_kill_at = 3

  def step_fn(state, *args):
    assert int(args[-1]) == 1  # validation after every step: a step a call
    step = state["step"] + 1
    return {**state, "step": step}, {
        "loss": jnp.ones((1, 2)),
        "grad_norm": jnp.ones((1, 2)),
    }

  def val_fn(state, *args):
    del args
    if int(state["step"]) == os_kill_at:
      signal.raise_signal(signal.SIGTERM)
    return state, jnp.zeros(2)

  config = ml_collections.ConfigDict(
      {
          "profile_steps": 0,
          "train": {"val_every": 1, "log_every": 100},
          "checkpoint": {"every_steps": 100},
      }
  )
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  state = {"w": jnp.zeros(3), "step": jnp.int32(0)}
  state, stopped_early = train._train_loop(  # pylint: disable=protected-access
      state,
      step_fn,
      val_fn,
      (None,) * 5,
      None,
      checkpointer=checkpointer,
      config=config,
      workdir=str(tmp_path),
      fingerprint="f",
      start_step=0,
      lengths=[1] * 10,
  )
  checkpointer.close()
  assert stopped_early
  assert int(state["step"]) == os_kill_at + 1
  assert engine_helpers.complete_steps(tmp_path) == [os_kill_at + 1]


def test_half_written_checkpoints_are_never_loaded(tmp_path):
  folder = tmp_path / "checkpoints"
  state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
  checkpointer = ckpt_lib.Checkpointer(folder, max_to_keep=5)
  for step in (1, 2):
    checkpointer.save(step, {**state, "step": jnp.int32(step)}, {"step": step})
  checkpointer.close()
  # Step 3 lost its marker and data; step 4 never left its temporary folder.
  shutil.copytree(folder / "2", folder / "3")
  (folder / "3" / engine_helpers.COMMIT_MARKER).unlink()
  shutil.rmtree(folder / "3" / "state")
  shutil.copytree(folder / "2", folder / "4.orbax-checkpoint-tmp")

  checkpointer = ckpt_lib.Checkpointer(folder, max_to_keep=5)
  assert checkpointer.latest_step() == 2
  restored, meta = checkpointer.restore(2, state)
  assert int(restored["step"]) == 2 and meta == {"step": 2}
  [moved] = checkpointer.moved_aside
  assert pathlib.Path(moved).name.startswith("3.incomplete")
  # Training on writes steps 3 and 4 for real.
  for step in (3, 4):
    checkpointer.save(step, {**state, "step": jnp.int32(step)}, {"step": step})
  assert checkpointer.latest_step() == 4
  restored, _ = checkpointer.restore(3, state)
  assert int(restored["step"]) == 3
  checkpointer.close()


# ---------------------------------------------------------------------------
# 5. Determinism (shot lists; identical results: see the test above and
# train_test.py).
# ---------------------------------------------------------------------------
def _shots_of(config, workdir, monkeypatch):
  """shots.json of a run stopped right after the episodes are drawn."""

  def stop(*args, **kwargs):
    raise _Reached("feature extraction")

  monkeypatch.setattr(train.features, "build", stop)
  with pytest.raises(_Reached):
    train.train_and_evaluate(config, str(workdir))
  return json.loads((workdir / "shots.json").read_text())["episodes"]


def test_seed_changes_the_shot_lists(data_dir, tmp_path, monkeypatch):
  shots = {
      seed: _shots_of(
          tiny_config(data_dir, {"episodes.seed": seed}),
          tmp_path / str(seed),
          monkeypatch,
      )
      for seed in (0, 1)
  }
  assert len(shots[0]) == len(shots[1]) == 2
  for a, b in zip(shots[0], shots[1]):
    assert len(a["support_ids"]) == len(b["support_ids"]) == 6
  assert [e["support_ids"] for e in shots[0]] != [
      e["support_ids"] for e in shots[1]
  ]


# ---------------------------------------------------------------------------
# 6. Resources.
# ---------------------------------------------------------------------------
def test_memory_budget_stops_before_extraction(data_dir, tmp_path, monkeypatch):
  calls = []
  encode = clip.Backbone.encode_image

  def counting(self, *args, **kwargs):
    calls.append(1)
    return encode(self, *args, **kwargs)

  monkeypatch.setattr(clip.Backbone, "encode_image", counting)
  config = tiny_config(data_dir, {"cache.memory_budget_gb": 1e-6})
  with pytest.raises(MemoryError, match="cache.memory_budget_gb") as err:
    train.train_and_evaluate(config, str(tmp_path))
  assert calls == []  # no image went through the backbone
  message = str(err.value)
  found = re.search(r"needs ([\d.]+) MiB \((\d+) bytes: (\d+) rows", message)
  assert found, message
  mib, need, rows = float(found[1]), int(found[2]), int(found[3])
  # 36 images, plus 1 extra view of each distinct support image (2 episodes
  # of 6 support images each).
  assert 36 + 6 <= rows <= 36 + 12
  # Per row: float32 global embedding and 4 layers x 16 patches x 64 dims,
  # plus a 32 x 32 uint8 mask.
  assert need == rows * (4 * 64 * (1 + 4 * 16) + 32 * 32)
  assert features.format_bytes(need) == f"{mib:.2f} MiB"
