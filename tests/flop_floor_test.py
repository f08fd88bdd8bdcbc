"""Tests of benchmarks/flop_floor.py on the tiny CLIP (counts only, no timing).

What is checked: the spec-sheet table picks the right entry for a device
kind; the counts made from shapes alone equal XLA's counts of the same
programs built from real arrays (the backbone as `bench_backbone.measure`
compiles it, the training step as `bench_sweep.jax_engine` compiles it); the
step's count grows linearly with the episodes; and the command line writes the
documented JSON, with floors equal to FLOPs over the peak.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench_helpers

# Small enough for seconds per count: S = 3, a 12-row cache.
SHOTS, POOL, EPISODES = 1, 12, 2


@pytest.fixture(scope="module")
def ff():
  return bench_helpers.load_benchmark("flop_floor")


@pytest.fixture(scope="module")
def step_count(ff):
  # steps=1 as in the engine run below: the schedule's few scalar FLOPs
  # depend on the step count, and the two counts must match exactly.
  return ff.head_step_flops("tiny", EPISODES, SHOTS, POOL, "off", steps=1)


@pytest.fixture(scope="module")
def cli_result(ff, tmp_path_factory):
  """The command line's JSON at tiny settings (the sweep at E = 1)."""
  out = tmp_path_factory.mktemp("flop_floor") / "floor.json"
  ff.main([
      "--mode", "accelerator", "--device_kind", "NVIDIA H200",
      "--backbone_models", "tiny", "--backbone_batch", "2",
      "--sweep_model", "tiny", "--sweep_episodes", "1",
      "--sweep_shots", str(SHOTS), "--sweep_pool", str(POOL),
      "--sweep_steps", "1", "--json", str(out),
  ])  # fmt: skip
  return json.loads(out.read_text())


@pytest.mark.parametrize(
    "kind, key",
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("TPU v5 lite", "TPU v5 lite"),
        ("TPU v5", "TPU v5"),
        ("tpu v6 lite", "TPU v6 lite"),
    ],
)
def test_spec_peak_takes_the_most_specific_entry(ff, kind, key):
  assert ff.accelerator_peaks.spec_peak(kind)["key"] == key


def test_spec_peak_values_and_unknown_devices(ff):
  assert ff.accelerator_peaks.spec_peak("NVIDIA H200")["bf16"] == 989.5
  assert ff.accelerator_peaks.spec_peak("NVIDIA H200 NVL")["bf16"] == 835.5
  v5e = ff.accelerator_peaks.spec_peak("TPU v5 lite")
  assert (v5e["bf16"], v5e["fp32"], v5e["tf32"]) == (197.0, None, None)
  for entry in ff.accelerator_peaks.SPEC_PEAKS:
    assert set(entry[1]) == {"fp32", "tf32", "bf16", "source"}
  assert ff.accelerator_peaks.spec_peak("cpu") is None
  assert ff.accelerator_peaks.spec_peak("Quadro RTX 9000") is None
  assert ff.accelerator_peaks.floor(2e12, 1.0) == pytest.approx(2.0)
  assert ff.accelerator_peaks.floor(1.0, None) is None


def test_backbone_count_equals_the_real_backbones(ff):
  batch = 2
  got = ff.backbone_flops("tiny", batch, jnp.float32)
  # The real (allocated) tiny backbone, compiled as bench_backbone does.
  backbone = ff.bench_backbone.make_backbone("tiny")
  layers = ff.bench_backbone.tapped_layers(backbone.num_layers)
  size = backbone.image_size
  pixels = jnp.zeros((batch, size, size, 3), jnp.float32)
  compiled = (
      jax.jit(backbone.encode_image, static_argnums=2)
      .lower(backbone.params, pixels, layers)
      .compile()
  )
  real = ff.bench_timing.xla_cost(compiled)["flops"]
  assert got["flops"] == real
  assert got["flops_per_image"] == real / batch
  assert got["layers"] == list(layers)
  assert got["while_loops"] == 0
  # The hand count leaves norms, softmax and activations out: a few % less.
  analytic = ff.bench_backbone.analytic_vit_flops(backbone, len(layers))
  assert got["analytic_flops_per_image"] == analytic
  assert got["flops_per_image"] == pytest.approx(analytic, rel=0.06)
  # The count of the unoptimised program exists but is not exact (XLA's
  # simplifications change it slightly): hence "compiled" by default.
  lowered = ff.backbone_flops("tiny", batch, jnp.float32, count="lowered")
  assert lowered["flops"] == pytest.approx(real, rel=0.02)


def test_step_count_equals_the_engines(ff, step_count):
  from ultraad_jax import features  # pylint: disable=g-import-not-at-top

  backbone = ff.bench_backbone.make_backbone("tiny")
  layers = ff.bench_backbone.tapped_layers(backbone.num_layers)
  images, masks, labels = ff.sweep_inputs.synthetic_pool(
      POOL, backbone.image_size
  )
  cache = features.build(
      backbone, backbone.params, images, masks, None, np.zeros(POOL, bool),
      layers=layers, num_views=1, batch_size=POOL,
  )  # fmt: skip
  supports = ff.sweep_inputs.draw_supports(labels, EPISODES, SHOTS)
  # The same config as the count: fused map losses off (at these sizes
  # "auto" would be off on CPU too).
  cfg = ff.sweep_inputs.sweep_model_config(layers, "off")
  row = bench_helpers.sibling("bench_sweep").jax_engine(
      backbone, cfg, cache, supports, labels, steps=1
  )
  # All episodes in one vmap, so the engine did not scale a loop's count.
  assert row["episode_chunk"] == EPISODES
  assert step_count["flops"] == row["step_flops"]
  assert step_count["flops_per_episode"] == row["step_flops"] / EPISODES
  assert step_count["support_size"] == 3 * SHOTS
  assert step_count["while_loops"] == 0
  assert step_count["bytes_accessed"] > 0


def test_step_count_is_linear_in_the_episodes(cli_result, step_count):
  # E = 1 from the command line's sweep (same sizes and steps): E = 2 costs
  # twice as much, so the per-episode floor does not depend on E.
  one = cli_result["sweep"]["episodes"]["1"]["gflop_per_step"] * 1e9
  assert step_count["flops"] == pytest.approx(EPISODES * one, rel=0.01)


def test_while_loops_are_found(ff):
  # The counts are only whole when the programs have no loop (XLA counts a
  # loop's body once), so the detector must see one where there is one.
  fn = lambda x: jax.lax.fori_loop(0, 3, lambda i, y: y * 2.0, x)
  lowered = jax.jit(fn).lower(jax.ShapeDtypeStruct((4,), jnp.float32))
  _, hlo = ff._count(lowered, "compiled")  # pylint: disable=protected-access
  assert ff._while_loops(hlo) >= 1  # pylint: disable=protected-access


def test_cli_writes_the_documented_json(ff, cli_result):
  with pytest.raises(SystemExit):
    ff.parse_args(["--help"])
  result = cli_result
  assert {"device_kind", "peak", "count", "note", "settings", "backbone",
          "sweep"} <= set(result)  # fmt: skip
  peak = result["peak"]
  assert peak["key"] == "H200" and peak["tf32"] == 494.5
  row = result["backbone"]["tiny"]
  assert row["batch"] == 2 and row["layers"] == [1, 2, 3, 4]
  for dtype_name, peaks in (("f32", ("fp32", "tf32")), ("bf16", ("bf16",))):
    r = row[dtype_name]
    assert set(r["floor_ms_per_image"]) == set(peaks)
    for name in peaks:
      want = r["gflop_per_image"] * 1e9 / (peak[name] * 1e12) * 1e3
      assert math.isclose(r["floor_ms_per_image"][name], want, rel_tol=1e-9)
  sweep = result["sweep"]
  assert (sweep["support_size"], sweep["pool"], sweep["steps"]) == (3, 12, 1)
  assert sweep["fused_map_loss"] == "off"
  r = sweep["episodes"]["1"]
  assert r["gflop_per_episode_step"] == r["gflop_per_step"]
  for name in ("fp32", "tf32"):
    step_s = r["gflop_per_step"] * 1e9 / (peak[name] * 1e12)
    assert math.isclose(r["floor_ms_per_step"][name], 1e3 * step_s,
                        rel_tol=1e-9)  # fmt: skip
    assert math.isclose(r["floor_s_for_steps"][name], step_s,
                        rel_tol=1e-9)  # fmt: skip
