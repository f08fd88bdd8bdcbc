"""Fixtures of the engine tests: the session's prepared phantom data.

The environment itself (8 fake CPU devices, the compile cache) is set by the
repository's root conftest.py.
"""

import pytest

import engine_helpers
from ultraad_jax import data as data_lib


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS folder holding both test phantoms, shared by xdist workers.

  Prepared up front (under the shared lock) so that parallel runs never
  prepare the same dataset at once.
  """

  def prepare(path):
    for options in (engine_helpers.PHANTOM, engine_helpers.CROSS_PHANTOM):
      data_lib.load("us_phantom", data_dir=str(path), **options)

  return engine_helpers.shared_path(tmp_path_factory, "tfds", prepare)
