"""The machine a benchmark runs on, and its f32 FMA peak.

What the numbers were measured on (CPU model and vendor, cores, clock,
load, library versions, XLA flags), the peak from the CPU's description,
and two measured lower bounds on it from XLA: a register-bound FMA loop and
a matmul. The register-bound C kernel (`fma_peak.c`) is in native_peak.py.
"""

import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import mkl_unlock
import native_peak


def cpuinfo():
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
  cpu = cpuinfo()
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
