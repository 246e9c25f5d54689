"""Training state: a plain pytree, so Orbax saves and restores all of it."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done so far
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; step `s` uses fold_in(rng, s)
  ema_params: Any = None  # exponential moving average of `params` for families that sample with it; else None

  @property
  def eval_params(self):
    """The parameters evaluation and sampling use: the EMA where the family keeps one."""
    return self.params if self.ema_params is None else self.ema_params
