"""The pure training and evaluation steps, built from a family's loss function.

A loss function is `loss_fn(params, batch, rng, train) -> (loss_sum, count, metrics)`,
`metrics` a dict of further `(sum, count)` pairs to report (may be empty); steps return
all metrics as `(sum, count)` pairs so the host can add them over steps and devices and
divide once.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from aigc_jax.errors import UserError
from aigc_jax.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]


def _split_microbatches(batch, num_micro: int):
  """[B, ...] -> [num_micro, B / num_micro, ...]; microbatch i takes rows i, i + n, ... so shards stay local."""
  rows = {x.shape[0] for x in jax.tree.leaves(batch)}
  if any(n % num_micro for n in rows):
    raise UserError(f"A batch of {min(rows)} rows does not split into {num_micro} accumulation steps; use a batch "
                    f"size that is a multiple of {num_micro}.")
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1), batch)


def ema_update(ema_params, params, step, decay: float):
  """EMA with the usual warm-up (TensorFlow's ExponentialMovingAverage with num_updates), min(decay, (1 + step) /
  (10 + step)), so early averages track the weights. The rate reaches `decay` only at step 9 / (1 - decay) - 10
  (8,990 for 0.999); a run shorter than that averages with the warm-up's rate."""
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)


def norm_metrics(grads, params) -> dict:
  return {"grad_norm": (optax.tree.norm(grads), 1.0), "param_norm": (optax.tree.norm(params), 1.0)}


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    schedule: optax.Schedule | None = None, ema_decay: float = 0.0):
  """Returns `train_step(state, batch) -> (state, metrics)`, to be jitted with the state donated.

  With `ema_decay > 0` the state's `ema_params` follow the parameters after every update.
  """

  def grads_of(params, batch, rng, mean=True):
    def objective(p):  # the mean loss, or its sum (microbatches: divided by their total count once added)
      loss_sum, count, metrics = loss_fn(p, batch, rng, True)
      return loss_sum / count if mean else loss_sum, (loss_sum, count, metrics)
    grads, (loss_sum, count, metrics) = jax.grad(objective, has_aux=True)(params)
    return grads, loss_sum, count, metrics

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      grads, loss_sum, count, extra = grads_of(state.params, batch, rng)
    else:
      def accumulate(carry, micro):
        index, micro_batch = micro
        out = grads_of(state.params, micro_batch, jax.random.fold_in(rng, index), mean=False)
        return jax.tree.map(jnp.add, carry, out), None
      first = jax.tree.map(lambda x: x[0], _split_microbatches(batch, grad_accum_steps))
      shapes = jax.eval_shape(grads_of, state.params, first, rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      micro = (jnp.arange(grad_accum_steps), _split_microbatches(batch, grad_accum_steps))
      (grads, loss_sum, count, extra), _ = jax.lax.scan(accumulate, zeros, micro)
      grads = jax.tree.map(lambda g: g / count, grads)  # total sum / total count, whatever each microbatch holds
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": (loss_sum, count), **extra, **norm_metrics(grads, params)}
    if schedule is not None:
      metrics["learning_rate"] = (schedule(state.step), 1.0)
    ema_params = state.ema_params
    if ema_decay > 0:
      ema_params = ema_update(ema_params, params, state.step, ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params), metrics

  return train_step


def make_eval_step(loss_fn: LossFn):
  def eval_step(params, batch):
    loss_sum, count, metrics = loss_fn(params, batch, None, False)
    return {"loss": (loss_sum, count), **metrics}
  return eval_step


# Metrics that describe the state at a step rather than the work of one: a window of steps logs the last step's
# (an average of the learning rate over a warm-up window is a rate no step used).
LAST_VALUE = ("learning_rate", "d_learning_rate", "param_norm")


def reduce_metrics(history) -> dict[str, float]:
  """Adds a list of fetched `(sum, count)` metric dicts and divides; LAST_VALUE metrics keep the last one's."""
  totals = {}
  for metrics in history:
    for name, (value, count) in metrics.items():
      s, c = (0.0, 0.0) if name in LAST_VALUE else totals.get(name, (0.0, 0.0))
      totals[name] = (s + float(value), c + float(count))
  return {name: s / c for name, (s, c) in totals.items()}
