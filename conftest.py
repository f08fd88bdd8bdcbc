"""pytest set-up shared by every test: fake CPU devices and a compile cache.

Both must be configured before JAX initialises its backend, which is why they
live here (pytest imports the root conftest before any test module).
"""

import os

from ultraad_jax import xla_env

# Eight fake CPU devices so that sharding tests run on one machine; tests that
# want a single device build their mesh from jax.devices()[:1].
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The project's CPU flags, as main.py sets them, so tests run what users run.
for _flag in xla_env.CPU_FLAGS:
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Persistent compilation cache: repeated compiles of the same tiny programs
# across tests (and across CI runs on one machine) are served from disk.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "ultraad_jax", "jax"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Huge-page malloc for the pytest-xdist workers, which start after this file
# runs and inherit the environment (ultraad_jax/xla_env.py says why).
_env = xla_env.hugepage_environment()
if _env is not None:
  os.environ["GLIBC_TUNABLES"] = _env["GLIBC_TUNABLES"]
