"""GANs: the small MLP pair and a DCGAN-style convolutional pair; non-saturating and WGAN-GP losses.

Generators map z [B, latent_dim] to images [B, H, W, C] in [-1, 1] (tanh);
discriminators map images to one logit (or critic value) per image, [B].
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.errors import UserError
from aigc_jax.nn.conv import Conv, upsample_nearest

ARCHITECTURES = ("mlp", "dcgan")
LOSSES = ("non_saturating", "wgan_gp")


@dataclasses.dataclass(frozen=True)
class GANConfig:
  architecture: str = "dcgan"  # mlp or dcgan
  image_size: int = 28  # dcgan: a multiple of 4
  channels: int = 1
  latent_dim: int = 100
  mlp_features: tuple[int, ...] = (256, 512)  # mlp generator hidden widths; the discriminator mirrors them
  conv_features: int = 64  # dcgan width at full resolution; doubled at half resolution; a multiple of 8
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise UserError(f"Unknown GAN architecture {self.architecture!r}; use one of {', '.join(ARCHITECTURES)}.")
    if self.architecture == "dcgan" and self.image_size % 4:
      raise UserError(f"The DCGAN halves image_size twice and it is {self.image_size}; use a multiple of 4, or "
                      f"model.architecture=mlp.")
    if self.architecture == "dcgan" and self.conv_features % 8:
      raise UserError(f"The DCGAN's GroupNorm splits conv_features ({self.conv_features}) into 8 groups; use a "
                      f"multiple of 8.")


def check_latents(z, config: GANConfig) -> None:
  if jnp.ndim(z) != 2 or jnp.shape(z)[1] != config.latent_dim:
    raise UserError(f"The generator takes latents of shape [batch, {config.latent_dim}], not {jnp.shape(z)}; add "
                    f"the batch axis (z[None]) or draw latent_dim values an example.")


def check_images(x, config: GANConfig) -> None:
  want = (config.image_size, config.image_size, config.channels)
  if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != want:
    raise UserError(f"The discriminator takes images of shape [batch, {', '.join(map(str, want))}], not "
                    f"{jnp.shape(x)}; add the batch axis (x[None]) or build it for the images' size.")


class MLPGenerator(nn.Module):
  config: GANConfig

  @nn.compact
  def __call__(self, z):  # [B, Z] -> [B, H, W, C]
    c = self.config
    check_latents(z, c)
    x = z
    for f in c.mlp_features:
      x = nn.leaky_relu(nn.Dense(f, dtype=c.dtype)(x), 0.2)
    x = nn.Dense(c.image_size * c.image_size * c.channels, dtype=c.dtype)(x)
    return jnp.tanh(x.astype(jnp.float32)).reshape(-1, c.image_size, c.image_size, c.channels)


class MLPDiscriminator(nn.Module):
  config: GANConfig

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B]
    c = self.config
    check_images(x, c)
    x = x.reshape(x.shape[0], -1)
    for f in reversed(c.mlp_features):
      x = nn.leaky_relu(nn.Dense(f, dtype=c.dtype)(x), 0.2)
    return nn.Dense(1, dtype=c.dtype)(x)[:, 0].astype(jnp.float32)


class DCGenerator(nn.Module):
  """Dense to a quarter-resolution map, then twice nearest-neighbour upsampling and a 3x3 convolution.

  Resize-convolution rather than DCGAN's transposed convolutions: no checkerboard
  artifacts, and fast on XLA:CPU (see `aigc_jax.nn.conv`).

  GroupNorm rather than DCGAN's BatchNorm: the step stays a pure function of the
  parameters (no batch statistics to carry), and it trains as stably on MNIST-sized data.
  Layers feeding a norm have no bias (as in DCGAN): the norm subtracts it again, and Adam
  would turn its rounding-noise gradient into full-size steps.
  """
  config: GANConfig

  @nn.compact
  def __call__(self, z):  # [B, Z] -> [B, H, W, C]
    c = self.config
    check_latents(z, c)
    s, f = c.image_size // 4, c.conv_features
    x = nn.Dense(s * s * 2 * f, use_bias=False, dtype=c.dtype)(z).reshape(-1, s, s, 2 * f)
    x = nn.relu(nn.GroupNorm(num_groups=8, dtype=c.dtype)(x))
    x = Conv(f, (3, 3), use_bias=False, dtype=c.dtype)(upsample_nearest(x))
    x = nn.relu(nn.GroupNorm(num_groups=8, dtype=c.dtype)(x))
    x = Conv(c.channels, (3, 3), dtype=c.dtype)(upsample_nearest(x))
    return jnp.tanh(x.astype(jnp.float32))


class DCDiscriminator(nn.Module):
  """Two stride-2 convolutions and a linear read-out; no normalisation, so WGAN-GP's per-example penalty holds."""
  config: GANConfig

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B]
    c = self.config
    check_images(x, c)
    x = nn.leaky_relu(nn.Conv(c.conv_features, (4, 4), strides=2, dtype=c.dtype)(x), 0.2)
    x = nn.leaky_relu(nn.Conv(2 * c.conv_features, (4, 4), strides=2, dtype=c.dtype)(x), 0.2)
    return nn.Dense(1, dtype=c.dtype)(x.reshape(x.shape[0], -1))[:, 0].astype(jnp.float32)


def build_gan(config: GANConfig) -> tuple[nn.Module, nn.Module]:
  networks = {"mlp": (MLPGenerator, MLPDiscriminator), "dcgan": (DCGenerator, DCDiscriminator)}
  generator, discriminator = networks[config.architecture]
  return generator(config), discriminator(config)


def check_loss(kind: str) -> None:
  if kind not in LOSSES:
    raise UserError(f"Unknown GAN loss {kind!r}; use one of {', '.join(LOSSES)}.")


def discriminator_loss(kind: str, d_real, d_fake, penalty=0.0):
  """Per-example discriminator (critic) loss, [B]. d_* are logits (non-saturating) or critic values; `penalty`
  (a gradient penalty, R1, ...) is added with either loss."""
  check_loss(kind)
  if kind == "non_saturating":
    return jax.nn.softplus(-d_real) + jax.nn.softplus(d_fake) + penalty  # -log D(x) - log(1 - D(G(z)))
  return d_fake - d_real + penalty


def generator_loss(kind: str, d_fake):
  """Per-example generator loss, [B]: -log D(G(z)) (non-saturating) or -critic(G(z))."""
  check_loss(kind)
  return jax.nn.softplus(-d_fake) if kind == "non_saturating" else -d_fake


def gradient_penalty(critic, real, fake, rng, weight: float = 10.0):
  """WGAN-GP: weight * (||grad critic(x_hat)|| - 1)^2 per example at random interpolates x_hat, [B].

  real and fake are [B, ...] of one shape (images, vectors, sequences); the norm is over all but the batch axis.
  """
  if jnp.shape(real) != jnp.shape(fake) or jnp.ndim(real) < 2:
    raise UserError(f"The gradient penalty interpolates real and fake examples of one [B, ...] shape; got "
                    f"{jnp.shape(real)} and {jnp.shape(fake)}. Make the generator's output the data's shape.")
  eps = jax.random.uniform(rng, real.shape[:1] + (1,) * (real.ndim - 1))  # one mixing weight per example
  x_hat = eps * real + (1.0 - eps) * fake
  grads = jax.grad(lambda x: jnp.sum(critic(x)))(x_hat)  # per-example: the critic has no cross-example terms
  norms = jnp.sqrt(jnp.sum(grads ** 2, axis=tuple(range(1, grads.ndim))) + 1e-12)
  return weight * (norms - 1.0) ** 2
