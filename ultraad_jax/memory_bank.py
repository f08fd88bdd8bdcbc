"""The classification memory bank (Ft, Pt, Lt) and its mini-net.

Stated by UltraAD: a memory bank built from the S-shot, C-class support set
holds image token embeddings Ft, text embeddings Pt of per-sample descriptions
and one-hot labels Lt, preloaded from the frozen encoders; a small mini-net
maps the query embedding f to f'; the class score comes from the similarity
of f' to Ft and Pt combined through Lt; Pt stays frozen while image features
are adapted.

Reconstruction (Tip-Adapter's cache read-out):

  A(x) = exp(-beta * (1 - x)),  x = cosine similarity
  logits = scale * (R(A(f'.Ft)) + lambda * R(A(f'.Pt)))

where R is the class read-out through Lt: "sum" is Tip-Adapter's A @ Lt;
"mean" (default) divides each class's sum by its number of usable entries.
The mean keeps leave-one-out training unbiased: with the query's own entries
excluded, its true class has fewer entries than the others, and a sum would
penalise the true class for that alone. A class with no usable entry gets a
logit of -1e9 (finite, so softmax and cross-entropy stay NaN-free), i.e.
probability 0: the classifier then chooses among the classes present.

The mini-net is a residual bottleneck MLP in RMS space whose last layer starts
at zero, so f' = f at initialisation and training starts from the frozen
Tip-Adapter read-out. Ft is trainable or frozen (Tip-Adapter-F vs
Tip-Adapter) by configuration; Pt is never trainable: the model keeps it out
of the parameters and wraps it in stop_gradient.

Logits are sums over bank entries, so they do not depend on the order of the
support set (up to float rounding).
"""

import jax
import jax.numpy as jnp

from ultraad_jax import fusion
from ultraad_jax import maps

READOUTS = ("mean", "sum")
ABSENT_LOGIT = -1e9


def mininet_init(rng, *, dim: int, reduction: int) -> dict[str, jax.Array]:
  """Mini-net parameters; the output layer is zero so f' = f at init.

  Args:
    rng: a JAX random key.
    dim: D, the embedding width.
    reduction: the hidden width is max(1, D // reduction).

  Returns:
    {"w1": [D, H], "b1": [H], "w2": [H, D] (zeros), "b2": [D] (zeros)}.
  """
  return fusion.bottleneck_init(rng, dim, max(1, dim // reduction), dim, 0.0)


def mininet_apply(params, f: jax.Array) -> jax.Array:
  """f' = f + MLP(f) in RMS space.

  Args:
    params: from `mininet_init`.
    f: [B, D] query image embeddings (any scale).

  Returns:
    [B, D] adapted embeddings (compare them by cosine).
  """
  x = fusion.rms_normalize(f)
  return x + fusion.bottleneck_apply(params, x)


def affinity(queries: jax.Array, keys: jax.Array, beta: float) -> jax.Array:
  """A = exp(-beta * (1 - cos)) between [B, D] queries and [S, D] keys."""
  cos = maps.l2_normalize(queries) @ maps.l2_normalize(keys).T
  return jnp.exp(-beta * (1.0 - cos))


def logits(
    queries: jax.Array,
    image_keys: jax.Array,
    text_keys: jax.Array,
    onehot: jax.Array,
    *,
    beta: float,
    lam: float,
    scale: float,
    readout: str = "mean",
    exclude: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Class logits from the bank.

  Args:
    queries: [B, D] mini-net outputs f'.
    image_keys: [S, D] Ft.
    text_keys: [S, D] Pt (the caller stops its gradient).
    onehot: [S, K] Lt.
    beta: affinity sharpness.
    lam: weight of the text (Pt) term.
    scale: logit scale applied to the read-out.
    readout: "mean" or "sum" (see the module docstring).
    exclude: optional [B, S] bool; True removes entry s from query b's
      read-out (both the Ft and the Pt entry).

  Returns:
    (logits [B, K], counts [B, K]): counts are the usable entries per class
    for each query (0 means the class is absent and its logit is -1e9).
  """
  keep = jnp.ones((queries.shape[0], image_keys.shape[0]), jnp.float32)
  if exclude is not None:
    keep = keep * (1.0 - exclude.astype(jnp.float32))
  onehot = onehot.astype(jnp.float32)
  a_img = affinity(queries, image_keys, beta) * keep
  a_txt = affinity(queries, text_keys, beta) * keep
  read = a_img @ onehot + lam * (a_txt @ onehot)
  counts = keep @ onehot
  if readout == "mean":
    read = read / jnp.maximum(counts, 1.0)
  elif readout != "sum":
    raise ValueError(f"bank_readout={readout!r}; expected one of {READOUTS}.")
  out = jnp.where(counts > 0, scale * read, ABSENT_LOGIT)
  return out, counts
