"""Tests of ultraad_jax/evaluation.py: which images and labels each metric sees.

The metric functions are checked against scikit-learn in metrics_test.py.
Here the question is the wiring: every metric of an episode is computed on
that episode's query images only, abnormal means benign or malignant, and
benign vs malignant is scored among lesions only. Each expectation is
computed with scikit-learn, not with the project's metrics.
"""

import numpy as np
import pytest
from sklearn import metrics as skm

from ultraad_jax import evaluation


def _episode(rng, n=24, size=8):
  labels = np.arange(n) % 3
  masks = np.zeros((n, size, size), np.uint8)
  for i in np.flatnonzero(labels):
    r, c = rng.integers(0, size - 3, 2)
    masks[i, r : r + 3, c : c + 3] = 1
  preds = {
      "maps": rng.normal(size=(n, size, size)).astype(np.float32) + masks,
      "image_score": rng.normal(size=n) + 0.8 * (labels > 0),
      "class_probs": rng.dirichlet(np.ones(3), size=n),
  }
  return preds, labels, masks


def test_query_metrics_match_scikit_learn_on_the_right_subsets():
  rng = np.random.default_rng(0)
  pred, labels, masks = _episode(rng)
  got = evaluation.query_metrics(pred, labels, masks, "per_class")
  abnormal = labels > 0
  assert got["image_auroc"] == pytest.approx(
      skm.roc_auc_score(abnormal, pred["image_score"])
  )
  assert got["image_ap"] == pytest.approx(
      skm.average_precision_score(abnormal, pred["image_score"])
  )
  assert got["pixel_auroc"] == pytest.approx(
      skm.roc_auc_score(masks.ravel(), pred["maps"].ravel())
  )
  # Dice at the pixel-F1-maximising threshold, pooled, is the pooled F1-max.
  precision, recall, _ = skm.precision_recall_curve(
      masks.ravel(), pred["maps"].ravel()
  )
  f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
  assert got["pixel_dice"] == pytest.approx(f1.max(), rel=1e-5)
  # Benign (1) vs malignant (2) among lesions, from p_mal / (p_ben + p_mal).
  p = pred["class_probs"][abnormal]
  assert got["cls_auroc"] == pytest.approx(
      skm.roc_auc_score(labels[abnormal] == 2, p[:, 2] / (p[:, 1] + p[:, 2]))
  )
  assert got["cls_macro_auroc"] == pytest.approx(
      skm.roc_auc_score(labels, pred["class_probs"], multi_class="ovr")
  )
  predicted = pred["class_probs"].argmax(1)
  assert got["cls_accuracy"] == pytest.approx(
      skm.accuracy_score(labels, predicted)
  )
  assert got["cls_macro_f1"] == pytest.approx(
      skm.f1_score(labels, predicted, average="macro")
  )
  assert 0 < got["pixel_aupro"] <= 1


def test_normal_only_has_no_classification_metrics():
  rng = np.random.default_rng(1)
  pred, labels, masks = _episode(rng)
  got = evaluation.query_metrics(pred, labels, masks, "normal_only")
  assert not any(k.startswith("cls_") for k in got)
  assert {"image_auroc", "pixel_auroc", "pixel_aupro"} <= set(got)
  # A method without maps (linear_probe) gets no pixel metrics at all.
  no_maps = {k: v for k, v in pred.items() if k != "maps"}
  got = evaluation.query_metrics(no_maps, labels, masks, "per_class")
  assert not any(k.startswith("pixel_") for k in got)


def test_each_episode_sees_only_its_query_images():
  rng = np.random.default_rng(2)
  pred, labels, masks = _episode(rng, n=30)
  num_episodes = 3
  query_mask = np.zeros((num_episodes, len(labels)), bool)
  for e in range(num_episodes):
    query_mask[e, rng.choice(len(labels), 18, replace=False)] = True
  preds = {k: np.stack([v] * num_episodes) for k, v in pred.items()}
  # Non-query images get scores that would wreck every metric if counted.
  for e in range(num_episodes):
    out = ~query_mask[e]
    preds["image_score"][e, out] = np.where(labels[out] > 0, -1e3, 1e3)
    preds["maps"][e, out] = np.where(masks[out] > 0, -1e3, 1e3)
  got = evaluation.episode_metrics(preds, labels, masks, query_mask,
                                   setting="per_class")  # fmt: skip
  assert len(got) == num_episodes
  for e in range(num_episodes):
    q = query_mask[e]
    assert got[e]["image_auroc"] == pytest.approx(
        skm.roc_auc_score(labels[q] > 0, pred["image_score"][q])
    )
    assert got[e]["pixel_auroc"] == pytest.approx(
        skm.roc_auc_score(masks[q].ravel(), pred["maps"][q].ravel())
    )


def test_caption_names_the_data_setting_and_short_backbone():
  results = {"dataset": "busi/all", "setting": "normal_only", "shots": 4,
             "num_episodes": 16,
             "backbone": "/data/weights/clip-vit-large-patch14-336/"}  # fmt: skip
  assert evaluation.caption(results) == (
      "busi/all, normal_only, 4-shot, 16 episodes, "
      "backbone clip-vit-large-patch14-336"
  )


def test_figures_are_written_with_the_caption(tmp_path, monkeypatch):
  import types  # pylint: disable=g-import-not-at-top

  from ultraad_jax import report  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  pred, labels, masks = _episode(rng, n=12)
  test = types.SimpleNamespace(
      images=rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8),
      masks=masks,
      labels=labels,
      image_ids=np.asarray([f"im{i}" for i in range(12)]),
  )
  titles = {}
  for name in ("plot_overlays", "plot_roc", "plot_metric_distributions"):
    original = getattr(report, name)

    def spy(*args, _name=name, _original=original, **kwargs):
      titles[_name] = kwargs.get("title", args[2] if len(args) > 2 else None)
      return _original(*args, **kwargs)

    monkeypatch.setattr(report, name, spy)
  per_method = {"ultraad": [evaluation.query_metrics(pred, labels, masks,
                                                     "per_class")]}  # fmt: skip
  evaluation.write_figures(
      str(tmp_path), test, np.ones(12, bool), {"ultraad": pred}, per_method,
      per_class=1, title="busi/all, per_class, 4-shot, 8 episodes, backbone x",
  )  # fmt: skip
  assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
      "metrics_over_episodes.png", "overlays.png", "roc_image.png"
  ]  # fmt: skip
  for name, title in titles.items():
    assert "busi/all, per_class, 4-shot, 8 episodes" in title, name
