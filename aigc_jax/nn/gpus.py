"""The GPU facts the attention implementations choose by, kept apart from the Pallas kernels: asking them must
not import a kernel module, which a JAX release whose Pallas API has moved may fail to import."""

import jax

HOPPER = (9, 0)  # compute capability


def gpu_compute_capability() -> tuple[int, int] | None:
  """The lowest compute capability among jax's NVIDIA GPUs, e.g. (9, 0) on an H100; None on other backends."""
  if jax.default_backend() != "gpu":
    return None
  try:
    return min(tuple(int(x) for x in d.compute_capability.split(".")) for d in jax.devices())
  except (AttributeError, ValueError):  # not CUDA devices (ROCm names its architectures gfx...)
    return None


def on_hopper() -> bool:
  """Whether jax runs on Hopper GPUs (compute capability 9.0), the only ones with the Hopper kernels' wgmma."""
  return gpu_compute_capability() == HOPPER
