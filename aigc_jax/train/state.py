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
