"""BUSI (Al-Dhabyani et al. 2020), few-shot per_class, OpenAI ViT-L/14@336.

Download Dataset_BUSI_with_GT by hand (see docs/DATA.md), then:

  python main.py --config configs/busi.py \
      --config.data.manual_dir=/path/to/folder/holding/Dataset_BUSI_with_GT \
      --workdir runs/busi

Variants after the colon (comma-separated):
  tiny        a tiny random CLIP at 96 px: runs on a CPU in minutes
              (python main.py --config configs/busi.py:tiny
               --config.data.manual_dir=../shared/data)
  shots=K     shots per class (1, 2, 4, 8 or 16; default 4)
  normal_only MediCLIP's setting: K normal shots only
The weights (openai/clip-vit-large-patch14-336) are downloaded from the
Hugging Face hub on first use, or read from a local folder given as
--config.backbone.name=/path/to/folder (see README.md).
"""

from configs import common


def get_config(arg=None):
  """Returns the BUSI config (see the module docstring for variants)."""
  v = common.parse_arg(arg, tiny=False, shots=4, normal_only=False)
  if v.shots not in (1, 2, 4, 8, 16):
    raise ValueError(f"busi.py: shots={v.shots}; choose 1, 2, 4, 8 or 16.")
  c = common.get_base_config()
  c.data.name = "busi"
  c.data.split = "all"
  c.data.num_views = 4
  c.episodes.setting = "normal_only" if v.normal_only else "per_class"
  c.episodes.shots = v.shots
  common.set_backbone(c, tiny=v.tiny)
  c.train.steps = 200
  c.train.learning_rate = 1e-3
  if v.tiny:
    c.train.steps = 150
    c.train.learning_rate = 3e-3
  return c
