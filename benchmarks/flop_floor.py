"""FLOP floor of the accelerator benchmark's programs, counted without a chip.

The floor of a program on an accelerator is XLA's FLOP count of the program
divided by the accelerator's spec-sheet peak: no run can be faster than
that, so a measured time can be read as a share of it. XLA counts FLOPs from
shapes alone, so everything here is built from abstract arrays
(`jax.ShapeDtypeStruct`, `jax.eval_shape`): nothing of model size is
allocated and nothing runs. The programs are those `bench.py` times in its
"accelerator" mode:

* the backbone: `clip.Backbone.encode_image` at the tapped layers
  (`bench_backbone.tapped_layers`), f32 and bf16 (bf16 parameters, as
  `bench_backbone.measure` runs it);
* the sweep: one training step of all E episodes of the UltraAD head: the
  engine's call of steps (`train.train_steps`, built as
  `bench_sweep.jax_engine` builds it), whose loop over steps XLA counts
  once, so one step, with every episode in one vmap (no episode loop, see
  `head_step_flops`).

The counts are XLA:CPU's, of the same programs compiled from shapes. An
accelerator's compiler fuses differently (so its "bytes accessed" differs
widely) but runs the same dots; its elementwise count can differ slightly
(XLA:CPU's own unoptimised and optimised programs differ by about 1 % in
f32). The floor ignores memory traffic: it is a lower bound, not a
prediction.

Usage (from the repository root):

  python benchmarks/flop_floor.py --mode accelerator \
      --device_kind "NVIDIA H200" --json flop_floor.json
  python benchmarks/flop_floor.py --mode accelerator --backbone_models tiny \
      --sweep_model tiny --sweep_episodes 1,2   # seconds, for a smoke test

Without --device_kind the local `jax.devices()[0].device_kind` is used (a
CPU matches no entry of `accelerator_peaks.SPEC_PEAKS`: counts only, no floor).
"""

import argparse
import functools
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _path in (_REPO, _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# bench sets the project's XLA flags and compilation cache before JAX is
# imported (ultraad_jax/xla_env.py), so it is imported first. Imported as a
# module it skips its __main__-only allocator restart.
# pylint: disable=g-import-not-at-top,wrong-import-position
import accelerator_peaks
import bench
import bench_backbone
import bench_timing
import jax
import jax.numpy as jnp
import sweep_inputs

from ultraad_jax import clip
from ultraad_jax import train

# pylint: enable=g-import-not-at-top,wrong-import-position

# Which peaks bound which program: an f32 program's matmuls run at the f32
# rate with full precision and at the TF32 rate with JAX's default
# precision on NVIDIA GPUs from Ampere on; a bf16 program's at the bf16 rate.
# (On TPUs JAX's default runs f32 matmuls as one bf16 pass: there the bf16
# program's floor is the one to read.)
PEAKS_OF_DTYPE = {"f32": ("fp32", "tf32"), "bf16": ("bf16",)}

COUNTS = ("compiled", "lowered")

NOTE = (
    "FLOPs are XLA:CPU's cost analysis of the same programs, compiled from "
    "shapes only (nothing allocated or run). An accelerator's compiler fuses "
    "differently (its bytes accessed differ widely) but runs the same dots; "
    "its elementwise count can differ slightly. floor = FLOPs / spec-sheet "
    "dense peak: it ignores memory traffic, launch overheads and every "
    "FLOP's kind (elementwise work counted at the matrix rate), so it is a "
    "lower bound on time. f32 programs are bounded at the fp32 peak (full "
    "precision) and the tf32 peak (JAX's default precision for f32 matmuls "
    "on NVIDIA GPUs since Ampere); bf16 programs at the bf16 peak; None "
    "where the device has no such peak (TPUs: JAX's default runs f32 "
    "matmuls as one bf16 pass, so read the bf16 floor)."
)


def _count(lowered, count):
  """XLA's cost of a lowered program: {"flops", "bytes accessed", ...}.

  Args:
    lowered: a `jax.stages.Lowered`.
    count: "compiled" (XLA:CPU's optimised program, the default) or
      "lowered" (the unoptimised program: no compilation, so much faster on
      large programs, but not equal: fusion and simplification change the
      count by up to a few percent, and bytes accessed a lot).

  Returns:
    (cost dict, HLO text of the counted program).
  """
  if count == "compiled":
    program = lowered.compile()
    hlo = program.as_text()
  elif count == "lowered":
    program = lowered
    hlo = lowered.as_text(dialect="hlo")
  else:
    raise ValueError(f"count={count!r}; expected one of {COUNTS}.")
  return bench_timing.xla_cost(program), hlo


def _while_loops(hlo_text):
  """Number of while loops in an HLO module's text.

  XLA's cost analysis counts a while loop's body once, whatever its trip
  count, so a program with loops is undercounted; the callers report this
  number so that a non-zero one is seen.
  """
  return sum(
      1 for line in hlo_text.splitlines() if " while(" in line.split("=", 1)[-1]
  )


def abstract_backbone(model_name, dtype=jnp.float32):
  """A clip.Backbone whose parameters are ShapeDtypeStructs (no memory).

  Args:
    model_name: "tiny" (`clip.tiny`'s shape) or a name `clip.openai_config`
      knows ("ViT-L/14@336", ...).
    dtype: the computation dtype; the parameters get it too (as
      `bench_backbone.measure` casts them for bf16).

  Returns:
    The clip.Backbone; its `params` are abstract.
  """
  if model_name == "tiny":
    config = clip.tiny_config()
  else:
    config = clip.openai_config(model_name)
  params = jax.eval_shape(
      functools.partial(clip.init_params, config), jax.random.key(0)
  )
  params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), params
  )
  return clip.Backbone(config=config, params=params, dtype=dtype)


def backbone_flops(model_name, batch, dtype=jnp.float32, *, count="compiled"):
  """XLA's FLOPs of the benchmarked image encoder, per image.

  Args:
    model_name: "tiny" or an OpenAI CLIP name.
    batch: images per call (the count is of one call at this batch).
    dtype: jnp.float32, or jnp.bfloat16 (bf16 parameters and computation).
    count: "compiled" or "lowered" (see `_count`).

  Returns:
    A dict: "flops_per_image", "flops" (the whole call), "bytes_accessed"
    (the call, XLA:CPU's fusion), "analytic_flops_per_image"
    (`bench_backbone.analytic_vit_flops`), "batch", "image_size", "layers",
    "while_loops" (0 expected) and "count_s" (seconds to count).
  """
  start = time.perf_counter()
  backbone = abstract_backbone(model_name, dtype)
  layers = bench_backbone.tapped_layers(backbone.num_layers)
  size = backbone.image_size
  pixels = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  lowered = jax.jit(backbone.encode_image, static_argnums=2).lower(
      backbone.params, pixels, layers
  )
  cost, hlo = _count(lowered, count)
  flops = float(cost.get("flops", float("nan")))
  return {
      "flops_per_image": flops / batch,
      "flops": flops,
      "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
      "analytic_flops_per_image": float(
          bench_backbone.analytic_vit_flops(backbone, len(layers))
      ),
      "batch": batch,
      "image_size": size,
      "layers": list(layers),
      "while_loops": _while_loops(hlo),
      "count_s": time.perf_counter() - start,
  }


def head_step_flops(
    model_name,
    episodes,
    shots,
    pool,
    fused_map_loss="off",
    *,
    steps=50,
    count="compiled",
):
  """XLA's FLOPs of one training step of all episodes (as jax_engine's).

  The inputs are those `bench_sweep.jax_engine` builds, as shapes: the episodes'
  support rows, labels, groups and description embeddings, the feature
  cache of `pool` rows (float32 features, uint8 masks, as `features.build`
  stores them by default), the state from the vmapped initialisation
  (`jax.eval_shape`), and the step's key. All episodes are one vmap
  (chunk = E), as on an accelerator (`train.episode_chunk`): the program
  then has no episode loop, whose body XLA would count once.

  Args:
    model_name: the backbone, "tiny" or an OpenAI CLIP name.
    episodes: E.
    shots: support images per class (S = 3 x shots).
    pool: cache rows M.
    fused_map_loss: the config's `fused_map_loss` ("off" on accelerators;
      "auto" is on only on CPU for large maps).
    steps: the optimiser's schedule length (it changes only a few scalar
      FLOPs of the learning-rate schedule).
    count: "compiled" or "lowered" (see `_count`).

  Returns:
    A dict: "flops" (the step, all episodes), "flops_per_episode",
    "bytes_accessed" (the step, XLA:CPU's fusion), "episodes",
    "support_size", "pool", "layers", "fused_map_loss", "while_loops"
    (besides the loop over steps; 0 expected, more means undercounted) and
    "count_s".
  """
  start = time.perf_counter()
  backbone = abstract_backbone(model_name, jnp.float32)
  layers = bench_backbone.tapped_layers(backbone.num_layers)
  cfg = sweep_inputs.sweep_model_config(layers, fused_map_loss)
  s, d = 3 * shots, backbone.embed_dim
  n, size = backbone.grid_size**2, backbone.image_size
  shape = jax.ShapeDtypeStruct
  ep_data = {
      "rows": shape((episodes, s), jnp.int32),
      "labels": shape((episodes, s), jnp.int32),
      "group": shape((episodes, s), jnp.int32),
      "text_embed": shape((episodes, s, d), jnp.float32),
  }
  cache_arrays = (
      shape((pool, d), jnp.float32),
      shape((len(layers), pool, n, d), jnp.float32),
      shape((pool, size, size), jnp.uint8),
  )
  clip_params = backbone.params
  tx = train.make_optimizer(sweep_inputs.sweep_train_config(steps))

  init_all = train.make_init(cfg, backbone, tx)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), episodes))
  params, opt, frozen = jax.eval_shape(
      init_all, keys, ep_data, cache_arrays, clip_params
  )
  state = {"params": params, "opt": opt, "step": shape((), jnp.int32)}
  key = jax.eval_shape(lambda: jax.random.key(1))
  # No per-program compiler options, as on an accelerator
  # (xla_env.head_compiler_options gives none off CPU). The CPU-only YNN
  # reduce fusions it turns on for large programs also change XLA:CPU's
  # count (-0.9 % on the tiny step), so they would not be the same program.
  step_fn = train.jit_train_steps(
      tx=tx, cfg=cfg, backbone=backbone, chunk=episodes, max_steps=1
  )
  lowered = step_fn.lower(
      state, ep_data, frozen, cache_arrays, clip_params, key,
      shape((), jnp.int32),
  )  # fmt: skip
  cost, hlo = _count(lowered, count)
  flops = float(cost.get("flops", float("nan")))
  return {
      "flops": flops,
      "flops_per_episode": flops / episodes,
      "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
      "episodes": episodes,
      "support_size": s,
      "pool": pool,
      "layers": list(layers),
      "fused_map_loss": fused_map_loss,
      # The loop over the call's steps runs one step here (and XLA counts
      # its body once): only other loops would be undercounted.
      "while_loops": _while_loops(hlo) - 1,
      "count_s": time.perf_counter() - start,
  }


def _floors(flops, peak, dtype_name, scale):
  """Floors of a program at the peaks that bound it, times `scale`."""
  out = {}
  for name in PEAKS_OF_DTYPE[dtype_name]:
    seconds = accelerator_peaks.floor(flops, peak[name]) if peak else None
    out[name] = None if seconds is None else scale * seconds
  return out


def plan(mode_settings, device_kind, *, count="compiled", log=print):
  """FLOP counts and floors of a bench.py mode's backbone and sweep.

  Args:
    mode_settings: a dict like `bench.MODES["accelerator"]`: backbone_models,
      backbone_batch, sweep_model, sweep_episodes, sweep_shots, sweep_pool,
      sweep_steps (an empty sweep_episodes skips the sweep).
    device_kind: the accelerator's device kind (matched with `spec_peak`).
    count: "compiled" or "lowered" (see `_count`).
    log: called with a line after each count (None: silent).

  Returns:
    A JSON-able dict: "device_kind", "peak" (the
    `accelerator_peaks.SPEC_PEAKS` entry or None), "count", "note",
    "settings", "backbone" {model: {"batch", "image_size", "layers",
    "analytic_gflop_per_image", "f32" and "bf16": {"gflop_per_image",
    "bytes_accessed_per_image", "while_loops", "count_s",
    "floor_ms_per_image": {peak name: ms}}}} and "sweep" {"model",
    "shots_per_class", "support_size", "pool", "steps", "fused_map_loss",
    "episodes": {str(E): {"gflop_per_step", "gflop_per_episode_step",
    "bytes_accessed_per_step", "while_loops", "count_s",
    "floor_ms_per_step": {peak name: ms}, "floor_s_for_steps": {peak name:
    s}}}}.
  """
  peak = accelerator_peaks.spec_peak(device_kind)
  log = log or (lambda line: None)
  out = {
      "device_kind": device_kind,
      "peak": peak,
      "count": count,
      "note": NOTE,
      "settings": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in mode_settings.items()},  # fmt: skip
      "backbone": {},
  }
  batch = mode_settings["backbone_batch"]
  for name in mode_settings.get("backbone_models", ()):
    row = {}
    for dtype_name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
      got = backbone_flops(name, batch, dtype, count=count)
      row.update(
          batch=batch,
          image_size=got["image_size"],
          layers=got["layers"],
          analytic_gflop_per_image=got["analytic_flops_per_image"] / 1e9,
      )
      row[dtype_name] = {
          "gflop_per_image": got["flops_per_image"] / 1e9,
          "bytes_accessed_per_image": got["bytes_accessed"] / batch,
          "while_loops": got["while_loops"],
          "count_s": got["count_s"],
          "floor_ms_per_image": _floors(
              got["flops_per_image"], peak, dtype_name, 1e3
          ),
      }
      log(f"  backbone {name} {dtype_name} batch {batch}: "
          f"{got['flops_per_image'] / 1e9:.2f} GFLOP/image "
          f"({got['count_s']:.1f} s to count)")  # fmt: skip
    out["backbone"][name] = row
  episodes = tuple(mode_settings.get("sweep_episodes", ()))
  if episodes:
    shots, pool = mode_settings["sweep_shots"], mode_settings["sweep_pool"]
    steps = mode_settings["sweep_steps"]
    sweep = {
        "model": mode_settings["sweep_model"],
        "shots_per_class": shots,
        "support_size": 3 * shots,
        "pool": pool,
        "steps": steps,
        "fused_map_loss": "off",
        "episodes": {},
    }
    for num in episodes:
      got = head_step_flops(sweep["model"], num, shots, pool, "off",
                            steps=steps, count=count)  # fmt: skip
      sweep["layers"] = got["layers"]
      sweep["episodes"][str(num)] = {
          "gflop_per_step": got["flops"] / 1e9,
          "gflop_per_episode_step": got["flops_per_episode"] / 1e9,
          "bytes_accessed_per_step": got["bytes_accessed"],
          "while_loops": got["while_loops"],
          "count_s": got["count_s"],
          "floor_ms_per_step": _floors(got["flops"], peak, "f32", 1e3),
          "floor_s_for_steps": _floors(got["flops"], peak, "f32", steps),
      }
      log(f"  sweep {sweep['model']} E={num}: {got['flops'] / 1e9:.2f} "
          f"GFLOP/step ({got['count_s']:.1f} s to count)")  # fmt: skip
    out["sweep"] = sweep
  return out


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def format_table(result):
  """A short readable summary of `plan`'s result.

  Args:
    result: the dict `plan` returns.

  Returns:
    The lines, joined.
  """
  peak = result["peak"]
  lines = [f"device: {result['device_kind']!r} -> " + (
      f"{peak['key']}: fp32 {_fmt(peak['fp32'], 'g')}, tf32 "
      f"{_fmt(peak['tf32'], 'g')}, bf16 {_fmt(peak['bf16'], 'g')} TFLOP/s "
      f"dense ({peak['source']})" if peak else "no spec-sheet peak known"
  )]  # fmt: skip
  for name, row in result["backbone"].items():
    lines.append(
        f"backbone {name}, batch {row['batch']} (analytic "
        f"{row['analytic_gflop_per_image']:.2f} GFLOP/image):"
    )
    for dtype_name in ("f32", "bf16"):
      r = row[dtype_name]
      floors = ", ".join(
          f"{k} {_fmt(v, '.3f')} ms" for k, v in r["floor_ms_per_image"].items()
      )
      lines.append(
          f"  {dtype_name:4s} {r['gflop_per_image']:9.2f} GFLOP/image; "
          f"floor/image: {floors}"
      )
  sweep = result.get("sweep")
  if sweep:
    lines.append(
        f"sweep {sweep['model']}, S={sweep['support_size']}, pool "
        f"{sweep['pool']}, {sweep['steps']} steps (f32 head):"
    )
    for num, r in sweep["episodes"].items():
      floors = ", ".join(
          f"{k} {_fmt(v, '.3f')} ms" for k, v in r["floor_ms_per_step"].items()
      )
      totals = ", ".join(
          f"{k} {_fmt(v, '.3f')} s" for k, v in r["floor_s_for_steps"].items()
      )
      lines.append(
          f"  E={num:>4s} {r['gflop_per_step']:10.2f} GFLOP/step "
          f"({r['gflop_per_episode_step']:.2f}/episode); floor/step: "
          f"{floors}; {sweep['steps']} steps: {totals}"
      )
  return "\n".join(lines)


# Mode settings the command line can override (same names as bench.py's).
_OVERRIDABLE = (
    "backbone_models", "backbone_batch", "sweep_model", "sweep_episodes",
    "sweep_shots", "sweep_pool", "sweep_steps",
)  # fmt: skip


def _ints(text):
  return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text):
  return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv=None):
  """Command-line flags; every mode setting can be overridden.

  Args:
    argv: the arguments (default: sys.argv[1:]).

  Returns:
    The argparse namespace.
  """
  parser = argparse.ArgumentParser(
      description=(
          "XLA FLOP counts of bench.py's programs (from shapes, nothing run) "
          "and their floors at an accelerator's spec-sheet peak."
      )
  )
  parser.add_argument(
      "--mode",
      default="accelerator",
      choices=sorted(bench.MODES),
      help="bench.py mode whose settings to count",
  )
  parser.add_argument(
      "--device_kind",
      default=None,
      help="device kind to look up in accelerator_peaks.SPEC_PEAKS, e.g. "
      "'NVIDIA H200' (default: this machine's)",
  )
  parser.add_argument("--json", default=None, help="write the result here")
  parser.add_argument(
      "--count",
      default="compiled",
      choices=COUNTS,
      help="count XLA:CPU's compiled program (exact) or the lowered one "
      "(no compilation, approximate)",
  )
  parser.add_argument(
      "--backbone_models",
      type=_names,
      default=None,
      help="comma-separated backbones (empty: none)",
  )
  parser.add_argument("--backbone_batch", type=int, default=None)
  parser.add_argument("--sweep_model", default=None)
  parser.add_argument(
      "--sweep_episodes",
      type=_ints,
      default=None,
      help="comma-separated E (empty: no sweep)",
  )
  parser.add_argument("--sweep_shots", type=int, default=None)
  parser.add_argument("--sweep_pool", type=int, default=None)
  parser.add_argument("--sweep_steps", type=int, default=None)
  return parser.parse_args(argv)


def main(argv=None):
  """Counts, prints the table and writes the JSON.

  Args:
    argv: command-line arguments (default: sys.argv[1:]).

  Returns:
    The `plan` result.
  """
  args = parse_args(argv)
  settings = dict(bench.MODES[args.mode])
  for key in _OVERRIDABLE:
    if getattr(args, key) is not None:
      settings[key] = getattr(args, key)
  device_kind = args.device_kind or jax.devices()[0].device_kind
  print(f"Counting the {args.mode!r} programs ({args.count}) for "
        f"{device_kind!r}:", flush=True)  # fmt: skip
  result = plan(
      settings,
      device_kind,
      count=args.count,
      log=lambda line: print(line, flush=True),
  )
  print(format_table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"Wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
