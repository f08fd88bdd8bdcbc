"""Tests of ultraad_jax/features.py and of the programs that read the cache.

The feature cache and the CLIP parameters are large and frozen. A jitted
function that closes over them, instead of taking them as arguments, still
computes the right values, but XLA gets them as constants inside the
program: at ViT-B/16 that made a 690 MB program that took 15 s to compile,
once more for every call. So these tests check what the programs hold, not
only what they return: no large constant in the lowered program of the
backbone pass or of the episodes' initialisation, and the backbone pass
traced once across calls.
"""

import gc
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import engine_helpers
from configs import common
from ultraad_jax import clip
from ultraad_jax import features
from ultraad_jax import model
from ultraad_jax import train

LAYERS = (1, 2)
# The largest constant a program may hold (elements): index tables and
# masks of a few rows pass, a weight matrix of the tiny CLIP (64 x 64) does
# not.
MAX_CONSTANT = 1024

_CONSTANT = re.compile(
    r"stablehlo\.constant dense(?:_resource)?<[^>]*> : tensor<([^>]*)>"
)


def largest_constant(lowered):
  """Elements of the largest constant in a lowered program's StableHLO.

  Args:
    lowered: a `jax.jit(...).lower(...)` result.

  Returns:
    The element count of its largest constant tensor (0 without any).
  """
  largest = 0
  for shape in _CONSTANT.findall(lowered.as_text()):
    dims = shape.split("x")[:-1]  # the last part is the element type
    largest = max(largest, int(np.prod([int(d) for d in dims])))
  return largest


@pytest.fixture(scope="module")
def backbone():
  return clip.tiny(image_size=32, seed=0)


@pytest.fixture(scope="module")
def pool(backbone):
  rng = np.random.default_rng(0)
  size = backbone.image_size
  images = rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8)
  masks = np.zeros((6, size, size), np.uint8)
  masks[3:, 8:20, 8:20] = 1
  return images, masks


def test_the_check_sees_closed_over_parameters(backbone, pool):
  # The bug these tests guard against, written on purpose: the check must
  # fail on it, or it proves nothing.
  params = jax.device_put(backbone.params)

  @jax.jit
  def closure(images):
    return backbone.encode_image(params, clip.normalize(images), LAYERS)

  assert largest_constant(closure.lower(pool[0])) > MAX_CONSTANT


def test_backbone_pass_takes_the_parameters_as_an_argument(backbone, pool):
  lowered = features.encode.lower(
      jax.device_put(backbone.params), pool[0], backbone=backbone,
      layers=LAYERS, store=jnp.dtype(jnp.float32),
  )  # fmt: skip
  assert largest_constant(lowered) <= MAX_CONSTANT


def _build(backbone, pool):
  images, masks = pool
  return features.build(
      backbone, jax.device_put(backbone.params), images, masks, None,
      np.zeros(len(images), bool), layers=LAYERS, num_views=1, batch_size=4,
  )  # fmt: skip


def test_cache_matches_the_backbone_and_is_traced_once(backbone, pool):
  first = _build(backbone, pool)  # 6 images in 2 batches: one padded
  with engine_helpers.compile_events() as events:
    second = _build(backbone, pool)
  assert not events, f"a second build traced or compiled again: {events}"
  want = backbone.encode_image(backbone.params, clip.normalize(pool[0]), LAYERS)
  for cache in (first, second):
    np.testing.assert_allclose(
        cache.global_embed, want.global_embed, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        cache.patch_tokens, want.patch_tokens, rtol=1e-5, atol=1e-6
    )
  np.testing.assert_array_equal(first.masks, pool[1])


def test_episode_init_takes_the_cache_as_an_argument(backbone, pool):
  cache = _build(backbone, pool)
  cfg = model.ModelConfig.from_dict(
      common.model_config(layers=LAYERS).to_dict()
  )
  tx = train.make_optimizer(common.get_base_config().train)
  num_episodes, support = 2, 4
  ep_data = {
      "rows": np.array([[0, 1, 3, 4], [1, 2, 4, 5]], np.int32),
      "labels": np.array([[0, 0, 1, 2], [0, 0, 1, 2]], np.int32),
      "group": np.tile(np.arange(support, dtype=np.int32), (num_episodes, 1)),
      "text_embed": np.ones(
          (num_episodes, support, backbone.embed_dim), np.float32
      ),
  }
  cache_arrays = (cache.global_embed, cache.patch_tokens, cache.masks)
  keys = jax.random.split(jax.random.key(0), num_episodes)
  init_all = jax.jit(train.make_init(cfg, backbone, tx))
  lowered = init_all.lower(keys, ep_data, cache_arrays, backbone.params)
  assert largest_constant(lowered) <= MAX_CONSTANT
  params, _, frozen = init_all(keys, ep_data, cache_arrays, backbone.params)
  # Each episode's state comes from its own support rows.
  one = model.frozen(
      cfg, backbone, backbone.params,
      train.gather_support(cache_arrays, jax.tree.map(lambda x: x[1],
                                                      ep_data)),
  )  # fmt: skip
  jax.tree.map(
      lambda got, want: np.testing.assert_allclose(
          got[1], want, rtol=1e-6, atol=1e-6
      ),
      frozen, one,
  )  # fmt: skip
  assert jax.tree.leaves(params)[0].shape[0] == num_episodes


def test_built_caches_keep_no_backbone_alive(pool):
  # jit holds its static arguments: a Backbone there would keep its weights.
  backbone = clip.tiny(image_size=32, seed=1)
  alive = weakref.ref(backbone)
  _build(backbone, pool)
  del backbone
  gc.collect()
  assert alive() is None
