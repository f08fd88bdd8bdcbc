"""Tests of benchmarks/native_peak.py: the C kernel does the work it counts."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
)
import native_peak  # pylint: disable=g-import-not-at-top,wrong-import-position


def _flags():
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    for line in f:
      if line.startswith("flags"):
        return set(line.split(":", 1)[1].split())
  return set()


def _variant_or_skip():
  if not os.path.exists("/proc/cpuinfo"):
    pytest.skip("no /proc/cpuinfo: the kernel is for Linux on x86")
  variant = native_peak.isa_for(_flags())
  if variant is None:
    pytest.skip("this CPU has neither AVX2+FMA nor AVX-512")
  if not native_peak.c_compiler():
    pytest.skip("no C compiler on PATH to build fma_peak.c")
  return variant


def test_isa_for_picks_the_widest_fma():
  assert native_peak.isa_for({"avx512f", "avx2", "fma"})[0] == 16
  assert native_peak.isa_for({"avx2", "fma"}) == (8, ["-mavx2", "-mfma"])
  assert native_peak.isa_for({"avx2"}) is None
  assert native_peak.isa_for(set()) is None


def test_measure_reports_an_error_without_fma():
  assert "error" in native_peak.measure(set(), cores=1)


def test_kernel_computes_every_counted_chain(tmp_path):
  # The returned value is the sum of the 12 chains' first lanes; it matches
  # the same recurrences in float64 only if no chain was merged or dropped.
  width, isa_flags = _variant_or_skip()
  dll = native_peak.build(width, isa_flags, str(tmp_path))
  assert dll.vec_width() == width
  assert dll.chains() == 12
  a, b, iters = np.float32(0.999), np.float32(0.01), 300
  x = np.arange(1, 13, dtype=np.float64)
  for _ in range(iters):
    x = x * float(a) + float(b)
  got = dll.fma_chains(iters, float(a), float(b))
  np.testing.assert_allclose(got, x.sum(), rtol=1e-4)


def test_measured_peak_is_consistent_with_the_measured_clock():
  # One core cannot retire more than 2 FMAs of `width` lanes per cycle; the
  # kernel should get close to that on an idle core, and a clock outside
  # 0.5-7 GHz means the multiply chain was optimised away or misread.
  width, _ = _variant_or_skip()
  out = native_peak.measure(_flags(), cores=1, repeats=2, seconds=0.05)
  assert "error" not in out, out
  assert 0.5 < out["clock_ghz"] < 7.0
  bound = 2 * width * 2 * out["clock_ghz"]
  assert out["c_fma_gflops_one_core"] <= 1.15 * bound
  assert out["c_fma_gflops_one_core"] > 0.1 * bound
