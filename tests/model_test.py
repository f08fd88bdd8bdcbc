"""Tests for the UltraAD model of one episode (model.py).

A tiny random CLIP encodes synthetic ultrasound-like images: a noisy grey
background, with a bright square "lesion" (benign: small and bright,
malignant: larger and duller) and its mask. Support images come with two
views (the original and its mirror image), grouped for leave-one-out.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ultraad_jax import clip
from ultraad_jax import descriptions
from ultraad_jax import model

LAYERS = (1, 2, 3, 4)


def _images(labels, seed, size):
  rng = np.random.default_rng(seed)
  n = len(labels)
  imgs = rng.uniform(0.2, 0.4, size=(n, size, size, 3)).astype(np.float32)
  masks = np.zeros((n, size, size), np.float32)
  for i, c in enumerate(labels):
    if c == 0:
      continue
    y, x = rng.integers(1, 4, size=2) * 8
    side = 16 if c == 1 else 24
    masks[i, y : y + side, x : x + side] = 1
    imgs[i][masks[i] > 0] = 0.95 if c == 1 else 0.7
  return imgs, masks


def _support(bb, labels, seed=0, views=2):
  imgs, masks = _images(labels, seed, bb.image_size)
  imgs = np.concatenate([imgs, imgs[:, :, ::-1]][:views])
  masks = np.concatenate([masks, masks[:, :, ::-1]][:views])
  labels = np.tile(np.asarray(labels, np.int32), views)
  group = np.tile(np.arange(len(imgs) // views, dtype=np.int32), views)
  feats = _encode(bb, imgs)
  texts = descriptions.assign_descriptions(labels, seed, group=group)
  pt = model.encode_descriptions(bb, bb.params, texts)
  return model.Support(feats.global_embed, feats.patch_tokens,
                       jnp.asarray(masks), jnp.asarray(labels),
                       jnp.asarray(group), pt)  # fmt: skip


@functools.lru_cache(maxsize=None)
def _encoder(bb):
  return jax.jit(bb.encode_image, static_argnums=2)


def _encode(bb, imgs):
  return _encoder(bb)(bb.params, clip.normalize(np.ascontiguousarray(imgs)),
                      LAYERS)  # fmt: skip


@pytest.fixture(scope="module")
def ep():
  bb = clip.tiny()
  support = _support(bb, [0, 0, 1, 1, 2, 2])
  imgs, masks = _images([0, 1, 2], 7, bb.image_size)
  q = _encode(bb, imgs)
  query = model.Query(q.global_embed, q.patch_tokens)
  return dict(bb=bb, support=support, query=query, query_masks=masks)


CFG = model.ModelConfig(layers=LAYERS)
ALT = model.ModelConfig(
    layers=LAYERS, prompt_mode="input", fusion="gated",
    class_specific_ctx=True, ctx_init="random", bank_train_ft=False,
    patch_memory=True, layer_combine="max", score_reduce="topk_mean",
    map_loss="combined", score_bank_weight=0.2,
)  # fmt: skip


@functools.lru_cache(maxsize=None)
def _fns(cfg, bb):
  """Jitted init / frozen / loss / grad / predict for one config."""
  init = jax.jit(model.init, static_argnums=(1, 2))
  frozen = jax.jit(model.frozen, static_argnums=(0, 1))
  loss = functools.partial(model.loss_fn, cfg=cfg, backbone=bb)
  grad = jax.jit(jax.grad(loss, has_aux=True))
  predict = jax.jit(functools.partial(model.predict, cfg=cfg, backbone=bb))
  return dict(
      init=lambda rng, sup: init(rng, cfg, bb, bb.params, sup),
      frozen=lambda sup: frozen(cfg, bb, bb.params, sup),
      loss=jax.jit(loss),
      grad=grad,
      predict=predict,
  )


def _abstract_support(s, layers, n, d, h):
  f32 = jnp.float32
  return model.Support(
      global_embed=jax.ShapeDtypeStruct((s, d), f32),
      patch_tokens=jax.ShapeDtypeStruct((layers, s, n, d), f32),
      masks=jax.ShapeDtypeStruct((s, h, h), f32),
      labels=jax.ShapeDtypeStruct((s,), jnp.int32),
      group=jax.ShapeDtypeStruct((s,), jnp.int32),
      text_embed=jax.ShapeDtypeStruct((s, d), f32),
  )


@pytest.mark.parametrize("prompt_mode", model.prompts.PROMPT_MODES)
def test_full_size_shapes(prompt_mode):
  """ViT-L/14@336, 4 tapped layers, shapes only (no weights, no compute)."""
  config = clip.openai_config("ViT-L/14@336")
  abstract = jax.eval_shape(
      functools.partial(clip.init_params, config), jax.random.key(0)
  )
  big = clip.Backbone(config=config, params=abstract)
  cfg = model.ModelConfig(layers=(6, 12, 18, 24), prompt_mode=prompt_mode)
  cfg.validate(big)
  s, b, n, d, h = 12, 4, 24 * 24, 768, 336
  sup = _abstract_support(s, 4, n, d, h)
  query = model.Query(
      jax.ShapeDtypeStruct((b, d), jnp.float32),
      jax.ShapeDtypeStruct((4, b, n, d), jnp.float32),
  )
  params = jax.eval_shape(
      lambda r, cp, sp: model.init(r, cfg, big, cp, sp),
      jax.random.key(0), abstract, sup)  # fmt: skip
  state = jax.eval_shape(
      lambda cp, sp: model.frozen(cfg, big, cp, sp), abstract, sup
  )
  assert params["ctx"].shape == (1, 12, 768)
  assert params["adapter"]["w1"].shape == (4, 768, 192)
  assert params["fusion"]["wq"].shape == (4, 768, 192)
  assert params["bank_image"].shape == (s, 768)
  meta_out = 2 * 768 if prompt_mode == "output" else 768
  assert params["meta_net"]["w2"].shape == (48, meta_out)
  # The patch memory is not kept per episode (22 GB for 256 episodes at
  # this size): predictions build it from the support.
  assert "memory" not in state
  assert jax.eval_shape(model.support_memory, sup).shape == (4, s, n, d)
  assert state["prompt_embeds"].shape[::2] == (2, 768)
  preds = jax.eval_shape(
      lambda p, st, q, cp: model.predict(p, st, q, cfg=cfg, backbone=big,
                                         clip_params=cp),
      params, state, query, abstract)  # fmt: skip
  assert preds.maps.shape == (b, h, h)
  assert preds.image_score.shape == (b,)
  assert preds.class_probs.shape == (b, 3)
  loss, aux = jax.eval_shape(
      lambda p, st, sp, r, cp: model.loss_fn(p, st, sp, r, cfg=cfg,
                                             backbone=big, clip_params=cp),
      params, state, sup, jax.random.key(0), abstract)  # fmt: skip
  assert loss.shape == () and all(v.shape == () for v in aux.values())
  for name in model.baselines.NAMES:
    out = jax.eval_shape(
        lambda sp, q, st, cp, name=name: model.baseline_predictions(
            name, cfg=cfg, backbone=big, clip_params=cp, support=sp,
            query=q, frozen_state=st),
        sup, query, state, abstract)  # fmt: skip
    assert out.image_score.shape == (b,)


@pytest.mark.parametrize(
    "overrides, has_masks, match",
    [
        (dict(n_ctx=0), True, "n_ctx=0"),
        (dict(n_ctx=80), True, "n_ctx=80"),
        (dict(layers=(1, 2, 3, 12)), True, "layers="),
        (dict(fusion="bogus"), True, "fusion='bogus'"),
        (dict(prompt_mode="late"), True, "prompt_mode='late'"),
        (dict(), False, "loss_focal"),
        (dict(loss_focal=0.0), False, "loss_dice"),
        (dict(bogus_key=1), True, "bogus_key"),
        (dict(n_ctx="12"), True, "n_ctx"),
        (dict(temperature=0), True, "temperature"),
        (dict(score_global_weight=0.8, score_bank_weight=0.3), True,
         "score_bank_weight"),
    ],
)  # fmt: skip
def test_bad_config_fails_at_construction(ep, overrides, has_masks, match):
  with pytest.raises(ValueError, match=match):
    cfg = model.ModelConfig.from_dict({"layers": [1, 2, 3, 4], **overrides})
    cfg.validate(ep["bb"], has_masks=has_masks)


def test_from_dict_makes_a_hashable_config(ep):
  cfg = model.ModelConfig.from_dict({"layers": [1, 2, 3, 4], "n_ctx": 8,
                                     "temperature": 1})  # fmt: skip
  assert cfg.layers == (1, 2, 3, 4) and isinstance(cfg.temperature, float)
  assert hash(cfg) == hash(model.ModelConfig(layers=LAYERS, n_ctx=8,
                                             temperature=1.0))  # fmt: skip
  cfg.validate(ep["bb"])


def test_support_without_any_mask_fails(ep):
  sup = ep["support"]._replace(mask_valid=jnp.zeros((12,), bool))
  with pytest.raises(ValueError, match="loss_focal"):
    model.frozen(CFG, ep["bb"], ep["bb"].params, sup)
  cfg = model.ModelConfig(layers=LAYERS, loss_focal=0.0, loss_dice=0.0)
  state = jax.eval_shape(  # allowed then
      lambda sp: model.frozen(cfg, ep["bb"], ep["bb"].params, sp), sup
  )
  assert state["memory_normal"].shape == sup.labels.shape


def test_bad_feature_shapes_name_the_field(ep):
  sup = ep["support"]._replace(patch_tokens=ep["support"].patch_tokens[:3])
  with pytest.raises(ValueError, match="support.patch_tokens"):
    model.frozen(CFG, ep["bb"], ep["bb"].params, sup)


def _adam_steps(fns, params, state, sup, bb, steps, lr=1e-2):
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, rng):
    g, aux = fns["grad"](params, state, sup, rng, clip_params=bb.params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, aux

  history = []
  for i in range(steps):
    params, opt, aux = step(params, opt, jax.random.key(i))
    history.append(float(aux["loss"]))
  return params, history


@pytest.mark.parametrize("cfg", [CFG, ALT], ids=["default", "alternative"])
def test_gradients_reach_every_trainable_leaf_and_nothing_frozen(ep, cfg):
  bb, sup = ep["bb"], ep["support"]
  fns = _fns(cfg, bb)
  params = fns["init"](jax.random.key(0), sup)
  state = fns["frozen"](sup)
  # A few steps first: zero-initialised output layers (the mini-net) pass
  # no gradient to the layer before them at step 0.
  params, _ = _adam_steps(fns, params, state, sup, bb, 3)
  grads, _ = fns["grad"](params, state, sup, jax.random.key(9),
                         clip_params=bb.params)  # fmt: skip
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree.leaves(params))
  for path, g in flat:
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  assert ("bank_image" in params) == cfg.bank_train_ft

  if cfg.bank_train_ft:
    return  # The frozen-input check below runs once, where Ft is frozen too.

  # Frozen inputs: the backbone, Pt, Ft and the cached features, also
  # through the frozen-state construction.
  def through_frozen(cp, floats):
    sp = sup._replace(**floats)
    st = model.frozen(cfg, bb, cp, sp)
    return model.loss_fn(params, st, sp, jax.random.key(9), cfg=cfg,
                         backbone=bb, clip_params=cp)[0]  # fmt: skip

  floats = {k: getattr(sup, k) for k in ("global_embed", "patch_tokens",
                                         "masks", "text_embed")}  # fmt: skip
  g_cp, g_sp = jax.jit(jax.grad(through_frozen, argnums=(0, 1)))(
      bb.params, floats
  )
  for leaf in jax.tree.leaves((g_cp, g_sp)):
    assert float(jnp.abs(leaf).max()) == 0
  # ... and Pt does matter: the zero gradient is a stop, not an absence.
  moved = sup._replace(text_embed=sup.text_embed[::-1])
  a = fns["predict"](params, state, ep["query"], clip_params=bb.params,
                     support=sup)  # fmt: skip
  b = fns["predict"](params, fns["frozen"](moved), ep["query"],
                     clip_params=bb.params, support=moved)  # fmt: skip
  assert float(jnp.abs(a.class_probs - b.class_probs).max()) > 1e-6


@pytest.mark.parametrize("cfg", [CFG, ALT], ids=["default", "alternative"])
def test_predictions_invariant_to_support_order(ep, cfg):
  bb, sup = ep["bb"], ep["support"]
  fns = _fns(cfg, bb)
  params = fns["init"](jax.random.key(0), sup)
  noise = lambda x, k: x + 0.05 * jax.random.normal(k, x.shape)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  params = jax.tree.map(lambda x: noise(x, next(keys)), params)
  perm = np.random.default_rng(0).permutation(12)
  sup_p = jax.tree.map(lambda x: x[:, perm] if x.ndim == 4 else x[perm], sup)
  params_p = dict(params)
  if "bank_image" in params:
    params_p["bank_image"] = params["bank_image"][perm]
  a = fns["predict"](params, fns["frozen"](sup), ep["query"],
                     clip_params=bb.params, support=sup)  # fmt: skip
  b = fns["predict"](params_p, fns["frozen"](sup_p), ep["query"],
                     clip_params=bb.params, support=sup_p)  # fmt: skip
  np.testing.assert_allclose(a.class_probs, b.class_probs, atol=1e-5)
  np.testing.assert_allclose(a.maps, b.maps, atol=1e-5)
  np.testing.assert_allclose(a.image_score, b.image_score, atol=1e-5)


@pytest.mark.parametrize("cfg", [CFG, ALT], ids=["default", "alternative"])
def test_maps_in_unit_interval_scores_finite(ep, cfg):
  bb, sup = ep["bb"], ep["support"]
  fns = _fns(cfg, bb)
  params = fns["init"](jax.random.key(0), sup)
  state = fns["frozen"](sup)
  for p in (params, jax.tree.map(lambda x: 30.0 * x, params)):  # extreme too
    out = fns["predict"](p, state, ep["query"], clip_params=bb.params,
                         support=sup)  # fmt: skip
    assert out.maps.shape == (3, 64, 64)
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    assert np.all(np.isfinite(out.image_score))
    np.testing.assert_allclose(out.class_probs.sum(-1), 1, rtol=1e-5)


def test_baselines_through_the_model_api(ep):
  bb, sup, query = ep["bb"], ep["support"], ep["query"]
  state = _fns(CFG, bb)["frozen"](sup)
  for name in model.baselines.NAMES:
    run = jax.jit(functools.partial(model.baseline_predictions, name,
                                    cfg=CFG, backbone=bb))  # fmt: skip
    out = run(clip_params=bb.params, query=query, frozen_state=state,
              support=sup)  # fmt: skip
    assert out.image_score.shape == (3,)
    assert np.all(np.isfinite(out.image_score)), name
    if out.maps is not None:
      assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    if out.class_probs is not None:
      np.testing.assert_allclose(out.class_probs.sum(-1), 1, rtol=1e-5)
    if name == "linear_probe":  # The query of class c resembles its shots.
      np.testing.assert_array_equal(np.argmax(out.class_probs, -1), [0, 1, 2])
  prior = model.baseline_predictions(
      "center_prior", cfg=CFG, backbone=bb, clip_params=bb.params,
      support=sup, query=query, frozen_state=state)  # fmt: skip
  np.testing.assert_allclose(prior.maps[0], np.mean(sup.masks, 0), atol=1e-6)
  with pytest.raises(ValueError, match="bogus"):
    model.baseline_predictions("bogus", cfg=CFG, backbone=bb,
                               clip_params=bb.params, support=sup,
                               query=query, frozen_state=state)  # fmt: skip


def test_patch_memory_is_built_from_the_support_where_needed(ep):
  bb, sup, query = ep["bb"], ep["support"], ep["query"]
  state = _fns(CFG, bb)["frozen"](sup)
  # The baseline through the model API is the baselines.py function on the
  # support's normalised tokens and its normal samples.
  out = model.baseline_predictions(
      "patch_memory", cfg=CFG, backbone=bb, clip_params=bb.params,
      support=sup, query=query, frozen_state=state)  # fmt: skip
  ref_maps, ref_scores = model.baselines.patch_memory(
      query.patch_tokens, model.maps.l2_normalize(sup.patch_tokens),
      sup.labels == 0, image_size=bb.image_size,
      smoothing_sigma=CFG.smoothing_sigma,
  )  # fmt: skip
  np.testing.assert_allclose(out.maps, ref_maps, atol=1e-6)
  np.testing.assert_allclose(out.image_score, ref_scores, atol=1e-6)
  # Without the support there is no memory to read: a clear error, for the
  # baseline and for the model with patch_memory on.
  with pytest.raises(ValueError, match="support="):
    model.baseline_predictions(
        "patch_memory", cfg=CFG, backbone=bb, clip_params=bb.params,
        query=query, frozen_state=state)  # fmt: skip
  fns = _fns(ALT, bb)
  params = fns["init"](jax.random.key(0), sup)
  with pytest.raises(ValueError, match="patch_memory=True"):
    model.predict(params, fns["frozen"](sup), query, cfg=ALT, backbone=bb,
                  clip_params=bb.params)  # fmt: skip
  # The default config never reads it.
  params = _fns(CFG, bb)["init"](jax.random.key(0), sup)
  out = model.predict(params, state, query, cfg=CFG, backbone=bb,
                      clip_params=bb.params)  # fmt: skip
  assert out.maps.shape == (3, bb.image_size, bb.image_size)


def test_loss_uses_leave_one_out_exclusion(ep):
  """The training CE equals predict's CE with each sample's group excluded."""
  bb, sup = ep["bb"], ep["support"]
  fns = _fns(CFG, bb)
  params = fns["init"](jax.random.key(0), sup)
  state = fns["frozen"](sup)
  _, aux = fns["loss"](params, state, sup, jax.random.key(0),
                       clip_params=bb.params)  # fmt: skip
  query = model.Query(sup.global_embed, sup.patch_tokens)
  exclude = sup.group[:, None] == sup.group[None, :]
  out = fns["predict"](params, state, query, clip_params=bb.params,
                       exclude=exclude)  # fmt: skip
  ce = -np.mean(np.log(out.class_probs[np.arange(12), sup.labels]))
  np.testing.assert_allclose(aux["ce"], ce, rtol=1e-4)
  assert float(aux["frac_ce"]) == 1.0
  # Without exclusion every sample finds itself: near-certain own class.
  own = fns["predict"](params, state, query, clip_params=bb.params)
  assert float(jnp.mean(own.class_probs[np.arange(12), sup.labels])) > float(
      jnp.mean(out.class_probs[np.arange(12), sup.labels])
  )


def test_tiny_model_overfits_one_support_batch(ep):
  bb, sup = ep["bb"], ep["support"]
  fns = _fns(CFG, bb)
  params = fns["init"](jax.random.key(0), sup)
  state = fns["frozen"](sup)
  _, history = _adam_steps(fns, params, state, sup, bb, 150)
  assert np.all(np.isfinite(history))
  assert history[-1] < 0.1 * history[0], (history[0], history[-1])


def test_normal_only_setting_trains_maps_only(ep):
  bb = ep["bb"]
  sup = _support(bb, [0] * 6, seed=3)  # the shapes of ep: no recompiles
  fns = _fns(CFG, bb)
  params = fns["init"](jax.random.key(0), sup)
  state = fns["frozen"](sup)
  loss, aux = fns["loss"](params, state, sup, jax.random.key(0),
                          clip_params=bb.params)  # fmt: skip
  assert np.isfinite(loss) and float(aux["focal"]) > 0
  for k in ("frac_bce", "frac_ce", "frac_dice", "bce", "ce", "dice"):
    assert float(aux[k]) == 0.0, k
  grads, _ = fns["grad"](params, state, sup, jax.random.key(0),
                         clip_params=bb.params)  # fmt: skip
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["ctx"]).max()) > 0
  out = fns["predict"](params, state, ep["query"], clip_params=bb.params)
  np.testing.assert_allclose(out.class_probs[:, 0], 1.0)


def test_minibatch_draw_depends_on_rng(ep):
  bb, sup = ep["bb"], ep["support"]
  cfg = model.ModelConfig(layers=LAYERS, train_batch_size=4)
  fns = _fns(cfg, bb)
  params = fns["init"](jax.random.key(0), sup)
  state = fns["frozen"](sup)
  run = lambda k: float(fns["loss"](params, state, sup, jax.random.key(k),
                                    clip_params=bb.params)[0])  # fmt: skip
  assert run(0) == run(0)
  assert len({run(k) for k in range(4)}) > 1


def test_low_resolution_map_loss(ep):
  """loss_map_size trains on downsampled maps and soft masks; still learns."""
  bb, sup = ep["bb"], ep["support"]
  cfg = model.ModelConfig(layers=LAYERS, loss_map_size=2 * bb.grid_size)
  fns = _fns(cfg, bb)
  params = fns["init"](jax.random.key(0), sup)
  state = fns["frozen"](sup)
  loss, aux = fns["loss"](params, state, sup, jax.random.key(0),
                          clip_params=bb.params)  # fmt: skip
  assert np.isfinite(float(loss))
  full = _fns(CFG, bb)["loss"](params, state, sup, jax.random.key(0),
                               clip_params=bb.params)[1]  # fmt: skip
  # Same parameters, other loss resolution: the map terms differ, the
  # class terms (no maps involved) do not.
  assert float(aux["focal"]) != float(full["focal"])
  np.testing.assert_allclose(float(aux["ce"]), float(full["ce"]), rtol=1e-6)
  with pytest.raises(ValueError, match="loss_map_size"):
    model.ModelConfig(layers=LAYERS, loss_map_size=-1)


def test_episode_axis_vmaps(ep):
  """What the engine does: stack episodes, vmap, frozen params broadcast."""
  bb, sup, query = ep["bb"], ep["support"], ep["query"]
  sup2 = _support(bb, [0, 0, 1, 1, 2, 2], seed=11)
  stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  sups = stack(sup, sup2)
  queries = stack(query, query)
  rngs = jax.random.split(jax.random.key(0), 2)
  init = jax.jit(
      jax.vmap(
          lambda r, cp, s: model.init(r, CFG, bb, cp, s), in_axes=(0, None, 0)
      )
  )
  frozen = jax.jit(
      jax.vmap(lambda cp, s: model.frozen(CFG, bb, cp, s), in_axes=(None, 0))
  )
  loss = jax.jit(jax.vmap(
      lambda p, st, s, r, cp: model.loss_fn(p, st, s, r, cfg=CFG, backbone=bb,
                                            clip_params=cp)[0],
      in_axes=(0, 0, 0, 0, None)))  # fmt: skip
  predict = jax.jit(jax.vmap(
      lambda p, st, q, cp: model.predict(p, st, q, cfg=CFG, backbone=bb,
                                         clip_params=cp),
      in_axes=(0, 0, 0, None)))  # fmt: skip
  params = init(rngs, bb.params, sups)
  states = frozen(bb.params, sups)
  losses = loss(params, states, sups, rngs, bb.params)
  preds = predict(params, states, queries, bb.params)
  fns = _fns(CFG, bb)
  one = jax.tree.map(lambda x: x[1], params)
  l1 = fns["loss"](one, fns["frozen"](sup2), sup2, rngs[1],
                   clip_params=bb.params)[0]  # fmt: skip
  np.testing.assert_allclose(losses[1], l1, rtol=1e-4)
  p1 = fns["predict"](one, fns["frozen"](sup2), query, clip_params=bb.params)
  np.testing.assert_allclose(preds.maps[1], p1.maps, atol=1e-5)


def _compare_training_paths(ep, cfg, ref_cfg, names):
  """Same loss terms `names` and gradients from two configs' loss_fn.

  Both start from the same parameters, after 3 Adam steps of the first (so
  that the residual branches are no longer at their initial values).

  Returns:
    (cfg's jitted functions, ref_cfg's, the parameters, the frozen state).
  """
  bb, sup = ep["bb"], ep["support"]
  f, r = _fns(cfg, bb), _fns(ref_cfg, bb)
  params = f["init"](jax.random.key(0), sup)
  state = f["frozen"](sup)
  params, _ = _adam_steps(f, params, state, sup, bb, 3)
  key = jax.random.key(9)
  (g_f, aux_f), (g_r, aux_r) = (
      fns["grad"](params, state, sup, key, clip_params=bb.params)
      for fns in (f, r)
  )
  for name in names:
    np.testing.assert_allclose(aux_f[name], aux_r[name], rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_f)[0],
                          jax.tree.leaves(g_r)):  # fmt: skip
    np.testing.assert_allclose(
        a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()) + 1e-12,
        err_msg=jax.tree_util.keystr(path))  # fmt: skip
  return f, r, params, state


@pytest.mark.parametrize("fusion_mode", ["cross_attention", "none"])
def test_fused_logits_path_matches_reference_path(ep, fusion_mode):
  # The whole model (loss, gradients, predictions) with the fused layer
  # logits against the reference path that writes the fused tokens.
  bb = ep["bb"]
  fused = model.ModelConfig(layers=LAYERS, fusion=fusion_mode, init_scale=1.0)
  ref = model.ModelConfig(layers=LAYERS, fusion=fusion_mode, init_scale=1.0,
                          fused_logits=False)  # fmt: skip
  f, r, params, state = _compare_training_paths(ep, fused, ref, ("loss",))
  a, b = (
      fns["predict"](params, state, ep["query"], clip_params=bb.params)
      for fns in (f, r)
  )
  np.testing.assert_allclose(a.maps, b.maps, atol=1e-5)
  np.testing.assert_allclose(a.image_score, b.image_score, atol=1e-5)


@pytest.mark.parametrize("loss_map_size", [0, 16])
def test_fused_map_loss_matches_reference_path(ep, loss_map_size):
  # The training loss and its gradients with the map losses computed with
  # their gradient in one pass (losses.upsampled_map_losses) against
  # upsample-then-map_losses, at image size and at a smaller loss size.
  cfgs = [
      model.ModelConfig(layers=LAYERS, init_scale=1.0, fused_map_loss=mode,
                        loss_map_size=loss_map_size)  # fmt: skip
      for mode in ("on", "off")
  ]
  _compare_training_paths(ep, *cfgs, ("loss", "focal", "dice"))


@pytest.mark.parametrize(
    "mode,map_loss,elements,backend,want",
    [
        ("auto", "per_layer", 1 << 20, "cpu", True),
        ("auto", "per_layer", (1 << 20) - 1, "cpu", False),
        ("auto", "per_layer", 1 << 24, "gpu", False),
        ("on", "per_layer", 1, "gpu", True),
        ("off", "per_layer", 1 << 24, "cpu", False),
        ("on", "combined", 1 << 24, "cpu", False),  # per-layer losses only
    ],
)
def test_fused_map_loss_rule(monkeypatch, mode, map_loss, elements, backend,
                             want):  # fmt: skip
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  cfg = model.ModelConfig(layers=LAYERS, fused_map_loss=mode,
                          map_loss=map_loss)  # fmt: skip
  assert model._use_fused_map_loss(cfg, elements) is want
  with pytest.raises(ValueError, match="fused_map_loss"):
    model.ModelConfig(layers=LAYERS, fused_map_loss="yes")
