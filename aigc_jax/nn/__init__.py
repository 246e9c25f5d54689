"""Shared building blocks, written once and imported by every model family."""

from aigc_jax.nn.attention import dot_product_attention, resolve_implementation, IMPLEMENTATIONS
from aigc_jax.nn.autodiff import plain_autodiff
from aigc_jax.nn.image import Downsample, ResBlock, SpatialSelfAttention, Upsample, timestep_embedding
from aigc_jax.nn.layers import (MLP, LayerNorm, MultiHeadAttention, TokenAndPositionEmbed, dense_init,
                                rotary_embedding)
