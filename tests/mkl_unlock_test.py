"""Tests of benchmarks/mkl_unlock.py: the shim loads where it is preloaded.

No timing: whether MKL then runs faster is the benchmark's business
(docs/PERFORMANCE.md). What is checked: the applicability rule, the
environment it builds, and that a process started with that environment has
the shim mapped and answers MKL's vendor question with "Intel", while a
process started without it does not.
"""

import os
import platform
import subprocess
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
)
import mkl_unlock  # pylint: disable=g-import-not-at-top,wrong-import-position
import native_peak  # pylint: disable=g-import-not-at-top,wrong-import-position

_ON_LINUX_X86 = platform.system() == "Linux" and platform.machine() == "x86_64"


def _build_or_skip(tmp_path):
  if not _ON_LINUX_X86:
    pytest.skip("LD_PRELOAD shims are for Linux on x86-64")
  if not native_peak.c_compiler():
    pytest.skip("no C compiler on PATH to build mkl_unlock.c")
  return mkl_unlock.build(str(tmp_path))


def test_applies_only_to_amd_with_mkl():
  if not _ON_LINUX_X86:
    assert mkl_unlock.reason_not_applicable("AMD", True) is not None
    return
  assert mkl_unlock.reason_not_applicable("AMD", True) is None
  assert "Intel" in mkl_unlock.reason_not_applicable("Intel", True)
  assert "without MKL" in mkl_unlock.reason_not_applicable("AMD", False)


def test_environment_puts_the_shim_first_and_keeps_other_preloads():
  env = mkl_unlock.environment("/x/libmkl_unlock.so", {"LD_PRELOAD": "/y.so"})
  assert env["LD_PRELOAD"] == "/x/libmkl_unlock.so /y.so"
  assert env[mkl_unlock.MARKER] == "1"
  assert mkl_unlock.environment("/x/l.so", {})["LD_PRELOAD"] == "/x/l.so"


_PROBE = (
    "import ctypes, sys; sys.path.insert(0, {here!r}); import mkl_unlock; "
    "lib = ctypes.CDLL(None); "
    "fn = getattr(lib, 'mkl_serv_intel_cpu_true', None); "
    "print(mkl_unlock.active(), None if fn is None else fn())"
)


def _probe(env):
  here = os.path.dirname(mkl_unlock.__file__)
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE.format(here=here)],
      env=env, capture_output=True, text=True, check=True,
  )  # fmt: skip
  return proc.stdout.split()


def test_a_process_started_with_the_environment_has_the_shim(tmp_path):
  library = _build_or_skip(tmp_path)
  env = dict(os.environ)
  env.pop("LD_PRELOAD", None)
  # Without the preload, no such symbol is visible to a plain Python.
  assert _probe(env) == ["False", "None"]
  # With it, the shim is mapped and answers "an Intel CPU".
  assert _probe(mkl_unlock.environment(library, env)) == ["True", "1"]


def test_build_reports_a_missing_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
  with pytest.raises(RuntimeError, match="no-such-compiler"):
    mkl_unlock.build(str(tmp_path))
