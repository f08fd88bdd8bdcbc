"""Learnable text prompts and the image-informed prompt feature.

Prompts (CoOp): each of the two localization prompts, normal and abnormal, is
"[SOT] [ctx_1] ... [ctx_n] <class words> [EOT]" where the n context vectors
live in the text tower's token-embedding space and are learned; the class
words ("normal breast tissue." / "breast tissue with a lesion." by default)
are fixed token embeddings. The context is shared by both prompts by default
(CoOp's unified context) or class-specific. It starts from a template's token
embeddings ("a photo of a", right-aligned next to the class words, the rest
random) or fully random (std 0.02).

Only the first max(EOT) + 1 positions are kept: the text tower is causal and
pools at the EOT token, so later (padding) positions cannot change the
feature, and dropping them cuts the text cost by about 77 / 18.

Image-informed prompt (UltraAD: "the image-level token of query visual
prototypes is first fused with learnable text embeddings"); two modes:

* "output" (default): the two prompts go through the frozen text tower once
  per step; a bottleneck MLP of the query's global token adds one residual
  per prompt after the encoder: t'_c = normalize(rms(t_c) + MLP(rms(f))_c).
  Per query this costs only the MLP.
* "input" (CoCoOp's meta-net): the MLP's output is added to every context
  vector before the text tower, so the tower runs once per query and prompt.

See `text_tower_flops` and docs/METHOD.md for the costs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ultraad_jax import fusion
from ultraad_jax import maps

PROMPT_MODES = ("output", "input")
RANDOM_INIT = ("", "random")
# A placeholder id for context slots; its embedding is always overwritten.
_PLACEHOLDER_ID = 343  # "x</w>" in CLIP's vocabulary, as CoOp's "X X X".


def _token_span(backbone, text: str) -> np.ndarray:
  """Token ids of `text` between SOT and EOT."""
  ids = backbone.tokenize([text])
  eot = int(backbone.eot_positions(ids)[0])
  return ids[0, 1:eot]


def build_prompt_ids(
    backbone, class_texts: tuple[str, ...], n_ctx: int
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of "[SOT] X*n_ctx <class words> [EOT]" per class (host side).

  Args:
    backbone: the clip.Backbone (tokenizer, context length).
    class_texts: the class words of each prompt.
    n_ctx: the number of learnable context slots.

  Returns:
    (ids [C, S] int32, eot [C] int32), with S = max(eot) + 1 (the rest of
    the context cannot influence an EOT-pooled causal encoder).

  Raises:
    ValueError: naming n_ctx / prompt_texts when a prompt would not fit the
      context length.
  """
  sot, eot_id = _sot_eot(backbone)
  rows, eots = [], []
  for text in class_texts:
    words = _token_span(backbone, text)
    row = [sot] + [_PLACEHOLDER_ID] * n_ctx + words.tolist() + [eot_id]
    if len(row) > backbone.context_length:
      raise ValueError(
          f"n_ctx={n_ctx} plus the {len(words)} tokens of prompt text "
          f"{text!r} and SOT/EOT is {len(row)} tokens, more than the context "
          f"length {backbone.context_length}. Lower n_ctx or shorten "
          "prompt_texts."
      )
    rows.append(row)
    eots.append(len(row) - 1)
  length = max(eots) + 1
  ids = np.full((len(rows), length), eot_id, np.int32)
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
  return ids, np.asarray(eots, np.int32)


def trim_ids(backbone, ids: np.ndarray) -> np.ndarray:
  """Drops the padding after the last EOT of a batch of token ids.

  The text tower is causal and pools at the (first) EOT, so the features of
  `ids[:, :max(eot) + 1]` equal those of the padded ids, at a fraction of the
  cost (CLIP pads every prompt to 77 tokens).

  Args:
    backbone: the clip.Backbone.
    ids: [T, S] token ids from `backbone.tokenize`.

  Returns:
    [T, S'] ids with S' = max(eot) + 1.
  """
  ids = np.asarray(ids)
  return ids[:, : int(np.max(backbone.eot_positions(ids))) + 1]


def _sot_eot(backbone) -> tuple[int, int]:
  ids = backbone.tokenize([""])
  eot = int(backbone.eot_positions(ids)[0])
  return int(ids[0, 0]), int(ids[0, eot])


def context_init(
    rng,
    backbone,
    clip_params,
    *,
    n_ctx: int,
    init_text: str,
    std: float,
    n_sets: int,
) -> jax.Array:
  """Initial context vectors.

  Args:
    rng: a JAX random key.
    backbone: the clip.Backbone.
    clip_params: its frozen parameters (for the template's embeddings).
    n_ctx: context length n.
    init_text: a template ("a photo of a"), or "" / "random" for random.
    std: std of the random part.
    n_sets: 1 (shared context) or the number of prompts (class-specific).

  Returns:
    [n_sets, n_ctx, W] context vectors. A template shorter than n_ctx fills
    the last slots (next to the class words) and random vectors the rest; a
    longer one keeps its last n_ctx tokens.
  """
  w = backbone.text_width
  ctx = std * jax.random.normal(rng, (n_sets, n_ctx, w), jnp.float32)
  if init_text in RANDOM_INIT:
    return ctx
  span = _token_span(backbone, init_text)[-n_ctx:]
  if not len(span):
    return ctx
  emb = backbone.embed_tokens(
      jax.lax.stop_gradient(clip_params), span[None].astype(np.int32)
  )[0].astype(jnp.float32)
  return ctx.at[:, n_ctx - len(span) :].set(emb[None])


def token_embeddings(backbone, clip_params, ids: np.ndarray) -> jax.Array:
  """Frozen token embeddings of the prompt ids ([C, S] -> [C, S, W])."""
  return jax.lax.stop_gradient(
      backbone.embed_tokens(clip_params, ids).astype(jnp.float32)
  )


def meta_net_init(
    rng,
    *,
    mode: str,
    dim: int,
    text_width: int,
    num_prompts: int,
    reduction: int,
    init_scale: float,
    ctx_std: float,
) -> dict[str, jax.Array]:
  """Parameters of the image-to-prompt MLP.

  Args:
    rng: a JAX random key.
    mode: "output" (outputs one D-vector per prompt) or "input" (outputs one
      token-space bias of width W, as CoCoOp's meta-net).
    dim: D, the global embedding width.
    text_width: W.
    num_prompts: C.
    reduction: hidden width max(1, D // reduction) (CoCoOp uses 16).
    init_scale: output-layer scale at init.
    ctx_std: token-space scale of the "input" mode output.

  Returns:
    {"w1", "b1", "w2", "b2"}.
  """
  hidden = max(1, dim // reduction)
  if mode == "output":
    return fusion.bottleneck_init(rng, dim, hidden, num_prompts * dim,
                                  init_scale)  # fmt: skip
  if mode == "input":
    return fusion.bottleneck_init(rng, dim, hidden, text_width,
                                  init_scale * ctx_std)  # fmt: skip
  raise ValueError(f"prompt_mode={mode!r}; expected one of {PROMPT_MODES}.")


def assemble(ctx: jax.Array, token_embeds: jax.Array) -> jax.Array:
  """Writes context vectors into the prompts' context slots.

  Args:
    ctx: [..., n_sets, n_ctx, W] with n_sets 1 (shared) or C; leading axes
      (e.g. a query axis) are kept.
    token_embeds: [C, S, W] frozen embeddings of `build_prompt_ids`.

  Returns:
    [..., C, S, W].
  """
  c, _, w = token_embeds.shape
  n_ctx = ctx.shape[-2]
  lead = ctx.shape[:-3]
  ctx = jnp.broadcast_to(ctx, lead + (c, n_ctx, w))
  sot = jnp.broadcast_to(token_embeds[:, :1], lead + (c, 1, w))
  rest = jnp.broadcast_to(
      token_embeds[:, 1 + n_ctx :], lead + token_embeds[:, 1 + n_ctx :].shape
  )
  return jnp.concatenate([sot, ctx, rest], axis=-2)


def encode(
    backbone, clip_params, embeds: jax.Array, eot: jax.Array, prefix_len=0
):
  """Frozen text tower on [..., C, S, W] prompt embeddings -> [..., C, D].

  Args:
    backbone: the clip.Backbone.
    clip_params: its parameters (no gradient flows to them).
    embeds: [..., C, S, W] prompt token embeddings.
    eot: [C] EOT positions.
    prefix_len: P > 0 when the C prompts of each leading index share their
      first P embeddings (a shared context): those positions then run once
      (`Backbone.encode_text_shared_prefix`). 0 runs every prompt whole.

  Returns:
    [..., C, D] text features.
  """
  clip_params = jax.lax.stop_gradient(clip_params)
  lead = embeds.shape[:-2]
  if prefix_len:
    groups = embeds.reshape((-1,) + embeds.shape[-3:])
    out = backbone.encode_text_shared_prefix(
        clip_params, groups, eot, prefix_len
    )
  else:
    flat = embeds.reshape((-1,) + embeds.shape[-2:])
    eot_flat = jnp.broadcast_to(eot, lead).reshape(-1)
    out = backbone.encode_text_embeddings(clip_params, flat, eot_flat)
  return out.reshape(lead + out.shape[-1:])


def image_informed(
    ctx: jax.Array,
    meta_params,
    token_embeds: jax.Array,
    eot: jax.Array,
    global_embed: jax.Array,
    *,
    mode: str,
    backbone,
    clip_params,
) -> jax.Array:
  """Image-informed [normal, abnormal] prompt features of each query.

  Args:
    ctx: [n_sets, n_ctx, W] learnable context.
    meta_params: from `meta_net_init`.
    token_embeds: [C, S, W] frozen prompt token embeddings.
    eot: [C] EOT positions.
    global_embed: [B, D] query global embeddings.
    mode: "output" or "input".
    backbone: the clip.Backbone.
    clip_params: its frozen parameters.

  Returns:
    [B, C, D] L2-normalised prompt features.
  """
  f = fusion.rms_normalize(global_embed)
  c = token_embeds.shape[0]
  # A shared context: [SOT] and the context slots start every prompt.
  prefix = 1 + ctx.shape[-2] if ctx.shape[-3] == 1 else 0
  if mode == "output":
    text = encode(backbone, clip_params, assemble(ctx, token_embeds), eot,
                  prefix)  # fmt: skip
    delta = fusion.bottleneck_apply(meta_params, f)
    delta = delta.reshape(f.shape[0], c, -1)
    return maps.l2_normalize(fusion.rms_normalize(text)[None] + delta)
  if mode == "input":
    bias = fusion.bottleneck_apply(meta_params, f)  # [B, W]
    shifted = ctx[None] + bias[:, None, None, :]
    text = encode(backbone, clip_params, assemble(shifted, token_embeds), eot,
                  prefix)  # fmt: skip
    return maps.l2_normalize(text)
  raise ValueError(f"prompt_mode={mode!r}; expected one of {PROMPT_MODES}.")


def text_tower_flops_formula(
    *, layers: int, width: int, seq_len: int, proj_dim: int
) -> int:
  """Hand count of multiply-add FLOPs (x2) of one text-tower sequence.

  Per block: QKV and output projections 8 S W^2, MLP (4W hidden) 16 S W^2,
  attention scores and mixing 4 S^2 W; then the projection of the pooled
  token 2 W D. LayerNorms, softmax and activations are lower order.

  Args:
    layers: text blocks.
    width: W.
    seq_len: S (positions actually run).
    proj_dim: D.

  Returns:
    FLOPs per sequence.
  """
  per_block = 24 * seq_len * width**2 + 4 * seq_len**2 * width
  return layers * per_block + 2 * width * proj_dim


def text_tower_flops(backbone, num_sequences: int, seq_len: int) -> float:
  """XLA's FLOP count of the text tower on `num_sequences` prompts.

  Lowered on abstract shapes only (no weights needed, nothing executed).

  Args:
    backbone: a clip.Backbone (its params may be ShapeDtypeStructs).
    num_sequences: T prompts in one call.
    seq_len: S.

  Returns:
    The "flops" entry of the compiled program's cost analysis.
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), backbone.params
  )
  fn = jax.jit(functools.partial(_encode_raw, backbone))
  lowered = fn.lower(
      abstract,
      jax.ShapeDtypeStruct(
          (num_sequences, seq_len, backbone.text_width), jnp.float32
      ),
      jax.ShapeDtypeStruct((num_sequences,), jnp.int32),
  )
  cost = lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def _encode_raw(backbone, params, embeds, eot):
  return backbone.encode_text_embeddings(params, embeds, eot)
