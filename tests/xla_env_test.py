"""Tests for the process environment set before JAX starts (xla_env)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ultraad_jax import xla_env


@pytest.fixture
def thp(tmp_path, monkeypatch):
  """Points the transparent-huge-page mode at a file the test writes."""
  path = tmp_path / "enabled"
  monkeypatch.setattr(xla_env, "_THP_MODE", str(path))
  monkeypatch.setattr(xla_env, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(sys, "platform", "linux")
  return path


def test_hugepage_environment_only_when_it_helps(thp):
  thp.write_text("always [madvise] never\n")
  env = xla_env.hugepage_environment({"PATH": "/bin"})
  assert env["GLIBC_TUNABLES"] == xla_env.HUGEPAGE_TUNABLE
  assert env["PATH"] == "/bin"
  # Other tunables are kept.
  env = xla_env.hugepage_environment({"GLIBC_TUNABLES": "glibc.x=1"})
  assert env["GLIBC_TUNABLES"] == "glibc.x=1:" + xla_env.HUGEPAGE_TUNABLE
  # Already set (also the restarted process), turned off, THP always/never.
  assert xla_env.hugepage_environment(
      {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # fmt: skip
  assert xla_env.hugepage_environment({"ULTRAAD_HUGEPAGES": "0"}) is None
  for mode in ("[always] madvise never\n", "always madvise [never]\n"):
    thp.write_text(mode)
    assert xla_env.hugepage_environment({}) is None


def test_hugepage_environment_needs_glibc_2_35(thp, monkeypatch):
  thp.write_text("always [madvise] never\n")
  monkeypatch.setattr(xla_env, "_glibc_version", lambda: (2, 31))
  assert xla_env.hugepage_environment({}) is None
  monkeypatch.setattr(xla_env, "_glibc_version", lambda: None)  # musl etc.
  assert xla_env.hugepage_environment({}) is None


def test_use_hugepage_malloc_restarts_once_with_the_same_command():
  code = (
      "import os, sys; sys.path.insert(0, os.getcwd());"
      "from ultraad_jax import xla_env;"
      "print('start', flush=True);"
      "xla_env.use_hugepage_malloc();"
      "print('tunables', os.environ.get('GLIBC_TUNABLES'))"
  )
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "ULTRAAD_HUGEPAGES")}  # fmt: skip
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-c", code],
      env=env,
      cwd=root,
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  expected = xla_env.hugepage_environment(env)
  if expected is None:
    # Not applicable on this machine: the process runs once, unchanged.
    assert out.split("\n")[:2] == ["start", "tunables None"]
  else:
    assert out.split("\n")[:3] == [
        "start", "start", "tunables " + expected["GLIBC_TUNABLES"]]  # fmt: skip


def test_configure_turns_the_compilation_cache_on_after_jax_is_imported(
    tmp_path,
):
  # main.py imports JAX (through the config) before configure() runs; the
  # cache must be on anyway, and a second process must reuse its entries.
  code = (
      "import os, sys; sys.path.insert(0, os.getcwd());"
      "import jax;"
      "from ultraad_jax import xla_env;"
      "xla_env.configure();"
      "print(jax.config.jax_compilation_cache_dir);"
      "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0);"
      "f = jax.jit(lambda x: jax.numpy.sin(x) @ x.T);"
      "print(float(f(jax.numpy.ones((64, 64))).sum()))"
  )
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_PERSISTENT") and k != "JAX_COMPILATION_CACHE_DIR"}  # fmt: skip
  env["HOME"] = str(tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda: subprocess.run(
      [sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
      text=True, check=True).stdout.split("\n")  # fmt: skip
  first = run()
  cache = tmp_path / ".cache" / "ultraad_jax" / "jax"
  assert first[0] == str(cache)
  entries = sorted(p.name for p in cache.iterdir())
  assert any(name.startswith("jit_") for name in entries), entries
  assert run()[:2] == first[:2]
  assert sorted(p.name for p in cache.iterdir()) == entries  # reused


def test_head_compiler_options_by_size_and_accepted_by_xla():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  small = xla_env.head_compiler_options(1000)
  large = xla_env.head_compiler_options(xla_env.REDUCE_FUSION_MIN_ELEMENTS)
  assert small == {}
  assert jax.default_backend() == "cpu"  # conftest.py forces CPU.
  assert large == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"
  }
  # XLA accepts the option and the program computes the same values.
  x = jnp.arange(12.0).reshape(3, 4)
  fn = jax.jit(lambda x: jnp.sum(x * x, axis=-1), compiler_options=large)
  np.testing.assert_allclose(fn(x), np.sum(np.square(np.asarray(x)), -1))
