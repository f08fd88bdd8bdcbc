"""Prompt-patch fusion and per-layer patch adapters (the localization head).

UltraAD integrates the image-informed prompt feature with the patch tokens of
the tapped layers to refine local representations; the operator is not
published. Two reconstructions, chosen by `mode`:

* "cross_attention" (default): each patch token attends to the two
  [normal, abnormal] prompt features of its query image (single head, inner
  width D / reduction) and the attended value is added back (residual):
  p' = p + Wo softmax(q(p) k(t)^T / sqrt(d)) v(t).
* "gated": p' = p + sigmoid(g) * (W s + b), where s is the prompt features
  weighted by the patch's own softmax over cosine similarities to them (the
  same softmax the maps use) and g a per-layer, per-channel gate.
* "none": no fusion (an ablation: adapters only).

Before fusion each layer's tokens pass an MVFA-style residual adapter,
x' = a * x + (1 - a) * MLP(x), MLP a bottleneck D -> D / r -> D.

Scale convention: every head works in "RMS space": features are L2-normalised
and multiplied by sqrt(D), so components are O(1) whatever the backbone (a
random tiny CLIP and ViT-L/14 have very different token norms), and standard
1/sqrt(fan_in) initialisations behave. The last layer of each residual branch
starts at `init_scale` times that initialisation, so the head starts close to
plain CLIP similarities but every weight receives gradient from step one.

Parameters of all layers are stacked on a leading [L] axis and applied with
vmap, so the head costs one fused program regardless of the layer count.
"""

import jax
import jax.numpy as jnp

FUSION_MODES = ("cross_attention", "gated", "none")


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """L2-normalises the last axis and scales it to norm sqrt(D)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x * (jnp.sqrt(float(x.shape[-1])) / jnp.maximum(norm, eps))


def dense_init(rng, fan_in: int, fan_out: int, scale: float = 1.0):
  """A [fan_in, fan_out] kernel with std scale / sqrt(fan_in)."""
  return jax.random.normal(rng, (fan_in, fan_out), jnp.float32) * (
      scale / jnp.sqrt(float(fan_in))
  )


def bottleneck_init(
    rng, dim: int, hidden: int, out: int, out_scale: float
) -> dict[str, jax.Array]:
  """Parameters of a 2-layer MLP dim -> hidden -> out (GELU)."""
  k1, k2 = jax.random.split(rng)
  return {
      "w1": dense_init(k1, dim, hidden),
      "b1": jnp.zeros((hidden,), jnp.float32),
      "w2": dense_init(k2, hidden, out, out_scale),
      "b2": jnp.zeros((out,), jnp.float32),
  }


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, M], with a hand-written backward pass.

  Autodiff's weight gradient is a dot that contracts x and dy over all
  their rows. Inside the vmapped train step XLA:CPU fed it dy written out
  transposed by the fusion that computes dy, a strided write that took 17 %
  of the ViT-B/16 step (docs/PERFORMANCE.md). Written as x^T @ dy on the
  flattened rows, the same product gets dy in its natural layout.
  """
  return x @ w


def _dense_fwd(x, w):
  return x @ w, (x, w)


def _dense_bwd(res, dy):
  x, w = res
  rows_x = x.reshape((-1, x.shape[-1]))
  rows_dy = dy.reshape((-1, dy.shape[-1]))
  return dy @ w.T, rows_x.T @ rows_dy


dense.defvjp(_dense_fwd, _dense_bwd)


def bottleneck_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """The 2-layer MLP of `bottleneck_init` on [..., dim]."""
  h = jax.nn.gelu(x @ params["w1"] + params["b1"])
  # Only the second layer needs `dense`: the first layer's weight gradient
  # got no faster with it.
  return dense(h, params["w2"]) + params["b2"]


def _stacked(init_one, rng, num_layers: int):
  return jax.vmap(init_one)(jax.random.split(rng, num_layers))


def adapter_init(
    rng, *, num_layers: int, dim: int, reduction: int, init_scale: float
) -> dict[str, jax.Array]:
  """Per-layer adapter parameters, stacked on a leading [L] axis.

  Args:
    rng: a JAX random key.
    num_layers: L, the number of tapped layers.
    dim: D, the patch token width.
    reduction: r; the hidden width is max(1, D // r).
    init_scale: scale of the adapter's output layer at init.

  Returns:
    {"w1": [L, D, D/r], "b1": [L, D/r], "w2": [L, D/r, D], "b2": [L, D]}.
  """
  hidden = max(1, dim // reduction)
  return _stacked(
      lambda k: bottleneck_init(k, dim, hidden, dim, init_scale),
      rng,
      num_layers,
  )


def adapter_apply(params, x: jax.Array, residual: float) -> jax.Array:
  """x' = a * x + (1 - a) * MLP_l(x) per layer.

  Args:
    params: from `adapter_init`.
    x: [L, B, N, D] patch tokens in RMS space.
    residual: a, the weight of the untouched tokens.

  Returns:
    [L, B, N, D].
  """
  out = jax.vmap(bottleneck_apply)(params, x)
  return residual * x + (1.0 - residual) * out


def init(
    rng,
    *,
    mode: str,
    num_layers: int,
    dim: int,
    reduction: int,
    init_scale: float,
) -> dict[str, jax.Array]:
  """Per-layer fusion parameters, stacked on a leading [L] axis.

  Args:
    rng: a JAX random key.
    mode: one of FUSION_MODES.
    num_layers: L.
    dim: D, the joint embedding width (patch tokens and prompt features).
    reduction: the attention width is max(1, D // reduction)
      ("cross_attention" only).
    init_scale: scale of the output projection at init.

  Returns:
    A dict of arrays (empty for "none").
  """
  if mode == "none":
    return {}
  if mode == "cross_attention":
    inner = max(1, dim // reduction)

    def one(k):
      kq, kk, kv, ko = jax.random.split(k, 4)
      return {
          "wq": dense_init(kq, dim, inner),
          "wk": dense_init(kk, dim, inner),
          "wv": dense_init(kv, dim, inner),
          "wo": dense_init(ko, inner, dim, init_scale),
          "bo": jnp.zeros((dim,), jnp.float32),
      }

    return _stacked(one, rng, num_layers)
  if mode == "gated":

    def one(k):
      return {
          "w": dense_init(k, dim, dim, init_scale),
          "b": jnp.zeros((dim,), jnp.float32),
          "gate": jnp.zeros((dim,), jnp.float32),
      }

    return _stacked(one, rng, num_layers)
  raise ValueError(f"fusion={mode!r}; expected one of {FUSION_MODES}.")


def _project(x, w):
  return jnp.stack(
      [jnp.sum(x * w[..., None, :, c], axis=-1) for c in range(w.shape[-1])],
      axis=-1,
  )


def _combine(a, v):
  return sum(a[..., c : c + 1] * v[..., None, c, :] for c in range(a.shape[-1]))


def _outer_sum(x, y):
  """sum_n x[..., n, i] y[..., n, c] -> [..., I, C], one reduction per c."""
  return jnp.stack(
      [jnp.sum(x * y[..., c : c + 1], axis=-2) for c in range(y.shape[-1])],
      axis=-1,
  )


@jax.custom_vjp
def project(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., N, D] @ w [..., D, C] for a handful of columns C (e.g. 2).

  XLA:CPU runs products this narrow as dots that use a sliver of each
  vector register, and their gradients as dots that contract over N after
  transposing x in memory; written as C fused multiply-reduce passes (and
  the same in the hand-written backward pass) they were 1.3x (forward) and
  7x (weight gradient) faster at ViT-B/16 sizes (docs/PERFORMANCE.md).
  """
  return _project(x, w)


def _project_fwd(x, w):
  return _project(x, w), (x, w)


def _project_bwd(res, dy):
  x, w = res
  return _combine(dy, jnp.swapaxes(w, -1, -2)), _outer_sum(x, dy)


project.defvjp(_project_fwd, _project_bwd)


@jax.custom_vjp
def combine(a: jax.Array, v: jax.Array) -> jax.Array:
  """a [..., N, C] @ v [..., C, D] for a handful of rows C; see `project`."""
  return _combine(a, v)


def _combine_fwd(a, v):
  return _combine(a, v), (a, v)


def _combine_bwd(res, dy):
  a, v = res
  return _project(dy, jnp.swapaxes(v, -1, -2)), jnp.swapaxes(
      _outer_sum(dy, a), -1, -2
  )


combine.defvjp(_combine_fwd, _combine_bwd)


def _cross_attention(p, x, prompts):
  """One layer: x [B, N, D] attends to prompts [B, C, D].

  With C = 2 keys per image, the products are reassociated so that nothing
  of the inner width is computed per patch: q(x) k^T = x (Wq k^T) and
  softmax(.) v Wo = softmax(.) (v Wo). Same function as the textbook form,
  with a fraction of its FLOPs and memory traffic; the two remaining
  per-patch products are C wide (`project`, `combine`).
  """
  k = prompts @ p["wk"]  # [B, C, K]
  vo = (prompts @ p["wv"]) @ p["wo"]  # [B, C, D]
  qk = jnp.einsum("dk,bck->bdc", p["wq"], k) / jnp.sqrt(float(k.shape[-1]))
  att = jax.nn.softmax(project(x, qk), axis=-1)  # [B, N, C]
  return x + combine(att, vo) + p["bo"]


def _gated(p, x, prompts, temperature):
  """One layer: gated residual of the similarity-weighted prompt feature."""
  # The adapter leaves x near, not at, norm sqrt(D): normalise for cosines.
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True),
                                   1e-6)  # fmt: skip
  cos = jnp.einsum("bnd,bcd->bnc", unit(x), unit(prompts))
  w = jax.nn.softmax(cos / temperature, axis=-1)
  s = jnp.einsum("bnc,bcd->bnd", w, prompts)
  return x + jax.nn.sigmoid(p["gate"]) * (s @ p["w"] + p["b"])


def apply(
    params,
    patches: jax.Array,
    prompts: jax.Array,
    *,
    mode: str,
    temperature: float,
) -> jax.Array:
  """Fuses per-query prompt features into every tapped layer's patch tokens.

  Args:
    params: from `init`.
    patches: [L, B, N, D] patch tokens in RMS space.
    prompts: [B, C, D] image-informed prompt features of each query
      (C = 2: normal, abnormal); normalised to RMS space here.
    mode: one of FUSION_MODES.
    temperature: the map temperature ("gated" weights the prompts with it).

  Returns:
    [L, B, N, D] fused tokens.
  """
  prompts = rms_normalize(prompts)
  if mode == "none":
    return patches
  if mode == "cross_attention":
    return jax.vmap(_cross_attention, in_axes=(0, 0, None))(
        params, patches, prompts
    )
  if mode == "gated":
    return jax.vmap(_gated, in_axes=(0, 0, None, None))(
        params, patches, prompts, temperature
    )
  raise ValueError(f"fusion={mode!r}; expected one of {FUSION_MODES}.")
