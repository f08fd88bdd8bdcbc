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
  common.set_backbone(c, tiny=v.tiny)
  c.train.steps = 200
  return c
