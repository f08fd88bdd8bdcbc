"""Runs one UltraAD experiment: `python main.py --config configs/demo.py`.

Everything happens in ultraad_jax.train.train_and_evaluate; this file only
parses flags, sets up logging and the XLA environment, and hands over.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ultraad_jax import xla_env

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. configs/demo.py.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output folder (created; rerunning resumes). Defaults to "
    "runs/<config name>.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/demo.py")
  workdir = _WORKDIR.value or os.path.join(
      "runs",
      os.path.splitext(
          os.path.basename(
              config_flags.get_config_filename(flags.FLAGS["config"])
          )
      )[0],
  )
  # XLA reads its flags when the backend starts, so they are set before the
  # engine (and with it any device use) is imported.
  xla_env.configure(
      dump_hlo_dir=os.path.join(workdir, "hlo", "xla_dump")
      if config.dump_hlo
      else None
  )
  from ultraad_jax import sweep  # pylint: disable=g-import-not-at-top

  logging.info("Workdir: %s", os.path.abspath(workdir))
  sweep.run(config, workdir)


class _QuietLibraries:
  """Drops INFO lines from libraries (orbax logs every file it writes)."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow_datasets/")
    return record.levelno > 20 or not any(p in record.pathname for p in noisy)


if __name__ == "__main__":
  # Restarts the process once, before any work (flag parsing already loads
  # the config and with it JAX), with a faster malloc setting.
  xla_env.use_hugepage_malloc()
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.exit(app.run(main))
