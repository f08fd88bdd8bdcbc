"""Spec-sheet peaks of accelerators, for MFU and FLOP floors off the CPU.

On a CPU `bench.py` measures the peak it divides by (`native_peak.py`); an
accelerator's peak comes from its vendor's spec sheet instead, looked up by
`jax.devices()[0].device_kind`. Only dense rates are listed: NVIDIA quotes
its tensor-core figures "with sparsity", twice the dense rate that ordinary
programs can reach.
"""

# Dense peak TFLOP/s (no structured sparsity: half of NVIDIA's "with
# sparsity" tensor-core figures), keyed by a substring of
# `jax.devices()[0].device_kind`. Most specific first: the first key found
# in the device kind wins, so "H200 NVL" must precede "H200".
SPEC_PEAKS = (
    ("H200 NVL", dict(
        fp32=60.0, tf32=417.5, bf16=835.5,
        source="NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column "
               "(dense: half the sparsity figures)",
    )),
    ("H200", dict(
        fp32=67.0, tf32=494.5, bf16=989.5,
        source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column "
               "(dense: half the sparsity figures)",
    )),
    ("H100 PCIe", dict(
        fp32=51.0, tf32=378.0, bf16=756.0,
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column "
               "(dense: half the sparsity figures)",
    )),
    ("H100", dict(
        fp32=67.0, tf32=494.5, bf16=989.5,
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column "
               "(dense: half the sparsity figures)",
    )),
    ("A100", dict(
        fp32=19.5, tf32=156.0, bf16=312.0,
        source="NVIDIA A100 Tensor Core GPU datasheet (dense)",
    )),
    # TPUs: bf16 per chip. No f32 or tf32 matrix rate: f32 matmuls at full
    # precision are emulated with several bf16 passes.
    ("TPU v6 lite", dict(
        fp32=None, tf32=None, bf16=918.0,
        source="Google Cloud TPU v6e documentation, per chip",
    )),
    ("TPU v5 lite", dict(
        fp32=None, tf32=None, bf16=197.0,
        source="Google Cloud TPU v5e documentation, per chip",
    )),
    ("TPU v5", dict(
        fp32=None, tf32=None, bf16=459.0,
        source="Google Cloud TPU v5p documentation, per chip",
    )),
    ("TPU v4", dict(
        fp32=None, tf32=None, bf16=275.0,
        source="Google Cloud TPU v4 documentation, per chip",
    )),
)  # fmt: skip


def spec_peak(device_kind):
  """The SPEC_PEAKS entry of a device kind.

  Args:
    device_kind: e.g. `jax.devices()[0].device_kind` ("NVIDIA H200", "TPU v5
      lite", ...).

  Returns:
    A dict {"key", "fp32", "tf32", "bf16", "source"} (TFLOP/s, None where
    not applicable) of the first key found in device_kind (case-insensitive),
    or None when no key matches.
  """
  kind = (device_kind or "").lower()
  for key, entry in SPEC_PEAKS:
    if key.lower() in kind:
      return {"key": key, **entry}
  return None


def floor(flops, peak_tflops):
  """Seconds a program of `flops` FLOPs takes at least at a peak.

  Args:
    flops: the program's FLOPs.
    peak_tflops: the peak in TFLOP/s, or None.

  Returns:
    flops / (peak_tflops * 1e12) seconds, or None without a peak.
  """
  if not peak_tflops:
    return None
  return float(flops) / (float(peak_tflops) * 1e12)
