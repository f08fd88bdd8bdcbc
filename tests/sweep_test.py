"""Tests of ultraad_jax/sweep.py: the shot sweep and its summary files."""

import json

import pytest

from engine_helpers import tiny_config
from ultraad_jax import sweep


def _summary(mean, n=3, std=0.01):
  return {"mean": mean, "std": std, "ci95": [mean - 0.1, mean + 0.1], "n": n}


def _results(shots, *, setting="per_class", model=0.7, baseline=0.5):
  """A results dict as train_and_evaluate returns it (3 episodes)."""
  return {
      "setting": setting,
      "shots": shots,
      "num_episodes": 3,
      "dataset": "us_phantom/all",
      "backbone": "tiny",
      "selection": "fixed schedule",
      "model": "UltraAD",
      "summary": {
          "image_auroc": _summary(model),
          # Defined in only 2 of the 3 episodes.
          "pixel_auroc": _summary(model + 0.1, n=2),
      },
      "baselines": {
          "zero_shot": {"summary": {"image_auroc": _summary(baseline)}},
      },
  }


def test_summary_names_the_setting_and_every_method(tmp_path):
  out = sweep.write_summary(
      str(tmp_path), {4: _results(4, model=0.8), 1: _results(1)}
  )
  assert out["shots"] == [1, 4]  # sorted, whatever the run order
  assert out["methods"] == ["UltraAD", "zero_shot"]
  assert out["setting"] == "per_class" and out["num_episodes"] == 3
  on_disk = json.loads((tmp_path / "sweep.json").read_text())
  assert on_disk["results"]["4"]["UltraAD"]["image_auroc"]["mean"] == 0.8
  text = (tmp_path / "sweep.md").read_text()
  for line in ("- Setting: per_class", "- Shots per class: 1, 4",
               "- Episodes per shot count: 3", "- Dataset: us_phantom/all",
               "- Backbone: tiny", "- Selection: fixed schedule"):  # fmt: skip
    assert line in text, line
  # The model's table, then one table per metric with the baseline beside.
  assert "| 4 | 0.800 ± 0.010 | 0.900 ± 0.010 [n=2] |" in text
  image_table = text.split("## Image AUROC")[1]
  assert "| shots | UltraAD | zero_shot |" in image_table
  assert "| 1 | 0.700 ± 0.010 | 0.500 ± 0.010 |" in image_table
  # zero_shot has no pixel AUROC here: a dash, not a number.
  pixel_table = text.split("## Pixel AUROC")[1]
  assert "| 1 | 0.800 ± 0.010 [n=2] | — |" in pixel_table
  png = (tmp_path / "sweep.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_summary_says_when_runs_disagree(tmp_path):
  out = sweep.write_summary(
      str(tmp_path),
      {1: _results(1), 2: _results(2, setting="normal_only")},
  )
  assert out["setting"] == "differs: normal_only, per_class"
  assert (
      "- Setting: differs: normal_only, per_class"
      in (tmp_path / "sweep.md").read_text()
  )


def test_summary_skips_unfinished_runs(tmp_path):
  # A run stopped on request returns None: it is left out, not zero.
  out = sweep.write_summary(str(tmp_path), {1: _results(1), 2: None})
  assert out["shots"] == [1]
  assert sweep.write_summary(str(tmp_path / "none"), {1: None}) is None
  assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("shots", [(1, 2)])
def test_sweep_runs_each_shot_count_in_its_folder(data_dir, tmp_path, shots):
  config = tiny_config(data_dir, {"sweep.shots": shots})
  results = sweep.run(config, str(tmp_path))
  assert sorted(results) == list(shots)
  for k in shots:
    on_disk = json.loads((tmp_path / f"shots_{k}" / "results.json").read_text())
    assert on_disk["shots"] == k
    assert results[k]["shots"] == k
  summary = json.loads((tmp_path / "sweep.json").read_text())
  assert summary["shots"] == list(shots)
  assert summary["num_episodes"] == config.episodes.num_episodes
  for k in shots:
    assert (
        summary["results"][str(k)]["UltraAD"]
        == results[k]["summary"]
        == json.loads((tmp_path / f"shots_{k}" / "results.json").read_text())[
            "summary"
        ]
    )
  assert (tmp_path / "sweep.png").stat().st_size > 10_000
