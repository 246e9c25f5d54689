"""The peak-FLOP/s table behind every benchmark's '% of peak' column."""

import types

import jax.numpy as jnp
import pytest

from aigc_jax.errors import UserError
from benchmarks import peak


def device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("kind,dtype,want", [
    ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989e12), ("NVIDIA H200", jnp.float16, 989e12),
    ("NVIDIA H100 80GB HBM3", jnp.float32, 494.7e12), ("NVIDIA A100-SXM4-80GB", jnp.bfloat16, 312e12),
    ("NVIDIA H100 PCIe", jnp.bfloat16, 756e12), ("NVIDIA H100 NVL", jnp.bfloat16, 835e12),
    ("NVIDIA H200 NVL", jnp.float32, 417.5e12), ("NVIDIA A100 80GB PCIe", jnp.float32, 156e12),
    ("NVIDIA L4", jnp.bfloat16, 121e12), ("NVIDIA L40S", jnp.bfloat16, 362.05e12),  # not L4's
    ("NVIDIA B200", jnp.bfloat16, 2250e12), ("NVIDIA GB200", jnp.bfloat16, 2500e12),  # not B200's
    ("NVIDIA RTX A1000", jnp.bfloat16, None),  # not A100's
    ("NVIDIA GeForce RTX 4090", jnp.bfloat16, None), ("NVIDIA L4", jnp.float64, None)])
def test_gpu_peaks_match_whole_words_of_the_device_kind(kind, dtype, want):
  value, note = peak.peak_flops(dtype, device("gpu", kind))
  assert value == want
  assert note.startswith(kind) and (want is not None or "no peak known" in note)


@pytest.mark.parametrize("kind,dtype,want", [
    ("TPU v5 lite", jnp.bfloat16, 197e12), ("TPU v5", jnp.bfloat16, 459e12), ("TPU v4", jnp.bfloat16, 275e12),
    ("TPU v6 lite", jnp.bfloat16, 918e12), ("TPU v5 lite", jnp.float32, None), ("TPU v3", jnp.bfloat16, None)])
def test_tpu_peaks_match_the_whole_device_kind(kind, dtype, want):
  """v5e reports "TPU v5 lite", which starts like v5p's "TPU v5": a prefix match would give it v5p's peak."""
  value, note = peak.peak_flops(dtype, device("tpu", kind))
  assert value == want
  assert note.startswith(kind) and (want is not None or "no peak known" in note)


ZEN3 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model name": "AMD EPYC", "cpu MHz": "2000.000",
        "flags": "fpu sse sse2 avx fma avx2"}


def cpu_peak(monkeypatch, cpufreq="/no/cpufreq", **fields):
  monkeypatch.setattr(peak, "cpuinfo", lambda: {**ZEN3, **fields})
  monkeypatch.setattr(peak, "CPUFREQ_MAX", str(cpufreq))
  monkeypatch.setattr(peak.os, "sched_getaffinity", lambda _: {0, 1})
  return peak.peak_flops(jnp.float32, device("cpu", "cpu"))


def test_cpu_peak_is_cores_times_clock_times_flop_per_cycle(monkeypatch):
  monkeypatch.delenv(peak.CPU_FLOP_PER_CYCLE_VARIABLE, raising=False)
  value, note = cpu_peak(monkeypatch)
  assert value == 2 * 2000e6 * 32 == 128e9
  assert note == "AMD EPYC: 2 cores x 2000 MHz x 32 fp32 FLOP/cycle (AVX2, 2 FMA units x 8 lanes x 2) = 128 GFLOP/s"
  value, note = cpu_peak(monkeypatch, **{"cpu MHz": ""})
  assert value is None and note == "AMD EPYC: no clock in cpufreq or /proc/cpuinfo, peak unknown"


def test_cpu_peak_takes_the_steady_maximum_clock_where_cpufreq_gives_it(tmp_path, monkeypatch):
  """A bare-metal host's 'cpu MHz' moves with load: a peak from it would change between runs (and --resume)."""
  monkeypatch.delenv(peak.CPU_FLOP_PER_CYCLE_VARIABLE, raising=False)
  (tmp_path / "cpuinfo_max_freq").write_text("3500000\n")  # kHz
  value, note = cpu_peak(monkeypatch, cpufreq=tmp_path / "cpuinfo_max_freq", **{"cpu MHz": "1400.000"})
  assert value == 2 * 3500e6 * 32 and "2 cores x 3500 MHz x 32" in note


@pytest.mark.parametrize("vendor,family,flags,want", [
    ("GenuineIntel", "6", "sse2 avx2 fma avx512f", 64),  # two 512-bit FMA units
    ("AuthenticAMD", "25", "sse2 avx2 fma avx512f", 32),  # Zen 4: AVX-512 on 256-bit units
    ("AuthenticAMD", "26", "sse2 avx2 fma avx512f", 64),  # Zen 5
    ("GenuineIntel", "6", "sse2 avx", 8),
    ("", "", "", None)])  # e.g. an ARM CPU: no x86 flags
def test_cpu_flop_per_cycle_follows_the_vector_extensions(monkeypatch, vendor, family, flags, want):
  monkeypatch.delenv(peak.CPU_FLOP_PER_CYCLE_VARIABLE, raising=False)
  value, note = cpu_peak(monkeypatch, vendor_id=vendor, flags=flags, **{"cpu family": family})
  assert value == (None if want is None else 2 * 2000e6 * want)
  if want is None:
    assert note == "AMD EPYC: no AVX2 or SSE2 flag in /proc/cpuinfo; set AIGC_JAX_CPU_FLOP_PER_CYCLE, peak unknown"


def test_cpu_flop_per_cycle_can_be_set_where_the_rule_is_wrong(monkeypatch):
  monkeypatch.setenv(peak.CPU_FLOP_PER_CYCLE_VARIABLE, "16")
  value, note = cpu_peak(monkeypatch)
  assert value == 2 * 2000e6 * 16 and "x 16 fp32 FLOP/cycle (AIGC_JAX_CPU_FLOP_PER_CYCLE=16)" in note
  for bad in ("0", "-4", "fast", "1.5"):
    monkeypatch.setenv(peak.CPU_FLOP_PER_CYCLE_VARIABLE, bad)
    with pytest.raises(UserError, match=f"AIGC_JAX_CPU_FLOP_PER_CYCLE='{bad}' is not a whole number > 0; set it"):
      cpu_peak(monkeypatch)


def test_suites_time_bf16_on_accelerators_and_fp32_on_a_cpu(monkeypatch):
  assert peak.default_dtype(None) == jnp.float32  # this CPU
  assert peak.default_dtype("float16") == jnp.float16
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(peak.jax, "default_backend", lambda: backend)
    assert peak.default_dtype(None) == jnp.bfloat16
