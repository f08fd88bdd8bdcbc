"""Environment for XLA and JAX, set before the backend starts.

XLA reads XLA_FLAGS once, when the first device is used, so everything here
must run before that: main.py calls `configure` first thing.
"""

import os

# On CPUs, XLA's YNNPACK fusions keep only part of the cores busy for the ViT
# matmuls; turning them off was measured faster and steadier on the 2-core
# development machine (see docs/PERFORMANCE.md). Harmless on GPU and TPU.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


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
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "ultraad_jax", "jax"),
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  # Multi-host TPU/GPU pods: initialise the distributed runtime when the
  # launcher said so (a coordinator address is set in the environment).
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    import jax  # pylint: disable=g-import-not-at-top

    jax.distributed.initialize()
