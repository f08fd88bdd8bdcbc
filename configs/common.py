"""Shared configuration pieces for every experiment.

Each experiment file defines `get_config(arg=None)` and starts from
`get_base_config()`. The optional `arg` is the text after the colon in
`--config configs/busi.py:tiny,shots=4` and is parsed by `parse_arg` into a
ConfigDict of variant flags (a bare word means True), as big_vision does.

Every field below is read by the engine (ultraad_jax/train.py) or the model
(ultraad_jax/model.py); the engine rejects unknown keys before anything is
compiled, so a typo in a command line fails at once with the key's name.
"""

import ml_collections


def parse_arg(arg, **defaults):
  """Parses `a=1,b=x,flag` into a ConfigDict, typed by the given defaults.

  Args:
    arg: the variant string after the colon in `--config file.py:arg`, or None.
    **defaults: every allowed key with its default value; the default's type
      converts the string value (bools accept true/false/1/0 or a bare key).

  Returns:
    A ConfigDict with every key of `defaults`, overridden by `arg`.

  Raises:
    ValueError: for a key that is not in `defaults`, naming the allowed keys.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(
          f"Unknown config variant {key!r} in {arg!r}; allowed: "
          f"{sorted(defaults)}."
      )
    default = defaults[key]
    if not sep:
      value = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Variant {key}={value!r} must be true or false.")
      value = value.lower() in ("true", "1")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


def model_config(**overrides):
  """Every field of ultraad_jax.model.ModelConfig with its default.

  The fields are read from the dataclass itself, so that each reconstructed
  choice documented in docs/METHOD.md can be set from the command line
  (`--config.model.fusion=gated`) and a new field needs no config edits.

  Args:
    **overrides: fields to set (e.g. layers).

  Returns:
    A ConfigDict of the model's hyperparameters.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from ultraad_jax import model  # pylint: disable=g-import-not-at-top

  fields = {f.name: f for f in dataclasses.fields(model.ModelConfig)}
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(
        f"Unknown model config keys {sorted(unknown)}; known: "
        f"{sorted(fields)}."
    )
  values = {}
  for name, f in fields.items():
    if name in overrides:
      values[name] = overrides[name]
    elif f.default is not dataclasses.MISSING:
      values[name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      values[name] = f.default_factory()
  return ml_collections.ConfigDict(values)


def set_backbone(c, tiny):
  """Sets the backbone and everything sized by it, in place.

  Args:
    c: a config from get_base_config().
    tiny: True for a tiny random CLIP at 96 px (runs on a CPU in minutes);
      False for OpenAI ViT-L/14@336 with the peers' tapped blocks.

  Returns:
    c, for chaining.
  """
  if tiny:
    c.backbone.name = "tiny"
    c.backbone.image_size = 96
    c.model = model_config(layers=(1, 2, 3, 4))
    c.episodes.num_episodes = 8
    c.cache.dtype = "float32"
    c.cache.memory_budget_gb = 4.0
    c.eval.batch_size = 64
  else:
    c.backbone.name = "openai/clip-vit-large-patch14-336"
    c.model = model_config(layers=(6, 12, 18, 24))
    c.episodes.num_episodes = 16
    c.cache.dtype = "bfloat16"  # halves the cache; features are frozen
    c.cache.memory_budget_gb = 32.0
    c.eval.batch_size = 16
  return c


def get_base_config():
  """Returns the full default configuration (every key the engine knows)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "train" trains (resuming from the workdir if it holds a checkpoint) and
  # then evaluates; "eval" only evaluates the latest checkpoint of workdir.
  c.mode = "train"

  # ---- Data -----------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "us_phantom"  # busi | bus_uclm | bus_bra | us_phantom
  c.data.data_dir = ""  # prepared TFDS data; "" = ~/.cache/ultraad_jax/tfds
  c.data.manual_dir = ""  # the manually downloaded files (real datasets)
  c.data.split = "all"  # episodes (support and query) are drawn from it
  # Cross-dataset protocol: when set, the support set comes from `data` and
  # every image of this dataset/split is the query set (no adaptation on it).
  c.data.test_name = ""
  c.data.test_split = "all"
  c.data.test_manual_dir = ""
  c.data.resize_mode = "pad"  # pad (keep aspect ratio) | stretch
  c.data.num_views = 4  # views of each support image (view 0 = original)
  c.data.skip_bad = False
  c.data.dedupe = False
  c.data.builder_config = ""  # a predefined builder config, e.g. "large"
  # Further builder options (e.g. the phantom's image_size, n_per_class,
  # difficulty, seed); an experiment lists the keys it sets, so they can be
  # overridden on the command line.
  c.data.options = ml_collections.ConfigDict()
  c.data.test_options = ml_collections.ConfigDict()

  # ---- Few-shot episodes ------------------------------------------------------
  c.episodes = ml_collections.ConfigDict()
  c.episodes.setting = "per_class"  # per_class | normal_only
  c.episodes.shots = 4
  c.episodes.num_episodes = 8
  c.episodes.seed = 0
  c.episodes.shots_file = ""  # read the shot lists from a shots.json instead

  # ---- Backbone ---------------------------------------------------------------
  c.backbone = ml_collections.ConfigDict()
  # "tiny" builds ultraad_jax.clip.tiny; anything else goes to clip.load (a
  # Hugging Face hub name, or a local folder of weights).
  c.backbone.name = "tiny"
  c.backbone.image_size = 0  # 0 = the checkpoint's own size
  c.backbone.activation = ""  # "" = as the checkpoint says (QuickGELU: OpenAI)
  c.backbone.tiny_seed = 0
  c.backbone.tiny_init_scale = 0.0  # 0 = clip.tiny's default

  # ---- Model (fields of ultraad_jax.model.ModelConfig) ------------------------
  c.model = model_config(layers=(1, 2, 3, 4))

  # ---- Optimisation -----------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 0  # support samples per step; 0 = the whole support set
  # Episodes per device that a train step computes at once; the rest follow
  # in a loop inside the same compiled step. 0 = automatic: on CPU a few at a
  # time when episodes are small (they then stay in cache) or when all of
  # them would exceed 2^27 token elements (memory), elsewhere all.
  c.train.episode_chunk = 0
  # Most steps per compiled call. A call always ends at the next host event
  # (a log line, a checkpoint, a validation); 0 = no other limit, 1 = a call
  # per step. One call of several steps dispatches once and, on CPU,
  # allocates its temporaries once (docs/PERFORMANCE.md round 9).
  # A stop request (Ctrl-C, SIGTERM) takes effect when the current call ends.
  c.train.steps_per_call = 0
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 10
  c.train.weight_decay = 1e-4
  c.train.grad_clip = 1.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.log_every = 10
  # Early stopping on a validation split drawn from the support set only (a
  # fraction of each episode's support images); 0 = fixed schedule (default).
  c.train.val_fraction = 0.0
  c.train.val_every = 10

  # ---- Precision of matrix products ---------------------------------------------
  # jax.default_matmul_precision of each part of the run: "float32" (true f32
  # products), "tensorfloat32" (TF32 tensor cores, NVIDIA Ampere and later),
  # "bfloat16" (one bf16 pass), or "default" (the platform's choice: TF32 on
  # recent NVIDIA GPUs, one bf16 pass on TPU, f32 on CPU). CPUs compute f32
  # products in f32 whatever the setting. See docs/METHOD.md.
  c.precision = ml_collections.ConfigDict()
  # The frozen CLIP's one-off passes (the feature cache, the descriptions'
  # embeddings): f32, so that the features match PyTorch's CLIPModel on every
  # platform; they run once, so the cost is small.
  c.precision.frozen = "float32"
  # The head's compiled programs (training, validation, evaluation, the
  # baselines), which run every step: the platform's fast default.
  c.precision.head = "default"

  # ---- Feature cache ----------------------------------------------------------
  c.cache = ml_collections.ConfigDict()
  c.cache.dtype = "float32"  # float32 | bfloat16
  c.cache.batch_size = 32  # images per backbone pass during extraction
  c.cache.memory_budget_gb = 8.0  # refuse to build a larger cache

  # ---- Evaluation -------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32  # query images per compiled eval call
  # Every baseline, evaluated on the same episodes as the model.
  from ultraad_jax import baselines  # pylint: disable=g-import-not-at-top

  c.eval.baselines = baselines.NAMES
  c.eval.num_overlays = 3  # query images per class in the overlay figure
  # Host memory for the maps held at once (episodes are evaluated in chunks
  # of whole episodes that fit; exact pixel metrics need all of an episode).
  c.eval.memory_budget_gb = 4.0

  # ---- Devices ----------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0  # 0 = every device; otherwise the first n
  c.mesh.data = 1  # devices on the "data" axis (query batch); rest: "episode"

  # ---- Checkpoints ------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50
  c.checkpoint.max_to_keep = 2

  # ---- Sweeps -----------------------------------------------------------------
  # Shot counts change array shapes, so each is its own compiled program, run
  # one after another into <workdir>/shots_<k>; seeds and draws of one shot
  # count are episodes of one program (episodes.num_episodes).
  c.sweep = ml_collections.ConfigDict()
  c.sweep.shots = ()

  # ---- Profiling --------------------------------------------------------------
  c.profile_steps = 0  # >0: jax.profiler trace of that many steps
  c.dump_hlo = False  # write the compiled steps' HLO into the workdir
  return c
