"""Orbax checkpoints in `WORKDIR/checkpoints`: periodic saves, keep the last N, resume from the latest."""

import os

import jax
import orbax.checkpoint as ocp

from aigc_jax.errors import UserError


class Checkpointer:
  """Saves the train state (a pytree) and a JSON record of where the data stream stands."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, meta) at `step` (default: latest) onto the shardings in `abstract_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"No checkpoint in {self.directory}; train first with `aigc-jax train --workdir ...`.")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for missing or damaged files.
      raise UserError(
          f"The checkpoint at step {step} in {self.directory} could not be read ({type(e).__name__}); "
          f"delete {os.path.join(self.directory, str(step))} to resume from the one before it.") from None
    return restored.state, restored.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
