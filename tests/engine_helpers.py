"""Shared pieces of the engine tests (train, reliability and configs tests).

* `tiny_config`: the demo's quick variant shrunk to a 32 px phantom and a
  32 px tiny CLIP (4 x 4 patch grid), a few steps, no baselines; the same
  settings as main.py flags (`main_flags`) for subprocess runs.
* `shared_path`: a folder built once per test session and shared by every
  pytest-xdist worker (prepared data, a trained workdir), guarded by a lock.
* `compile_events`: records every trace, lowering and compilation JAX does.
* Small readers of a workdir (complete checkpoint steps, results, logs).
"""

import contextlib
import fcntl
import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax

from configs import demo
from ultraad_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]

# The phantom every engine test reads (36 images); prepared once per session.
PHANTOM = {"image_size": 32, "n_per_class": 12, "difficulty": 0.3, "seed": 0}
# A second phantom (other seed, 15 images): the query set of the
# cross-dataset test.
CROSS_PHANTOM = {"image_size": 32, "n_per_class": 5, "difficulty": 0.3,
                 "seed": 1}  # fmt: skip

# Overrides of configs/demo.py:quick, as dotted keys. 2 shots per class from
# 12 images leaves 30 query images per episode.
TINY = {
    **{f"data.options.{k}": v for k, v in PHANTOM.items()},
    "backbone.image_size": 32,
    "data.num_views": 2,
    "episodes.shots": 2,
    "episodes.num_episodes": 2,
    "mesh.num_devices": 1,
    "eval.baselines": (),
    "eval.num_overlays": 1,
    "train.steps": 3,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "checkpoint.every_steps": 1,
    "checkpoint.max_to_keep": 3,
}

# Written by orbax into a step folder when the step is complete.
COMMIT_MARKER = "commit_success.txt"


def set_key(config, dotted, value):
  """Sets `config.<dotted>` (e.g. "train.steps") to `value`."""
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


def tiny_config(data_dir, overrides=None):
  """The tiny demo config reading prepared data from `data_dir`.

  Args:
    data_dir: the session's prepared TFDS folder (fixture `data_dir`).
    overrides: further {dotted key: value}, applied after TINY.

  Returns:
    An unlocked ConfigDict.
  """
  config = demo.get_config("quick")
  config.data.data_dir = str(data_dir)
  for key, value in {**TINY, **(overrides or {})}.items():
    set_key(config, key, value)
  return config


def _flag_value(value):
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def main_flags(data_dir, overrides=None):
  """main.py arguments giving the same config as `tiny_config`."""
  flags = ["--config", "configs/demo.py:quick",
           f"--config.data.data_dir={data_dir}"]  # fmt: skip
  for key, value in {**TINY, **(overrides or {})}.items():
    flags.append(f"--config.{key}={_flag_value(value)}")
  return flags


def shared_path(tmp_path_factory, name, build):
  """A folder that `build(path)` fills once for the whole test session.

  Every pytest-xdist worker of one session sees the same folder: the first to
  arrive builds it under a file lock, the others wait and reuse it.

  Args:
    tmp_path_factory: pytest's fixture.
    name: the folder's name.
    build: called with the (empty) folder's path.

  Returns:
    The folder's pathlib.Path.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # common to the workers of this session
  path = root / name
  done = root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        if path.exists():  # left by a build that failed
          shutil.rmtree(path)
        path.mkdir()
        build(path)
        done.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return path


@contextlib.contextmanager
def compile_events():
  """Yields a list that collects JAX's trace/lowering/compile events.

  JAX reports `/jax/core/compile/...` durations for every jaxpr trace, MLIR
  lowering and backend compilation (also when the persistent cache then
  serves the binary), so an empty list means nothing was traced or compiled.
  """
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event.startswith("/jax/core/compile/"):
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def complete_steps(workdir):
  """Checkpoint steps of `workdir` whose folder holds the commit marker."""
  folder = pathlib.Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(
      int(p.name)
      for p in folder.iterdir()
      if p.name.isdigit() and (p / COMMIT_MARKER).exists()
  )


def results_text(workdir):
  """results.json without "timing", as canonical JSON text (NaN-safe)."""
  return json.dumps(
      report.read_results(str(workdir), drop_timing=True), sort_keys=True
  )


def metric_steps(workdir):
  """The step of every line of metrics.jsonl, in order."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


class MainRun:
  """`python main.py ...` in a subprocess, its output in a log file."""

  def __init__(self, args, log_path):
    self.log_path = pathlib.Path(log_path)
    self._log = open(self.log_path, "w")
    # The environment (8 fake devices, compile cache) is the test session's.
    self.proc = subprocess.Popen(
        [sys.executable, "main.py", *args],
        cwd=REPO,
        stdout=self._log,
        stderr=subprocess.STDOUT,
    )

  def log(self):
    return self.log_path.read_text(errors="replace")

  def wait_until(self, predicate, what, timeout=300):
    """Polls `predicate()` until true; fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
      if self.proc.poll() is not None:
        raise AssertionError(
            f"main.py ended (exit {self.proc.returncode}) before {what}:\n"
            + self.log()[-3000:]
        )
      if time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n"
                             + self.log()[-3000:])  # fmt: skip
      time.sleep(0.01)

  def send(self, signum):
    self.proc.send_signal(signum)

  def kill(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
    return self.finish()

  def finish(self, timeout=300):
    """Waits for the exit; returns the exit code."""
    try:
      code = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      code = self.proc.wait()
    self._log.close()
    return code


def run_main(args, log_path, timeout=300):
  """Runs main.py to the end; returns (exit code, log text)."""
  run = MainRun(args, log_path)
  code = run.finish(timeout)
  return code, run.log()


def jit_engine_fn(fn, inputs, jit_kwargs=None, **kwargs):
  """`fn` jitted with the `step_inputs` fixture's optimiser, config, backbone.

  For train.train_step and train.train_steps.

  Args:
    fn: the engine function.
    inputs: the `step_inputs` fixture's dict.
    jit_kwargs: keyword arguments of jax.jit (e.g. out_shardings).
    **kwargs: further static arguments of `fn` (chunk, max_steps).

  Returns:
    The jitted function.
  """
  return jax.jit(
      functools.partial(
          fn,
          tx=inputs["tx"],
          cfg=inputs["cfg"],
          backbone=inputs["bb"],
          **kwargs,
      ),
      **(jit_kwargs or {}),
  )
