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
  # Differences of CDFs taken on the side where the tail is small, so they do not round to 0.
  mass = jnp.where(lower > 0, jax.scipy.special.ndtr(-lower) - jax.scipy.special.ndtr(-upper),
                   jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower))
  return jnp.where(x < -0.999, jax.scipy.special.log_ndtr(upper),
                   jnp.where(x > 0.999, jax.scipy.special.log_ndtr(-lower), jnp.log(jnp.maximum(mass, 1e-12))))
