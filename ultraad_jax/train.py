"""Episode-parallel few-shot training and evaluation: `train_and_evaluate`.

One run trains and evaluates E few-shot episodes (seeds x draws) at once. The
trainable state of every episode is stacked on a leading axis; `train_step`
is the single-episode update vmapped over that axis, with the axis sharded
over the "episode" axis of a device mesh; `train_steps` runs several of them
in one compiled call (as many as lie between two host events: a log line, a
checkpoint, a validation). CLIP is frozen: its features
come from a cache built once (features.py), and its parameters are replicated
arguments that never enter the optimizer.

The function is split by banner comments in the order it runs: config checks,
mesh, data and episodes, feature cache, model and optimizer, checkpoint,
training loop, evaluation, reports.
"""

import dataclasses
import functools
import math
import os
import signal
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ultraad_jax import checkpoint as ckpt_lib
from ultraad_jax import chunking
from ultraad_jax import clip
from ultraad_jax import data as data_lib
from ultraad_jax import descriptions
from ultraad_jax import evaluation
from ultraad_jax import features
from ultraad_jax import model
from ultraad_jax import pipeline
from ultraad_jax import report
from ultraad_jax import run_config
from ultraad_jax import xla_env

P = jax.sharding.PartitionSpec

# Counts how often the compiled training call (`train_steps`) and the
# evaluation step are traced (one per sweep shape). Tests read it to prove
# that they never recompile; it has no other use.
TRACE_COUNTS = {"train_steps": 0, "predict": 0}


def to_host(tree):
  """Fetches a (possibly multi-host sharded) pytree of arrays to numpy.

  On one process this is jax.device_get. On a multi-host mesh, episode-
  sharded arrays have shards on other hosts; they are gathered first, so that
  every process sees the whole value.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


class TrainingDiverged(RuntimeError):
  """NaN or Inf in the loss or gradients; the message names step/episodes."""


# ---------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------
def make_mesh(config):
  """Builds the ("episode", "data") mesh over the configured devices."""
  devices = jax.devices()
  n = config.mesh.num_devices or len(devices)
  data = config.mesh.data
  mesh = jax.make_mesh(
      (n // data, data),
      ("episode", "data"),
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
      devices=devices[:n],
  )
  logging.info(
      "Mesh: %s over %d %s device(s).", dict(mesh.shape), n, devices[0].platform
  )
  return mesh


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Split:
  """All images of one dataset split, resized to the backbone's input size."""

  name: str
  images: np.ndarray  # [N, S, S, 3] uint8
  masks: np.ndarray  # [N, S, S] uint8
  labels: np.ndarray  # [N] int32
  image_ids: list
  patient_ids: list


def load_split(name, split, manual_dir, builder_options, config, size):
  """Reads one split of a TFDS dataset into memory at the backbone size.

  Args:
    name: the dataset (a builder under datasets/).
    split: the split to read.
    manual_dir: the folder of manually downloaded files ("" if none).
    builder_options: dataset-specific builder options (data.options).
    config: the run config (data_dir, skip_bad, dedupe, resize_mode).
    size: the backbone's input size.

  Returns:
    A Split.
  """
  start = time.time()
  options = {"skip_bad": config.data.skip_bad, "dedupe": config.data.dedupe}
  options.update(builder_options)
  sources = data_lib.load(
      name,
      data_dir=config.data.data_dir or run_config.default_data_dir(),
      manual_dir=manual_dir or None,
      **options,
  )
  if split not in sources:
    raise ValueError(
        f"data split {split!r} is not in dataset {name!r}; it "
        f"has {sorted(sources)}. Set data.split / data.test_split."
    )
  source = sources[split]
  images, masks, labels = pipeline.load_arrays(
      source, np.arange(len(source)), size, mode=config.data.resize_mode
  )
  out = Split(
      name=f"{name}/{split}",
      images=images,
      masks=masks,
      labels=np.asarray(labels, np.int32),
      image_ids=list(data_lib.image_ids_of(source)),
      patient_ids=list(data_lib.patient_ids_of(source)),
  )
  logging.info(
      "Loaded %s: %d images (%s per class) at %d px in %.1f s.",
      out.name,
      len(out.labels),
      np.bincount(out.labels, minlength=3),
      size,
      time.time() - start,
  )
  return out


def make_episodes(config, split, workdir):
  """Draws (or reads) the few-shot episodes and writes shots.json."""
  ec = config.episodes
  has_patients = any(split.patient_ids)
  if ec.shots_file:
    episodes = data_lib.load_shots(
        ec.shots_file,
        split.image_ids,
        patient_ids=split.patient_ids if has_patients else None,
    )
  else:
    episodes = data_lib.sample_episodes(
        split.labels,
        shots=ec.shots,
        setting=ec.setting,
        num_episodes=ec.num_episodes,
        seed=ec.seed,
        patient_ids=split.patient_ids if has_patients else None,
    )
  if len(episodes) != ec.num_episodes:
    raise ValueError(
        f"episodes.shots_file {ec.shots_file!r} holds "
        f"{len(episodes)} episodes, but episodes.num_episodes is "
        f"{ec.num_episodes}."
    )
  if jax.process_index() == 0:
    data_lib.save_shots(
        os.path.join(workdir, "shots.json"),
        episodes,
        split.image_ids,
        meta={
            "dataset": split.name,
            "setting": ec.setting,
            "shots": ec.shots,
            "seed": ec.seed,
        },
    )
  return episodes


# ---------------------------------------------------------------------------
# Episode tensors.
# ---------------------------------------------------------------------------
def split_support(config, split, episodes):
  """Support image indices for training and, optionally, for validation.

  With train.val_fraction > 0, the last round(fraction x shots) support
  images of every class (at least one) are held out of each episode's
  training set and memory bank: early stopping then watches the loss on
  them. The query (test) images are never looked at during training.

  Returns:
    (train, val): lists of index arrays, one per episode; val is None when
    train.val_fraction is 0.
  """
  fraction = config.train.val_fraction
  if not fraction:
    return [np.asarray(ep.support) for ep in episodes], None
  train, val = [], []
  for ep in episodes:
    sup = np.asarray(ep.support)
    lab = split.labels[sup]
    t, v = [], []
    for c in np.unique(lab):
      members = sup[lab == c]
      n_val = max(1, int(round(len(members) * fraction)))
      if n_val >= len(members):
        raise ValueError(
            f"config.train.val_fraction={fraction} holds out {n_val} of the "
            f"{len(members)} support images of class {c}, leaving none to "
            "train on. Use more shots or a smaller val_fraction."
        )
      t.extend(members[:-n_val])
      v.extend(members[-n_val:])
    train.append(np.asarray(t))
    val.append(np.asarray(v))
  return train, val


def episode_arrays(
    config, split, supports, cache, backbone, clip_params, group_offset=0
):
  """Stacks per-episode support indices, labels and description embeddings.

  Args:
    config: the run config.
    split: the Split the support images come from.
    supports: one array of support image indices per episode.
    cache: the FeatureCache (its row table).
    backbone: the clip.Backbone (encodes the descriptions).
    clip_params: its frozen parameters.
    group_offset: added to the group ids (validation samples must never share
      a group with a bank entry).

  Returns:
    A dict of [E, S'] arrays (S' = support images x views): `rows` (cache
    rows), `labels`, `group` (support image of each view), and `text_embed`
    [E, S', D], the frozen embeddings Pt of each sample's description.
  """
  num_views = config.data.num_views
  rows, labels, group, texts = [], [], [], []
  for i, sup in enumerate(supports):
    rows.append(cache.rows[sup].reshape(-1))
    lab = split.labels[sup]
    labels.append(np.repeat(lab, num_views))
    group.append(np.repeat(np.arange(len(sup)), num_views) + group_offset)
    # Descriptions vary with the episode, reproducibly: seed = (seed, i).
    assigned = descriptions.assign_descriptions(
        lab, seed=config.episodes.seed * 100003 + i
    )
    texts.append(np.repeat(np.asarray(assigned, dtype=object), num_views))
  unique = sorted({t for ts in texts for t in ts})
  table = np.asarray(model.encode_descriptions(backbone, clip_params, unique))
  lookup = {t: k for k, t in enumerate(unique)}
  text_idx = np.asarray([[lookup[t] for t in ts] for ts in texts])
  return {
      "rows": np.stack(rows).astype(np.int32),
      "labels": np.stack(labels).astype(np.int32),
      "group": np.stack(group).astype(np.int32),
      "text_embed": table[text_idx].astype(np.float32),
  }


def episode_elements(ep_data, cache_arrays):
  """Elements of one episode's support patch tokens, S x L x N x D.

  The head's largest activations (adapted and fused tokens, their
  gradients) have this size per episode, so it sizes the steps' programs.

  Args:
    ep_data: the episodes' support rows ([E, S] under "rows").
    cache_arrays: (global, patch tokens [L, rows, N, D], masks) of the cache.

  Returns:
    An int.
  """
  support = ep_data["rows"].shape[1]
  layers, _, tokens, dim = cache_arrays[1].shape
  return support * layers * tokens * dim


def head_compiler_options(ep_data, cache_arrays):
  """XLA options of the head's compiled steps (`xla_env.head_compiler_options`).

  Args:
    ep_data: the episodes' support rows ([E, S] under "rows").
    cache_arrays: (global, patch tokens [L, rows, N, D], masks) of the cache.

  Returns:
    A dict for `jax.jit(..., compiler_options=...)`.
  """
  num_episodes = ep_data["rows"].shape[0]
  return xla_env.head_compiler_options(
      num_episodes * episode_elements(ep_data, cache_arrays)
  )


# On CPU, a step over many small episodes runs faster a few episodes at a
# time: vmapped over all 64 episodes of the tiny config, every activation is
# a 50 MB array that streams through memory between XLA's kernels; 4 at a
# time (3 MB) they stay in cache, and the step took 223 instead of 312 ms
# (2-core development machine, docs/PERFORMANCE.md). Large episodes gain
# nothing: at ViT-B/16 (4.8M elements each) 1 or 2 at a time were 2.2x and
# 1.2x slower than all 8 at once. So "auto" chunks only where at least two
# episodes fit this many elements.
AUTO_CHUNK_ELEMENTS = 1 << 20
# ... and many large episodes at once need memory for nothing: at ViT-B/16
# the step's temporaries were 5.7 GB for 64 episodes all at once and 2.9 GB
# 16 at a time; for 256 episodes 23.0 GB (more than the 24 GB development
# machine) and 7.0 GB. Steps run one after another took the same time
# either way (AMD Zen 5 VM, 2 cores, huge pages, 64 episodes: 4.50 s all at
# once, 4.28 s 16 at a time, 4.67 s 8 at a time; medians of 6 steps). So
# larger steps are split into the fewest chunks of at most this many
# elements: 16 ViT-B/16 episodes (8 at once stay whole: 0.57 s, against
# 0.66 s 4 at a time).
AUTO_CHUNK_MAX_ELEMENTS = 1 << 27


def episode_chunk(setting, num_episodes, episode_axis, elements, backend):
  """Episodes each train/validation step processes at once.

  Args:
    setting: config.train.episode_chunk: 0 for automatic, else episodes per
      device at once.
    num_episodes: E.
    episode_axis: devices on the mesh's "episode" axis (divides E).
    elements: `episode_elements` of one episode.
    backend: jax.default_backend().

  Returns:
    The global chunk (a divisor of E and a multiple of episode_axis); E
    means all episodes at once (a plain vmap).

  Raises:
    ValueError: a setting that does not divide the episodes per device.
  """
  local = num_episodes // episode_axis
  if setting < 0:
    raise ValueError(
        f"train.episode_chunk={setting}; expected 0 (automatic) or the "
        "number of episodes per device a step processes at once."
    )
  if setting:
    if local % setting:
      raise ValueError(
          f"train.episode_chunk={setting} does not divide the {local} "
          f"episodes per device ({num_episodes} episodes over {episode_axis} "
          f"device(s)); use one of {run_config.divisors(local)}."
      )
    return setting * episode_axis
  if backend != "cpu":
    return num_episodes
  elements = max(elements, 1)
  fit = AUTO_CHUNK_ELEMENTS // elements
  fitting = [d for d in run_config.divisors(local) if 2 <= d <= fit]
  if fitting:
    return max(fitting) * episode_axis
  if local * elements <= AUTO_CHUNK_MAX_ELEMENTS:
    return num_episodes
  fit = max(AUTO_CHUNK_MAX_ELEMENTS // elements, 1)
  return max(d for d in run_config.divisors(local) if d <= fit) * episode_axis


def gather_support(cache_arrays, ep):
  """Builds one episode's model.Support from cache rows (inside jit)."""
  g, p, m = cache_arrays
  rows = ep["rows"]
  # One gather from the layers stacked as rows: row l * M + r of `flat` is
  # layer l of cache row r. Under the step's episode vmap it writes the
  # [E, L, S, N, D] layout the head reads directly; `p[:, rows]` wrote
  # [E * S, L, N, D] blocks that XLA then transposed, once per consumer
  # (two extra copies of the tokens, 12 % of the ViT-B/16 train step).
  num_layers, num_rows = p.shape[:2]
  flat = p.reshape((num_layers * num_rows,) + p.shape[2:])
  layer_rows = rows[None, :] + num_rows * jnp.arange(num_layers)[:, None]
  return model.Support(
      global_embed=g[rows].astype(jnp.float32),
      patch_tokens=flat[layer_rows].astype(jnp.float32),
      masks=m[rows].astype(jnp.float32),
      labels=ep["labels"],
      group=ep["group"],
      text_embed=ep["text_embed"],
  )


def make_init(cfg, backbone, tx):
  """Every episode's initial state, as one function to jit.

  The feature cache and the CLIP parameters are arguments of the returned
  function, never closed over: jit embeds closed-over arrays in the program
  as constants (at ViT-B/16 with a BUSI cache, gigabytes of program to
  compile, and a second copy of both in memory).

  Args:
    cfg: the model.ModelConfig.
    backbone: the clip.Backbone.
    tx: the optax optimiser.

  Returns:
    `init_all(keys, ep_data, cache_arrays, clip_params) -> (params,
    opt_state, frozen)`, vmapped over the episodes (keys [E], ep_data with a
    leading E axis); the cache and the CLIP parameters are shared.
  """

  def init_one(key, ep, cache_arrays, clip_params):
    support = gather_support(cache_arrays, ep)
    params = model.init(key, cfg, backbone, clip_params, support)
    return (
        params,
        tx.init(params),
        model.frozen(cfg, backbone, clip_params, support),
    )

  return jax.vmap(init_one, in_axes=(0, 0, None, None))


# ---------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------
def make_schedule(tc):
  """The learning rate by step: linear warmup, then cosine decay to 0.

  Args:
    tc: the train config (steps, learning_rate, warmup_steps).

  Returns:
    An optax schedule (step -> rate).
  """
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=tc.learning_rate,
      warmup_steps=min(tc.warmup_steps, max(tc.steps - 1, 0)),
      decay_steps=max(tc.steps, 1),
  )


def make_optimizer(tc):
  """AdamW with warmup-cosine decay and global-norm clipping."""
  schedule = make_schedule(tc)
  parts = []
  if tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(
      optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay)
  )
  return optax.chain(*parts)


# ---------------------------------------------------------------------------
# Steps (pure functions; the episode axis is added here by vmap).
# ---------------------------------------------------------------------------
def train_step(
    state,
    ep_data,
    frozen,
    cache_arrays,
    clip_params,
    rng,
    *,
    tx,
    cfg,
    backbone,
    chunk=0,
):
  """One optimisation step of every episode.

  Args:
    state: {"params", "opt"} stacked over episodes, and the scalar "step".
    ep_data: per-episode support arrays (see episode_arrays), stacked.
    frozen: per-episode frozen model state (model.frozen), stacked.
    cache_arrays: (global [M, D], patches [L, M, N, D], masks [M, H, W]).
    clip_params: frozen backbone parameters (replicated, not optimised).
    rng: the run's base key; each step and episode folds in its indices.
    tx: the optax transformation.
    cfg: model.ModelConfig.
    backbone: the clip.Backbone.
    chunk: episodes computed at once (`episode_chunk`); 0 = all.

  Returns:
    (new state, per-episode metrics {name: [E]}).
  """
  step = state["step"]
  num_episodes = ep_data["rows"].shape[0]

  def one(params, opt, ep, fz, index):
    key = jax.random.fold_in(jax.random.fold_in(rng, step), index)
    support = gather_support(cache_arrays, ep)
    loss_fn = functools.partial(
        model.loss_fn, cfg=cfg, backbone=backbone, clip_params=clip_params
    )
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, fz, support, key
    )
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    return params, opt, metrics

  params, opt, metrics = chunking.map_in_chunks(
      one,
      (state["params"], state["opt"], ep_data, frozen,
       jnp.arange(num_episodes)),
      chunk,
  )  # fmt: skip
  # Other entries (early stopping's "best", "best_val") pass through.
  return {**state, "params": params, "opt": opt, "step": step + 1}, metrics


def train_steps(
    state,
    ep_data,
    frozen,
    cache_arrays,
    clip_params,
    rng,
    num_steps,
    *,
    tx,
    cfg,
    backbone,
    chunk=0,
    max_steps=1,
):
  """`num_steps` successive `train_step`s of every episode, in one call.

  The steps run in a loop inside one compiled program, whose trip count is a
  traced argument: every call length up to `max_steps` uses the same
  program. On CPU this matters beyond dispatch: XLA allocates a call's
  temporaries afresh at every call, and above glibc's 32 MiB mmap threshold
  the kernel zeroes their pages anew each time (a fifth of the ViT-B/16
  step's CPU samples, docs/PERFORMANCE.md round 8). A loop of steps pays
  that once per call (round 9: 5 % faster at ViT-B/16, 15-20 % in the
  demo).

  Args:
    state: as for `train_step`.
    ep_data: as for `train_step`.
    frozen: as for `train_step`.
    cache_arrays: as for `train_step`.
    clip_params: as for `train_step`.
    rng: as for `train_step`.
    num_steps: int32 scalar in [1, max_steps], the steps this call runs.
    tx: the optax transformation.
    cfg: model.ModelConfig.
    backbone: the clip.Backbone.
    chunk: episodes computed at once (`episode_chunk`); 0 = all.
    max_steps: the most steps one call may run (static; sizes the metrics).

  Returns:
    (new state, metrics {name: [max_steps, E]}): row i holds step i of the
    call; rows from `num_steps` on are zeros.
  """
  TRACE_COUNTS["train_steps"] += 1
  # Looked up in the module at trace time, so that tests can wrap it.
  step = functools.partial(
      train_step, tx=tx, cfg=cfg, backbone=backbone, chunk=chunk
  )
  args = (ep_data, frozen, cache_arrays, clip_params, rng)
  shapes = jax.eval_shape(step, state, *args)[1]
  rows = jax.tree.map(
      lambda s: jnp.zeros((max_steps,) + s.shape, s.dtype), shapes
  )

  def body(i, carry):
    state, rows = carry
    state, metrics = step(state, *args)
    rows = jax.tree.map(lambda r, m: r.at[i].set(m), rows, metrics)
    return state, rows

  return jax.lax.fori_loop(0, num_steps, body, (state, rows))


def jit_train_steps(*, tx, cfg, backbone, chunk, max_steps,
                    compiler_options=None, out_shardings=None):  # fmt: skip
  """`train_steps` jitted as the engine runs it, donating its state.

  Args:
    tx: the optax transformation.
    cfg: model.ModelConfig.
    backbone: the clip.Backbone.
    chunk: episodes computed at once (`episode_chunk`).
    max_steps: the most steps of one call (`call_plan`).
    compiler_options: per-program XLA options (None: XLA's).
    out_shardings: the outputs' shardings on a mesh (None: XLA's choice).

  Returns:
    The jitted function of (state, ep_data, frozen, cache_arrays,
    clip_params, rng, num_steps).
  """
  jit_kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
  return jax.jit(
      functools.partial(
          train_steps,
          tx=tx,
          cfg=cfg,
          backbone=backbone,
          chunk=chunk,
          max_steps=max_steps,
      ),
      donate_argnums=(0,),
      compiler_options=compiler_options,
      **jit_kwargs,
  )


def call_lengths(start, total, max_steps, events):
  """How many steps each compiled training call runs, in order.

  A call ends at every step after which the host has work to do (`events`),
  so that logging, checkpoints and validation happen where they would with
  one step per call, and no call runs more than `max_steps` steps.

  Args:
    start: the first step to run (steps done so far).
    total: the schedule's steps.
    max_steps: the most steps per call (>= 1).
    events: step counts after which a call must end (others are ignored
      when outside (start, total)).

  Returns:
    A list of positive ints summing to total - start.
  """
  stops = sorted({e for e in events if start < e < total} | {total})
  lengths, done = [], start
  for stop in stops:
    while done < stop:
      n = min(max_steps, stop - done)
      lengths.append(n)
      done += n
  return lengths


def val_step(
    state,
    ep_val,
    frozen,
    cache_arrays,
    clip_params,
    rng,
    *,
    cfg,
    backbone,
    chunk=0,
):
  """Validation loss of every episode; keeps each episode's best params.

  Args:
    state: the training state with "best" and "best_val" (see
      train_and_evaluate).
    ep_val: per-episode validation support arrays (held out of training and
      of the memory bank).
    frozen: per-episode frozen model state.
    cache_arrays: the feature cache.
    clip_params: frozen backbone parameters.
    rng: base key (the loss may draw a minibatch).
    cfg: model.ModelConfig.
    backbone: the clip.Backbone.
    chunk: episodes computed at once (`episode_chunk`); 0 = all.

  Returns:
    (state with "best"/"best_val" updated, validation loss [E]).
  """

  def one(params, fz, ep):
    support = gather_support(cache_arrays, ep)
    loss, _ = model.loss_fn(
        params,
        fz,
        support,
        rng,
        cfg=cfg,
        backbone=backbone,
        clip_params=clip_params,
    )
    return loss

  loss = chunking.map_in_chunks(one, (state["params"], frozen, ep_val), chunk)
  better = loss < state["best_val"]

  def pick(best, new):
    shape = (-1,) + (1,) * (new.ndim - 1)
    return jnp.where(better.reshape(shape), new, best)

  state = dict(state)
  state["best"] = jax.tree.map(pick, state["best"], state["params"])
  state["best_val"] = jnp.where(better, loss, state["best_val"])
  return state, loss


def predict_step(
    params,
    frozen,
    ep_data,
    cache_arrays,
    query_g,
    query_p,
    clip_params,
    *,
    cfg,
    backbone,
    method,
):
  """Predictions of every episode (of a chunk) on one query batch.

  Args:
    params: stacked trainable params (ignored by baselines).
    frozen: stacked frozen state.
    ep_data: stacked per-episode support arrays (baselines fit on them).
    cache_arrays: the support feature cache (see train_step).
    query_g: [B, D] query global embeddings (shared by all episodes).
    query_p: [L, B, N, D] query patch tokens.
    clip_params: frozen backbone parameters.
    cfg: model.ModelConfig.
    backbone: the clip.Backbone.
    method: "ultraad" or a baseline name.

  Returns:
    model.Predictions with a leading episode axis.
  """
  TRACE_COUNTS["predict"] += 1
  query = model.Query(
      global_embed=query_g.astype(jnp.float32),
      patch_tokens=query_p.astype(jnp.float32),
  )

  def one(p, fz, ep):
    # The support is gathered from the cache here, per chunk of episodes:
    # only the patch memory reads it (and XLA drops the gather otherwise).
    support = gather_support(cache_arrays, ep)
    if method == "ultraad":
      return model.predict(
          p, fz, query, cfg=cfg, backbone=backbone, clip_params=clip_params,
          support=support,
      )  # fmt: skip
    return model.baseline_predictions(
        method,
        cfg=cfg,
        backbone=backbone,
        clip_params=clip_params,
        support=support,
        frozen_state=fz,
        query=query,
    )

  return jax.vmap(one)(params, frozen, ep_data)


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------
class _StopRequest:
  """Turns SIGINT/SIGTERM into a flag: the loop finishes the step and saves."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: stop at once
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning(
        "Received signal %d: finishing this step, saving, and "
        "stopping. Send it again to stop at once.",
        signum,
    )

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def build_backbone(config):
  """The frozen CLIP of the config (tiny, hub name, or local folder)."""
  bc = config.backbone
  if bc.name == "tiny":
    overrides = {}
    if bc.image_size:
      overrides["image_size"] = bc.image_size
    if bc.tiny_init_scale:
      overrides["init_scale"] = bc.tiny_init_scale
    if bc.activation:
      overrides["hidden_act"] = bc.activation
    return clip.tiny(seed=bc.tiny_seed, **overrides)
  return clip.load(
      bc.name,
      image_size=bc.image_size or None,
      activation=bc.activation or None,
  )


def _check_finite(first, n, metrics, checkpointer):
  """Raises TrainingDiverged naming the first step with NaN/Inf, and episodes.

  Args:
    first: the steps done before the call that made `metrics`.
    n: the steps that call ran (the rows of `metrics` that hold steps).
    metrics: {name: [rows, E]} from `train_steps`, fetched (`to_host`).
    checkpointer: the run's Checkpointer (named in the error).
  """
  bad = np.zeros_like(np.asarray(metrics["loss"])[:n], dtype=bool)
  for name in ("loss", "grad_norm"):
    bad |= ~np.isfinite(np.asarray(metrics[name])[:n])
  if bad.any():
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    step = first + row + 1
    last = checkpointer.latest_step()
    raise TrainingDiverged(
        f"NaN or Inf in the loss or gradients at step {step} in episode(s) "
        f"{np.flatnonzero(bad[row]).tolist()}. Training stopped; the last good "
        f"checkpoint is step {last} in {checkpointer.directory} (left "
        "intact). Lower train.learning_rate or set train.grad_clip, and check"
        " the inputs of those episodes (shots.json)."
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains every episode of the config, evaluates, and writes the reports.

  Args:
    config: a configuration from configs/ (see configs/common.py).
    workdir: where config.json, shots.json, checkpoints, metrics and results
      go. Rerunning with the same workdir resumes from the latest checkpoint.

  Returns:
    The results dict that was written to results.json.
  """
  t_start = time.time()
  # ---- Config checks (before anything is loaded or compiled) -------------
  run_config.validate(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    _write(
        os.path.join(workdir, "config.json"),
        config.to_json_best_effort(indent=2, sort_keys=True),
    )

  # ---- Checkpoints: checked before any work, so that a wrong workdir or an
  # eval without a checkpoint fails at once -----------------------------------
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), config.checkpoint.max_to_keep
  )
  fingerprint = run_config.fingerprint(config)
  latest = checkpointer.latest_step()
  if latest is not None:
    if checkpointer.read_meta(latest).get("fingerprint") != fingerprint:
      raise ValueError(
          f"The checkpoint in {checkpointer.directory} was written by a "
          "different config (its training-relevant keys differ). Use a new "
          "--workdir, or rerun with the config that wrote it (config.json)."
      )
  elif config.mode == "eval":
    raise FileNotFoundError(
        f"mode=eval needs a checkpoint, but {checkpointer.directory} has "
        "none. Train first (mode=train) with this --workdir."
    )
  try:
    # Every program traced inside takes its matrix-product precision from
    # here, except the frozen passes, which set their own (in _run).
    with jax.default_matmul_precision(config.precision.head):
      return _run(config, workdir, checkpointer, latest, fingerprint, t_start)
  finally:
    checkpointer.close()


def _run(config, workdir, checkpointer, latest, fingerprint, t_start):
  """The body of train_and_evaluate, after the checkpoint checks."""
  timing = {}
  # ---- Mesh and backbone ---------------------------------------------------
  mesh = make_mesh(config)
  replicated = jax.sharding.NamedSharding(mesh, P())
  by_episode = jax.sharding.NamedSharding(mesh, P("episode"))
  backbone = build_backbone(config)
  run_config.validate_against_backbone(config, backbone)
  cfg = model.ModelConfig.from_dict(config.model.to_dict())
  cfg.validate(backbone)
  clip_params = jax.device_put(backbone.params, replicated)
  size = backbone.image_size

  # ---- Data and episodes --------------------------------------------------
  t0 = time.time()
  options = dict(config.data.options.to_dict())
  if config.data.builder_config:
    options["builder_config"] = config.data.builder_config
  split = load_split(
      config.data.name,
      config.data.split,
      config.data.manual_dir,
      options,
      config,
      size,
  )
  run_config.validate_against_data(config, split.labels)
  episodes = make_episodes(config, split, workdir)
  cross = bool(config.data.test_name)
  test = (
      load_split(
          config.data.test_name,
          config.data.test_split,
          config.data.test_manual_dir,
          config.data.test_options.to_dict(),
          config,
          size,
      )
      if cross
      else split
  )
  timing["data_s"] = time.time() - t0

  # ---- Feature cache ------------------------------------------------------
  t0 = time.time()
  test_cache, cache_arrays, ep_data, ep_val = _frozen_passes(
      config, backbone, clip_params, cfg, split, test, episodes,
      replicated, by_episode,
  )  # fmt: skip
  timing["features_s"] = time.time() - t0

  # ---- Model, frozen state and optimizer ----------------------------------
  num_episodes = len(episodes)
  tx = make_optimizer(config.train)
  rng = jax.random.key(config.seed)

  keys = jax.random.split(jax.random.fold_in(rng, 1), num_episodes)
  init_fn = jax.jit(
      make_init(cfg, backbone, tx),
      out_shardings=(by_episode, by_episode, by_episode),
  )
  params, opt_state, frozen = init_fn(
      jax.device_put(keys, by_episode), ep_data, cache_arrays, clip_params
  )
  state = {
      "params": params,
      "opt": opt_state,
      "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
  }
  if ep_val is not None:
    # Early stopping keeps each episode's best parameters (on its support
    # validation images). A host copy, so that donating `params` to the step
    # never frees the buffers of `best`.
    state["best"] = jax.device_put(to_host(params), by_episode)
    state["best_val"] = jax.device_put(
        np.full((num_episodes,), np.inf, np.float32), by_episode
    )
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  # ---- Resume -------------------------------------------------------------
  if latest is not None:
    state, _ = checkpointer.restore(latest, state)
    logging.info("Resumed from step %d.", latest)

  # ---- Training loop ------------------------------------------------------
  t0 = time.time()
  head_options = head_compiler_options(ep_data, cache_arrays)
  step_chunk = episode_chunk(
      config.train.episode_chunk,
      num_episodes,
      mesh.shape["episode"],
      episode_elements(ep_data, cache_arrays),
      jax.default_backend(),
  )
  if step_chunk < num_episodes:
    logging.info(
        "Train step: %d episodes at a time (train.episode_chunk).", step_chunk
    )
  total = config.train.steps
  start_step = int(state["step"])
  lengths = call_plan(config, start_step, total, validating=ep_val is not None)
  step_fn = jit_train_steps(
      tx=tx,
      cfg=cfg,
      backbone=backbone,
      chunk=step_chunk,
      max_steps=max(lengths, default=1),
      compiler_options=head_options,
      # Metrics are [steps of the call, E].
      out_shardings=(
          state_shardings,
          jax.sharding.NamedSharding(mesh, P(None, "episode")),
      ),
  )
  val_fn = None
  if ep_val is not None:
    val_fn = jax.jit(
        functools.partial(
            val_step, cfg=cfg, backbone=backbone, chunk=step_chunk
        ),
        donate_argnums=(0,),
        out_shardings=(state_shardings, by_episode),
        compiler_options=head_options,
    )
  stopped_early = False
  if config.mode == "train" and start_step < total:
    if max(lengths) > 1:
      logging.info(
          "Training runs up to %d steps per compiled call "
          "(train.steps_per_call).",
          max(lengths),
      )
    lowered = step_fn.lower(
        state, ep_data, frozen, cache_arrays, clip_params, rng, np.int32(1)
    )
    compiled = lowered.compile()
    _log_cost("train_step", compiled, num_episodes // step_chunk)
    if config.dump_hlo:
      _write(os.path.join(workdir, "hlo", "train_step.txt"), compiled.as_text())
    state, stopped_early = _train_loop(
        state,
        step_fn,
        val_fn,
        (ep_data, frozen, cache_arrays, clip_params, rng),
        ep_val,
        checkpointer=checkpointer,
        config=config,
        workdir=workdir,
        fingerprint=fingerprint,
        start_step=start_step,
        lengths=lengths,
    )
    timing["train_s"] = time.time() - t0
  if stopped_early:
    logging.warning(
        "Stopped at step %d on request; rerun the same command to resume.",
        int(state["step"]),
    )
    return None

  # ---- Evaluation ---------------------------------------------------------
  t0 = time.time()
  if cross:
    query_mask = np.ones((num_episodes, len(test.labels)), bool)
  else:
    query_mask = np.zeros((num_episodes, len(split.labels)), bool)
    for i, ep in enumerate(episodes):
      query_mask[i, ep.query] = True
  # With early stopping, each episode is evaluated at its best step on its
  # own support validation images; otherwise at the last step.
  eval_params = state["best"] if ep_val is not None else state["params"]
  # Host memory: maps of a chunk of episodes over all test images are held
  # at once (exact pixel metrics need every pixel of an episode).
  chunk = _episode_chunk(
      num_episodes,
      mesh.shape["episode"],
      test.images.shape[:3],
      config.eval.memory_budget_gb,
  )
  methods = ("ultraad",) + tuple(config.eval.baselines)
  per_method = {m: [] for m in methods}
  examples = {}
  for method in methods:
    predict = _make_predict(
        method,
        cfg=cfg,
        backbone=backbone,
        mesh=mesh,
        compiler_options=head_options,
    )
    for start in range(0, num_episodes, chunk):
      part = slice(start, start + chunk)
      preds = _predict_all(
          predict,
          jax.tree.map(lambda x: x[part], (eval_params, frozen, ep_data)),
          cache_arrays,
          test_cache,
          clip_params,
          config.eval.batch_size,
          hlo_path=(
              os.path.join(workdir, "hlo", f"predict_{method}.txt")
              if config.dump_hlo and start == 0
              else None
          ),
          what=f"{method}, episodes {start + 1}-"
          f"{min(start + chunk, num_episodes)} of {num_episodes}",
      )
      per_method[method].extend(
          evaluation.episode_metrics(
              preds,
              test.labels,
              test.masks,
              query_mask[part],
              setting=config.episodes.setting,
          )
      )
      if start == 0:
        examples[method] = {k: v[0] for k, v in preds.items()}
    logging.info(
        "Evaluated %s on %d episodes (%.1f s since the evaluation began).",
        method,
        num_episodes,
        time.time() - t0,
    )
  timing["eval_s"] = time.time() - t0

  # ---- Reports ------------------------------------------------------------
  results = evaluation.assemble_results(
      config,
      per_method,
      backbone_name=config.backbone.name,
      dataset=test.name,
      selection=(
          report.SELECTION_EARLY_STOPPING
          if config.train.val_fraction > 0
          else report.SELECTION_FIXED
      ),
  )
  results["model"] = "UltraAD"
  timing["total_s"] = time.time() - t_start
  results["timing"] = {k: round(v, 3) for k, v in timing.items()}
  if jax.process_index() == 0:  # one writer on a multi-host pod
    report.write_results(workdir, results)
    evaluation.write_figures(
        workdir,
        test,
        query_mask[0],
        examples,
        per_method,
        per_class=config.eval.num_overlays,
        title=evaluation.caption(results),
    )
  logging.info("Wrote results to %s.", os.path.join(workdir, "results.md"))
  return results


def _frozen_passes(config, backbone, clip_params, cfg, split, test, episodes,
                   replicated, by_episode):  # fmt: skip
  """The frozen CLIP's one-off passes, at `config.precision.frozen`.

  The feature caches of the support and query images, and the embeddings of
  the episodes' descriptions.

  Args:
    config: the run config.
    backbone: the clip.Backbone.
    clip_params: its parameters, replicated over the mesh.
    cfg: the model.ModelConfig (tapped layers).
    split: the split the episodes draw from.
    test: the query split (`split` itself unless cross-dataset).
    episodes: the episodes (their support images get every view).
    replicated: the mesh's replicated sharding (the caches).
    by_episode: its sharding along the episode axis (the episodes' arrays).

  Returns:
    (test_cache, cache_arrays, ep_data, ep_val): the FeatureCache of the
    queries, the support cache's (global, patch tokens, masks) arrays, and
    the episodes' training (and validation, or None) support arrays.
  """
  # A context, not an argument: it reaches every product the transformers
  # CLIP modules trace, and jit keys its cache on it.
  with jax.default_matmul_precision(config.precision.frozen):
    num_views = config.data.num_views
    used = np.zeros(len(split.labels), bool)
    for ep in episodes:
      used[ep.support] = True
    view_seed = config.episodes.seed

    def view_fn(imgs, msks, v):
      return pipeline.augment(imgs, msks, v, seed=view_seed)

    build = functools.partial(
        features.build,
        backbone,
        clip_params,
        layers=cfg.layers,
        batch_size=config.cache.batch_size,
        dtype=config.cache.dtype,
        memory_budget_gb=config.cache.memory_budget_gb,
        sharding=replicated,
    )
    cache = build(split.images, split.masks, view_fn, used,
                  num_views=num_views)  # fmt: skip
    test_cache = cache
    if test is not split:  # cross-dataset: the queries have their own cache
      no_views = np.zeros(len(test.labels), bool)
      test_cache = build(test.images, test.masks, None, no_views, num_views=1)
    cache_arrays = (
        cache.global_embed,
        cache.patch_tokens,
        jax.device_put(cache.masks, replicated),
    )
    train_support, val_support = split_support(config, split, episodes)
    ep_data = jax.device_put(
        episode_arrays(
            config, split, train_support, cache, backbone, backbone.params
        ),
        by_episode,
    )
    ep_val = None
    if val_support is not None:
      ep_val = jax.device_put(
          episode_arrays(
              config,
              split,
              val_support,
              cache,
              backbone,
              backbone.params,
              group_offset=1 << 20,
          ),
          by_episode,
      )
  return test_cache, cache_arrays, ep_data, ep_val


def _host_events(config, start, total, *, validating):
  """Step counts after which a training call ends (host work, profiling).

  After each, the host logs, saves or validates, or the next step is
  profiled (every profiled step is a call of its own).

  Args:
    config: the run config (train.log_every, train.val_every,
      checkpoint.every_steps, profile_steps).
    start: the steps done before this run.
    total: the schedule's steps.
    validating: whether the run validates (early stopping).

  Returns:
    A set of step counts (`call_lengths` ends a call at each).
  """
  everies = [config.train.log_every, config.checkpoint.every_steps]
  if validating:
    everies.append(config.train.val_every)
  events = {1}  # the first step is always logged
  for every in everies:
    events.update(range(every, total, every))
  if config.profile_steps:
    # Every profiled step is a call of its own, so that the trace has one
    # StepTraceAnnotation slice per step.
    first, end = _profile_range(config, start)
    events.update(range(first, end + 1))
  return events


def call_plan(config, start, total, *, validating):
  """The steps of each compiled training call of a run, in order.

  Args:
    config: the run config (train.steps_per_call and the host events'
      intervals, see `_host_events`).
    start: the steps done before this run.
    total: the schedule's steps.
    validating: whether the run validates (early stopping).

  Returns:
    `call_lengths` for the run's host events, at most
    train.steps_per_call steps a call (0: no cap).
  """
  cap = config.train.steps_per_call or max(total, 1)
  events = _host_events(config, start, total, validating=validating)
  return call_lengths(start, total, cap, events)


def _profile_range(config, start):
  """(first, end) step counts of the profiled steps: after two warm-up steps."""
  return start + 2, start + 2 + config.profile_steps


def _train_loop(
    state,
    step_fn,
    val_fn,
    args,
    ep_val,
    *,
    checkpointer,
    config,
    workdir,
    fingerprint,
    start_step,
    lengths,
):
  """Runs the steps after start_step: logs, checks, checkpoints, profiling.

  Args:
    state: the stacked training state (donated to each call).
    step_fn: the jitted `train_steps`.
    val_fn: the jitted validation step, or None (fixed schedule).
    args: the step's other arguments (ep_data, frozen, cache_arrays,
      clip_params, rng).
    ep_val: validation support arrays (with val_fn).
    checkpointer: the run's Checkpointer.
    config: the run config.
    workdir: the run's folder (metrics, profile).
    fingerprint: the config fingerprint saved with every checkpoint.
    start_step: the steps done before this run.
    lengths: the steps of each call (`call_lengths`); they end on every
      step where the host logs, saves, validates or starts or stops the
      profiler.

  Returns:
    (state, stopped_early): stopped_early is True when SIGINT/SIGTERM ended
    the run before the schedule's end (a checkpoint of the step reached was
    saved).
  """
  total = start_step + sum(lengths)
  writer = (
      report.MetricWriter(workdir)
      if jax.process_index() == 0
      else _NullWriter()
  )
  stopped_early = False
  try:
    profile_range = _profile_range(config, start_step)
    pending = None  # (first step, n, metrics) not checked for NaN yet
    t_loop = time.time()
    done = start_step
    with _StopRequest() as stop:
      for n in lengths:
        step = done
        if config.profile_steps and step == profile_range[0]:
          jax.block_until_ready(state)
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
        # One annotated "step" per call, which records how many steps it
        # ran (bench.py --trace_summary divides by them). The profiled steps
        # are calls of one step each (_host_events).
        with jax.profiler.StepTraceAnnotation("train", step_num=step, steps=n):
          state, metrics = step_fn(state, *args, np.int32(n))
        done = step + n
        if config.profile_steps and done == profile_range[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        # The previous call's metrics are checked while this call runs, so
        # the host never stalls the device on an ordinary call.
        if pending is not None:
          first, ran, rows = pending
          _check_finite(first, ran, to_host(rows), checkpointer)
          pending = None
        # Read the flag once: a signal landing between two reads would end
        # the loop on a step that was never saved.
        stopping = stop.signum is not None
        last = done == total or stopping
        if val_fn is not None and (last or done % config.train.val_every == 0):
          state, val_loss = val_fn(state, ep_val, *args[1:])
          val_loss = to_host(val_loss)
          writer.write(done, {"val_loss": float(np.mean(val_loss))})
          logging.info(
              "step %d  validation loss %.4f (mean over episodes)",
              done,
              float(np.mean(val_loss)),
          )
        save = last or done % config.checkpoint.every_steps == 0
        if save or done == 1 or done % config.train.log_every == 0:
          # Host-side work on this step: NaN check, log line, checkpoint.
          host = to_host(metrics)
          _check_finite(step, n, host, checkpointer)
          means = {k: float(np.mean(v[n - 1])) for k, v in host.items()}
          writer.write(done, means)
          rate = (done - start_step) / max(time.time() - t_loop, 1e-9)
          logging.info(
              "step %d/%d  loss %.4f  %.2f steps/s  ETA %s",
              done,
              total,
              means["loss"],
              rate,
              _fmt_eta((total - done) / max(rate, 1e-9)),
          )
          if save:
            checkpointer.save(
                done, state, {"fingerprint": fingerprint, "step": done}
            )
        else:
          pending = (step, n, metrics)
        if stopping:
          stopped_early = done < total
          break
  finally:
    writer.close()
  return state, stopped_early


class _NullWriter:
  """Stands in for report.MetricWriter on processes other than the first."""

  def write(self, step, metrics):
    del step, metrics

  def close(self):
    pass


def _fmt_eta(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _log_cost(name, compiled, loops=1):
  """Logs XLA's FLOP and byte counts of one step, and a call's temporaries.

  XLA's cost analysis counts a while loop's body once. The loop over a
  call's steps (`train_steps`) therefore counts one step; a step that runs
  its episodes in `loops` chunks (`chunking.map_in_chunks`) is scaled by that
  count. The temporaries are not: one loop iteration's buffers are reused by
  the next. On CPU they are allocated afresh at every call, and the kernel
  zeroes their pages as the call first touches them (docs/PERFORMANCE.md).
  """
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    logging.info(
        "%s: %.3g FLOPs, %.3g bytes accessed per step (XLA cost_analysis%s).",
        name,
        loops * cost.get("flops", float("nan")),
        loops * cost.get("bytes accessed", float("nan")),
        f"; the loop body x {loops} episode chunks" if loops > 1 else "",
    )
  except Exception as e:  # pylint: disable=broad-except
    logging.info("%s: cost_analysis unavailable (%s).", name, e)
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes
    logging.info("%s: %.3g GB of temporaries per call.", name, temp / 1e9)
  except Exception as e:  # pylint: disable=broad-except
    logging.info("%s: memory_analysis unavailable (%s).", name, e)


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _episode_chunk(num_episodes, episode_axis, test_shape, budget_gb):
  """Episodes evaluated at once: their maps must fit the host budget.

  The chunk divides num_episodes and is a multiple of the episode mesh axis
  (so the chunk shards evenly); at least one multiple is always taken.
  """
  per_episode = 4 * int(np.prod(test_shape))  # float32 maps [N, H, W]
  fit = int(budget_gb * 2**30 // max(per_episode, 1))
  sizes = [
      episode_axis * d
      for d in run_config.divisors(num_episodes // episode_axis)
  ]
  fitting = [d for d in sizes if d <= fit]
  return max(fitting) if fitting else sizes[0]


def _make_predict(method, *, cfg, backbone, mesh, compiler_options=None):
  """The jitted predict step of one method (one compile per method).

  The query batch is gathered from the test cache inside the program and
  sharded over the mesh's "data" axis; episodes over its "episode" axis.
  """

  def step(
      params, frozen, ep_data, cache_arrays, test_g, test_p, idx, clip_params
  ):
    g = jax.lax.with_sharding_constraint(
        test_g[idx], jax.sharding.NamedSharding(mesh, P("data"))
    )
    p = jax.lax.with_sharding_constraint(
        test_p[:, idx], jax.sharding.NamedSharding(mesh, P(None, "data"))
    )
    return predict_step(
        params,
        frozen,
        ep_data,
        cache_arrays,
        g,
        p,
        clip_params,
        cfg=cfg,
        backbone=backbone,
        method=method,
    )

  return jax.jit(
      step,
      out_shardings=jax.sharding.NamedSharding(mesh, P("episode", "data")),
      compiler_options=compiler_options,
  )


def _predict_all(
    predict,
    episode_args,
    cache_arrays,
    test_cache,
    clip_params,
    batch_size,
    hlo_path=None,
    what="",
):
  """Predictions of some episodes on every test image, on the host.

  Query images go through `predict` in padded batches of `batch_size`, so
  one compiled program serves the whole set; padded rows are dropped.

  Args:
    predict: from _make_predict.
    episode_args: (params, frozen, ep_data) of the episodes to evaluate.
    cache_arrays: the support feature cache.
    test_cache: the FeatureCache of the test images (view 0 rows).
    clip_params: frozen backbone parameters.
    batch_size: query images per call.
    hlo_path: if set, the compiled program's HLO text is written there.
    what: names the method and episodes in the progress lines.

  Returns:
    dict of numpy arrays: maps [E, N, H, W], image_score [E, N], class_probs
    [E, N, 3] (keys absent when the method does not produce them).
  """
  params, frozen, ep_data = episode_args
  rows = test_cache.rows[:, 0]
  outs = []
  num_batches = math.ceil(len(rows) / batch_size)
  start = time.time()
  for b in range(num_batches):
    idx = rows[b * batch_size : (b + 1) * batch_size]
    valid = len(idx)
    idx = np.pad(idx, (0, batch_size - valid))
    args = (
        params,
        frozen,
        ep_data,
        cache_arrays,
        test_cache.global_embed,
        test_cache.patch_tokens,
        idx,
        clip_params,
    )
    if hlo_path and b == 0:
      _write(hlo_path, predict.lower(*args).compile().as_text())
    out = to_host(predict(*args))
    outs.append(jax.tree.map(lambda x: x[:, :valid], out))
    # Progress on long evaluations only (five lines a chunk).
    if num_batches >= 10 and (b + 1) % (num_batches // 5) == 0:
      elapsed = time.time() - start
      logging.info(
          "Predict %s: %d/%d query batches, %.1f s, ETA %s.",
          what,
          b + 1,
          num_batches,
          elapsed,
          _fmt_eta(elapsed / (b + 1) * (num_batches - b - 1)),
      )
  merged = {}
  for field in model.Predictions._fields:
    vals = [getattr(o, field) for o in outs]
    if vals[0] is not None:
      merged[field] = np.concatenate(vals, axis=1)
  return merged
