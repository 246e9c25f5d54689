"""Peak dense FLOP/s of the device a benchmark runs on, for its '% of peak' column.

GPU numbers are the vendor's dense (no sparsity) tensor-core peaks per part (SXM, PCIe, NVL), TPU
numbers Google's bf16 peak per chip; a CPU's peak is cores x clock x FLOP per cycle, with
the cores this process may run on (`os.sched_getaffinity`) and the clock that
/proc/cpuinfo reports.
"""

import os

import jax
import jax.numpy as jnp

# device_kind substring -> dtype -> dense FLOP/s, the first match wins: the PCIe and NVL cards run the same
# die at lower clocks and power ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL"); the SXM parts
# report "NVIDIA H100 80GB HBM3" and "NVIDIA H200".
GPU_PEAKS = {
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 417.5e12},
    "H200 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 417.5e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12},  # SXM; fp32 via TF32 tensor cores
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12},  # SXM: the same GH100 die as H100 SXM
}
# device_kind -> bf16 dense FLOP/s per chip, from Google's Cloud TPU pages (v5e 197, v5p 459 TFLOP/s).
# Matched exactly: "TPU v5" (v5p) is a prefix of "TPU v5 lite" (v5e). fp32 matmuls on a TPU run as
# bf16 passes (how many depends on the precision asked for), so only bf16 has a peak.
TPU_PEAKS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}
# AMD Zen 3 with AVX2: 2 FMA units x 8 fp32 lanes x 2 FLOP per FMA. No native bf16 arithmetic
# (XLA:CPU computes bf16 dots in fp32), so bf16 gets the fp32 figure.
CPU_FLOP_PER_CYCLE = 32


def default_dtype(dtype_flag: str | None):
  """The dtype a suite times in: the `--dtype` flag, else bfloat16 on an accelerator (its tensor
  cores' and MXU's native input) and float32 on a CPU (no native bf16 arithmetic)."""
  return jnp.dtype(dtype_flag or ("bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"))


def cpu_clock_mhz() -> float | None:
  """The first 'cpu MHz' line of /proc/cpuinfo (the current clock the kernel reports), or None."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
          return float(value)
  except OSError:
    pass
  return None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          return value.strip()
  except OSError:
    pass
  return "unknown CPU"


def peak_flops(dtype=jnp.float32, device=None) -> tuple[float | None, str]:
  """(peak dense FLOP/s or None if unknown, how it was worked out) for `device` (default: the first)."""
  device = device or jax.devices()[0]
  dtype = jnp.dtype(dtype).name
  if device.platform == "cpu":
    cores = len(os.sched_getaffinity(0))
    mhz = cpu_clock_mhz()
    if mhz is None:
      return None, f"{cpu_model()}: no 'cpu MHz' in /proc/cpuinfo, peak unknown"
    peak = cores * mhz * 1e6 * CPU_FLOP_PER_CYCLE
    return peak, (f"{cpu_model()}: {cores} cores x {mhz:.0f} MHz x {CPU_FLOP_PER_CYCLE} fp32 FLOP/cycle "
                  f"= {peak / 1e9:.0f} GFLOP/s")
  if device.platform == "tpu":
    peak = TPU_PEAKS.get(device.device_kind) if dtype == "bfloat16" else None
    if peak is None:
      return None, f"{device.device_kind}: no peak known for {dtype}"
    return peak, f"{device.device_kind}: {peak / 1e12:.0f} TFLOP/s dense bfloat16 per chip (vendor table)"
  for name, table in GPU_PEAKS.items():
    if name in device.device_kind and dtype in table:
      return table[dtype], f"{device.device_kind}: {table[dtype] / 1e12:.0f} TFLOP/s dense {dtype} (vendor table)"
  return None, f"{device.device_kind}: no peak known for {dtype}"
