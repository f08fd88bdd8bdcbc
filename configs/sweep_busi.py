"""Sweep over shots x seeds on BUSI: every shot count, many episodes each.

Each shot count is one compiled program holding all its episodes (seeds x
draws); the shot counts run one after another into <workdir>/shots_<k>, and
<workdir>/sweep.md, sweep.json and sweep.png put every metric of the model
and the baselines against the number of shots (ultraad_jax/sweep.py).

  python main.py --config configs/sweep_busi.py \
      --config.data.manual_dir=/path/to/folder/holding/Dataset_BUSI_with_GT \
      --workdir runs/sweep_busi

On a CPU: `--config configs/sweep_busi.py:tiny` (tiny CLIP, 96 px).
Variants: tiny, episodes=N (episodes per shot count, default 64).
"""

from configs import busi
from configs import common


def get_config(arg=None):
  """Returns the sweep config."""
  v = common.parse_arg(arg, tiny=False, episodes=64)
  c = busi.get_config("tiny" if v.tiny else None)
  c.sweep.shots = (1, 2, 4, 8, 16)
  c.episodes.num_episodes = v.episodes
  return c
