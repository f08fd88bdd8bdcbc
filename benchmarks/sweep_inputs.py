"""What both sides of the few-shot sweep train on.

A synthetic labelled pool with lesion masks, each episode's support draw,
description embeddings, and the base config's head and optimiser: the
engine (bench_sweep.py) and the PyTorch peer loop (peer_loop.py) start
from these same inputs and follow the same learning-rate schedule.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from ultraad_jax import model
from ultraad_jax import train


def synthetic_pool(num_images, size, seed=0):
  """A labelled image pool: labels cycle 0, 1, 2; abnormal ones get a lesion.

  Args:
    num_images: pool size (>= 3 x shots).
    size: square image size.
    seed: random seed.

  Returns:
    (images [n, size, size, 3] uint8, masks [n, size, size] uint8 in {0, 1},
    labels [n] int32).
  """
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
  labels = (np.arange(num_images) % 3).astype(np.int32)
  masks = np.zeros((num_images, size, size), np.uint8)
  yy, xx = np.mgrid[0:size, 0:size]
  for i in np.flatnonzero(labels):
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    ry, rx = rng.uniform(0.1 * size, 0.25 * size, 2)
    masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
  return images, masks, labels


def draw_supports(labels, num_episodes, shots, seed=0):
  """Support indices of each episode: `shots` images of each class.

  Args:
    labels: [n] pool labels in {0, 1, 2}.
    num_episodes: E.
    shots: images per class.
    seed: random seed.

  Returns:
    [E, 3 * shots] int indices into the pool.
  """
  rng = np.random.default_rng(seed)
  by_class = [np.flatnonzero(labels == c) for c in range(3)]
  for c, idx in enumerate(by_class):
    if len(idx) < shots:
      raise ValueError(
          f"The pool holds {len(idx)} images of class {c}, fewer than "
          f"shots={shots}; raise --sweep_pool to at least {3 * shots}."
      )
  return np.stack([
      np.concatenate([rng.choice(idx, shots, replace=False)
                      for idx in by_class])
      for _ in range(num_episodes)
  ])  # fmt: skip


def description_embeds(num_episodes, support_size, dim, seed=0):
  """Random description embeddings (Pt) of every episode's support rows.

  Their values do not change the work, so both sides train on these rather
  than on encoded descriptions.

  Args:
    num_episodes: E.
    support_size: S.
    dim: D.
    seed: random seed.

  Returns:
    [E, S, D] float32.
  """
  rng = np.random.default_rng(seed)
  return rng.standard_normal((num_episodes, support_size, dim)).astype(
      np.float32
  )


def sweep_model_config(layers, fused_map_loss=None):
  """The sweep's model.ModelConfig: the base config's head at `layers`.

  Args:
    layers: the tapped layers.
    fused_map_loss: replaces the config's `fused_map_loss` (None: keep
      its "auto").

  Returns:
    A model.ModelConfig.
  """
  cfg = model.ModelConfig.from_dict(
      common.model_config(layers=layers).to_dict()
  )
  if fused_map_loss is None:
    return cfg
  return dataclasses.replace(cfg, fused_map_loss=fused_map_loss)


def sweep_run_config(steps):
  """The base config with `steps` training steps.

  Its logging and checkpoint schedule decide how the engine groups the steps
  into compiled calls (`train.call_plan`).
  """
  config = common.get_base_config()
  config.train.steps = steps
  return config


def sweep_train_config(steps):
  """The base config's optimiser settings with `steps` steps (both sides)."""
  return sweep_run_config(steps).train


def learning_rates(tc):
  """The learning rate of each step, as `train.make_optimizer` schedules it.

  Args:
    tc: the train config (steps, learning_rate, warmup_steps).

  Returns:
    [steps] float64 rates (optax's warmup-cosine schedule, evaluated once on
    the host so that the PyTorch peer follows the same one).
  """
  # One jitted call rather than a dozen eager ops (each a compilation).
  rates = jax.jit(train.make_schedule(tc))(jnp.arange(tc.steps))
  return np.asarray(jax.device_get(rates), np.float64)
