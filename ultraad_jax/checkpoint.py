"""Orbax checkpoints of the episode-stacked training state, with resume.

The state saved is the trainable part only (parameters, optimizer state, step);
frozen CLIP weights and the feature cache are rebuilt from the config, so a
checkpoint stays small. Orbax writes each step into a temporary folder and
renames it when complete, so a run killed mid-write leaves no step that
`latest_step` would return: a half-written checkpoint is never loaded.
"""

import os

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one workdir.

  Args:
    directory: where the steps are written (created if missing).
    max_to_keep: how many complete steps to keep.
  """

  def __init__(self, directory, max_to_keep=2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True
        ),
    )

  def latest_step(self):
    """Returns the newest complete step, or None when there is none."""
    return self._manager.latest_step()

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

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
