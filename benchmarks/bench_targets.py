"""Issue 6's targets, and which of them a benchmark run met.

The targets were set for the 2-core development CPU, at ViT-B/16 f32
against compiled stock PyTorch, and for 64 episodes: each one applies only
to the runs it was set for.
"""

import math


def _compiled_peer(r):
  # --no-torch_compile runs (smoke tests) are not the fair peer.
  return r["settings"].get("torch_compile", True)


def _dev_backbone(r):
  bb = r.get("backbone", {})
  return (
      bb.get("model") == "ViT-B/16"
      and r["machine"]["jax_backend"] == "cpu"
      and _compiled_peer(r)
  )


def _stock_torch_backbone(r):
  # The speedup target is against stock PyTorch, not an --mkl_unlock run's.
  return _dev_backbone(r) and not r["machine"].get("mkl_unlocked", False)


# (JSON path, comparison, threshold, description, whether it applies).
TARGETS = (
    ("backbone.speedup", ">=", 1.5,
     "backbone f32 speedup over stock PyTorch (compiled, frozen)",
     _stock_torch_backbone),
    ("backbone.mfu", ">=", 0.65, "backbone f32 MFU (stretch 0.72)",
     _dev_backbone),
    ("sweep.64.speedup", ">=", 20.0,
     "64-episode sweep speedup over the peer loop",
     _compiled_peer),
    ("sweep.64.speedup_with_cache", ">=", 20.0,
     "the same, the engine's feature cache build (its backbone pass over "
     "the pool) included",
     _compiled_peer),
    ("metrics.time_ratio", "<=", 2.0,
     "pixel AUROC time / scikit-learn's", lambda r: True),
    ("metrics.memory_ratio", "<", 1.0,
     "pixel AUROC peak memory / scikit-learn's", lambda r: True),
)  # fmt: skip


def _lookup(tree, path):
  node = tree
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def check(results):
  """Met / missed for each of TARGETS that was measured and applies.

  Args:
    results: the benchmark's JSON dict (with "machine" and "settings").

  Returns:
    A list of {"target", "value", "threshold", "met"}.
  """
  rows = []
  for path, op, threshold, what, applies in TARGETS:
    value = _lookup(results, path)
    if not isinstance(value, (int, float)) or math.isnan(value):
      continue
    if not applies(results):
      continue
    met = (
        value >= threshold
        if op == ">="
        else (value <= threshold if op == "<=" else value < threshold)
    )
    rows.append(
        {
            "target": f"{what}: {path} {op} {threshold}",
            "value": value,
            "threshold": threshold,
            "met": bool(met),
        }
    )
  return rows  # fmt: skip
