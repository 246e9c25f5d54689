"""Optax optimizers from the `optim` config block."""

import jax
import optax


def learning_rate_schedule(optim_config, num_train_steps: int) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then cosine decay to `min_learning_rate` at `num_train_steps`."""
  c = optim_config
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
      decay_steps=max(num_train_steps, c.warmup_steps + 1), end_value=c.min_learning_rate)


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only, not on biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, num_train_steps: int) -> optax.GradientTransformation:
  c = optim_config
  return optax.chain(
      optax.clip_by_global_norm(c.grad_clip) if c.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(c, num_train_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                  weight_decay=c.weight_decay, mask=decay_mask),
  )
