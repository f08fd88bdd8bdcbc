"""Tests for ultraad_jax.clip: PyTorch parity, caching, shapes and errors.

Tiny models only (64 px, width 64); full-size models are checked with
jax.eval_shape, which costs no compute.
"""

import functools
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ultraad_jax import clip

LAYERS = (1, 2, 3, 4)
# Torch initialisation factors: 1 is transformers' default; 4 gives blocks that
# clearly transform their input, so parity is not won on near-identity blocks.
FACTORS = (1.0, 4.0)


def _torch_model(factor):
  config = clip.tiny_config()
  for c in (config, config.vision_config, config.text_config):
    c.initializer_factor = factor
  torch.manual_seed(0)
  return transformers.CLIPModel(config).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """For each factor: the torch model and folders with .bin / .safetensors."""
  out = {}
  for factor in FACTORS:
    model = _torch_model(factor)
    root = tmp_path_factory.mktemp(f"ckpt{factor:g}")
    model.save_pretrained(root / "bin", safe_serialization=False)
    model.save_pretrained(root / "st", safe_serialization=True)
    out[factor] = dict(model=model, bin=str(root / "bin"), st=str(root / "st"))
  # One folder brings its own tokenizer files (the shipped vocabulary saved
  # in Hugging Face format), as hub checkpoints do.
  clip.build_tokenizer().save_pretrained(out[1.0]["st"])
  return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("clip_cache"))


@pytest.fixture(scope="module")
def loaded(checkpoints, cache_dir):
  """clip.load of every checkpoint folder, keyed (factor, 'bin' | 'st')."""
  return {
      (factor, kind): clip.load(ckpt[kind], cache_dir=cache_dir)
      for factor, ckpt in checkpoints.items()
      for kind in ("bin", "st")
  }


@pytest.fixture(scope="module")
def tiny():
  return clip.tiny()


def _pixels(seed, batch=2, size=64):
  rng = np.random.RandomState(seed)
  return rng.randn(batch, size, size, 3).astype(np.float32)


def _assert_close(actual, expected, factor):
  # float32 rounding grows with the magnitude of the activations, which the
  # x4 initialisation makes ~15x larger; allow 1e-5 relative to that scale.
  scale = 1.0 if factor == 1.0 else max(1.0, float(np.abs(expected).max()))
  diff = float(np.abs(np.asarray(actual) - expected).max())
  assert diff <= 1e-5 * scale, (diff, scale)


# ----------------------------------------------------------------------------
# Parity with PyTorch.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", FACTORS)
def test_bin_and_safetensors_give_identical_params(loaded, factor):
  a, b = loaded[(factor, "bin")].params, loaded[(factor, "st")].params
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_sharded_checkpoint_loads(checkpoints, loaded, tmp_path):
  folder = tmp_path / "sharded"
  checkpoints[1.0]["model"].save_pretrained(folder, max_shard_size="5MB")
  assert (folder / "model.safetensors.index.json").exists()
  assert len(list(folder.glob("model-*.safetensors"))) > 1
  bb = clip.load(str(folder), cache_dir=str(tmp_path / "cache"))
  reference = loaded[(1.0, "st")].params
  for x, y in zip(jax.tree.leaves(bb.params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("factor", FACTORS)
def test_image_parity_with_torch(checkpoints, loaded, factor):
  model = checkpoints[factor]["model"]
  bb = loaded[(factor, "bin")]
  pixels = _pixels(seed=1)
  feats = jax.jit(bb.encode_image, static_argnums=2)(bb.params, pixels, LAYERS)
  with torch.no_grad():
    nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2))
    global_ref = model.get_image_features(pixel_values=nchw).numpy()
    hidden = model.vision_model(pixel_values=nchw, output_hidden_states=True)
    raw_ref = np.stack([hidden.hidden_states[i][:, 1:].numpy() for i in LAYERS])
    proj_ref = model.visual_projection(
        model.vision_model.post_layernorm(torch.from_numpy(raw_ref))
    ).numpy()
  assert feats.global_embed.shape == (2, 64)
  assert feats.patch_tokens.shape == (4, 2, 64, 64)
  assert feats.patch_tokens_raw.shape == (4, 2, 64, 64)
  _assert_close(feats.global_embed, global_ref, factor)
  for i in range(len(LAYERS)):
    _assert_close(feats.patch_tokens[i], proj_ref[i], factor)
    _assert_close(feats.patch_tokens_raw[i], raw_ref[i], factor)
  # The blocks really transform their input: first and last tapped layers
  # differ, and so do the two images.
  first, last = raw_ref[0], raw_ref[-1]
  cosine = (first * last).sum(-1) / (
      np.linalg.norm(first, axis=-1) * np.linalg.norm(last, axis=-1)
  )
  assert cosine.mean() < 0.95
  assert np.abs(global_ref[0] - global_ref[1]).max() > 0.1


@pytest.mark.parametrize("factor", FACTORS)
def test_text_parity_with_torch(checkpoints, loaded, factor):
  model = checkpoints[factor]["model"]
  bb = loaded[(factor, "bin")]
  ids = bb.tokenize(
      [
          "a photo of a cat",
          "an ultrasound image of a malignant lesion with irregular margins",
          "",
      ]
  )
  with torch.no_grad():
    ref = model.get_text_features(
        input_ids=torch.from_numpy(ids.astype(np.int64))
    ).numpy()
  text = jax.jit(bb.encode_text)(bb.params, ids)
  _assert_close(text, ref, factor)
  embeds = bb.embed_tokens(bb.params, ids)
  assert embeds.shape == (3, 77, 64)
  from_embeds = jax.jit(bb.encode_text_embeddings)(
      bb.params, embeds, bb.eot_positions(ids)
  )
  _assert_close(from_embeds, ref, factor)
  assert np.abs(ref[0] - ref[1]).max() > 0.1


def test_encode_text_embeddings_is_differentiable(tiny):
  ids = tiny.tokenize(["a b c", "a photo of a cat"])
  eot = tiny.eot_positions(ids)
  embeds = tiny.embed_tokens(tiny.params, ids)

  def loss(e):
    return jnp.sum(tiny.encode_text_embeddings(tiny.params, e, eot) ** 2)

  grads = jax.jit(jax.grad(loss))(embeds)
  assert grads.shape == embeds.shape
  grads = np.asarray(grads)
  for row, end in enumerate(np.asarray(eot)):
    # Causal attention: tokens up to the end token matter, later ones not.
    assert np.abs(grads[row, : end + 1]).max() > 0
    assert np.abs(grads[row, end + 1 :]).max() == 0


@pytest.mark.parametrize("groups,prefix_len", [(1, 1), (3, 5), (2, 9)])
def test_shared_prefix_encoding_equals_whole_prompts(tiny, groups, prefix_len):
  # Fresh random embeddings: each group's T = 3 prompts share their first
  # prefix_len positions (a learnable context), then differ; EOTs differ.
  rng = np.random.default_rng(groups * 10 + prefix_len)
  t, s, w = 3, 12, tiny.text_width
  head = rng.normal(size=(groups, 1, prefix_len, w))
  tail = rng.normal(size=(groups, t, s - prefix_len, w))
  eot = np.asarray([prefix_len, s - 1, prefix_len + 1], np.int32)

  def whole(head, tail):
    full = jnp.concatenate(
        [jnp.broadcast_to(head, (groups, t) + head.shape[2:]), tail], axis=2
    )
    out = tiny.encode_text_embeddings(
        tiny.params, full.reshape(groups * t, s, w), jnp.tile(eot, groups)
    )
    return out.reshape(groups, t, -1)

  def shared(head, tail):
    full = jnp.concatenate(
        [jnp.broadcast_to(head, (groups, t) + head.shape[2:]), tail], axis=2
    )
    return tiny.encode_text_shared_prefix(tiny.params, full, eot, prefix_len)

  args = (jnp.asarray(head, jnp.float32), jnp.asarray(tail, jnp.float32))
  ref, got = jax.jit(whole)(*args), jax.jit(shared)(*args)
  assert got.shape == ref.shape == (groups, t, tiny.embed_dim)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # Gradients reach the shared prefix (summed over the prompts) and the
  # suffixes alike.
  weights = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  grads = [
      jax.jit(jax.grad(lambda *a, f=f: jnp.sum(weights * f(*a)), (0, 1)))(*args)
      for f in (whole, shared)
  ]
  for a, b in zip(grads[1], grads[0]):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b).max()))  # fmt: skip


def test_shared_prefix_encoding_refuses_bad_inputs(tiny):
  w = tiny.text_width
  emb = np.zeros((1, 2, 10, w), np.float32)
  with pytest.raises(ValueError, match="must lie in"):
    tiny.encode_text_shared_prefix(tiny.params, emb, np.asarray([3, 9]), 4)
  with pytest.raises(ValueError, match=r"\[G, T, S"):
    tiny.encode_text_shared_prefix(tiny.params, emb[0], np.asarray([5, 9]), 4)
  with pytest.raises(ValueError, match="eot_positions must be"):
    tiny.encode_text_shared_prefix(tiny.params, emb, np.asarray([5]), 4)


# ----------------------------------------------------------------------------
# Loading: formats, cache, tokenizer files, activation.
# ----------------------------------------------------------------------------


def test_converted_weights_cache_reused_and_invalidated(
    checkpoints, tmp_path, monkeypatch
):
  source = tmp_path / "src"
  shutil.copytree(checkpoints[1.0]["bin"], source)
  cache = tmp_path / "cache"
  first = clip.load(str(source), cache_dir=str(cache))
  (entry,) = list(cache.iterdir())
  weights = entry / "flax_model.msgpack"
  stamp = weights.stat().st_mtime_ns

  def no_conversion(*args):
    raise AssertionError(f"reconverted {args}")

  monkeypatch.setattr(clip, "_convert_pt", no_conversion)
  second = clip.load(str(source), cache_dir=str(cache))
  assert weights.stat().st_mtime_ns == stamp
  for x, y in zip(
      jax.tree.leaves(first.params), jax.tree.leaves(second.params)
  ):
    np.testing.assert_array_equal(x, y)

  # A changed source must be converted again.
  bin_path = source / "pytorch_model.bin"
  os.utime(bin_path, ns=(stamp, bin_path.stat().st_mtime_ns + 10**9))
  with pytest.raises(AssertionError, match="reconverted"):
    clip.load(str(source), cache_dir=str(cache))
  monkeypatch.undo()
  clip.load(str(source), cache_dir=str(cache))
  key = json.loads((entry / "source.json").read_text())
  stamps = {f["name"]: f["mtime_ns"] for f in key["files"]}
  assert stamps["pytorch_model.bin"] == bin_path.stat().st_mtime_ns


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
  monkeypatch.setenv("ULTRAAD_CACHE", str(tmp_path))
  assert clip.default_cache_dir() == os.path.join(str(tmp_path), "clip")
  monkeypatch.delenv("ULTRAAD_CACHE")
  assert clip.default_cache_dir().endswith(
      os.path.join(".cache", "ultraad_jax", "clip")
  )


def test_flax_folder_loads_without_conversion(
    loaded, cache_dir, tmp_path, monkeypatch
):
  # A cache entry is itself a Flax checkpoint folder.
  entries = sorted(p for p in os.listdir(cache_dir) if p.startswith("bin"))
  folder = tmp_path / "flax"
  shutil.copytree(os.path.join(cache_dir, entries[0]), folder)
  monkeypatch.setattr(clip, "_convert_pt", None)  # Must not be reached.
  bb = clip.load(str(folder))
  candidates = [loaded[(f, "bin")].params for f in FACTORS]
  assert any(
      all(
          np.array_equal(x, y)
          for x, y in zip(jax.tree.leaves(bb.params), jax.tree.leaves(c))
      )
      for c in candidates
  )


def test_checkpoint_tokenizer_files_are_used(loaded, checkpoints):
  with_files = loaded[(1.0, "st")]
  without = loaded[(1.0, "bin")]
  assert with_files.tokenizer_source == checkpoints[1.0]["st"]
  assert without.tokenizer_source is None
  text = ["a photo of a cat", "benign cyst"]
  np.testing.assert_array_equal(
      with_files.tokenize(text), without.tokenize(text)
  )


def test_activation_override_warns_and_changes_features(
    checkpoints, cache_dir, loaded, caplog
):
  with caplog.at_level(logging.WARNING):
    bb = clip.load(
        checkpoints[4.0]["bin"], cache_dir=cache_dir, activation="gelu"
    )
  assert "silently" in caplog.text and "gelu" in caplog.text
  assert bb.config.vision_config.hidden_act == "gelu"
  assert bb.config.text_config.hidden_act == "gelu"
  base = loaded[(4.0, "bin")]
  assert base.config.vision_config.hidden_act == "quick_gelu"
  pixels = _pixels(seed=2)
  a = bb.encode_image(bb.params, pixels, (4,)).global_embed
  b = base.encode_image(base.params, pixels, (4,)).global_embed
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_hub_name_downloads_and_local_path_does_not(
    checkpoints, tmp_path, monkeypatch
):
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top

  served = checkpoints[1.0]["st"]
  requests = []

  def fake_download(repo_id, filename):
    requests.append((repo_id, filename))
    path = os.path.join(served, filename)
    if not os.path.exists(path):
      raise errors.EntryNotFoundError(f"{filename} not in {repo_id}")
    return path

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
  bb = clip.load("someorg/tiny-clip", cache_dir=str(tmp_path))
  assert ("someorg/tiny-clip", "config.json") in requests
  assert ("someorg/tiny-clip", "model.safetensors") in requests
  assert bb.tokenizer_source == served
  assert any(p.startswith("someorg--tiny-clip-") for p in os.listdir(tmp_path))

  requests.clear()
  missing = str(tmp_path / "no" / "such" / "folder")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    clip.load(missing)
  assert not requests  # A local path never asks the hub.


def test_hub_failure_is_clear(monkeypatch):
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  def offline(repo_id, filename):
    raise OSError("network unreachable")

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
  with pytest.raises(FileNotFoundError, match="someorg/absent-clip"):
    clip.load("someorg/absent-clip")


# ----------------------------------------------------------------------------
# Image size.
# ----------------------------------------------------------------------------


def test_resize_is_identity_at_own_size(checkpoints, cache_dir, loaded):
  bb = clip.load(checkpoints[1.0]["bin"], cache_dir=cache_dir, image_size=64)
  base = loaded[(1.0, "bin")]
  for x, y in zip(jax.tree.leaves(bb.params), jax.tree.leaves(base.params)):
    np.testing.assert_array_equal(x, y)
  assert bb.image_size == 64


def test_resize_to_other_size(checkpoints, cache_dir, loaded):
  bb = clip.load(checkpoints[4.0]["bin"], cache_dir=cache_dir, image_size=96)
  base = loaded[(4.0, "bin")]
  assert bb.image_size == 96 and bb.grid_size == 12
  assert base.image_size == 64  # The original config is untouched.
  table = bb.params["vision_model"]["embeddings"]["position_embedding"]
  old = base.params["vision_model"]["embeddings"]["position_embedding"]
  assert table["embedding"].shape == (1 + 144, 64)
  np.testing.assert_array_equal(table["embedding"][0], old["embedding"][0])
  feats = bb.encode_image(bb.params, _pixels(seed=3, size=96), (2, 4))
  assert feats.patch_tokens.shape == (2, 2, 144, 64)
  assert feats.patch_tokens_raw.shape == (2, 2, 144, 64)
  assert feats.global_embed.shape == (2, 64)
  assert np.isfinite(np.asarray(feats.patch_tokens)).all()


def test_resize_keeps_a_constant_table_constant(tiny):
  params = jax.tree.map(lambda x: x, tiny.params)
  emb = params["vision_model"]["embeddings"]["position_embedding"]
  width = emb["embedding"].shape[1]
  emb["embedding"] = jnp.concatenate(
      [jnp.zeros((1, width)), jnp.full((64, width), 0.5)]
  )
  new_params, config = clip.set_image_size(params, tiny.config, 40)
  new = new_params["vision_model"]["embeddings"]["position_embedding"]
  assert config.vision_config.image_size == 40
  assert new["embedding"].shape == (1 + 25, width)
  np.testing.assert_allclose(new["embedding"][1:], 0.5, atol=1e-6)
  np.testing.assert_array_equal(new["embedding"][0], 0.0)


# ----------------------------------------------------------------------------
# Full-size shapes, compilation, tiny model.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layers, grid, width, dim, count",
    [
        ("ViT-B/16", (3, 6, 9, 12), 14, 768, 512, 149_620_737),
        ("ViT-L/14", (6, 12, 18, 24), 16, 1024, 768, 427_616_513),
        ("ViT-L/14@336", (6, 12, 18, 24), 24, 1024, 768, 427_944_193),
    ],
)
def test_full_size_shapes(name, layers, grid, width, dim, count):
  config = clip.openai_config(name)
  params = jax.eval_shape(
      functools.partial(clip.init_params, config), jax.random.key(0)
  )
  # Parameter counts of OpenAI's released checkpoints.
  assert sum(x.size for x in jax.tree.leaves(params)) == count
  bb = clip.Backbone(config=config, params=params)
  size = bb.image_size
  feats = jax.eval_shape(
      functools.partial(bb.encode_image, layers=layers),
      params,
      jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
  )
  assert feats.global_embed.shape == (2, dim)
  assert feats.patch_tokens.shape == (4, 2, grid * grid, dim)
  assert feats.patch_tokens_raw.shape == (4, 2, grid * grid, width)
  text = jax.eval_shape(
      bb.encode_text, params, jax.ShapeDtypeStruct((3, 77), jnp.int32)
  )
  assert text.shape == (3, dim)
  assert (bb.num_layers, bb.embed_dim, bb.context_length) == (
      layers[-1],
      dim,
      77,
  )


def test_jitted_encode_image_compiles_once(tiny):
  traces = []

  def encode(params, pixels):
    traces.append(None)
    return tiny.encode_image(params, pixels, (2, 4))

  jitted = jax.jit(encode)
  static = jax.jit(tiny.encode_image, static_argnums=2)
  for seed in range(3):
    jitted(tiny.params, _pixels(seed))
    static(tiny.params, _pixels(seed), (2, 4))
  assert len(traces) == 1
  assert static._cache_size() == 1  # pylint: disable=protected-access


def test_tiny_defaults_and_overrides():
  bb = clip.tiny()
  assert (bb.image_size, bb.patch_size, bb.grid_size) == (64, 8, 8)
  assert (bb.num_layers, bb.embed_dim, bb.text_width) == (4, 64, 64)
  assert bb.context_length == 77
  assert bb.config.text_config.vocab_size == clip.CLIP_VOCAB_SIZE
  assert bb.config.vision_config.hidden_act == "quick_gelu"
  # init_scale multiplies only the attention / MLP kernels.
  plain = clip.tiny(init_scale=1.0)
  layer = ("vision_model", "encoder", "layers", "0")

  def get(p, *names):
    for n in layer + names:
      p = p[n]
    return np.asarray(p)

  for names in (("self_attn", "q_proj", "kernel"), ("mlp", "fc2", "kernel")):
    np.testing.assert_allclose(
        get(bb.params, *names), 10 * get(plain.params, *names), rtol=1e-6
    )
  np.testing.assert_array_equal(
      get(bb.params, "layer_norm1", "scale"),
      get(plain.params, "layer_norm1", "scale"),
  )
  other = clip.tiny(image_size=96, vision_layers=2, seed=1)
  assert other.grid_size == 12 and other.num_layers == 2
  with pytest.raises(TypeError, match="hidden_size"):
    clip.tiny(hidden_size=32)


def test_tiny_blocks_mix(tiny):
  feats = tiny.encode_image(tiny.params, _pixels(seed=4), (1, 4))
  first, last = np.asarray(feats.patch_tokens_raw)
  cosine = (first * last).sum(-1) / (
      np.linalg.norm(first, axis=-1) * np.linalg.norm(last, axis=-1)
  )
  assert cosine.mean() < 0.9


# ----------------------------------------------------------------------------
# Tokenizer and normalisation.
# ----------------------------------------------------------------------------


def test_tokenizer_ids(tiny):
  ids = tiny.tokenize(["a photo of a cat", "word " * 100])
  assert ids.dtype == np.int32 and ids.shape == (2, 77)
  np.testing.assert_array_equal(
      ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407]
  )
  assert (ids[0, 7:] == clip.EOT_TOKEN_ID).all()  # Padded after the end.
  assert ids[1, 0] == clip.SOT_TOKEN_ID and ids[1, -1] == clip.EOT_TOKEN_ID
  np.testing.assert_array_equal(tiny.eot_positions(ids), [6, 76])
  np.testing.assert_array_equal(
      clip.eot_positions(jnp.asarray(ids)), np.array([6, 76])
  )
  # Old Hugging Face configs say eos_token_id=2, meaning "the largest id".
  np.testing.assert_array_equal(clip.eot_positions(ids, 2), [6, 76])


def test_normalize():
  rng = np.random.RandomState(0)
  uint8 = rng.randint(0, 256, (2, 5, 5, 3)).astype(np.uint8)
  as_float = uint8.astype(np.float32) / 255
  out = clip.normalize(uint8)
  assert out.dtype == np.float32 and isinstance(out, np.ndarray)
  np.testing.assert_allclose(out, clip.normalize(as_float), atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(clip.normalize(jnp.asarray(as_float))), out, atol=1e-6
  )
  np.testing.assert_allclose(
      np.asarray(jax.jit(clip.normalize)(uint8)), out, atol=1e-6
  )
  mean = np.broadcast_to(np.float32(clip.OPENAI_CLIP_MEAN), (1, 2, 2, 3))
  np.testing.assert_allclose(clip.normalize(mean), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="255"):
    clip.normalize(as_float * 255)
  with pytest.raises(ValueError, match="int32"):
    clip.normalize(uint8.astype(np.int32))
  with pytest.raises(ValueError, match=r"\(2, 5, 5\)"):
    clip.normalize(as_float[..., 0])


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_bad_checkpoint_paths(checkpoints, tmp_path):
  missing = tmp_path / "absent"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    clip.load(str(missing))

  a_file = tmp_path / "weights.bin"
  a_file.write_bytes(b"x")
  with pytest.raises(ValueError, match=str(a_file)):
    clip.load(str(a_file))

  no_config = tmp_path / "no_config"
  no_config.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    clip.load(str(no_config))

  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(os.path.join(checkpoints[1.0]["bin"], "config.json"), no_weights)
  with pytest.raises(FileNotFoundError, match=str(no_weights)):
    clip.load(str(no_weights))

  not_clip = tmp_path / "bert"
  not_clip.mkdir()
  (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="'bert'"):
    clip.load(str(not_clip))

  garbage = tmp_path / "garbage"
  shutil.copytree(checkpoints[1.0]["bin"], garbage)
  (garbage / "pytorch_model.bin").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match=str(garbage / "pytorch_model.bin")):
    clip.load(str(garbage), cache_dir=str(tmp_path / "cache"))


def test_config_that_does_not_match_weights(checkpoints, cache_dir, tmp_path):
  folder = tmp_path / "wrong_patch"
  shutil.copytree(checkpoints[1.0]["bin"], folder)
  config = json.loads((folder / "config.json").read_text())
  config["vision_config"]["patch_size"] = 16
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="config.json") as err:
    clip.load(str(folder), cache_dir=str(tmp_path / "cache"))
  assert str(folder) in str(err.value)

  # A Flax folder whose config says a wider text tower.
  entries = sorted(p for p in os.listdir(cache_dir) if p.startswith("bin"))
  flax_folder = tmp_path / "flax_wrong"
  shutil.copytree(os.path.join(cache_dir, entries[0]), flax_folder)
  config = json.loads((flax_folder / "config.json").read_text())
  config["text_config"]["hidden_size"] = 128
  (flax_folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="shape") as err:
    clip.load(str(flax_folder))
  assert str(flax_folder) in str(err.value)


def test_missing_weights_are_not_filled_randomly(checkpoints, tmp_path):
  folder = tmp_path / "partial"
  folder.mkdir()
  shutil.copy(os.path.join(checkpoints[1.0]["bin"], "config.json"), folder)
  state = checkpoints[1.0]["model"].state_dict()
  del state["text_projection.weight"]
  torch.save(state, folder / "pytorch_model.bin")
  with pytest.raises(ValueError, match="text_projection") as err:
    clip.load(str(folder), cache_dir=str(tmp_path / "cache"))
  assert str(folder) in str(err.value)


def test_bad_layers_and_pixels(tiny):
  pixels = _pixels(seed=0)
  for layers in [(0,), (5,), (1, 9), ()]:
    with pytest.raises(ValueError, match="layer"):
      tiny.encode_image(tiny.params, pixels, layers)
  with pytest.raises(ValueError, match=r"1\.\.4"):
    tiny.encode_image(tiny.params, pixels, (5,))
  encode = jax.jit(tiny.encode_image, static_argnums=2)
  with pytest.raises(ValueError, match=r"\(2, 64, 64\)"):
    encode(tiny.params, pixels[..., 0], (1,))
  with pytest.raises(ValueError, match=r"\(2, 3, 64, 64\)"):
    encode(tiny.params, pixels.transpose(0, 3, 1, 2), (1,))
  with pytest.raises(ValueError, match=r"\(2, 32, 32, 3\)"):
    encode(tiny.params, pixels[:, :32, :32], (1,))
  with pytest.raises(ValueError, match="uint8"):
    tiny.encode_image(tiny.params, pixels.astype(np.uint8), (1,))


def test_bad_activation_and_text_inputs(checkpoints, cache_dir, tiny):
  with pytest.raises(ValueError, match="'swishy'"):
    clip.load(checkpoints[1.0]["bin"], cache_dir=cache_dir, activation="swishy")
  with pytest.raises(ValueError, match=r"\(2, 78\)"):
    tiny.encode_text(tiny.params, np.zeros((2, 78), np.int32))
  embeds = np.zeros((2, 77, 64), np.float32)
  with pytest.raises(ValueError, match=r"\(3,\)"):
    tiny.encode_text_embeddings(tiny.params, embeds, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="no end-of-text"):
    tiny.eot_positions(np.zeros((2, 77), np.int32))
