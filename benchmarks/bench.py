"""Speed of this project against PyTorch peers, on one machine, in one run.

Three measurements, each at equal settings, with warm-up (and compilation)
excluded, the contenders' repeats interleaved, and medians with their spread:

1. Backbone: CLIP's image tower (global embedding plus the tapped layers'
   patch tokens, `ultraad_jax.clip.Backbone.encode_image`, jitted) against
   PyTorch `transformers.CLIPModel` doing the same work with the same weights
   (copied from Flax with transformers' flax->pytorch loader), compiled with
   `torch.compile` and freezing under `torch.no_grad`. f32 and bf16 (Flax
   dtype bf16 with bf16 parameters; PyTorch autocast bf16). The JAX FLOP rate
   from XLA's cost analysis is reported as a share of the machine's measured
   f32 FMA peak (MFU): register-bound FMA chains in C (`fma_peak.c`, built
   with the host's compiler by `native_peak.py`), with XLA's own FMA loop
   and a matmul as fallbacks.
2. Few-shot sweep: E episodes of the UltraAD head trained for the same number
   of steps by this project's engine (feature cache + episode-vmapped jitted
   `train.train_step`) against a peer-style PyTorch loop (per episode and
   step: a frozen backbone forward on the support batch, then an AdamW update
   of the same UltraAD head with the same loss, `peer_ultraad.loss_fn`, from
   the same initial parameters, as MVFA and MediCLIP train their heads).
   `--peer_head mvfa` gives the peer the lighter MVFA-style head instead
   (adapters + fixed text features, focal + dice).
3. Evaluation: pixel AUROC / AP over N query maps, `ultraad_jax.metrics`
   against scikit-learn on the flattened arrays: seconds and peak memory.

This file is the command line and the run's order; each measurement is a
module of its own: bench_machine.py (the machine and its peak),
bench_backbone.py, bench_sweep.py (with sweep_inputs.py and the PyTorch
peer_loop.py), bench_metrics.py, and bench_targets.py (issue 6's targets).

Usage (from the repository root):

  python benchmarks/bench.py --quick --json bench.json   # 3 min, 2 cores (*)
  python benchmarks/bench.py --json bench.json           # larger, CPU
  python benchmarks/bench.py --accelerator --bf16 --json acc.json  # GPU/TPU
  python benchmarks/bench.py --trace_summary runs/prof  # read a profiled run
  python benchmarks/bench_figure.py bench.json bench.png  # its figure (or
                                                         # --figure PATH)

(*) With warm compile caches (JAX's persistent cache, inductor's); the first
run on a fresh machine also compiles every program: 5.2 min on 2 slow Xeon
cores, 3.1 min on 2 AMD Zen 5 cores (docs/PERFORMANCE.md, rounds 5 and 6).
--quick times the f32 ViT-B/16 backbone, the tiny sweep and the metrics (the
targets of issue 6); the bf16 paths, the tiny backbone and XLA's default
flags are in the full mode.

On an AMD CPU, stock PyTorch's f32 products go through Intel MKL's generic
kernels (MKL dispatches on the vendor, not on the CPU's features), so the
backbone's PyTorch f32 pair is timed again in a child process with that
check bypassed (`mkl_unlock.py`, an LD_PRELOAD shim; `--torch_unlocked`, on
by default there). `--mkl_unlock` runs every PyTorch side of a run that way,
the sweep's peer included.

Run it on an idle machine: under contention both sides slow down unevenly
(on a shared machine, `nice -n -15` as root; the JSON records the priority
and the load averages).
XLA flags: the process sets the project's flags (`ultraad_jax.xla_env`,
YNNPACK fusions off) before JAX starts, as main.py does; the backbone's JAX
f32 time with XLA's default flags is measured in a child process.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _path in (_REPO, _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# XLA reads XLA_FLAGS when its backend starts and JAX reads its cache settings
# when it is imported, so this runs before JAX is imported. A child started
# with ULTRAAD_BENCH_XLA=default keeps XLA's defaults (for the comparison);
# =vector512 adds 512-bit vectorisation for the FMA-peak loop.
_XLA_MODE = os.environ.get("ULTRAAD_BENCH_XLA", "project")
# On a GPU, JAX would otherwise reserve most of the memory at start and leave
# none for the PyTorch side sharing the device. No effect on CPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if _XLA_MODE == "project":
  from ultraad_jax import xla_env  # pylint: disable=g-import-not-at-top

  if __name__ == "__main__":
    # Huge-page malloc, as main.py runs (a restart, so before JAX is
    # imported; ultraad_jax/xla_env.py). The PyTorch side runs in the same
    # process with the same allocator.
    xla_env.use_hugepage_malloc()
  xla_env.configure()
elif _XLA_MODE == "vector512":
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_prefer_vector_width=512"
  ).strip()

# The measurements' modules import JAX: after the flags above.
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

import accelerator_peaks
import bench_backbone
import bench_figure
import bench_machine
import bench_metrics
import bench_sweep
import bench_targets
import mkl_unlock
import native_peak
import peer_loop
import trace_summary

# pylint: enable=g-import-not-at-top,wrong-import-position


# Settings of each mode; every entry can be overridden on the command line.
MODES = {
    "quick": dict(
        backbone_models=("ViT-B/16",), backbone_batch=8, repeats=3,
        warmup=1, bf16=False, default_flags=False, sweep_episodes=(1, 8, 64),
        sweep_steps=10, sweep_model="tiny", sweep_shots=4, sweep_pool=64,
        sweep_repeats=3,
        torch_max_episodes=16, metrics_maps=100, metrics_size=224,
        metrics_repeats=1, peak=True,
    ),
    "full": dict(
        backbone_models=("ViT-B/16", "tiny"), backbone_batch=8, repeats=10,
        warmup=3, bf16=True, default_flags=True,
        sweep_episodes=(1, 8, 64, 256), sweep_steps=50, sweep_model="tiny",
        sweep_repeats=3,
        sweep_shots=4, sweep_pool=128, torch_max_episodes=64,
        metrics_maps=1000, metrics_size=336, metrics_repeats=1, peak=True,
    ),
    "accelerator": dict(
        backbone_models=("ViT-L/14@336",), backbone_batch=32, repeats=10,
        warmup=3, bf16=False, default_flags=False,
        sweep_episodes=(1, 16, 256), sweep_steps=50, sweep_repeats=3,
        sweep_model="ViT-L/14@336", sweep_shots=4, sweep_pool=256,
        torch_max_episodes=4, metrics_maps=1000, metrics_size=336,
        metrics_repeats=1, peak=False,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------
# Child processes (other XLA flags, or the MKL shim preloaded).
# ----------------------------------------------------------------------------


def run_child(kind, args, xla_mode, timeout=900, env=None):
  """Runs one measurement of this script in a child process.

  Args:
    kind: "peak", "backbone_jax" or "backbone_torch".
    args: extra command-line arguments for the child.
    xla_mode: ULTRAAD_BENCH_XLA of the child: "project", "default" or
      "vector512".
    timeout: seconds before the child is abandoned.
    env: the child's environment (default: this process's).

  Returns:
    The JSON dict the child printed last, or {"error": message}.
  """
  env = dict(os.environ if env is None else env, ULTRAAD_BENCH_XLA=xla_mode)
  flags = env.get("XLA_FLAGS", "")
  if xla_mode != "project":
    # The parent's project flags are in the environment; drop them.
    from ultraad_jax import xla_env  # pylint: disable=g-import-not-at-top

    for flag in xla_env.CPU_FLAGS:
      flags = flags.replace(flag, "")
    env["XLA_FLAGS"] = " ".join(flags.split())
  cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind] + args
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
  except subprocess.TimeoutExpired:
    return {"error": f"child {kind} timed out after {timeout} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return {
        "error": f"child {kind} failed (exit {proc.returncode}): "
        f"{proc.stderr.strip()[-2000:]}"
    }
  return json.loads(lines[-1])


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _timed_section(section_s, name):
  """Records the wall seconds of the `with` body as section_s[name]."""
  start = time.time()
  yield
  section_s[name] = time.time() - start
  print(f"  ({section_s[name]:.0f} s)", flush=True)


def _csv(kind):
  def parse(text):
    return tuple(kind(x) for x in text.split(",") if x.strip())

  return parse


def parse_args(argv=None):
  """The command line; mode defaults fill every size not given."""
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  mode = p.add_mutually_exclusive_group()
  mode.add_argument(
      "--quick",
      action="store_true",
      help="small settings: the targets' measurements only (about 3 "
      "minutes on 2 CPU cores with warm compile caches)",
  )
  mode.add_argument(
      "--accelerator",
      action="store_true",
      help="GPU/TPU settings: ViT-L/14@336, 256 episodes",
  )
  p.add_argument("--json", help="write the results here")
  p.add_argument(
      "--figure",
      help="draw the backbone times and the sweep's scaling into this PNG "
      "(bench_figure.py; also from a saved JSON)",
  )
  p.add_argument(
      "--sections",
      type=_csv(str),
      default=("peak", "backbone", "sweep", "metrics"),
      help="comma list of peak, backbone, sweep, metrics",
  )
  p.add_argument(
      "--bf16",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="also time the bf16 paths",
  )
  p.add_argument(
      "--torch",
      action=argparse.BooleanOptionalAction,
      default=True,
      help="time the PyTorch side",
  )
  p.add_argument(
      "--torch_compile",
      action=argparse.BooleanOptionalAction,
      default=True,
      help="torch.compile the PyTorch side (--no-torch_compile "
      "only for smoke tests: stock eager is not the fair peer)",
  )
  p.add_argument(
      "--default_flags",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="time JAX with XLA's default flags in a child process",
  )
  p.add_argument(
      "--fast_f32",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="also time the backbone's fast f32 paths: JAX's default "
      "precision against PyTorch with TF32 on (default: on accelerators)",
  )
  p.add_argument(
      "--torch_unlocked",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="also time PyTorch f32 with MKL's vendor check bypassed "
      "(benchmarks/mkl_unlock.py), in a child process (default: where it "
      "changes something: AMD CPUs)",
  )
  p.add_argument(
      "--mkl_unlock",
      action="store_true",
      help="run every PyTorch side of this run (backbone and the sweep's "
      "peer) with MKL's vendor check bypassed: the run restarts itself with "
      "the shim preloaded. The backbone speedup target, which is against "
      "stock PyTorch, is then not checked",
  )
  p.add_argument(
      "--sweep_precision",
      choices=("float32", "tensorfloat32"),
      default="float32",
      help="matrix products of both sides of the sweep: true f32 (PyTorch's "
      "default) or TF32 on both (NVIDIA GPUs; CPUs compute f32 either way)",
  )
  p.add_argument("--backbone_models", type=_csv(str))
  p.add_argument("--backbone_batch", type=int)
  p.add_argument("--repeats", type=int)
  p.add_argument("--warmup", type=int)
  p.add_argument("--sweep_model")
  p.add_argument("--sweep_episodes", type=_csv(int))
  p.add_argument("--sweep_steps", type=int)
  p.add_argument("--sweep_shots", type=int)
  p.add_argument("--sweep_pool", type=int)
  p.add_argument(
      "--sweep_repeats",
      type=int,
      help="timed runs of each side per E in the sweep (medians reported)",
  )
  p.add_argument("--torch_max_episodes", type=int)
  p.add_argument(
      "--steps_per_call",
      type=int,
      help="the engine's train.steps_per_call in the sweep (default: the "
      "base config's, 0 = every step up to the next log line or checkpoint)",
  )
  p.add_argument(
      "--torch_head_compile",
      action=argparse.BooleanOptionalAction,
      default=True,
      help="torch.compile the peer head's loss (forward+backward)",
  )
  p.add_argument(
      "--peer_head",
      choices=peer_loop.PEER_HEADS,
      default="ultraad",
      help="the head the sweep's PyTorch peer trains: ultraad (the same "
      "head and loss as the engine) or mvfa (a lighter MVFA-style head)",
  )
  p.add_argument(
      "--peer_threads",
      type=int,
      default=0,
      help="PyTorch threads of the sweep's peer (0: one per core). Under "
      "contention, 2 threads on 2 cores stall at every op's barrier",
  )
  p.add_argument("--metrics_maps", type=int)
  p.add_argument("--metrics_size", type=int)
  p.add_argument("--metrics_repeats", type=int)
  p.add_argument(
      "--peak_gflops",
      type=float,
      help="the f32 peak for the MFU (default: measured on CPU)",
  )
  p.add_argument(
      "--trace_summary",
      metavar="WORKDIR",
      help="only summarise the profile of a run (profile_steps, "
      "dump_hlo) by kernel and source line, then exit",
  )
  p.add_argument("--_child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.mode = "quick" if args.quick else (
      "accelerator" if args.accelerator else "full")  # fmt: skip
  for key, value in MODES[args.mode].items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  return args


def _print_summary(results):
  bb = results.get("backbone", {})
  print("\n== Summary ==")
  if "jax_ms_per_image" in bb:
    line = f"backbone {bb['model']} batch {bb['batch']}: JAX f32 " + (
        f"{bb['jax_ms_per_image']:.1f} ms/image"
    )
    if "torch_ms_per_image" in bb:
      line += (
          f", PyTorch f32 {bb['torch_ms_per_image']:.1f} ms/image, "
          f"speedup x{bb['speedup']:.2f}"
      )
    print(line)
    for suffix, label in (
        ("_fast_f32", "fast f32 (JAX default precision, PyTorch TF32)"),
        ("_bf16", "bf16"),
    ):
      if f"jax_ms_per_image{suffix}" not in bb:
        continue
      line = f"  {label}: JAX {bb[f'jax_ms_per_image{suffix}']:.1f} ms/image"
      if f"torch_ms_per_image{suffix}" in bb:
        line += (
            f", PyTorch {bb[f'torch_ms_per_image{suffix}']:.1f}, speedup "
            f"x{bb[f'speedup{suffix}']:.2f}"
        )
      print(line)
    if "mfu" in bb:
      print(
          f"  JAX {bb['jax_gflops']:.0f} GFLOP/s = MFU {bb['mfu']:.1%} of "
          f"{results['peak']['peak_gflops']:.0f} GFLOP/s"
      )
    if "torch_share_of_peak" in bb:
      print(
          f"  PyTorch f32 {bb['torch_gflops']:.0f} GFLOP/s = "
          f"{bb['torch_share_of_peak']:.1%} of the peak"
      )
    for suffix in ("", "_fast_f32", "_bf16"):
      if f"floor_ms_per_image{suffix}" in bb:
        print(
            f"  JAX{suffix.replace('_', ' ')}: floor "
            f"{bb[f'floor_ms_per_image{suffix}']:.3f} ms/image at the "
            f"{bb[f'peak_of{suffix}']} spec peak, MFU "
            f"{bb[f'mfu_spec{suffix}']:.1%}"
        )
    unlocked = bb.get("mkl_unlocked", {})
    if "torch_ms_per_image" in unlocked:
      line = (
          f"  PyTorch f32 with MKL's vendor check bypassed (child process): "
          f"{unlocked['torch_ms_per_image']:.1f} ms/image"
      )
      if "torch_share_of_peak" in unlocked:
        line += f" = {unlocked['torch_share_of_peak']:.1%} of the peak"
      line += (
          f"; JAX f32 there {unlocked['jax_ms_per_image']:.1f} ms/image, "
          f"speedup x{unlocked['speedup']:.2f}"
      )
      print(line)
    if "error" in unlocked:
      print(f"  (PyTorch with MKL unlocked: {unlocked['error']})")
    if "default_xla_flags" in bb and "jax_ms_per_image" in (
        bb["default_xla_flags"]
    ):
      print(
          f"  XLA default flags: "
          f"{bb['default_xla_flags']['jax_ms_per_image']:.1f} ms/image"
      )
  sweep = results.get("sweep", {})
  for key, row in sweep.items():
    if isinstance(row, dict) and "jax_s" in row:
      line = f"sweep E={key}: JAX {row['jax_s']:.2f} s"
      if sweep.get("repeats", 1) > 1:
        line = f"sweep E={key} (medians of {sweep['repeats']} runs): JAX "
        line += f"{row['jax_s']:.2f} s"
      if row.get("episode_chunk", 0) < int(key):
        line += f" ({row['episode_chunk']} episodes at a time)"
      if "torch_s" in row:
        line += (
            f", peer ({sweep['peer_head']} head) {row['torch_s']:.2f} s"
            f"{' (extrapolated)' if row['torch_extrapolated'] else ''}"
            f", speedup x{row['speedup']:.1f}"
        )
        if "speedup_with_cache" in row:
          line += (
              f" (x{row['speedup_with_cache']:.1f} with the cache's build, "
              f"{sweep['cache_s']:.2f} s)"
          )
      if "floor_train_s" in row:
        line += (
            f"; {row['train_share_of_floor']:.1%} of the {row['floor_peak']}"
            " floor"
        )
      if "torch_head_ms_per_step" in row:
        line += (
            f"; peer per step: backbone "
            f"{row['torch_backbone_ms_per_step']:.1f} ms, head "
            f"{row['torch_head_ms_per_step']:.1f} ms"
        )
      print(line)
  mt = results.get("metrics", {})
  if "ours_s" in mt:
    print(
        f"pixel AUROC over {mt['pixels']:,} pixels: ours {mt['ours_s']:.2f} "
        f"s / {mt['ours_peak_mb']:.0f} MiB, scikit-learn "
        f"{mt['sklearn_s']:.2f} s / {mt['sklearn_peak_mb']:.0f} MiB"
    )
  for note in results.get("notes", []):
    print("NOTE:", note)
  for row in results.get("targets", []):
    print(f"[{'met' if row['met'] else 'MISSED'}] {row['target']} "
          f"(measured {row['value']:.3g})")  # fmt: skip


def torch_unlocked_backbone(args, peak_gflops):
  """The f32 backbone pair again, with MKL's vendor check bypassed.

  Runs in a child process started with `mkl_unlock`'s shim preloaded: JAX
  and PyTorch f32 interleaved there, as in this process, at the first
  backbone model's settings.

  Args:
    args: the parsed command line (backbone settings, torch_compile).
    peak_gflops: the peak for the shares (None: none).

  Returns:
    The child's PyTorch and JAX times, their ratio, PyTorch's share of the
    peak, the outputs' agreement, and `mkl_unlocked` (whether the shim was
    loaded there); or {"error": message}.
  """
  child_args = [
      "--backbone_models", args.backbone_models[0],
      "--backbone_batch", str(args.backbone_batch),
      "--repeats", str(args.repeats), "--warmup", str(args.warmup),
  ]  # fmt: skip
  if not args.torch_compile:
    child_args.append("--no-torch_compile")
  if peak_gflops:
    child_args += ["--peak_gflops", str(peak_gflops)]
  with tempfile.TemporaryDirectory(prefix="ultraad_mkl_") as tmp:
    try:
      library = mkl_unlock.build(tmp)
    except RuntimeError as e:
      return {"error": f"the MKL shim could not be built: {e}"}
    child = run_child("backbone_torch", child_args, "project",
                      env=mkl_unlock.environment(library))  # fmt: skip
  keep = ("torch_ms_per_image", "jax_ms_per_image", "speedup", "torch_gflops",
          "torch_share_of_peak", "mfu", "max_abs_diff_torch_vs_jax",
          "mkl_unlocked", "timings", "error")  # fmt: skip
  out = {k: child[k] for k in keep if k in child}
  if "error" not in out and not out.get("mkl_unlocked"):
    out["error"] = (
        "the child ran without the MKL shim (the dynamic loader did not map "
        "it): its PyTorch time is stock PyTorch's"
    )
  return out


def _rerun_unlocked(args, argv):
  """Runs this command again, whole, with MKL's vendor check bypassed.

  Args:
    args: the parsed command line (for --json).
    argv: the command line (None: sys.argv[1:]).

  Returns:
    The rerun's results, read back from --json (None without --json).

  Raises:
    RuntimeError: the shim could not be built.
    SystemExit: the rerun failed (with its exit status).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  with tempfile.TemporaryDirectory(prefix="ultraad_mkl_") as tmp:
    library = mkl_unlock.build(tmp)
    print(f"--mkl_unlock: running again with {library} preloaded", flush=True)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)] + argv,
        env=mkl_unlock.environment(library),
        check=False,
    )
  if proc.returncode:
    raise SystemExit(proc.returncode)
  if not args.json:
    return None
  with open(args.json, encoding="utf-8") as f:
    return json.load(f)


def measure_peak(args, info, notes):
  """The f32 peak the MFU divides by, and how it was obtained.

  On a CPU: the register-bound C kernel (native_peak.py), a matmul and (not
  in --quick, or when the C kernel cannot run) XLA's FMA loop in a child
  with 512-bit vectors; the largest measured rate is used, each being a
  lower bound on the true peak. On an accelerator: its spec sheet
  (accelerator_peaks.py). --peak_gflops overrides either.

  Args:
    args: the parsed command line.
    info: `bench_machine.machine_info()`.
    notes: the run's notes (appended to).

  Returns:
    A dict with "peak_gflops" and "source" when a peak is known, the
    measurements, and "spec" on an accelerator ({} when nothing applies).
  """
  on_cpu = info["jax_backend"] == "cpu"
  peak = {}
  if args.peak_gflops:
    peak["peak_gflops"] = args.peak_gflops
    peak["source"] = "--peak_gflops"
  if "peak" in args.sections and on_cpu and args.peak:
    print(
        "peak: fma_peak.c, a matmul and (not in --quick) XLA's FMA loop "
        "(child, 512-bit vectors)...",
        flush=True,
    )
    # The register-bound C kernel first, while nothing else has started
    # threads (native_peak.py); then XLA's loop and a matmul.
    native = native_peak.measure(
        set(bench_machine.cpuinfo().get("flags", "").split()), info["cores"]
    )
    peak["native"] = native
    # XLA's own FMA loop is a fallback: it stays below the C kernel (115-125
    # against 186-299 GFLOP/s here) and its child process took 15 s on a
    # fresh machine, so --quick runs it only when the C kernel did not run.
    if args.mode != "quick" or "error" in native:
      child = run_child("peak", [], "vector512")
      peak.update({k: v for k, v in child.items() if k != "xla_flags"})
    peak["matmul_gflops"] = bench_machine.matmul_rate(
        4096 if args.mode != "quick" else 2048
    )
    peak["theoretical"] = bench_machine.theoretical_peak(
        info, native.get("clock_ghz")
    )
    measured = {
        "fma_peak.c": native.get("c_fma_gflops", 0.0),
        "XLA's FMA loop": peak.get("fma_loop_gflops"),
        "a matmul": peak["matmul_gflops"],
    }
    measured = {k: v for k, v in measured.items() if v is not None}
    if "peak_gflops" not in peak:
      best = max(measured, key=measured.get)
      peak["peak_gflops"] = measured[best]
      peak["source"] = (
          f"{best}: the largest measured rate of "
          + ", ".join(measured)
          + " (each a lower bound on the true peak)"
      )
      if "error" in native:
        peak["source"] += f"; the C kernel did not run: {native['error']}"
    print(
        f"  fma_peak.c {native.get('c_fma_gflops', float('nan')):.0f} at "
        f"{native.get('clock_ghz', float('nan')):.2f} GHz measured, XLA FMA "
        f"loop {peak.get('fma_loop_gflops', float('nan')):.0f}, matmul "
        f"{peak['matmul_gflops']:.0f}, formula "
        f"{peak['theoretical']['formula_gflops']:.0f} / microarch "
        f"{peak['theoretical']['microarch_gflops']:.0f} GFLOP/s at "
        f"{peak['theoretical']['clock_ghz']:.2f} GHz "
        f"({peak['theoretical']['clock_source']}); peak used: "
        f"{peak['peak_gflops']:.0f}",
        flush=True,
    )
    if "error" in native:
      print(
          f"  (fma_peak.c did not run: {native['error']})",
          flush=True,
      )
  # An accelerator's peaks come from its spec sheet (accelerator_peaks.py).
  spec = None
  if not on_cpu:
    spec = accelerator_peaks.spec_peak(info["device_kind"])
    peak["spec"] = spec
    if spec is None:
      notes.append(
          f"No spec-sheet peak is known for device kind "
          f"{info['device_kind']!r} (benchmarks/accelerator_peaks.py): no "
          "floors, and an MFU only with --peak_gflops."
      )
    elif "peak_gflops" not in peak and spec["fp32"]:
      peak["peak_gflops"] = 1e3 * spec["fp32"]
      peak["source"] = f"spec sheet, fp32 dense: {spec['source']}"
  return peak


def _child_main(args):
  kind = args._child  # pylint: disable=protected-access
  if kind == "peak":
    out = bench_machine.fma_peak()
  elif kind == "backbone_jax":
    out = bench_backbone.measure(
        args.backbone_models[0], batch=args.backbone_batch,
        repeats=args.repeats, warmup=args.warmup, bf16=False,
        with_torch=False)  # fmt: skip
  elif kind == "backbone_torch":
    out = bench_backbone.measure(
        args.backbone_models[0], batch=args.backbone_batch,
        repeats=args.repeats, warmup=args.warmup, bf16=False,
        torch_compile=args.torch_compile,
        peak_gflops=args.peak_gflops)  # fmt: skip
    out["mkl_unlocked"] = mkl_unlock.active()
  else:
    raise ValueError(f"unknown child {kind!r}")
  out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  print(json.dumps(out), flush=True)


def main(argv=None):
  """Runs the selected sections and writes the JSON; returns the results."""
  args = parse_args(argv)
  if args._child:  # pylint: disable=protected-access
    _child_main(args)
    return None
  if args.trace_summary:
    summary = trace_summary.summarize(args.trace_summary)
    trace_summary.print_summary(summary)
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary
  if args.mkl_unlock and not os.environ.get(mkl_unlock.MARKER):
    return _rerun_unlocked(args, argv)
  unknown = set(args.sections) - {"peak", "backbone", "sweep", "metrics"}
  if unknown:
    raise ValueError(
        f"--sections has unknown entries {sorted(unknown)}; expected some of "
        "peak, backbone, sweep, metrics."
    )
  t_start = time.time()
  info = bench_machine.machine_info()
  results = {
      "mode": args.mode,
      "machine": info,
      "notes": [],
      "settings": {k: getattr(args, k) for k in MODES[args.mode]},
  }
  results["settings"]["torch_compile"] = args.torch_compile
  results["settings"]["torch_head_compile"] = args.torch_head_compile
  results["settings"]["peer_head"] = args.peer_head
  results["settings"]["peer_threads"] = args.peer_threads
  on_cpu = info["jax_backend"] == "cpu"
  if args.fast_f32 is None:
    args.fast_f32 = not on_cpu
  results["settings"]["fast_f32"] = args.fast_f32
  results["settings"]["sweep_precision"] = args.sweep_precision
  torch_device = "cpu"
  if args.torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top

      if not on_cpu and torch.cuda.is_available():
        torch_device = "cuda"
      elif not on_cpu:
        results["notes"].append(
            "PyTorch has no CUDA device here: its side runs on the CPU."
        )
    except ImportError:
      args.torch = False
      results["notes"].append("PyTorch is not installed: JAX side only.")
  results["machine"]["torch_device"] = torch_device
  print(f"bench.py mode={args.mode}: {info['cpu_model']} ({info['vendor']}), "
        f"{info['cores']} cores, JAX on {info['jax_backend']}, load average "
        f"{info['load_average'][0]:.2f}", flush=True)  # fmt: skip
  if on_cpu and info["load_average"][0] > 0.3:
    results["notes"].append(
        f"The machine was not idle: 1-minute load average "
        f"{info['load_average'][0]:.2f} at the start (see load_average_end "
        "too). Other processes take cores and, worse, stall PyTorch's "
        "OpenMP barriers; trust only small spreads."
    )
  try:
    results["machine"]["nice"] = os.nice(0)
  except OSError:
    pass
  if args.mkl_unlock and not info["mkl_unlocked"]:
    raise RuntimeError(
        "--mkl_unlock: this process was started with the MKL shim in "
        f"LD_PRELOAD ({os.environ.get('LD_PRELOAD')!r}) but the dynamic "
        "loader did not load it; see its warning above."
    )
  if info["mkl_unlocked"]:
    results["notes"].append(
        "--mkl_unlock: every PyTorch side ran with MKL's vendor check "
        "bypassed (benchmarks/mkl_unlock.py), not as stock PyTorch runs. "
        "The backbone speedup target, against stock PyTorch, is not checked."
    )
  unlock_why = None
  if args.torch and torch_device == "cpu":
    import torch  # pylint: disable=g-import-not-at-top

    unlock_why = mkl_unlock.reason_not_applicable(
        info["vendor"], torch.backends.mkl.is_available()
    )
  if args.torch_unlocked is None:
    args.torch_unlocked = (
        unlock_why is None and args.torch and torch_device == "cpu"
    )
  args.torch_unlocked = args.torch_unlocked and not info["mkl_unlocked"]
  results["settings"]["torch_unlocked"] = args.torch_unlocked
  results["settings"]["mkl_unlock"] = args.mkl_unlock
  if (info["vendor"] == "AMD" and args.torch and torch_device == "cpu"
      and not info["mkl_unlocked"]):  # fmt: skip
    results["notes"].append(
        "AMD CPU: stock PyTorch's f32 matmuls go through Intel MKL, which "
        "skips its AVX-512 kernels on AMD processors. Where AVX-512 runs at "
        "full width (Zen 5) that leaves PyTorch f32 at about a third of the "
        "peak and flatters any ratio to it; on Zen 4 (AMD family 0x19), "
        "whose AVX-512 runs at the AVX2 rate, it costs little. Either way "
        "the honest figure is the share of the FMA peak (MFU; PyTorch's "
        "share is backbone.torch_share_of_peak). backbone.mkl_unlocked "
        "times PyTorch again with the check bypassed (--torch_unlocked)."
    )

  # ---- Peak ----------------------------------------------------------------
  peak = measure_peak(args, info, results["notes"])
  if peak:
    results["peak"] = peak
  spec = peak.get("spec")

  # Wall seconds of each section (the quick mode must fit 5 minutes).
  section_s = results["section_s"] = {"setup_and_peak": time.time() - t_start}

  # ---- Backbone ------------------------------------------------------------
  if "backbone" in args.sections:
    with _timed_section(section_s, "backbone"):
      per_model = {}
      for i, name in enumerate(args.backbone_models):
        print(f"backbone {name}...", flush=True)
        per_model[name] = bench_backbone.measure(
            name, batch=args.backbone_batch if i == 0 else max(
                args.backbone_batch, 32),
            repeats=args.repeats, warmup=args.warmup,
            # bf16 at the first (full-size) model only in quick mode: each
            # bf16 path costs another PyTorch compilation.
            bf16=args.bf16 and (i == 0 or args.mode != "quick"),
            with_torch=args.torch, torch_device=torch_device,
            torch_compile=args.torch_compile,
            peak_gflops=peak.get("peak_gflops"),
            fast_f32=args.fast_f32)  # fmt: skip
      primary = per_model[args.backbone_models[0]]
      backbone = dict(primary)
      for name in args.backbone_models[1:]:
        backbone[name] = per_model[name]
      if args.default_flags and on_cpu:
        print("backbone with XLA's default flags (child)...", flush=True)
        child = run_child(
            "backbone_jax",
            ["--backbone_models", args.backbone_models[0], "--backbone_batch",
             str(args.backbone_batch), "--repeats", str(args.repeats),
             "--warmup", str(args.warmup)], "default")  # fmt: skip
        keep = ("jax_ms_per_image", "timings", "xla_flags", "error")
        backbone["default_xla_flags"] = {
            k: child[k] for k in keep if k in child
        }
        if "jax_ms_per_image" in child:
          backbone["project_flags_speedup"] = (
              child["jax_ms_per_image"] / primary["jax_ms_per_image"]
          )
      if args.torch_unlocked:
        print(
            "backbone: PyTorch f32 with MKL's vendor check bypassed "
            "(child)...",
            flush=True,
        )
        unlocked = torch_unlocked_backbone(args, peak.get("peak_gflops"))
        if unlock_why:
          unlocked["note"] = (
              f"asked for with --torch_unlocked, but {unlock_why}"
          )
        backbone["mkl_unlocked"] = unlocked
      if spec:
        backbone.update(
            bench_backbone.spec_shares(primary, spec, info["jax_backend"])
        )
      results["backbone"] = backbone

  # ---- Sweep ---------------------------------------------------------------
  if "sweep" in args.sections:
    tf32 = args.sweep_precision == "tensorfloat32"
    with _timed_section(section_s, "sweep"), jax.default_matmul_precision(
        args.sweep_precision
    ), (
        bench_backbone.torch_matmul_precision(tf32)
        if args.torch
        else contextlib.nullcontext()
    ):
      print(f"sweep {args.sweep_model}, E={args.sweep_episodes}...", flush=True)
      results["sweep"] = bench_sweep.measure(
          model_name=args.sweep_model,
          episodes=args.sweep_episodes,
          steps=args.sweep_steps,
          shots=args.sweep_shots,
          pool=args.sweep_pool,
          torch_max_episodes=args.torch_max_episodes,
          torch_device=torch_device,
          torch_compile=args.torch_compile,
          compile_head=args.torch_head_compile,
          peer_head=args.peer_head,
          torch_threads=args.peer_threads,
          with_torch=args.torch,
          steps_per_call=args.steps_per_call,
          repeats=args.sweep_repeats,
      )
      results["sweep"]["precision"] = args.sweep_precision
      if spec:
        bench_sweep.add_floors(results["sweep"], spec, args.sweep_precision)

  # ---- Metrics -------------------------------------------------------------
  if "metrics" in args.sections:
    print(
        f"metrics: {args.metrics_maps} maps of {args.metrics_size}^2...",
        flush=True,
    )
    with _timed_section(section_s, "metrics"):
      results["metrics"] = bench_metrics.measure(
          args.metrics_maps, args.metrics_size, args.metrics_repeats
      )

  results["targets"] = bench_targets.check(results)
  results["machine"]["load_average_end"] = list(os.getloadavg())
  results["wall_s"] = time.time() - t_start
  _print_summary(results)
  print(f"total {results['wall_s']:.0f} s", flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1, default=str)
    print(f"wrote {args.json}")
  if args.figure:
    bench_figure.draw(results, args.figure)
    print(f"wrote {args.figure}")
  return results


if __name__ == "__main__":
  main()
