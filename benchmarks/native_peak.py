"""The CPU's f32 FMA peak and clock, from a register-bound C kernel.

XLA's own FMA loop (bench_machine.fma_peak) is a lower bound whose quality
depends on how LLVM allocates its registers: on the AMD development machine it
reached the matmul rate, on an Intel Sapphire Rapids VM it reached 157
GFLOP/s while compiled PyTorch ran the ViT at 293 (over "100 %" of that
peak). So the peak comes from `fma_peak.c`, built here with the host's C
compiler: independent FMA chains that never leave the registers, run on one
thread per core. The same file times a chain of dependent multiplies, which
gives the clock the cores actually run at (a VM's /proc/cpuinfo shows the
base clock).

Everything is optional: without a C compiler, on a non-x86 machine, or
without FMA, `measure` returns {"error": ...} and the caller falls back on
the XLA loop and the matmul.
"""

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "fma_peak.c")  # fmt: skip
# Cycles of one dependent 64-bit multiply (imul r64, r64) on Intel cores
# since Sandy Bridge and on AMD cores since Zen.
_IMUL_LATENCY = 3


def isa_for(flags):
  """The kernel variant for a CPU's /proc/cpuinfo flags.

  Args:
    flags: a set of flag names.

  Returns:
    (vector width in f32 lanes, compiler flags), or None without FMA.
  """
  if "avx512f" in flags:
    return 16, ["-mavx512f"]
  if "avx2" in flags and "fma" in flags:
    return 8, ["-mavx2", "-mfma"]
  return None


def c_compiler():
  """The host's C compiler: $CC, else cc or gcc on PATH; None if none."""
  return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_shared(source, library, flags=()):
  """Compiles one C file into a shared library with the host's compiler.

  Args:
    source: the .c file.
    library: the .so to write.
    flags: extra compiler flags.

  Raises:
    RuntimeError: no C compiler, or the build failed (the message says why).
  """
  compiler = c_compiler()
  if not compiler:
    raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
  cmd = [compiler, "-O2", "-shared", "-fPIC", *flags, source, "-o", library]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  except OSError as e:
    raise RuntimeError(f"{compiler} could not run: {e}") from e
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def build(width, isa_flags, workdir):
  """Compiles fma_peak.c into a shared library.

  Args:
    width: 16 (AVX-512) or 8 (AVX2).
    isa_flags: the compiler flags of that variant.
    workdir: where to write the library.

  Returns:
    The loaded ctypes.CDLL.

  Raises:
    RuntimeError: no C compiler, or the build failed (the message says why).
  """
  lib = os.path.join(workdir, f"fma_peak_{width}.so")
  compile_shared(_SOURCE, lib, [f"-DVEC_WIDTH={width}", *isa_flags])
  dll = ctypes.CDLL(lib)
  dll.fma_chains.restype = ctypes.c_float
  dll.fma_chains.argtypes = [ctypes.c_int64, ctypes.c_float, ctypes.c_float]
  dll.clock_chain.restype = ctypes.c_uint64
  dll.clock_chain.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
  dll.chains.restype = ctypes.c_int
  dll.vec_width.restype = ctypes.c_int
  return dll


def on_threads(fn, threads):
  """Wall seconds of `fn` run once on each of `threads` Python threads.

  Args:
    fn: a callable that releases the GIL while it works (a ctypes call, a
      JAX computation waited on), so that the threads run on separate cores
      at once.
    threads: how many threads.

  Returns:
    Seconds from the first start to the last finish.
  """
  workers = [threading.Thread(target=fn) for _ in range(threads)]
  start = time.perf_counter()
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  return time.perf_counter() - start


def cpu_seconds(fn):
  """CPU seconds of `fn` in this thread (time it was descheduled excluded).

  The clock and the one-core rate are both timed this way, so that another
  process taking the core during one of them (tests run in parallel) cannot
  make them disagree: the rate would then exceed what the clock allows.
  """
  start = time.thread_time()
  fn()
  return time.thread_time() - start


def measure(flags, cores, repeats=5, seconds=0.3):
  """The FMA peak of all cores and the clock, best of `repeats`.

  Args:
    flags: the CPU's /proc/cpuinfo flags (a set).
    cores: threads to run at once (one per core).
    repeats: timed runs of each kernel.
    seconds: about how long each run lasts.

  Returns:
    {"c_fma_gflops", "c_fma_gflops_one_core", "clock_ghz", "vector_width",
    "chains", "method"}, or {"error": why} when the kernel cannot run here.
  """
  variant = isa_for(flags)
  if variant is None:
    return {"error": "no AVX2+FMA or AVX-512 in the CPU flags"}
  width, isa_flags = variant
  with tempfile.TemporaryDirectory(prefix="ultraad_peak_") as tmp:
    try:
      dll = build(width, isa_flags, tmp)
    except (RuntimeError, OSError) as e:
      return {"error": str(e)}

    # Clock: size the chain to last about `seconds`, then keep the fastest.
    n = 1 << 16
    while True:
      start = time.perf_counter()
      dll.clock_chain(n, 7)
      if time.perf_counter() - start > seconds / 4 or n > 1 << 34:
        break
      n *= 4
    best = min(cpu_seconds(lambda: dll.clock_chain(n, 7))
               for _ in range(repeats))  # fmt: skip
    clock_ghz = n * 8 * _IMUL_LATENCY / best / 1e9

    chains = dll.chains()
    flops_per_iter = 2 * chains * dll.vec_width()
    # Two FMA units retire the chains of one iteration in chains / 2 cycles.
    iters = max(1, int(seconds * clock_ghz * 1e9 / (chains / 2)))
    call = lambda: dll.fma_chains(iters, 0.999999, 1e-7)
    one = min(cpu_seconds(call) for _ in range(repeats))
    everyone = min(on_threads(call, cores) for _ in range(repeats))
  return {
      "c_fma_gflops": cores * iters * flops_per_iter / everyone / 1e9,
      "c_fma_gflops_one_core": iters * flops_per_iter / one / 1e9,
      "clock_ghz": clock_ghz,
      "vector_width": width,
      "chains": chains,
      "method": (
          f"fma_peak.c: {chains} independent {32 * width}-bit FMA chains in "
          f"registers on {cores} threads; clock from dependent imul chains"
      ),
  }
