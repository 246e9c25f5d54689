"""The pure training and evaluation steps, built from a family's loss function.

A loss function is `loss_fn(params, batch, rng, train) -> (loss_sum, count)`; steps
return metrics as `(sum, count)` pairs so the host can add them over steps and
devices and divide once.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from aigc_jax.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def _split_microbatches(batch, num_micro: int):
  """[B, ...] -> [num_micro, B / num_micro, ...]; microbatch i takes rows i, i + n, ... so shards stay local."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    schedule: optax.Schedule | None = None):
  """Returns `train_step(state, batch) -> (state, metrics)`, to be jitted with the state donated."""

  def grads_of(params, batch, rng):
    def objective(p):
      loss_sum, count = loss_fn(p, batch, rng, True)
      return loss_sum / count, (loss_sum, count)
    grads, (loss_sum, count) = jax.grad(objective, has_aux=True)(params)
    return grads, loss_sum, count

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      grads, loss_sum, count = grads_of(state.params, batch, rng)
    else:
      def accumulate(carry, micro):
        index, micro_batch = micro
        grads, loss_sum, count = grads_of(state.params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, loss_sum, count)), None
      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
      micro = (jnp.arange(grad_accum_steps), _split_microbatches(batch, grad_accum_steps))
      (grads, loss_sum, count), _ = jax.lax.scan(accumulate, zeros, micro)
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": (loss_sum, count),
        "grad_norm": (optax.global_norm(grads), 1.0),
        "param_norm": (optax.global_norm(params), 1.0),
    }
    if schedule is not None:
      metrics["learning_rate"] = (schedule(state.step), 1.0)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(loss_fn: LossFn):
  def eval_step(params, batch):
    loss_sum, count = loss_fn(params, batch, None, False)
    return {"loss": (loss_sum, count)}
  return eval_step


def reduce_metrics(history) -> dict[str, float]:
  """Adds a list of fetched `(sum, count)` metric dicts and divides."""
  totals = {}
  for metrics in history:
    for name, (value, count) in metrics.items():
      s, c = totals.get(name, (0.0, 0.0))
      totals[name] = (s + float(value), c + float(count))
  return {name: s / c for name, (s, c) in totals.items()}
