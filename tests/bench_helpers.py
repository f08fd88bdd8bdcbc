"""Loading the scripts of benchmarks/ in tests.

They are scripts, not a package: each is loaded from its file under its own
module name (so that it never shadows an installed module), and benchmarks/
goes on sys.path when they import one another (bench.py does that itself).
"""

import importlib
import importlib.util
import os
import sys

BENCHMARKS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"
)


def load_benchmark(name):
  """Imports benchmarks/<name>.py as the module `ultraad_<name>`.

  Args:
    name: the script's name without ".py" ("bench", "flop_floor", ...).

  Returns:
    The executed module.
  """
  spec = importlib.util.spec_from_file_location(
      f"ultraad_{name}", os.path.join(BENCHMARKS, f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(name):
  """benchmarks/<name>.py, the same module object bench.py's modules import.

  bench.py must be loaded first (`load_benchmark("bench")`): it sets the
  XLA flags before JAX starts and puts benchmarks/ on sys.path, from where
  its modules import one another under their own names.

  Args:
    name: the module's name ("sweep_inputs", "bench_timing", ...).

  Returns:
    The imported module.

  Raises:
    RuntimeError: bench.py was not loaded first.
  """
  if BENCHMARKS not in sys.path:
    raise RuntimeError(
        f"Load bench.py first (load_benchmark('bench')), then {name}."
    )
  return importlib.import_module(name)
