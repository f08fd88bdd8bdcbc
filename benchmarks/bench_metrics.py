"""Pixel AUROC and AP: this project's metrics against scikit-learn's.

Time (medians of interleaved calls) and peak memory (tracemalloc) on the
same maps, scikit-learn's computed on the flattened arrays.
"""

import bench_timing
import metrics_memory
from ultraad_jax import metrics

MIB = 2.0**20


def measure(num_maps, size, repeats, seed=0):
  """Pixel AUROC and AP: ultraad_jax.metrics against scikit-learn.

  Inputs are `metrics_memory.make_data` (float32 maps with many exact ties,
  elliptic lesions). Times are medians of `repeats` calls without tracing;
  peak memory is one more call under tracemalloc (`metrics_memory.measure`):
  the traced allocations above the inputs, which sees NumPy's buffers.

  Args:
    num_maps: N query maps.
    size: map side in pixels.
    repeats: timed calls of each.
    seed: data seed.

  Returns:
    A dict: ours_s, sklearn_s, their peak MiB, AP times, values.
  """
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top

  maps, masks = metrics_memory.make_data(num_maps, size, seed)
  flat_maps, flat_masks = maps.ravel(), masks.ravel()
  fns = {
      "ours": lambda: metrics.pixel_auroc(maps, masks),
      "sklearn": lambda: skm.roc_auc_score(flat_masks, flat_maps),
      "ours_ap": lambda: metrics.pixel_average_precision(maps, masks),
      "sklearn_ap": lambda: skm.average_precision_score(flat_masks, flat_maps),
  }
  timings = bench_timing.time_interleaved(fns, repeats, warmup=0)
  out = {
      "num_maps": num_maps,
      "size": size,
      "pixels": int(maps.size),
      "inputs_mb": (maps.nbytes + masks.nbytes) / MIB,
      "timings": timings,
  }
  for name, fn in fns.items():
    value, _, peak = metrics_memory.measure(fn)
    out[f"{name}_s"] = timings[name]["median_s"]
    out[f"{name}_peak_mb"] = peak / MIB
    out[f"{name}_value"] = float(value)
  out["time_ratio"] = out["ours_s"] / out["sklearn_s"]
  out["memory_ratio"] = out["ours_peak_mb"] / out["sklearn_peak_mb"]
  out["max_abs_diff"] = max(
      abs(out["ours_value"] - out["sklearn_value"]),
      abs(out["ours_ap_value"] - out["sklearn_ap_value"]),
  )
  return out
