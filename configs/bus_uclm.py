"""BUS-UCLM (Vallez et al. 2025), few-shot per_class, patient-disjoint.

Download BUS-UCLM by hand (see docs/DATA.md), then:

  python main.py --config configs/bus_uclm.py \
      --config.data.manual_dir=/path/to/folder/holding/BUS-UCLM \
      --workdir runs/bus_uclm

The query set of each episode excludes every image of the support patients
(file-name prefix), so no patient is on both sides. Variants: tiny, shots=K.
"""

from configs import common


def get_config(arg=None):
  """Returns the BUS-UCLM config."""
  v = common.parse_arg(arg, tiny=False, shots=4)
  c = common.get_base_config()
  c.data.name = "bus_uclm"
  c.data.split = "all"
  c.episodes.shots = v.shots
  common.set_backbone(c, tiny=v.tiny)
  c.train.steps = 200
  return c
