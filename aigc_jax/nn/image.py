"""Image building blocks (NHWC), written once for the UNet and reusable by a DCGAN or VAE.

Follows the DDPM UNet (Ho et al. 2020, `diffusion_tf/models/unet.py`): GroupNorm -> swish ->
3x3 conv residual blocks with an additive projection of the time (and class) embedding,
stride-2 conv downsampling, nearest-neighbour x2 + conv upsampling, and single-block
self-attention over the H*W positions. Every last layer of a residual branch is zero-initialised,
so each block starts as the identity.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.nn.attention import dot_product_attention
from aigc_jax.nn.conv import Conv, upsample_nearest

Dtype = Any

# DDPM's `default_init`: variance scaling 1.0, fan_avg, uniform (the TF code's own Glorot).
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim] fp32, [sin | cos] halves."""
  t = jnp.asarray(t, jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [dim/2]
  args = t[:, None] * freqs[None, :]  # [B, dim/2]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [B, 2*(dim/2)]
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _conv(features, kernel, *, dtype, param_dtype, strides=1, zero=False, name=None):
  """A SAME convolution (`aigc_jax.nn.conv.Conv`: nn.Conv's parameters, a faster kernel gradient on CPU)."""
  return Conv(features, (kernel, kernel), strides=(strides, strides), dtype=dtype, param_dtype=param_dtype,
              kernel_init=nn.initializers.zeros if zero else default_init, name=name)


def _group_norm(groups, *, dtype, param_dtype, name=None):
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name)


class ResBlock(nn.Module):
  """x [B, H, W, C], emb [B, E] or None -> [B, H, W, features].

  GroupNorm -> swish -> conv3x3 -> (+ Dense(swish(emb))) -> GroupNorm -> swish -> dropout -> conv3x3,
  plus the input (through a 1x1 conv when the channel count changes). With `scale_shift` the
  embedding gives a scale and shift applied after the second GroupNorm (Nichol & Dhariwal 2021)
  instead of a bias added before it.
  """
  features: int
  dropout: float = 0.0
  groups: int = 32
  scale_shift: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb: Optional[jax.Array] = None, *, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.swish(_group_norm(self.groups, name="norm1", **kw)(x))
    h = _conv(self.features, 3, name="conv1", **kw)(h)  # [B, H, W, F]
    norm2 = _group_norm(self.groups, name="norm2", **kw)
    if emb is None:
      h = norm2(h)
    else:
      out = 2 * self.features if self.scale_shift else self.features
      e = nn.Dense(out, kernel_init=default_init, name="emb_proj", **kw)(nn.swish(emb))
      e = e[:, None, None, :]  # [B, 1, 1, F or 2F]
      if self.scale_shift:
        scale, shift = jnp.split(e, 2, axis=-1)
        h = norm2(h) * (1 + scale) + shift
      else:
        h = norm2(h + e)
    h = nn.swish(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = _conv(self.features, 3, zero=True, name="conv2", **kw)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, name="skip", **kw)(x)
    return x + h


class Downsample(nn.Module):
  """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), features] by a stride-2 3x3 conv."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self.features, 3, strides=2, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
  """[B, H, W, C] -> [B, 2H, 2W, features]: nearest-neighbour x2, then a 3x3 conv."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)  # [B, 2H, 2W, C]
    return _conv(self.features, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class SpatialSelfAttention(nn.Module):
  """x [B, H, W, C] -> x + proj(attention over the H*W positions of GroupNorm(x)); proj starts at zero."""
  num_heads: int = 1
  groups: int = 32
  attention_implementation: str = "auto"  # passed through to aigc_jax.nn.attention.dot_product_attention
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"{c} channels do not split into {self.num_heads} attention heads")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _group_norm(self.groups, name="norm", **kw)(x)
    h = h.reshape(b * height * width, c)  # 2-D matmuls for the 1x1 projections
    qkv = nn.Dense(3 * c, kernel_init=default_init, name="qkv", **kw)(h)  # [B*L, 3C]
    qkv = qkv.reshape(b, height * width, 3, self.num_heads, c // self.num_heads)  # [B, L, 3, heads, head_dim]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, heads, head_dim]
    out = dot_product_attention(q, k, v, causal=False, implementation=self.attention_implementation)
    out = nn.Dense(c, kernel_init=nn.initializers.zeros, name="proj", **kw)(out.reshape(b * height * width, c))
    return x + out.reshape(b, height, width, c)
