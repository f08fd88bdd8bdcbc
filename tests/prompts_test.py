"""Tests for the learnable prompts and the image-informed prompt feature."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultraad_jax import clip
from ultraad_jax import maps
from ultraad_jax import prompts

TEXTS = ("normal breast tissue.", "breast tissue with a lesion.")


@pytest.fixture(scope="module")
def bb():
  return clip.tiny()


def test_prompt_ids_layout(bb):
  ids, eot = prompts.build_prompt_ids(bb, TEXTS, n_ctx=5)
  words = [bb.tokenize(t)[0] for t in TEXTS]
  assert ids.shape == (2, int(eot.max()) + 1)
  for i, w in enumerate(words):
    k = int(bb.eot_positions(w[None])[0]) - 1  # class word tokens
    assert ids[i, 0] == clip.SOT_TOKEN_ID
    np.testing.assert_array_equal(ids[i, 6 : 6 + k], w[1 : 1 + k])
    assert eot[i] == 6 + k and ids[i, eot[i]] == clip.EOT_TOKEN_ID


def test_too_long_prompt_names_n_ctx(bb):
  with pytest.raises(ValueError, match="n_ctx=80"):
    prompts.build_prompt_ids(bb, TEXTS, n_ctx=80)


def test_context_init_from_template_and_random(bb):
  ctx = prompts.context_init(jax.random.key(0), bb, bb.params, n_ctx=6,
                             init_text="a photo of a", std=0.02,
                             n_sets=2)  # fmt: skip
  assert ctx.shape == (2, 6, bb.text_width)
  tmpl = bb.embed_tokens(bb.params, bb.tokenize("a photo of a"))[0, 1:5]
  np.testing.assert_allclose(ctx[:, 2:], jnp.broadcast_to(tmpl, (2, 4, 64)))
  assert 0.01 < float(jnp.std(ctx[:, :2])) < 0.04
  # A longer template keeps its last tokens.
  short = prompts.context_init(jax.random.key(0), bb, bb.params, n_ctx=2,
                               init_text="a photo of a", std=0.02,
                               n_sets=1)  # fmt: skip
  np.testing.assert_allclose(short[0], tmpl[2:])
  rand = prompts.context_init(jax.random.key(0), bb, bb.params, n_ctx=6,
                              init_text="random", std=0.02,
                              n_sets=1)  # fmt: skip
  assert not np.allclose(rand[0, 2:], tmpl)


def test_template_context_reproduces_the_hand_written_prompt(bb):
  """ctx = 'a photo of a' embeddings must encode like the full sentence."""
  ctx = prompts.context_init(jax.random.key(0), bb, bb.params, n_ctx=4,
                             init_text="a photo of a", std=0.02,
                             n_sets=1)  # fmt: skip
  ids, eot = prompts.build_prompt_ids(bb, TEXTS, n_ctx=4)
  emb = prompts.token_embeddings(bb, bb.params, ids)
  got = jax.jit(functools.partial(prompts.encode, bb))(
      bb.params, prompts.assemble(ctx, emb), jnp.asarray(eot)
  )
  want = bb.encode_text(bb.params, bb.tokenize([f"a photo of a {t}"
                                                for t in TEXTS]))  # fmt: skip
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("mode", prompts.PROMPT_MODES)
def test_image_informed_modes(bb, mode):
  ids, eot = prompts.build_prompt_ids(bb, TEXTS, n_ctx=4)
  emb = prompts.token_embeddings(bb, bb.params, ids)
  ctx = prompts.context_init(jax.random.key(0), bb, bb.params, n_ctx=4,
                             init_text="a photo of a", std=0.02,
                             n_sets=1)  # fmt: skip
  g = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64)), jnp.float32)
  run = jax.jit(functools.partial(prompts.image_informed, mode=mode,
                                  backbone=bb))  # fmt: skip
  plain = maps.l2_normalize(
      prompts.encode(
          bb, bb.params, prompts.assemble(ctx, emb), jnp.asarray(eot)
      )
  )
  kw = dict(mode=mode, dim=64, text_width=64, num_prompts=2, reduction=4,
            ctx_std=0.02)  # fmt: skip
  zero = prompts.meta_net_init(jax.random.key(1), init_scale=0.0, **kw)
  out = run(ctx, zero, emb, jnp.asarray(eot), g, clip_params=bb.params)
  assert out.shape == (3, 2, 64)
  np.testing.assert_allclose(out, jnp.broadcast_to(plain, out.shape),
                             atol=2e-5)  # fmt: skip
  meta = prompts.meta_net_init(jax.random.key(1), init_scale=30.0, **kw)
  out = run(ctx, meta, emb, jnp.asarray(eot), g, clip_params=bb.params)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-4  # Image-informed.

  def loss(ctx, meta, cp):
    o = prompts.image_informed(
        ctx,
        meta,
        emb,
        jnp.asarray(eot),
        g,
        mode=mode,
        backbone=bb,
        clip_params=cp,
    )
    return jnp.sum(o[:, 1] * jnp.arange(64.0))

  gc, gm, gp = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(ctx, meta, bb.params)
  assert float(jnp.abs(gc).max()) > 0
  assert all(float(jnp.abs(l).max()) > 0 for l in jax.tree.leaves(gm))
  assert all(float(jnp.abs(l).max()) == 0 for l in jax.tree.leaves(gp))


def test_flop_count_matches_hand_formula(bb):
  xla = prompts.text_tower_flops(bb, num_sequences=2, seq_len=21)
  hand = 2 * prompts.text_tower_flops_formula(
      layers=4, width=64, seq_len=21, proj_dim=64
  )
  # Lower-order terms (LayerNorm, softmax, activations) are a few percent at
  # this tiny width.
  assert 1.0 <= xla / hand < 1.1


def test_trimmed_ids_encode_like_padded_ones(bb):
  ids = bb.tokenize(["a breast lesion.", "normal fat and Cooper's ligaments."])
  short = prompts.trim_ids(bb, ids)
  assert short.shape == (2, int(bb.eot_positions(ids).max()) + 1)
  enc = jax.jit(bb.encode_text)
  np.testing.assert_allclose(enc(bb.params, short), enc(bb.params, ids),
                             rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("mode", prompts.PROMPT_MODES)
@pytest.mark.parametrize("n_sets", [1, 2])
def test_image_informed_runs_a_shared_context_once(bb, mode, n_sets,
                                                   monkeypatch):  # fmt: skip
  # A shared context takes the shared-prefix text tower (1 + n_ctx common
  # positions); class-specific contexts run whole. Either way the features
  # equal those of whole prompts, values and gradients.
  ids, eot = prompts.build_prompt_ids(bb, TEXTS, n_ctx=4)
  emb = prompts.token_embeddings(bb, bb.params, ids)
  ctx = prompts.context_init(jax.random.key(0), bb, bb.params, n_ctx=4,
                             init_text="random", std=0.5,
                             n_sets=n_sets)  # fmt: skip
  kw = dict(mode=mode, dim=64, text_width=64, num_prompts=2, reduction=4,
            ctx_std=0.02)  # fmt: skip
  meta = prompts.meta_net_init(jax.random.key(1), init_scale=3.0, **kw)
  g = jnp.asarray(np.random.default_rng(2).normal(size=(3, 64)), jnp.float32)
  seen = []
  encode = prompts.encode

  def spy(*args):
    seen.append(args[4] if len(args) > 4 else 0)
    return encode(*args)

  def whole(*args):
    return encode(*args[:4])

  def loss(ctx, meta):
    o = prompts.image_informed(ctx, meta, emb, jnp.asarray(eot), g, mode=mode,
                               backbone=bb, clip_params=bb.params)  # fmt: skip
    return jnp.sum(o * jnp.arange(64.0)), o

  results = []
  for fn in (spy, whole):
    monkeypatch.setattr(prompts, "encode", fn)
    results.append(jax.value_and_grad(loss, (0, 1), has_aux=True)(ctx, meta))
  assert seen == [5 if n_sets == 1 else 0]
  (_, got), g_got = results[0]
  (_, want), g_want = results[1]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b).max()))  # fmt: skip
