"""One figure of a bench.py run: the backbone's times and the sweep's scaling.

Left: ms per image of each backbone path that was timed (JAX and PyTorch,
f32 and bf16, and PyTorch with MKL's vendor check bypassed where it ran),
with the time the f32 FLOPs would take at the peak as a dashed line (the
MFU is that line's time over JAX's bar). Right: seconds per episode as the
number of episodes E grows, for the engine and the peer loop, on log axes,
each E labelled with the speedup; points of the peer that were
extrapolated from fewer episodes are hollow.

Usage: `python benchmarks/bench_figure.py RESULTS.json FIGURE.png`, or
`bench.py --figure FIGURE.png` at the end of a run.
"""

import argparse
import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (JSON key under "backbone", label) of each bar, in the order drawn.
_BARS = (
    ("jax_ms_per_image", "JAX f32"),
    ("torch_ms_per_image", "PyTorch f32"),
    ("jax_ms_per_image_fast_f32", "JAX fast f32"),
    ("torch_ms_per_image_fast_f32", "PyTorch fast f32"),
    ("jax_ms_per_image_bf16", "JAX bf16"),
    ("torch_ms_per_image_bf16", "PyTorch bf16"),
)


def backbone_bars(results):
  """The backbone panel's bars: (label, ms/image) in drawing order.

  Args:
    results: bench.py's JSON dict.

  Returns:
    A list of (label, value); PyTorch with MKL unlocked comes after PyTorch
    f32 when it was measured.
  """
  bb = results.get("backbone", {})
  bars = []
  for key, label in _BARS:
    if isinstance(bb.get(key), (int, float)):
      bars.append((label, float(bb[key])))
    if key == "torch_ms_per_image":
      unlocked = bb.get("mkl_unlocked", {})
      if isinstance(unlocked.get("torch_ms_per_image"), (int, float)):
        bars[-1] = ("PyTorch f32,\nstock", bars[-1][1])
        bars.append(
            (
                "PyTorch f32,\nMKL unlocked",
                float(unlocked["torch_ms_per_image"]),
            )
        )
  return bars


def sweep_points(results):
  """The sweep panel's points, sorted by E.

  Args:
    results: bench.py's JSON dict.

  Returns:
    A list of dicts: episodes, jax_s_per_episode (and, where measured,
    jax_with_cache_s_per_episode: the feature cache's build charged too),
    and where the peer ran, torch_s_per_episode, speedup and extrapolated.
  """
  points = []
  for key, row in results.get("sweep", {}).items():
    if not (isinstance(row, dict) and "jax_s" in row):
      continue
    e = int(key)
    point = {"episodes": e, "jax_s_per_episode": row["jax_s"] / e}
    if "jax_s_with_cache" in row:
      point["jax_with_cache_s_per_episode"] = row["jax_s_with_cache"] / e
    if "torch_s" in row:
      point.update(
          torch_s_per_episode=row["torch_s"] / e,
          speedup=row["speedup"],
          extrapolated=bool(row.get("torch_extrapolated")),
      )
    points.append(point)
  return sorted(points, key=lambda p: p["episodes"])


def _title(results):
  machine = results.get("machine", {})
  where = machine.get("cpu_model", "?")
  if machine.get("jax_backend") not in (None, "cpu"):
    where = machine.get("device_kind", where)
  title = (
      f"bench.py --{results.get('mode', '?')} on {where}, "
      f"{machine.get('cores', '?')} cores"
  )
  if machine.get("mkl_unlocked"):
    title += "\nevery PyTorch side with MKL's vendor check bypassed"
  return title


def draw(results, path):
  """Writes the figure of a run as a PNG.

  Args:
    results: bench.py's JSON dict (a run with a backbone or sweep section).
    path: the PNG to write (its folder is created).

  Raises:
    ValueError: the run has neither a backbone nor a sweep section.
  """
  bars = backbone_bars(results)
  points = sweep_points(results)
  if not bars and not points:
    raise ValueError(
        "These results have no backbone times and no sweep rows to draw; "
        "run bench.py with --sections backbone and/or sweep."
    )
  panels = int(bool(bars)) + int(bool(points))
  fig = Figure(figsize=(6 * panels, 4.5))
  axes = list(fig.subplots(1, panels, squeeze=False)[0])
  ax_bb = axes.pop(0) if bars else None
  ax_sw = axes.pop(0) if points else None
  fig.suptitle(_title(results), fontsize=10)

  bb = results.get("backbone", {})
  if bars:
    labels = [label for label, _ in bars]
    values = [value for _, value in bars]
    colors = ["tab:blue" if l.startswith("JAX") else "tab:orange"
              for l in labels]  # fmt: skip
    ax_bb.bar(range(len(bars)), values, color=colors)
    ax_bb.set_xticks(range(len(bars)), labels, fontsize=8)
    for i, v in enumerate(values):
      ax_bb.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    peak = results.get("peak", {}).get("peak_gflops")
    flops = bb.get("jax_flops_per_image")
    if peak and flops:
      floor_ms = 1e3 * flops / (peak * 1e9)
      ax_bb.axhline(floor_ms, color="k", ls="--", lw=1)
      ax_bb.annotate(
          f"JAX f32's FLOPs at the peak ({peak:.0f} GFLOP/s): {floor_ms:.3g} ms",
          (-0.45, floor_ms), textcoords="offset points", xytext=(0, -3),
          ha="left", va="top", fontsize=8,
          bbox=dict(facecolor="white", edgecolor="none", alpha=0.8),
      )  # fmt: skip
    ax_bb.margins(y=0.1)
    ax_bb.set_ylabel("ms per image (median)")
    ax_bb.set_title(
        f"backbone {bb.get('model', '?')}, batch {bb.get('batch', '?')}"
    )

  if points:
    es = [p["episodes"] for p in points]
    # (label, key, line style, colour) of each per-episode series; a series
    # is drawn over the rows that carry its key.
    for label, key, style, colour in (
        ("engine (feature cache, vmapped)", "jax_s_per_episode", "o-",
         "tab:blue"),
        ("engine, the cache's build included", "jax_with_cache_s_per_episode",
         "s--", "tab:blue"),
        ("peer loop (PyTorch)", "torch_s_per_episode", "-", "tab:orange"),
    ):  # fmt: skip
      rows = [p for p in points if key in p]
      if rows:
        ax_sw.plot([p["episodes"] for p in rows], [p[key] for p in rows],
                   style, color=colour, label=label)  # fmt: skip
    peer = [p for p in points if "torch_s_per_episode" in p]
    if peer:
      for p in peer:
        ax_sw.plot(
            p["episodes"], p["torch_s_per_episode"], "o", color="tab:orange",
            markerfacecolor="none" if p["extrapolated"] else "tab:orange",
        )  # fmt: skip
        ax_sw.annotate(f"x{p['speedup']:.1f}",
                       (p["episodes"], p["torch_s_per_episode"]),
                       textcoords="offset points", xytext=(0, 6),
                       ha="center", fontsize=8)  # fmt: skip
    ax_sw.set_xscale("log", base=2)
    ax_sw.set_yscale("log")
    ax_sw.set_xticks(es, [str(e) for e in es])
    ax_sw.set_xlabel("episodes E")
    ax_sw.set_ylabel("seconds per episode")
    sweep = results["sweep"]
    ax_sw.set_title(
        f"sweep {sweep.get('model', '?')}, {sweep.get('steps', '?')} steps "
        "(hollow: extrapolated)"
    )
    ax_sw.margins(y=0.15)
    ax_sw.legend(fontsize=8)

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.tight_layout()
  fig.savefig(path, format="png", dpi=100)


def main(argv=None):
  """Draws the figure of a results file (the command line above)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("results", help="a JSON file written by bench.py --json")
  p.add_argument("figure", help="the PNG to write")
  args = p.parse_args(argv)
  with open(args.results, encoding="utf-8") as f:
    results = json.load(f)
  draw(results, args.figure)
  print(f"wrote {args.figure}")


if __name__ == "__main__":
  main()
