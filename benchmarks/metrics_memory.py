"""Time and peak memory of the pixel metrics at full evaluation size.

Scores 1,000 float32 anomaly maps of 336x336 (113M pixels) against elliptic
lesion masks with `ultraad_jax.metrics`, then (optionally) with scikit-learn's
roc_auc_score on the flattened arrays, and prints one table.

Peak memory is measured with tracemalloc, which sees NumPy's array buffers:
the figure is the peak of traced allocations during the call minus what was
allocated before it, i.e. the extra memory above the inputs. The process's
maximum RSS is printed too (it includes the inputs and the interpreter).

Run once, on an otherwise idle machine (sorting 113M floats is CPU-bound):
  python benchmarks/metrics_memory.py               # ours and scikit-learn
  python benchmarks/metrics_memory.py --num_maps=100 --skip_sklearn
"""

import argparse
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from ultraad_jax import metrics  # pylint: disable=g-import-not-at-top


def make_data(num_maps: int, size: int, seed: int = 0):
  """Float32 maps and boolean masks with one elliptic lesion per abnormal map.

  Two thirds of the maps carry a lesion; the score is noise plus a bump over
  the lesion, stored as float32 (so the 113M scores contain many exact ties).
  """
  rng = np.random.default_rng(seed)
  maps = np.empty((num_maps, size, size), np.float32)
  masks = np.zeros((num_maps, size, size), np.bool_)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  for i in range(num_maps):
    maps[i] = rng.random((size, size), dtype=np.float32)
    if i % 3:
      cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
      ry, rx = rng.uniform(0.1 * size, 0.3 * size, 2)
      lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
      masks[i] = lesion
      maps[i] += 0.6 * lesion
  return maps, masks


def measure(fn, *args, **kwargs):
  """Runs fn once; returns (result, seconds, peak extra traced bytes)."""
  tracemalloc.start()
  before, _ = tracemalloc.get_traced_memory()
  tracemalloc.reset_peak()
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  seconds = time.perf_counter() - start
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  return result, seconds, peak - before


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_maps", type=int, default=1000)
  parser.add_argument("--size", type=int, default=336)
  parser.add_argument("--skip_sklearn", action="store_true")
  args = parser.parse_args()

  maps, masks = make_data(args.num_maps, args.size)
  gib = 1024.0**3
  print(
      f"inputs: maps {maps.shape} float32 {maps.nbytes / gib:.3f} GiB, masks "
      f"bool {masks.nbytes / gib:.3f} GiB, {masks.mean():.3%} anomalous"
  )
  rows = []
  for name, fn in [
      ("pixel_auroc", metrics.pixel_auroc),
      ("pixel_average_precision", metrics.pixel_average_precision),
      ("dice_at_f1_max", metrics.dice_at_f1_max),
      ("aupro (0.3)", metrics.aupro),
  ]:
    value, seconds, peak = measure(fn, maps, masks)
    rows.append((name, value, seconds, peak))
    print(f"  {name}: {value:.9f} in {seconds:.1f} s", flush=True)
  if not args.skip_sklearn:
    # Imported late: scikit-learn is a test/benchmark dependency only.
    from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top

    # ravel() of a contiguous array is a view, so the inputs are not copied
    # before the measurement; scikit-learn's own conversions are counted.
    value, seconds, peak = measure(roc_auc_score, masks.ravel(), maps.ravel())
    rows.append(("sklearn roc_auc_score", value, seconds, peak))
    print(f"  sklearn: {value:.9f} in {seconds:.1f} s", flush=True)
    print(f"|ours - sklearn| pixel AUROC = {abs(rows[0][1] - value):.3e}")

  print("\n| metric | value | time (s) | peak above inputs (GiB) |")
  print("|---|---|---|---|")
  for name, value, seconds, peak in rows:
    print(f"| {name} | {value:.6f} | {seconds:.1f} | {peak / gib:.3f} |")
  max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(f"\nprocess max RSS (inputs included): {max_rss / gib:.2f} GiB")


if __name__ == "__main__":
  main()
