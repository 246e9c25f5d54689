"""Optax optimizers from the `optim` config block."""

import jax
import optax


def learning_rate_schedule(optim_config, num_train_steps: int, *, updates_per_step: int = 1) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then cosine decay to `min_learning_rate` at `num_train_steps`.

  As a function of the optimizer's update count, which advances `updates_per_step` times a training step (a GAN's
  critic takes `d_steps` updates a step): the schedule still moves once a training step.
  """
  c = optim_config
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
      decay_steps=max(num_train_steps, c.warmup_steps + 1), end_value=c.min_learning_rate)
  return schedule if updates_per_step == 1 else lambda count: schedule(count // updates_per_step)


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only, not on biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, num_train_steps: int, *, updates_per_step: int = 1) -> optax.GradientTransformation:
  c = optim_config
  return optax.chain(
      optax.clip_by_global_norm(c.grad_clip) if c.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(c, num_train_steps, updates_per_step=updates_per_step), b1=c.b1, b2=c.b2,
                  eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask),
  )
