"""Baselines evaluated in the same harness and on the same episodes.

* zero_shot: hand-written prompt ensembles, no training (WinCLIP-like, with
  the tapped patch tokens instead of windows): the map is the text-patch
  softmax per layer, combined like the model's; the image score is the
  global-token prompt probability; classes from the global token against
  normal / benign / malignant prompt ensembles.
* patch_memory: the few-shot normal patch memory map alone (no text); the
  image score is the map's maximum.
* linear_probe: multinomial logistic regression on the standardised global
  embeddings of the support set, fitted by a fixed number of full-batch Adam
  steps (no early stopping, nothing chosen on test data); image score
  1 - P(normal).
* center_prior: the mean support mask as every query's map; constant image
  score. BUSI lesions sit near the image centre, so a data-free centre map
  already reaches pixel AUROC ~0.78 at 96 px: pixel AUROC means little unless
  reported beside this number.

All are pure functions of arrays (vmap over episodes works); the host-side
work (tokenizing prompts) happens in `zero_shot_text`, whose output the model
keeps in its frozen state.
"""

import jax
import jax.numpy as jnp
import optax

from ultraad_jax import maps
from ultraad_jax import prompts

NAMES = ("zero_shot", "patch_memory", "linear_probe", "center_prior")

ZERO_SHOT_TEMPLATES = (
    "a photo of {}.",
    "an ultrasound image of {}.",
    "a breast ultrasound image of {}.",
    "a cropped ultrasound scan showing {}.",
)
ANOMALY_STATES = (
    (
        "normal breast tissue",
        "healthy breast tissue",
        "breast tissue without a lesion",
    ),
    (
        "a breast lesion",
        "a breast tumor",
        "abnormal breast tissue with a mass",
    ),
)
CLASS_STATES = (
    ANOMALY_STATES[0],
    (
        "a benign breast lesion",
        "a benign oval circumscribed breast mass",
        "a benign breast tumor",
    ),
    (
        "a malignant breast lesion",
        "a malignant irregular spiculated breast mass",
        "breast cancer",
    ),
)


def zero_shot_text(backbone, clip_params) -> tuple[jax.Array, jax.Array]:
  """Ensembled zero-shot text features.

  Each state's features are the renormalised mean of its L2-normalised
  template x phrase embeddings (the CLIP prompt-ensembling recipe).

  Args:
    backbone: the clip.Backbone.
    clip_params: its frozen parameters.

  Returns:
    ([2, D] normal/abnormal, [3, D] normal/benign/malignant), L2-normalised.
  """
  groups = list(ANOMALY_STATES) + list(CLASS_STATES)
  texts = [t.format(s) for g in groups for s in g for t in ZERO_SHOT_TEMPLATES]
  ids = prompts.trim_ids(backbone, backbone.tokenize(texts))
  feats = maps.l2_normalize(
      backbone.encode_text(jax.lax.stop_gradient(clip_params), ids)
  )
  out, start = [], 0
  for g in groups:
    n = len(g) * len(ZERO_SHOT_TEMPLATES)
    out.append(maps.l2_normalize(jnp.mean(feats[start : start + n], axis=0)))
    start += n
  out = jax.lax.stop_gradient(jnp.stack(out))
  return out[:2], out[2:]


def zero_shot(
    query_global: jax.Array,
    query_patches: jax.Array,
    anomaly_text: jax.Array,
    class_text: jax.Array,
    *,
    temperature: float,
    image_size: int,
    layer_combine: str = "mean",
    smoothing_sigma: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-free prompt baseline.

  Args:
    query_global: [B, D] global embeddings.
    query_patches: [L, B, N, D] projected patch tokens.
    anomaly_text: [2, D] from `zero_shot_text`.
    class_text: [3, D] from `zero_shot_text`.
    temperature: softmax temperature.
    image_size: map side.
    layer_combine: "mean" or "max".
    smoothing_sigma: Gaussian sigma in pixels (0: none).

  Returns:
    (maps [B, H, W], image scores [B], class probabilities [B, 3]).
  """
  z = maps.text_logits(query_patches, anomaly_text, temperature)
  layer_maps = jax.nn.sigmoid(maps.upsample(z, image_size))
  out = maps.combine_layers(layer_maps, layer_combine)
  out = jnp.clip(maps.gaussian_smooth(out, smoothing_sigma), 0.0, 1.0)
  g = maps.l2_normalize(query_global.astype(jnp.float32))
  cos = g @ anomaly_text.T
  score = jax.nn.sigmoid((cos[:, 1] - cos[:, 0]) / temperature)
  class_probs = jax.nn.softmax(g @ class_text.T / temperature, axis=-1)
  return out, score, class_probs


def patch_memory(
    query_patches: jax.Array,
    memory: jax.Array,
    keep: jax.Array,
    *,
    image_size: int,
    smoothing_sigma: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Normal patch memory map alone.

  Args:
    query_patches: [L, B, N, D] projected patch tokens.
    memory: [L, S, N, D] L2-normalised support patch tokens.
    keep: [S] or [B, S] bool, the usable (normal) support samples.
    image_size: map side.
    smoothing_sigma: Gaussian sigma in pixels (0: none).

  Returns:
    (maps [B, H, W] in [0, 1], image scores [B] = max of each map).
  """
  dist = maps.memory_distance(query_patches, memory, keep)
  out = maps.upsample(dist, image_size)
  out = jnp.clip(maps.gaussian_smooth(out, smoothing_sigma), 0.0, 1.0)
  return out, maps.image_score(out, "max")


def _standardise(x, mean, std):
  return (maps.l2_normalize(x.astype(jnp.float32)) - mean) / std


def linear_probe_fit(
    embeds: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int = 3,
    steps: int = 300,
    lr: float = 0.01,
    l2: float = 1e-3,
):
  """Fits a multinomial logistic probe with a fixed full-batch schedule.

  Features are L2-normalised, then standardised with the support's own
  per-dimension mean and std (CLIP embeddings share a large common
  component). Loss: mean cross-entropy + l2 * |W|^2; Adam, `steps` steps.

  Args:
    embeds: [S, D] support global embeddings.
    labels: [S] int labels.
    num_classes: K.
    steps: optimisation steps (static).
    lr: Adam learning rate.
    l2: weight decay coefficient on W.

  Returns:
    A dict {"w": [D, K], "b": [K], "mean": [D], "std": [D]}.
  """
  x0 = maps.l2_normalize(embeds.astype(jnp.float32))
  mean = jnp.mean(x0, axis=0)
  std = jnp.std(x0, axis=0) + 1e-6
  x = (x0 - mean) / std
  y = jax.nn.one_hot(labels, num_classes)
  params = {
      "w": jnp.zeros((x.shape[-1], num_classes), jnp.float32),
      "b": jnp.zeros((num_classes,), jnp.float32),
  }
  opt = optax.adam(lr)

  def loss(p):
    logp = jax.nn.log_softmax(x @ p["w"] + p["b"])
    return -jnp.mean(jnp.sum(y * logp, -1)) + l2 * jnp.sum(p["w"] ** 2)

  def step(_, carry):
    p, s = carry
    grads = jax.grad(loss)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
  return {**params, "mean": mean, "std": std}


def linear_probe(
    query_global: jax.Array,
    support_global: jax.Array,
    support_labels: jax.Array,
    *,
    steps: int = 300,
    lr: float = 0.01,
    l2: float = 1e-3,
) -> tuple[jax.Array, jax.Array]:
  """Linear probe baseline: fit on the support set, apply to the queries.

  Args:
    query_global: [B, D].
    support_global: [S, D].
    support_labels: [S] int in {0, 1, 2}.
    steps: Adam steps (fixed schedule).
    lr: learning rate.
    l2: weight decay.

  Returns:
    (class probabilities [B, 3], image scores [B] = 1 - P(normal)).
  """
  p = linear_probe_fit(
      support_global, support_labels, steps=steps, lr=lr, l2=l2
  )
  return linear_probe_apply(p, query_global)


def linear_probe_apply(probe, query_global: jax.Array):
  """Applies a fitted probe (linear_probe_fit) to query embeddings.

  Args:
    probe: the dict returned by linear_probe_fit.
    query_global: [B, D].

  Returns:
    (class probabilities [B, 3], image scores [B] = 1 - P(normal)).
  """
  x = _standardise(query_global, probe["mean"], probe["std"])
  probs = jax.nn.softmax(x @ probe["w"] + probe["b"], axis=-1)
  return probs, 1.0 - probs[:, 0]


def center_prior(
    support_masks: jax.Array,
    batch: int,
    mask_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The mean support mask as every query's map.

  Args:
    support_masks: [S, H, W] masks in {0, 1}.
    batch: B, the number of queries.
    mask_valid: optional [S] bool, samples whose mask is known.

  Returns:
    (maps [B, H, W] in [0, 1], image scores [B], all equal).
  """
  m = support_masks.astype(jnp.float32)
  if mask_valid is None:
    prior = jnp.mean(m, axis=0)
  else:
    w = mask_valid.astype(jnp.float32)
    prior = jnp.einsum("s,shw->hw", w, m) / jnp.maximum(jnp.sum(w), 1.0)
  out = jnp.broadcast_to(prior, (batch,) + prior.shape)
  return out, maps.image_score(out, "max")
