"""Timing helpers of the benchmarks: interleaved repeats, medians, XLA costs.

Every contender of a comparison is timed in the same process, its repeats
interleaved with the others' (a burst of load from elsewhere then hits all
of them alike), warm-up excluded, and reported as a median with its spread.
"""

import statistics
import time


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
