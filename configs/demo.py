"""Demo: the embedded ultrasound phantom with a tiny random CLIP, on a CPU.

Runs in a few minutes on 2 CPU cores, with nothing to download:

  python main.py --config configs/demo.py --workdir runs/demo

8 episodes of the per_class setting (4 shots of each of normal, benign and
malignant), trained together in one compiled program, evaluated on each
episode's query images beside the four baselines. See runs/demo/results.md.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  """Returns the demo config; `arg` accepts `quick` (a 2-step smoke run)."""
  variant = common.parse_arg(arg, quick=False)
  c = common.get_base_config()
  c.data.name = "us_phantom"
  # The phantom at 96 px, 40 images per class; difficulty 0.3 keeps lesions
  # visible to a tiny random CLIP (0.5 is the builder's default).
  c.data.options = ml_collections.ConfigDict(
      dict(image_size=96, n_per_class=40, difficulty=0.3, seed=0)
  )
  c.data.num_views = 4
  c.episodes.setting = "per_class"
  c.episodes.shots = 4
  c.episodes.num_episodes = 8
  c.backbone.name = "tiny"
  c.model = common.model_config(layers=(1, 2, 3, 4))
  c.train.steps = 150
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 10
  c.train.log_every = 25
  c.checkpoint.every_steps = 50
  if variant.quick:
    c.train.steps = 2
    c.episodes.num_episodes = 2
    c.data.num_views = 2
    c.mesh.num_devices = 1
  return c
