"""Transformer building blocks: embeddings, multi-head attention with a KV cache, MLP."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.nn.attention import dot_product_attention

Dtype = Any


def dense_init(scale: float = 1.0):
  """GPT-2 style init: normal(0.02), scaled down for residual projections."""
  return nn.initializers.normal(stddev=0.02 * scale)


class TokenAndPositionEmbed(nn.Module):
  """Token embedding plus a learned absolute position embedding."""
  vocab_size: int
  max_len: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.token = nn.Embed(self.vocab_size, self.features, embedding_init=dense_init(),
                          dtype=self.dtype, param_dtype=self.param_dtype)
    self.position = self.param("position", dense_init(), (self.max_len, self.features), self.param_dtype)

  def __call__(self, tokens, positions):  # [B, T] int, [T] int -> [B, T, F]
    return self.token(tokens) + jnp.take(self.position, positions, axis=0).astype(self.dtype)[None]

  def attend(self, x):  # [B, T, F] -> [B, T, vocab]: the output head tied to the embedding
    return self.token.attend(x)


class MultiHeadAttention(nn.Module):
  """Causal self-attention with fused QKV, grouped-query heads and a decode-time KV cache.

  In decode mode the keys and values of the new tokens are written into a cache of
  `max_len` positions starting at `decode_index`, and the queries attend to every
  cached position at or before their own. Prefill (many tokens) and one-token steps
  share this path.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_len: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = False
  dropout_rate: float = 0.0
  out_init_scale: float = 1.0
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True, decode: bool = False, decode_index=None):
    b, t, features = x.shape
    h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = nn.Dense((h + 2 * k) * d, use_bias=self.use_bias, kernel_init=dense_init(), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="qkv")(x)
    q, key, value = jnp.split(qkv, [h * d, (h + k) * d], axis=-1)
    q = q.reshape(b, t, h, d)
    key = key.reshape(b, t, k, d)
    value = value.reshape(b, t, k, d)
    if decode:
      cached_key = self.variable("cache", "cached_key", jnp.zeros, (b, self.max_len, k, d), key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, (b, self.max_len, k, d), value.dtype)
      if not self.is_initializing():
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, decode_index, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, decode_index, 0, 0))
      mask = jnp.arange(self.max_len)[None, :] <= decode_index + jnp.arange(t)[:, None]  # [T, max_len]
      out = dot_product_attention(q, cached_key.value, cached_value.value, mask=mask[None, None],
                                  implementation="xla")
    else:
      out = dot_product_attention(q, key, value, causal=True, implementation=self.implementation)
    out = nn.Dense(features, use_bias=self.use_bias, kernel_init=dense_init(self.out_init_scale), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="out")(out.reshape(b, t, h * d))
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class MLP(nn.Module):
  """Two-layer GELU MLP."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = False
  dropout_rate: float = 0.0
  out_init_scale: float = 1.0

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    features = x.shape[-1]
    x = nn.Dense(self.hidden_dim, use_bias=self.use_bias, kernel_init=dense_init(), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc")(x)
    x = nn.gelu(x, approximate=True)
    x = nn.Dense(features, use_bias=self.use_bias, kernel_init=dense_init(self.out_init_scale), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="proj")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
