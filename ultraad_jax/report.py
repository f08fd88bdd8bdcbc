"""Run outputs: result files, metric logs, TensorBoard events and figures.

Everything a run leaves in its workdir for people and tools to read:

* `write_results` writes `results.json` (the reproducible numbers, one entry
  per few-shot episode plus a summary over episodes, for the model and each
  baseline) and `results.md` (the same summary as a Markdown table).
* `MetricWriter` appends training measurements to `metrics.jsonl` and to a
  TensorBoard event file. The event file is encoded here by hand (Event
  protobuf inside TFRecord framing, CRC32C included), so neither TensorFlow
  nor the tensorboard package is needed to write it; `read_events` parses one
  back and checks every checksum.
* `plot_overlays`, `plot_roc` and `plot_metric_distributions` draw PNG
  figures with matplotlib's Agg canvas (no pyplot, no global backend state).
"""

from collections.abc import Iterable, Mapping, Sequence
import json
import math
import os
import socket
import struct
import time
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from scipy import stats as scipy_stats

from ultraad_jax import metrics as metrics_lib

# Metric keys in the order tables and files list them; other keys follow,
# sorted.
METRIC_KEYS = (
    "image_auroc",
    "image_ap",
    "pixel_auroc",
    "pixel_aupro",
    "pixel_dice",
    "cls_auroc",
    "cls_macro_auroc",
    "cls_accuracy",
    "cls_macro_f1",
)
METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "pixel_auroc": "Pixel AUROC",
    "pixel_aupro": "Pixel AUPRO (FPR ≤ 0.3)",
    "pixel_dice": "Pixel Dice (at F1-max)",
    "cls_auroc": "Benign vs malignant AUROC",
    "cls_macro_auroc": "Classification macro AUROC",
    "cls_accuracy": "Classification accuracy",
    "cls_macro_f1": "Classification macro F1",
}
# How the reported checkpoint was chosen: never on the test set.
SELECTION_FIXED = "fixed schedule"
SELECTION_EARLY_STOPPING = "early stopping on support validation split"
SELECTION_RULES = (SELECTION_FIXED, SELECTION_EARLY_STOPPING)

_HEADER_KEYS = (
    "setting",
    "shots",
    "num_episodes",
    "dataset",
    "backbone",
    "selection",
)
_TOP_KEYS = _HEADER_KEYS + ("model", "episodes", "summary", "baselines")
_EPISODE_KEYS = ("index", "seed", "metrics")
_SUMMARY_KEYS = ("mean", "std", "ci95", "n")
_DASH = "—"


# --------------------------------------------------------------------------
# Summaries over episodes.
# --------------------------------------------------------------------------


def _json_float(x: float) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def summarize(values: Iterable[Any]) -> dict[str, Any]:
  """Mean, spread and 95% confidence interval of a metric over episodes.

  Non-finite values (NaN from an episode where the metric is undefined, and
  None) are left out; `n` counts the finite ones. `std` is the sample
  standard deviation (ddof=1), 0.0 when n == 1. `ci95` is the two-sided 95%
  interval for the mean from the t distribution with n - 1 degrees of freedom:
  mean +- t_{0.975, n-1} * std / sqrt(n); it is [mean, mean] when n == 1.

  Args:
    values: per-episode metric values (floats, NaN or None).

  Returns:
    {"mean", "std", "ci95": [lo, hi], "n"} with Python floats, and None in
    place of every float when n == 0 (JSON has no NaN).
  """
  x = np.asarray(
      [np.nan if v is None else float(v) for v in values], np.float64
  )
  x = x[np.isfinite(x)]
  n = int(x.size)
  if n == 0:
    return {"mean": None, "std": None, "ci95": [None, None], "n": 0}
  mean = float(np.mean(x))
  if n == 1:
    return {"mean": mean, "std": 0.0, "ci95": [mean, mean], "n": 1}
  std = float(np.std(x, ddof=1))
  half = float(scipy_stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
  return {
      "mean": _json_float(mean),
      "std": _json_float(std),
      "ci95": [_json_float(mean - half), _json_float(mean + half)],
      "n": n,
  }


# --------------------------------------------------------------------------
# results.json and results.md.
# --------------------------------------------------------------------------


def _to_json(obj: Any, where: str) -> Any:
  """Plain JSON values: NumPy scalars and arrays unwrapped, NaN/Inf -> None."""
  if obj is None or isinstance(obj, (bool, np.bool_, str)):
    return bool(obj) if isinstance(obj, np.bool_) else obj
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return _json_float(obj)
  if isinstance(obj, np.ndarray):
    return _to_json(obj.tolist(), where)
  if isinstance(obj, Mapping):
    out = {}
    for key, value in obj.items():
      if not isinstance(key, str):
        raise ValueError(
            f"results{where} has the non-string key {key!r}; JSON keys must "
            "be strings."
        )
      out[key] = _to_json(value, f"{where}[{key!r}]")
    return out
  if isinstance(obj, (list, tuple)):
    return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  raise ValueError(
      f"results{where} holds a {type(obj).__name__}, which JSON cannot "
      "store; convert it to a number, string, list or dict."
  )


def _ordered(obj: Any, first: Sequence[str] = ()) -> Any:
  """Dict keys in a fixed order (`first`, then the rest sorted), recursively."""
  if isinstance(obj, dict):
    keys = [k for k in first if k in obj]
    keys += sorted(k for k in obj if k not in first)
    return {k: _ordered(obj[k]) for k in keys}
  if isinstance(obj, list):
    return [_ordered(v) for v in obj]
  return obj


def metric_order(keys: Iterable[str]) -> list[str]:
  """Metric keys in report order: METRIC_KEYS first, then the rest sorted.

  Args:
    keys: metric keys (any iterable; repeats are fine).

  Returns:
    The distinct keys, ordered.
  """
  keys = set(keys)
  return [k for k in METRIC_KEYS if k in keys] + sorted(keys - set(METRIC_KEYS))


def _check_episodes(episodes: Any, where: str) -> None:
  if not isinstance(episodes, list):
    raise ValueError(f"results{where} must be a list of episode dicts")
  for i, episode in enumerate(episodes):
    if not isinstance(episode, dict):
      raise ValueError(f"results{where}[{i}] must be a dict, got {episode!r}")
    for key in _EPISODE_KEYS:
      if key not in episode:
        raise KeyError(
            f"results{where}[{i}] lacks {key!r}; every episode needs "
            f"{list(_EPISODE_KEYS)}."
        )
    if not isinstance(episode["metrics"], dict):
      raise ValueError(f"results{where}[{i}]['metrics'] must be a dict")


def _method_block(block: dict[str, Any], where: str) -> dict[str, Any]:
  """Episodes (ordered) and summary (computed when absent) of one method."""
  _check_episodes(block.get("episodes"), f"{where}['episodes']")
  episodes = []
  for episode in block["episodes"]:
    episode = _ordered(episode, _EPISODE_KEYS)
    episode["metrics"] = {
        k: episode["metrics"][k] for k in metric_order(episode["metrics"])
    }
    episodes.append(episode)
  summary = block.get("summary")
  if summary is None:
    names = metric_order(k for e in episodes for k in e["metrics"])
    summary = {
        k: summarize(e["metrics"].get(k) for e in episodes) for k in names
    }
  summary = {
      k: _ordered(summary[k], _SUMMARY_KEYS) for k in metric_order(summary)
  }
  rest = _ordered(
      {k: v for k, v in block.items() if k not in ("episodes", "summary")}
  )
  return {"episodes": episodes, "summary": summary, **rest}


def _canonical(results: Mapping[str, Any]) -> dict[str, Any]:
  """Checks the schema; returns results with every key in its fixed order."""
  if not isinstance(results, Mapping):
    raise ValueError(f"results must be a dict, got {type(results).__name__}")
  results = _to_json(dict(results), "")
  for key in _HEADER_KEYS + ("episodes",):
    if key not in results:
      raise KeyError(
          f"results lacks the key {key!r}; results.json needs "
          f"{list(_HEADER_KEYS) + ['episodes']}."
      )
  if results["selection"] not in SELECTION_RULES:
    raise ValueError(
        f"results['selection'] must be one of {list(SELECTION_RULES)}, got "
        f"{results['selection']!r}; a checkpoint chosen on the test set is "
        "not a valid protocol."
    )
  model = _method_block(results, "")
  if results["num_episodes"] != len(model["episodes"]):
    raise ValueError(
        f"results['num_episodes'] is {results['num_episodes']} but "
        f"results['episodes'] holds {len(model['episodes'])} episodes."
    )
  baselines = results.get("baselines", {})
  if not isinstance(baselines, dict):
    raise ValueError("results['baselines'] must be a dict {name: {...}}")
  out = {k: results[k] for k in _HEADER_KEYS}
  if "model" in results:
    out["model"] = results["model"]
  extra = sorted(
      k for k in results if k not in _TOP_KEYS and k not in ("timing",)
  )
  out.update(_ordered({k: results[k] for k in extra}))
  out["episodes"] = model["episodes"]
  out["summary"] = model["summary"]
  out["baselines"] = {
      name: _method_block(baselines[name], f"['baselines'][{name!r}]")
      for name in sorted(baselines)
  }
  if "timing" in results:
    out["timing"] = _ordered(results["timing"])
  return out


def cell(
    summary: Mapping[str, Any] | None, num_episodes: int, *, ci: bool = True
) -> str:
  """One table cell: "mean ± std (95% CI lo–hi)", "—" when not measured.

  Args:
    summary: a `summarize` result, or None.
    num_episodes: the run's episodes; "[n=k]" marks a metric defined in
      fewer of them.
    ci: include the confidence interval.

  Returns:
    The cell's text.
  """
  if not summary or summary.get("mean") is None:
    return _DASH
  mean, std = summary["mean"], summary["std"]
  text = f"{mean:.3f} ± {std:.3f}"
  if ci:
    lo, hi = summary["ci95"]
    text += f" (95% CI {lo:.3f}–{hi:.3f})"
  if summary["n"] != num_episodes:
    text += f" [n={summary['n']}]"
  return text


def _markdown(results: Mapping[str, Any]) -> str:
  """The results.md text for canonical results."""
  model_name = str(results.get("model", "model"))
  methods = [(model_name, results["summary"])] + [
      (name, block["summary"]) for name, block in results["baselines"].items()
  ]
  names = metric_order(k for _, s in methods for k in s)
  n_ep = results["num_episodes"]
  lines = [
      f"# Results: {results['dataset']}, {results['shots']}-shot, "
      f"{results['setting']}",
      "",
      f"- Setting: {results['setting']}",
      f"- Shots: {results['shots']}",
      f"- Episodes: {n_ep}",
      f"- Dataset: {results['dataset']}",
      f"- Backbone: {results['backbone']}",
      f"- Selection: {results['selection']}",
      "",
      "Cells: mean ± std over episodes (std with ddof=1), with the 95% "
      "confidence interval of the mean from the t distribution. "
      f"{_DASH}: not measured for that method. [n=k]: the metric was defined "
      f"in only k of the {n_ep} episodes (e.g. a query without a lesion).",
      "",
      "| Metric | " + " | ".join(name for name, _ in methods) + " |",
      "|---" * (len(methods) + 1) + "|",
  ]
  for key in names:
    cells = [cell(summary.get(key), n_ep) for _, summary in methods]
    lines.append(
        f"| {METRIC_NAMES.get(key, key)} | " + " | ".join(cells) + " |"
    )
  return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
  # A crash mid-write must not leave a truncated results file behind.
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write_results(workdir: str, results: Mapping[str, Any]) -> None:
  """Writes `results.json` and `results.md` into `workdir`.

  Schema of `results` (and of results.json):
    {"setting", "shots", "num_episodes", "dataset", "backbone",
     "selection": one of SELECTION_RULES,
     "model": optional column name for the table (default "model"),
     "episodes": [{"index", "seed", "metrics": {key: float}}],
     "summary": {key: {"mean", "std", "ci95", "n"}}  (computed if absent),
     "baselines": {name: {"episodes": [...], "summary": {...}}},
     "timing": {...}}  (optional, not reproducible; kept last in the file)
  Metric keys are METRIC_KEYS (a method may lack some); other keys are
  allowed. The JSON has a fixed key order whatever the input order (schema
  order, metrics in METRIC_KEYS order, anything else sorted), floats as given
  (repr round-trip) and NaN/Inf written as null, so two runs with the same
  numbers give byte-identical files apart from "timing".

  Args:
    workdir: directory to write into (created if missing).
    results: the dict above.

  Raises:
    KeyError: a required key is missing.
    ValueError: a value breaks the schema (unknown selection rule,
      num_episodes not matching the episodes, non-JSON values).
  """
  canonical = _canonical(results)
  os.makedirs(workdir, exist_ok=True)
  _write_atomic(
      os.path.join(workdir, "results.json"),
      json.dumps(canonical, indent=2, ensure_ascii=False, allow_nan=False)
      + "\n",
  )
  _write_atomic(os.path.join(workdir, "results.md"), _markdown(canonical))


def read_results(workdir: str, *, drop_timing: bool = True) -> dict[str, Any]:
  """Reads `results.json` back, by default without its "timing" entry.

  Args:
    workdir: the directory `write_results` wrote into.
    drop_timing: drop the non-reproducible "timing" key.

  Returns:
    The results dict.
  """
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist; write_results(workdir, ...) writes it at the "
        "end of a run."
    )
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  if drop_timing:
    results.pop("timing", None)
  return results


# --------------------------------------------------------------------------
# TensorBoard event files, encoded by hand.
# --------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      # 0x82F63B78: the Castagnoli polynomial, bit-reversed.
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, as TFRecord files use.

  Args:
    data: the bytes.

  Returns:
    The checksum as an unsigned 32-bit int.
  """
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  # TFRecord stores a rotated, offset CRC so that checksums of data that
  # itself contains CRCs stay well distributed.
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def _event_bytes(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    scalars: Sequence[tuple[str, float]] = (),
) -> bytes:
  """Serialises a tensorflow.Event holding a file version or scalar values."""
  out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _length_delimited(
            1,
            _length_delimited(1, tag.encode())
            + _key(2, 5)
            + struct.pack("<f", value),
        )
        for tag, value in scalars
    )
    out += _length_delimited(5, summary)
  return out


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (
      header
      + struct.pack("<I", _masked_crc(header))
      + data
      + struct.pack("<I", _masked_crc(data))
  )


class MetricWriter:
  """Appends scalar metrics to `metrics.jsonl` and a TensorBoard event file.

  Usage:
    with MetricWriter(workdir) as writer:
      writer.write(step, {"loss": 0.3, "lr": 1e-3})

  Each `write` adds one JSON line {"step": step, tag: value, ...} (NaN/Inf as
  null) and one Event carrying every tag as a scalar summary. The event file
  is `events.out.tfevents.<unix time>.<host>` in `workdir`; TensorBoard reads
  it as is.
  """

  def __init__(self, workdir: str):
    """Opens (appending) the two files.

    Args:
      workdir: directory to write into (created if missing).
    """
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.events_path = os.path.join(
        workdir,
        f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}",
    )
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self._events = open(self.events_path, "ab")
    if self._events.tell() == 0:
      self._events.write(
          _record(_event_bytes(time.time(), 0, file_version="brain.Event:2"))
      )

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records scalar `metrics` at `step`.

    Args:
      step: the training step (an integer).
      metrics: {tag: scalar}; tags are strings, values real numbers.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise ValueError(f"step must be an integer, got {step!r}")
    scalars = []
    for tag, value in metrics.items():
      if not isinstance(tag, str) or not tag:
        raise ValueError(f"metric names must be non-empty strings, got {tag!r}")
      array = np.asarray(value)
      if array.size != 1 or array.dtype.kind not in "biuf":
        raise ValueError(
            f"metric {tag!r} must be a real scalar, got {value!r}; log "
            "arrays as several scalars."
        )
      scalars.append((tag, float(array.reshape(()))))
    line = {"step": int(step)}
    line.update((tag, _json_float(v)) for tag, v in scalars)
    self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")
    self._events.write(
        _record(_event_bytes(time.time(), int(step), scalars=scalars))
    )

  def flush(self) -> None:
    """Pushes both files to disk (the OS buffers)."""
    self._jsonl.flush()
    self._events.flush()

  def close(self) -> None:
    """Flushes and closes both files."""
    if not self._jsonl.closed:
      self.flush()
      self._jsonl.close()
      self._events.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(data):
      raise ValueError("truncated varint")
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def _fields(data: bytes) -> Iterable[tuple[int, int, Any]]:
  """Yields (field number, wire type, raw value) of a protobuf message."""
  pos = 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, pos = _read_varint(data, pos)
    elif wire_type == 1:
      value, pos = data[pos : pos + 8], pos + 8
    elif wire_type == 5:
      value, pos = data[pos : pos + 4], pos + 4
    elif wire_type == 2:
      length, pos = _read_varint(data, pos)
      value, pos = data[pos : pos + length], pos + length
    else:
      raise ValueError(f"unsupported protobuf wire type {wire_type}")
    if pos > len(data):
      raise ValueError("truncated protobuf field")
    yield field, wire_type, value


def read_events(path: str) -> list[tuple[int, str, float]]:
  """Parses a TensorBoard event file, checking every record's CRCs.

  Args:
    path: an events.out.tfevents.* file.

  Returns:
    [(step, tag, value)] for every scalar summary value, in file order
    (values are float32, as stored).

  Raises:
    ValueError: a CRC does not match or the file is truncated or malformed.
  """
  with open(path, "rb") as f:
    data = f.read()
  out = []
  pos = 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise ValueError(f"{path}: truncated record header at byte {pos}")
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    if header_crc != _masked_crc(header):
      raise ValueError(f"{path}: length CRC mismatch at byte {pos}")
    end = pos + 12 + length
    if end + 4 > len(data):
      raise ValueError(f"{path}: truncated record at byte {pos}")
    payload = data[pos + 12 : end]
    (data_crc,) = struct.unpack("<I", data[end : end + 4])
    if data_crc != _masked_crc(payload):
      raise ValueError(f"{path}: data CRC mismatch in the record at byte {pos}")
    pos = end + 4
    try:
      step, values = 0, []
      for field, wire_type, value in _fields(payload):
        if field == 2 and wire_type == 0:
          step = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 5 and wire_type == 2:
          for f_num, w_type, raw in _fields(value):
            if f_num != 1 or w_type != 2:
              continue
            tag, scalar = None, None
            for vf, vw, v in _fields(raw):
              if vf == 1 and vw == 2:
                tag = v.decode()
              elif vf == 2 and vw == 5:
                (scalar,) = struct.unpack("<f", v)
            if tag is not None and scalar is not None:
              values.append((tag, scalar))
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(
          f"{path}: malformed Event in the record ending at " f"byte {pos}: {e}"
      ) from e
    out.extend((step, tag, value) for tag, value in values)
  return out


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------


def save_figure(fig: Figure, path: str) -> None:
  """Writes `fig` to `path` as a 100 dpi PNG, creating its folder.

  Args:
    fig: a matplotlib Figure (no pyplot).
    path: the PNG file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, format="png", dpi=100)


def _as_display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
  """An image for imshow: [H, W] grey (cmap "gray") or [H, W, 3] colour."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 3 and image.shape[-1] not in (3, 4):
    raise ValueError(
        f"images must be [K, H, W], [K, H, W, 1] or [K, H, W, 3], got an image "
        f"of shape {image.shape}"
    )
  image = image.astype(np.float64)
  lo, hi = np.nanmin(image), np.nanmax(image)
  image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
  return image, ("gray" if image.ndim == 2 else None)


def plot_overlays(
    path: str,
    images: Any,
    masks: Any,
    maps: Any,
    titles: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
    alpha: float = 0.5,
    title: str | None = None,
) -> None:
  """Query images with their ground truth and anomaly map, as one PNG.

  Every sample takes two panels side by side: the image with the ground-truth
  contour (green), and the anomaly-map heatmap over the image with the same
  contour. All maps share one colour scale (shown on the colour bar), so
  scores compare across samples. Images, masks and maps may have different
  resolutions: each is stretched over the same panel.

  Args:
    path: output PNG path.
    images: K images, [K, H, W] or [K, H, W, 3] (any range; each is
      rescaled to [0, 1] for display).
    masks: K ground-truth masks [K, h, w] (nonzero = lesion).
    maps: K anomaly maps [K, h', w'].
    titles: K panel titles (e.g. "benign #12, score 0.83").
    classes: optional K class names; each class then gets one row, in order
      of first appearance, and its name labels the row.
    alpha: opacity of the heatmap.
    title: optional figure title (e.g. the run's setting).
  """
  k = len(titles)
  if not (len(images) == len(masks) == len(maps) == k) or k == 0:
    raise ValueError(
        "images, masks, maps and titles must hold the same number K > 0 of "
        f"samples, got {len(images)}, {len(masks)}, {len(maps)}, {k}."
    )
  if classes is not None and len(classes) != k:
    raise ValueError(f"classes must hold K={k} names, got {len(classes)}")
  rows = [list(range(k))]
  row_names = [None]
  if classes is not None:
    row_names = list(dict.fromkeys(classes))
    rows = [[i for i in range(k) if classes[i] == c] for c in row_names]
  n_cols = max(len(r) for r in rows)
  finite = [np.asarray(m, np.float64) for m in maps]
  vmin = min(float(np.nanmin(m)) for m in finite)
  vmax = max(float(np.nanmax(m)) for m in finite)
  if vmax <= vmin:
    vmax = vmin + 1.0
  fig = Figure(figsize=(2.2 * 2 * n_cols + 0.8, 2.4 * len(rows)))
  axes = fig.subplots(len(rows), 2 * n_cols, squeeze=False)
  extent = (0.0, 1.0, 1.0, 0.0)
  heat = None
  for r, row in enumerate(rows):
    for c in range(n_cols):
      ax_img, ax_map = axes[r, 2 * c], axes[r, 2 * c + 1]
      for ax in (ax_img, ax_map):
        ax.set_xticks([])
        ax.set_yticks([])
      if c >= len(row):
        ax_img.axis("off")
        ax_map.axis("off")
        continue
      i = row[c]
      image, cmap = _as_display_image(images[i])
      mask = np.asarray(masks[i]) != 0
      for ax in (ax_img, ax_map):
        ax.imshow(image, cmap=cmap, extent=extent, interpolation="bilinear")
      heat = ax_map.imshow(
          finite[i],
          cmap="jet",
          alpha=alpha,
          vmin=vmin,
          vmax=vmax,
          extent=extent,
          interpolation="bilinear",
      )
      if mask.any() and not mask.all():
        h, w = mask.shape
        xs, ys = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h
        for ax in (ax_img, ax_map):
          ax.contour(
              xs,
              ys,
              mask.astype(np.float32),
              levels=[0.5],
              colors="lime",
              linewidths=1.0,
          )
      for ax in (ax_img, ax_map):
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(1.0, 0.0)
      ax_img.set_title(str(titles[i]), fontsize=8)
      ax_map.set_title("anomaly map", fontsize=8)
      if c == 0 and row_names[r] is not None:
        ax_img.set_ylabel(str(row_names[r]), fontsize=10)
  if heat is not None:
    fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.8, label="score")
  if title:
    fig.suptitle(title, fontsize=10)
  save_figure(fig, path)


def plot_roc(
    path: str,
    curves: Mapping[str, tuple[Any, Any]],
    title: str,
) -> None:
  """ROC curves of several score sets, with their AUROC in the legend.

  Tied scores are grouped (`metrics.roc_curve`), and the curve is drawn with
  straight segments between thresholds, the same curve the AUROC integrates.

  Args:
    path: output PNG path.
    curves: {name: (scores [N], binary labels [N])}. A set with a single
      class has no ROC: it is listed in the legend as undefined.
    title: the figure title.
  """
  if not curves:
    raise ValueError("curves is empty; pass {name: (scores, labels)}")
  fig = Figure(figsize=(4.5, 4.5))
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1.0)
  for name, (scores, labels) in curves.items():
    value = metrics_lib.auroc(scores, labels)
    if math.isnan(value):
      ax.plot([], [], label=f"{name} (AUROC undefined: one class)")
      continue
    fpr, tpr, _ = metrics_lib.roc_curve(scores, labels)
    ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {value:.3f})")
  ax.set_xlim(0.0, 1.0)
  ax.set_ylim(0.0, 1.0)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  save_figure(fig, path)


def plot_metric_distributions(
    path: str,
    per_method: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    title: str | None = None,
) -> None:
  """Box plots (with every episode as a dot) of each metric, per method.

  One panel per metric; within it one box per method over that method's
  finite per-episode values. A method without a metric leaves its slot empty.

  Args:
    path: output PNG path.
    per_method: {method: {metric key: per-episode values}}.
    title: optional figure title.
  """
  methods = list(per_method)
  keys = metric_order(k for m in methods for k in per_method[m])
  if not keys:
    raise ValueError(
        "per_method holds no metric; pass {method: {metric: [...]}}"
    )
  n_cols = min(3, len(keys))
  n_rows = math.ceil(len(keys) / n_cols)
  fig = Figure(figsize=(4.0 * n_cols, 3.2 * n_rows))
  axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
  rng = np.random.default_rng(0)  # fixed jitter: identical figures per run
  for ax, key in zip(axes, keys):
    for j, method in enumerate(methods):
      values = np.asarray(
          [np.nan if v is None else v for v in per_method[method].get(key, [])],
          np.float64,
      )
      values = values[np.isfinite(values)]
      if values.size == 0:
        continue
      ax.boxplot(
          values,
          positions=[j],
          widths=0.5,
          showfliers=False,
          medianprops={"color": "black"},
      )
      jitter = rng.uniform(-0.12, 0.12, values.size)
      ax.scatter(
          j + jitter, values, s=10, alpha=0.6, zorder=3, color=f"C{j % 10}"
      )
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=20, fontsize=8)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_title(METRIC_NAMES.get(key, key), fontsize=9)
  for ax in axes[len(keys) :]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, path)
