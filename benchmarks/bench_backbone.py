"""The backbone's forward: JAX's encode_image against PyTorch's CLIPModel.

The same weights (copied from Flax with transformers' flax->pytorch
loader) and the same pixels on both sides. PyTorch runs as a stock install
runs at its fastest: `torch.compile` with inductor's freezing, under
`torch.no_grad`, threads set to the core count. The f32 paths compute true
f32 products on both sides; bf16 and the platforms' fast f32 paths are
timed on request. The JAX FLOP rate (XLA's cost analysis) gives the MFU
against the machine's peak, or the floors against an accelerator's spec
sheet (`spec_shares`).
"""

import contextlib
import dataclasses
import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import accelerator_peaks
import bench_machine
import bench_timing
from ultraad_jax import clip


def tapped_layers(num_layers):
  """Four evenly spaced blocks ending at the last, as the peers tap them."""
  if num_layers < 4:
    return tuple(range(1, num_layers + 1))
  return tuple(num_layers * k // 4 for k in (1, 2, 3, 4))


def make_backbone(name, seed=0):
  """A randomly initialised clip.Backbone: "tiny" or an OpenAI CLIP shape.

  Speed does not depend on the weights' values; "tiny" uses clip.tiny's
  init scale so that its blocks mix as a trained model's do.

  Args:
    name: "tiny" or a name `clip.openai_config` knows ("ViT-B/16", ...).
    seed: the initialisation seed.

  Returns:
    A clip.Backbone (float32).
  """
  if name == "tiny":
    return clip.tiny(seed=seed)
  return clip.from_config(clip.openai_config(name), seed=seed)


def analytic_vit_flops(backbone, num_tapped):
  """Hand count of the image tower's FLOPs per image (2 per multiply-add).

  Patch embedding, per block QKV / output / MLP matmuls and the two
  attention matmuls, the pooled projection and the projection of the tapped
  tokens. Norms, softmax and activations are left out (a few percent).

  Args:
    backbone: a clip.Backbone.
    num_tapped: the number of tapped layers (their tokens are projected).

  Returns:
    FLOPs per image.
  """
  v = backbone.config.vision_config
  n = backbone.grid_size**2
  t = n + 1
  w, mlp = v.hidden_size, v.intermediate_size
  d = backbone.embed_dim
  patch = 2 * n * 3 * v.patch_size**2 * w
  block = 2 * t * (4 * w * w + 2 * w * mlp) + 2 * 2 * t * t * w
  proj = 2 * w * d * (1 + num_tapped * n)
  return patch + v.num_hidden_layers * block + proj


def torch_clip(backbone, device="cpu"):
  """A PyTorch CLIPModel holding the same weights as `backbone`.

  Built from the same CLIPConfig and filled by transformers'
  `load_flax_weights_in_pytorch_model` (`from_pretrained(from_flax=True)`
  is broken with torch 2.13).

  Args:
    backbone: a clip.Backbone (float32 parameters).
    device: the torch device.

  Returns:
    The CLIPModel in eval mode.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers import modeling_flax_pytorch_utils as pt_utils

  transformers.logging.set_verbosity_error()

  config = transformers.CLIPConfig.from_dict(backbone.config.to_dict())
  config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  pt = transformers.CLIPModel(config)
  params = jax.tree.map(lambda x: np.array(x, np.float32), backbone.params)
  with warnings.catch_warnings():
    # transformers hands torch read-only views of the (copied) arrays.
    warnings.filterwarnings("ignore", message=".*not writable.*")
    pt = pt_utils.load_flax_weights_in_pytorch_model(pt, params)
  return pt.eval().to(device)


def torch_image_encoder(pt_model, layers):
  """The PyTorch twin of `Backbone.encode_image`, as a torch.nn.Module.

  Args:
    pt_model: a transformers CLIPModel.
    layers: tapped blocks (hidden_states numbering).

  Returns:
    A module mapping NCHW pixels to (global [B, D], projected tokens
    [L, B, N, D], raw tokens [L, B, N, W]).
  """
  import torch  # pylint: disable=g-import-not-at-top

  class ImageEncoder(torch.nn.Module):
    """Vision tower + projection of the global and the tapped tokens."""

    def __init__(self):
      super().__init__()
      self.vision = pt_model.vision_model
      self.projection = pt_model.visual_projection
      self.layers = tuple(layers)

    def forward(self, pixels):
      out = self.vision(pixel_values=pixels, output_hidden_states=True)
      global_embed = self.projection(out.pooler_output)
      raw = torch.stack([out.hidden_states[i][:, 1:] for i in self.layers])
      tokens = self.projection(self.vision.post_layernorm(raw))
      return global_embed, tokens, raw

  return ImageEncoder().eval()


def compile_torch(module):
  """torch.compile with inductor's freezing: a stock install's fastest path.

  Freezing folds the frozen weights into the graph as constants (and lets
  inductor pre-pack them for oneDNN); it applies under no_grad/inference.

  Args:
    module: a torch.nn.Module in eval mode.

  Returns:
    The compiled module (compiles on its first call).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch._inductor import config as inductor_config  # pylint: disable=all

  inductor_config.freezing = True
  return torch.compile(module, dynamic=False)


def torch_sync(device):
  import torch  # pylint: disable=g-import-not-at-top

  if device == "cuda":
    torch.cuda.synchronize()


@contextlib.contextmanager
def torch_matmul_precision(tf32):
  """PyTorch's f32 products on CUDA: true f32, or TF32 tensor cores.

  PyTorch's defaults differ by op: matrix products in true f32, cuDNN's
  convolutions (CLIP's patch embedding) in TF32. Both follow `tf32` here, so
  that each side of a comparison computes what the other does. CPUs ignore
  both settings.

  Args:
    tf32: allow TF32 in matrix products and convolutions.

  Yields:
    None; the previous settings come back on exit.
  """
  import torch  # pylint: disable=g-import-not-at-top

  old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = tf32
  torch.backends.cudnn.allow_tf32 = tf32
  try:
    yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def measure(
    name,
    *,
    batch,
    repeats,
    warmup,
    bf16=True,
    with_torch=True,
    torch_device="cpu",
    torch_compile=True,
    peak_gflops=None,
    fast_f32=False,
    seed=0,
):
  """Times encode_image (JAX) against its PyTorch twin at one model size.

  The f32 paths compute true f32 products on both sides, on every platform
  (JAX's precision "float32"; PyTorch with TF32 off). With `fast_f32`, the
  platform's fast f32 path is timed too: JAX's default precision (TF32 on
  NVIDIA GPUs, one bf16 pass on TPU) against PyTorch with TF32 on.

  Args:
    name: "tiny" or an OpenAI CLIP name (random weights).
    batch: images per call.
    repeats: timed calls per contender.
    warmup: untimed calls first.
    bf16: also time the bf16 paths.
    with_torch: time PyTorch (else JAX only).
    torch_device: "cpu" or "cuda".
    torch_compile: torch.compile the PyTorch side (off only in tests).
    peak_gflops: the f32 peak for the MFU (None: no MFU).
    fast_f32: also time the fast f32 paths (by default on accelerators;
      on a CPU they compute what the f32 paths do).
    seed: weights and pixels seed.

  Returns:
    A dict: ms/image of each path, ratios, FLOPs, MFU, output agreement.
  """
  backbone = make_backbone(name, seed=seed)
  layers = tapped_layers(backbone.num_layers)
  size = backbone.image_size
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  pixels_np = clip.normalize(images)
  pixels = jax.device_put(pixels_np)
  params = jax.device_put(backbone.params)
  encode = jax.jit(backbone.encode_image, static_argnums=2)
  # The precision is read when the program is traced (here, by lower).
  with jax.default_matmul_precision("float32"):
    compiled = encode.lower(params, pixels, layers).compile()
  cost = bench_timing.xla_cost(compiled)
  flops = float(cost.get("flops", float("nan")))

  jax.block_until_ready(compiled(params, pixels))
  start = time.perf_counter()
  jax.block_until_ready(compiled(params, pixels))
  # Small models run several calls per timed sample (>= ~0.1 s), so that
  # timer and dispatch noise stay small against the work.
  inner = int(min(100, max(1, math.ceil(0.1 / (time.perf_counter() - start)))))

  def repeat(fn):
    def run():
      for _ in range(inner):
        fn()

    return run

  fns = {"jax_f32": lambda: jax.block_until_ready(compiled(params, pixels))}
  if fast_f32:
    with jax.default_matmul_precision("default"):
      compiled_fast = encode.lower(params, pixels, layers).compile()
    fns["jax_fast_f32"] = lambda: jax.block_until_ready(
        compiled_fast(params, pixels)
    )
  if bf16:
    bb16 = dataclasses.replace(backbone, dtype=jnp.bfloat16)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    compiled16 = (
        jax.jit(bb16.encode_image, static_argnums=2)
        .lower(params16, pixels, layers)
        .compile()
    )
    fns["jax_bf16"] = lambda: jax.block_until_ready(
        compiled16(params16, pixels)
    )

  result = {
      "model": name,
      "image_size": size,
      "batch": batch,
      "layers": list(layers),
      "jax_flops_per_image": flops / batch,
      "analytic_flops_per_image": analytic_vit_flops(backbone, len(layers)),
      "jax_bytes_accessed_per_image": float(
          cost.get("bytes accessed", float("nan"))
      ) / batch,
  }  # fmt: skip
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(bench_machine.num_cores())
    pt_model = torch_clip(backbone, torch_device)
    encoder = torch_image_encoder(pt_model, layers)
    x = torch.from_numpy(np.ascontiguousarray(pixels_np.transpose(0, 3, 1, 2)))
    x = x.to(torch_device)
    with torch.no_grad(), torch_matmul_precision(tf32=False):
      eager_out = [t.float().cpu().numpy() for t in encoder(x)]
    jax_out = jax.device_get(compiled(params, pixels))
    result["max_abs_diff_torch_vs_jax"] = float(max(
        np.max(np.abs(a - b)) for a, b in zip(eager_out, jax_out)
    ))  # fmt: skip
    maybe_compile = compile_torch if torch_compile else (lambda m: m)

    def timed_call(module, context):
      def run():
        with torch.no_grad(), context():
          module(x)
        torch_sync(torch_device)

      return run

    fns["torch_f32"] = timed_call(
        maybe_compile(encoder), lambda: torch_matmul_precision(tf32=False)
    )
    if fast_f32:
      # Its own compiled module: inductor reads the TF32 switch when it
      # compiles.
      fns["torch_fast_f32"] = timed_call(
          maybe_compile(torch_image_encoder(pt_model, layers)),
          lambda: torch_matmul_precision(tf32=True),
      )
    if bf16:
      # A second compiled module: its graph is traced under autocast.
      fns["torch_bf16"] = timed_call(
          maybe_compile(torch_image_encoder(pt_model, layers)),
          lambda: torch.autocast(
              device_type=torch_device, dtype=torch.bfloat16
          ),
      )

  timings = bench_timing.time_interleaved(
      {k: repeat(f) for k, f in fns.items()}, repeats, warmup
  )
  for t in timings.values():
    for key in ("median_s", "min_s", "max_s"):
      t[key] /= inner
  result["calls_per_sample"] = inner
  result["timings"] = timings
  names = {"jax_f32": "jax_ms_per_image", "jax_bf16": "jax_ms_per_image_bf16",
           "jax_fast_f32": "jax_ms_per_image_fast_f32",
           "torch_f32": "torch_ms_per_image",
           "torch_bf16": "torch_ms_per_image_bf16",
           "torch_fast_f32": "torch_ms_per_image_fast_f32"}  # fmt: skip
  for key, t in timings.items():
    result[names[key]] = 1e3 * t["median_s"] / batch
  result["jax_gflops"] = flops / timings["jax_f32"]["median_s"] / 1e9
  if with_torch:
    # The same work, so XLA's FLOP count serves for PyTorch too.
    result["torch_gflops"] = flops / timings["torch_f32"]["median_s"] / 1e9
  if peak_gflops:
    result["mfu"] = result["jax_gflops"] / peak_gflops
    if with_torch:
      result["torch_share_of_peak"] = result["torch_gflops"] / peak_gflops
  if with_torch:
    result["speedup"] = (
        result["torch_ms_per_image"] / result["jax_ms_per_image"]
    )
    if fast_f32:
      result["speedup_fast_f32"] = (
          result["torch_ms_per_image_fast_f32"]
          / result["jax_ms_per_image_fast_f32"]
      )
    if bf16:
      result["speedup_bf16"] = (
          result["torch_ms_per_image_bf16"] / result["jax_ms_per_image_bf16"]
      )
      best_torch = min(result["torch_ms_per_image"],
                       result["torch_ms_per_image_bf16"])  # fmt: skip
      best_jax = min(result["jax_ms_per_image"],
                     result["jax_ms_per_image_bf16"])  # fmt: skip
      result["speedup_best_vs_best"] = best_torch / best_jax
  return result


def spec_shares(bb, spec, backend):
  """Floors and MFUs of the JAX backbone paths against a spec sheet's peaks.

  Each path is bounded by the peak of the arithmetic it runs: the f32 path
  (true f32 products) by the fp32 peak; the fast f32 path (JAX's default
  precision) by the TF32 peak on a GPU and the bf16 peak on a TPU (one bf16
  pass); the bf16 path by the bf16 peak. All use XLA's FLOP count of the
  f32 program (the same work).

  Args:
    bb: `measure`'s result.
    spec: an `accelerator_peaks.spec_peak` entry.
    backend: jax.default_backend().

  Returns:
    {"floor_ms_per_image<suffix>", "mfu_spec<suffix>", "peak_of<suffix>"}
    for each timed path whose peak the spec sheet gives (suffix "",
    "_fast_f32" or "_bf16").
  """
  bounds = {"": "fp32", "_fast_f32": "tf32" if backend == "gpu" else "bf16",
            "_bf16": "bf16"}  # fmt: skip
  out = {}
  for suffix, name in bounds.items():
    ms = bb.get(f"jax_ms_per_image{suffix}")
    seconds = accelerator_peaks.floor(bb["jax_flops_per_image"], spec[name])
    if ms is None or seconds is None:
      continue
    out[f"floor_ms_per_image{suffix}"] = 1e3 * seconds
    out[f"mfu_spec{suffix}"] = 1e3 * seconds / ms
    out[f"peak_of{suffix}"] = name
  return out
