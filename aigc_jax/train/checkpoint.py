"""Orbax checkpoints in `WORKDIR/checkpoints`: periodic saves, keep the last N, resume from the latest."""

import logging
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from aigc_jax.errors import UserError

# Set when a restore failed: Orbax reads the arrays concurrently, and when one read fails the rest are abandoned in
# flight; as they finish, or are collected at exit, each prints a page of traceback from a background thread. The
# command line ends such a process at once after its one-sentence error (`aigc_jax.cli.console_main`).
reads_abandoned = False
ABANDONED_READS_WAIT_S = 10.0  # how long a failed restore waits for the threads it started before it raises


class Checkpointer:
  """Saves the train state (a pytree) and a JSON record of where the data stream stands.

  The record also keeps a checksum of each saved array (`checksums`), which a restore checks: a file damaged on
  disk is refused rather than resumed (Orbax reads flipped bytes back as different numbers, NaN among them).
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    meta = {**meta, CHECKSUMS: checksums(state)}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, meta) at `step` (default: latest) onto the shardings in `abstract_state`; `meta` is the
    record as `save` was given it, the checksums (checked here) left out."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"No checkpoint in {self.directory}; train first with `aigc-jax train --workdir ...`.")
    running = set(threading.enumerate())
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for missing or damaged files.
      _quiet_abandoned_reads()
      _join_threads_started_since(running)
      raise UserError(f"The checkpoint at step {step} in {self.directory} could not be read ({type(e).__name__}); "
                      f"{self.delete_advice(step)}.") from None
    meta = dict(restored.meta) if isinstance(restored.meta, dict) else restored.meta
    saved = meta.pop(CHECKSUMS, None) if isinstance(meta, dict) else None
    if saved is not None:  # checkpoints written before checksums were kept have none
      now = checksums(restored.state)
      damaged = [name for name, value in now.items() if saved.get(name, value) != value]
      if damaged:
        raise UserError(f"The checkpoint at step {step} in {self.directory} is damaged: {len(damaged)} of its "
                        f"arrays ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}) no longer match "
                        f"the checksums saved with them; {self.delete_advice(step)}.")
    return restored.state, meta

  def delete_advice(self, step: int) -> str:
    """What deleting the unusable checkpoint at `step` does: resume from the one before, or, the only one, start
    the run over (its logged metrics past step 0 then go)."""
    earlier = [s for s in self.manager.all_steps() if s < step]
    path = os.path.join(self.directory, str(step))
    if earlier:
      return f"delete {path} to resume from the one before it (step {max(earlier)})"
    return f"it is the run's only checkpoint: delete {path} to start the run over from step 0"

  def layout_differs(self, step: int, abstract_state) -> bool:
    """Whether the arrays saved at `step` (their shapes and dtypes, as a multiset) differ from `abstract_state`'s:
    a config that changed the state's layout (the optimizer's) then explains a failed restore. False when the
    layout itself cannot be read: the checkpoint's files are damaged, whatever changed besides."""
    def layout(tree):
      return sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))
    try:
      with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(os.path.join(self.directory, str(step), "state")).item_metadata.tree
      return saved is not None and layout(saved) != layout(abstract_state)
    except Exception:  # pylint: disable=broad-except  # Orbax raises many types for missing or damaged files
      return False

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


CHECKSUMS = "checksums"  # the key of the arrays' checksums in a checkpoint's JSON record


def checksums(tree) -> dict[str, int]:
  """One number per array of `tree`, keyed by its path (`jax.tree_util.keystr`): the sum, modulo 2**32, of the
  array's 32-bit words (16- and 8-bit values widened, 64-bit ones split), each times an odd weight that grows with
  its position. Any flipped bit changes it (an odd weight keeps every bit of a word's change), as does a value moved
  to another place. It is a function of the global array, so the same on any number of devices or processes."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_word_sums([leaf for _, leaf in flat]))
  return {jax.tree_util.keystr(path): int(value) for (path, _), value in zip(flat, sums)}


@jax.jit
def _word_sums(leaves: list) -> jax.Array:
  def word_sum(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    unsigned = jnp.dtype(f"uint{8 * min(x.dtype.itemsize, 4)}")
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
    weights = 2 * jax.lax.iota(jnp.uint32, words.size) + 1  # odd; wraps past 2**31 words, staying odd
    return jnp.sum(words * weights, dtype=jnp.uint32)
  return jnp.stack([word_sum(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def _join_threads_started_since(running: set) -> None:
  """Waits, up to ABANDONED_READS_WAIT_S in all, for the threads that are not in `running` (those a failed restore
  left finishing its abandoned reads): a program that goes on after the error (a test suite, a notebook) then runs
  alone. CPython 3.11 raised "AST constructor recursion depth mismatch" in a pytest worker that parsed a module
  while such a thread ran."""
  deadline = time.monotonic() + ABANDONED_READS_WAIT_S
  for thread in threading.enumerate():
    if thread not in running and thread is not threading.current_thread():
      thread.join(max(0.0, deadline - time.monotonic()))


def _quiet_abandoned_reads() -> None:
  """Drops the reports of the reads a failed restore abandoned, and only those: unraisable exceptions of Orbax's
  coroutines, asyncio's 'Task exception was never retrieved' for them, and 'Event loop is closed' raised in the
  threads that finish them."""
  global reads_abandoned
  if reads_abandoned:
    return
  reads_abandoned = True
  unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook

  def loop_closed(value) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

  def abandoned(unraisable) -> bool:
    code = getattr(unraisable.object, "cr_code", None)
    return "orbax" in getattr(code, "co_filename", "") or loop_closed(unraisable.exc_value)

  sys.unraisablehook = lambda u: None if abandoned(u) else unraisable_hook(u)
  threading.excepthook = lambda args: None if loop_closed(args.exc_value) else thread_hook(args)
  logging.getLogger("asyncio").addFilter(lambda record: "orbax" not in record.getMessage())


def abstract_with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
