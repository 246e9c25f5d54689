"""Data parallelism over every device: batch sharded on a `data` mesh axis, state replicated."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from aigc_jax.errors import UserError
from aigc_jax.nn.attention import BATCH_AXIS


def data_mesh() -> jax.sharding.Mesh:
  # Auto axes: XLA propagates the batch sharding through the model, which stays sharding-agnostic.
  return jax.make_mesh((jax.device_count(),), (BATCH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXIS))


def check_batch_size(batch_size: int, mesh, grad_accum_steps: int = 1) -> None:
  devices = mesh.devices.size
  if batch_size % (devices * grad_accum_steps):
    raise UserError(
        f"batch_size {batch_size} does not split over {devices} devices x {grad_accum_steps} accumulation steps; "
        f"use a multiple of {devices * grad_accum_steps}.")


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Places a global host batch on the mesh, split along the batch axis.

  Every process computes the same global batch (batches are pure functions of the
  step) and contributes its own contiguous slice of rows.
  """
  sharding = batch_sharding(mesh)
  index, count = jax.process_index(), jax.process_count()

  def local(x):
    rows = x.shape[0] // count
    return x[index * rows:(index + 1) * rows]

  return {k: jax.make_array_from_process_local_data(sharding, local(v), v.shape) for k, v in batch.items()}
