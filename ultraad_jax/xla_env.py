"""Environment for XLA and JAX, set before the backend starts.

XLA reads XLA_FLAGS once, when the first device is used, so everything here
must run before that: main.py calls `use_hugepage_malloc` and `configure`
first thing.
"""

import os
import sys

# XLA:CPU's YNNPACK fusions are off for the whole process: for dots they
# kept only part of the cores busy in the ViT's matmuls (measured on the
# 2-core development machine, docs/PERFORMANCE.md: ViT-B/16 190 ms/image off
# against 224 with the defaults and 217-259 with reductions on). Harmless on
# GPU and TPU.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)

# ... but for reductions they are about 10x faster than XLA's own loops (row
# sums of a 50 MB array: 1.9 against 20 ms), and the training head is full of
# them (norms, per-sample loss sums, bias gradients). So the head's programs
# (train, validation and predict steps) turn them on for themselves, through
# per-program compiler options, once their activations are large enough:
# below about a million elements the fusions' fixed cost per call dominates
# (tiny CLIP, 1 episode: 9.5 against 3.9 ms a step; 8 episodes, 1.6M
# elements: 30 against 34 ms; 64 episodes: 233 against 300 ms).
REDUCE_FUSION_MIN_ELEMENTS = 1 << 20


def head_compiler_options(activation_elements: int) -> dict[str, str]:
  """Per-program XLA options for the head's steps (see above).

  Args:
    activation_elements: elements of the step's largest activation, e.g. the
      patch tokens of all episodes, E x S x L x N x D.

  Returns:
    Options for `jax.jit(..., compiler_options=...)`: YNN reduce fusions on
    CPU for programs of at least REDUCE_FUSION_MIN_ELEMENTS elements, else
    none (other backends get none).
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.default_backend() != "cpu":
    return {}
  if activation_elements < REDUCE_FUSION_MIN_ELEMENTS:
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def configure(dump_hlo_dir=None, compilation_cache=True):
  """Sets XLA_FLAGS and JAX's persistent compilation cache.

  Args:
    dump_hlo_dir: if set, XLA dumps the HLO of every compiled module there.
    compilation_cache: enable the on-disk compilation cache (skips recompiles
      across runs), in $JAX_COMPILATION_CACHE_DIR or ~/.cache/ultraad_jax/jax.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in CPU_FLAGS:
    if flag.split("=")[0] not in flags:
      flags += " " + flag
  if dump_hlo_dir:
    os.makedirs(dump_hlo_dir, exist_ok=True)
    flags += f" --xla_dump_to={dump_hlo_dir} --xla_dump_hlo_as_text"
  os.environ["XLA_FLAGS"] = flags.strip()
  if compilation_cache:
    cache_dir = os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "ultraad_jax", "jax"),
    )
    min_secs = os.environ.setdefault(
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1"
    )
    # The variables reach child processes; this process gets the options
    # directly. JAX reads the variables only when it is imported, and
    # main.py's flag parsing imports it (through the config) before this
    # runs: with the variables alone the cache stayed off and every run
    # recompiled its steps (13 s of the demo's 45). The cache is opened at
    # the first compilation, so setting the options now takes effect.
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(min_secs)
    )
  # Multi-host TPU/GPU pods: initialise the distributed runtime when the
  # launcher said so (a coordinator address is set in the environment).
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    import jax  # pylint: disable=g-import-not-at-top

    jax.distributed.initialize()


# XLA on CPU allocates its large buffers (every temporary of a training
# step) with malloc on each execution. glibc serves blocks above 32 MiB with
# fresh mmaps, so each step page-faults all of them again in 4 KiB pages: on
# the development machine a 50 MB elementwise pass took 17 ms with a fresh
# output and 1.4 ms into a reused one. With this tunable (glibc >= 2.35)
# malloc asks the kernel for transparent huge pages (512x fewer faults), and
# the same pass takes 5.6 ms. Measured in
# docs/PERFORMANCE.md; ULTRAAD_HUGEPAGES=0 turns it off.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version():
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  return tuple(int(v) for v in version.split(".")[:2] if v.isdigit())


def hugepage_environment(env=None):
  """The environment with glibc's huge-page malloc tunable, when it helps.

  Args:
    env: an environment mapping (default: os.environ).

  Returns:
    A new dict with HUGEPAGE_TUNABLE added to GLIBC_TUNABLES, or None when
    nothing is to be done: already set, turned off (ULTRAAD_HUGEPAGES=0), not
    Linux with glibc >= 2.35, or transparent huge pages are "never" (nothing
    to ask for) or "always" (malloc already gets them).
  """
  env = dict(os.environ if env is None else env)
  tunables = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  if env.get("ULTRAAD_HUGEPAGES", "1") == "0":
    return None
  if not sys.platform.startswith("linux"):
    return None
  version = _glibc_version()
  if version is None or version < (2, 35):
    return None
  try:
    with open(_THP_MODE, encoding="ascii") as f:
      mode = f.read()
  except OSError:
    return None
  if "[madvise]" not in mode:
    return None
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGEPAGE_TUNABLE) if t)
  return env


def use_hugepage_malloc():
  """Restarts this process with `hugepage_environment`, if it applies.

  glibc reads its tunables only at start-up, hence the restart (os.execve
  with the same interpreter and command line). Call it first thing, before
  any work; it returns normally when there is nothing to do.
  """
  env = hugepage_environment()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
