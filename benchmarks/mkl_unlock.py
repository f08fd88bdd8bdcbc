"""PyTorch with Intel MKL's vendor check bypassed, for the AMD comparison.

Stock PyTorch computes f32 matrix products on the CPU with Intel MKL, which
dispatches on the CPU's vendor, not on its features: on AMD processors it
runs generic kernels. On a Zen 5 core, whose AVX-512 units are full width,
that left PyTorch at 223 GFLOP/s on a 2048^3 product where the same call
reached 515 with the check bypassed (2-core development VM, family 0x1A).
A reviewer comparing against stock PyTorch there compares against a
handicapped peer, so bench.py also times PyTorch with the check bypassed.

How: `mkl_unlock.c` defines `mkl_serv_intel_cpu_true` to return 1; built
here with the host's C compiler and preloaded (LD_PRELOAD) into a fresh
process, it answers MKL's question before the copy inside libtorch_cpu.so.
The preload must be there when the process starts, so it applies to child
processes (or to a run that restarts itself), never to the current one.

Everything is optional: without a C compiler, on a non-x86 or non-Linux
machine, or with a PyTorch built without MKL, `reason_not_applicable` says
why and bench.py times stock PyTorch only.
"""

import os
import platform

import native_peak

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "mkl_unlock.c")  # fmt: skip
_LIBRARY = "libmkl_unlock.so"
# Set in a process started with the shim preloaded (by `environment`).
MARKER = "ULTRAAD_BENCH_MKL_UNLOCKED"


def reason_not_applicable(vendor, torch_has_mkl):
  """Why the bypass would change nothing here, or None where it would.

  Args:
    vendor: the CPU vendor ("AMD", "Intel", ...), as bench.machine_info
      reports it.
    torch_has_mkl: whether PyTorch was built with MKL
      (`torch.backends.mkl.is_available()`).

  Returns:
    None if the bypass applies (a Linux x86-64 AMD CPU and PyTorch with
    MKL), else a sentence saying why not.
  """
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    return "the bypass is for Linux on x86-64 (LD_PRELOAD)"
  if vendor != "AMD":
    return f"MKL already takes its fast paths on {vendor} CPUs"
  if not torch_has_mkl:
    return "this PyTorch was built without MKL"
  return None


def build(workdir):
  """Compiles mkl_unlock.c into a shared library.

  Args:
    workdir: the folder for the library; it must outlive the processes that
      preload it.

  Returns:
    The library's absolute path.

  Raises:
    RuntimeError: no C compiler, or the build failed (the message says why).
  """
  lib = os.path.join(os.path.abspath(workdir), _LIBRARY)
  native_peak.compile_shared(_SOURCE, lib)
  return lib


def environment(library, env=None):
  """An environment whose processes start with the bypass preloaded.

  Args:
    library: the path `build` returned.
    env: the environment to extend (default: os.environ).

  Returns:
    A new dict: LD_PRELOAD with the library in front, and MARKER set.
  """
  env = dict(os.environ if env is None else env)
  preload = env.get("LD_PRELOAD", "").split()
  env["LD_PRELOAD"] = " ".join([library] + [p for p in preload if p])
  env[MARKER] = "1"
  return env


def active():
  """Whether this process runs with the shim loaded.

  Reads the process's memory map: the shim is active only if the dynamic
  loader actually mapped it (a preload it could not load is skipped with a
  warning on stderr, and MKL then takes its generic paths).

  Returns:
    True if a library named like the shim is mapped into this process.
  """
  try:
    with open("/proc/self/maps", encoding="utf-8") as f:
      return any(line.rstrip().endswith("/" + _LIBRARY) for line in f)
  except OSError:
    return False
