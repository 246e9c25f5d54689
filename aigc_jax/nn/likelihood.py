"""Likelihoods of 8-bit images, shared by the families that report bits per dimension."""

import jax
import jax.numpy as jnp


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(x) for x on the 256-level grid scaled to [-1, 1], under N(mean, e^(2 log_scale)) integrated over
  x's bin of width 2/255 (the edge bins extend to -inf and +inf); elementwise, in nats.

  A probability of a discrete value, so its negative is at least 0 nats and a bound built on it compares
  with other discrete-data results (Ho et al. 2020, eq. 13).
  """
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + 1 / 255)
  lower = inv_std * (x - mean - 1 / 255)
  # log(Phi(upper) - Phi(lower)) in log space, on the side where the tail is small (by symmetry, the right tail's
  # bins as Phi(-lower) - Phi(-upper)): no floor on the probability, so a pixel far out in a tail pays its whole
  # cost and keeps its gradient (a floor of 1e-12 capped a pixel at 27.6 nats, with zero gradient past it).
  right = lower > 0
  near, far = jnp.where(right, -lower, upper), jnp.where(right, -upper, lower)  # Phi(near) > Phi(far)
  log_near, log_far = jax.scipy.special.log_ndtr(near), jax.scipy.special.log_ndtr(far)
  interior = log_near + jnp.log(-jnp.expm1(log_far - log_near))
  return jnp.where(x < -0.999, jax.scipy.special.log_ndtr(upper),
                   jnp.where(x > 0.999, jax.scipy.special.log_ndtr(-lower), interior))
