"""Peak dense FLOP/s of the device a benchmark runs on, for its '% of peak' column.

GPU numbers are the vendor's dense (no sparsity) tensor-core peaks per part (SXM, PCIe, NVL), TPU
numbers Google's bf16 peak per chip; a CPU's peak is cores x clock x FLOP per cycle, with
the cores this process may run on (`os.sched_getaffinity`), the clock that /proc/cpuinfo
reports and the FLOP per cycle its vector extensions give (`cpu_flop_per_cycle`).
"""

import os
import re

import jax
import jax.numpy as jnp

from aigc_jax.errors import UserError

# device_kind word(s) -> dtype -> dense FLOP/s, matched as whole words ("L4" is not "L40S", "A100" not "A1000",
# "B200" not "GB200"), the first match wins: the PCIe and NVL cards run the same die at lower clocks and power
# ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL"); the SXM parts report "NVIDIA H100 80GB HBM3" and
# "NVIDIA H200". fp32 matmuls run on the TF32 tensor cores (XLA's default precision on these GPUs).
GPU_PEAKS = {
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 417.5e12},
    "H200 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 417.5e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12},  # SXM
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12},  # SXM: the same GH100 die as H100 SXM
    "H800": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12},  # SXM; only NVLink is cut
    "GH200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},  # SXM4 and PCIe, 40 and 80 GB alike
    "L40S": {"bfloat16": 362.05e12, "float16": 362.05e12, "float32": 183e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "B200": {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12},  # HGX B200 at 1,000 W
    "GB200": {"bfloat16": 2500e12, "float16": 2500e12, "float32": 1250e12},  # per GPU, at 1,200 W
}
# device_kind -> bf16 dense FLOP/s per chip, from Google's Cloud TPU pages (v5e 197, v5p 459 TFLOP/s).
# Matched exactly: "TPU v5" (v5p) is a prefix of "TPU v5 lite" (v5e). fp32 matmuls on a TPU run as
# bf16 passes (how many depends on the precision asked for), so only bf16 has a peak.
TPU_PEAKS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}
# Where the rule of `cpu_flop_per_cycle` is wrong for a CPU (e.g. an AVX-512 Xeon with one FMA unit per core: 32),
# this environment variable gives the fp32 FLOP per cycle and core instead.
CPU_FLOP_PER_CYCLE_VARIABLE = "AIGC_JAX_CPU_FLOP_PER_CYCLE"


def cpuinfo() -> dict[str, str]:
  """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break  # the end of the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


CPUFREQ_MAX = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"  # kHz


def cpu_clock_mhz(info: dict[str, str] | None = None) -> float | None:
  """The clock a CPU peak counts, in MHz: cpufreq's maximum where the kernel exposes it (steady, where the current
  clock of a bare-metal host moves with load), else /proc/cpuinfo's 'cpu MHz' (a virtual machine's nominal
  clock); None where neither is known. `info`: /proc/cpuinfo's fields, if already read."""
  try:
    with open(CPUFREQ_MAX) as f:
      return int(f.read()) / 1000
  except (OSError, ValueError):
    pass
  mhz = (cpuinfo() if info is None else info).get("cpu MHz")
  return float(mhz) if mhz else None


def cpu_model() -> str:
  return cpuinfo().get("model name", "unknown CPU")


def cpu_flop_per_cycle(info: dict[str, str]) -> tuple[int | None, str]:
  """(fp32 FLOP per cycle and core, or None if unknown; why) from the CPU's vector extensions: fused multiply-adds
  on two FMA units, 16 fp32 lanes each with AVX-512 (Intel; AMD from Zen 5, family 26, whose Zen 4 runs AVX-512 as
  two 256-bit halves), 8 with AVX2; SSE2 alone: a 4-lane add and a 4-lane multiply. XLA:CPU computes bf16 dots in
  fp32, so the figure serves bf16 too. `AIGC_JAX_CPU_FLOP_PER_CYCLE` overrides it."""
  override = os.environ.get(CPU_FLOP_PER_CYCLE_VARIABLE)
  if override:
    if not (override.isdigit() and int(override) > 0):
      raise UserError(f"{CPU_FLOP_PER_CYCLE_VARIABLE}={override!r} is not a whole number > 0; set it to the CPU's "
                      f"fp32 FLOP per cycle and core (32 for AVX2 with two FMA units), or unset it.")
    return int(override), f"{CPU_FLOP_PER_CYCLE_VARIABLE}={override}"
  flags = set(info.get("flags", "").split())
  amd_before_zen5 = info.get("vendor_id") == "AuthenticAMD" and int(info.get("cpu family", "0") or 0) < 26
  if "avx512f" in flags and not amd_before_zen5:
    return 64, "AVX-512, 2 FMA units x 16 lanes x 2"
  if {"avx2", "fma"} <= flags:
    return 32, "AVX2, 2 FMA units x 8 lanes x 2"
  if "sse2" in flags:
    return 8, "SSE2, 4-lane add + 4-lane multiply"
  return None, f"no AVX2 or SSE2 flag in /proc/cpuinfo; set {CPU_FLOP_PER_CYCLE_VARIABLE}"


def default_dtype(dtype_flag: str | None):
  """The dtype a suite times in: the `--dtype` flag, else bfloat16 on an accelerator (its tensor
  cores' and MXU's native input) and float32 on a CPU (no native bf16 arithmetic)."""
  return jnp.dtype(dtype_flag or ("bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"))


def peak_flops(dtype=jnp.float32, device=None) -> tuple[float | None, str]:
  """(peak dense FLOP/s or None if unknown, how it was worked out) for `device` (default: the first)."""
  device = device or jax.devices()[0]
  dtype = jnp.dtype(dtype).name
  if device.platform == "cpu":
    info, cores = cpuinfo(), len(os.sched_getaffinity(0))
    model, mhz = info.get("model name", "unknown CPU"), cpu_clock_mhz(info)
    flop_per_cycle, why = cpu_flop_per_cycle(info)
    if mhz is None or flop_per_cycle is None:
      return None, f"{model}: " + (why if mhz else "no clock in cpufreq or /proc/cpuinfo") + ", peak unknown"
    peak = cores * mhz * 1e6 * flop_per_cycle
    return peak, (f"{model}: {cores} cores x {mhz:.0f} MHz x {flop_per_cycle} fp32 FLOP/cycle ({why}) "
                  f"= {peak / 1e9:.0f} GFLOP/s")
  if device.platform == "tpu":
    peak = TPU_PEAKS.get(device.device_kind) if dtype == "bfloat16" else None
    if peak is None:
      return None, f"{device.device_kind}: no peak known for {dtype}"
    return peak, f"{device.device_kind}: {peak / 1e12:.0f} TFLOP/s dense bfloat16 per chip (vendor table)"
  for name, table in GPU_PEAKS.items():
    if re.search(rf"\b{name}\b", device.device_kind) and dtype in table:
      return table[dtype], f"{device.device_kind}: {table[dtype] / 1e12:.0f} TFLOP/s dense {dtype} (vendor table)"
  return None, f"{device.device_kind}: no peak known for {dtype}"
