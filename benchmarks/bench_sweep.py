"""The few-shot sweep: the engine against the peer-style loop, per E.

E episodes of the UltraAD head, trained for the same number of steps on
both sides. The engine (`jax_engine`) runs as `train.train_and_evaluate`
does: the pool's features cached once, then every episode's step vmapped
in one jitted program, several steps per call (`train.train_steps`). The
peer (peer_loop.py) runs each episode and step one after another, with a
backbone forward on the support every step.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import accelerator_peaks
import bench_backbone
import bench_timing
import peer_loop
import sweep_inputs
from ultraad_jax import features
from ultraad_jax import train


def jax_engine(backbone, cfg, cache, supports, labels, steps, seed=0, *,
               text_embed=None, return_init=False, steps_per_call=None,
               repeats=1):  # fmt: skip
  """Trains E episodes with the project's engine; returns timings.

  Inputs are built as `train.train_and_evaluate` builds them (cache rows,
  `train.gather_support`, `model.init` / `model.frozen` vmapped over
  episodes, `train.make_optimizer` with the base config's schedule), on one
  device without a mesh.

  Args:
    backbone: the clip.Backbone the cache was built with.
    cfg: model.ModelConfig.
    cache: a features.FeatureCache of the pool.
    supports: [E, S] support indices into the pool.
    labels: [n] pool labels.
    steps: timed training steps.
    seed: random seed.
    text_embed: [E, S, D] description embeddings (default:
      `sweep_inputs.description_embeds(E, S, D, seed)`).
    return_init: also return the episodes' initial parameters.
    steps_per_call: the engine's `train.steps_per_call` (None: the base
      config's).
    repeats: timed runs of the initialisation and of the steps (each run of
      the steps from the same initial state); the medians are reported.

  Returns:
    A dict: init and step compile seconds, `init_s` and `train_s` (timed,
    compilation excluded; medians, every run in `init_s_runs` and
    `train_s_runs`), `jax_s` (their sum), XLA's FLOPs per step and
    the bytes of its temporaries (`step_temp_bytes`), the process's user and
    system CPU seconds and minor page faults per timed step of the last run
    (`train_user_s_per_step`, `train_system_s_per_step`,
    `train_minor_faults_per_step`; Unix only), the steps of each timed call
    (`call_lengths`), the last step's loss (mean over episodes, and episode
    0's). With
    return_init, (that dict, the initial parameters as a host pytree of
    numpy arrays stacked over episodes), copied after the timed
    initialisation and before the timed steps.
  """
  num_episodes, s = supports.shape
  if text_embed is None:
    text_embed = sweep_inputs.description_embeds(
        num_episodes, s, backbone.embed_dim, seed
    )
  ep_data = jax.device_put({
      "rows": cache.rows[supports, 0].astype(np.int32),
      "labels": labels[supports].astype(np.int32),
      "group": np.broadcast_to(np.arange(s, dtype=np.int32),
                               (num_episodes, s)).copy(),
      "text_embed": np.asarray(text_embed, np.float32),
  })  # fmt: skip
  cache_arrays = (cache.global_embed, cache.patch_tokens,
                  jax.device_put(cache.masks))  # fmt: skip
  clip_params = jax.device_put(backbone.params)
  tx = train.make_optimizer(sweep_inputs.sweep_train_config(steps))

  init_all = train.make_init(cfg, backbone, tx)
  keys = jax.random.split(jax.random.key(seed), num_episodes)
  out = {}
  start = time.perf_counter()
  init_c = jax.jit(init_all).lower(keys, ep_data, cache_arrays,
                                   clip_params).compile()  # fmt: skip
  out["init_compile_s"] = time.perf_counter() - start
  init_runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    params, opt, frozen = jax.block_until_ready(
        init_c(keys, ep_data, cache_arrays, clip_params)
    )
    init_runs.append(time.perf_counter() - start)
  out["init_s_runs"] = init_runs
  out["init_s"] = float(np.median(init_runs))
  # np.array copies: the step donates (and deletes) these buffers.
  init_params = jax.tree.map(np.array, params) if return_init else None

  state = {"params": params, "opt": opt, "step": jnp.zeros((), jnp.int32)}
  key = jax.random.key(seed + 1)
  # The engine's episode chunking, as `train_and_evaluate` picks it on one
  # device (train.episode_chunk).
  chunk = train.episode_chunk(
      0,
      num_episodes,
      1,
      train.episode_elements(ep_data, cache_arrays),
      jax.default_backend(),
  )
  out["episode_chunk"] = chunk
  # The engine's steps per call: as many as lie between two of the base
  # config's host events (its log lines and checkpoints).
  config = sweep_inputs.sweep_run_config(steps)
  if steps_per_call is not None:
    config.train.steps_per_call = steps_per_call
  lengths = train.call_plan(config, 0, steps, validating=False)
  out["call_lengths"] = lengths
  # The engine's per-program XLA options (ultraad_jax/xla_env.py).
  step_fn = train.jit_train_steps(
      tx=tx, cfg=cfg, backbone=backbone, chunk=chunk,
      max_steps=max(lengths),
      compiler_options=train.head_compiler_options(ep_data, cache_arrays),
  )  # fmt: skip
  args = (ep_data, frozen, cache_arrays, clip_params, key)
  start = time.perf_counter()
  step_c = step_fn.lower(state, *args, np.int32(1)).compile()
  out["step_compile_s"] = time.perf_counter() - start
  # XLA counts a while loop's body once: the steps' loop counts one step,
  # and the episode chunks' loop one chunk of it; scale by the chunks.
  out["step_flops"] = float(
      bench_timing.xla_cost(step_c).get("flops", float("nan"))
  ) * (num_episodes // chunk)
  out["step_temp_bytes"] = bench_timing.xla_temp_bytes(step_c)
  # One untimed step on a copy of the state: the first execution of a
  # program pays one-off costs (allocator growth, thread-pool start-up), as
  # the peer's untimed warm-up episode does on its side.
  warm = jax.tree.map(jnp.copy, state)
  jax.block_until_ready(step_c(warm, *args, np.int32(1)))
  del warm
  train_runs = []
  for r in range(repeats):
    # Every run starts from the initial state: a copy (not timed) for all
    # but the last, which consumes `state` itself.
    run_state = state if r == repeats - 1 else jax.tree.map(jnp.copy, state)
    jax.block_until_ready(run_state)
    usage = bench_timing.process_usage()
    start = time.perf_counter()
    for n in lengths:
      run_state, step_metrics = step_c(run_state, *args, np.int32(n))
    jax.block_until_ready((run_state, step_metrics))
    train_runs.append(time.perf_counter() - start)
    used = bench_timing.process_usage()
  out["train_s_runs"] = train_runs
  out["train_s"] = float(np.median(train_runs))
  # Where the cores' time went (the last run): system time here is mostly
  # the kernel zeroing the fresh pages of each call's temporaries.
  per_step = bench_timing.usage_per_call(usage, used, steps)
  for k, v in per_step.items():
    out["train_" + k.replace("_per_call", "_per_step")] = v
  out["jax_s"] = out["init_s"] + out["train_s"]
  final = np.asarray(jax.device_get(step_metrics["loss"]))[lengths[-1] - 1]
  out["final_loss"] = float(np.mean(final))
  out["final_loss_episode0"] = float(final[0])
  return (out, init_params) if return_init else out


def measure(
    *,
    model_name,
    episodes,
    steps,
    shots,
    pool,
    torch_max_episodes,
    torch_device="cpu",
    torch_compile=True,
    compile_head=True,
    peer_head="ultraad",
    torch_threads=0,
    with_torch=True,
    steps_per_call=None,
    repeats=1,
    seed=0,
):
  """The few-shot sweep: the engine against the peer loop, for each E.

  Args:
    model_name: the backbone ("tiny" or an OpenAI CLIP name, random
      weights).
    episodes: the episode counts E to time.
    steps: training steps of every episode, on both sides.
    shots: support images per class (S = 3 x shots).
    pool: images in the pool the supports are drawn from (the cache holds
      all of them).
    torch_max_episodes: the peer runs at most this many episodes per E; a
      larger E is extrapolated linearly (its episodes run one after another
      and cost the same) and flagged.
    torch_device: "cpu" or "cuda".
    torch_compile: torch.compile the peer's backbone (off only in tests).
    compile_head: torch.compile the peer's head loss.
    peer_head: the head the peer trains, one of peer_loop.PEER_HEADS
      ("ultraad": the same head and loss as the engine; "mvfa": a lighter
      peer's).
    torch_threads: the peer's PyTorch threads (0: one per core).
    with_torch: run the peer.
    steps_per_call: the engine's `train.steps_per_call` (None: the base
      config's).
    repeats: timed runs of each side per E (medians reported, every run
      kept in `*_runs`).
    seed: random seed.

  Returns:
    A dict with the settings, the one-off feature extraction time (first
    and compiled: cache_s), and per E (as a string key) jax_s, torch_s,
    speedup, the same with cache_s charged to the engine
    (jax_s_with_cache, speedup_with_cache), per-episode times and the
    peer's per-step split (backbone forward vs head update).
  """
  if peer_head not in peer_loop.PEER_HEADS:
    raise ValueError(
        f"--peer_head {peer_head!r}; expected one of {peer_loop.PEER_HEADS}."
    )
  backbone = bench_backbone.make_backbone(model_name, seed=seed)
  layers = bench_backbone.tapped_layers(backbone.num_layers)
  cfg = sweep_inputs.sweep_model_config(layers)
  images, masks, labels = sweep_inputs.synthetic_pool(
      pool, backbone.image_size, seed
  )
  out = {
      "model": model_name,
      "image_size": backbone.image_size,
      "layers": list(layers),
      "steps": steps,
      "shots_per_class": shots,
      "support_size": 3 * shots,
      "pool": pool,
      "fusion": cfg.fusion,
      "prompt_mode": cfg.prompt_mode,
      "peer_head": peer_head if with_torch else None,
      "repeats": repeats,
  }

  def build_cache():
    cache = features.build(
        backbone, jax.device_put(backbone.params), images, masks, None,
        np.zeros(pool, bool), layers=layers, num_views=1,
        batch_size=min(32, pool),
    )  # fmt: skip
    jax.block_until_ready(cache.patch_tokens)
    return cache

  start = time.perf_counter()
  cache = build_cache()
  out["feature_extraction_s"] = time.perf_counter() - start
  # Again, compiled: the cache's cost as the engine's time counts its
  # steps (compilation excluded). The peer forwards the backbone in every
  # step, so this backbone pass belongs to the engine's side too; each E
  # is charged the whole pool's pass, which overstates it where the E
  # episodes draw fewer images than the pool holds (small E).
  start = time.perf_counter()
  cache = build_cache()
  out["cache_s"] = time.perf_counter() - start
  out["feature_extraction_note"] = (
      "the backbone pass over the whole pool: feature_extraction_s the "
      "first one (compilation included), cache_s again, compiled. jax_s "
      "excludes it (the cache serves any number of sweeps); "
      "jax_s_with_cache and speedup_with_cache add cache_s to every E."
  )
  peer = None
  if with_torch:
    out["torch_note"] = (
        "per episode: one backbone forward of the support (the bank's Ft) "
        "and buffers, then per step a no_grad backbone forward and the "
        "head's update. "
        + ("Head: peer_ultraad.loss_fn (= model.loss_fn) from the JAX side's "
           "model.init values (Ft from the peer's own forward); converting "
           "them from JAX arrays is not timed. Optimiser: global-norm "
           "clipping + fused AdamW on train.make_optimizer's schedule."
           if peer_head == "ultraad" else
           "Head: the MVFA-style peer_loss (adapters + fixed text features, "
           "focal + dice), fused Adam.")
    )  # fmt: skip
    start = time.perf_counter()
    peer = peer_loop.TorchPeer(
        backbone,
        layers,
        images,
        masks,
        labels,
        cfg=cfg,
        head=peer_head,
        device=torch_device,
        compile_backbone=torch_compile,
        compile_head=compile_head and torch_compile,
        threads=torch_threads,
    )
    out["torch_threads"] = peer.torch.get_num_threads()
    out["torch_warmup_s"] = time.perf_counter() - start
  for num in episodes:
    supports = sweep_inputs.draw_supports(labels, num, shots, seed + num)
    text_embed = sweep_inputs.description_embeds(
        num, 3 * shots, backbone.embed_dim, seed + num
    )
    row, init = jax_engine(backbone, cfg, cache, supports, labels, steps,
                           seed, text_embed=text_embed,
                           return_init=True,
                           steps_per_call=steps_per_call,
                           repeats=repeats)  # fmt: skip
    row["jax_s_per_episode"] = row["jax_s"] / num
    row["jax_s_with_cache"] = row["jax_s"] + out["cache_s"]
    if peer is not None:
      run = min(num, torch_max_episodes)
      # Not timed: JAX arrays -> tensors (a peer would initialise in torch).
      prepare = lambda e, n: (
          peer.prepare(jax.tree.map(lambda x: x[e], init), text_embed[e], n)
          if peer_head == "ultraad" else None
      )  # fmt: skip
      if num == episodes[0]:
        # Warm-up: compiles the backbone and the head for the support shape.
        start = time.perf_counter()
        peer.episode(supports[0], 2, seed, prepare(0, 2))
        out["torch_warmup_s"] += time.perf_counter() - start
      peer_runs = []
      for _ in range(repeats):
        # Prepared afresh for every run: an episode trains its copy.
        prepared = [prepare(e, steps) for e in range(run)]
        peer.reset_split()
        start = time.perf_counter()
        losses = [
            peer.episode(supports[e], steps, seed + e, prepared[e])
            for e in range(run)
        ]
        peer_runs.append(time.perf_counter() - start)
      measured = float(np.median(peer_runs))
      row["torch_s_runs"] = [t * num / run for t in peer_runs]
      row["torch_final_loss"] = float(np.mean(losses))
      # With the UltraAD head, the same episode's loss as the engine's.
      row["torch_final_loss_episode0"] = losses[0]
      row["torch_episodes_run"] = run
      row["torch_extrapolated"] = run < num
      row["torch_s"] = measured * num / run
      row["speedup"] = row["torch_s"] / row["jax_s"]
      row["speedup_with_cache"] = row["torch_s"] / row["jax_s_with_cache"]
      row["torch_s_per_episode"] = row["torch_s"] / num
      split = peer.split
      row["torch_init_s_per_episode"] = split["init_s"] / run
      if split["steps"]:
        row["torch_backbone_ms_per_step"] = (
            1e3 * split["backbone_s"] / split["steps"]
        )
        row["torch_head_ms_per_step"] = 1e3 * split["head_s"] / split["steps"]
    out[str(num)] = row
    logging_line = (
        f"  sweep E={num}: jax {row['jax_s']:.2f} s"
        + _spread(row["train_s_runs"], "its steps ")
        + (f", torch {row['torch_s']:.2f} s" + _spread(row["torch_s_runs"])
           + f", x{row['speedup']:.1f}" if peer is not None else "")
        + _usage_note(row)
    )  # fmt: skip
    print(logging_line, flush=True)
  return out


def _spread(runs, what=""):
  """ " (<what>min-max s, n runs)" for the log line; "" for a single run."""
  if len(runs) < 2:
    return ""
  return f" ({what}{min(runs):.2f}-{max(runs):.2f} s, {len(runs)} runs)"


def _usage_note(row):
  """The engine's calls, temporaries and system-time share, for the log line."""
  parts = []
  if row.get("call_lengths"):
    parts.append(f"calls of {row['call_lengths']} steps")
  if row.get("step_temp_bytes"):
    parts.append(f"temporaries {row['step_temp_bytes'] / 1e9:.2f} GB a call")
  user, system = (row.get("train_user_s_per_step"),
                  row.get("train_system_s_per_step"))  # fmt: skip
  if user is not None and user + system > 0:
    parts.append(
        f"system time {100 * system / (user + system):.0f}% of its CPU"
    )
  return "; " + ", ".join(parts) if parts else ""


def add_floors(sweep, spec, precision):
  """Adds each E's floor (steps x step FLOPs / peak) to the sweep's rows.

  Args:
    sweep: `measure`'s result (rows keyed by str(E), with `step_flops`).
    spec: an `accelerator_peaks.spec_peak` entry.
    precision: the sweep's precision: "float32" (bounded by the fp32 peak)
      or "tensorfloat32" (the TF32 peak).
  """
  name = "fp32" if precision == "float32" else "tf32"
  for row in sweep.values():
    if not isinstance(row, dict) or "step_flops" not in row:
      continue
    step = accelerator_peaks.floor(row["step_flops"], spec[name])
    if step is None:
      continue
    row["floor_train_s"] = sweep["steps"] * step
    row["train_share_of_floor"] = row["floor_train_s"] / row["train_s"]
    row["floor_peak"] = name
