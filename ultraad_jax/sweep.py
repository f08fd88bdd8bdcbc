"""Runs one experiment, or a sweep of shot counts, from a config.

Episodes of one shot count (seeds x draws) train together in one compiled
program (train.py). Different shot counts change array shapes, so a sweep runs
them one after another, each in its own sub-folder, and writes a combined
table sweep.md of every metric against the number of shots.
"""

import copy
import json
import os

from absl import logging

from ultraad_jax import train


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
  _write_table(workdir, all_results)
  return all_results


def _write_table(workdir, all_results):
  """sweep.md / sweep.json: metric means +- std for each shot count."""
  lines = [
      "# Shot sweep",
      "",
      "Each cell: mean ± std over episodes (UltraAD).",
      "",
  ]
  done = {k: r for k, r in all_results.items() if r}
  if not done:
    return
  metrics = sorted({m for r in done.values() for m in r["summary"]})
  lines.append("| shots | " + " | ".join(metrics) + " |")
  lines.append("|---" * (len(metrics) + 1) + "|")
  for k, r in sorted(done.items()):
    cells = []
    for m in metrics:
      s = r["summary"].get(m)
      cells.append(
          "—"
          if not s or s["mean"] is None
          else f"{s['mean']:.3f} ± {(s['std'] or 0):.3f}"
      )
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(
        {str(k): r["summary"] for k, r in done.items()},
        f,
        indent=2,
        sort_keys=True,
    )
