"""Fixtures of the engine tests: the session's prepared phantom data, and a
real train step's inputs.

The environment itself (8 fake CPU devices, the compile cache) is set by the
repository's root conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import engine_helpers
from ultraad_jax import clip
from ultraad_jax import data as data_lib
from ultraad_jax import model
from ultraad_jax import train


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS folder holding both test phantoms, shared by xdist workers.

  Prepared up front (under the shared lock) so that parallel runs never
  prepare the same dataset at once.
  """

  def prepare(path):
    for options in (engine_helpers.PHANTOM, engine_helpers.CROSS_PHANTOM):
      data_lib.load("us_phantom", data_dir=str(path), **options)

  return engine_helpers.shared_path(tmp_path_factory, "tfds", prepare)


@pytest.fixture(scope="module")
def step_inputs():
  """A real train step's inputs: tiny CLIP, random cache, E = 4 episodes."""
  bb = clip.tiny()
  cfg = model.ModelConfig(layers=(1, 2, 3, 4))
  rng = np.random.default_rng(1)
  rows, e, s = 12, 4, 6
  n, d, size = bb.grid_size**2, bb.embed_dim, bb.image_size
  masks = np.zeros((rows, size, size), np.uint8)
  masks[4:, 16:40, 20:44] = 1
  cache = (
      jnp.asarray(rng.normal(size=(rows, d)), jnp.float32),
      jnp.asarray(rng.normal(size=(4, rows, n, d)), jnp.float32),
      jnp.asarray(masks),
  )
  labels = np.repeat(np.arange(3), 4).astype(np.int32)
  sup = np.stack([rng.permutation(rows)[:s] for _ in range(e)])
  ep_data = {
      "rows": jnp.asarray(sup, jnp.int32),
      "labels": jnp.asarray(labels[sup]),
      "group": jnp.tile(jnp.arange(s, dtype=jnp.int32), (e, 1)),
      "text_embed": jnp.asarray(rng.normal(size=(e, s, d)), jnp.float32),
  }
  # Plain SGD: the update is linear in the gradient, so states compare at
  # float precision (Adam's first step, lr * g / |g|, would magnify the
  # rounding of near-zero gradients).
  tx = train.optax.sgd(0.1)

  def init_one(key, ep):
    support = train.gather_support(cache, ep)
    p = model.init(key, cfg, bb, bb.params, support)
    return p, tx.init(p), model.frozen(cfg, bb, bb.params, support)

  keys = jax.random.split(jax.random.key(0), e)
  params, opt, frozen = jax.jit(jax.vmap(init_one))(keys, ep_data)
  state = {"params": params, "opt": opt, "step": jnp.zeros((), jnp.int32)}
  args = (state, ep_data, frozen, cache, bb.params, jax.random.key(3))
  return dict(bb=bb, cfg=cfg, tx=tx, args=args)
