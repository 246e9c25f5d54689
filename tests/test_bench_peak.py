"""The peak-FLOP/s table behind every benchmark's '% of peak' column."""

import types

import jax.numpy as jnp
import pytest

from benchmarks import peak


def device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("kind,dtype,want", [
    ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989e12), ("NVIDIA H200", jnp.float16, 989e12),
    ("NVIDIA H100 80GB HBM3", jnp.float32, 494.7e12), ("NVIDIA A100-SXM4-80GB", jnp.bfloat16, None),
    ("NVIDIA H100 PCIe", jnp.bfloat16, 756e12), ("NVIDIA H100 NVL", jnp.bfloat16, 835e12),
    ("NVIDIA H200 NVL", jnp.float32, 417.5e12)])
def test_gpu_peaks_by_device_kind_and_dtype(kind, dtype, want):
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


def test_cpu_peak_is_cores_times_clock_times_flop_per_cycle(monkeypatch):
  monkeypatch.setattr(peak, "cpu_clock_mhz", lambda: 2000.0)
  monkeypatch.setattr(peak.os, "sched_getaffinity", lambda _: {0, 1})
  value, note = peak.peak_flops(jnp.float32, device("cpu", "cpu"))
  assert value == 2 * 2000e6 * peak.CPU_FLOP_PER_CYCLE == 128e9
  assert "2 cores x 2000 MHz x 32 fp32 FLOP/cycle = 128 GFLOP/s" in note
  monkeypatch.setattr(peak, "cpu_clock_mhz", lambda: None)
  assert peak.peak_flops(jnp.float32, device("cpu", "cpu"))[0] is None


def test_suites_time_bf16_on_accelerators_and_fp32_on_a_cpu(monkeypatch):
  assert peak.default_dtype(None) == jnp.float32  # this CPU
  assert peak.default_dtype("float16") == jnp.float16
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(peak.jax, "default_backend", lambda: backend)
    assert peak.default_dtype(None) == jnp.bfloat16
