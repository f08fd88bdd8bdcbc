"""End-to-end tests of the engine, ultraad_jax.train.train_and_evaluate.

Every run uses the tiny config of engine_helpers (32 px phantom, 32 px tiny
CLIP, a few steps). One trained workdir (8 episodes on 1 device, 3 steps,
a checkpoint every step) is shared by the tests that only read it or copy it.
The metrics themselves are checked against scikit-learn in metrics_test.py.
"""

import json
import logging
import shutil

import jax
import ml_collections
import numpy as np
import pytest

import engine_helpers
from engine_helpers import tiny_config
from ultraad_jax import evaluation
from ultraad_jax import report
from ultraad_jax import train

# 8 episodes so that the same config also runs on 8 devices; one baseline so
# that results.json has a "baselines" block.
BASE = {
    "episodes.num_episodes": 8,
    "eval.baselines": ("center_prior",),
}


def test_gather_support_reads_each_layer_of_each_row():
  rng = np.random.default_rng(0)
  cache = (rng.normal(size=(7, 3)), rng.normal(size=(4, 7, 5, 3)),
           rng.integers(0, 2, size=(7, 6, 6)).astype(np.uint8))  # fmt: skip
  on_device = tuple(jax.numpy.asarray(a) for a in cache)
  rows = np.asarray([[6, 0, 3], [2, 2, 5]], np.int32)
  ep = {"rows": rows, "labels": rows * 0, "group": rows, "text_embed": rows}
  # Vmapped over episodes, as in the train step.
  got = jax.jit(jax.vmap(lambda e: train.gather_support(on_device, e)))(ep)
  for e in range(2):
    np.testing.assert_array_equal(got.patch_tokens[e],
                                  cache[1][:, rows[e]].astype(np.float32))  # fmt: skip
    np.testing.assert_array_equal(got.global_embed[e],
                                  cache[0][rows[e]].astype(np.float32))  # fmt: skip
    np.testing.assert_array_equal(got.masks[e], cache[2][rows[e]])


def test_step_cost_log_names_flops_bytes_and_temporaries(caplog):
  x = jax.numpy.ones((128, 128), jax.numpy.float32)
  compiled = jax.jit(lambda a: (a @ a) @ a).lower(x).compile()
  with caplog.at_level(logging.INFO):
    train._log_cost("demo_step", compiled, loops=4)
  lines = [
      r.getMessage() for r in caplog.records if "demo_step" in r.getMessage()
  ]
  flops = next(l for l in lines if "FLOPs" in l)
  # Two 128^3 products, 2 FLOPs per multiply-add, scaled by the 4 loops.
  assert float(flops.split(": ")[1].split(" FLOPs")[0]) == pytest.approx(
      4 * 2 * 2 * 128**3, rel=0.01
  )
  assert "x 4 episode chunks" in flops
  temp = next(l for l in lines if "temporaries" in l)
  # a @ a is a temporary of 64 KiB at least (the log keeps 3 digits).
  logged = float(temp.split(": ")[1].split(" GB")[0])
  assert logged >= 0.999 * 128 * 128 * 4 / 1e9


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A finished run of BASE (checkpoints 1, 2, 3), built once per session.

  Returns:
    The workdir's pathlib.Path; traces.json beside it holds how often the
    train step was traced during the run.
  """

  def build(path):
    before = train.TRACE_COUNTS["train_steps"]
    train.train_and_evaluate(tiny_config(data_dir, BASE), str(path / "work"))
    traces = train.TRACE_COUNTS["train_steps"] - before
    (path / "traces.json").write_text(json.dumps({"train_steps": traces}))

  return engine_helpers.shared_path(tmp_path_factory, "trained", build) / "work"


def _copy(workdir, tmp_path):
  """A private copy of a workdir, so a test never changes a shared one."""
  target = tmp_path / "work"
  shutil.copytree(workdir, target)
  return target


def _drop_outputs(workdir):
  """Removes what evaluation writes, so a rerun must write it again."""
  (workdir / "results.json").unlink()
  (workdir / "results.md").unlink()
  shutil.rmtree(workdir / "figures")


def test_run_writes_every_report_file(trained):
  config = json.loads((trained / "config.json").read_text())
  assert config["episodes"]["num_episodes"] == 8
  assert config["data"]["data_dir"]

  shots = json.loads((trained / "shots.json").read_text())
  assert len(shots["episodes"]) == 8
  for episode in shots["episodes"]:
    assert len(episode["support_ids"]) == 3 * 2  # 2 shots of 3 classes

  lines = [
      json.loads(l) for l in (trained / "metrics.jsonl").read_text().split("\n")
      if l
  ]  # fmt: skip
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert all(np.isfinite(l["loss"]) for l in lines)
  events = list(trained.glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().st_size > 0

  results = json.loads((trained / "results.json").read_text())
  for key in ("setting", "shots", "num_episodes", "dataset", "backbone",
              "episodes", "summary", "baselines", "timing"):  # fmt: skip
    assert key in results, key
  assert (results["setting"], results["shots"]) == ("per_class", 2)
  assert results["num_episodes"] == 8 and results["backbone"] == "tiny"
  assert results["dataset"].startswith("us_phantom")
  assert [e["index"] for e in results["episodes"]] == list(range(8))
  for episode in results["episodes"]:
    assert episode["seed"] == 0
    assert set(episode["metrics"]) >= {"image_auroc", "pixel_auroc"}
  for metric in ("image_auroc", "pixel_auroc", "cls_accuracy"):
    assert {"mean", "std", "ci95"} <= set(results["summary"][metric])
  assert set(results["baselines"]) == {"center_prior"}
  assert "summary" in results["baselines"]["center_prior"]

  table = (trained / "results.md").read_text()
  assert "| Metric | UltraAD |" in table and "| Image AUROC |" in table
  figures = sorted(p.name for p in (trained / "figures").glob("*.png"))
  assert figures, "no figures written"
  for name in figures:
    with open(trained / "figures" / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  assert engine_helpers.complete_steps(trained) == [1, 2, 3]


def test_train_step_compiles_once(trained):
  # Three steps (and a checkpoint after each, so a call per step), one trace
  # of the compiled call.
  traces = json.loads((trained.parent / "traces.json").read_text())
  assert traces == {"train_steps": 1}


def test_same_seed_gives_identical_results(trained, data_dir, tmp_path):
  train.train_and_evaluate(tiny_config(data_dir, BASE), str(tmp_path))
  assert engine_helpers.results_text(tmp_path) == engine_helpers.results_text(
      trained
  )
  assert (tmp_path / "shots.json").read_bytes() == (
      trained / "shots.json"
  ).read_bytes()


def test_resume_after_a_lost_checkpoint_matches_uninterrupted_run(
    trained, data_dir, tmp_path
):
  # As if the run had stopped after step 2: its last checkpoint and every
  # output of evaluation are gone.
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "3")
  _drop_outputs(workdir)
  train.train_and_evaluate(tiny_config(data_dir, BASE), str(workdir))
  assert engine_helpers.results_text(workdir) == engine_helpers.results_text(
      trained
  )
  # Resumed at step 2: only step 3 was trained (and logged) again.
  assert engine_helpers.metric_steps(workdir) == [1, 2, 3, 3]
  assert engine_helpers.complete_steps(workdir) == [1, 2, 3]


def test_resume_refuses_a_different_config(trained, data_dir, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = tiny_config(data_dir, {**BASE, "train.learning_rate": 1e-2})
  with pytest.raises(ValueError, match="different config") as err:
    train.train_and_evaluate(config, str(workdir))
  assert str(workdir / "checkpoints") in str(err.value)
  assert engine_helpers.complete_steps(workdir) == [1, 2, 3]
  assert engine_helpers.metric_steps(workdir) == [1, 2, 3]


def test_eval_mode_reproduces_results(trained, data_dir, tmp_path):
  workdir = _copy(trained, tmp_path)
  _drop_outputs(workdir)
  before = train.TRACE_COUNTS["train_steps"]
  train.train_and_evaluate(
      tiny_config(data_dir, {**BASE, "mode": "eval"}), str(workdir)
  )
  assert train.TRACE_COUNTS["train_steps"] == before  # nothing trained
  assert engine_helpers.results_text(workdir) == engine_helpers.results_text(
      trained
  )
  assert engine_helpers.metric_steps(workdir) == [1, 2, 3]


def test_chunked_evaluation_matches_one_chunk(trained, data_dir, tmp_path):
  # A tiny host budget forces evaluation one episode at a time; the trained
  # run evaluated all 8 at once. Only float rounding of the differently
  # batched programs may differ.
  workdir = _copy(trained, tmp_path)
  _drop_outputs(workdir)
  train.train_and_evaluate(
      tiny_config(
          data_dir, {**BASE, "mode": "eval", "eval.memory_budget_gb": 1e-9}
      ),
      str(workdir),
  )
  ours = report.read_results(str(workdir))
  ref = report.read_results(str(trained))
  for block, ref_block in [(ours, ref)] + [
      (ours["baselines"][k], ref["baselines"][k]) for k in ref["baselines"]
  ]:
    for mine, theirs in zip(block["episodes"], ref_block["episodes"]):
      assert mine["metrics"].keys() == theirs["metrics"].keys()
      for name, value in theirs["metrics"].items():
        np.testing.assert_allclose(
            mine["metrics"][name], value, atol=1e-5, err_msg=name
        )


def test_eval_mode_without_checkpoint_fails_clearly(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="mode=eval") as err:
    train.train_and_evaluate(
        tiny_config(data_dir, {**BASE, "mode": "eval"}), str(tmp_path)
    )
  assert str(tmp_path / "checkpoints") in str(err.value)
  assert "mode=train" in str(err.value)
  assert not (tmp_path / "results.json").exists()


def test_eight_devices_match_one(trained, data_dir, tmp_path):
  config = tiny_config(data_dir, {**BASE, "mesh.num_devices": 8})
  results = train.train_and_evaluate(config, str(tmp_path))
  reference = json.loads((trained / "results.json").read_text())
  assert (tmp_path / "shots.json").read_bytes() == (
      trained / "shots.json"
  ).read_bytes()
  assert len(results["episodes"]) == len(reference["episodes"]) == 8
  for ours, ref in zip(results["episodes"], reference["episodes"]):
    assert ours["metrics"].keys() == ref["metrics"].keys()
    for name, value in ref["metrics"].items():
      np.testing.assert_allclose(
          ours["metrics"][name], value, atol=1e-5, err_msg=name
      )
  losses = [
      [
          json.loads(l)["loss"]
          for l in (w / "metrics.jsonl").read_text().split("\n")
          if l
      ]
      for w in (tmp_path, trained)
  ]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_cross_dataset_queries_every_test_image(
    data_dir, tmp_path, monkeypatch
):
  seen = []
  score = evaluation.episode_metrics

  def spy(preds, labels, masks, query_mask, **kwargs):
    seen.append((np.asarray(labels), np.asarray(query_mask), preds))
    return score(preds, labels, masks, query_mask, **kwargs)

  monkeypatch.setattr(evaluation, "episode_metrics", spy)
  config = tiny_config(data_dir, {**BASE, "train.steps": 1})
  config.data.test_name = "us_phantom"
  config.data.test_options = ml_collections.ConfigDict(
      engine_helpers.CROSS_PHANTOM
  )
  results = train.train_and_evaluate(config, str(tmp_path))

  num_test = 3 * engine_helpers.CROSS_PHANTOM["n_per_class"]
  assert len(seen) == 2  # UltraAD and the baseline
  (labels, query_mask, preds), baseline = seen
  np.testing.assert_array_equal(baseline[1], query_mask)
  assert labels.shape == (num_test,)
  np.testing.assert_array_equal(np.bincount(labels), [5, 5, 5])
  # Every test image is a query of every episode: none is a support image.
  assert query_mask.shape == (8, num_test) and query_mask.all()
  assert preds["image_score"].shape == (8, num_test)
  assert len(results["episodes"]) == 8
  for episode in results["episodes"]:
    assert np.isfinite(episode["metrics"]["image_auroc"])
  # The support set still comes from the training phantom (36 images).
  shots = json.loads((tmp_path / "shots.json").read_text())
  assert len(shots["episodes"]) == 8
  assert shots["meta"]["dataset"] == "us_phantom/all"


def _numbers(tree, path=""):
  """{path: value} of every number in a results tree."""
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items()
            for k, v in _numbers(sub, f"{path}/{key}").items()}  # fmt: skip
  if isinstance(tree, list):
    return {k: v for i, sub in enumerate(tree)
            for k, v in _numbers(sub, f"{path}/{i}").items()}  # fmt: skip
  if isinstance(tree, (int, float)) and not isinstance(tree, bool):
    return {path: float(tree)}
  return {}


def _assert_close_results(got_dir, want_dir):
  got = _numbers(report.read_results(str(got_dir)))
  want = _numbers(report.read_results(str(want_dir)))
  assert got.keys() == want.keys()
  assert len(want) > 50  # every metric of every episode, not an empty file
  for key, value in want.items():
    # Float reassociation only: the episodes' math is the same.
    np.testing.assert_allclose(got[key], value, atol=1e-3, err_msg=key)


def test_several_steps_per_call_log_save_and_validate_as_one_per_call(
    data_dir, tmp_path, caplog
):
  # Host events after steps 1, 4 and 8 (log lines, checkpoints, early
  # stopping's validation): calls of 1, 3 and 4 steps, against 8 calls of
  # one step.
  schedule = {"train.steps": 8, "train.log_every": 4,
              "checkpoint.every_steps": 4, "train.val_fraction": 0.5,
              "train.val_every": 4}  # fmt: skip
  for steps_per_call in (0, 1):
    workdir = tmp_path / str(steps_per_call)
    config = tiny_config(
        data_dir, {**schedule, "train.steps_per_call": steps_per_call}
    )
    with caplog.at_level(logging.INFO):
      caplog.clear()
      train.train_and_evaluate(config, str(workdir))
    called = "up to 4 steps per compiled call" in caplog.text
    assert called == (steps_per_call == 0)
    # A log line after step 1; a validation and a log line after 4 and 8.
    assert engine_helpers.metric_steps(workdir) == [1, 4, 4, 8, 8]
    assert engine_helpers.complete_steps(workdir) == [4, 8]
  _assert_close_results(tmp_path / "0", tmp_path / "1")


def test_profile_steps_trace_each_profiled_step_in_its_own_slice(
    data_dir, tmp_path
):
  import gzip  # pylint: disable=g-import-not-at-top

  # Events after steps 1 and 8; steps 3 and 4 profiled (after 2 warm-up
  # steps): calls of 1, 1, 1, 1 and 4 steps.
  config = tiny_config(
      data_dir,
      {"train.steps": 8, "train.log_every": 8, "checkpoint.every_steps": 8,
       "profile_steps": 2, "dump_hlo": True},
  )  # fmt: skip
  train.train_and_evaluate(config, str(tmp_path))
  [trace] = (tmp_path / "profile").glob("plugins/profile/*/*.trace.json.gz")
  with gzip.open(trace, "rt") as f:
    events = json.load(f)["traceEvents"]
  slices = [e["args"] for e in events if e.get("name") == "train"]
  assert slices == [{"step_num": "2", "steps": "1"},
                    {"step_num": "3", "steps": "1"}]  # fmt: skip
  # The compiled call's HLO, for bench.py --trace_summary.
  assert (
      "HloModule jit_train_steps"
      in (tmp_path / "hlo" / "train_step.txt").read_text()
  )


def test_episodes_a_few_at_a_time_match_the_vmapped_run(
    trained, data_dir, tmp_path
):
  # train.episode_chunk=2: the 8 episodes run 2 at a time inside the step.
  config = tiny_config(data_dir, {**BASE, "train.episode_chunk": 2})
  train.train_and_evaluate(config, str(tmp_path))
  _assert_close_results(tmp_path, trained)


def test_chunked_validation_steps_match_the_vmapped_run(data_dir, tmp_path):
  # Early stopping's validation step runs chunked too.
  extra = {**BASE, "train.val_fraction": 0.5, "train.val_every": 1}
  for chunk in (0, 2):
    config = tiny_config(data_dir, {**extra, "train.episode_chunk": chunk})
    train.train_and_evaluate(config, str(tmp_path / str(chunk)))
  _assert_close_results(tmp_path / "2", tmp_path / "0")
  results = report.read_results(str(tmp_path / "2"))
  assert results["selection"] == report.SELECTION_EARLY_STOPPING


def test_episode_chunk_must_divide_the_episodes(data_dir, tmp_path):
  config = tiny_config(data_dir, {**BASE, "train.episode_chunk": 3})
  with pytest.raises(
      ValueError, match=r"train.episode_chunk=3.*divide the 8.*\[1, 2, 4, 8\]"
  ):
    train.train_and_evaluate(config, str(tmp_path))
