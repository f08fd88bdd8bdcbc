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

import functools

import jax
import jax.numpy as jnp

from ultraad_jax import chunking
from ultraad_jax import maps


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


def _map_terms(logits, targets):
  """Per-pixel 1 - p_t, BCE and sigmoid, from logits (stable for any logit)."""
  s = jax.nn.sigmoid(logits)
  bce = bce_with_logits_elementwise(logits, targets)
  # 1 - p_t for soft targets, without a 1 - p cancellation.
  one_minus_pt = targets * jax.nn.sigmoid(-logits) + (1.0 - targets) * s
  return one_minus_pt, bce, s


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
  one_minus_pt, bce, _ = _map_terms(logits, targets.astype(logits.dtype))
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
  return weighted_mean(_dice_terms(p, y, smooth)[0], weights)


def _dice_terms(p, y, smooth):
  """Per-sample 1 - dice of [B, P] rows, with |P.Y| and |P| + |Y| + s."""
  inter = jnp.sum(p * y, axis=-1)
  denom = jnp.sum(p, axis=-1) + jnp.sum(y, axis=-1) + smooth
  return 1.0 - (2.0 * inter + smooth) / denom, inter, denom


def _weight_coefficients(weights):
  """d weighted_mean / d value_b, as in `weighted_mean`."""
  total = jnp.sum(weights)
  return weights / jnp.maximum(total, 1e-12) * (total > 0)


def _map_losses_fwd(logits, targets, focal_weights, dice_weights, gamma,
                    smooth):  # fmt: skip
  b = logits.shape[0]
  z = logits.reshape(b, -1)
  y = targets.astype(z.dtype).reshape(b, -1)
  q, bce, s = _map_terms(z, y)
  focal_b = jnp.mean(q**gamma * bce, axis=-1)
  dice_b, inter, denom = _dice_terms(s, y, smooth)
  out = (weighted_mean(focal_b, focal_weights),
         weighted_mean(dice_b, dice_weights))  # fmt: skip
  return out, (logits, targets, focal_weights, dice_weights, inter, denom)


def _map_losses_bwd(gamma, smooth, res, cotangents):
  logits, targets, focal_weights, dice_weights, inter, denom = res
  d_focal, d_dice = cotangents
  b = logits.shape[0]
  z = logits.reshape(b, -1)
  y = targets.astype(z.dtype).reshape(b, -1)
  q, bce, s = _map_terms(z, y)
  # Per-sample factors: the weighted means and the pixel mean (focal), and
  # d(1 - dice_b)/d(inter_b), d(1 - dice_b)/d(sum of s) (dice).
  cf = (d_focal * _weight_coefficients(focal_weights) / z.shape[-1])[:, None]
  cd = d_dice * _weight_coefficients(dice_weights)
  d_inter = (cd * -2.0 / denom)[:, None]
  d_sum = (cd * (2.0 * inter + smooth) / denom**2)[:, None]
  ds_dz = s * (1.0 - s)
  # d/dz [q^g bce] = g q^(g-1) (1 - 2y) s (1 - s) bce + q^g (s - y).
  d_el = q**gamma * (s - y)
  if gamma != 0:
    safe = jnp.where(q > 0, q, 1.0)
    d_el += (
        jnp.where(q > 0, gamma * safe ** (gamma - 1.0), 0.0)
        * (1.0 - 2.0 * y)
        * ds_dz
        * bce
    )
  dz = cf * d_el + (d_inter * y + d_sum) * ds_dz
  return (dz.reshape(logits.shape).astype(logits.dtype),
          jnp.zeros_like(targets), jnp.zeros_like(focal_weights),
          jnp.zeros_like(dice_weights))  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _map_losses(logits, targets, focal_weights, dice_weights, gamma, smooth):
  return _map_losses_fwd(logits, targets, focal_weights, dice_weights, gamma,
                         smooth)[0]  # fmt: skip


_map_losses.defvjp(_map_losses_fwd, _map_losses_bwd)


def map_losses(
    logits: jax.Array,
    targets: jax.Array,
    *,
    gamma: float = 2.0,
    focal_weights: jax.Array,
    dice_weights: jax.Array,
    smooth: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Focal loss from logits and dice loss on their sigmoid, fused.

  Equal to `focal_loss_with_logits(logits, ...)` and
  `dice_loss(sigmoid(logits), ...)`, but with a hand-written gradient: the
  automatic one of the two losses walks the full-resolution maps a dozen
  times (each intermediate of the elementwise chain is saved and re-read),
  which made them the largest memory cost of the training step. Here the
  forward pass keeps only per-sample sums, and the backward pass recomputes
  the elementwise terms in one fused pass.

  Args:
    logits: [B, ...] abnormality logits.
    targets: [B, ...] targets in [0, 1] (no gradient).
    gamma: focal exponent (static).
    focal_weights: [B] sample weights of the focal term (no gradient).
    dice_weights: [B] sample weights of the dice term (no gradient).
    smooth: dice smoothing (static).

  Returns:
    (focal, dice) scalars.
  """
  return _map_losses(logits, targets.astype(logits.dtype),
                     focal_weights.astype(logits.dtype),
                     dice_weights.astype(logits.dtype), float(gamma),
                     float(smooth))  # fmt: skip


# Elements of the largest intermediate (the full-resolution maps of all
# layers and samples) `upsampled_map_losses` lets one pass hold when it is
# vmapped over episodes: 4 ViT-B/16 episodes (4 layers, 12 samples, 224^2).
# On the 2-core development machine, 64 such episodes took 1.7 s for the map
# losses' value and gradient 4 at a time against 3.0 s all at once
# (docs/PERFORMANCE.md, round 4); 2 and 8 at a time were slower than 4.
MAP_LOSS_CHUNK_ELEMENTS = 1 << 24


def _upsampled_reference(grid_logits, targets, focal_weights, dice_weights,
                         gamma, smooth):  # fmt: skip
  upsampled = maps.upsample(grid_logits, targets.shape[-1])
  return jax.vmap(
      lambda z: _map_losses(z, targets, focal_weights, dice_weights, gamma,
                            smooth)  # fmt: skip
  )(upsampled)


def _value_and_partials(grid_logits, targets, focal_weights, dice_weights,
                        gamma, smooth):  # fmt: skip
  """Per-layer (focal, dice) and their gradients w.r.t. the grid logits."""

  def losses_of(g):
    return _upsampled_reference(g, targets, focal_weights, dice_weights,
                                gamma, smooth)  # fmt: skip

  (focal, dice), vjp = jax.vjp(losses_of, grid_logits)
  # Layer l's losses depend on layer l's logits only, so a cotangent of ones
  # over the layers gives every layer's partial derivatives in one pass.
  ones, zeros = jnp.ones_like(focal), jnp.zeros_like(focal)
  (d_focal,) = vjp((ones, zeros))
  (d_dice,) = vjp((zeros, ones))
  return focal, dice, d_focal, d_dice


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _upsampled_map_losses(grid_logits, targets, focal_weights, dice_weights,
                          gamma, smooth, chunk_elements):  # fmt: skip
  del chunk_elements  # Used by the forward rule only.
  return _upsampled_reference(grid_logits, targets, focal_weights,
                              dice_weights, gamma, smooth)  # fmt: skip


def _upsampled_map_losses_fwd(grid_logits, targets, focal_weights,
                              dice_weights, gamma, smooth,
                              chunk_elements):  # fmt: skip
  num_layers, batch = grid_logits.shape[:2]
  item_elements = num_layers * batch * targets.shape[-2] * targets.shape[-1]
  fn = chunking.chunked_vmap(
      lambda g, y, fw, dw: _value_and_partials(g, y, fw, dw, gamma, smooth),
      item_elements,
      chunk_elements,
  )
  focal, dice, d_focal, d_dice = fn(grid_logits, targets, focal_weights,
                                    dice_weights)  # fmt: skip
  return (focal, dice), (d_focal, d_dice)


def _upsampled_map_losses_bwd(gamma, smooth, chunk_elements, res,
                              cotangents):  # fmt: skip
  del gamma, smooth, chunk_elements
  d_focal, d_dice = res
  ct_focal, ct_dice = cotangents
  d_grid = (ct_focal[:, None, None] * d_focal
            + ct_dice[:, None, None] * d_dice)  # fmt: skip
  return d_grid, None, None, None


_upsampled_map_losses.defvjp(_upsampled_map_losses_fwd,
                             _upsampled_map_losses_bwd)  # fmt: skip


def upsampled_map_losses(
    grid_logits: jax.Array,
    targets: jax.Array,
    *,
    gamma: float = 2.0,
    focal_weights: jax.Array,
    dice_weights: jax.Array,
    smooth: float = 1.0,
    chunk_elements: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`map_losses` of each layer's logits, bilinearly upsampled to the masks.

  The value is that of `maps.upsample` followed by `map_losses` on each
  layer. The gradient is computed with the value, in the forward pass, at
  once for the focal and the dice term of every layer: the full-resolution
  maps then exist only inside that pass and are never kept for the backward
  pass (which only scales the saved grid-sized partials by the cotangents).
  Vmapped over episodes, the pass runs a few episodes at a time
  (`chunking.chunked_vmap`), so that its maps stay in cache on CPU.

  The forward pass always pays for the gradient: use this for training
  losses, and `map_losses` where only the value is needed.

  Args:
    grid_logits: [L, B, N] patch-grid logits (N = g * g, row-major).
    targets: [B, H, W] targets in [0, 1] (no gradient); H = W.
    gamma: focal exponent (static).
    focal_weights: [B] sample weights of the focal term (no gradient).
    dice_weights: [B] sample weights of the dice term (no gradient).
    smooth: dice smoothing (static).
    chunk_elements: elements of the full-resolution maps one pass may hold
      when vmapped (static; default MAP_LOSS_CHUNK_ELEMENTS).

  Returns:
    (focal [L], dice [L]).
  """
  dtype = grid_logits.dtype
  if chunk_elements is None:
    chunk_elements = MAP_LOSS_CHUNK_ELEMENTS
  return _upsampled_map_losses(grid_logits, targets.astype(dtype),
                               focal_weights.astype(dtype),
                               dice_weights.astype(dtype), float(gamma),
                               float(smooth), int(chunk_elements))  # fmt: skip


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
