"""Adapt on BUS-UCLM shots, test on all of BUSI with no further adaptation.

The cross-dataset protocol of UltraAD's BUSI results: the support set (and
all training) comes from BUS-UCLM; every BUSI image is a query.

  python main.py --config configs/cross_uclm_to_busi.py \
      --config.data.manual_dir=/path/to/folder/holding/BUS-UCLM \
      --config.data.test_manual_dir=/path/to/folder/holding/Dataset_BUSI_with_GT \
      --workdir runs/cross_uclm_to_busi

Variants: tiny, shots=K.
"""

from configs import common


def get_config(arg=None):
  """Returns the cross-dataset config."""
  v = common.parse_arg(arg, tiny=False, shots=4)
  c = common.get_base_config()
  c.data.name = "bus_uclm"
  c.data.split = "all"
  c.data.test_name = "busi"
  c.data.test_split = "all"
  c.episodes.shots = v.shots
  c.episodes.num_episodes = 16
  c.backbone.name = "openai/clip-vit-large-patch14-336"
  c.model = common.model_config(layers=(6, 12, 18, 24))
  c.train.steps = 200
  c.cache.dtype = "bfloat16"
  c.cache.memory_budget_gb = 32.0
  c.eval.batch_size = 16
  if v.tiny:
    c.backbone.name = "tiny"
    c.backbone.image_size = 96
    c.model = common.model_config(layers=(1, 2, 3, 4))
    c.episodes.num_episodes = 8
    c.cache.dtype = "float32"
  return c
