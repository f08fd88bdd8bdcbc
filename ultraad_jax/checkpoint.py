"""Orbax checkpoints of the episode-stacked training state, with resume.

The state saved is the trainable part only (parameters, optimizer state, step);
frozen CLIP weights and the feature cache are rebuilt from the config, so a
checkpoint stays small. Orbax writes each step into a temporary folder
(`<step>.orbax-checkpoint-tmp`), writes the commit marker `commit_success.txt`
into it, and only then renames it to `<step>`; a run killed mid-write leaves a
temporary folder that orbax ignores. A step folder without the marker can only
come from elsewhere (an interrupted copy or sync, a file system without atomic
renames); `Checkpointer` moves such folders aside so that a half-written
checkpoint is never loaded and never counted among the kept ones.
"""

import os
import time

from absl import logging
import jax
import orbax.checkpoint as ocp

# Written by orbax into the temporary folder before the rename that completes
# a save: a step folder without it is incomplete.
COMMIT_MARKER = "commit_success.txt"
# Suffix of the folders an incomplete step is moved to (orbax ignores them).
INCOMPLETE_SUFFIX = ".incomplete"


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one workdir.

  Args:
    directory: where the steps are written (created if missing).
    max_to_keep: how many complete steps to keep.
  """

  def __init__(self, directory, max_to_keep=2):
    self.directory = os.path.abspath(directory)
    self.moved_aside = self._move_incomplete_aside()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True
        ),
    )

  def _move_incomplete_aside(self):
    """Renames step folders without the commit marker; returns new paths."""
    if not os.path.isdir(self.directory):
      return []
    moved = []
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      if not name.isdigit() or not os.path.isdir(path):
        continue
      if os.path.exists(os.path.join(path, COMMIT_MARKER)):
        continue
      # A time stamp keeps repeated incidents of one step apart.
      target = f"{path}{INCOMPLETE_SUFFIX}-{time.time_ns()}"
      os.rename(path, target)
      logging.warning(
          "Checkpoint folder %s has no %s: it is incomplete (an interrupted "
          "write or copy) and is never loaded. Moved it to %s; delete it once "
          "you no longer need it.",
          path,
          COMMIT_MARKER,
          target,
      )
      moved.append(target)
    return moved

  def latest_step(self):
    """Returns the newest complete step, or None when there is none."""
    steps = [
        s
        for s in self._manager.all_steps()
        if os.path.exists(os.path.join(self.directory, str(s), COMMIT_MARKER))
    ]
    return max(steps) if steps else None

  def save(self, step, state, meta, *, wait=True):
    """Saves `state` (a pytree of arrays) and `meta` (JSON) at `step`.

    Args:
      step: the training step the state has reached.
      state: the stacked trainable state.
      meta: small JSON-serialisable facts (e.g. the config fingerprint).
      wait: block until the write is complete (and renamed into place).
    """
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )
    if wait:
      self._manager.wait_until_finished()
    logging.info("Saved checkpoint of step %d in %s.", step, self.directory)

  def restore(self, step, target):
    """Restores `step` into the structure, shapes and shardings of `target`.

    Args:
      step: a complete step (see latest_step).
      target: a pytree like the saved state (arrays or ShapeDtypeStructs with
        shardings); restoring into it keeps optax's state types intact.

    Returns:
      (state, meta).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out["state"], out["meta"]

  def read_meta(self, step):
    """Reads only the JSON facts saved with `step` (no arrays)."""
    out = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )
    return out["meta"]

  def close(self):
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
