"""Training losses: focal and dice on maps, BCE on scores, CE over classes.

All losses take per-sample weights so that samples without a mask, or queries
whose class has no bank entry left after leave-one-out exclusion, drop out
without Python control flow on traced values. A weighted mean over zero total
weight is 0 (not NaN), which is what makes a masked-out term harmless.

Numerics: the focal loss and the BCE work from logits (log-sigmoid via
softplus), so they stay finite for logits of any size; probabilities are only
used where a term is defined on them (dice, and the focal loss on a combined
map, whose probabilities are clipped).
"""

import jax
import jax.numpy as jnp


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Mean of `values` [B] with weights [B]; 0 when the weights sum to 0.

  Args:
    values: [B] per-sample losses.
    weights: [B] non-negative weights, or None for a plain mean.

  Returns:
    A scalar.
  """
  if weights is None:
    return jnp.mean(values)
  weights = weights.astype(values.dtype)
  total = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.maximum(total, 1e-12) * (total > 0)


def _per_sample(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def focal_loss_with_logits(
    logits: jax.Array,
    targets: jax.Array,
    *,
    gamma: float = 2.0,
    weights: jax.Array | None = None,
) -> jax.Array:
  """Binary focal loss (Lin et al. 2017) from logits, mean over pixels.

  loss = (1 - p_t)^gamma * BCE, with p_t the probability of the true label.
  Equals the 2-class softmax focal loss of the peers, since softmax over
  [normal, abnormal] logits is a sigmoid of their difference.

  Args:
    logits: [B, ...] abnormality logits.
    targets: [B, ...] targets in [0, 1] (masks).
    gamma: focusing parameter (0 gives BCE).
    weights: optional [B] sample weights.

  Returns:
    A scalar.
  """
  targets = targets.astype(logits.dtype)
  bce = bce_with_logits_elementwise(logits, targets)
  # 1 - p_t for soft targets, from sigmoids of +-logits (no 1 - p cancellation).
  one_minus_pt = targets * jax.nn.sigmoid(-logits) + (
      1.0 - targets
  ) * jax.nn.sigmoid(logits)
  loss = one_minus_pt**gamma * bce
  return weighted_mean(_per_sample(loss), weights)


def focal_loss_on_probs(
    probs: jax.Array,
    targets: jax.Array,
    *,
    gamma: float = 2.0,
    weights: jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
  """Binary focal loss on probabilities (for maps averaged over layers).

  Args:
    probs: [B, ...] probabilities in [0, 1].
    targets: [B, ...] targets in [0, 1].
    gamma: focusing parameter.
    weights: optional [B] sample weights.
    eps: probabilities are clipped to [eps, 1 - eps] before the log.

  Returns:
    A scalar.
  """
  targets = targets.astype(probs.dtype)
  p = jnp.clip(probs, eps, 1.0 - eps)
  loss = -(
      targets * (1.0 - p) ** gamma * jnp.log(p)
      + (1.0 - targets) * p**gamma * jnp.log1p(-p)
  )
  return weighted_mean(_per_sample(loss), weights)


def dice_loss(
    probs: jax.Array,
    targets: jax.Array,
    *,
    weights: jax.Array | None = None,
    smooth: float = 1.0,
) -> jax.Array:
  """Soft dice loss per sample, 1 - (2|P.Y| + s) / (|P| + |Y| + s).

  Args:
    probs: [B, ...] probabilities.
    targets: [B, ...] targets in [0, 1].
    weights: optional [B] sample weights (the model passes 0 for samples
      with an empty mask, where dice only measures the predicted area).
    smooth: additive smoothing.

  Returns:
    A scalar.
  """
  b = probs.shape[0]
  p = probs.reshape(b, -1)
  y = targets.astype(probs.dtype).reshape(b, -1)
  inter = jnp.sum(p * y, axis=-1)
  dice = (2.0 * inter + smooth) / (jnp.sum(p, -1) + jnp.sum(y, -1) + smooth)
  return weighted_mean(1.0 - dice, weights)


def bce_with_logits_elementwise(
    logits: jax.Array, targets: jax.Array
) -> jax.Array:
  """Elementwise binary cross-entropy from logits (stable for any logit)."""
  return jax.nn.softplus(logits) - targets * logits


def bce_with_logits(
    logits: jax.Array,
    targets: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
  """Binary cross-entropy from logits, weighted mean over samples.

  Args:
    logits: [B] logits.
    targets: [B] targets in [0, 1].
    weights: optional [B] sample weights.

  Returns:
    A scalar.
  """
  targets = targets.astype(logits.dtype)
  return weighted_mean(bce_with_logits_elementwise(logits, targets), weights)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
  """Softmax cross-entropy with integer labels, weighted mean over samples.

  Args:
    logits: [B, C]; entries may be very negative (absent classes) but finite.
    labels: [B] integer labels.
    weights: optional [B] sample weights.

  Returns:
    A scalar.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), -1)[:, 0]
  return weighted_mean(nll, weights)
