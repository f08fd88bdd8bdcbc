"""Runs one experiment, or a sweep of shot counts, from a config.

Episodes of one shot count (seeds x draws) train together in one compiled
program (train.py). Different shot counts change array shapes, so a sweep runs
them one after another, each in its own sub-folder, and then summarises every
metric against the number of shots: sweep.md (tables), sweep.json (the same
numbers) and sweep.png (one panel per metric), for the model and each
baseline.
"""

import copy
import json
import os

from absl import logging
from matplotlib.figure import Figure
import numpy as np

from ultraad_jax import report
from ultraad_jax import train

# What every shot count of a sweep shares; sweep.md names it, and a sweep
# whose runs disagree on it is reported as such rather than merged.
_SHARED_KEYS = ("setting", "num_episodes", "dataset", "backbone", "selection")


def run(config, workdir):
  """Runs `config` in `workdir`; a sweep if config.sweep.shots is set.

  Args:
    config: the experiment's ConfigDict.
    workdir: output folder.

  Returns:
    The results dict of a single run, or {shots: results} for a sweep.
  """
  shots = tuple(config.sweep.shots)
  if not shots:
    return train.train_and_evaluate(config, workdir)
  all_results = {}
  for k in shots:
    sub = copy.deepcopy(config)
    with sub.unlocked():
      sub.episodes.shots = int(k)
      sub.sweep.shots = ()
    logging.info("Sweep: %d shots.", k)
    all_results[int(k)] = train.train_and_evaluate(
        sub, os.path.join(workdir, f"shots_{k}")
    )
  write_summary(workdir, all_results)
  return all_results


def _methods(results):
  """{method name: its summary} of one run: the model first, then baselines."""
  out = {str(results.get("model", "model")): results["summary"]}
  for name, block in results.get("baselines", {}).items():
    out[name] = block["summary"]
  return out


def write_summary(workdir, all_results):
  """Writes sweep.md, sweep.json and sweep.png for finished shot counts.

  Args:
    workdir: the sweep's folder.
    all_results: {shots: results dict of `train.train_and_evaluate`, or
      None for a run that stopped early}.

  Returns:
    The sweep.json content, or None when no shot count finished.
  """
  done = {int(k): r for k, r in sorted(all_results.items()) if r}
  if not done:
    logging.warning("Sweep: no shot count finished; nothing summarised.")
    return None
  shared = {}
  for key in _SHARED_KEYS:
    values = sorted({str(r.get(key)) for r in done.values()})
    shared[key] = (
        next(iter(done.values())).get(key)
        if len(values) == 1
        else "differs: " + ", ".join(values)
    )
  by_shots = {k: _methods(r) for k, r in done.items()}
  methods = list(dict.fromkeys(m for per in by_shots.values() for m in per))
  keys = report.metric_order(
      m for per in by_shots.values() for s in per.values() for m in s
  )
  summary = {
      **shared,
      "shots": list(done),
      "methods": methods,
      "results": {str(k): per for k, per in by_shots.items()},
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(_markdown(summary, keys))
  _plot(os.path.join(workdir, "sweep.png"), summary, keys)
  return summary


def _markdown(summary, keys):
  """sweep.md: the setting, then one table per metric (shots x methods)."""
  n_ep = summary["num_episodes"]
  model = summary["methods"][0]
  lines = [
      f"# Shot sweep: {summary['dataset']}, {summary['setting']}",
      "",
      f"- Setting: {summary['setting']}",
      f"- Shots per class: {', '.join(str(k) for k in summary['shots'])}",
      f"- Episodes per shot count: {n_ep}",
      f"- Dataset: {summary['dataset']}",
      f"- Backbone: {summary['backbone']}",
      f"- Selection: {summary['selection']}",
      "",
      f"Cells: mean ± std over the episodes of each shot count (std with "
      f"ddof=1). —: not measured for that method. [n=k]: the metric was "
      f"defined in only k episodes. Confidence intervals: each "
      f"shots_<k>/results.md. Figure: sweep.png.",
      "",
      f"## {model}, every metric",
      "",
      "| shots | "
      + " | ".join(report.METRIC_NAMES.get(m, m) for m in keys)
      + " |",
      "|---" * (len(keys) + 1) + "|",
  ]
  for k in summary["shots"]:
    per = summary["results"][str(k)][model]
    cells = [report.cell(per.get(m), n_ep, ci=False) for m in keys]
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
  if len(summary["methods"]) > 1:
    for m in keys:
      lines += [
          "",
          f"## {report.METRIC_NAMES.get(m, m)}",
          "",
          "| shots | " + " | ".join(summary["methods"]) + " |",
          "|---" * (len(summary["methods"]) + 1) + "|",
      ]
      for k in summary["shots"]:
        per = summary["results"][str(k)]
        cells = [
            report.cell(per.get(name, {}).get(m), n_ep, ci=False)
            for name in summary["methods"]
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _plot(path, summary, keys):
  """sweep.png: one panel per metric, mean ± std against shots, per method."""
  cols = min(3, len(keys))
  rows = -(-len(keys) // cols)
  fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
  shots = summary["shots"]
  handles = {}  # method -> its first line, for the figure's legend
  for i, m in enumerate(keys):
    ax = fig.add_subplot(rows, cols, i + 1)
    # One colour per method in every panel, also where a method has no
    # value for the metric (matplotlib would shift the colour cycle).
    for j, name in enumerate(summary["methods"]):
      pts = [
          (k, s["mean"], s.get("std") or 0.0)
          for k in shots
          if (s := summary["results"][str(k)].get(name, {}).get(m))
          and s.get("mean") is not None
      ]
      if not pts:
        continue
      x, y, e = (np.asarray(v, float) for v in zip(*pts))
      line = ax.errorbar(x, y, yerr=e, marker="o", capsize=3,
                         color=f"C{j % 10}", linewidth=2.0 if j == 0 else 1.0)  # fmt: skip
      handles.setdefault(name, line)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.set_title(report.METRIC_NAMES.get(m, m), fontsize=10)
    ax.set_xlabel("shots per class")
    ax.grid(alpha=0.3)
  fig.legend(
      [handles[m] for m in summary["methods"] if m in handles],
      [m for m in summary["methods"] if m in handles],
      loc="lower center",
      ncol=len(handles),
      fontsize=9,
  )
  fig.suptitle(
      f"{summary['dataset']}, {summary['setting']}, {summary['backbone']}: "
      f"mean ± std over {summary['num_episodes']} episodes per shot count",
      fontsize=11,
  )
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  report.save_figure(fig, path)
