"""Smoke tests of benchmarks/bench.py at the tiniest settings (no timing).

The benchmark's numbers only mean something on an idle machine, so nothing
here asserts a time. What is checked: every section runs end to end through
the accelerator code path (tiny sizes, PyTorch uncompiled to stay fast), the
JSON carries the documented keys, the JAX and PyTorch backbones compute the
same features from the same weights, both metric implementations agree, and
the helpers count what they claim.
"""

import json
import math
import platform

import numpy as np
import pytest

import bench_helpers


@pytest.fixture(scope="module")
def bench():
  return bench_helpers.load_benchmark("bench")


def test_time_interleaved_runs_each_contender_as_asked(bench):
  calls = {"a": 0, "b": 0}

  def make(name):
    def fn():
      calls[name] += 1

    return fn

  timing = bench_helpers.sibling("bench_timing")
  out = timing.time_interleaved({"a": make("a"), "b": make("b")}, repeats=3,
                                warmup=2)  # fmt: skip
  assert calls == {"a": 5, "b": 5}
  for stats in out.values():
    assert stats["repeats"] == 3
    assert stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    assert stats["spread"] >= 0


def test_summarize_median_and_spread(bench):
  stats = bench_helpers.sibling("bench_timing").summarize([3.0, 1.0, 2.0])
  assert stats["median_s"] == 2.0
  assert stats["spread"] == pytest.approx(1.0)


def test_xla_temp_bytes_counts_an_intermediate(bench):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  timing = bench_helpers.sibling("bench_timing")
  x = jnp.ones((256, 256), jnp.float32)
  # x @ x must exist whole before the second product: 256 KiB of
  # temporaries at least.
  compiled = jax.jit(lambda a: jnp.sum((a @ a) @ a.T)).lower(x).compile()
  assert timing.xla_temp_bytes(compiled) >= 256 * 256 * 4

  class NoAnalysis:

    def memory_analysis(self):
      raise NotImplementedError

  assert timing.xla_temp_bytes(NoAnalysis()) is None


def test_usage_per_call_divides_the_difference(bench):
  timing = bench_helpers.sibling("bench_timing")
  before = {"user_s": 1.0, "system_s": 0.5, "minor_faults": 100}
  after = {"user_s": 4.0, "system_s": 1.1, "minor_faults": 700}
  expected = {
      "user_s_per_call": 1.0,
      "system_s_per_call": 0.2,
      "minor_faults_per_call": 200.0,
  }
  assert timing.usage_per_call(before, after, 3) == pytest.approx(expected)
  assert timing.usage_per_call({}, after, 3) == {}
  if platform.system() == "Linux":
    first = timing.process_usage()
    sum(i * i for i in range(200_000))  # some user time
    second = timing.process_usage()
    assert second["user_s"] >= first["user_s"]
    assert second["minor_faults"] >= first["minor_faults"]


def test_fma_loop_computes_the_counted_chains(bench):
  # The loop's value must equal the same multiply-adds done in float32 by
  # numpy, so the FLOP count it reports is work that actually happens.
  fn, flops = bench.bench_machine._fma_loop(rows=2, chains=3, unroll=4, iters=5)
  assert flops == 2 * 2 * 16 * 3 * 4 * 5
  x0 = np.linspace(0, 1, 32, dtype=np.float32).reshape(2, 16)
  x = x0.copy()
  a, b = np.float32(0.99999), np.float32(1e-5)
  for _ in range(5):
    ys = [x + np.float32(k) for k in range(3)]
    for _ in range(4):
      ys = [y * a + b for y in ys]
    x = sum(ys[1:], ys[0]) * np.float32(1 / 3) - np.float32(1.0)
  # FMA contraction rounds once per step where numpy rounds twice.
  np.testing.assert_allclose(np.asarray(fn(x0)), x, rtol=1e-4, atol=1e-5)


def test_theoretical_peak_formula(bench):
  info = {"cores": 2, "cpu_mhz": 2500.0, "avx512f": True, "vendor": "Intel",
          "cpu_family": 6}  # fmt: skip
  peak = bench.bench_machine.theoretical_peak(info)
  assert peak["formula_gflops"] == pytest.approx(2 * 2 * 16 * 2 * 2.5)
  assert peak["microarch_gflops"] == peak["formula_gflops"]
  zen4 = bench.bench_machine.theoretical_peak(
      {**info, "vendor": "AMD", "cpu_family": 25}
  )
  assert zen4["microarch_gflops"] == pytest.approx(peak["formula_gflops"] / 2)
  # A measured clock replaces the (base) clock /proc/cpuinfo shows.
  boosted = bench.bench_machine.theoretical_peak(info, measured_clock_ghz=3.5)
  assert boosted["clock_source"] == "measured"
  assert boosted["formula_gflops"] == pytest.approx(2 * 2 * 16 * 2 * 3.5)


def test_targets_only_apply_where_they_were_set(bench):
  results = {
      "machine": {"jax_backend": "cpu"},
      "settings": {"torch_compile": True},
      "backbone": {"model": "tiny", "speedup": 9.0, "mfu": 0.1},
      "metrics": {"time_ratio": 3.0, "memory_ratio": 0.5},
  }
  rows = {r["target"].split(":")[1].split()[0]: r["met"]
          for r in bench.bench_targets.check(results)}  # fmt: skip
  assert rows == {"metrics.time_ratio": False, "metrics.memory_ratio": True}
  results["backbone"]["model"] = "ViT-B/16"
  rows = {r["target"].split(":")[1].split()[0]: r["met"]
          for r in bench.bench_targets.check(results)}  # fmt: skip
  assert rows["backbone.speedup"] and not rows["backbone.mfu"]
  # A run with MKL's vendor check bypassed is not against stock PyTorch.
  results["machine"]["mkl_unlocked"] = True
  rows = {r["target"].split(":")[1].split()[0]: r["met"]
          for r in bench.bench_targets.check(results)}  # fmt: skip
  assert "backbone.speedup" not in rows and not rows["backbone.mfu"]


def _skip_without_the_mkl_shim(bench):
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    pytest.skip("the MKL shim is for Linux on x86-64")
  if not bench.native_peak.c_compiler():
    pytest.skip("no C compiler on PATH to build benchmarks/mkl_unlock.c")


def test_torch_with_mkl_unlocked_runs_in_a_child_with_the_shim(bench):
  _skip_without_the_mkl_shim(bench)
  # Forced on (on an Intel CPU the shim changes nothing, but still loads).
  results = bench.main([
      "--quick", "--sections", "backbone", "--backbone_models", "tiny",
      "--backbone_batch", "2", "--repeats", "1", "--warmup", "1",
      "--no-torch_compile", "--peak_gflops", "100", "--torch_unlocked",
  ])  # fmt: skip
  assert results["settings"]["torch_unlocked"]
  assert not results["machine"]["mkl_unlocked"]  # this process: stock
  unlocked = results["backbone"]["mkl_unlocked"]
  assert "error" not in unlocked, unlocked.get("error")
  assert unlocked["mkl_unlocked"]  # the child: the shim was mapped
  for key in ("torch_ms_per_image", "jax_ms_per_image", "speedup"):
    assert math.isfinite(unlocked[key]) and unlocked[key] > 0, key
  assert unlocked["torch_share_of_peak"] == pytest.approx(
      unlocked["torch_gflops"] / 100
  )
  # The same features with MKL's other kernels.
  assert unlocked["max_abs_diff_torch_vs_jax"] < 1e-4


def test_mkl_unlock_reruns_the_whole_command_with_the_shim(bench, tmp_path):
  _skip_without_the_mkl_shim(bench)
  path = tmp_path / "unlocked.json"
  results = bench.main([
      "--quick", "--sections", "backbone", "--backbone_models", "tiny",
      "--backbone_batch", "2", "--repeats", "1", "--warmup", "1",
      "--no-torch_compile", "--peak_gflops", "100", "--mkl_unlock",
      "--json", str(path),
  ])  # fmt: skip
  # Read back from the rerun's JSON: that process ran with the shim, so it
  # timed no second, unlocked child, and says why its targets differ.
  assert results["machine"]["mkl_unlocked"]
  assert results["settings"]["mkl_unlock"]
  assert not results["settings"]["torch_unlocked"]
  assert "mkl_unlocked" not in results["backbone"]
  assert any("--mkl_unlock" in note for note in results["notes"])
  assert math.isfinite(results["backbone"]["torch_ms_per_image"])


def test_accelerator_path_end_to_end_at_tiny_sizes(bench, tmp_path):
  path = tmp_path / "bench.json"
  results = bench.main([
      "--accelerator", "--bf16", "--sections", "backbone,sweep,metrics",
      "--backbone_models", "tiny", "--backbone_batch", "2", "--repeats", "1",
      "--warmup", "1", "--sweep_model", "tiny", "--sweep_episodes", "2",
      "--sweep_steps", "3", "--sweep_shots", "1", "--sweep_pool", "6",
      "--sweep_repeats", "3",
      "--torch_max_episodes", "1", "--metrics_maps", "3", "--metrics_size",
      "24", "--metrics_repeats", "1", "--no-torch_compile", "--peak_gflops",
      "100", "--peer_threads", "1", "--fast_f32", "--sweep_precision",
      "tensorfloat32", "--no-torch_unlocked", "--json", str(path),
      "--figure", str(tmp_path / "bench.png"),
  ])  # fmt: skip
  on_disk = json.loads(path.read_text())
  assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert on_disk["mode"] == "accelerator"
  assert on_disk["settings"]["fast_f32"]
  assert on_disk["sweep"]["precision"] == "tensorfloat32"

  bb = results["backbone"]
  for key in (
      "jax_ms_per_image",
      "torch_ms_per_image",
      "speedup",
      "mfu",
      "jax_ms_per_image_bf16",
      "torch_ms_per_image_bf16",
      # The platform's fast f32 paths (on a CPU, the same work as f32).
      "jax_ms_per_image_fast_f32",
      "torch_ms_per_image_fast_f32",
      "speedup_fast_f32",
  ):
    assert math.isfinite(bb[key]) and bb[key] > 0, key
  assert bb["mfu"] == pytest.approx(bb["jax_gflops"] / 100)
  assert bb["torch_share_of_peak"] == pytest.approx(bb["torch_gflops"] / 100)
  # Same weights, same work: the PyTorch twin reproduces JAX's features.
  assert bb["max_abs_diff_torch_vs_jax"] < 1e-4
  # XLA's FLOP count agrees with the hand count of the matmuls.
  assert bb["jax_flops_per_image"] == pytest.approx(
      bb["analytic_flops_per_image"], rel=0.1
  )

  sweep = results["sweep"]
  assert sweep["peer_head"] == "ultraad"  # the default: the same head
  assert on_disk["settings"]["peer_head"] == "ultraad"
  row = sweep["2"]
  for key in ("jax_s", "torch_s", "speedup", "jax_s_per_episode",
              "torch_backbone_ms_per_step", "torch_head_ms_per_step",
              "torch_init_s_per_episode"):  # fmt: skip
    assert math.isfinite(row[key]) and row[key] > 0, key
  # The cache's build, timed compiled, is charged to the engine on request.
  assert 0 < sweep["cache_s"] <= sweep["feature_extraction_s"]
  assert row["jax_s_with_cache"] == pytest.approx(
      row["jax_s"] + sweep["cache_s"]
  )
  assert row["speedup_with_cache"] == pytest.approx(
      row["torch_s"] / row["jax_s_with_cache"]
  )
  assert row["torch_extrapolated"] and row["torch_episodes_run"] == 1
  # Medians over three timed runs of each side, every run kept.
  assert sweep["repeats"] == 3
  for runs, median in ((row["init_s_runs"], row["init_s"]),
                       (row["train_s_runs"], row["train_s"]),
                       (row["torch_s_runs"], row["torch_s"])):  # fmt: skip
    assert len(runs) == 3 and all(t > 0 for t in runs)
    assert median == pytest.approx(float(np.median(runs)))
  assert row["jax_s"] == pytest.approx(row["init_s"] + row["train_s"])
  # The engine's own choice of episodes at once (train.episode_chunk).
  assert row["episode_chunk"] >= 1 and 2 % row["episode_chunk"] == 0
  assert math.isfinite(row["final_loss"])
  # The step's temporaries, and where the process's CPU time went.
  assert row["step_temp_bytes"] > 0
  if platform.system() == "Linux":
    assert row["train_user_s_per_step"] > 0
    assert row["train_system_s_per_step"] >= 0
    assert row["train_minor_faults_per_step"] >= 0
  # Same head, loss, initial parameters and optimiser on both sides: after
  # three steps (one of them at a non-zero learning rate) episode 0's loss
  # agrees (the features differ by float rounding between the backbones).
  assert row["torch_final_loss_episode0"] == pytest.approx(
      row["final_loss_episode0"], rel=1e-3
  )

  mt = results["metrics"]
  for key in ("ours_s", "sklearn_s", "ours_peak_mb", "sklearn_peak_mb"):
    assert mt[key] >= 0, key
  assert mt["max_abs_diff"] < 1e-9


def test_torch_precision_switch_sets_both_ops_and_restores(bench):
  import torch  # pylint: disable=g-import-not-at-top

  flags = lambda: (torch.backends.cuda.matmul.allow_tf32,
                   torch.backends.cudnn.allow_tf32)  # fmt: skip
  before = flags()
  with bench.bench_backbone.torch_matmul_precision(tf32=True):
    assert flags() == (True, True)
    with bench.bench_backbone.torch_matmul_precision(tf32=False):
      assert flags() == (False, False)
    assert flags() == (True, True)
  assert flags() == before


def test_spec_sheet_floors_and_shares(bench):
  spec = bench.accelerator_peaks.spec_peak("NVIDIA H200")
  bb = {
      "jax_flops_per_image": 4e11,
      "jax_ms_per_image": 20.0,
      "jax_ms_per_image_fast_f32": 2.0,
      "jax_ms_per_image_bf16": 1.0,
  }
  gpu = bench.bench_backbone.spec_shares(bb, spec, "gpu")
  # 4e11 FLOP at 67 TFLOP/s (fp32), 494.5 (tf32), 989.5 (bf16).
  assert gpu["floor_ms_per_image"] == pytest.approx(4e11 / 67e12 * 1e3)
  assert gpu["mfu_spec"] == pytest.approx(4e11 / 67e12 / 20e-3)
  assert gpu["peak_of_fast_f32"] == "tf32"
  assert gpu["mfu_spec_fast_f32"] == pytest.approx(4e11 / 494.5e12 / 2e-3)
  assert gpu["mfu_spec_bf16"] == pytest.approx(4e11 / 989.5e12 / 1e-3)
  # A TPU has no f32 peak; its default precision runs one bf16 pass.
  tpu = bench.bench_backbone.spec_shares(
      bb, bench.accelerator_peaks.spec_peak("TPU v5 lite"), "tpu"
  )
  assert "mfu_spec" not in tpu and tpu["peak_of_fast_f32"] == "bf16"
  assert tpu["floor_ms_per_image_bf16"] == pytest.approx(4e11 / 197e12 * 1e3)

  sweep = {"steps": 10, "4": {"step_flops": 1e12, "train_s": 1.0},
           "model": "tiny"}  # fmt: skip
  bench.bench_sweep.add_floors(sweep, spec, "tensorfloat32")
  assert sweep["4"]["floor_train_s"] == pytest.approx(10 * 1e12 / 494.5e12)
  assert sweep["4"]["train_share_of_floor"] == pytest.approx(
      sweep["4"]["floor_train_s"]
  )


def test_mvfa_peer_head_trains(bench):
  # The lighter head stays available (--peer_head mvfa): one uncompiled
  # episode on the tiny CLIP, its phases accounted in the split.
  inputs = bench_helpers.sibling("sweep_inputs")
  peer_cls = bench.peer_loop.TorchPeer
  backbone = bench.bench_backbone.make_backbone("tiny")
  layers = bench.bench_backbone.tapped_layers(backbone.num_layers)
  images, masks, labels = inputs.synthetic_pool(6, backbone.image_size)
  peer = peer_cls(backbone, layers, images, masks, labels, head="mvfa",
                  compile_backbone=False, compile_head=False,
                  threads=1)  # fmt: skip
  loss = peer.episode(inputs.draw_supports(labels, 1, 1)[0], 2, seed=0)
  assert math.isfinite(loss) and loss > 0
  assert peer.split["steps"] == 2
  assert peer.split["backbone_s"] > 0 and peer.split["head_s"] > 0
  with pytest.raises(ValueError, match="peer head"):
    peer_cls(backbone, layers, images, masks, head="other",
             compile_backbone=False)  # fmt: skip
  with pytest.raises(ValueError, match="cfg and labels"):
    peer_cls(backbone, layers, images, masks, head="ultraad",
             compile_backbone=False)  # fmt: skip


def test_peer_learning_rates_follow_the_engine_schedule(bench):
  tc = bench_helpers.sibling("sweep_inputs").sweep_train_config(20)
  rates = bench_helpers.sibling("sweep_inputs").learning_rates(tc)
  assert rates.shape == (20,)
  # Warm-up from 0 to the peak, then cosine decay towards 0.
  assert rates[0] == 0.0
  assert rates[tc.warmup_steps] == pytest.approx(tc.learning_rate)
  assert np.all(np.diff(rates[tc.warmup_steps :]) < 0)


_HLO = """HloModule jit_train_step, is_scheduled=true

FileNames
1 "/repo/ultraad_jax/train.py"
2 "/repo/ultraad_jax/fusion.py"
3 "/venv/site-packages/flax/linen/linear.py"

FunctionNames
1 "train_step"
2 "_cross_attention"
3 "__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10}
2 {file_name_id=2 function_name_id=2 line=170}
3 {file_name_id=3 function_name_id=3 line=5}

StackFrames
1 {file_location_id=1 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=2}

%wrapped_body (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %r = f32[2]{0} negate(%p), metadata={op_name="neg" stack_frame_id=3}
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %a = f32[2]{0} parameter(0)
  %dot.1 = f32[2]{0} multiply(%a, %a), metadata={op_name="mul" stack_frame_id=2}
  %loop = (f32[2]{0}) while(%t), condition=%c, body=%b, metadata={op_name="while" stack_frame_id=1}
  ROOT %wrapped_neg = f32[2]{0} fusion(%dot.1), kind=kLoop, calls=%wrapped_body
}
"""


def test_trace_summary_attributes_kernels_to_project_source(bench, tmp_path):
  import gzip  # pylint: disable=g-import-not-at-top

  (tmp_path / "hlo").mkdir()
  (tmp_path / "hlo" / "train_step.txt").write_text(_HLO)
  trace_dir = tmp_path / "profile" / "plugins" / "profile" / "2026_01_01"
  trace_dir.mkdir(parents=True)
  x = lambda name, ts, dur, tid=2: {"ph": "X", "name": name, "ts": ts,
                                    "dur": dur, "pid": 1, "tid": tid}  # fmt: skip
  events = [
      # A call of 3 steps (train.steps_per_call), and one without the count
      # (a trace from before calls of several steps): 4 steps.
      {**x("train", 0, 9000, tid=1), "args": {"step_num": "2", "steps": "3"}},
      x("train", 10000, 9000, tid=1),
      # Launched asynchronously: 100 us of launch, finished 1,500 us later.
      x("dot.1", 0, 100),
      x("end: dot.1", 1500, 0, tid=3),
      # An end event before its kernel's own end changes nothing.
      x("dot.1", 10000, 1500),
      x("end: dot.1", 11400, 0),
      x("wrapped_neg", 2000, 1000),
      x("end: unknown.7", 3000, 0),
      # A loop's event spans its body's kernels, which count on their own.
      x("loop", 0, 50),
      x("end: loop", 8000, 0),
      x("ThunkExecutor::Execute", 0, 8000, tid=3),
  ]
  with gzip.open(trace_dir / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = bench.trace_summary.summarize(str(tmp_path))
  assert summary["steps"] == 4
  assert summary["total_ms_per_step"] == pytest.approx(1.0)
  by_function = {r["function"]: r["ms_per_step"]
                 for r in summary["by_function"]}  # fmt: skip
  # dot.1 comes from fusion.py; the wrapped kernel's body is a flax op
  # called from train.py, its innermost project frame.
  assert by_function == pytest.approx(
      {"fusion.py:_cross_attention": 0.75, "train.py:train_step": 0.25}
  )
  with pytest.raises(FileNotFoundError, match="profile_steps"):
    bench.trace_summary.summarize(str(tmp_path / "missing"))


def test_figure_draws_what_was_measured(tmp_path):
  bench_figure = bench_helpers.load_benchmark("bench_figure")
  results = {
      "mode": "quick",
      "machine": {"cpu_model": "test CPU", "cores": 2, "jax_backend": "cpu"},
      "peak": {"peak_gflops": 500.0},
      "backbone": {
          "model": "ViT-B/16", "batch": 8, "jax_flops_per_image": 3.5e10,
          "jax_ms_per_image": 90.0, "torch_ms_per_image": 170.0,
          "mkl_unlocked": {"torch_ms_per_image": 75.0},
      },
      "sweep": {
          "model": "tiny", "steps": 10,
          "1": {"jax_s": 0.05, "torch_s": 0.12, "speedup": 2.4,
                "torch_extrapolated": False},
          "64": {"jax_s": 1.6, "torch_s": 8.0, "speedup": 5.0,
                 "torch_extrapolated": True, "jax_s_with_cache": 1.92},
      },
  }  # fmt: skip
  assert bench_figure.backbone_bars(results) == [
      ("JAX f32", 90.0),
      ("PyTorch f32,\nstock", 170.0),
      ("PyTorch f32,\nMKL unlocked", 75.0),
  ]
  points = bench_figure.sweep_points(results)
  assert [p["episodes"] for p in points] == [1, 64]
  assert points[1]["jax_s_per_episode"] == pytest.approx(1.6 / 64)
  assert points[1]["jax_with_cache_s_per_episode"] == pytest.approx(0.03)
  assert "jax_with_cache_s_per_episode" not in points[0]
  assert points[1]["torch_s_per_episode"] == pytest.approx(8.0 / 64)
  assert points[1]["extrapolated"] and not points[0]["extrapolated"]
  path = tmp_path / "sub" / "fig.png"
  bench_figure.draw(results, str(path))
  assert path.read_bytes()[:4] == b"\x89PNG"
  # The command line draws the same from a saved JSON.
  saved = tmp_path / "results.json"
  saved.write_text(json.dumps(results))
  bench_figure.main([str(saved), str(tmp_path / "cli.png")])
  assert (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG"
  # One section alone draws one panel; none is an error that says so.
  del results["sweep"]
  bench_figure.draw(results, str(tmp_path / "bb.png"))
  with pytest.raises(ValueError, match="--sections"):
    bench_figure.draw({"machine": {}}, str(tmp_path / "none.png"))
