"""Tests for ultraad_jax.report: summaries, result files, events, figures."""

import copy
import json
import math
import os
import struct

import numpy as np
from PIL import Image
import pytest
from scipy import stats

from ultraad_jax import report

# --------------------------------------------------------------------------
# summarize.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", (0, 1))
def test_summarize_matches_scipy(seed):
  values = np.random.default_rng(seed).normal(0.8, 0.05, size=7)
  out = report.summarize(values)
  lo, hi = stats.t.interval(
      0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values)
  )
  assert out["n"] == 7
  assert out["mean"] == pytest.approx(values.mean(), abs=1e-12)
  assert out["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
  assert out["ci95"] == pytest.approx([lo, hi], abs=1e-12)


def test_summarize_ignores_nan_and_none():
  out = report.summarize([0.5, float("nan"), None, 0.7, float("inf")])
  assert out["n"] == 2
  assert out["mean"] == pytest.approx(0.6)
  assert out["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert out["ci95"][0] < 0.6 < out["ci95"][1]


def test_summarize_small_n_is_json_safe():
  one = report.summarize([0.25, float("nan")])
  assert one == {"mean": 0.25, "std": 0.0, "ci95": [0.25, 0.25], "n": 1}
  none = report.summarize([float("nan")])
  assert none == {"mean": None, "std": None, "ci95": [None, None], "n": 0}
  json.dumps([one, none], allow_nan=False)  # raises on NaN


# --------------------------------------------------------------------------
# results.json / results.md.
# --------------------------------------------------------------------------


def _episodes(rng, keys, n=4):
  return [
      {
          "index": i,
          "seed": 100 + i,
          "metrics": {k: float(rng.uniform(0.5, 1.0)) for k in keys},
      }
      for i in range(n)
  ]


def _results():
  rng = np.random.default_rng(0)
  model_keys = ["image_auroc", "pixel_auroc", "pixel_aupro", "cls_macro_f1"]
  episodes = _episodes(rng, model_keys)
  episodes[2]["metrics"]["pixel_aupro"] = float("nan")  # undefined once
  return {
      "setting": "k normal + k abnormal",
      "shots": 4,
      "num_episodes": 4,
      "dataset": "busi",
      "backbone": "ViT-B/16",
      "selection": report.SELECTION_FIXED,
      "model": "UltraAD",
      "episodes": episodes,
      "baselines": {
          "zero_shot": {"episodes": _episodes(rng, ["image_auroc"])},
          "center_prior": {
              "episodes": _episodes(rng, ["image_auroc", "pixel_auroc"])
          },
      },
      "timing": {"total_s": 12.5, "train_s": 10.0},
  }


def test_write_results_schema_and_summary(tmp_path):
  results = _results()
  report.write_results(str(tmp_path), results)
  written = json.loads((tmp_path / "results.json").read_text())
  assert list(written)[:6] == [
      "setting",
      "shots",
      "num_episodes",
      "dataset",
      "backbone",
      "selection",
  ]
  assert list(written)[-1] == "timing"
  assert written["timing"] == {"total_s": 12.5, "train_s": 10.0}
  # Floats exactly as given; NaN stored as null.
  for got, given in zip(written["episodes"], results["episodes"]):
    assert got["index"] == given["index"] and got["seed"] == given["seed"]
    for key, value in given["metrics"].items():
      expected = None if math.isnan(value) else value
      assert got["metrics"][key] == expected
  # Summaries computed from the episodes, NaN skipped.
  aupro = [e["metrics"]["pixel_aupro"] for e in results["episodes"]]
  assert written["summary"]["pixel_aupro"] == report.summarize(aupro)
  assert written["summary"]["pixel_aupro"]["n"] == 3
  assert list(written["summary"]) == [
      "image_auroc",
      "pixel_auroc",
      "pixel_aupro",
      "cls_macro_f1",
  ]
  assert list(written["baselines"]) == ["center_prior", "zero_shot"]
  zero_shot = written["baselines"]["zero_shot"]
  assert list(zero_shot["summary"]) == ["image_auroc"]
  assert report.read_results(str(tmp_path)) == {
      k: v for k, v in written.items() if k != "timing"
  }


def test_write_results_is_deterministic(tmp_path):
  results = _results()
  shuffled = copy.deepcopy(results)
  shuffled = dict(reversed(list(shuffled.items())))
  for episode in shuffled["episodes"]:
    episode["metrics"] = dict(reversed(list(episode["metrics"].items())))
  shuffled["baselines"] = dict(reversed(list(shuffled["baselines"].items())))
  shuffled["timing"] = {"total_s": 99.0}
  a, b = tmp_path / "a", tmp_path / "b"
  report.write_results(str(a), results)
  report.write_results(str(b), shuffled)
  assert (a / "results.md").read_bytes() == (b / "results.md").read_bytes()
  json_a = (a / "results.json").read_text()
  json_b = (b / "results.json").read_text()
  assert json_a != json_b  # the timing differs ...
  strip = lambda t: json.dumps(
      {k: v for k, v in json.loads(t).items() if k != "timing"}
  )
  assert strip(json_a) == strip(json_b)  # ... and nothing else.


def test_given_summary_is_kept(tmp_path):
  results = _results()
  results["summary"] = {
      "image_auroc": {"n": 4, "ci95": [0.1, 0.2], "std": 0.3, "mean": 0.15}
  }
  report.write_results(str(tmp_path), results)
  written = report.read_results(str(tmp_path))
  assert written["summary"] == {
      "image_auroc": {"mean": 0.15, "std": 0.3, "ci95": [0.1, 0.2], "n": 4}
  }


def test_results_md_table(tmp_path):
  results = _results()
  report.write_results(str(tmp_path), results)
  text = (tmp_path / "results.md").read_text()
  for needle in (
      "k normal + k abnormal",
      "busi",
      "ViT-B/16",
      "fixed schedule",
      "Shots: 4",
      "Episodes: 4",
      "| Metric | UltraAD | center_prior | zero_shot |",
  ):
    assert needle in text
  summary = report.summarize(
      [e["metrics"]["image_auroc"] for e in results["episodes"]]
  )
  lo, hi = summary["ci95"]
  cell = (
      f"{summary['mean']:.3f} ± {summary['std']:.3f} "
      f"(95% CI {lo:.3f}–{hi:.3f})"
  )
  assert cell in text
  rows = {
      line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
      for line in text.splitlines()
      if line.startswith("| ") and "Metric" not in line
  }
  assert set(rows) == {
      "Image AUROC",
      "Pixel AUROC",
      "Pixel AUPRO (FPR ≤ 0.3)",
      "Classification macro F1",
  }
  assert rows["Image AUROC"][0] == cell
  assert rows["Pixel AUROC"][2] == "—"  # zero_shot has no maps
  assert rows["Classification macro F1"][1:] == ["—", "—"]
  assert rows["Pixel AUPRO (FPR ≤ 0.3)"][0].endswith("[n=3]")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda r: r.pop("backbone"), KeyError, "backbone"),
        (
            lambda r: r.update(selection="best test AUROC"),
            ValueError,
            "selection",
        ),
        (lambda r: r.update(num_episodes=5), ValueError, "num_episodes"),
        (lambda r: r["episodes"][0].pop("seed"), KeyError, "seed"),
        (lambda r: r.update(extra={1: 2}), ValueError, "non-string key"),
        (lambda r: r.update(extra=object()), ValueError, "extra"),
    ],
)
def test_write_results_rejects_bad_schema(tmp_path, change, error, match):
  results = _results()
  change(results)
  with pytest.raises(error, match=match):
    report.write_results(str(tmp_path), results)


def test_read_results_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="results.json"):
    report.read_results(str(tmp_path))


# --------------------------------------------------------------------------
# MetricWriter / read_events.
# --------------------------------------------------------------------------


def test_crc32c_known_values():
  assert report.crc32c(b"") == 0
  assert report.crc32c(b"123456789") == 0xE3069283
  assert report.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vector
  assert report.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def _write_some(workdir):
  with report.MetricWriter(workdir) as writer:
    writer.write(0, {"loss": 1.5, "lr": 1e-3})
    writer.write(10, {"loss": np.float32(0.25), "acc": np.array(0.875)})
    writer.write(2**40, {"loss": float("nan")})
  return writer


def test_metric_writer_round_trip(tmp_path):
  writer = _write_some(str(tmp_path))
  name = os.path.basename(writer.events_path)
  assert name.startswith("events.out.tfevents.")
  events = report.read_events(writer.events_path)
  assert events[:4] == [
      (0, "loss", 1.5),
      (0, "lr", float(np.float32(1e-3))),
      (10, "loss", 0.25),
      (10, "acc", 0.875),
  ]
  assert events[4][:2] == (2**40, "loss") and math.isnan(events[4][2])
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").open()]
  assert lines == [
      {"step": 0, "loss": 1.5, "lr": 1e-3},
      {"step": 10, "loss": 0.25, "acc": 0.875},
      {"step": 2**40, "loss": None},
  ]


def test_event_file_starts_with_file_version(tmp_path):
  writer = _write_some(str(tmp_path))
  data = open(writer.events_path, "rb").read()
  (length,) = struct.unpack("<Q", data[:8])
  first = data[12 : 12 + length]
  assert first.endswith(b"\x1a\x0dbrain.Event:2")  # field 3, 13 bytes


def test_event_encoding_parses_with_protobuf(tmp_path):
  """Cross-checks the hand encoding against the protobuf runtime."""
  pytest.importorskip("google.protobuf")
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

  f = descriptor_pb2.FileDescriptorProto(name="ev.proto", package="t")
  T = descriptor_pb2.FieldDescriptorProto
  value = f.message_type.add(name="Value")
  value.field.add(
      name="tag", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL
  )
  value.field.add(
      name="simple_value", number=2, type=T.TYPE_FLOAT, label=T.LABEL_OPTIONAL
  )
  summary = f.message_type.add(name="Summary")
  summary.field.add(
      name="value",
      number=1,
      type=T.TYPE_MESSAGE,
      type_name=".t.Value",
      label=T.LABEL_REPEATED,
  )
  event = f.message_type.add(name="Event")
  event.field.add(
      name="wall_time", number=1, type=T.TYPE_DOUBLE, label=T.LABEL_OPTIONAL
  )
  event.field.add(
      name="step", number=2, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL
  )
  event.field.add(
      name="file_version", number=3, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL
  )
  event.field.add(
      name="summary",
      number=5,
      type=T.TYPE_MESSAGE,
      type_name=".t.Summary",
      label=T.LABEL_OPTIONAL,
  )
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  Event = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))

  writer = _write_some(str(tmp_path))
  data = open(writer.events_path, "rb").read()
  parsed, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    parsed.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
    pos += 16 + length
  assert parsed[0].file_version == "brain.Event:2"
  assert parsed[0].wall_time > 1e9
  assert [e.step for e in parsed[1:]] == [0, 10, 2**40]
  assert [(v.tag, v.simple_value) for v in parsed[2].summary.value] == [
      ("loss", 0.25),
      ("acc", 0.875),
  ]


@pytest.mark.parametrize("where", ("length", "payload", "crc"))
def test_corrupted_event_file_fails_crc(tmp_path, where):
  writer = _write_some(str(tmp_path))
  data = bytearray(open(writer.events_path, "rb").read())
  (first_len,) = struct.unpack("<Q", data[:8])
  second = 16 + first_len  # start of the second record
  offset = {"length": second + 1, "payload": second + 14, "crc": second + 9}
  data[offset[where]] ^= 0x01
  corrupted = tmp_path / "corrupted.tfevents"
  corrupted.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="CRC mismatch"):
    report.read_events(str(corrupted))


def test_truncated_event_file_fails(tmp_path):
  writer = _write_some(str(tmp_path))
  data = open(writer.events_path, "rb").read()
  truncated = tmp_path / "truncated.tfevents"
  truncated.write_bytes(data[:-3])
  with pytest.raises(ValueError, match="truncated"):
    report.read_events(str(truncated))


def test_metric_writer_rejects_bad_values(tmp_path):
  with report.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="'loss'"):
      writer.write(1, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="step"):
      writer.write(1.5, {"loss": 1.0})
    writer.flush()
  writer.close()  # closing twice is harmless


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------


def _assert_png(path, min_size=(100, 100)):
  assert os.path.getsize(path) > 0
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
    pixels = np.asarray(image.convert("RGB"))
  assert pixels.std() > 0  # something was drawn


def test_plot_overlays(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.random((4, 32, 32))
  masks = np.zeros((4, 32, 32), bool)
  masks[1:, 8:20, 10:24] = True
  maps = rng.random((4, 8, 8))  # coarser than the images
  path = tmp_path / "figs" / "overlays.png"
  report.plot_overlays(
      str(path),
      images,
      masks,
      maps,
      [f"q{i}" for i in range(4)],
      classes=["normal", "benign", "benign", "malignant"],
  )
  _assert_png(path)
  rgb = tmp_path / "rgb.png"
  report.plot_overlays(
      str(rgb),
      rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8),
      masks[:2, :16, :16],
      maps[:2],
      ["a", "b"],
  )
  _assert_png(rgb)
  with pytest.raises(ValueError, match="same number"):
    report.plot_overlays(str(rgb), images, masks, maps[:3], ["a"] * 4)


def test_plot_roc(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.random(50) < 0.4
  path = tmp_path / "roc.png"
  report.plot_roc(
      str(path),
      {
          "model": (labels + rng.normal(size=50), labels),
          "chance": (np.round(rng.random(50), 1), labels),
          "one class": (rng.random(5), np.zeros(5, bool)),
      },
      "Image-level ROC",
  )
  _assert_png(path)


def test_plot_metric_distributions(tmp_path):
  rng = np.random.default_rng(0)
  per_method = {
      "UltraAD": {
          "image_auroc": rng.random(5).tolist(),
          "pixel_auroc": rng.random(5).tolist() + [float("nan")],
      },
      "zero_shot": {"image_auroc": rng.random(5).tolist()},
  }
  path = tmp_path / "dist.png"
  report.plot_metric_distributions(str(path), per_method, title="4-shot")
  _assert_png(path)
