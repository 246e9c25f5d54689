"""Data parallelism over every device: batch sharded on a `data` mesh axis, state replicated.

Every device means every device of every process: a run over several hosts (a TPU pod slice, a GPU cluster) starts
one process per host, joined by `initialize_distributed`, and the mesh spans them all. Batches are pure functions
of the step: each process builds only the rows of the global batch its own devices hold (`process_rows`) and places
them (`shard_batch`). Only the primary process (`is_primary`) writes the workdir's logs and samples, while Orbax
coordinates the checkpoints.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from aigc_jax.errors import UserError
from aigc_jax.nn.attention import BATCH_AXIS


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> None:
  """Joins this process to a multi-process run with `jax.distributed.initialize`, before anything uses a device.

  Values left None are found by JAX's cluster detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes, ...; the
  coordinator also from JAX_COORDINATOR_ADDRESS). CPU processes reduce over TCP (gloo), so a run of several
  processes on one machine works too.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s)
  except (ValueError, TypeError) as e:  # nothing given and no cluster detected, or values that do not fit
    raise UserError(f"Cannot join a multi-process run ({e}); on a cluster JAX does not detect, pass --coordinator "
                    f"HOST:PORT --num-processes N --process-id I (0 <= I < N) to every process.") from None
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError: the coordinator did not answer in time
    raise UserError(f"Cannot join a multi-process run at {coordinator or 'the detected coordinator'} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); start every process with the same "
                    f"--coordinator and --num-processes, process 0 on the coordinator's host.") from None


def is_primary() -> bool:
  """Whether this process writes the workdir's logs, metrics and samples: process 0 of a multi-process run."""
  return jax.process_index() == 0


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


def process_rows(batch_size: int, mesh) -> slice:
  """The rows of a global batch of `batch_size` that this process's devices hold: all of them in a one-process
  run, 1/N of them for each of N processes (`jax.make_mesh` orders the devices by process, so they are one range;
  were they not, this is the range that spans them)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  bounds = [index[0].indices(batch_size)[:2] for index in index_map.values()]
  return slice(min(start for start, _ in bounds), max(stop for _, stop in bounds))


def shard_batch(batch: dict[str, np.ndarray], mesh, batch_size: int | None = None) -> dict[str, jax.Array]:
  """Places a batch on the mesh, split along the batch axis: `batch` holds the rows `process_rows(batch_size,
  mesh)` names of a global batch of `batch_size`, or all of them (as with batch_size None: the whole global batch),
  and each of this process's devices gets its own rows of them."""
  first = next(iter(batch.values()))
  batch_size = len(first) if batch_size is None else batch_size
  rows = process_rows(batch_size, mesh) if len(first) < batch_size else slice(0, batch_size)
  if len(first) != rows.stop - rows.start:
    raise ValueError(f"shard_batch got {len(first)} rows; this process holds rows {rows.start}..{rows.stop} of "
                     f"{batch_size}")

  def local(v, index):
    start, stop, _ = index[0].indices(batch_size)
    return v[(slice(start - rows.start, stop - rows.start), *index[1:])]
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_callback((batch_size, *v.shape[1:]), sharding, lambda index, v=v: local(v, index))
          for k, v in batch.items()}
