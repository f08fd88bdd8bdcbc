"""UltraAD's training loss in PyTorch: the head of bench.py's peer loop.

The few-shot sweep of bench.py times the project's engine against a
peer-style PyTorch loop. For that comparison to be the same work, the peer
trains the same head with the same loss, so this module is
`ultraad_jax.model.loss_fn` written in PyTorch, one function per stage:

  prompt_features   prompts.image_informed ("output" mode): the CoOp context
                    written into the frozen prompt token embeddings, CLIP's
                    text tower on those embeddings (`TextTower`), the
                    meta-net residual of the query's global token.
  patch_features    fusion.rms_normalize, fusion.adapter_apply and the
                    cross-attention of fusion.apply.
  layer_logits      maps.text_logits and maps.upsample (bilinear).
  global_logit      the prompt logit of the global embedding.
  bank_logits       memory_bank.mininet_apply and memory_bank.logits.
  loss_fn           the focal / dice / BCE / CE terms of model.loss_fn with
                    the same weights and masking.

Parameters are those of `model.init` converted to tensors
(`params_from_jax`); the frozen arrays the loss reads are buffers
(`buffers_from_jax`, or `prompt_buffers` + `bank_buffers` built in PyTorch).
tests/peer_ultraad_test.py checks the loss, its terms and the gradient of
every parameter against JAX.

Only the configuration the benchmark trains is implemented (the defaults of
`configs.common.model_config`); `check_config` rejects any other value by
its key instead of silently computing a different head.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ultraad_jax import model
from ultraad_jax import prompts

# Keys whose value changes the training loss's computation, with the values
# implemented here.
SUPPORTED = {
    "prompt_mode": ("output",),
    "fusion": ("cross_attention",),
    "adapter": (True,),
    "map_loss": ("per_layer",),
    "bank_train_ft": (True,),
    "bank_readout": ("mean",),
}
# Keys that need a size to check (see check_config).
_SIZED = ("loss_map_size", "train_batch_size")
# Keys used as numbers or shapes whatever their value (or, like the score and
# baseline settings, not read by the training loss at all).
_ANY_VALUE = (
    "layers", "prompt_texts", "n_ctx", "ctx_init", "ctx_init_std",
    "class_specific_ctx", "meta_net_reduction", "fusion_reduction",
    "adapter_reduction", "adapter_residual", "init_scale", "temperature",
    "layer_combine", "patch_memory", "memory_weight", "smoothing_sigma",
    "score_reduce", "score_topk", "score_global_weight", "score_bank_weight",
    "bank_beta", "bank_lambda", "bank_logit_scale", "mininet_reduction",
    "loss_focal", "loss_dice", "loss_bce", "loss_ce", "focal_gamma",
    "probe_steps", "probe_lr", "probe_l2",
)  # fmt: skip
# memory_bank.ABSENT_LOGIT: finite, so softmax and cross-entropy stay finite.
ABSENT_LOGIT = -1e9
NUM_CLASSES = model.NUM_CLASSES


class Support(NamedTuple):
  """One episode's support set as tensors (model.Support, minus Pt).

  Attributes:
    global_embed: [S, D] projected global embeddings.
    patch_tokens: [L, S, N, D] projected patch tokens of the tapped layers.
    masks: [S, H, W] float masks in {0, 1}.
    labels: [S] int64, 0 normal, 1 benign, 2 malignant.
    group: [S] int64, the support image each row came from.
    mask_valid: optional [S] bool (None: every mask is known).
  """

  global_embed: Any
  patch_tokens: Any
  masks: Any
  labels: Any
  group: Any
  mask_valid: Any = None


# ----------------------------------------------------------------------------
# Configuration and conversion.
# ----------------------------------------------------------------------------


def check_config(
    cfg: model.ModelConfig,
    *,
    image_size: int | None = None,
    support_size: int | None = None,
) -> None:
  """Raises unless this port computes exactly `model.loss_fn` for `cfg`.

  Args:
    cfg: the model config.
    image_size: the backbone's image size (checks loss_map_size).
    support_size: S, the support rows per step (checks train_batch_size).

  Raises:
    ValueError: naming the first key whose value is not implemented here.
  """
  defaults = model.ModelConfig()
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if f.name in SUPPORTED:
      if value not in SUPPORTED[f.name]:
        raise ValueError(
            f"ModelConfig.{f.name}={value!r} is not implemented by the "
            f"PyTorch peer head (benchmarks/peer_ultraad.py); it supports "
            f"{f.name} in {SUPPORTED[f.name]}. Use --peer_head mvfa or the "
            "default value."
        )
    elif f.name in _SIZED or f.name in _ANY_VALUE:
      continue
    elif value != getattr(defaults, f.name):
      # A field added to ModelConfig after this port was written: only its
      # default can be assumed to leave the loss unchanged.
      raise ValueError(
          f"ModelConfig.{f.name}={value!r}: the PyTorch peer head "
          "(benchmarks/peer_ultraad.py) does not know this key and only "
          f"accepts its default {getattr(defaults, f.name)!r}. Teach "
          "peer_ultraad.py the key or leave it at its default."
      )
  if cfg.loss_map_size not in (0, image_size):
    raise ValueError(
        f"ModelConfig.loss_map_size={cfg.loss_map_size} is not implemented "
        "by the PyTorch peer head: it computes the map losses at the image "
        f"size (loss_map_size 0{f' or {image_size}' if image_size else ''})."
    )
  if cfg.train_batch_size and (
      support_size is None or cfg.train_batch_size < support_size
  ):
    raise ValueError(
        f"ModelConfig.train_batch_size={cfg.train_batch_size} draws a random "
        "minibatch, which the PyTorch peer head does not implement; it "
        "trains on the whole support set (train_batch_size 0)."
    )


def _to_tensor(x, device, dtype=None) -> torch.Tensor:
  # np.array copies: JAX hands out read-only buffers torch must not alias.
  return torch.as_tensor(np.array(x), dtype=dtype, device=device)


def params_from_jax(params, device="cpu") -> dict[str, Any]:
  """Trainable tensors from a `model.init` pytree (same nesting and names).

  Args:
    params: the JAX parameter dict of one episode.
    device: the torch device.

  Returns:
    A dict of float32 leaf tensors with requires_grad set (nested as the
    JAX dict: "ctx", "meta_net", "mininet", "adapter", "fusion",
    "bank_image").
  """
  if isinstance(params, dict):
    return {k: params_from_jax(v, device) for k, v in params.items()}
  return _to_tensor(params, device, torch.float32).requires_grad_()


def leaves(tree) -> list[torch.Tensor]:
  """The tensors of a nested dict, in sorted-key order (as jax.tree)."""
  if isinstance(tree, dict):
    return [t for k in sorted(tree) for t in leaves(tree[k])]
  return [tree]


def buffers_from_jax(state, device="cpu") -> dict[str, torch.Tensor]:
  """The frozen arrays the loss reads, from a `model.frozen` dict.

  Args:
    state: the JAX frozen state of one episode.
    device: the torch device.

  Returns:
    {"prompt_embeds" [2, S_t, W], "prompt_eot" [2] int64, "bank_text"
    [S, D], "bank_labels" [S, 3], "bank_group" [S] int64}.
  """
  out = {
      k: _to_tensor(state[k], device, torch.float32)
      for k in ("prompt_embeds", "bank_text", "bank_labels")
  }
  for k in ("prompt_eot", "bank_group"):
    out[k] = _to_tensor(state[k], device, torch.int64)
  return out


class TextTower(torch.nn.Module):
  """CLIP's frozen text tower on given token embeddings (prompt learning).

  The twin of `clip.Backbone.encode_text_embeddings`: position embeddings,
  the causal transformer, the final LayerNorm, pooling at the end-of-text
  position and the text projection, with transformers' PyTorch CLIP modules
  holding the same weights as the JAX backbone.
  """

  def __init__(self, clip_model):
    """Wraps the text side of a transformers CLIPModel (weights frozen).

    Args:
      clip_model: a transformers CLIPModel with the backbone's weights.
    """
    super().__init__()
    self.text_model = clip_model.text_model
    self.projection = clip_model.text_projection
    for p in self.parameters():
      p.requires_grad_(False)

  def token_embeddings(self, ids: np.ndarray) -> torch.Tensor:
    """Token-embedding lookup ([C, S] ids -> [C, S, W]), no positions."""
    table = self.text_model.embeddings.token_embedding
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64,
                          device=table.weight.device)  # fmt: skip
    with torch.no_grad():
      return table(ids).float()

  def forward(self, embeds: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """[T, S, W] token embeddings and [T] EOT positions -> [T, D]."""
    t, s, _ = embeds.shape
    hidden = embeds + self.text_model.embeddings.position_embedding.weight[:s]
    # The additive causal mask transformers' text model builds for ids; as in
    # JAX, no padding mask: causality already hides what follows the EOT.
    low = torch.finfo(hidden.dtype).min
    mask = torch.full((s, s), low, dtype=hidden.dtype, device=hidden.device)
    mask = mask.triu(1)
    hidden = self.text_model.encoder(
        inputs_embeds=hidden, causal_attention_mask=mask.expand(t, 1, s, s)
    ).last_hidden_state
    hidden = self.text_model.final_layer_norm(hidden)
    pooled = hidden[torch.arange(t, device=hidden.device), eot]
    return self.projection(pooled)


def prompt_buffers(cfg, backbone, tower: TextTower) -> dict[str, torch.Tensor]:
  """The prompts' frozen token embeddings and EOT positions, in PyTorch.

  Args:
    cfg: the model config (prompt_texts, n_ctx).
    backbone: the clip.Backbone (its tokenizer).
    tower: the TextTower holding the same weights.

  Returns:
    {"prompt_embeds" [2, S_t, W], "prompt_eot" [2] int64}, as
    `model.frozen`'s entries of the same names.
  """
  ids, eot = prompts.build_prompt_ids(backbone, cfg.prompt_texts, cfg.n_ctx)
  embeds = tower.token_embeddings(ids)
  return {
      "prompt_embeds": embeds,
      "prompt_eot": torch.as_tensor(eot, dtype=torch.int64,
                                    device=embeds.device),  # fmt: skip
  }


def bank_buffers(labels, group, text_embed) -> dict[str, torch.Tensor]:
  """The memory bank's frozen entries of one episode (Pt, Lt, groups).

  Args:
    labels: [S] int64 tensor of support labels.
    group: [S] int64 tensor of support groups.
    text_embed: [S, D] description embeddings (Pt, normalised here).

  Returns:
    {"bank_text", "bank_labels", "bank_group"} as `model.frozen` builds them.
  """
  return {
      "bank_text": l2_normalize(text_embed.float()),
      "bank_labels": F.one_hot(labels, NUM_CLASSES).float(),
      "bank_group": group,
  }


# ----------------------------------------------------------------------------
# Building blocks (fusion.py, maps.py).
# ----------------------------------------------------------------------------


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
  """maps.l2_normalize: x / max(|x|, eps) along the last axis."""
  norm = torch.sqrt(torch.sum(x * x, dim=-1, keepdim=True))
  return x / torch.clamp(norm, min=eps)


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
  """fusion.rms_normalize: L2-normalised, scaled to norm sqrt(D)."""
  norm = torch.sqrt(torch.sum(x * x, dim=-1, keepdim=True))
  return x * (math.sqrt(x.shape[-1]) / torch.clamp(norm, min=eps))


def bottleneck(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
  """fusion.bottleneck_apply; stacked [L, ...] weights broadcast over x.

  jax.nn.gelu defaults to the tanh approximation, hence approximate="tanh".
  For stacked weights x is [L, B, N, D] and w1 [L, D, H]: the weights get a
  broadcast axis for B, biases one for B and N.
  """
  w1, b1, w2, b2 = p["w1"], p["b1"], p["w2"], p["b2"]
  if w1.dim() == 3:
    w1, w2 = w1[:, None], w2[:, None]
    b1, b2 = b1[:, None, None], b2[:, None, None]
  h = F.gelu(x @ w1 + b1, approximate="tanh")
  return h @ w2 + b2


# ----------------------------------------------------------------------------
# Stages of model._forward.
# ----------------------------------------------------------------------------


def prompt_features(params, buffers, global_embed, tower: TextTower):
  """Image-informed [normal, abnormal] prompt features ("output" mode).

  Args:
    params: the trainable tensors ("ctx" [n_sets, n_ctx, W], "meta_net").
    buffers: "prompt_embeds" [C, S_t, W] and "prompt_eot" [C].
    global_embed: [B, D] query global embeddings.
    tower: the frozen text tower.

  Returns:
    [B, C, D] unit-norm prompt features.
  """
  token_embeds = buffers["prompt_embeds"]
  c, _, w = token_embeds.shape
  ctx = params["ctx"]
  n_ctx = ctx.shape[-2]
  # prompts.assemble: [SOT] ctx <class words> [EOT], ctx shared or per class.
  embeds = torch.cat(
      [
          token_embeds[:, :1],
          ctx.expand(c, n_ctx, w),
          token_embeds[:, 1 + n_ctx :],
      ],
      dim=1,
  )
  text = tower(embeds, buffers["prompt_eot"])  # [C, D]
  f = rms_normalize(global_embed)
  delta = bottleneck(params["meta_net"], f).reshape(f.shape[0], c, -1)
  return l2_normalize(rms_normalize(text)[None] + delta)


def patch_features(params, patch_tokens, text, cfg) -> torch.Tensor:
  """Adapted and prompt-fused patch tokens (fusion.py, cross_attention).

  Args:
    params: "adapter" and "fusion" ({"wq", "wk", "wv", "wo", "bo"}, each
      stacked on [L]).
    patch_tokens: [L, B, N, D] frozen tokens.
    text: [B, C, D] prompt features.
    cfg: the model config (adapter_residual).

  Returns:
    [L, B, N, D] fused tokens.
  """
  x = rms_normalize(patch_tokens)
  a = cfg.adapter_residual
  x = a * x + (1.0 - a) * bottleneck(params["adapter"], x)
  p = params["fusion"]
  t = rms_normalize(text)  # [B, C, D]
  q = x @ p["wq"][:, None]  # [L, B, N, K]
  k = t @ p["wk"][:, None]  # [L, B, C, K]
  v = t @ p["wv"][:, None]
  att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
  return x + (att @ v) @ p["wo"][:, None] + p["bo"][:, None, None]


def layer_logits(x, text, temperature, image_size) -> torch.Tensor:
  """Per-layer abnormality logits upsampled to the image (maps.py).

  Args:
    x: [L, B, N, D] patch features.
    text: [B, 2, D] prompt features.
    temperature: the softmax temperature.
    image_size: output side H = W.

  Returns:
    [L, B, H, W] logits.
  """
  direction = text[:, 1] - text[:, 0]  # text is unit-norm already
  z = torch.einsum("lbnd,bd->lbn", l2_normalize(x), direction) / temperature
  num_layers, b, n = z.shape
  g = int(round(math.sqrt(n)))
  # Half-pixel centres and edge clamping: what jax.image.resize "bilinear"
  # does when upsampling (tests/peer_ultraad_test.py checks it).
  up = F.interpolate(z.reshape(num_layers * b, 1, g, g),
                     size=(image_size, image_size), mode="bilinear",
                     align_corners=False)  # fmt: skip
  return up.reshape(num_layers, b, image_size, image_size)


def global_logit(global_embed, text, temperature) -> torch.Tensor:
  """(cos(f, t_abnormal) - cos(f, t_normal)) / temperature, [B]."""
  cos = torch.einsum("bd,bcd->bc", l2_normalize(global_embed), text)
  return (cos[:, 1] - cos[:, 0]) / temperature


def bank_logits(params, buffers, global_embed, exclude, cfg):
  """Class logits of the memory bank read-out (memory_bank.py, "mean").

  Args:
    params: "mininet" and "bank_image" (Ft, trainable).
    buffers: "bank_text" (Pt) and "bank_labels" (Lt).
    global_embed: [B, D] query global embeddings.
    exclude: [B, S] bool, entries removed from each query's read-out.
    cfg: the model config (bank_beta, bank_lambda, bank_logit_scale).

  Returns:
    (logits [B, 3], counts [B, 3] usable entries per class).
  """
  x = rms_normalize(global_embed)
  f_prime = l2_normalize(x + bottleneck(params["mininet"], x))
  keep = 1.0 - exclude.float()
  onehot = buffers["bank_labels"]

  def affinity(keys):
    cos = f_prime @ l2_normalize(keys).T
    return torch.exp(-cfg.bank_beta * (1.0 - cos)) * keep

  read = affinity(params["bank_image"]) @ onehot + cfg.bank_lambda * (
      affinity(buffers["bank_text"]) @ onehot
  )
  counts = keep @ onehot
  read = read / torch.clamp(counts, min=1.0)
  out = torch.where(
      counts > 0, cfg.bank_logit_scale * read,
      torch.full_like(read, ABSENT_LOGIT),
  )  # fmt: skip
  return out, counts


# ----------------------------------------------------------------------------
# Losses (losses.py).
# ----------------------------------------------------------------------------


def weighted_mean(values, weights) -> torch.Tensor:
  """losses.weighted_mean: 0 (not NaN) when the weights sum to 0."""
  total = weights.sum()
  return (
      (values * weights).sum()
      / torch.clamp(total, min=1e-12)
      * (total > 0).float()
  )


def focal_per_sample(logits, targets, gamma) -> torch.Tensor:
  """Focal loss from logits, mean over pixels: [L, B, H, W] -> [L, B]."""
  # jax.nn.softplus is logaddexp(x, 0); F.softplus cuts over at x > 20.
  bce = torch.logaddexp(logits, torch.zeros_like(logits)) - targets * logits
  one_minus_pt = targets * torch.sigmoid(-logits) + (1.0 - targets) * (
      torch.sigmoid(logits)
  )
  return (one_minus_pt**gamma * bce).flatten(2).mean(-1)


def dice_per_sample(probs, targets, smooth=1.0) -> torch.Tensor:
  """1 - soft dice per sample: [L, B, H, W] -> [L, B]."""
  p, y = probs.flatten(2), targets.flatten(2)
  inter = (p * y).sum(-1)
  return 1.0 - (2.0 * inter + smooth) / (p.sum(-1) + y.sum(-1) + smooth)


def loss_fn(params, buffers, support: Support, *, cfg, tower: TextTower,
            image_size: int):  # fmt: skip
  """`model.loss_fn` in PyTorch (leave-one-out by group, whole support set).

  Args:
    params: trainable tensors (`params_from_jax` of `model.init`).
    buffers: frozen tensors (`buffers_from_jax` of `model.frozen`, or
      `prompt_buffers` | `bank_buffers`).
    support: the support set's tensors.
    cfg: the model config (`check_config` must accept it).
    tower: the frozen text tower.
    image_size: the backbone's image size (maps are trained at it).

  Returns:
    (loss scalar, aux dict with the same keys as model.loss_fn's: loss,
    focal, dice, bce, ce, frac_map, frac_dice, frac_bce, frac_ce,
    class_acc).
  """
  g, masks, labels = support.global_embed, support.masks, support.labels
  b = labels.shape[0]
  exclude = support.group[:, None] == buffers["bank_group"][None, :]

  text = prompt_features(params, buffers, g, tower)
  x = patch_features(params, support.patch_tokens, text, cfg)
  z = layer_logits(x, text, cfg.temperature, image_size)
  glogit = global_logit(g, text, cfg.temperature)
  class_logits, counts = bank_logits(params, buffers, g, exclude, cfg)

  has_mask = (
      torch.ones(b, dtype=g.dtype, device=g.device)
      if support.mask_valid is None
      else support.mask_valid.to(g.dtype)
  )
  nonempty = has_mask * (masks.sum((1, 2)) > 0).to(g.dtype)
  # Per layer, then the mean over layers (map_loss "per_layer").
  focal = torch.stack([
      weighted_mean(v, has_mask)
      for v in focal_per_sample(z, masks[None], cfg.focal_gamma)
  ]).mean()  # fmt: skip
  dice = torch.stack([
      weighted_mean(v, nonempty)
      for v in dice_per_sample(torch.sigmoid(z), masks[None])
  ]).mean()  # fmt: skip

  # BCE only when the bank holds normal and abnormal samples; CE only for
  # queries whose class keeps an entry, when the bank holds two classes.
  present = buffers["bank_labels"].sum(0) > 0
  both = (present[0] & present[1:].any()).to(g.dtype)
  bce_w = torch.ones(b, dtype=g.dtype, device=g.device) * both
  target = (labels > 0).to(g.dtype)
  bce_elem = torch.logaddexp(glogit, torch.zeros_like(glogit)) - target * glogit
  bce = weighted_mean(bce_elem, bce_w)
  own = counts.gather(1, labels[:, None])[:, 0]
  ce_w = ((own > 0) & (present.sum() >= 2)).to(g.dtype)
  nll = -torch.log_softmax(class_logits, -1).gather(1, labels[:, None])[:, 0]
  ce = weighted_mean(nll, ce_w)

  total = (
      cfg.loss_focal * focal
      + cfg.loss_dice * dice
      + cfg.loss_bce * bce
      + cfg.loss_ce * ce
  )
  correct = (class_logits.argmax(-1) == labels).to(g.dtype)
  aux = {
      "loss": total,
      "focal": focal,
      "dice": dice,
      "bce": bce,
      "ce": ce,
      "frac_map": has_mask.mean(),
      "frac_dice": nonempty.mean(),
      "frac_bce": bce_w.mean(),
      "frac_ce": ce_w.mean(),
      "class_acc": weighted_mean(correct, ce_w),
  }
  return total, aux
