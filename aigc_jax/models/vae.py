"""Convolutional VAE: Gaussian posterior, Bernoulli (binarized) or discretized Gaussian likelihood.

The loss is the negative ELBO in nats per image; `bits_per_dim` divides it by H·W·C·ln 2.
Both likelihoods give probabilities of discrete pixels (binary, or the 256 levels of an 8-bit
image), so the figure is a bound on the data's negative log-likelihood that compares with other
discrete-data results. A continuous Gaussian density on the 8-bit grid would not be one: with a
small enough scale it goes below 0 bits per dimension.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.nn.likelihood import discretized_gaussian_log_likelihood
from aigc_jax.nn.conv import Conv, upsample_nearest

LIKELIHOODS = ("bernoulli", "gaussian")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  image_size: int = 28  # a multiple of 2 ** len(features): each stage halves it
  channels: int = 1
  latent_dim: int = 16
  features: tuple[int, ...] = (32, 64)  # encoder widths per stride-2 stage; the decoder mirrors them
  hidden_dim: int = 256  # dense layer between the convolutions and the latent
  likelihood: str = "bernoulli"  # bernoulli: binarized pixels; gaussian: 8-bit pixels in [-1, 1], discretized
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.likelihood not in LIKELIHOODS:
      raise UserError(f"Unknown model.likelihood {self.likelihood!r}; use one of {', '.join(LIKELIHOODS)}.")
    stride = 2 ** len(self.features)
    if self.image_size % stride:
      raise UserError(f"The VAE halves image_size {len(self.features)} times (one per entry of features) and it is "
                      f"{self.image_size}; use an image_size that is a multiple of {stride}, or fewer features.")

  @property
  def num_dims(self) -> int:
    return self.image_size * self.image_size * self.channels


class Encoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> mean, log_var [B, Z]
    c = self.config
    for f in c.features:
      x = nn.swish(nn.Conv(f, (4, 4), strides=2, dtype=c.dtype)(x))
    x = nn.swish(nn.Dense(c.hidden_dim, dtype=c.dtype)(x.reshape(x.shape[0], -1)))
    stats = nn.Dense(2 * c.latent_dim, dtype=c.dtype)(x).astype(jnp.float32)
    return jnp.split(stats, 2, axis=-1)


class Decoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, z):  # [B, Z] -> [B, H, W, C] Bernoulli logits or Gaussian means
    c = self.config
    size = c.image_size // 2 ** len(c.features)
    x = nn.swish(nn.Dense(c.hidden_dim, dtype=c.dtype)(z))
    x = nn.swish(nn.Dense(size * size * c.features[-1], dtype=c.dtype)(x)).reshape(-1, size, size, c.features[-1])
    for f in reversed(c.features[:-1]):
      x = nn.swish(Conv(f, (3, 3), dtype=c.dtype)(upsample_nearest(x)))
    return Conv(c.channels, (3, 3), dtype=c.dtype)(upsample_nearest(x)).astype(jnp.float32)


def check_images(x, config: VAEConfig, low: float, high: float, units: str, levels: int | None = None) -> None:
  """One sentence for images the VAE cannot score: another shape (a channel count that broadcast silently, and
  counted bits per dim over the wrong number of dimensions) or, where the values are concrete, pixels outside
  its likelihood's range (the Bernoulli log-likelihood of a pixel of -1 is positive: no probability) or, with
  `levels`, off the grid of that many evenly spaced values from low to high that the likelihood is a probability
  of (a grey 0.5 under the Bernoulli, or 8-bit data scaled to [0, 1] under the discretized Gaussian, gave numbers
  that are no log-probabilities)."""
  c = config
  if jnp.ndim(x) != 4 or jnp.shape(x)[1:] != (c.image_size, c.image_size, c.channels):
    raise UserError(f"This VAE takes [batch, {c.image_size}, {c.image_size}, {c.channels}] images, not shape "
                    f"{jnp.shape(x)}; resize the images or build it for their size and channels.")
  if isinstance(x, jax.core.Tracer):
    return
  lowest, highest = float(jnp.min(x)), float(jnp.max(x))
  if not low <= lowest <= highest <= high:  # NaN fails too
    raise UserError(f"Pixels run from {lowest:g} to {highest:g}; this VAE takes {units}.")
  if levels is not None:
    steps = (np.asarray(x, np.float64) - low) * ((levels - 1) / (high - low))
    if np.max(np.abs(steps - np.rint(steps)), initial=0.0) > 1e-3:
      raise UserError(f"Pixels take values between the {levels} levels from {low:g} to {high:g}; this VAE takes "
                      f"{units}.")


class VAE(nn.Module):
  """`__call__(x, rng)` returns the negative ELBO per image and its parts; `decode(z)` the likelihood's mean."""
  config: VAEConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)
    if self.config.likelihood == "gaussian":
      self.log_scale = self.param("log_scale", nn.initializers.zeros, (self.config.channels,))

  def __call__(self, x, rng):  # x [B, H, W, C]: {0, 1} for bernoulli, the 256 levels of [-1, 1] for gaussian
    if self.config.likelihood == "bernoulli":
      check_images(x, self.config, 0.0, 1.0, "binarized pixels in {0, 1} for its Bernoulli likelihood (draw each "
                   "pixel as 1 with its intensity as probability; reconstruct takes [-1, 1])", levels=2)
    else:
      check_images(x, self.config, -1.0, 1.0, "8-bit pixels mapped to [-1, 1] (k / 127.5 - 1) for its discretized "
                   "Gaussian likelihood", levels=256)
    mean, log_var = self.encoder(x)
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mean.shape)
    recon = -self.log_likelihood(x, self.decoder(z))  # [B]
    kl = 0.5 * jnp.sum(jnp.exp(log_var) + mean ** 2 - 1.0 - log_var, axis=-1)  # KL(q(z|x) || N(0, I)), [B]
    return {"nelbo": recon + kl, "recon": recon, "kl": kl}

  def log_likelihood(self, x, out):  # -> [B], nats
    if self.config.likelihood == "bernoulli":
      ll = x * jax.nn.log_sigmoid(out) + (1.0 - x) * jax.nn.log_sigmoid(-out)
    else:
      ll = discretized_gaussian_log_likelihood(x, out, self.log_scale)
    return jnp.sum(ll, axis=(1, 2, 3))

  def decode(self, z):
    """The likelihood's mean for latents z [B, Z], in [-1, 1] pixel units."""
    out = self.decoder(z)
    return 2.0 * jax.nn.sigmoid(out) - 1.0 if self.config.likelihood == "bernoulli" else jnp.clip(out, -1.0, 1.0)

  def reconstruct(self, x):
    """The decoded posterior mean of images x in [-1, 1] pixel units, in the same units. The Bernoulli encoder
    was trained on {0, 1} pixels, so it gets x mapped to [0, 1]."""
    check_images(x, self.config, -1.0, 1.0, "pixels in [-1, 1] to reconstruct")
    x = (x + 1.0) / 2.0 if self.config.likelihood == "bernoulli" else x
    return self.decode(self.encoder(x)[0])


def bits_per_dim(nelbo_nats, config: VAEConfig):
  """nats per image -> bits per dimension."""
  return nelbo_nats / (config.num_dims * math.log(2))
