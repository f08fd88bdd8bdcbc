"""Per-episode evaluation of predictions, and the results structure.

The engine produces, for every method (UltraAD and each baseline) and every
episode, anomaly maps, image anomaly scores and class probabilities on all
test images. Each episode is scored on its own query set only (its support
images, and for datasets with patient IDs the support patients' other images,
are excluded). This module turns those arrays into the metric dicts of
results.json and into the figures.
"""

import os

import numpy as np

from ultraad_jax import metrics as M
from ultraad_jax import report

METRIC_KEYS = report.METRIC_KEYS


def query_metrics(pred, labels, masks, setting):
  """Metrics of one episode on its query images.

  Args:
    pred: dict with any of maps [Q, H, W], image_score [Q], class_probs
      [Q, 3] (numpy), restricted to the query images.
    labels: [Q] int (0 normal, 1 benign, 2 malignant).
    masks: [Q, H, W] {0, 1}.
    setting: "per_class" or "normal_only" (the latter has no classifier, so
      no cls_* metrics).

  Returns:
    dict metric -> float (only the metrics the method can produce).
  """
  out = {}
  abnormal = (labels > 0).astype(np.int32)
  if "image_score" in pred:
    out["image_auroc"] = M.auroc(pred["image_score"], abnormal)
    out["image_ap"] = M.average_precision(pred["image_score"], abnormal)
  if "maps" in pred:
    maps = pred["maps"]
    out["pixel_auroc"] = M.pixel_auroc(maps, masks)
    out["pixel_aupro"] = M.aupro(maps, masks, fpr_limit=0.3)
    out["pixel_dice"] = M.dice_at_f1_max(maps, masks)
  if "class_probs" in pred and setting == "per_class":
    probs = pred["class_probs"]
    lesion = labels > 0
    # Benign vs malignant among lesions: malignancy given "a lesion".
    p = probs[lesion]
    mal = p[:, 2] / np.maximum(p[:, 1] + p[:, 2], 1e-12)
    out["cls_auroc"] = M.auroc(mal, (labels[lesion] == 2).astype(np.int32))
    out["cls_macro_auroc"] = M.macro_auroc(probs, labels)
    out["cls_accuracy"] = M.accuracy(probs, labels)
    out["cls_macro_f1"] = M.macro_f1(probs, labels)
  return {k: float(v) for k, v in out.items()}


def episode_metrics(preds, labels, masks, query_mask, *, setting):
  """Metrics of every episode.

  Args:
    preds: dict of [E, N, ...] arrays (see train._predict_all).
    labels: [N] test labels.
    masks: [N, H, W] test masks.
    query_mask: [E, N] bool, the query images of each episode.
    setting: the episode setting.

  Returns:
    A list (one per episode) of metric dicts.
  """
  out = []
  for e in range(query_mask.shape[0]):
    q = np.flatnonzero(query_mask[e])
    pred = {k: v[e][q] for k, v in preds.items()}
    out.append(query_metrics(pred, labels[q], masks[q], setting))
  return out


def assemble_results(config, per_method, *, backbone_name, dataset, selection):
  """The results.json structure (see report.write_results for the schema)."""
  ec = config.episodes
  seeds = [ec.seed] * ec.num_episodes

  def block(metric_list):
    episodes = [
        {"index": i, "seed": seeds[i], "metrics": m}
        for i, m in enumerate(metric_list)
    ]
    keys = [k for k in METRIC_KEYS if any(k in m for m in metric_list)]
    summary = {
        k: report.summarize([m.get(k, float("nan")) for m in metric_list])
        for k in keys
    }
    return {"episodes": episodes, "summary": summary}

  main = block(per_method["ultraad"])
  return {
      "setting": ec.setting,
      "shots": ec.shots,
      "num_episodes": ec.num_episodes,
      "dataset": dataset,
      "backbone": backbone_name,
      "selection": selection,
      "episodes": main["episodes"],
      "summary": main["summary"],
      "baselines": {
          name: block(m) for name, m in per_method.items() if name != "ultraad"
      },
  }


def caption(results):
  """What a figure of a run shows, in one line: its data and setting.

  Args:
    results: the results dict of `assemble_results`.

  Returns:
    E.g. "us_phantom/all, per_class, 4-shot, 8 episodes, backbone tiny".
  """
  # A local weights folder is named by its last part, not its whole path.
  backbone = os.path.basename(str(results["backbone"]).rstrip("/\\"))
  return (
      f"{results['dataset']}, {results['setting']}, {results['shots']}-shot, "
      f"{results['num_episodes']} episodes, backbone {backbone}"
  )


def write_figures(workdir, test, query_mask, examples, per_method, per_class=3,
                  *, title=None):  # fmt: skip
  """Overlays and ROC curves (episode 0) and metric distributions.

  Args:
    workdir: output folder (figures go to workdir/figures).
    test: the test Split (images, masks, labels).
    query_mask: [N] bool, the query images of episode 0.
    examples: method -> dict of episode-0 predictions over all test images.
    per_method: method -> list of per-episode metric dicts.
    per_class: query images of each class in the overlay figure.
    title: the run's `caption`, shown on every figure (None: none).
  """
  fig_dir = os.path.join(workdir, "figures")
  os.makedirs(fig_dir, exist_ok=True)
  q = np.flatnonzero(query_mask)
  ours = examples["ultraad"]
  if "maps" in ours:
    picks = []
    for c in range(3):
      members = q[test.labels[q] == c]
      picks.extend(members[:per_class].tolist())
    names = ("normal", "benign", "malignant")
    report.plot_overlays(
        os.path.join(fig_dir, "overlays.png"),
        test.images[picks],
        test.masks[picks],
        ours["maps"][picks],
        [str(test.image_ids[i]) for i in picks],
        classes=[names[test.labels[i]] for i in picks],
        title=f"UltraAD, episode 0: {title}" if title else None,
    )
  curves = {}
  abnormal = (test.labels[q] > 0).astype(np.int32)
  for name, pred in examples.items():
    if "image_score" in pred:
      curves[name] = (pred["image_score"][q], abnormal)
  if curves:
    report.plot_roc(
        os.path.join(fig_dir, "roc_image.png"),
        curves,
        "Image-level anomaly detection, episode 0"
        # The ROC figure is narrow: the caption on two more lines.
        + (f"\n{title.replace(', backbone', chr(10) + 'backbone')}"
           if title else ""),  # fmt: skip
    )
  dist = {
      name: {k: [m.get(k, float("nan")) for m in ms] for k in METRIC_KEYS}
      for name, ms in per_method.items()
  }
  report.plot_metric_distributions(
      os.path.join(fig_dir, "metrics_over_episodes.png"),
      dist,
      title=f"Every episode's metrics: {title}" if title else None,
  )
