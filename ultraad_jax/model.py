"""UltraAD on one few-shot episode: pure functions of params and features.

The engine (train.py) owns the episode axis: it vmaps these functions over a
leading episode axis and shards it. Here everything is one episode:

  cfg = ModelConfig.from_dict(config.model)
  cfg.validate(backbone, has_masks=True)
  pt = encode_descriptions(backbone, clip_params, texts)      # host side
  support = Support(global_embed, patch_tokens, masks, labels, group, pt)
  params = init(rng, cfg, backbone, clip_params, support)     # trainable
  state = frozen(cfg, backbone, clip_params, support)         # frozen arrays
  loss, aux = loss_fn(params, state, support, rng, cfg=cfg,
                      backbone=backbone, clip_params=clip_params)
  preds = predict(params, state, query, cfg=cfg, backbone=backbone,
                  clip_params=clip_params)                    # exclude=None

Pipeline (docs/METHOD.md has the stated/reconstructed split):
  1. Image-informed prompts: learnable contexts around the normal / abnormal
     class words, fused with the query's global token (prompts.py).
  2. Patch tokens of each tapped layer -> residual adapter -> fusion with the
     image-informed prompt features (fusion.py; by default computed as
     the layer logits' dot products without writing the tokens,
     fused_logits.py).
  3. Per-layer softmax over [normal, abnormal] cosines -> upsampled logits ->
     mean over layers (+ optional normal patch memory) -> Gaussian smoothing
     -> image score mixed with the global prompt probability (maps.py).
  4. Classification: mini-net f -> f', Tip-Adapter read-out of the Ft / Pt /
     Lt memory bank (memory_bank.py).

Frozen things never receive gradients: clip_params, the frozen state and the
cached features are wrapped in stop_gradient at entry, and none of them is in
the trainable pytree.
"""

import dataclasses
import typing
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ultraad_jax import baselines
from ultraad_jax import fused_logits
from ultraad_jax import fusion
from ultraad_jax import losses
from ultraad_jax import maps
from ultraad_jax import memory_bank
from ultraad_jax import prompts

NUM_CLASSES = 3
MAP_LOSSES = ("per_layer", "combined")
FUSED_MAP_LOSS = ("auto", "on", "off")
# Where "auto" turns the fused map losses on: on CPU, for episodes whose
# full-resolution maps (L x B x H x W) hold at least this many elements.
# Below it the fused pass's extra work (the gradient of every layer's focal
# and dice terms separately) costs more than the memory traffic it saves:
# tiny CLIP, 4 episodes at once, 6.8 against 5.7 ms.
FUSED_MAP_LOSS_MIN_ELEMENTS = 1 << 20

# ----------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every model hyperparameter; hashable, so it can be a static jit argument.

  Every reconstructed choice is a field (docs/METHOD.md gives the reasons).
  Groups: prompts, image-informed prompt, fusion and adapters, maps and
  scores, memory bank, losses, baselines.
  """

  # Tapped vision blocks (hidden_states numbering, 1..num_layers).
  layers: tuple[int, ...] = (6, 12, 18, 24)
  # Prompts: class words of the [normal, abnormal] prompts, context length,
  # context initialisation ("" or "random" for random), its std, and whether
  # each prompt has its own context.
  prompt_texts: tuple[str, ...] = (
      "normal breast tissue.",
      "breast tissue with a lesion.",
  )
  n_ctx: int = 12
  ctx_init: str = "a photo of a"
  ctx_init_std: float = 0.02
  class_specific_ctx: bool = False
  # Image-informed prompt: "output" (fuse after the text tower) or "input"
  # (CoCoOp meta-net bias on the context); the MLP's hidden width is
  # D // meta_net_reduction.
  prompt_mode: str = "output"
  meta_net_reduction: int = 16
  # Prompt-patch fusion ("cross_attention", "gated" or "none") with inner
  # width D // fusion_reduction; per-layer adapters x' = a x + (1-a) MLP(x).
  fusion: str = "cross_attention"
  fusion_reduction: int = 4
  adapter: bool = True
  adapter_reduction: int = 4
  adapter_residual: float = 0.8
  # Compute the layer logits from dot products of the tokens (fused_logits.py)
  # instead of writing the adapted and fused tokens: same function, far less
  # memory traffic. "gated" fusion always takes the reference path.
  fused_logits: bool = True
  # Output-layer scale of residual branches at init (0: exact identity).
  init_scale: float = 0.1
  # Maps: softmax temperature, layer combination, normal patch memory map
  # fused as (1 - w) text + w memory, Gaussian sigma in pixels (0: off).
  temperature: float = 0.01
  layer_combine: str = "mean"
  patch_memory: bool = False
  memory_weight: float = 0.5
  smoothing_sigma: float = 4.0
  # Image score = (1 - wg - wb) * reduce(map) + wg * global prompt
  # probability + wb * (1 - P_bank(normal)).
  score_reduce: str = "max"
  score_topk: int = 100
  score_global_weight: float = 0.5
  score_bank_weight: float = 0.0
  # Memory bank: A = exp(-beta (1 - cos)); logits = scale * (R(A Ft) +
  # lambda R(A Pt)); R the per-class "mean" or "sum"; Ft trainable or not.
  bank_beta: float = 5.5
  bank_lambda: float = 1.0
  bank_logit_scale: float = 10.0
  bank_readout: str = "mean"
  bank_train_ft: bool = True
  mininet_reduction: int = 4
  # Loss weights; focal gamma; map losses on each layer's map or on the
  # combined map; training minibatch from the support set (0: all of it).
  loss_focal: float = 1.0
  loss_dice: float = 1.0
  loss_bce: float = 1.0
  loss_ce: float = 1.0
  focal_gamma: float = 2.0
  map_loss: str = "per_layer"
  # Side of the maps the map losses are computed on (0: the image size).
  # Smaller sides (e.g. 2x the patch grid) train on area-downsampled, soft
  # masks and remove most of the training step's memory traffic.
  loss_map_size: int = 0
  # Per-layer map losses computed with their gradient in one pass, a few
  # episodes at a time (losses.upsampled_map_losses): "on", "off", or "auto"
  # (on for CPU and large maps, where it saves memory traffic). Same values.
  fused_map_loss: str = "auto"
  train_batch_size: int = 0
  # linear_probe baseline: fixed full-batch Adam schedule.
  probe_steps: int = 300
  probe_lr: float = 0.01
  probe_l2: float = 1e-3

  def __post_init__(self):
    hints = typing.get_type_hints(type(self))
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      object.__setattr__(self, f.name, _coerce(f.name, value, hints[f.name]))
    self._check_static()

  @classmethod
  def from_dict(cls, d) -> "ModelConfig":
    """Builds a config from a mapping (dict, ml_collections ConfigDict).

    Args:
      d: field name -> value; lists become tuples.

    Returns:
      A ModelConfig.

    Raises:
      ValueError: naming an unknown key (with the known ones), or a value of
        the wrong type or out of range.
    """
    if hasattr(d, "to_dict"):
      d = d.to_dict()
    d = dict(d)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
      raise ValueError(
          f"Unknown model config key(s) {unknown}. Known keys: {known}."
      )
    return cls(**d)

  def _check_static(self):
    """Checks that need no backbone; raises ValueError naming the key."""
    _one_of("prompt_mode", self.prompt_mode, prompts.PROMPT_MODES)
    _one_of("fusion", self.fusion, fusion.FUSION_MODES)
    _one_of("layer_combine", self.layer_combine, maps.LAYER_COMBINE)
    _one_of("score_reduce", self.score_reduce, maps.SCORE_REDUCE)
    _one_of("bank_readout", self.bank_readout, memory_bank.READOUTS)
    _one_of("map_loss", self.map_loss, MAP_LOSSES)
    _one_of("fused_map_loss", self.fused_map_loss, FUSED_MAP_LOSS)
    if not self.layers:
      raise ValueError("layers is empty; name at least one tapped block.")
    if len(set(self.layers)) != len(self.layers):
      raise ValueError(f"layers={self.layers} repeats a block.")
    if len(self.prompt_texts) != 2 or not all(self.prompt_texts):
      raise ValueError(
          f"prompt_texts={self.prompt_texts!r}; expected two non-empty "
          "strings: the normal and the abnormal class words."
      )
    for name in ("n_ctx", "meta_net_reduction", "fusion_reduction",
                 "adapter_reduction", "mininet_reduction", "score_topk",
                 "probe_steps"):  # fmt: skip
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
    for name in ("temperature", "bank_logit_scale", "probe_lr"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
    for name in ("ctx_init_std", "init_scale", "smoothing_sigma", "bank_beta",
                 "bank_lambda", "loss_focal", "loss_dice", "loss_bce",
                 "loss_ce", "focal_gamma", "train_batch_size", "probe_l2",
                 "loss_map_size",
                 "score_global_weight", "score_bank_weight"):  # fmt: skip
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
    for name in ("adapter_residual", "memory_weight"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1].")
    if self.score_global_weight + self.score_bank_weight > 1.0 + 1e-9:
      raise ValueError(
          f"score_global_weight + score_bank_weight = "
          f"{self.score_global_weight + self.score_bank_weight} > 1; the map "
          "gets the remaining weight, so their sum must be <= 1."
      )

  def validate(self, backbone, *, has_masks: bool = True) -> None:
    """Checks the config against a backbone and the data it will see.

    Args:
      backbone: the clip.Backbone the features come from.
      has_masks: whether the support set carries lesion masks (normal images
        count as masked: their mask is empty).

    Raises:
      ValueError: naming the offending key: layers the backbone lacks,
        prompts too long for the context (n_ctx / prompt_texts), map losses
        on without masks (loss_focal / loss_dice), and every static check.
    """
    self._check_static()
    bad = [l for l in self.layers if not 1 <= l <= backbone.num_layers]
    if bad:
      raise ValueError(
          f"layers={self.layers}: block(s) {bad} do not exist; this backbone "
          f"has blocks 1..{backbone.num_layers}."
      )
    prompts.build_prompt_ids(backbone, self.prompt_texts, self.n_ctx)
    if not has_masks:
      on = [n for n in ("loss_focal", "loss_dice") if getattr(self, n) > 0]
      if on:
        raise ValueError(
            f"{' and '.join(f'{n}={getattr(self, n)}' for n in on)} train "
            "the maps on support masks, but the support set has none "
            "(has_masks=False). Set them to 0 or provide masks."
        )


def _one_of(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is unknown; expected one of {allowed}.")


def _coerce(name: str, value, hint):
  """Checks and normalises one field's type (lists -> tuples, int -> float)."""
  origin = typing.get_origin(hint)
  if origin is tuple:
    if isinstance(value, (str, bytes)) or not isinstance(
        value, (list, tuple, np.ndarray)
    ):
      raise ValueError(f"{name}={value!r} must be a tuple, e.g. {hint}.")
    (elem,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
    return tuple(_coerce(name, v, elem) for v in value)
  if hint is bool:
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{name}={value!r} must be a bool.")
    return bool(value)
  if hint is int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, np.integer)
    ):
      raise ValueError(f"{name}={value!r} must be an int.")
    return int(value)
  if hint is float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
      raise ValueError(f"{name}={value!r} must be a number.")
    return float(value)
  if hint is str:
    if not isinstance(value, str):
      raise ValueError(f"{name}={value!r} must be a string.")
    return value
  return value


# ----------------------------------------------------------------------------
# Data containers.
# ----------------------------------------------------------------------------


class Support(NamedTuple):
  """One episode's support set, views flattened (S' = images x views).

  Attributes:
    global_embed: [S', D] projected global embeddings.
    patch_tokens: [L, S', N, D] projected patch tokens of cfg.layers.
    masks: [S', H, W] float32 in {0, 1} at the backbone's image size (empty
      for normal images).
    labels: [S'] int32, 0 normal, 1 benign, 2 malignant.
    group: [S'] int32, the support image each view came from (leave-one-out
      excludes a sample's whole group from its read-out).
    text_embed: [S', D] Pt, frozen description embeddings
      (`encode_descriptions` of `descriptions.assign_descriptions`).
    mask_valid: optional [S'] bool, False where a sample's mask is unknown
      (its map losses are skipped); None means every mask is known.
  """

  global_embed: Any
  patch_tokens: Any
  masks: Any
  labels: Any
  group: Any
  text_embed: Any
  mask_valid: Any = None


class Query(NamedTuple):
  """Query images of one episode.

  Attributes:
    global_embed: [B, D].
    patch_tokens: [L, B, N, D].
  """

  global_embed: Any
  patch_tokens: Any


class Predictions(NamedTuple):
  """Model or baseline outputs for B queries (None where not applicable).

  Attributes:
    maps: [B, H, W] anomaly maps in [0, 1].
    image_score: [B] image anomaly scores.
    class_probs: [B, 3] normal / benign / malignant probabilities.
  """

  maps: Any
  image_score: Any
  class_probs: Any


def _check_features(cfg, backbone, global_embed, patch_tokens, what):
  """Static shape checks (shapes are concrete even under jit)."""
  d, n = backbone.embed_dim, backbone.grid_size**2
  b = global_embed.shape[0]
  if tuple(global_embed.shape) != (b, d):
    raise ValueError(
        f"{what}.global_embed has shape {tuple(global_embed.shape)}; expected "
        f"[B, {d}] (the backbone's embed_dim)."
    )
  want = (len(cfg.layers), b, n, d)
  if tuple(patch_tokens.shape) != want:
    raise ValueError(
        f"{what}.patch_tokens has shape {tuple(patch_tokens.shape)}; expected "
        f"[L, B, N, D] = {want} (L = len(layers) = {len(cfg.layers)}, N = "
        f"grid_size**2 = {n})."
    )


def _check_support(cfg, backbone, support: Support):
  _check_features(cfg, backbone, support.global_embed, support.patch_tokens,
                  "support")  # fmt: skip
  s, h = support.global_embed.shape[0], backbone.image_size
  for name, shape in (("masks", (s, h, h)), ("labels", (s,)), ("group", (s,)),
                      ("text_embed", (s, backbone.embed_dim))):  # fmt: skip
    got = tuple(getattr(support, name).shape)
    if got != shape:
      raise ValueError(f"support.{name} has shape {got}; expected {shape}.")
  if support.mask_valid is not None and tuple(support.mask_valid.shape) != (s,):
    raise ValueError(
        f"support.mask_valid has shape {tuple(support.mask_valid.shape)}; "
        f"expected ({s},)."
    )


# ----------------------------------------------------------------------------
# Construction.
# ----------------------------------------------------------------------------


def encode_descriptions(backbone, clip_params, texts: list[str]) -> jax.Array:
  """Frozen text embeddings of descriptions (Pt), host-side helper.

  Args:
    backbone: the clip.Backbone.
    clip_params: its frozen parameters.
    texts: T descriptions (e.g. `descriptions.assign_descriptions`).

  Returns:
    [T, D] float32 text features (normalised later by the bank).
  """
  ids = prompts.trim_ids(backbone, backbone.tokenize(list(texts)))
  return jax.jit(backbone.encode_text)(clip_params, ids)


def init(rng, cfg: ModelConfig, backbone, clip_params, support: Support):
  """Trainable parameters of one episode.

  Args:
    rng: a JAX random key.
    cfg: the model config.
    backbone: the clip.Backbone.
    clip_params: its frozen parameters (template context embeddings).
    support: the episode's support set (Ft is initialised from it).

  Returns:
    A dict pytree: "ctx" [n_sets, n_ctx, W], "meta_net", "mininet", and
    "adapter" / "fusion" / "bank_image" [S', D] when enabled.
  """
  _check_support(cfg, backbone, support)
  d = backbone.embed_dim
  keys = jax.random.split(rng, 5)
  params = {
      "ctx": prompts.context_init(
          keys[0], backbone, clip_params, n_ctx=cfg.n_ctx,
          init_text=cfg.ctx_init, std=cfg.ctx_init_std,
          n_sets=2 if cfg.class_specific_ctx else 1,
      ),
      "meta_net": prompts.meta_net_init(
          keys[1], mode=cfg.prompt_mode, dim=d,
          text_width=backbone.text_width, num_prompts=2,
          reduction=cfg.meta_net_reduction, init_scale=cfg.init_scale,
          ctx_std=cfg.ctx_init_std,
      ),
      "mininet": memory_bank.mininet_init(
          keys[2], dim=d, reduction=cfg.mininet_reduction
      ),
  }  # fmt: skip
  if cfg.adapter:
    params["adapter"] = fusion.adapter_init(
        keys[3], num_layers=len(cfg.layers), dim=d,
        reduction=cfg.adapter_reduction, init_scale=cfg.init_scale,
    )  # fmt: skip
  if cfg.fusion != "none":
    params["fusion"] = fusion.init(
        keys[4], mode=cfg.fusion, num_layers=len(cfg.layers), dim=d,
        reduction=cfg.fusion_reduction, init_scale=cfg.init_scale,
    )  # fmt: skip
  if cfg.bank_train_ft:
    params["bank_image"] = maps.l2_normalize(
        jax.lax.stop_gradient(support.global_embed).astype(jnp.float32)
    )
  return params


def frozen(cfg: ModelConfig, backbone, clip_params, support: Support):
  """Everything per-episode and frozen, as a dict of arrays (vmappable).

  Args:
    cfg: the model config.
    backbone: the clip.Backbone.
    clip_params: its frozen parameters.
    support: the episode's support set.

  Returns:
    {"prompt_embeds" [2, S, W], "prompt_eot" [2], "bank_text" [S', D] (Pt),
    "bank_labels" [S', 3] (Lt), "bank_group" [S'], "memory_normal" [S']
    bool (the support samples the patch memory may use),
    "zs_text" [2, D], "zs_class_text" [3, D], "probe" (the linear_probe
    baseline, fitted once here), "center_prior" [H, W], "class_prior" [3],
    and "bank_image" [S', D] when Ft is frozen}.

  Raises:
    ValueError: bad shapes, or (with concrete arrays) map losses on while no
      support sample has a mask (loss_focal / loss_dice).
  """
  _check_support(cfg, backbone, support)
  if support.mask_valid is not None and cfg.loss_focal + cfg.loss_dice > 0:
    valid = support.mask_valid
    if not isinstance(valid, jax.core.Tracer) and not np.any(valid):
      raise ValueError(
          f"loss_focal={cfg.loss_focal} / loss_dice={cfg.loss_dice} train the "
          "maps on support masks, but support.mask_valid is False for every "
          "sample. Set both to 0 or provide masks."
      )
  sg = jax.lax.stop_gradient
  ids, eot = prompts.build_prompt_ids(backbone, cfg.prompt_texts, cfg.n_ctx)
  zs_text, zs_class_text = baselines.zero_shot_text(backbone, clip_params)
  labels = support.labels.astype(jnp.int32)
  onehot = jax.nn.one_hot(labels, NUM_CLASSES, dtype=jnp.float32)
  masks = support.masks.astype(jnp.float32)
  prior, _ = baselines.center_prior(masks, 1, support.mask_valid)
  state = {
      "prompt_embeds": prompts.token_embeddings(backbone, clip_params, ids),
      "prompt_eot": jnp.asarray(eot),
      "bank_text": sg(
          maps.l2_normalize(support.text_embed.astype(jnp.float32))
      ),
      "bank_labels": onehot,
      "bank_group": support.group.astype(jnp.int32),
      # Not the patch memory itself: it is the support's patch tokens,
      # normalised (`support_memory`), computed where a prediction needs it.
      # Kept here, it was [L, S', N, D] per episode for the whole run (1.2 GB
      # at ViT-B/16 for 64 episodes, 22 GB at ViT-L/14@336 for 256) and most
      # of the episodes' initialisation time, for a map that training never
      # reads.
      "memory_normal": labels == 0,
      "zs_text": zs_text,
      "zs_class_text": zs_class_text,
      "center_prior": sg(prior[0]),
      # The linear_probe baseline is fitted once per episode, here, rather
      # than once per query batch.
      "probe": sg(
          baselines.linear_probe_fit(
              support.global_embed,
              labels,
              steps=cfg.probe_steps,
              lr=cfg.probe_lr,
              l2=cfg.probe_l2,
          )
      ),
      "class_prior": jnp.mean(onehot, axis=0),
  }
  if not cfg.bank_train_ft:
    state["bank_image"] = sg(
        maps.l2_normalize(support.global_embed.astype(jnp.float32))
    )
  return state


# ----------------------------------------------------------------------------
# Forward pass.
# ----------------------------------------------------------------------------


def _forward(params, state, global_embed, patch_tokens, exclude, *, cfg,
             backbone, clip_params, map_size=None):  # fmt: skip
  """Shared by predict and loss_fn: logits before any reduction.

  map_size is the side of the returned layer logits (default: image size;
  0: the patch grid's logits [L, B, N], not upsampled).
  """
  sg = jax.lax.stop_gradient
  clip_params, state = sg(clip_params), sg(state)
  g = sg(global_embed).astype(jnp.float32)
  p = sg(patch_tokens).astype(jnp.float32)

  text = prompts.image_informed(
      params["ctx"], params["meta_net"], state["prompt_embeds"],
      state["prompt_eot"], g, mode=cfg.prompt_mode, backbone=backbone,
      clip_params=clip_params,
  )  # fmt: skip  # [B, 2, D], unit norm
  if cfg.fused_logits and cfg.fusion in fused_logits.SUPPORTED_FUSION:
    logits = fused_logits.layer_logits(
        params.get("adapter"), params.get("fusion"), p, text,
        residual=cfg.adapter_residual, temperature=cfg.temperature,
    )  # fmt: skip
  else:
    x = fusion.rms_normalize(p)
    if cfg.adapter:
      x = fusion.adapter_apply(params["adapter"], x, cfg.adapter_residual)
    x = fusion.apply(params.get("fusion", {}), x, text, mode=cfg.fusion,
                     temperature=cfg.temperature)  # fmt: skip
    logits = maps.text_logits(x, text, cfg.temperature)
  if map_size == 0:
    layer_logits = logits  # [L, B, N]
  else:
    layer_logits = maps.upsample(
        logits, map_size or backbone.image_size
    )  # [L, B, H, W]
  cos = jnp.einsum("bd,bcd->bc", maps.l2_normalize(g), text)
  global_logit = (cos[:, 1] - cos[:, 0]) / cfg.temperature

  f_prime = memory_bank.mininet_apply(params["mininet"], g)
  ft = params["bank_image"] if cfg.bank_train_ft else state["bank_image"]
  class_logits, counts = memory_bank.logits(
      f_prime, ft, state["bank_text"], state["bank_labels"],
      beta=cfg.bank_beta, lam=cfg.bank_lambda, scale=cfg.bank_logit_scale,
      readout=cfg.bank_readout, exclude=exclude,
  )  # fmt: skip
  return {
      "layer_logits": layer_logits,
      "global_logit": global_logit,
      "class_logits": class_logits,
      "class_counts": counts,
      "patches": p,
  }


def support_memory(support: Support) -> jax.Array:
  """The normal patch memory's entries: the support's normalised tokens.

  Args:
    support: the episode's support set.

  Returns:
    [L, S', N, D] float32, L2-normalised, outside the gradient.
  """
  return jax.lax.stop_gradient(
      maps.l2_normalize(support.patch_tokens.astype(jnp.float32))
  )


def _require_support(support, what):
  if support is None:
    raise ValueError(
        f"{what} reads the normal patch memory, which is built from the "
        "episode's support set: pass support= (the Support the frozen state "
        "was built from)."
    )
  return support


def predict(params, frozen_state, query: Query, *, cfg: ModelConfig, backbone,
            clip_params, exclude=None,
            support: Support | None = None) -> Predictions:  # fmt: skip
  """Maps, image scores and class probabilities for B query images.

  Args:
    params: from `init` (possibly trained).
    frozen_state: from `frozen`.
    query: the queries' cached features.
    cfg: the model config (static).
    backbone: the clip.Backbone (static).
    clip_params: its frozen parameters.
    exclude: optional [B, S'] bool removing support entries from each
      query's bank read-out and patch memory (for queries that are support
      samples). None at evaluation on held-out queries.
    support: the episode's support set; needed only with cfg.patch_memory
      (the memory is its normalised patch tokens).

  Returns:
    Predictions(maps [B, H, W] in [0, 1], image_score [B], class_probs
    [B, 3]).

  Raises:
    ValueError: cfg.patch_memory without a support set.
  """
  _check_features(cfg, backbone, query.global_embed, query.patch_tokens,
                  "query")  # fmt: skip
  out = _forward(params, frozen_state, query.global_embed, query.patch_tokens,
                 exclude, cfg=cfg, backbone=backbone,
                 clip_params=clip_params)  # fmt: skip
  amap = maps.combine_layers(
      jax.nn.sigmoid(out["layer_logits"]), cfg.layer_combine
  )
  if cfg.patch_memory:
    support = _require_support(support, "model.patch_memory=True")
    mem = _memory_map(
        frozen_state, support_memory(support), out["patches"], exclude,
        backbone,
    )  # fmt: skip
    amap = (1.0 - cfg.memory_weight) * amap + cfg.memory_weight * mem
  amap = jnp.clip(maps.gaussian_smooth(amap, cfg.smoothing_sigma), 0.0, 1.0)
  class_probs = jax.nn.softmax(out["class_logits"], axis=-1)
  wg, wb = cfg.score_global_weight, cfg.score_bank_weight
  score = (
      (1.0 - wg - wb) * maps.image_score(amap, cfg.score_reduce, cfg.score_topk)
      + wg * jax.nn.sigmoid(out["global_logit"])
      + wb * (1.0 - class_probs[:, 0])
  )
  return Predictions(maps=amap, image_score=score, class_probs=class_probs)


def _memory_map(state, memory, patches, exclude, backbone):
  keep = jax.lax.stop_gradient(state["memory_normal"])[None]
  if exclude is not None:
    keep = keep & ~exclude.astype(bool)
  dist = maps.memory_distance(patches, memory, keep)
  return maps.upsample(dist, backbone.image_size)


# ----------------------------------------------------------------------------
# Training loss.
# ----------------------------------------------------------------------------


def _take(support: Support, idx) -> Support:
  return Support(
      global_embed=support.global_embed[idx],
      patch_tokens=support.patch_tokens[:, idx],
      masks=support.masks[idx],
      labels=support.labels[idx],
      group=support.group[idx],
      text_embed=support.text_embed[idx],
      mask_valid=None if support.mask_valid is None
      else support.mask_valid[idx],
  )  # fmt: skip


def _use_fused_map_loss(cfg, map_elements):
  """Whether loss_fn takes `losses.upsampled_map_losses` (`fused_map_loss`).

  Args:
    cfg: the model config.
    map_elements: elements of one episode's full-resolution maps, L x B x
      H x W.

  Returns:
    A Python bool (static).
  """
  if cfg.map_loss != "per_layer" or cfg.fused_map_loss == "off":
    return False
  if cfg.fused_map_loss == "on":
    return True
  return (
      jax.default_backend() == "cpu"
      and map_elements >= FUSED_MAP_LOSS_MIN_ELEMENTS
  )


def loss_fn(params, frozen_state, support: Support, rng, *, cfg: ModelConfig,
            backbone, clip_params):  # fmt: skip
  """Training loss on (a minibatch of) the support set, leave-one-out.

  Every support sample is also a bank entry, so each training query's own
  group (the image and all its views) is excluded from its bank read-out
  (Ft and Pt). Terms:

  * focal + dice on the map logits vs the masks (samples with masks only;
    dice only on non-empty masks, where it is defined by overlap);
  * BCE of the global prompt logit vs "abnormal" (only when the support set
    holds both normal and abnormal samples);
  * cross-entropy over the 3 classes from the bank (only for queries whose
    class keeps at least one usable entry, and only when the bank holds at
    least two classes).

  In the normal_only setting (all labels 0) BCE and CE are therefore off and
  the maps are trained towards 0 on normal images by the focal term (a
  one-class objective).

  Args:
    params: trainable parameters.
    frozen_state: from `frozen` (built from the full support set).
    support: the support set (the full one: the minibatch is drawn here).
    rng: a JAX random key (minibatch draw when cfg.train_batch_size > 0).
    cfg: the model config (static).
    backbone: the clip.Backbone (static).
    clip_params: its frozen parameters.

  Returns:
    (loss scalar, aux dict of scalars: focal, dice, bce, ce, and the
    fractions of samples each term used).
  """
  _check_support(cfg, backbone, support)
  s = support.labels.shape[0]
  if 0 < cfg.train_batch_size < s:
    idx = jax.random.choice(rng, s, (cfg.train_batch_size,), replace=False)
    support = _take(support, idx)
  b = support.labels.shape[0]
  exclude = support.group[:, None] == frozen_state["bank_group"][None, :]
  size = cfg.loss_map_size or backbone.image_size
  fused = _use_fused_map_loss(cfg, b * len(cfg.layers) * size * size)
  out = _forward(params, frozen_state, support.global_embed,
                 support.patch_tokens, exclude, cfg=cfg, backbone=backbone,
                 clip_params=clip_params,
                 map_size=0 if fused else size)  # fmt: skip

  sg = jax.lax.stop_gradient
  labels = sg(support.labels).astype(jnp.int32)
  masks = sg(support.masks).astype(jnp.float32)
  if size != masks.shape[-1]:
    # Area-averaged (antialiased) masks: soft targets in [0, 1].
    masks = jax.image.resize(masks, (masks.shape[0], size, size), "linear")
  has_mask = (
      jnp.ones((b,), jnp.float32)
      if support.mask_valid is None
      else sg(support.mask_valid).astype(jnp.float32)
  )
  nonempty = has_mask * (jnp.sum(masks, axis=(1, 2)) > 0)

  z = out["layer_logits"]
  if fused:
    focal, dice = losses.upsampled_map_losses(
        z, masks, gamma=cfg.focal_gamma, focal_weights=has_mask,
        dice_weights=nonempty)  # fmt: skip
    focal, dice = jnp.mean(focal), jnp.mean(dice)
  elif cfg.map_loss == "per_layer":
    focal, dice = jax.vmap(
        lambda zl: losses.map_losses(
            zl, masks, gamma=cfg.focal_gamma, focal_weights=has_mask,
            dice_weights=nonempty)
    )(z)  # fmt: skip
    focal, dice = jnp.mean(focal), jnp.mean(dice)
  else:
    combined = maps.combine_layers(jax.nn.sigmoid(z), cfg.layer_combine)
    focal = losses.focal_loss_on_probs(
        combined, masks, gamma=cfg.focal_gamma, weights=has_mask
    )
    dice = losses.dice_loss(combined, masks, weights=nonempty)

  bank_labels = frozen_state["bank_labels"]
  present = jnp.sum(bank_labels, axis=0) > 0  # [3]
  both = present[0] & jnp.any(present[1:])
  bce_w = jnp.full((b,), 1.0) * both
  bce = losses.bce_with_logits(
      out["global_logit"], (labels > 0).astype(jnp.float32), weights=bce_w
  )
  own = jnp.take_along_axis(out["class_counts"], labels[:, None], -1)[:, 0]
  ce_w = ((own > 0) & (jnp.sum(present) >= 2)).astype(jnp.float32)
  ce = losses.cross_entropy(out["class_logits"], labels, weights=ce_w)

  total = (
      cfg.loss_focal * focal
      + cfg.loss_dice * dice
      + cfg.loss_bce * bce
      + cfg.loss_ce * ce
  )
  correct = jnp.argmax(out["class_logits"], -1) == labels
  aux = {
      "loss": total,
      "focal": focal,
      "dice": dice,
      "bce": bce,
      "ce": ce,
      "frac_map": jnp.mean(has_mask),
      "frac_dice": jnp.mean(nonempty),
      "frac_bce": jnp.mean(bce_w),
      "frac_ce": jnp.mean(ce_w),
      "class_acc": losses.weighted_mean(correct.astype(jnp.float32), ce_w),
  }
  return total, aux


# ----------------------------------------------------------------------------
# Baselines.
# ----------------------------------------------------------------------------


def baseline_predictions(name: str, *, cfg: ModelConfig, backbone,
                         clip_params, query: Query, frozen_state,
                         support: Support | None = None
                         ) -> Predictions:  # fmt: skip
  """One baseline's predictions on the same episode (see baselines.py).

  Args:
    name: one of baselines.NAMES.
    cfg: the model config (temperature, layer combination, smoothing, probe
      schedule are shared with the model).
    backbone: the clip.Backbone (static).
    clip_params: its frozen parameters (unused: the zero-shot text features
      are in the frozen state; kept for a uniform signature).
    query: the queries.
    frozen_state: from `frozen` (everything the baselines need, except the
      patch memory).
    support: the episode's support set; needed only by patch_memory (its
      memory is the support's normalised patch tokens, `support_memory`).

  Returns:
    Predictions; fields a baseline does not produce are None (patch_memory
    has no class_probs, linear_probe no maps). center_prior's class_probs are
    the support's class frequencies.

  Raises:
    ValueError: an unknown name, or patch_memory without a support set.
  """
  del clip_params
  _check_features(cfg, backbone, query.global_embed, query.patch_tokens,
                  "query")  # fmt: skip
  sg = jax.lax.stop_gradient
  state = sg(frozen_state)
  b = query.global_embed.shape[0]
  h = backbone.image_size
  if name == "zero_shot":
    m, s, c = baselines.zero_shot(
        sg(query.global_embed), sg(query.patch_tokens), state["zs_text"],
        state["zs_class_text"], temperature=cfg.temperature, image_size=h,
        layer_combine=cfg.layer_combine, smoothing_sigma=cfg.smoothing_sigma,
    )  # fmt: skip
    return Predictions(m, s, c)
  if name == "patch_memory":
    support = _require_support(support, "The patch_memory baseline")
    m, s = baselines.patch_memory(
        sg(query.patch_tokens), support_memory(support),
        state["memory_normal"],
        image_size=h, smoothing_sigma=cfg.smoothing_sigma,
    )  # fmt: skip
    return Predictions(m, s, None)
  if name == "linear_probe":
    c, s = baselines.linear_probe_apply(state["probe"], sg(query.global_embed))
    return Predictions(None, s, c)
  if name == "center_prior":
    m = jnp.broadcast_to(state["center_prior"], (b, h, h))
    s = maps.image_score(m, "max")
    c = jnp.broadcast_to(state["class_prior"], (b, NUM_CLASSES))
    return Predictions(m, s, c)
  raise ValueError(
      f"Unknown baseline {name!r}; expected one of {baselines.NAMES}."
  )
