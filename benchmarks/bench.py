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
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings

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

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import common  # pylint: disable=g-import-not-at-top
import accelerator_peaks  # pylint: disable=g-import-not-at-top
import bench_figure  # pylint: disable=g-import-not-at-top
import metrics_memory  # pylint: disable=g-import-not-at-top
import mkl_unlock  # pylint: disable=g-import-not-at-top
import native_peak  # pylint: disable=g-import-not-at-top
from ultraad_jax import clip  # pylint: disable=g-import-not-at-top
from ultraad_jax import features  # pylint: disable=g-import-not-at-top
from ultraad_jax import metrics  # pylint: disable=g-import-not-at-top
from ultraad_jax import model  # pylint: disable=g-import-not-at-top
from ultraad_jax import train  # pylint: disable=g-import-not-at-top

MIB = 2.0**20

# Settings of each mode; every entry can be overridden on the command line.
MODES = {
    "quick": dict(
        backbone_models=("ViT-B/16",), backbone_batch=8, repeats=3,
        warmup=1, bf16=False, default_flags=False, sweep_episodes=(1, 8, 64),
        sweep_steps=10, sweep_model="tiny", sweep_shots=4, sweep_pool=64,
        torch_max_episodes=16, metrics_maps=100, metrics_size=224,
        metrics_repeats=1, peak=True,
    ),
    "full": dict(
        backbone_models=("ViT-B/16", "tiny"), backbone_batch=8, repeats=10,
        warmup=3, bf16=True, default_flags=True,
        sweep_episodes=(1, 8, 64, 256), sweep_steps=50, sweep_model="tiny",
        sweep_shots=4, sweep_pool=128, torch_max_episodes=64,
        metrics_maps=1000, metrics_size=336, metrics_repeats=1, peak=True,
    ),
    "accelerator": dict(
        backbone_models=("ViT-L/14@336",), backbone_batch=32, repeats=10,
        warmup=3, bf16=False, default_flags=False,
        sweep_episodes=(1, 16, 256), sweep_steps=50,
        sweep_model="ViT-L/14@336", sweep_shots=4, sweep_pool=256,
        torch_max_episodes=4, metrics_maps=1000, metrics_size=336,
        metrics_repeats=1, peak=False,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------
# Timing helpers.
# ----------------------------------------------------------------------------


def summarize(times):
  """Median and spread of repeated timings (seconds).

  Args:
    times: the timings of the repeats.

  Returns:
    {"median_s", "min_s", "max_s", "spread"} with spread = (max - min) /
    median, and "repeats".
  """
  times = [float(t) for t in times]
  med = statistics.median(times)
  return {
      "median_s": med,
      "min_s": min(times),
      "max_s": max(times),
      "spread": (max(times) - min(times)) / med if med > 0 else float("nan"),
      "repeats": len(times),
  }


def time_interleaved(fns, repeats, warmup):
  """Times several contenders with their repeats interleaved.

  Each round runs every contender once, in an order rotated every round, so
  that a burst of load from elsewhere hits all of them alike.

  Args:
    fns: name -> a callable that runs one call to completion (it must block
      until the device is done).
    repeats: timed calls per contender.
    warmup: untimed calls per contender first (compilation happens there).

  Returns:
    name -> summarize(...) of its timed calls, plus "first_call_s" (the first
    warm-up call, which includes compilation).
  """
  names = list(fns)
  first = {}
  for name in names:
    for i in range(max(warmup, 1)):
      start = time.perf_counter()
      fns[name]()
      if i == 0:
        first[name] = time.perf_counter() - start
  times = {name: [] for name in names}
  for r in range(repeats):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      start = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - start)
  return {
      name: {**summarize(times[name]), "first_call_s": first[name]}
      for name in names
  }


def _cost(compiled):
  """XLA's cost analysis of a compiled computation as a dict."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


# ----------------------------------------------------------------------------
# The machine and its peak.
# ----------------------------------------------------------------------------


def _cpuinfo():
  info = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, sep, value = line.partition(":")
        if sep and key.strip() not in info:
          info[key.strip()] = value.strip()
        if not line.strip() and info:
          break
  except OSError:
    pass
  return info


def num_cores():
  """CPU cores this process may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def machine_info():
  """What the numbers were measured on: CPU, load, library versions.

  Returns:
    A dict; `vendor` is "AMD", "Intel" or the raw vendor id.
  """
  cpu = _cpuinfo()
  vendor_id = cpu.get("vendor_id", platform.processor())
  vendor = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(
      vendor_id, vendor_id
  )
  flags = set(cpu.get("flags", "").split())
  versions = {"jax": jax.__version__, "numpy": np.__version__}
  for name in ("jaxlib", "flax", "torch", "transformers", "sklearn"):
    try:
      versions[name] = __import__(name).__version__
    except ImportError:
      versions[name] = None
  devices = jax.devices()
  return {
      "cpu_model": cpu.get("model name", platform.processor()),
      "vendor": vendor,
      "cpu_family": int(cpu["cpu family"]) if "cpu family" in cpu else None,
      "cpu_model_number": int(cpu["model"]) if "model" in cpu else None,
      "cores": num_cores(),
      "cpu_mhz": float(cpu["cpu MHz"]) if "cpu MHz" in cpu else None,
      "avx512f": "avx512f" in flags,
      "avx512_bf16": "avx512_bf16" in flags,
      "amx": any(f.startswith("amx") for f in flags),
      "load_average": list(os.getloadavg()),
      "python": platform.python_version(),
      "versions": versions,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind,
      # PyTorch's MKL with its vendor check bypassed (--mkl_unlock).
      "mkl_unlocked": mkl_unlock.active(),
  }


def theoretical_peak(info, measured_clock_ghz=None):
  """The f32 FMA peak from the CPU's description, two ways.

  `formula_gflops` is cores x 2 FMA units x 16 f32 lanes x 2 FLOP x the
  clock. `microarch_gflops` uses 8 lanes per unit where the cores execute
  512-bit FMAs as two 256-bit halves (AMD family 0x19, Zen 4; Zen 3 has no
  AVX-512) or lack AVX-512. The clock is the measured one when given
  (native_peak.py), else what /proc/cpuinfo reports (in a VM usually the
  base clock; the cores boost higher).

  Args:
    info: from `machine_info`.
    measured_clock_ghz: the clock the cores run at, if measured.

  Returns:
    A dict of the two estimates, the clock and its source, and the lanes
    assumed.
  """
  if measured_clock_ghz:
    ghz, source = float(measured_clock_ghz), "measured"
  else:
    ghz, source = (info.get("cpu_mhz") or 0.0) / 1000.0, "/proc/cpuinfo"
  cores = info["cores"]
  lanes = 16 if info.get("avx512f") else 8
  note = "2 FMA units x 16 lanes (AVX-512)"
  if info.get("vendor") == "AMD" and (info.get("cpu_family") or 0) <= 0x19:
    lanes = 8
    note = "AMD family 0x19 (Zen 3/4): 256-bit FMA units, AVX-512 double-pumped"
  elif not info.get("avx512f"):
    note = "no AVX-512: 2 FMA units x 8 lanes (AVX2)"
  return {
      "clock_ghz": ghz,
      "clock_source": source,
      "formula_gflops": cores * 2 * 16 * 2 * ghz,
      "microarch_gflops": cores * 2 * lanes * 2 * ghz,
      "microarch_note": note,
  }


def _fma_loop(rows, chains, unroll, iters):
  """A jitted loop of independent multiply-adds on register-sized vectors.

  Every loop iteration starts `chains` independent chains from the carry
  (shifted by different constants, so that XLA cannot merge them), runs
  `unroll` multiply-adds on each (LLVM contracts them to FMAs; 1 + 1e-5
  keeps the values bounded and normal), and averages the chains back into
  the carry. All values of one [rows, 16] row stay in registers.

  Returns:
    (jitted function of a [rows, 16] float32 array, FLOPs per call counting
    an FMA as 2).
  """
  a, b = np.float32(0.99999), np.float32(1e-5)

  def body(_, x):
    ys = [x + np.float32(k) for k in range(chains)]
    for _ in range(unroll):
      ys = [y * a + b for y in ys]
    total = ys[0]
    for y in ys[1:]:
      total = total + y
    return total * np.float32(1.0 / chains) - np.float32((chains - 1) / 2)

  fn = jax.jit(lambda x: jax.lax.fori_loop(0, iters, body, x))
  return fn, 2 * rows * 16 * chains * unroll * iters


def fma_peak(repeats=5):
  """Measures the f32 FMA rate of all cores (GFLOP/s), best of `repeats`.

  Two layouts: one call on rows enough for XLA to split the loop over its
  threads, and one small call per core from as many Python threads (JAX
  releases the GIL while XLA runs). Run this with 512-bit vectorisation
  (ULTRAAD_BENCH_XLA=vector512): XLA's CPU default of 256-bit vectors halves
  the rate on AVX-512 cores.

  Args:
    repeats: timed calls of each layout.

  Returns:
    {"fma_loop_gflops": best, "parallel_call_gflops", "threads_gflops"}.
  """
  cores = num_cores()
  out = {}
  big, flops_big = _fma_loop(256 * cores, 64, 4, 400)
  x_big = jnp.ones((256 * cores, 16), jnp.float32)
  big = big.lower(x_big).compile()
  jax.block_until_ready(big(x_big))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(big(x_big))
    best = min(best, time.perf_counter() - start)
  out["parallel_call_gflops"] = flops_big / best / 1e9

  small, flops_small = _fma_loop(4, 64, 4, 20000)
  x_small = jnp.ones((4, 16), jnp.float32)
  small = small.lower(x_small).compile()
  jax.block_until_ready(small(x_small))

  def run():
    jax.block_until_ready(small(x_small))

  best = min(native_peak.on_threads(run, cores) for _ in range(repeats))
  out["threads_gflops"] = cores * flops_small / best / 1e9
  out["fma_loop_gflops"] = max(out["parallel_call_gflops"],
                               out["threads_gflops"])  # fmt: skip
  return out


def matmul_rate(n=4096, repeats=5):
  """f32 GFLOP/s of one jitted n x n x n matmul (a lower bound on the peak).

  Args:
    n: the matrix size.
    repeats: timed calls.

  Returns:
    The best rate in GFLOP/s.
  """
  a = jnp.full((n, n), 1e-3, jnp.float32)
  b = jnp.full((n, n), 1e-3, jnp.float32)
  fn = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(fn(a, b))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best / 1e9


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
# Backbone.
# ----------------------------------------------------------------------------


def tapped_layers(num_layers):
  """Four evenly spaced blocks ending at the last, as the peers tap them."""
  if num_layers < 4:
    return tuple(range(1, num_layers + 1))
  return tuple(num_layers * k // 4 for k in (1, 2, 3, 4))


def make_backbone(name, seed=0):
  """A randomly initialised clip.Backbone: "tiny" or an OpenAI CLIP shape.

  Speed does not depend on the weights' values; "tiny" uses clip.tiny's
  init scale so that its blocks mix as a trained model's do.

  Args:
    name: "tiny" or a name `clip.openai_config` knows ("ViT-B/16", ...).
    seed: the initialisation seed.

  Returns:
    A clip.Backbone (float32).
  """
  if name == "tiny":
    return clip.tiny(seed=seed)
  return clip.from_config(clip.openai_config(name), seed=seed)


def analytic_vit_flops(backbone, num_tapped):
  """Hand count of the image tower's FLOPs per image (2 per multiply-add).

  Patch embedding, per block QKV / output / MLP matmuls and the two
  attention matmuls, the pooled projection and the projection of the tapped
  tokens. Norms, softmax and activations are left out (a few percent).

  Args:
    backbone: a clip.Backbone.
    num_tapped: the number of tapped layers (their tokens are projected).

  Returns:
    FLOPs per image.
  """
  v = backbone.config.vision_config
  n = backbone.grid_size**2
  t = n + 1
  w, mlp = v.hidden_size, v.intermediate_size
  d = backbone.embed_dim
  patch = 2 * n * 3 * v.patch_size**2 * w
  block = 2 * t * (4 * w * w + 2 * w * mlp) + 2 * 2 * t * t * w
  proj = 2 * w * d * (1 + num_tapped * n)
  return patch + v.num_hidden_layers * block + proj


def torch_clip(backbone, device="cpu"):
  """A PyTorch CLIPModel holding the same weights as `backbone`.

  Built from the same CLIPConfig and filled by transformers'
  `load_flax_weights_in_pytorch_model` (`from_pretrained(from_flax=True)`
  is broken with torch 2.13).

  Args:
    backbone: a clip.Backbone (float32 parameters).
    device: the torch device.

  Returns:
    The CLIPModel in eval mode.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers import modeling_flax_pytorch_utils as pt_utils

  transformers.logging.set_verbosity_error()

  config = transformers.CLIPConfig.from_dict(backbone.config.to_dict())
  config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  pt = transformers.CLIPModel(config)
  params = jax.tree.map(lambda x: np.array(x, np.float32), backbone.params)
  with warnings.catch_warnings():
    # transformers hands torch read-only views of the (copied) arrays.
    warnings.filterwarnings("ignore", message=".*not writable.*")
    pt = pt_utils.load_flax_weights_in_pytorch_model(pt, params)
  return pt.eval().to(device)


def torch_image_encoder(pt_model, layers):
  """The PyTorch twin of `Backbone.encode_image`, as a torch.nn.Module.

  Args:
    pt_model: a transformers CLIPModel.
    layers: tapped blocks (hidden_states numbering).

  Returns:
    A module mapping NCHW pixels to (global [B, D], projected tokens
    [L, B, N, D], raw tokens [L, B, N, W]).
  """
  import torch  # pylint: disable=g-import-not-at-top

  class ImageEncoder(torch.nn.Module):
    """Vision tower + projection of the global and the tapped tokens."""

    def __init__(self):
      super().__init__()
      self.vision = pt_model.vision_model
      self.projection = pt_model.visual_projection
      self.layers = tuple(layers)

    def forward(self, pixels):
      out = self.vision(pixel_values=pixels, output_hidden_states=True)
      global_embed = self.projection(out.pooler_output)
      raw = torch.stack([out.hidden_states[i][:, 1:] for i in self.layers])
      tokens = self.projection(self.vision.post_layernorm(raw))
      return global_embed, tokens, raw

  return ImageEncoder().eval()


def compile_torch(module):
  """torch.compile with inductor's freezing: a stock install's fastest path.

  Freezing folds the frozen weights into the graph as constants (and lets
  inductor pre-pack them for oneDNN); it applies under no_grad/inference.

  Args:
    module: a torch.nn.Module in eval mode.

  Returns:
    The compiled module (compiles on its first call).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch._inductor import config as inductor_config  # pylint: disable=all

  inductor_config.freezing = True
  return torch.compile(module, dynamic=False)


def _torch_sync(device):
  import torch  # pylint: disable=g-import-not-at-top

  if device == "cuda":
    torch.cuda.synchronize()


@contextlib.contextmanager
def torch_matmul_precision(tf32):
  """PyTorch's f32 products on CUDA: true f32, or TF32 tensor cores.

  PyTorch's defaults differ by op: matrix products in true f32, cuDNN's
  convolutions (CLIP's patch embedding) in TF32. Both follow `tf32` here, so
  that each side of a comparison computes what the other does. CPUs ignore
  both settings.

  Args:
    tf32: allow TF32 in matrix products and convolutions.

  Yields:
    None; the previous settings come back on exit.
  """
  import torch  # pylint: disable=g-import-not-at-top

  old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = tf32
  torch.backends.cudnn.allow_tf32 = tf32
  try:
    yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def bench_backbone(
    name,
    *,
    batch,
    repeats,
    warmup,
    bf16=True,
    with_torch=True,
    torch_device="cpu",
    torch_compile=True,
    peak_gflops=None,
    fast_f32=False,
    seed=0,
):
  """Times encode_image (JAX) against its PyTorch twin at one model size.

  The f32 paths compute true f32 products on both sides, on every platform
  (JAX's precision "float32"; PyTorch with TF32 off). With `fast_f32`, the
  platform's fast f32 path is timed too: JAX's default precision (TF32 on
  NVIDIA GPUs, one bf16 pass on TPU) against PyTorch with TF32 on.

  Args:
    name: "tiny" or an OpenAI CLIP name (random weights).
    batch: images per call.
    repeats: timed calls per contender.
    warmup: untimed calls first.
    bf16: also time the bf16 paths.
    with_torch: time PyTorch (else JAX only).
    torch_device: "cpu" or "cuda".
    torch_compile: torch.compile the PyTorch side (off only in tests).
    peak_gflops: the f32 peak for the MFU (None: no MFU).
    fast_f32: also time the fast f32 paths (by default on accelerators;
      on a CPU they compute what the f32 paths do).
    seed: weights and pixels seed.

  Returns:
    A dict: ms/image of each path, ratios, FLOPs, MFU, output agreement.
  """
  backbone = make_backbone(name, seed=seed)
  layers = tapped_layers(backbone.num_layers)
  size = backbone.image_size
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  pixels_np = clip.normalize(images)
  pixels = jax.device_put(pixels_np)
  params = jax.device_put(backbone.params)
  encode = jax.jit(backbone.encode_image, static_argnums=2)
  # The precision is read when the program is traced (here, by lower).
  with jax.default_matmul_precision("float32"):
    compiled = encode.lower(params, pixels, layers).compile()
  cost = _cost(compiled)
  flops = float(cost.get("flops", float("nan")))

  jax.block_until_ready(compiled(params, pixels))
  start = time.perf_counter()
  jax.block_until_ready(compiled(params, pixels))
  # Small models run several calls per timed sample (>= ~0.1 s), so that
  # timer and dispatch noise stay small against the work.
  inner = int(min(100, max(1, math.ceil(0.1 / (time.perf_counter() - start)))))

  def repeat(fn):
    def run():
      for _ in range(inner):
        fn()

    return run

  fns = {"jax_f32": lambda: jax.block_until_ready(compiled(params, pixels))}
  if fast_f32:
    with jax.default_matmul_precision("default"):
      compiled_fast = encode.lower(params, pixels, layers).compile()
    fns["jax_fast_f32"] = lambda: jax.block_until_ready(
        compiled_fast(params, pixels)
    )
  if bf16:
    bb16 = dataclasses.replace(backbone, dtype=jnp.bfloat16)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    compiled16 = (
        jax.jit(bb16.encode_image, static_argnums=2)
        .lower(params16, pixels, layers)
        .compile()
    )
    fns["jax_bf16"] = lambda: jax.block_until_ready(
        compiled16(params16, pixels)
    )

  result = {
      "model": name,
      "image_size": size,
      "batch": batch,
      "layers": list(layers),
      "jax_flops_per_image": flops / batch,
      "analytic_flops_per_image": analytic_vit_flops(backbone, len(layers)),
      "jax_bytes_accessed_per_image": float(
          cost.get("bytes accessed", float("nan"))
      ) / batch,
  }  # fmt: skip
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(num_cores())
    pt_model = torch_clip(backbone, torch_device)
    encoder = torch_image_encoder(pt_model, layers)
    x = torch.from_numpy(np.ascontiguousarray(pixels_np.transpose(0, 3, 1, 2)))
    x = x.to(torch_device)
    with torch.no_grad(), torch_matmul_precision(tf32=False):
      eager_out = [t.float().cpu().numpy() for t in encoder(x)]
    jax_out = jax.device_get(compiled(params, pixels))
    result["max_abs_diff_torch_vs_jax"] = float(max(
        np.max(np.abs(a - b)) for a, b in zip(eager_out, jax_out)
    ))  # fmt: skip
    maybe_compile = compile_torch if torch_compile else (lambda m: m)
    comp32 = maybe_compile(encoder)

    def torch_f32():
      with torch.no_grad(), torch_matmul_precision(tf32=False):
        comp32(x)
      _torch_sync(torch_device)

    fns["torch_f32"] = torch_f32
    if fast_f32:
      # Its own compiled module: inductor reads the TF32 switch when it
      # compiles.
      comp_fast = maybe_compile(torch_image_encoder(pt_model, layers))

      def torch_fast_f32():
        with torch.no_grad(), torch_matmul_precision(tf32=True):
          comp_fast(x)
        _torch_sync(torch_device)

      fns["torch_fast_f32"] = torch_fast_f32
    if bf16:
      # A second compiled module: its graph is traced under autocast.
      comp16 = maybe_compile(torch_image_encoder(pt_model, layers))

      def torch_bf16():
        with torch.no_grad(), torch.autocast(
            device_type=torch_device, dtype=torch.bfloat16
        ):
          comp16(x)
        _torch_sync(torch_device)

      fns["torch_bf16"] = torch_bf16

  timings = time_interleaved({k: repeat(f) for k, f in fns.items()}, repeats,
                             warmup)  # fmt: skip
  for t in timings.values():
    for key in ("median_s", "min_s", "max_s"):
      t[key] /= inner
  result["calls_per_sample"] = inner
  result["timings"] = timings
  names = {"jax_f32": "jax_ms_per_image", "jax_bf16": "jax_ms_per_image_bf16",
           "jax_fast_f32": "jax_ms_per_image_fast_f32",
           "torch_f32": "torch_ms_per_image",
           "torch_bf16": "torch_ms_per_image_bf16",
           "torch_fast_f32": "torch_ms_per_image_fast_f32"}  # fmt: skip
  for key, t in timings.items():
    result[names[key]] = 1e3 * t["median_s"] / batch
  result["jax_gflops"] = flops / timings["jax_f32"]["median_s"] / 1e9
  if with_torch:
    # The same work, so XLA's FLOP count serves for PyTorch too.
    result["torch_gflops"] = flops / timings["torch_f32"]["median_s"] / 1e9
  if peak_gflops:
    result["mfu"] = result["jax_gflops"] / peak_gflops
    if with_torch:
      result["torch_share_of_peak"] = result["torch_gflops"] / peak_gflops
  if with_torch:
    result["speedup"] = (
        result["torch_ms_per_image"] / result["jax_ms_per_image"]
    )
    if fast_f32:
      result["speedup_fast_f32"] = (
          result["torch_ms_per_image_fast_f32"]
          / result["jax_ms_per_image_fast_f32"]
      )
    if bf16:
      result["speedup_bf16"] = (
          result["torch_ms_per_image_bf16"] / result["jax_ms_per_image_bf16"]
      )
      best_torch = min(result["torch_ms_per_image"],
                       result["torch_ms_per_image_bf16"])  # fmt: skip
      best_jax = min(result["jax_ms_per_image"],
                     result["jax_ms_per_image_bf16"])  # fmt: skip
      result["speedup_best_vs_best"] = best_torch / best_jax
  return result


def spec_shares(bb, spec, backend):
  """Floors and MFUs of the JAX backbone paths against a spec sheet's peaks.

  Each path is bounded by the peak of the arithmetic it runs: the f32 path
  (true f32 products) by the fp32 peak; the fast f32 path (JAX's default
  precision) by the TF32 peak on a GPU and the bf16 peak on a TPU (one bf16
  pass); the bf16 path by the bf16 peak. All use XLA's FLOP count of the
  f32 program (the same work).

  Args:
    bb: `bench_backbone`'s result.
    spec: an `accelerator_peaks.spec_peak` entry.
    backend: jax.default_backend().

  Returns:
    {"floor_ms_per_image<suffix>", "mfu_spec<suffix>", "peak_of<suffix>"}
    for each timed path whose peak the spec sheet gives (suffix "",
    "_fast_f32" or "_bf16").
  """
  bounds = {"": "fp32", "_fast_f32": "tf32" if backend == "gpu" else "bf16",
            "_bf16": "bf16"}  # fmt: skip
  out = {}
  for suffix, name in bounds.items():
    ms = bb.get(f"jax_ms_per_image{suffix}")
    seconds = accelerator_peaks.floor(bb["jax_flops_per_image"], spec[name])
    if ms is None or seconds is None:
      continue
    out[f"floor_ms_per_image{suffix}"] = 1e3 * seconds
    out[f"mfu_spec{suffix}"] = 1e3 * seconds / ms
    out[f"peak_of{suffix}"] = name
  return out


def add_sweep_floors(sweep, spec, precision):
  """Adds each E's floor (steps x step FLOPs / peak) to the sweep's rows.

  Args:
    sweep: `bench_sweep`'s result (rows keyed by str(E), with `step_flops`).
    spec: an `accelerator_peaks.spec_peak` entry.
    precision: the sweep's precision: "float32" (bounded by the fp32 peak)
      or "tensorfloat32" (the TF32 peak).
  """
  name = "fp32" if precision == "float32" else "tf32"
  for row in sweep.values():
    if not isinstance(row, dict) or "step_flops" not in row:
      continue
    step = accelerator_peaks.floor(row["step_flops"], spec[name])
    if step is None:
      continue
    row["floor_train_s"] = sweep["steps"] * step
    row["train_share_of_floor"] = row["floor_train_s"] / row["train_s"]
    row["floor_peak"] = name


# ----------------------------------------------------------------------------
# Few-shot sweep.
# ----------------------------------------------------------------------------


def synthetic_pool(num_images, size, seed=0):
  """A labelled image pool: labels cycle 0, 1, 2; abnormal ones get a lesion.

  Args:
    num_images: pool size (>= 3 x shots).
    size: square image size.
    seed: random seed.

  Returns:
    (images [n, size, size, 3] uint8, masks [n, size, size] uint8 in {0, 1},
    labels [n] int32).
  """
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
  labels = (np.arange(num_images) % 3).astype(np.int32)
  masks = np.zeros((num_images, size, size), np.uint8)
  yy, xx = np.mgrid[0:size, 0:size]
  for i in np.flatnonzero(labels):
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    ry, rx = rng.uniform(0.1 * size, 0.25 * size, 2)
    masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
  return images, masks, labels


def draw_supports(labels, num_episodes, shots, seed=0):
  """Support indices of each episode: `shots` images of each class.

  Args:
    labels: [n] pool labels in {0, 1, 2}.
    num_episodes: E.
    shots: images per class.
    seed: random seed.

  Returns:
    [E, 3 * shots] int indices into the pool.
  """
  rng = np.random.default_rng(seed)
  by_class = [np.flatnonzero(labels == c) for c in range(3)]
  for c, idx in enumerate(by_class):
    if len(idx) < shots:
      raise ValueError(
          f"The pool holds {len(idx)} images of class {c}, fewer than "
          f"shots={shots}; raise --sweep_pool to at least {3 * shots}."
      )
  return np.stack([
      np.concatenate([rng.choice(idx, shots, replace=False)
                      for idx in by_class])
      for _ in range(num_episodes)
  ])  # fmt: skip


def description_embeds(num_episodes, support_size, dim, seed=0):
  """Random description embeddings (Pt) of every episode's support rows.

  Their values do not change the work, so both sides train on these rather
  than on encoded descriptions.

  Args:
    num_episodes: E.
    support_size: S.
    dim: D.
    seed: random seed.

  Returns:
    [E, S, D] float32.
  """
  rng = np.random.default_rng(seed)
  return rng.standard_normal((num_episodes, support_size, dim)).astype(
      np.float32
  )


def sweep_model_config(layers, fused_map_loss=None):
  """The sweep's model.ModelConfig: the base config's head at `layers`.

  Args:
    layers: the tapped layers.
    fused_map_loss: replaces the config's `fused_map_loss` (None: keep
      its "auto").

  Returns:
    A model.ModelConfig.
  """
  cfg = model.ModelConfig.from_dict(
      common.model_config(layers=layers).to_dict()
  )
  if fused_map_loss is None:
    return cfg
  return dataclasses.replace(cfg, fused_map_loss=fused_map_loss)


def engine_step_fn(tx, cfg, backbone, chunk, compiler_options=None):
  """The engine's jitted train step, as `train.train_and_evaluate` builds it.

  Args:
    tx: the optax optimiser.
    cfg: model.ModelConfig.
    backbone: the clip.Backbone.
    chunk: episodes at once (`train.episode_chunk`).
    compiler_options: per-program XLA options (None: XLA's).

  Returns:
    The jitted `train.train_step`, donating its state.
  """
  return jax.jit(
      functools.partial(
          train.train_step, tx=tx, cfg=cfg, backbone=backbone, chunk=chunk
      ),
      donate_argnums=(0,),
      compiler_options=compiler_options,
  )


def episodes_init_fn(cfg, backbone, tx):
  """The engine's initialisation of every episode, as `train` runs it.

  Args:
    cfg: model.ModelConfig.
    backbone: the clip.Backbone.
    tx: the optax optimiser.

  Returns:
    `init_all(keys, ep_data, cache_arrays, clip_params)`, vmapped over the
    episodes: (trainable parameters, optimiser state, frozen state).
  """

  def init_all(keys, ep_data, cache_arrays, clip_params):
    def one(key, ep):
      support = train.gather_support(cache_arrays, ep)
      params = model.init(key, cfg, backbone, clip_params, support)
      fz = model.frozen(cfg, backbone, clip_params, support)
      return params, tx.init(params), fz

    return jax.vmap(one)(keys, ep_data)

  return init_all


def jax_engine(backbone, cfg, cache, supports, labels, steps, seed=0, *,
               text_embed=None, return_init=False):  # fmt: skip
  """Trains E episodes with the project's engine; returns timings.

  Inputs are built as `train.train_and_evaluate` builds them (cache rows,
  `train.gather_support`, `model.init` / `model.frozen` vmapped over
  episodes, `train.make_optimizer` with the base config's schedule), on one
  device without a mesh.

  Args:
    backbone: the clip.Backbone the cache was built with.
    cfg: model.ModelConfig.
    cache: a features.FeatureCache of the pool.
    supports: [E, S] support indices into the pool.
    labels: [n] pool labels.
    steps: timed training steps.
    seed: random seed.
    text_embed: [E, S, D] description embeddings (default:
      `description_embeds(E, S, D, seed)`).
    return_init: also return the episodes' initial parameters.

  Returns:
    A dict: init and step compile seconds, `init_s` and `train_s` (timed,
    compilation excluded), `jax_s` (their sum), XLA's FLOPs per step, the
    last step's loss (mean over episodes, and episode 0's). With
    return_init, (that dict, the initial parameters as a host pytree of
    numpy arrays stacked over episodes), copied after the timed
    initialisation and before the timed steps.
  """
  num_episodes, s = supports.shape
  if text_embed is None:
    text_embed = description_embeds(num_episodes, s, backbone.embed_dim, seed)
  ep_data = jax.device_put({
      "rows": cache.rows[supports, 0].astype(np.int32),
      "labels": labels[supports].astype(np.int32),
      "group": np.broadcast_to(np.arange(s, dtype=np.int32),
                               (num_episodes, s)).copy(),
      "text_embed": np.asarray(text_embed, np.float32),
  })  # fmt: skip
  cache_arrays = (cache.global_embed, cache.patch_tokens,
                  jax.device_put(cache.masks))  # fmt: skip
  clip_params = jax.device_put(backbone.params)
  tx = train.make_optimizer(sweep_train_config(steps))

  init_all = episodes_init_fn(cfg, backbone, tx)
  keys = jax.random.split(jax.random.key(seed), num_episodes)
  out = {}
  start = time.perf_counter()
  init_c = jax.jit(init_all).lower(keys, ep_data, cache_arrays,
                                   clip_params).compile()  # fmt: skip
  out["init_compile_s"] = time.perf_counter() - start
  start = time.perf_counter()
  params, opt, frozen = jax.block_until_ready(
      init_c(keys, ep_data, cache_arrays, clip_params)
  )
  out["init_s"] = time.perf_counter() - start
  # np.array copies: the step donates (and deletes) these buffers.
  init_params = jax.tree.map(np.array, params) if return_init else None

  state = {"params": params, "opt": opt, "step": jnp.zeros((), jnp.int32)}
  key = jax.random.key(seed + 1)
  # The engine's episode chunking, as `train_and_evaluate` picks it on one
  # device (train.episode_chunk).
  chunk = train.episode_chunk(
      0,
      num_episodes,
      1,
      train.episode_elements(ep_data, cache_arrays),
      jax.default_backend(),
  )
  out["episode_chunk"] = chunk
  # The engine's per-program XLA options (ultraad_jax/xla_env.py).
  step_fn = engine_step_fn(
      tx, cfg, backbone, chunk,
      train.head_compiler_options(ep_data, cache_arrays),
  )  # fmt: skip
  start = time.perf_counter()
  step_c = step_fn.lower(state, ep_data, frozen, cache_arrays, clip_params,
                         key).compile()  # fmt: skip
  out["step_compile_s"] = time.perf_counter() - start
  # XLA counts a while loop's body once: scale by the episode chunks.
  out["step_flops"] = float(_cost(step_c).get("flops", float("nan"))) * (
      num_episodes // chunk
  )
  # One untimed step on a copy of the state: the first execution of a
  # program pays one-off costs (allocator growth, thread-pool start-up), as
  # the peer's untimed warm-up episode does on its side.
  warm = jax.tree.map(jnp.copy, state)
  jax.block_until_ready(
      step_c(warm, ep_data, frozen, cache_arrays, clip_params, key)
  )
  del warm
  start = time.perf_counter()
  for _ in range(steps):
    state, step_metrics = step_c(state, ep_data, frozen, cache_arrays,
                                 clip_params, key)  # fmt: skip
  jax.block_until_ready((state, step_metrics))
  out["train_s"] = time.perf_counter() - start
  out["jax_s"] = out["init_s"] + out["train_s"]
  final = np.asarray(jax.device_get(step_metrics["loss"]))
  out["final_loss"] = float(np.mean(final))
  out["final_loss_episode0"] = float(final[0])
  return (out, init_params) if return_init else out


def sweep_train_config(steps):
  """The base config's optimiser settings with `steps` steps (both sides)."""
  tc = common.get_base_config().train
  tc.steps = steps
  return tc


def learning_rates(tc):
  """The learning rate of each step, as `train.make_optimizer` schedules it.

  Args:
    tc: the train config (steps, learning_rate, warmup_steps).

  Returns:
    [steps] float64 rates (optax's warmup-cosine schedule, evaluated once on
    the host so that the PyTorch peer follows the same one).
  """
  # One jitted call rather than a dozen eager ops (each a compilation).
  rates = jax.jit(train.make_schedule(tc))(jnp.arange(tc.steps))
  return np.asarray(jax.device_get(rates), np.float64)


def peer_loss(w1, b1, w2, b2, tokens, text, masks, gamma=2.0):
  """The MVFA-style head's loss on one support batch (PyTorch).

  The lighter head of `--peer_head mvfa`. Per tapped layer: a bottleneck
  adapter mixed into the tokens (0.8 x + 0.2 adapter(x), as MVFA's), cosine
  similarity to the [normal, abnormal] text features, a softmax at
  temperature 0.01, bilinear upsampling of the abnormal probability to the
  image size, focal + dice loss against the masks. The layers' adapters are
  stacked so that one batched matmul serves them all.

  Args:
    w1: [L, D, R] first adapter weights; b1 [L, R].
    b1: see w1.
    w2: [L, R, D] second adapter weights; b2 [L, D].
    b2: see w2.
    tokens: [L, B, N, D] frozen patch tokens.
    text: [2, D] unit-norm text features.
    masks: [B, H, W] float masks in {0, 1}.
    gamma: focal loss exponent.

  Returns:
    The scalar loss.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  act = F.leaky_relu
  h = act(torch.einsum("lbnd,ldr->lbnr", tokens, w1) + b1[:, None, None])
  a = act(torch.einsum("lbnr,lrd->lbnd", h, w2) + b2[:, None, None])
  x = F.normalize(0.8 * tokens + 0.2 * a, dim=-1)
  prob = torch.softmax(100.0 * x @ text.T, dim=-1)[..., 1]  # [L, B, N]
  num_layers, b, n = prob.shape
  grid = int(round(math.sqrt(n)))
  size = masks.shape[-1]
  prob = F.interpolate(
      prob.reshape(num_layers * b, 1, grid, grid), size=(size, size),
      mode="bilinear", align_corners=False,
  ).reshape(num_layers, b, size, size)  # fmt: skip
  m = masks[None]
  p = prob.clamp(1e-6, 1.0 - 1e-6)
  p_true = torch.where(m > 0.5, p, 1.0 - p)
  focal = (-((1.0 - p_true) ** gamma) * torch.log(p_true)).mean()
  inter = (p * m).sum((2, 3))
  dice = 1.0 - (2.0 * inter + 1.0) / (p.sum((2, 3)) + m.sum((2, 3)) + 1.0)
  return focal + dice.mean()


PEER_HEADS = ("ultraad", "mvfa")


class TorchPeer:
  """The peer-style PyTorch few-shot loop, made as fast as a user would.

  Frozen CLIP image tower: the same weights as the JAX backbone,
  `torch.compile` with freezing, run under `torch.no_grad` on the whole
  support batch at once, every step (the peers' loop). Images are already
  normalised tensors in memory (no data loading or augmentation is timed).
  Threads = cores unless told otherwise.

  Heads:
  * "ultraad": the project's head and loss (`peer_ultraad.loss_fn`, equal
    to `model.loss_fn`), from the JAX side's `model.init` values, trained
    with `train.make_optimizer`'s recipe: global-norm clipping, then fused
    AdamW on the same warmup-cosine learning rates.
  * "mvfa": `peer_loss`, fused Adam.
  The head's loss is `torch.compile`d (forward and backward) when
  compile_head is set.

  `split` accumulates the time of the episodes' phases since the last
  `reset_split()`: "init_s" (backbone forward for the bank, buffers and
  optimiser), "backbone_s" (the per-step forwards), "head_s" (loss,
  backward, clipping and optimiser step), and "steps". On a GPU the clock
  synchronises the device between phases (two syncs a step).
  """

  def __init__(self, backbone, layers, images, masks, labels=None, *,
               cfg=None, head="ultraad", device="cpu", compile_backbone=True,
               compile_head=True, reduction=4, threads=0):  # fmt: skip
    """Builds the peer.

    Args:
      backbone: the clip.Backbone whose weights the peer copies.
      layers: tapped blocks.
      images: [n, H, W, 3] uint8 pool.
      masks: [n, H, W] uint8 masks.
      labels: [n] pool labels (needed by the "ultraad" head).
      cfg: model.ModelConfig ("ultraad" head).
      head: one of PEER_HEADS.
      device: the torch device.
      compile_backbone: torch.compile the image tower (with freezing).
      compile_head: torch.compile the head's loss.
      reduction: the "mvfa" adapters' hidden width is D // reduction.
      threads: PyTorch's intra-op threads (0: one per core).

    Raises:
      ValueError: an unknown head, a missing cfg / labels, or a model config
        the PyTorch UltraAD head does not implement (naming the key).
    """
    import torch  # pylint: disable=g-import-not-at-top

    import peer_ultraad  # pylint: disable=g-import-not-at-top

    if head not in PEER_HEADS:
      raise ValueError(f"peer head {head!r}; expected one of {PEER_HEADS}.")
    torch.set_num_threads(threads or num_cores())
    self.torch = torch
    self.pu = peer_ultraad
    self.head = head
    self.device = device
    self.dim = backbone.embed_dim
    self.num_layers = len(layers)
    self.rank = max(1, self.dim // reduction)
    self.image_size = backbone.image_size
    pt_model = torch_clip(backbone, device)
    self.encoder = torch_image_encoder(pt_model, layers)
    if compile_backbone:
      self.encoder = compile_torch(self.encoder)
    pixels = np.ascontiguousarray(clip.normalize(images).transpose(0, 3, 1, 2))
    self.pixels = torch.from_numpy(pixels).to(device)
    self.masks = torch.from_numpy(masks.astype(np.float32)).to(device)
    self.reset_split()
    self._rates = {}
    # The optimiser's settings (read here: building a config is not timed).
    self.train_config = sweep_train_config(1)
    if head == "mvfa":
      loss = peer_loss
    else:
      if cfg is None or labels is None:
        raise ValueError("The 'ultraad' peer head needs cfg and labels.")
      self.pu.check_config(cfg, image_size=backbone.image_size)
      self.cfg = cfg
      self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64,
                                    device=device)  # fmt: skip
      self.tower = self.pu.TextTower(pt_model)
      # Per-config constants, built once as a peer builds its prompts.
      self.prompt = self.pu.prompt_buffers(cfg, backbone, self.tower)
      loss = functools.partial(self.pu.loss_fn, cfg=cfg,
                               tower=self.tower,
                               image_size=backbone.image_size)  # fmt: skip
    self.loss = torch.compile(loss, dynamic=False) if compile_head else loss

  def reset_split(self):
    """Zeroes the per-phase time accumulators (`split`)."""
    self.split = {"init_s": 0.0, "backbone_s": 0.0, "head_s": 0.0, "steps": 0}

  def _clock(self):
    _torch_sync(self.device)
    return time.perf_counter()

  def prepare(self, init_params, text_embed, steps):
    """Converts one episode's JAX-side inputs to tensors (not timed).

    Args:
      init_params: the episode's `model.init` pytree (numpy or JAX).
      text_embed: [S, D] its description embeddings.
      steps: the training steps the episode will run (its learning rates).

    Returns:
      What `episode(..., prepared=)` takes.
    """
    torch = self.torch
    if steps not in self._rates:
      # optax's own schedule, evaluated once per step count: the same rates
      # as the engine's, without timing eager JAX calls in the episodes.
      self._rates[steps] = learning_rates(sweep_train_config(steps)).tolist()
    return {
        "params": self.pu.params_from_jax(init_params, self.device),
        "text_embed": torch.as_tensor(np.array(text_embed), device=self.device),
        "rates": self._rates[steps],
    }

  def episode(self, support, steps, seed=0, prepared=None):
    """Trains one episode's head for `steps` steps; returns the last loss.

    Args:
      support: [S] pool indices of the support images.
      steps: training steps.
      seed: random seed ("mvfa" head initialisation).
      prepared: from `prepare` ("ultraad" head; required there). Its
        parameters are trained in place.

    Returns:
      The final loss (float).
    """
    if self.head == "mvfa":
      return self._episode_mvfa(support, steps, seed)
    if prepared is None:
      raise ValueError("The 'ultraad' peer head needs prepare()'s output.")
    return self._episode_ultraad(support, steps, prepared)

  def _episode_ultraad(self, support, steps, prepared):
    torch = self.torch
    idx = torch.as_tensor(np.asarray(support), device=self.device)
    t0 = self._clock()
    x, m, labels = self.pixels[idx], self.masks[idx], self.labels[idx]
    group = torch.arange(len(idx), device=self.device)
    params = prepared["params"]
    # The bank's image entries (Ft) start at the support's normalised global
    # embeddings, as in model.init; a peer gets them from a forward pass.
    with torch.no_grad():
      g, _, _ = self.encoder(x)
      params["bank_image"] = self.pu.l2_normalize(g.float()).clone()
    params["bank_image"].requires_grad_()
    buffers = {
        **self.prompt,
        **self.pu.bank_buffers(labels, group, prepared["text_embed"]),
    }
    weights = self.pu.leaves(params)
    tc = self.train_config
    rates = prepared["rates"]
    if len(rates) != steps:
      raise ValueError(
          f"prepare() was given steps={len(rates)}, episode() steps={steps}."
      )
    opt = torch.optim.AdamW(weights, lr=0.0, betas=(tc.b1, tc.b2),
                            weight_decay=tc.weight_decay,
                            fused=True)  # fmt: skip
    t1 = self._clock()
    self.split["init_s"] += t1 - t0

    def head_step(step, g, tokens):
      support_t = self.pu.Support(g, tokens, m, labels, group)
      loss, _ = self.loss(params, buffers, support_t)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(weights, tc.grad_clip, foreach=True)
      opt.param_groups[0]["lr"] = rates[step]
      opt.step()
      return loss

    return self._timed_steps(x, steps, t1, head_step)

  def _timed_steps(self, x, steps, t1, head_step):
    """Per step: the backbone on the support (no_grad), then `head_step`.

    Accumulates the two phases' times into `split` (t1: the clock at the
    start of the first step) and returns the last loss.
    """
    loss = None
    for step in range(steps):
      with self.torch.no_grad():
        g, tokens, _ = self.encoder(x)
      t2 = self._clock()
      loss = head_step(step, g, tokens)
      t3 = self._clock()
      self.split["backbone_s"] += t2 - t1
      self.split["head_s"] += t3 - t2
      t1 = t3
    self.split["steps"] += steps
    return float(loss.detach())

  def _episode_mvfa(self, support, steps, seed):
    torch = self.torch
    gen = torch.Generator().manual_seed(seed)
    l, d, r = self.num_layers, self.dim, self.rank
    t0 = self._clock()

    def weight(*shape, fan_in):
      w = torch.randn(*shape, generator=gen) / math.sqrt(fan_in)
      return w.to(self.device).requires_grad_()

    weights = [
        weight(l, d, r, fan_in=d),
        torch.zeros(l, r, device=self.device, requires_grad=True),
        weight(l, r, d, fan_in=r),
        torch.zeros(l, d, device=self.device, requires_grad=True),
    ]
    text = torch.nn.functional.normalize(
        torch.randn(2, d, generator=gen).to(self.device), dim=-1
    )
    opt = torch.optim.Adam(weights, lr=1e-3, fused=True)
    idx = torch.as_tensor(np.asarray(support), device=self.device)
    x, m = self.pixels[idx], self.masks[idx]
    t1 = self._clock()
    self.split["init_s"] += t1 - t0

    def head_step(_, g, tokens):
      del g  # The MVFA-style head uses the patch tokens only.
      loss = self.loss(*weights, tokens, text, m)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return loss

    return self._timed_steps(x, steps, t1, head_step)


def bench_sweep(
    *,
    model_name,
    episodes,
    steps,
    shots,
    pool,
    torch_max_episodes,
    torch_device="cpu",
    torch_compile=True,
    compile_head=True,
    peer_head="ultraad",
    torch_threads=0,
    with_torch=True,
    seed=0,
):
  """The few-shot sweep: the engine against the peer loop, for each E.

  Args:
    model_name: the backbone ("tiny" or an OpenAI CLIP name, random
      weights).
    episodes: the episode counts E to time.
    steps: training steps of every episode, on both sides.
    shots: support images per class (S = 3 x shots).
    pool: images in the pool the supports are drawn from (the cache holds
      all of them).
    torch_max_episodes: the peer runs at most this many episodes per E; a
      larger E is extrapolated linearly (its episodes run one after another
      and cost the same) and flagged.
    torch_device: "cpu" or "cuda".
    torch_compile: torch.compile the peer's backbone (off only in tests).
    compile_head: torch.compile the peer's head loss.
    peer_head: the head the peer trains, one of PEER_HEADS ("ultraad": the
      same head and loss as the engine; "mvfa": a lighter peer's).
    torch_threads: the peer's PyTorch threads (0: one per core).
    with_torch: run the peer.
    seed: random seed.

  Returns:
    A dict with the settings, the one-off feature extraction time, and per
    E (as a string key) jax_s, torch_s, speedup, per-episode times and the
    peer's per-step split (backbone forward vs head update).
  """
  if peer_head not in PEER_HEADS:
    raise ValueError(
        f"--peer_head {peer_head!r}; expected one of {PEER_HEADS}."
    )
  backbone = make_backbone(model_name, seed=seed)
  layers = tapped_layers(backbone.num_layers)
  cfg = sweep_model_config(layers)
  images, masks, labels = synthetic_pool(pool, backbone.image_size, seed)
  out = {
      "model": model_name,
      "image_size": backbone.image_size,
      "layers": list(layers),
      "steps": steps,
      "shots_per_class": shots,
      "support_size": 3 * shots,
      "pool": pool,
      "fusion": cfg.fusion,
      "prompt_mode": cfg.prompt_mode,
      "peer_head": peer_head if with_torch else None,
  }
  start = time.perf_counter()
  cache = features.build(
      backbone, jax.device_put(backbone.params), images, masks, None,
      np.zeros(pool, bool), layers=layers, num_views=1,
      batch_size=min(32, pool),
  )  # fmt: skip
  jax.block_until_ready(cache.patch_tokens)
  out["feature_extraction_s"] = time.perf_counter() - start
  out["feature_extraction_note"] = (
      "one-off backbone pass over the pool, compilation included; not in "
      "jax_s"
  )
  peer = None
  if with_torch:
    out["torch_note"] = (
        "per episode: one backbone forward of the support (the bank's Ft) "
        "and buffers, then per step a no_grad backbone forward and the "
        "head's update. "
        + ("Head: peer_ultraad.loss_fn (= model.loss_fn) from the JAX side's "
           "model.init values (Ft from the peer's own forward); converting "
           "them from JAX arrays is not timed. Optimiser: global-norm "
           "clipping + fused AdamW on train.make_optimizer's schedule."
           if peer_head == "ultraad" else
           "Head: the MVFA-style peer_loss (adapters + fixed text features, "
           "focal + dice), fused Adam.")
    )  # fmt: skip
    start = time.perf_counter()
    peer = TorchPeer(
        backbone,
        layers,
        images,
        masks,
        labels,
        cfg=cfg,
        head=peer_head,
        device=torch_device,
        compile_backbone=torch_compile,
        compile_head=compile_head and torch_compile,
        threads=torch_threads,
    )
    out["torch_threads"] = peer.torch.get_num_threads()
    out["torch_warmup_s"] = time.perf_counter() - start
  for num in episodes:
    supports = draw_supports(labels, num, shots, seed + num)
    text_embed = description_embeds(num, 3 * shots, backbone.embed_dim,
                                    seed + num)  # fmt: skip
    row, init = jax_engine(backbone, cfg, cache, supports, labels, steps,
                           seed, text_embed=text_embed,
                           return_init=True)  # fmt: skip
    if peer is not None:
      run = min(num, torch_max_episodes)
      # Not timed: JAX arrays -> tensors (a peer would initialise in torch).
      prepare = lambda e, n: (
          peer.prepare(jax.tree.map(lambda x: x[e], init), text_embed[e], n)
          if peer_head == "ultraad" else None
      )  # fmt: skip
      if num == episodes[0]:
        # Warm-up: compiles the backbone and the head for the support shape.
        start = time.perf_counter()
        peer.episode(supports[0], 2, seed, prepare(0, 2))
        out["torch_warmup_s"] += time.perf_counter() - start
      prepared = [prepare(e, steps) for e in range(run)]
      peer.reset_split()
      start = time.perf_counter()
      losses = [
          peer.episode(supports[e], steps, seed + e, prepared[e])
          for e in range(run)
      ]
      measured = time.perf_counter() - start
      row["torch_final_loss"] = float(np.mean(losses))
      # With the UltraAD head, the same episode's loss as the engine's.
      row["torch_final_loss_episode0"] = losses[0]
      row["torch_episodes_run"] = run
      row["torch_extrapolated"] = run < num
      row["torch_s"] = measured * num / run
      row["speedup"] = row["torch_s"] / row["jax_s"]
      row["torch_s_per_episode"] = row["torch_s"] / num
      split = peer.split
      row["torch_init_s_per_episode"] = split["init_s"] / run
      if split["steps"]:
        row["torch_backbone_ms_per_step"] = (
            1e3 * split["backbone_s"] / split["steps"]
        )
        row["torch_head_ms_per_step"] = 1e3 * split["head_s"] / split["steps"]
    row["jax_s_per_episode"] = row["jax_s"] / num
    out[str(num)] = row
    logging_line = (
        f"  sweep E={num}: jax {row['jax_s']:.2f} s"
        + (f", torch {row['torch_s']:.2f} s, x{row['speedup']:.1f}"
           if peer is not None else "")
    )  # fmt: skip
    print(logging_line, flush=True)
  return out


# ----------------------------------------------------------------------------
# Evaluation metrics.
# ----------------------------------------------------------------------------


def bench_metrics(num_maps, size, repeats, seed=0):
  """Pixel AUROC and AP: ultraad_jax.metrics against scikit-learn.

  Inputs are `metrics_memory.make_data` (float32 maps with many exact ties,
  elliptic lesions). Times are medians of `repeats` calls without tracing;
  peak memory is one more call under tracemalloc (`metrics_memory.measure`):
  the traced allocations above the inputs, which sees NumPy's buffers.

  Args:
    num_maps: N query maps.
    size: map side in pixels.
    repeats: timed calls of each.
    seed: data seed.

  Returns:
    A dict: ours_s, sklearn_s, their peak MiB, AP times, values.
  """
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top

  maps, masks = metrics_memory.make_data(num_maps, size, seed)
  flat_maps, flat_masks = maps.ravel(), masks.ravel()
  fns = {
      "ours": lambda: metrics.pixel_auroc(maps, masks),
      "sklearn": lambda: skm.roc_auc_score(flat_masks, flat_maps),
      "ours_ap": lambda: metrics.pixel_average_precision(maps, masks),
      "sklearn_ap": lambda: skm.average_precision_score(flat_masks, flat_maps),
  }
  timings = time_interleaved(fns, repeats, warmup=0)
  out = {
      "num_maps": num_maps,
      "size": size,
      "pixels": int(maps.size),
      "inputs_mb": (maps.nbytes + masks.nbytes) / MIB,
      "timings": timings,
  }
  for name, fn in fns.items():
    value, _, peak = metrics_memory.measure(fn)
    out[f"{name}_s"] = timings[name]["median_s"]
    out[f"{name}_peak_mb"] = peak / MIB
    out[f"{name}_value"] = float(value)
  out["time_ratio"] = out["ours_s"] / out["sklearn_s"]
  out["memory_ratio"] = out["ours_peak_mb"] / out["sklearn_peak_mb"]
  out["max_abs_diff"] = max(
      abs(out["ours_value"] - out["sklearn_value"]),
      abs(out["ours_ap_value"] - out["sklearn_ap_value"]),
  )
  return out


# ----------------------------------------------------------------------------
# Reading a profile of the engine.
# ----------------------------------------------------------------------------


def _hlo_tables(text):
  """Source locations of every instruction of an HLO module's text.

  The text (`compiled.as_text()` or XLA's `*.cpu_after_optimizations.txt`)
  starts with FileNames, FunctionNames, FileLocations and StackFrames
  tables; each instruction's metadata names an op_name and a
  stack_frame_id. A frame's printed parent_frame_id is the parent's id + 1
  (0: no parent).

  Returns:
    {instruction name: (op_name, [(file, function, line), ...] innermost
    first)}.
  """
  import re  # pylint: disable=g-import-not-at-top

  def table(name):
    m = re.search(r"^%s\n(.*?)\n\n" % name, text, re.S | re.M)
    return m.group(1).splitlines() if m else []

  def fields(rest):
    return dict(kv.split("=", 1) for kv in rest.strip("{}").split())

  files = {int(l.split(" ", 1)[0]): l.split(" ", 1)[1].strip('"')
           for l in table("FileNames")}  # fmt: skip
  funcs = {int(l.split(" ", 1)[0]): l.split(" ", 1)[1].strip('"')
           for l in table("FunctionNames")}  # fmt: skip
  locs, frames = {}, {}
  for line in table("FileLocations"):
    i, rest = line.split(" ", 1)
    d = fields(rest)
    locs[int(i)] = (files.get(int(d["file_name_id"]), "?"),
                    funcs.get(int(d["function_name_id"]), "?"),
                    int(d["line"]))  # fmt: skip
  for line in table("StackFrames"):
    i, rest = line.split(" ", 1)
    d = fields(rest)
    frames[int(i)] = (int(d["file_location_id"]),
                      int(d["parent_frame_id"]) - 1)  # fmt: skip

  def chain(fid):
    out, seen = [], set()
    while fid in frames and fid not in seen:
      seen.add(fid)
      loc, fid = frames[fid]
      out.append(locs.get(loc, ("?", "?", 0)))
    return out

  inst = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.*)$")
  comp = re.compile(r"^(?:ENTRY )?%?([\w.-]+) .*\{$")
  meta = re.compile(
      r"metadata=\{op_name=\"([^\"]*)\"(?: stack_frame_id=(\d+))?"
  )
  calls = re.compile(r"calls=%?([\w.-]+)")
  found, callee, first_in = {}, {}, {}
  current = None
  for line in text.splitlines():
    m = inst.match(line)
    if m is None:
      c = comp.match(line)
      current = c.group(1) if c else current
      continue
    md = meta.search(m.group(2))
    if md:
      found[m.group(1)] = (md.group(1), int(md.group(2) or 0))
      first_in.setdefault(current, found[m.group(1)])
    else:
      cm = calls.search(m.group(2))
      ops = re.findall(r"\(%([\w.-]+)", m.group(2))
      callee[m.group(1)] = (cm.group(1) if cm else None, ops)
  # Wrapped kernels carry no metadata themselves: use their body's, else
  # their first operand's.
  for name, (body, ops) in callee.items():
    if body in first_in:
      found[name] = first_in[body]
    else:
      for op in ops:
        if op in found:
          found[name] = found[op]
          break
      else:
        found[name] = ("", 0)
  return {name: (op, chain(fid)) for name, (op, fid) in found.items()}


def _project_frame(frames):
  """The innermost frame in the project's package (else the innermost)."""
  for file, func, line in frames:
    if "ultraad_jax" in file.replace(os.sep, "/").split("/"):
      return f"{os.path.basename(file)}:{func}:{line}"
  if frames:
    file, func, line = frames[0]
    return f"{os.path.basename(file)}:{func}:{line}"
  return "?"


def trace_summary(workdir, top=20):
  """Where the profiled train steps spent their time, by kernel and source.

  Reads the newest trace written by `profile_steps` (`<workdir>/profile/
  plugins/profile/*/*.trace.json.gz`) and the compiled step's HLO
  (`<workdir>/hlo/train_step.txt` from `dump_hlo=True`, else XLA's dump of
  the train step), and attributes each XLA kernel's thread time to the
  innermost project source line that produced it (so the prompt-patch
  fusion shows up as fusion.py:_cross_attention, the maps as maps.py:...).

  Args:
    workdir: a run's work directory.
    top: rows of each table.

  Returns:
    {"steps", "total_ms_per_step", "kernels", "by_function", "by_source"}
    with thread milliseconds per step (kernels split over threads count
    once per thread).

  Raises:
    FileNotFoundError: no trace or no HLO text in the workdir.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top

  traces = sorted(
      glob.glob(
          os.path.join(
              workdir, "profile", "plugins", "profile", "*", "*.trace.json.gz"
          )
      )
  )
  if not traces:
    raise FileNotFoundError(
        f"No *.trace.json.gz under {workdir}/profile: run with "
        "--config.profile_steps=N (N >= 1) and enough train.steps (the trace "
        "starts after 2 warm-up steps)."
    )
  hlo = os.path.join(workdir, "hlo", "train_step.txt")
  if not os.path.isfile(hlo):
    dumps = sorted(
        glob.glob(
            os.path.join(
                workdir,
                "hlo",
                "xla_dump",
                "*train_step.cpu_after_optimizations.txt",
            )
        )
    )
    if not dumps:
      raise FileNotFoundError(
          f"Neither {hlo} nor an XLA dump of the train step exists: run with "
          "--config.dump_hlo=True."
      )
    hlo = dumps[-1]
  with open(hlo, encoding="utf-8") as f:
    sources = _hlo_tables(f.read())
  with gzip.open(traces[-1], "rt", encoding="utf-8") as f:
    events = json.load(f)["traceEvents"]
  kernel_ms = collections.Counter()
  steps = 0
  for e in events:
    if e.get("ph") != "X":
      continue
    if e.get("name") == "train":
      steps += 1
    elif e.get("name") in sources:
      kernel_ms[e["name"]] += e.get("dur", 0) / 1e3
  steps = max(steps, 1)
  total = sum(kernel_ms.values()) / steps
  by_source = collections.Counter()
  by_function = collections.Counter()
  kernels = []
  for name, ms in kernel_ms.most_common():
    op_name, frames = sources[name]
    src = _project_frame(frames)
    by_source[src] += ms / steps
    by_function[src.rsplit(":", 1)[0]] += ms / steps
    kernels.append({"kernel": name, "ms_per_step": ms / steps,
                    "share": ms / steps / total if total else 0.0,
                    "source": src, "op_name": op_name})  # fmt: skip
  return {
      "trace": traces[-1],
      "hlo": hlo,
      "steps": steps,
      "total_ms_per_step": total,
      "kernels": kernels[:top],
      "by_function": [{"function": k, "ms_per_step": v,
                       "share": v / total if total else 0.0}
                      for k, v in by_function.most_common(top)],
      "by_source": [{"source": k, "ms_per_step": v,
                     "share": v / total if total else 0.0}
                    for k, v in by_source.most_common(top)],
  }  # fmt: skip


def _print_trace_summary(summary):
  print(
      f"{summary['steps']} profiled step(s), {summary['total_ms_per_step']:.1f}"
      " thread-ms of XLA kernels per step"
  )
  print(f"trace: {summary['trace']}\nhlo:   {summary['hlo']}")
  print("\nby function (innermost project frame):")
  for row in summary["by_function"]:
    print(
        f"  {row['ms_per_step']:8.2f} ms {row['share']:6.1%}  "
        f"{row['function']}"
    )
  print("\nby source line:")
  for row in summary["by_source"]:
    print(
        f"  {row['ms_per_step']:8.2f} ms {row['share']:6.1%}  {row['source']}"
    )
  print("\nby kernel:")
  for row in summary["kernels"]:
    print(
        f"  {row['ms_per_step']:8.2f} ms {row['share']:6.1%}  "
        f"{row['kernel']:<40} {row['source']}"
    )


# ----------------------------------------------------------------------------
# Targets and the command line.
# ----------------------------------------------------------------------------


# Issue 6's targets: (JSON path, comparison, threshold, description, the
# condition under which the target applies: they were set for the 2-core CPU
# at ViT-B/16 f32 against compiled PyTorch, and for 64 episodes).
def _dev_backbone(r):
  bb = r.get("backbone", {})
  return (
      bb.get("model") == "ViT-B/16"
      and r["machine"]["jax_backend"] == "cpu"
      and r["settings"].get("torch_compile", True)
  )


def _stock_torch_backbone(r):
  # The speedup target is against stock PyTorch, not an --mkl_unlock run's.
  return _dev_backbone(r) and not r["machine"].get("mkl_unlocked", False)


TARGETS = (
    ("backbone.speedup", ">=", 1.5,
     "backbone f32 speedup over stock PyTorch (compiled, frozen)",
     _stock_torch_backbone),
    ("backbone.mfu", ">=", 0.65, "backbone f32 MFU (stretch 0.72)",
     _dev_backbone),
    ("sweep.64.speedup", ">=", 20.0,
     "64-episode sweep speedup over the peer loop",
     lambda r: r["settings"].get("torch_compile", True)),
    ("metrics.time_ratio", "<=", 2.0,
     "pixel AUROC time / scikit-learn's", lambda r: True),
    ("metrics.memory_ratio", "<", 1.0,
     "pixel AUROC peak memory / scikit-learn's", lambda r: True),
)  # fmt: skip


def _lookup(tree, path):
  node = tree
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def check_targets(results):
  """Met / missed for each of TARGETS that was measured and applies.

  Args:
    results: the benchmark's JSON dict (with "machine" and "settings").

  Returns:
    A list of {"target", "value", "threshold", "met"}.
  """
  rows = []
  for path, op, threshold, what, applies in TARGETS:
    value = _lookup(results, path)
    if not isinstance(value, (int, float)) or math.isnan(value):
      continue
    if not applies(results):
      continue
    met = (
        value >= threshold
        if op == ">="
        else (value <= threshold if op == "<=" else value < threshold)
    )
    rows.append(
        {
            "target": f"{what}: {path} {op} {threshold}",
            "value": value,
            "threshold": threshold,
            "met": bool(met),
        }
    )
  return rows  # fmt: skip


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
  p.add_argument("--torch_max_episodes", type=int)
  p.add_argument(
      "--torch_head_compile",
      action=argparse.BooleanOptionalAction,
      default=True,
      help="torch.compile the peer head's loss (forward+backward)",
  )
  p.add_argument(
      "--peer_head",
      choices=PEER_HEADS,
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
      if row.get("episode_chunk", 0) < int(key):
        line += f" ({row['episode_chunk']} episodes at a time)"
      if "torch_s" in row:
        line += (
            f", peer ({sweep['peer_head']} head) {row['torch_s']:.2f} s"
            f"{' (extrapolated)' if row['torch_extrapolated'] else ''}"
            f", speedup x{row['speedup']:.1f}"
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


def _child_main(args):
  kind = args._child  # pylint: disable=protected-access
  if kind == "peak":
    out = fma_peak()
  elif kind == "backbone_jax":
    out = bench_backbone(args.backbone_models[0], batch=args.backbone_batch,
                         repeats=args.repeats, warmup=args.warmup,
                         bf16=False, with_torch=False)  # fmt: skip
  elif kind == "backbone_torch":
    out = bench_backbone(args.backbone_models[0], batch=args.backbone_batch,
                         repeats=args.repeats, warmup=args.warmup,
                         bf16=False, torch_compile=args.torch_compile,
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
    summary = trace_summary(args.trace_summary)
    _print_trace_summary(summary)
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
  info = machine_info()
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
        set(_cpuinfo().get("flags", "").split()), info["cores"]
    )
    peak["native"] = native
    # XLA's own FMA loop is a fallback: it stays below the C kernel (115-125
    # against 186-299 GFLOP/s here) and its child process took 15 s on a
    # fresh machine, so --quick runs it only when the C kernel did not run.
    if args.mode != "quick" or "error" in native:
      child = run_child("peak", [], "vector512")
      peak.update({k: v for k, v in child.items() if k != "xla_flags"})
    peak["matmul_gflops"] = matmul_rate(4096 if args.mode != "quick" else 2048)
    peak["theoretical"] = theoretical_peak(info, native.get("clock_ghz"))
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
    results["peak"] = peak
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
      print(f"  (fma_peak.c did not run: {native['error']})", flush=True)
  # An accelerator's peaks come from its spec sheet (accelerator_peaks.py).
  spec = None
  if not on_cpu:
    spec = accelerator_peaks.spec_peak(info["device_kind"])
    peak["spec"] = spec
    if spec is None:
      results["notes"].append(
          f"No spec-sheet peak is known for device kind "
          f"{info['device_kind']!r} (benchmarks/accelerator_peaks.py): no "
          "floors, and an MFU only with --peak_gflops."
      )
    elif "peak_gflops" not in peak and spec["fp32"]:
      peak["peak_gflops"] = 1e3 * spec["fp32"]
      peak["source"] = f"spec sheet, fp32 dense: {spec['source']}"
  if peak:
    results["peak"] = peak

  # Wall seconds of each section (the quick mode must fit 5 minutes).
  section_s = results["section_s"] = {"setup_and_peak": time.time() - t_start}

  # ---- Backbone ------------------------------------------------------------
  if "backbone" in args.sections:
    with _timed_section(section_s, "backbone"):
      per_model = {}
      for i, name in enumerate(args.backbone_models):
        print(f"backbone {name}...", flush=True)
        per_model[name] = bench_backbone(
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
        backbone.update(spec_shares(primary, spec, info["jax_backend"]))
      results["backbone"] = backbone

  # ---- Sweep ---------------------------------------------------------------
  if "sweep" in args.sections:
    tf32 = args.sweep_precision == "tensorfloat32"
    with _timed_section(section_s, "sweep"), jax.default_matmul_precision(
        args.sweep_precision
    ), (
        torch_matmul_precision(tf32) if args.torch else contextlib.nullcontext()
    ):
      print(f"sweep {args.sweep_model}, E={args.sweep_episodes}...", flush=True)
      results["sweep"] = bench_sweep(
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
      )
      results["sweep"]["precision"] = args.sweep_precision
      if spec:
        add_sweep_floors(results["sweep"], spec, args.sweep_precision)

  # ---- Metrics -------------------------------------------------------------
  if "metrics" in args.sections:
    print(
        f"metrics: {args.metrics_maps} maps of {args.metrics_size}^2...",
        flush=True,
    )
    with _timed_section(section_s, "metrics"):
      results["metrics"] = bench_metrics(
          args.metrics_maps, args.metrics_size, args.metrics_repeats
      )

  results["targets"] = check_targets(results)
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
