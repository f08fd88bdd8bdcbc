"""The peer-style PyTorch few-shot loop the engine is compared with.

As MVFA and MediCLIP train their heads: per episode and step, a forward of
the frozen image tower on the support batch, then an update of the head.
The head is this project's (`peer_ultraad.py`: the same head and loss as
the engine, from the same initial values) or a lighter MVFA-style one
(`peer_loss`).
"""

import functools
import math
import time

import numpy as np

import bench_backbone
import bench_machine
import sweep_inputs
from ultraad_jax import clip


def peer_loss(w1, b1, w2, b2, tokens, text, masks, gamma=2.0):
  """The MVFA-style head's loss on one support batch (PyTorch).

  The lighter head of `--peer_head mvfa`. Per tapped layer: a bottleneck
  adapter mixed into the tokens (0.8 x + 0.2 adapter(x), as MVFA's), cosine
  similarity to the [normal, abnormal] text features, a softmax at
  temperature 0.01, bilinear upsampling of the abnormal probability to the
  image size, focal + dice loss against the masks. The layers' adapters are
  stacked so that one batched matmul serves them all.

  Args:
    w1: [L, D, R] first adapter weights; b1 [L, R].
    b1: see w1.
    w2: [L, R, D] second adapter weights; b2 [L, D].
    b2: see w2.
    tokens: [L, B, N, D] frozen patch tokens.
    text: [2, D] unit-norm text features.
    masks: [B, H, W] float masks in {0, 1}.
    gamma: focal loss exponent.

  Returns:
    The scalar loss.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  act = F.leaky_relu
  h = act(torch.einsum("lbnd,ldr->lbnr", tokens, w1) + b1[:, None, None])
  a = act(torch.einsum("lbnr,lrd->lbnd", h, w2) + b2[:, None, None])
  x = F.normalize(0.8 * tokens + 0.2 * a, dim=-1)
  prob = torch.softmax(100.0 * x @ text.T, dim=-1)[..., 1]  # [L, B, N]
  num_layers, b, n = prob.shape
  grid = int(round(math.sqrt(n)))
  size = masks.shape[-1]
  prob = F.interpolate(
      prob.reshape(num_layers * b, 1, grid, grid), size=(size, size),
      mode="bilinear", align_corners=False,
  ).reshape(num_layers, b, size, size)  # fmt: skip
  m = masks[None]
  p = prob.clamp(1e-6, 1.0 - 1e-6)
  p_true = torch.where(m > 0.5, p, 1.0 - p)
  focal = (-((1.0 - p_true) ** gamma) * torch.log(p_true)).mean()
  inter = (p * m).sum((2, 3))
  dice = 1.0 - (2.0 * inter + 1.0) / (p.sum((2, 3)) + m.sum((2, 3)) + 1.0)
  return focal + dice.mean()


PEER_HEADS = ("ultraad", "mvfa")


class TorchPeer:
  """The peer-style PyTorch few-shot loop, made as fast as a user would.

  Frozen CLIP image tower: the same weights as the JAX backbone,
  `torch.compile` with freezing, run under `torch.no_grad` on the whole
  support batch at once, every step (the peers' loop). Images are already
  normalised tensors in memory (no data loading or augmentation is timed).
  Threads = cores unless told otherwise.

  Heads:
  * "ultraad": the project's head and loss (`peer_ultraad.loss_fn`, equal
    to `model.loss_fn`), from the JAX side's `model.init` values, trained
    with `train.make_optimizer`'s recipe: global-norm clipping, then fused
    AdamW on the same warmup-cosine learning rates.
  * "mvfa": `peer_loss`, fused Adam.
  The head's loss is `torch.compile`d (forward and backward) when
  compile_head is set.

  `split` accumulates the time of the episodes' phases since the last
  `reset_split()`: "init_s" (backbone forward for the bank, buffers and
  optimiser), "backbone_s" (the per-step forwards), "head_s" (loss,
  backward, clipping and optimiser step), and "steps". On a GPU the clock
  synchronises the device between phases (two syncs a step).
  """

  def __init__(self, backbone, layers, images, masks, labels=None, *,
               cfg=None, head="ultraad", device="cpu", compile_backbone=True,
               compile_head=True, reduction=4, threads=0):  # fmt: skip
    """Builds the peer.

    Args:
      backbone: the clip.Backbone whose weights the peer copies.
      layers: tapped blocks.
      images: [n, H, W, 3] uint8 pool.
      masks: [n, H, W] uint8 masks.
      labels: [n] pool labels (needed by the "ultraad" head).
      cfg: model.ModelConfig ("ultraad" head).
      head: one of PEER_HEADS.
      device: the torch device.
      compile_backbone: torch.compile the image tower (with freezing).
      compile_head: torch.compile the head's loss.
      reduction: the "mvfa" adapters' hidden width is D // reduction.
      threads: PyTorch's intra-op threads (0: one per core).

    Raises:
      ValueError: an unknown head, a missing cfg / labels, or a model config
        the PyTorch UltraAD head does not implement (naming the key).
    """
    import torch  # pylint: disable=g-import-not-at-top

    import peer_ultraad  # pylint: disable=g-import-not-at-top

    if head not in PEER_HEADS:
      raise ValueError(f"peer head {head!r}; expected one of {PEER_HEADS}.")
    torch.set_num_threads(threads or bench_machine.num_cores())
    self.torch = torch
    self.pu = peer_ultraad
    self.head = head
    self.device = device
    self.dim = backbone.embed_dim
    self.num_layers = len(layers)
    self.rank = max(1, self.dim // reduction)
    self.image_size = backbone.image_size
    pt_model = bench_backbone.torch_clip(backbone, device)
    self.encoder = bench_backbone.torch_image_encoder(pt_model, layers)
    if compile_backbone:
      self.encoder = bench_backbone.compile_torch(self.encoder)
    pixels = np.ascontiguousarray(clip.normalize(images).transpose(0, 3, 1, 2))
    self.pixels = torch.from_numpy(pixels).to(device)
    self.masks = torch.from_numpy(masks.astype(np.float32)).to(device)
    self.reset_split()
    self._rates = {}
    # The optimiser's settings (read here: building a config is not timed).
    self.train_config = sweep_inputs.sweep_train_config(1)
    if head == "mvfa":
      loss = peer_loss
    else:
      if cfg is None or labels is None:
        raise ValueError("The 'ultraad' peer head needs cfg and labels.")
      self.pu.check_config(cfg, image_size=backbone.image_size)
      self.cfg = cfg
      self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64,
                                    device=device)  # fmt: skip
      self.tower = self.pu.TextTower(pt_model)
      # Per-config constants, built once as a peer builds its prompts.
      self.prompt = self.pu.prompt_buffers(cfg, backbone, self.tower)
      loss = functools.partial(self.pu.loss_fn, cfg=cfg,
                               tower=self.tower,
                               image_size=backbone.image_size)  # fmt: skip
    self.loss = torch.compile(loss, dynamic=False) if compile_head else loss

  def reset_split(self):
    """Zeroes the per-phase time accumulators (`split`)."""
    self.split = {"init_s": 0.0, "backbone_s": 0.0, "head_s": 0.0, "steps": 0}

  def _clock(self):
    bench_backbone.torch_sync(self.device)
    return time.perf_counter()

  def prepare(self, init_params, text_embed, steps):
    """Converts one episode's JAX-side inputs to tensors (not timed).

    Args:
      init_params: the episode's `model.init` pytree (numpy or JAX).
      text_embed: [S, D] its description embeddings.
      steps: the training steps the episode will run (its learning rates).

    Returns:
      What `episode(..., prepared=)` takes.
    """
    torch = self.torch
    if steps not in self._rates:
      # optax's own schedule, evaluated once per step count: the same rates
      # as the engine's, without timing eager JAX calls in the episodes.
      self._rates[steps] = sweep_inputs.learning_rates(
          sweep_inputs.sweep_train_config(steps)
      ).tolist()
    return {
        "params": self.pu.params_from_jax(init_params, self.device),
        "text_embed": torch.as_tensor(np.array(text_embed), device=self.device),
        "rates": self._rates[steps],
    }

  def episode(self, support, steps, seed=0, prepared=None):
    """Trains one episode's head for `steps` steps; returns the last loss.

    Args:
      support: [S] pool indices of the support images.
      steps: training steps.
      seed: random seed ("mvfa" head initialisation).
      prepared: from `prepare` ("ultraad" head; required there). Its
        parameters are trained in place.

    Returns:
      The final loss (float).
    """
    if self.head == "mvfa":
      return self._episode_mvfa(support, steps, seed)
    if prepared is None:
      raise ValueError("The 'ultraad' peer head needs prepare()'s output.")
    return self._episode_ultraad(support, steps, prepared)

  def _episode_ultraad(self, support, steps, prepared):
    torch = self.torch
    idx = torch.as_tensor(np.asarray(support), device=self.device)
    t0 = self._clock()
    x, m, labels = self.pixels[idx], self.masks[idx], self.labels[idx]
    group = torch.arange(len(idx), device=self.device)
    params = prepared["params"]
    # The bank's image entries (Ft) start at the support's normalised global
    # embeddings, as in model.init; a peer gets them from a forward pass.
    with torch.no_grad():
      g, _, _ = self.encoder(x)
      params["bank_image"] = self.pu.l2_normalize(g.float()).clone()
    params["bank_image"].requires_grad_()
    buffers = {
        **self.prompt,
        **self.pu.bank_buffers(labels, group, prepared["text_embed"]),
    }
    weights = self.pu.leaves(params)
    tc = self.train_config
    rates = prepared["rates"]
    if len(rates) != steps:
      raise ValueError(
          f"prepare() was given steps={len(rates)}, episode() steps={steps}."
      )
    opt = torch.optim.AdamW(weights, lr=0.0, betas=(tc.b1, tc.b2),
                            weight_decay=tc.weight_decay,
                            fused=True)  # fmt: skip
    t1 = self._clock()
    self.split["init_s"] += t1 - t0

    def head_step(step, g, tokens):
      support_t = self.pu.Support(g, tokens, m, labels, group)
      loss, _ = self.loss(params, buffers, support_t)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(weights, tc.grad_clip, foreach=True)
      opt.param_groups[0]["lr"] = rates[step]
      opt.step()
      return loss

    return self._timed_steps(x, steps, t1, head_step)

  def _timed_steps(self, x, steps, t1, head_step):
    """Per step: the backbone on the support (no_grad), then `head_step`.

    Accumulates the two phases' times into `split` (t1: the clock at the
    start of the first step) and returns the last loss.
    """
    loss = None
    for step in range(steps):
      with self.torch.no_grad():
        g, tokens, _ = self.encoder(x)
      t2 = self._clock()
      loss = head_step(step, g, tokens)
      t3 = self._clock()
      self.split["backbone_s"] += t2 - t1
      self.split["head_s"] += t3 - t2
      t1 = t3
    self.split["steps"] += steps
    return float(loss.detach())

  def _episode_mvfa(self, support, steps, seed):
    torch = self.torch
    gen = torch.Generator().manual_seed(seed)
    l, d, r = self.num_layers, self.dim, self.rank
    t0 = self._clock()

    def weight(*shape, fan_in):
      w = torch.randn(*shape, generator=gen) / math.sqrt(fan_in)
      return w.to(self.device).requires_grad_()

    weights = [
        weight(l, d, r, fan_in=d),
        torch.zeros(l, r, device=self.device, requires_grad=True),
        weight(l, r, d, fan_in=r),
        torch.zeros(l, d, device=self.device, requires_grad=True),
    ]
    text = torch.nn.functional.normalize(
        torch.randn(2, d, generator=gen).to(self.device), dim=-1
    )
    opt = torch.optim.Adam(weights, lr=1e-3, fused=True)
    idx = torch.as_tensor(np.asarray(support), device=self.device)
    x, m = self.pixels[idx], self.masks[idx]
    t1 = self._clock()
    self.split["init_s"] += t1 - t0

    def head_step(_, g, tokens):
      del g  # The MVFA-style head uses the patch tokens only.
      loss = self.loss(*weights, tokens, text, m)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return loss

    return self._timed_steps(x, steps, t1, head_step)
