"""The DDPM UNet (Ho et al. 2020), optionally class-conditional for classifier-free guidance."""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.diffusion.samplers import check_labels
from aigc_jax.errors import UserError
from aigc_jax.nn import image


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyperparameters; variants via `dataclasses.replace`."""
  image_size: int = 32  # square images of image_size x image_size pixels
  channels: int = 3  # input and output channels
  base_features: int = 128  # channels at the first level; the time embedding has 4x this
  channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # per level; every level but the last halves the resolution
  num_res_blocks: int = 2  # residual blocks per level going down (one more per level going up)
  attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention (the middle always does)
  num_heads: int = 1
  dropout: float = 0.1
  num_classes: int = 0  # 0: unconditional; else labels in [0, num_classes) and num_classes is the null class
  norm_groups: int = 32  # GroupNorm groups
  scale_shift: bool = False  # embedding as scale and shift after the norm (improved DDPM) instead of a bias
  dtype: Any = jnp.float32  # compute dtype; the output is fp32 either way
  param_dtype: Any = jnp.float32
  attention: str = "auto"  # see aigc_jax.nn.attention

  def __post_init__(self):
    if not (self.channel_mults and self.base_features >= 1 and self.num_heads >= 1 and self.norm_groups >= 1
            and min(self.channel_mults) >= 1 and 0.0 <= self.dropout < 1.0):
      raise UserError(f"UNetConfig needs at least one level (channel_mults {self.channel_mults}, each >= 1), "
                      f"base_features, num_heads and norm_groups >= 1 (have {self.base_features}, {self.num_heads}, "
                      f"{self.norm_groups}) and 0 <= dropout < 1 (have {self.dropout}); fix those fields.")
    levels = len(self.channel_mults)
    if self.image_size % 2 ** (levels - 1):
      raise UserError(f"image_size {self.image_size} does not halve cleanly {levels - 1} times for channel_mults "
                      f"{self.channel_mults}; use fewer levels or a size divisible by {2 ** (levels - 1)}.")
    for f in sorted({self.base_features} | {self.base_features * m for m in self.channel_mults}):
      if f % self.norm_groups or f % self.num_heads:
        raise UserError(f"UNet width {f} is not a multiple of norm_groups ({self.norm_groups}) and num_heads "
                        f"({self.num_heads}); change base_features, channel_mults, norm_groups or num_heads.")
    unknown = sorted(set(self.attention_resolutions) - set(self.resolutions))
    if unknown:
      raise UserError(f"attention_resolutions {unknown} are not feature-map sizes of this UNet "
                      f"{self.resolutions}; use some of those.")

  @property
  def resolutions(self) -> tuple[int, ...]:
    return tuple(self.image_size // 2 ** i for i in range(len(self.channel_mults)))


# Ho et al. 2020, CIFAR-10: 35.7M parameters (checked in tests/test_unet.py).
DDPM_CIFAR10 = UNetConfig(image_size=32, channels=3, base_features=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                          attention_resolutions=(16,), num_heads=1, dropout=0.1)

# A CPU-sized class-conditional MNIST UNet: 28 -> 14 -> 7, attention at 7x7.
# 1,114,209 parameters; 0.358 GFLOP per image forward (XLA:CPU cost analysis, a multiply-add is 2 FLOPs).
# DDPM_CIFAR10 for comparison: 11.67 GFLOP per image.
MNIST = UNetConfig(image_size=28, channels=1, base_features=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(7,), num_heads=4, dropout=0.1, num_classes=10)


class UNet(nn.Module):
  """x [B, H, W, C], timesteps t [B] (int or float), labels [B] int (or one for all) or None -> [B, H, W, C] fp32.

  For a class-conditional model, labels None (or == num_classes) is the null class: the
  unconditional model that classifier-free guidance trains by dropping labels.
  """
  config: UNetConfig

  @nn.compact
  def __call__(self, x, t, labels: Optional[jax.Array] = None, *, train: bool):
    c = self.config
    if x.ndim != 4 or x.shape[1:] != (c.image_size, c.image_size, c.channels):
      raise UserError(f"This UNet takes a batch of {c.image_size}x{c.image_size}x{c.channels} images, [B, H, W, C], "
                      f"not an array of shape {x.shape}; resize the images, build it for their size, or add the "
                      f"batch axis (x[None]) to one image.")
    if jnp.ndim(t) > 1 or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != x.shape[0]):
      raise UserError(f"Give one timestep for the batch or one per image ({x.shape[0]}), not timesteps of shape "
                      f"{jnp.shape(t)}.")
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    emb_dim = 4 * c.base_features
    t = jnp.broadcast_to(t, x.shape[:1])  # one timestep for the batch, or one per image
    emb = image.timestep_embedding(t, c.base_features)  # [B, base]
    emb = nn.Dense(emb_dim, kernel_init=image.default_init, name="time_dense0", **kw)(emb)
    emb = nn.Dense(emb_dim, kernel_init=image.default_init, name="time_dense1", **kw)(nn.swish(emb))  # [B, E]
    if c.num_classes:
      if labels is None:
        labels = jnp.full((x.shape[0],), c.num_classes, jnp.int32)
      if jnp.ndim(labels) == 0:
        labels = jnp.broadcast_to(labels, x.shape[:1])  # one class for the batch, as with timesteps
      check_labels(labels, c.num_classes, x.shape[0], null_class=True)
      emb = emb + nn.Embed(c.num_classes + 1, emb_dim, name="class_embed", **kw)(labels)  # +1: the null class
    elif labels is not None:
      raise UserError("This UNet is unconditional (num_classes=0); pass labels=None or set num_classes.")

    def res(features, name):
      return image.ResBlock(features, dropout=c.dropout, groups=c.norm_groups, scale_shift=c.scale_shift, name=name,
                            **kw)

    def attn(name):
      return image.SpatialSelfAttention(num_heads=c.num_heads, groups=c.norm_groups,
                                        attention_implementation=c.attention, name=name, **kw)

    last = len(c.channel_mults) - 1
    h = nn.Conv(c.base_features, (3, 3), padding="SAME", kernel_init=image.default_init, name="conv_in", **kw)(
        x.astype(c.dtype))  # [B, H, W, base]
    skips = [h]
    for level, mult in enumerate(c.channel_mults):
      for i in range(c.num_res_blocks):
        h = res(c.base_features * mult, f"down{level}_res{i}")(h, emb, train=train)
        if h.shape[1] in c.attention_resolutions:
          h = attn(f"down{level}_attn{i}")(h)
        skips.append(h)
      if level != last:
        h = image.Downsample(h.shape[-1], name=f"down{level}_downsample", **kw)(h)  # [B, H/2, W/2, F]
        skips.append(h)

    h = res(h.shape[-1], "mid_res0")(h, emb, train=train)
    h = attn("mid_attn")(h)
    h = res(h.shape[-1], "mid_res1")(h, emb, train=train)

    for level, mult in reversed(list(enumerate(c.channel_mults))):
      for i in range(c.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)  # [B, H, W, F + F_skip]
        h = res(c.base_features * mult, f"up{level}_res{i}")(h, emb, train=train)
        if h.shape[1] in c.attention_resolutions:
          h = attn(f"up{level}_attn{i}")(h)
      if level != 0:
        h = image.Upsample(h.shape[-1], name=f"up{level}_upsample", **kw)(h)  # [B, 2H, 2W, F]

    h = nn.swish(nn.GroupNorm(c.norm_groups, epsilon=1e-6, name="norm_out", **kw)(h))
    h = nn.Conv(c.channels, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros, name="conv_out", **kw)(h)
    return h.astype(jnp.float32)  # [B, H, W, C]
