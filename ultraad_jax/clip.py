"""The frozen CLIP backbone: loading, a tiny random model, and pure encoders.

Everything downstream sees CLIP through a `Backbone`: a small immutable object
holding the transformers `CLIPConfig`, the Flax parameters and a Flax
`FlaxCLIPModule` built from that config. Its encoders are pure functions of the
parameters they are given (never of `backbone.params`), so they can be jitted,
vmapped and differentiated, and the frozen parameters stay an explicit argument:

  bb = clip.load("openai/clip-vit-large-patch14-336")
  encode = jax.jit(bb.encode_image, static_argnums=2)
  feats = encode(bb.params, clip.normalize(images_uint8), (6, 12, 18, 24))

Where the weights come from (`load`):
  * a local folder in the Hugging Face layout: `config.json` (model_type
    "clip") plus `flax_model.msgpack`, `model.safetensors` or
    `pytorch_model.bin` (sharded `*.index.json` variants too). A local path
    never touches the network.
  * a hub name such as "openai/clip-vit-base-patch16" (or "hf://<name>"):
    downloaded with huggingface_hub into its usual cache. This is the only
    place that downloads, and only when a hub name is passed.
PyTorch weights are converted with transformers' own PyTorch->Flax key mapping
(the one `FlaxCLIPModel.from_pretrained(..., from_pt=True)` uses), against the
parameter shapes the config implies, without building a randomly initialised
model first. Missing weights are an error: this module never fills a parameter
with random values when weights were asked for. Converting a large checkpoint
takes minutes, so the converted parameters are cached as a Flax folder
(`config.json`, `flax_model.msgpack`, `source.json`) under

  cache_dir argument, else $ULTRAAD_CACHE/clip, else ~/.cache/ultraad_jax/clip

in `<name>-<hash of the absolute source path>/`. `source.json` records the
size and modification time of every source file; a changed source (or another
transformers version) invalidates the entry and the weights are converted
again. An unwritable cache only costs the reconversion next time.

Tokenizer: no installed package ships CLIP's byte-pair vocabulary, so the
OpenAI file `assets/bpe_simple_vocab_16e6.txt.gz` (MIT licence, see
`assets/LICENSE-CLIP-BPE.txt`; taken from the open_clip_torch 3.3.0 wheel) is
shipped here and turned into `vocab.json` + `merges.txt` in a temporary folder
when a tokenizer is first needed, then loaded as
`transformers.CLIPTokenizerFast` (start token 49406, end token 49407, padding
with 49407 after the end token, as the OpenAI checkpoints' tokenizer does).
A checkpoint folder or hub repository that brings its own tokenizer files uses
those instead.

Conventions:
  * pixels are float32 NHWC, normalised with the OpenAI mean/std
    (`normalize`);
  * tapped layers use transformers' `hidden_states` numbering: layer i is the
    output of block i, 1..num_layers (so "6, 12, 18, 24" of ViT-L/14 as in
    the anomaly-detection literature);
  * projected patch tokens go through the final vision LayerNorm and the visual
    projection (the APRIL-GAN / AnomalyCLIP convention), the class token
    dropped; the unprojected tokens are returned too.
"""

import copy
import dataclasses
import functools
import gzip
import hashlib
import json
import os
import re
import tempfile
import time
from typing import Any, NamedTuple, Sequence

from absl import logging
import flax.linen as nn
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from transformers.modeling_flax_utils import ACT2FN
from transformers.models.clip import modeling_flax_clip

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
CLIP_VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
_BPE_FILE = os.path.join(_ASSETS, "bpe_simple_vocab_16e6.txt.gz")

# Bumped when the cached layout or the conversion changes, so that old cache
# entries are rebuilt rather than misread.
_CACHE_FORMAT = 1

_FLAX_WEIGHTS = "flax_model.msgpack"
# Preference order among PyTorch-format weights: safetensors needs no torch.
_PT_WEIGHTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Names of hub repositories ("org/name"); anything else is a local path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# Kernels that a random Flax CLIP initialises with std 0.01 (see tiny()).
_MIXING_KERNELS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class ImageFeatures(NamedTuple):
  """What `Backbone.encode_image` returns (a pytree).

  Attributes:
    global_embed: [B, D] projected image embedding, as
      `CLIPModel.get_image_features`.
    patch_tokens: [L, B, N, D] per tapped layer, the patch tokens (class token
      dropped) through the final vision LayerNorm and the visual projection.
    patch_tokens_raw: [L, B, N, W] the same tokens before that LayerNorm.
  """

  global_embed: jax.Array
  patch_tokens: jax.Array
  patch_tokens_raw: jax.Array


# ----------------------------------------------------------------------------
# Configurations.
# ----------------------------------------------------------------------------


def _clip_config(
    *,
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    vision_heads: int,
    vision_mlp_dim: int,
    text_width: int,
    text_layers: int,
    text_heads: int,
    text_mlp_dim: int,
    context_length: int,
    projection_dim: int,
    vocab_size: int,
    hidden_act: str,
) -> transformers.CLIPConfig:
  """Builds a CLIPConfig from the handful of numbers that define a CLIP."""
  return transformers.CLIPConfig(
      text_config=dict(
          vocab_size=vocab_size,
          hidden_size=text_width,
          intermediate_size=text_mlp_dim,
          num_hidden_layers=text_layers,
          num_attention_heads=text_heads,
          max_position_embeddings=context_length,
          hidden_act=hidden_act,
          projection_dim=projection_dim,
          bos_token_id=SOT_TOKEN_ID,
          eos_token_id=EOT_TOKEN_ID,
      ),
      vision_config=dict(
          image_size=image_size,
          patch_size=patch_size,
          hidden_size=vision_width,
          intermediate_size=vision_mlp_dim,
          num_hidden_layers=vision_layers,
          num_attention_heads=vision_heads,
          hidden_act=hidden_act,
          projection_dim=projection_dim,
      ),
      projection_dim=projection_dim,
  )


TINY_DEFAULTS = dict(
    image_size=64,
    patch_size=8,
    vision_width=64,
    vision_layers=4,
    vision_heads=4,
    vision_mlp_dim=256,
    text_width=64,
    text_layers=4,
    text_heads=4,
    text_mlp_dim=256,
    context_length=CONTEXT_LENGTH,
    projection_dim=64,
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_act="quick_gelu",
)

# OpenAI's released image towers, with the text tower each was trained with.
_OPENAI_DIMS = {
    "ViT-B/32": dict(
        image_size=224, patch_size=32, vision_width=768, vision_layers=12,
        vision_heads=12, text_width=512, text_heads=8, projection_dim=512,
    ),
    "ViT-B/16": dict(
        image_size=224, patch_size=16, vision_width=768, vision_layers=12,
        vision_heads=12, text_width=512, text_heads=8, projection_dim=512,
    ),
    "ViT-L/14": dict(
        image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
        vision_heads=16, text_width=768, text_heads=12, projection_dim=768,
    ),
    "ViT-L/14@336": dict(
        image_size=336, patch_size=14, vision_width=1024, vision_layers=24,
        vision_heads=16, text_width=768, text_heads=12, projection_dim=768,
    ),
}  # fmt: skip


def tiny_config(**overrides) -> transformers.CLIPConfig:
  """The configuration of `tiny`, with optional overrides.

  Args:
    **overrides: any key of `TINY_DEFAULTS`: image_size, patch_size,
      vision_width, vision_layers, vision_heads, vision_mlp_dim, text_width,
      text_layers, text_heads, text_mlp_dim, context_length, projection_dim,
      vocab_size, hidden_act.

  Returns:
    A transformers CLIPConfig.

  Raises:
    TypeError: for an unknown override name.
  """
  unknown = sorted(set(overrides) - set(TINY_DEFAULTS))
  if unknown:
    raise TypeError(
        f"Unknown tiny CLIP setting(s) {unknown}; expected some of "
        f"{sorted(TINY_DEFAULTS)} (plus seed, init_scale, dtype for tiny())."
    )
  return _clip_config(**{**TINY_DEFAULTS, **overrides})


def openai_config(
    name: str, *, image_size: int | None = None
) -> transformers.CLIPConfig:
  """The configuration of one of OpenAI's CLIP models (no weights).

  Useful for shape checks with `jax.eval_shape` and for benchmarks.

  Args:
    name: "ViT-B/32", "ViT-B/16", "ViT-L/14" or "ViT-L/14@336".
    image_size: overrides the input size (the position table then no longer
      matches the released weights; `load` resizes it).

  Returns:
    A transformers CLIPConfig with OpenAI's dimensions.
  """
  if name not in _OPENAI_DIMS:
    raise ValueError(
        f"Unknown OpenAI CLIP {name!r}; expected one of {sorted(_OPENAI_DIMS)}."
    )
  dims = dict(_OPENAI_DIMS[name])
  if image_size is not None:
    dims["image_size"] = image_size
  return _clip_config(
      vision_mlp_dim=4 * dims["vision_width"],
      text_layers=12,
      text_mlp_dim=4 * dims["text_width"],
      context_length=CONTEXT_LENGTH,
      vocab_size=CLIP_VOCAB_SIZE,
      hidden_act="quick_gelu",
      **dims,
  )


# ----------------------------------------------------------------------------
# Parameters.
# ----------------------------------------------------------------------------


def _init_inputs(config: transformers.CLIPConfig):
  size = config.vision_config.image_size
  ids = jnp.zeros((1, 1), jnp.int32)
  pixels = jnp.zeros((1, size, size, config.vision_config.num_channels))
  return ids, pixels, jnp.ones_like(ids), jnp.zeros_like(ids)


def init_params(
    config: transformers.CLIPConfig,
    rng: jax.Array,
    *,
    init_scale: float = 1.0,
) -> dict[str, Any]:
  """Randomly initialised FlaxCLIPModel parameters (pure; jit or eval_shape it).

  Args:
    config: the CLIP configuration.
    rng: a JAX random key.
    init_scale: multiplies the attention (q, k, v, out) and MLP (fc1, fc2)
      kernels of both towers after the standard initialisation.

  Returns:
    The parameter pytree, in FlaxCLIPModel's layout.
  """
  module = modeling_flax_clip.FlaxCLIPModule(config=config)
  params_rng, dropout_rng = jax.random.split(rng)
  params = module.init(
      {"params": params_rng, "dropout": dropout_rng}, *_init_inputs(config)
  )["params"]
  if init_scale == 1.0:
    return params

  def scale(path, x):
    names = [getattr(k, "key", None) for k in path]
    if names[-1] == "kernel" and names[-2] in _MIXING_KERNELS:
      return x * init_scale
    return x

  return jax.tree.map_with_path(scale, params)


def _abstract_params(config: transformers.CLIPConfig) -> dict[str, Any]:
  return jax.eval_shape(
      functools.partial(init_params, config), jax.random.key(0)
  )


def set_image_size(
    params: dict[str, Any], config: transformers.CLIPConfig, image_size: int
) -> tuple[dict[str, Any], transformers.CLIPConfig]:
  """Adapts parameters and config to another input size.

  The patch part of the position table is resized bicubically over the patch
  grid (jax.image.resize, no antialiasing, as the PyTorch peers' interpolate);
  the class position is kept. At the same size nothing changes (bitwise).

  Args:
    params: FlaxCLIPModel parameters.
    config: their configuration (not modified).
    image_size: the new square input size in pixels.

  Returns:
    (params, config) for the new size; the config is a copy.
  """
  vision = config.vision_config
  patch = vision.patch_size
  if not isinstance(image_size, (int, np.integer)) or image_size < patch:
    raise ValueError(
        f"image_size must be an int >= the patch size {patch}, got "
        f"{image_size!r}."
    )
  image_size = int(image_size)
  config = copy.deepcopy(config)
  old_grid = vision.image_size // patch
  new_grid = image_size // patch
  if image_size % patch:
    logging.warning(
        "image_size %d is not a multiple of the patch size %d: the last %d "
        "pixel rows/columns are ignored by the patch embedding (as in the "
        "PyTorch peers that run ViT-L/14 at 240).",
        image_size,
        patch,
        image_size % patch,
    )
  config.vision_config.image_size = image_size
  if new_grid == old_grid:
    return params, config
  emb = params["vision_model"]["embeddings"]["position_embedding"]["embedding"]
  if emb.shape[0] != 1 + old_grid * old_grid:
    raise ValueError(
        f"The position table has {emb.shape[0]} rows but the config's "
        f"image_size {vision.image_size} / patch {patch} implies "
        f"{1 + old_grid * old_grid}; pass the config these params came with."
    )
  cls_pos, grid_pos = emb[:1], emb[1:]
  width = grid_pos.shape[-1]
  grid_pos = jax.image.resize(
      grid_pos.reshape(old_grid, old_grid, width).astype(jnp.float32),
      (new_grid, new_grid, width),
      method="bicubic",
      antialias=False,
  ).reshape(new_grid * new_grid, width)
  new_emb = jnp.concatenate([cls_pos, grid_pos.astype(emb.dtype)], axis=0)
  params = flax.traverse_util.unflatten_dict(
      {
          **flax.traverse_util.flatten_dict(params),
          ("vision_model", "embeddings", "position_embedding", "embedding"): (
              new_emb
          ),
      }
  )
  return params, config


# ----------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------


def _write_shipped_vocab(folder: str) -> None:
  """Turns OpenAI's BPE merge list into Hugging Face vocab.json + merges.txt."""
  with gzip.open(_BPE_FILE, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  # Line 0 is a header; OpenAI uses the first 49152 - 256 - 2 merges, which
  # with 2 x 256 byte symbols and the two special tokens gives 49408 ids.
  merges = lines[1 : 49152 - 256 - 2 + 1]
  byte_symbols = list(
      transformers.models.clip.tokenization_clip.bytes_to_unicode().values()
  )
  tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
  tokens += ["".join(m.split(" ")) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  if len(tokens) != CLIP_VOCAB_SIZE:
    raise ValueError(
        f"{_BPE_FILE} gave {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}: "
        "the shipped vocabulary file is damaged; restore it from git."
    )
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tokenizer(
    source: str | None = None, context_length: int = CONTEXT_LENGTH
) -> transformers.PreTrainedTokenizerBase:
  """A CLIP tokenizer (fast), from a folder's files or the shipped vocabulary.

  Args:
    source: a folder holding Hugging Face tokenizer files, or None for the
      shipped OpenAI vocabulary.
    context_length: the model_max_length to set.

  Returns:
    A transformers CLIPTokenizerFast.
  """
  if source is not None:
    return transformers.CLIPTokenizerFast.from_pretrained(
        source, model_max_length=context_length
    )
  with tempfile.TemporaryDirectory(prefix="ultraad_clip_bpe_") as folder:
    _write_shipped_vocab(folder)
    # The fast tokenizer reads both files at construction; the folder can go.
    return transformers.CLIPTokenizerFast(
        vocab_file=os.path.join(folder, "vocab.json"),
        merges_file=os.path.join(folder, "merges.txt"),
        model_max_length=context_length,
    )


def eot_positions(input_ids, eos_token_id: int = EOT_TOKEN_ID):
  """Index of the (first) end-of-text token of each row.

  Args:
    input_ids: [T, S] token ids (numpy or JAX).
    eos_token_id: the end-of-text id. The legacy value 2 found in old
      Hugging Face configs means "the largest id", as transformers does.

  Returns:
    [T] int32 positions, numpy for numpy input, else a JAX array.
  """
  xp = np if isinstance(input_ids, np.ndarray) else jnp
  if input_ids.ndim != 2:
    raise ValueError(
        f"input_ids must be [T, S], got shape {tuple(input_ids.shape)}."
    )
  if eos_token_id == 2:
    pos = xp.argmax(input_ids, axis=-1)
  else:
    if xp is np and not (input_ids == eos_token_id).any(axis=-1).all():
      bad = np.nonzero(~(input_ids == eos_token_id).any(axis=-1))[0]
      raise ValueError(
          f"rows {bad.tolist()} of input_ids hold no end-of-text token "
          f"{eos_token_id}; tokenize with Backbone.tokenize."
      )
    pos = xp.argmax(input_ids == eos_token_id, axis=-1)
  return pos.astype(xp.int32)


# ----------------------------------------------------------------------------
# Image normalisation.
# ----------------------------------------------------------------------------


def normalize(images):
  """CLIP input normalisation.

  Args:
    images: [..., H, W, 3] uint8 in [0, 255] or floating point in [0, 1]
      (numpy or JAX; JAX values are range-checked only when concrete).

  Returns:
    float32 images normalised with OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, numpy
    for numpy input, else a JAX array.

  Raises:
    ValueError: on another dtype, a channel count other than 3, or float
      values clearly outside [0, 1].
  """
  xp = np if isinstance(images, np.ndarray) else jnp
  shape = tuple(images.shape)
  if len(shape) < 3 or shape[-1] != 3:
    raise ValueError(
        f"normalize expects [..., H, W, 3] (NHWC, RGB) images, got shape "
        f"{shape}; repeat a grey channel to 3 first."
    )
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8:
    x = images.astype(xp.float32) / 255.0
  elif np.issubdtype(dtype, np.floating):
    x = images.astype(xp.float32)
    if not isinstance(images, jax.core.Tracer) and x.size:
      lo, hi = float(x.min()), float(x.max())
      # Small slack for resampling overshoot; 0..255 floats fail clearly.
      if lo < -0.01 or hi > 1.01:
        raise ValueError(
            f"normalize expects float images in [0, 1], got values in "
            f"[{lo:.3g}, {hi:.3g}]; divide 0..255 data by 255 or pass uint8."
        )
  else:
    raise ValueError(
        f"normalize expects uint8 [0, 255] or float [0, 1] images, got dtype "
        f"{dtype}."
    )
  mean = xp.asarray(OPENAI_CLIP_MEAN, xp.float32)
  std = xp.asarray(OPENAI_CLIP_STD, xp.float32)
  return (x - mean) / std


# ----------------------------------------------------------------------------
# The backbone.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A CLIP model: configuration, parameters and pure encoders.

  Identity-hashed and immutable, so bound methods are safe to jit (the
  parameters are always passed explicitly, never read from `self`).

  Attributes:
    config: the transformers CLIPConfig the parameters follow.
    params: FlaxCLIPModel parameters (a pytree; may be abstract
      ShapeDtypeStructs for `jax.eval_shape`).
    dtype: the computation dtype of the Flax modules (parameters are kept as
      given, float32 from `load` and `tiny`).
    tokenizer_source: a folder with Hugging Face tokenizer files, or None for
      the shipped OpenAI vocabulary.
  """

  config: transformers.CLIPConfig = dataclasses.field(repr=False)
  params: Any = dataclasses.field(repr=False)
  dtype: Any = jnp.float32
  tokenizer_source: str | None = None

  def __repr__(self) -> str:
    v, t = self.config.vision_config, self.config.text_config
    return (
        f"Backbone(vision=ViT width {v.hidden_size} x {v.num_hidden_layers} "
        f"layers, patch {v.patch_size}, image {v.image_size}; text width "
        f"{t.hidden_size} x {t.num_hidden_layers}; embed {self.embed_dim}; "
        f"act {v.hidden_act}; dtype {jnp.dtype(self.dtype).name})"
    )

  def __post_init__(self):
    if not isinstance(self.config, transformers.CLIPConfig):
      raise TypeError(
          f"Backbone needs a transformers.CLIPConfig, got "
          f"{type(self.config).__name__}."
      )
    module = modeling_flax_clip.FlaxCLIPModule(
        config=self.config, dtype=self.dtype
    )
    object.__setattr__(self, "module", module)

  # Conveniences.
  @property
  def image_size(self) -> int:
    return self.config.vision_config.image_size

  @property
  def patch_size(self) -> int:
    return self.config.vision_config.patch_size

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_layers(self) -> int:
    """Number of vision blocks (valid tapped layers are 1..num_layers)."""
    return self.config.vision_config.num_hidden_layers

  @property
  def vision_width(self) -> int:
    return self.config.vision_config.hidden_size

  @property
  def embed_dim(self) -> int:
    """The joint image-text embedding size (projection_dim)."""
    return self.config.projection_dim

  @property
  def text_width(self) -> int:
    return self.config.text_config.hidden_size

  @property
  def context_length(self) -> int:
    return self.config.text_config.max_position_embeddings

  # Image tower.
  def _check_layers(self, layers) -> tuple[int, ...]:
    try:
      layers = tuple(layers)
    except TypeError:
      raise ValueError(
          f"layers must be a tuple of ints, got {layers!r}."
      ) from None
    if not layers:
      raise ValueError("layers must name at least one block, got ().")
    for layer in layers:
      if isinstance(layer, jax.core.Tracer):
        raise ValueError(
            "layers must be static Python ints; under jax.jit mark the "
            "argument static (static_argnums=2)."
        )
      if (
          isinstance(layer, bool)
          or not isinstance(layer, (int, np.integer))
          or not 1 <= layer <= self.num_layers
      ):
        raise ValueError(
            f"layer {layer!r} in layers={layers} is out of range: expected "
            f"block indices 1..{self.num_layers} (hidden_states numbering)."
        )
    return tuple(int(layer) for layer in layers)

  def _check_pixels(self, pixels) -> None:
    shape = tuple(pixels.shape)
    size = self.image_size
    channels = self.config.vision_config.num_channels
    if len(shape) != 4:
      raise ValueError(
          f"pixels must be [B, H, W, C] (NHWC), got shape {shape}."
      )
    if shape[1:] != (size, size, channels):
      raise ValueError(
          f"pixels of shape {shape} do not match this backbone: expected "
          f"[B, {size}, {size}, {channels}]. Resize the images, or load the "
          f"backbone with image_size={shape[1]} (NHWC, not NCHW)."
      )
    if not jnp.issubdtype(pixels.dtype, jnp.floating):
      raise ValueError(
          f"pixels must be floating point (normalised with clip.normalize), "
          f"got dtype {pixels.dtype}."
      )

  def encode_image(
      self, params, pixels, layers: Sequence[int]
  ) -> ImageFeatures:
    """Encodes images into a global embedding and tapped patch tokens.

    Args:
      params: FlaxCLIPModel parameters.
      pixels: [B, H, W, 3] float, normalised with `normalize`; H = W =
        `image_size`.
      layers: block indices (1..num_layers) whose patch tokens to return;
        static under jit (a tuple).

    Returns:
      ImageFeatures with global_embed [B, D], patch_tokens [L, B, N, D] and
      patch_tokens_raw [L, B, N, W] (N = grid_size**2), all float32.
    """
    layers = self._check_layers(layers)
    self._check_pixels(pixels)

    def forward(module, pixels):
      vision = module.vision_model
      out = vision(pixel_values=pixels, output_hidden_states=True)
      global_embed = module.visual_projection(out.pooler_output)
      raw = jnp.stack([out.hidden_states[i][:, 1:] for i in layers])
      projected = module.visual_projection(vision.post_layernorm(raw))
      return ImageFeatures(
          global_embed=global_embed.astype(jnp.float32),
          patch_tokens=projected.astype(jnp.float32),
          patch_tokens_raw=raw.astype(jnp.float32),
      )

    return self.module.apply(
        {"params": params}, jnp.asarray(pixels), method=forward
    )

  # Text tower.
  def _check_ids(self, input_ids) -> None:
    shape = tuple(input_ids.shape)
    if len(shape) != 2 or not 1 <= shape[1] <= self.context_length:
      raise ValueError(
          f"input_ids must be [T, S] with S <= {self.context_length}, got "
          f"shape {shape}; tokenize with Backbone.tokenize."
      )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integers, got {input_ids.dtype}.")

  def encode_text(self, params, input_ids) -> jax.Array:
    """Projected text features, as `CLIPModel.get_text_features`.

    Args:
      params: FlaxCLIPModel parameters.
      input_ids: [T, S] token ids from `tokenize` (S <= context_length).

    Returns:
      [T, D] float32 text features (not normalised).
    """
    self._check_ids(input_ids)
    ids = jnp.asarray(input_ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def forward(module, ids, positions):
      out = module.text_model(
          input_ids=ids,
          attention_mask=jnp.ones_like(ids),
          position_ids=positions,
      )
      return module.text_projection(out.pooler_output)

    out = self.module.apply({"params": params}, ids, positions, method=forward)
    return out.astype(jnp.float32)

  def embed_tokens(self, params, input_ids) -> jax.Array:
    """Token-embedding lookup only (no positions).

    Args:
      params: FlaxCLIPModel parameters.
      input_ids: [T, S] token ids.

    Returns:
      [T, S, W] token embeddings (W = text_width).
    """
    self._check_ids(input_ids)
    ids = jnp.asarray(input_ids, jnp.int32)

    def lookup(module, ids):
      return module.text_model.embeddings.token_embedding(ids)

    return self.module.apply({"params": params}, ids, method=lookup)

  def encode_text_embeddings(
      self, params, token_embeddings, eot_positions
  ) -> jax.Array:
    """The text tower run on given token embeddings (for learnable prompts).

    Adds position embeddings, runs the causal transformer and final LayerNorm,
    pools at `eot_positions` and projects. On `embed_tokens(ids)` with
    `eot_positions(ids)` it equals `encode_text(ids)`. Differentiable with
    respect to `token_embeddings`.

    Args:
      params: FlaxCLIPModel parameters.
      token_embeddings: [T, S, W] with S <= context_length, W = text_width.
      eot_positions: [T] integer index of the end-of-text token of each row.

    Returns:
      [T, D] float32 text features.
    """
    shape = tuple(token_embeddings.shape)
    if (
        len(shape) != 3
        or not 1 <= shape[1] <= self.context_length
        or shape[2] != self.text_width
    ):
      raise ValueError(
          f"token_embeddings must be [T, S, {self.text_width}] with S <= "
          f"{self.context_length}, got shape {shape}."
      )
    if tuple(eot_positions.shape) != shape[:1]:
      raise ValueError(
          f"eot_positions must be [T] = [{shape[0]}], got shape "
          f"{tuple(eot_positions.shape)}."
      )
    if isinstance(eot_positions, np.ndarray) and eot_positions.size:
      if eot_positions.min() < 0 or eot_positions.max() >= shape[1]:
        raise ValueError(
            f"eot_positions {eot_positions.tolist()} out of range [0, "
            f"{shape[1]})."
        )
    positions = jnp.arange(shape[1])[None, :]

    def forward(module, embeddings, eot):
      text = module.text_model
      hidden = embeddings + text.embeddings.position_embedding(positions)
      # No padding mask: the causal mask alone already hides every token
      # after the end-of-text position from the pooled output.
      hidden = text.encoder(inputs_embeds=hidden).last_hidden_state
      hidden = text.final_layer_norm(hidden)
      pooled = jnp.take_along_axis(hidden, eot[:, None, None], axis=1)[:, 0]
      return module.text_projection(pooled)

    out = self.module.apply(
        {"params": params},
        jnp.asarray(token_embeddings),
        jnp.asarray(eot_positions, jnp.int32),
        method=forward,
    )
    return out.astype(jnp.float32)

  def encode_text_shared_prefix(
      self, params, token_embeddings, eot_positions, prefix_len: int
  ) -> jax.Array:
    """`encode_text_embeddings` for groups of prompts with a common start.

    Learnable prompts with one shared context ("[SOT] ctx_1..ctx_n <class
    words> [EOT]") agree on their first 1 + n positions. The text tower is
    causal, so those positions' hidden states are the same in every prompt
    of a group: here they run once per group, and each prompt's remaining
    positions attend to the group's cached prefix keys and values. Same
    function as `encode_text_embeddings` (the masked attention entries it
    skips weigh exactly 0 there); with CoOp's 12 context slots and the
    default prompts it runs 13 + 2 x 8 instead of 2 x 21 positions.

    Args:
      params: FlaxCLIPModel parameters.
      token_embeddings: [G, T, S, W]; within each group g, the first
        `prefix_len` positions must be equal in all T rows (only row 0's
        are read).
      eot_positions: [T] end-of-text positions, each >= prefix_len.
      prefix_len: P, 1 <= P <= S.

    Returns:
      [G, T, D] float32 text features.
    """
    shape = tuple(token_embeddings.shape)
    if (
        len(shape) != 4
        or not 1 <= prefix_len <= shape[2] <= self.context_length
        or shape[3] != self.text_width
    ):
      raise ValueError(
          f"token_embeddings must be [G, T, S, {self.text_width}] with "
          f"prefix_len={prefix_len} <= S <= {self.context_length}, got shape "
          f"{shape}."
      )
    if tuple(eot_positions.shape) != shape[1:2]:
      raise ValueError(
          f"eot_positions must be [T] = [{shape[1]}], got shape "
          f"{tuple(eot_positions.shape)}."
      )
    if isinstance(eot_positions, np.ndarray) and eot_positions.size:
      if eot_positions.min() < prefix_len or eot_positions.max() >= shape[2]:
        raise ValueError(
            f"eot_positions {eot_positions.tolist()} must lie in "
            f"[prefix_len={prefix_len}, {shape[2]})."
        )
    emb = jnp.asarray(token_embeddings)
    prefix, suffix = emb[:, 0, :prefix_len], emb[:, :, prefix_len:]

    def forward(module, prefix, suffix, eot):
      text = module.text_model
      position = text.embeddings.position_embedding
      g, t, s, w = suffix.shape
      hp = prefix + position(jnp.arange(prefix_len))  # [G, P, W]
      hs = suffix + position(prefix_len + jnp.arange(s))  # [G, T, S', W]
      h = jnp.concatenate([hp, hs.reshape(g, t * s, w)], axis=1)
      for layer in text.encoder.layers.layers:
        h = _prefix_block(layer, h, prefix_len, (t, s),
                          self.config.text_config)  # fmt: skip
      hs = text.final_layer_norm(h[:, prefix_len:].reshape(g, t, s, w))
      index = (eot - prefix_len)[None, :, None, None]
      pooled = jnp.take_along_axis(hs, index, axis=2)[:, :, 0]
      return module.text_projection(pooled)

    out = self.module.apply(
        {"params": params},
        prefix,
        suffix,
        jnp.asarray(eot_positions, jnp.int32),
        method=forward,
    )
    return out.astype(jnp.float32)

  # Tokenizer.
  @functools.cached_property
  def tokenizer(self) -> transformers.PreTrainedTokenizerBase:
    """The CLIP tokenizer (built on first use)."""
    return build_tokenizer(self.tokenizer_source, self.context_length)

  def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
    """Tokenizes with CLIP conventions.

    Start token 49406, end token 49407, padded after the end token to
    `context_length`; longer texts are truncated keeping the end token.

    Args:
      texts: a string or a sequence of strings.

    Returns:
      [T, context_length] int32 numpy token ids.
    """
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
      raise ValueError(f"tokenize expects strings, got {texts!r:.200}.")
    ids = self.tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=self.context_length,
        return_tensors="np",
    )["input_ids"]
    return ids.astype(np.int32)

  def eot_positions(self, input_ids):
    """`eot_positions` with this model's end-of-text id (see the function)."""
    return eot_positions(input_ids, self.config.text_config.eos_token_id)


# ----------------------------------------------------------------------------
# Construction.
# ----------------------------------------------------------------------------


def _causal_bias(rows, prefix, dtype):
  """[rows, prefix + rows] attention bias: the prefix open, the rest causal.

  Masked entries get the dtype's minimum, as in transformers' Flax CLIP.
  """
  causal = jnp.tril(jnp.ones((rows, rows), bool))
  allowed = jnp.concatenate([jnp.ones((rows, prefix), bool), causal], axis=1)
  return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def _prefix_block(layer, h, prefix_len, suffix_shape, config):
  """One text block on rows [G, P + T * S, W]: a shared prefix, T suffixes.

  Every row-wise part (LayerNorms, projections, MLP) runs on all rows in one
  product; only the attention splits them. The prefix attends causally to
  itself; every suffix position attends to the whole prefix and causally to
  its own suffix.
  """
  heads = config.num_attention_heads
  attn = layer.self_attn
  g, p = h.shape[0], prefix_len
  t, s = suffix_shape

  def split(x):  # [G, P + T * S, W] -> [G, P, heads, dh], [G, T, S, heads, dh]
    x = x.reshape(x.shape[:-1] + (heads, -1))
    return x[:, :p], x[:, p:].reshape((g, t, s) + x.shape[2:])

  x = layer.layer_norm1(h)
  (qp, qs), (kp, ks), (vp, vs) = (
      split(f(x)) for f in (attn.q_proj, attn.k_proj, attn.v_proj)
  )
  expand = lambda a: jnp.broadcast_to(a[:, None], (g, t) + a.shape[1:])
  # Flax's dot-product attention: what transformers' Flax CLIP computes.
  out_p = nn.dot_product_attention(qp, kp, vp, _causal_bias(p, 0, qp.dtype))
  out_s = nn.dot_product_attention(
      qs,
      jnp.concatenate([expand(kp), ks], axis=2),
      jnp.concatenate([expand(vp), vs], axis=2),
      _causal_bias(s, p, qs.dtype),
  )
  out = jnp.concatenate(
      [out_p.reshape((g, p, -1)), out_s.reshape((g, t * s, -1))], axis=1
  )
  h = h + attn.out_proj(out)
  return h + layer.mlp(layer.layer_norm2(h))


def from_config(
    config: transformers.CLIPConfig,
    *,
    seed: int = 0,
    init_scale: float = 1.0,
    dtype=jnp.float32,
) -> Backbone:
  """A randomly initialised Backbone for a given configuration.

  Args:
    config: the CLIP configuration.
    seed: the initialisation seed.
    init_scale: see `init_params`.
    dtype: the computation dtype.

  Returns:
    A Backbone with fresh random parameters.
  """
  # Eager Flax init is slow here (seconds even for a tiny model); one jitted
  # init is much faster and is cached by the persistent compilation cache.
  init = jax.jit(functools.partial(init_params, config, init_scale=init_scale))
  return Backbone(config=config, params=init(jax.random.key(seed)), dtype=dtype)


def tiny(seed: int = 0, **overrides) -> Backbone:
  """A small randomly initialised CLIP, for tests and the demo (no download).

  Defaults (`TINY_DEFAULTS`): 64 px, patch 8 (8x8 grid), both towers width 64,
  4 layers, 4 heads, MLP 256; context 77; projection 64; quick_gelu; the real
  CLIP vocabulary size 49408 so the shipped tokenizer works.

  `init_scale` (default 10) multiplies the attention and MLP kernels of both
  towers. Flax CLIP initialises them with std 0.01, which makes random blocks
  nearly the identity: tokens of different layers and images then barely
  differ (cosine ~0.9998 between layer 1 and 4 on BUSI) and a tiny model
  carries no usable information. x10 makes the blocks mix.

  Args:
    seed: initialisation seed.
    **overrides: any `tiny_config` setting (image_size, patch_size,
      vision_width, vision_layers, vision_heads, vision_mlp_dim, text_width,
      text_layers, text_heads, text_mlp_dim, context_length, projection_dim,
      vocab_size, hidden_act), plus init_scale and dtype.

  Returns:
    A Backbone.
  """
  init_scale = overrides.pop("init_scale", 10.0)
  dtype = overrides.pop("dtype", jnp.float32)
  return from_config(
      tiny_config(**overrides), seed=seed, init_scale=init_scale, dtype=dtype
  )


# Loading real weights. ------------------------------------------------------


def default_cache_dir() -> str:
  """Where converted weights are cached: $ULTRAAD_CACHE/clip or ~/.cache."""
  root = os.environ.get("ULTRAAD_CACHE")
  if root:
    return os.path.join(os.path.expanduser(root), "clip")
  return os.path.join(os.path.expanduser("~"), ".cache", "ultraad_jax", "clip")


def _download(repo_id: str) -> str:
  """Downloads a hub CLIP's config, weights and tokenizer files; its folder."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top

  def fetch(filename, required=False):
    try:
      return huggingface_hub.hf_hub_download(repo_id, filename)
    except errors.EntryNotFoundError as e:
      # Also raised offline for a file missing from the local hub cache.
      if required:
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} has no {filename} (or it is not in "
            f"the local hub cache while offline): {e}"
        ) from e
      return None

  try:
    folder = os.path.dirname(fetch("config.json", required=True))
    weights = None
    for name in (_FLAX_WEIGHTS,) + tuple(n for p in _PT_WEIGHTS for n in p):
      weights = fetch(name)
      if weights is None:
        continue
      if name.endswith(".index.json"):
        with open(weights, encoding="utf-8") as f:
          for shard in sorted(set(json.load(f)["weight_map"].values())):
            fetch(shard, required=True)
      break
    if weights is None:
      raise FileNotFoundError(
          f"Hub repository {repo_id!r} holds no {_FLAX_WEIGHTS}, "
          f"model.safetensors or pytorch_model.bin."
      )
    for name in _TOKENIZER_FILES:
      fetch(name)
  except FileNotFoundError:
    raise
  except Exception as e:  # Network, authentication, unknown repository.
    raise FileNotFoundError(
        f"Could not get {repo_id!r} from the Hugging Face hub ({e}). No local "
        f"folder of that name exists either. Download the checkpoint by hand "
        f"(config.json, model.safetensors or pytorch_model.bin, tokenizer "
        f"files) and pass its folder."
    ) from e
  return folder


def _resolve(name_or_path: str) -> tuple[str, str]:
  """A local folder for `name_or_path` and a display name for the cache."""
  if not isinstance(name_or_path, (str, os.PathLike)):
    raise TypeError(
        f"load expects a hub name or a folder path, got {name_or_path!r}."
    )
  name = os.fspath(name_or_path)
  if name.startswith("hf://"):
    repo_id = name[len("hf://") :]
    return _download(repo_id), repo_id.replace("/", "--")
  path = os.path.expanduser(name)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(
          f"{path} is a file; load expects the folder holding config.json and "
          f"the weights (e.g. {os.path.dirname(path) or '.'})."
      )
    if not os.access(path, os.R_OK | os.X_OK):
      raise PermissionError(f"Checkpoint folder {path} is not readable.")
    return os.path.abspath(path), os.path.basename(os.path.abspath(path))
  if _HUB_NAME.match(name):
    return _download(name), name.replace("/", "--")
  raise FileNotFoundError(
      f"Checkpoint folder {path} does not exist (and {name!r} is not a hub "
      f"name like 'openai/clip-vit-base-patch16')."
  )


def _read_config(folder: str) -> transformers.CLIPConfig:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: a CLIP checkpoint folder needs the Hugging Face "
        f"config.json next to its weights (files there: "
        f"{sorted(os.listdir(folder))[:20]})."
    )
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"Cannot read {path} as JSON: {e}") from e
  model_type = raw.get("model_type") if isinstance(raw, dict) else None
  if model_type != "clip":
    raise ValueError(
        f"{path} has model_type={model_type!r}, expected 'clip' (a Hugging "
        f"Face CLIPModel checkpoint with both towers; open_clip or vision-only "
        f"checkpoints are not supported)."
    )
  return transformers.CLIPConfig.from_dict(raw)


def _find_weights(folder: str) -> tuple[str, list[str]]:
  """('flax' | 'pt', weight files) for a checkpoint folder."""
  flax_path = os.path.join(folder, _FLAX_WEIGHTS)
  if os.path.isfile(flax_path):
    return "flax", [flax_path]
  for single, index in _PT_WEIGHTS:
    if os.path.isfile(os.path.join(folder, single)):
      return "pt", [os.path.join(folder, single)]
    index_path = os.path.join(folder, index)
    if os.path.isfile(index_path):
      with open(index_path, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      files = [os.path.join(folder, s) for s in shards]
      missing = [p for p in files if not os.path.isfile(p)]
      if missing:
        raise FileNotFoundError(
            f"{index_path} lists shards that are missing: {missing}."
        )
      return "pt", [index_path] + files
  raise FileNotFoundError(
      f"No weights in {folder}: expected {_FLAX_WEIGHTS}, model.safetensors or "
      f"pytorch_model.bin (or a sharded *.index.json); found "
      f"{sorted(os.listdir(folder))[:20]}."
  )


def _file_stamp(path: str) -> dict[str, Any]:
  stat = os.stat(path)
  return {
      "name": os.path.basename(path),
      "size": stat.st_size,
      "mtime_ns": stat.st_mtime_ns,
  }


def _cache_key(folder: str, files: list[str]) -> dict[str, Any]:
  return {
      "format": _CACHE_FORMAT,
      "transformers": transformers.__version__,
      "source": folder,
      "files": [_file_stamp(p) for p in [os.path.join(folder, "config.json")]]
      + [_file_stamp(p) for p in files],
  }


def _convert_pt(
    config: transformers.CLIPConfig, files: list[str]
) -> dict[str, Any]:
  """PyTorch-format weights -> Flax parameters, via transformers' mapping."""
  # Imported lazily: it imports torch when torch is installed (seconds).
  from transformers import modeling_flax_pytorch_utils as pt_utils

  state = {}
  for path in files:
    if path.endswith(".json"):
      continue
    try:
      if path.endswith(".safetensors"):
        import safetensors  # pylint: disable=g-import-not-at-top

        with safetensors.safe_open(path, framework="flax") as f:
          for key in f.keys():
            state[key] = f.get_tensor(key)
      else:
        import torch  # pylint: disable=g-import-not-at-top

        state.update(torch.load(path, map_location="cpu", weights_only=True))
    except ImportError as e:
      raise ImportError(
          f"Reading {path} needs PyTorch ({e}); install the torch pin from "
          f"requirements-dev.txt or use a model.safetensors checkpoint."
      ) from e
    except Exception as e:  # Truncated or foreign files.
      raise ValueError(f"Cannot read weights from {path}: {e}") from e

  if not state:
    raise ValueError(f"No tensors found in {files}.")

  # transformers' converter only needs the target shapes and the prefix; a
  # shape-only stand-in avoids initialising (and possibly keeping) random
  # weights for a large model.
  class _ShapesOnly:
    base_model_prefix = "clip"
    params = _abstract_params(config)

  try:
    return pt_utils.convert_pytorch_state_dict_to_flax(state, _ShapesOnly)
  except ValueError as e:
    raise ValueError(
        f"The weights in {os.path.dirname(files[0])} do not match its "
        f"config.json ({e}). Check that config.json belongs to these weights "
        f"(patch size, widths, layers)."
    ) from e


def _check_params(
    params: dict[str, Any], config: transformers.CLIPConfig, source: str
) -> dict[str, Any]:
  """Checks keys and shapes against the config; drops unused entries.

  Returns float32 JAX arrays in exactly the layout the config implies.
  """
  expected = flax.traverse_util.flatten_dict(_abstract_params(config))
  found = flax.traverse_util.flatten_dict(params)
  missing = sorted(".".join(k) for k in expected if k not in found)
  if missing:
    raise ValueError(
        f"Weights from {source} lack {len(missing)} parameter(s) the config "
        f"needs, e.g. {missing[:5]}. Refusing to fill them randomly: pass a "
        f"full CLIPModel checkpoint (both towers)."
    )
  for key, spec in expected.items():
    shape = tuple(np.shape(found[key]))
    if shape != tuple(spec.shape):
      raise ValueError(
          f"Weights from {source} do not match its config.json: "
          f"{'.'.join(key)} has shape {shape}, the config implies "
          f"{tuple(spec.shape)}. Check that config.json belongs to these "
          f"weights (patch size, widths, layers)."
      )
  extra = sorted(".".join(k) for k in found if k not in expected)
  if extra:
    logging.info(
        "Ignoring %d unused entries of %s: %s", len(extra), source, extra[:5]
    )
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(found[k], jnp.float32) for k in expected}
  )


def _load_converted(
    config: transformers.CLIPConfig,
    folder: str,
    files: list[str],
    entry: str,
) -> dict[str, Any]:
  """Checked, converted parameters; from the cache entry when it is current."""
  key = _cache_key(folder, files)
  key_path = os.path.join(entry, "source.json")
  weights_path = os.path.join(entry, _FLAX_WEIGHTS)
  try:
    with open(key_path, encoding="utf-8") as f:
      current = json.load(f) == key
  except (OSError, ValueError):
    current = False
  if current:
    try:
      with open(weights_path, "rb") as f:
        params = flax.serialization.msgpack_restore(f.read())
      logging.info("Loaded converted CLIP weights from %s", entry)
      return _check_params(params, config, entry)
    except Exception as e:  # A damaged entry is rebuilt, not trusted.
      logging.warning("Ignoring unreadable cache entry %s: %s", entry, e)

  start = time.time()
  params = _check_params(_convert_pt(config, files), config, folder)
  logging.info("Converted %s to Flax in %.1f s", folder, time.time() - start)
  try:
    os.makedirs(entry, exist_ok=True)
    # The key goes last and every file is replaced atomically, so a crash
    # mid-write leaves an entry that does not match and is rebuilt.
    if os.path.exists(key_path):
      os.remove(key_path)
    for name, data in (
        (
            _FLAX_WEIGHTS,
            flax.serialization.msgpack_serialize(
                jax.tree.map(np.asarray, params)
            ),
        ),
        ("config.json", config.to_json_string().encode()),
        ("source.json", json.dumps(key, indent=1).encode()),
    ):
      tmp = os.path.join(entry, f".{name}.tmp{os.getpid()}")
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, os.path.join(entry, name))
    logging.info("Cached converted weights in %s", entry)
  except OSError as e:
    logging.warning("Could not cache converted weights in %s: %s", entry, e)
  return params


def load(
    name_or_path: str,
    *,
    image_size: int | None = None,
    dtype=jnp.float32,
    activation: str | None = None,
    cache_dir: str | None = None,
) -> Backbone:
  """Loads pretrained CLIP weights as a Backbone.

  Args:
    name_or_path: a local Hugging Face CLIP folder (config.json plus
      flax_model.msgpack, model.safetensors or pytorch_model.bin), or a hub
      name ("openai/clip-vit-large-patch14-336", or "hf://..." to be
      explicit), which is downloaded. An existing folder always wins, and a
      path that cannot be a hub name (absolute, "./x", "~/x", three parts)
      never touches the network; write "./org/name" for a relative folder
      that must not be mistaken for a hub name.
    image_size: input size; if it differs from the checkpoint's, the position
      embeddings are resized (see `set_image_size`).
    dtype: the computation dtype (parameters stay float32).
    activation: None keeps the checkpoint's hidden_act (quick_gelu for
      OpenAI's). A value (e.g. "gelu") overrides it in both towers, with a
      warning.
    cache_dir: where converted PyTorch weights are cached (see the module
      docstring); default `default_cache_dir()`.

  Returns:
    A Backbone with the checkpoint's parameters.

  Raises:
    FileNotFoundError: missing folder, config.json or weights.
    ValueError: a config that is not CLIP's, weights that do not match the
      config, or an unknown activation.
  """
  folder, display = _resolve(name_or_path)
  config = _read_config(folder)
  kind, files = _find_weights(folder)
  if kind == "flax":
    try:
      with open(files[0], "rb") as f:
        params = flax.serialization.msgpack_restore(f.read())
    except Exception as e:
      raise ValueError(f"Cannot read Flax weights {files[0]}: {e}") from e
    if set(params) == {"params"}:
      params = params["params"]
    params = _check_params(params, config, files[0])
  else:
    digest = hashlib.sha1(folder.encode()).hexdigest()[:10]
    safe = re.sub(r"[^\w.-]+", "_", display).strip("._") or "clip"
    entry = os.path.join(cache_dir or default_cache_dir(), f"{safe}-{digest}")
    params = _load_converted(config, folder, files, entry)

  if activation is not None:
    if activation not in ACT2FN:
      raise ValueError(
          f"Unknown activation {activation!r}; expected one of "
          f"{sorted(ACT2FN)}."
      )
    was = config.vision_config.hidden_act
    if activation != was or activation != config.text_config.hidden_act:
      logging.warning(
          "Overriding the checkpoint's hidden_act %r with %r in both towers. "
          "The weights were trained with %r; several PyTorch peers (MVFA, "
          "APRIL-GAN) silently made this change when changing the input size, "
          "which alters every feature.",
          was,
          activation,
          was,
      )
    config = copy.deepcopy(config)
    config.vision_config.hidden_act = activation
    config.text_config.hidden_act = activation

  if image_size is not None:
    params, config = set_image_size(params, config, image_size)

  has_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer.json")) or all(
      os.path.isfile(os.path.join(folder, n))
      for n in ("vocab.json", "merges.txt")
  )
  return Backbone(
      config=config,
      params=params,
      dtype=dtype,
      tokenizer_source=folder if has_tokenizer else None,
  )
