"""Timing helpers of the benchmarks: interleaved repeats, medians, XLA costs.

Every contender of a comparison is timed in the same process, its repeats
interleaved with the others' (a burst of load from elsewhere then hits all
of them alike), warm-up excluded, and reported as a median with its spread.
"""

import statistics
import time

try:
  import resource  # Unix only.
except ImportError:  # pragma: no cover
  resource = None


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


def xla_cost(compiled):
  """XLA's cost analysis of a compiled computation as a dict."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def xla_temp_bytes(compiled):
  """Bytes of temporaries XLA allocates on every call of a compiled program.

  On CPU the runtime allocates them afresh at each call, and glibc serves
  a block that large with new pages, which the kernel zeroes as the program
  first touches them (docs/PERFORMANCE.md, round 8).

  Args:
    compiled: a `jax.stages.Compiled`.

  Returns:
    The size in bytes, or None where the backend gives no memory analysis.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  size = getattr(stats, "temp_size_in_bytes", None)
  return None if size is None else int(size)


def process_usage():
  """This process's CPU seconds (user, system) and minor page faults so far.

  Returns:
    {"user_s", "system_s", "minor_faults"}, or {} where `resource` is
    missing (not Unix).
  """
  if resource is None:
    return {}
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return {
      "user_s": usage.ru_utime,
      "system_s": usage.ru_stime,
      "minor_faults": usage.ru_minflt,
  }


def usage_per_call(before, after, calls):
  """What `process_usage` counted between two snapshots, per call.

  Args:
    before: `process_usage()` before the calls.
    after: `process_usage()` after them.
    calls: how many calls ran in between (> 0).

  Returns:
    {"user_s_per_call", "system_s_per_call", "minor_faults_per_call"}, or {}
    when either snapshot is empty.
  """
  if not before or not after or calls <= 0:
    return {}
  return {
      f"{k}_per_call": (after[k] - before[k]) / calls for k in sorted(before)
  }
