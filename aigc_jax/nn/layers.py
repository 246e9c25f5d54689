"""Transformer building blocks: embeddings, multi-head attention with a KV cache, MLP, LayerNorm.

XLA:CPU notes, from profiling the small GPT step: dense layers run as 2-D matmuls on
[B*T, features] (a 3-D `dot_general` makes XLA transpose activations, and the GELU
gradient, before the weight-gradient matmuls), and LayerNorm and GELU have hand-written
gradients, fewer and fused passes than autodiff of their forward gives.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.nn.attention import dot_product_attention
from aigc_jax.nn.autodiff import custom_gradients

Dtype = Any


def dense_init(scale: float = 1.0):
  """GPT-2 style init: normal(0.02), scaled down for residual projections."""
  return nn.initializers.normal(stddev=0.02 * scale)


class LayerNorm(nn.Module):
  """`nn.LayerNorm` over the last axis (same parameters, fast variance, fp32 statistics), with a fused gradient."""
  epsilon: float = 1e-6
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., F] -> [..., F]
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype) if self.use_bias else None
    if not custom_gradients():
      return _layer_norm_fwd(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))[0]
    return _layer_norm(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, epsilon, dtype):
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_stats(x, epsilon):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)  # one pass, as flax's default
  return x, mean, jax.lax.rsqrt(var + epsilon)


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  xf, mean, rstd = _layer_norm_stats(x, epsilon)
  y = (xf - mean) * rstd * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype), (x, scale, bias, mean, rstd)


def _layer_norm_bwd(epsilon, dtype, residuals, d_y):
  x, scale, bias, mean, rstd = residuals
  normed = (_in_backward(x, d_y).astype(jnp.float32) - mean) * rstd  # recomputed, fused into its users
  d_y = d_y.astype(jnp.float32)
  rows = tuple(range(x.ndim - 1))
  d_scale = jnp.sum(d_y * normed, axis=rows).astype(scale.dtype)
  d_bias = None if bias is None else jnp.sum(d_y, axis=rows).astype(bias.dtype)
  g = d_y * scale.astype(jnp.float32)
  d_x = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
  return d_x.astype(x.dtype), d_scale, d_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _in_backward(x, cotangent):
  """`x`, tied by a data dependency to `cotangent`, for recomputing from `x` in a backward pass.

  Activations saved for the backward pass make XLA:CPU's per-step temp buffer; over
  glibc's 32 MiB mmap threshold it is mapped afresh and page-faulted on every step
  (~10k faults, ~25 ms of system time per step for the small GPT), under it the heap
  reuses it. Recomputing cheap activations in the backward keeps it under, but XLA:CPU
  drops `optimization_barrier`, so a recomputation is merged with the forward's copy
  (CSE) or hoisted into the forward pass. Adding 0 * (one cotangent element) makes it
  wait for the backward; the value is unchanged unless that element is inf or NaN,
  when the gradient is not finite anyway.
  """
  return x + jnp.zeros((), x.dtype) * cotangent.reshape(-1)[0].astype(x.dtype)


_GELU_C = math.sqrt(2 / math.pi)


def _gelu(x):
  return 0.5 * x * (1 + jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _gelu_grad(x):
  th = jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
  return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x)


@jax.custom_vjp
def _gelu_matmul(u, kernel):
  """gelu(u) @ kernel (`nn.gelu(approximate=True)`) for u [N, H], kernel [H, F]."""
  return jnp.dot(_gelu(u), kernel)


def _gelu_matmul_fwd(u, kernel):
  # Keeps u, not gelu(u) as well: the backward recomputes it (see `_in_backward`).
  return _gelu_matmul(u, kernel), (u, kernel)


def _gelu_matmul_bwd(residuals, d_y):
  u, kernel = residuals
  d_h = jnp.dot(d_y, kernel.T)  # [N, H]
  # gelu and its derivative each in their own pass, tied to different cotangents so XLA
  # neither merges their tanh (which would write it out as a third [N, H] array) nor
  # moves them into the forward pass.
  d_u = d_h * _gelu_grad(_in_backward(u, d_h))
  return d_u, jnp.dot(_gelu(_in_backward(u, d_y)).T, d_y)  # [N, H], [H, F]


_gelu_matmul.defvjp(_gelu_matmul_fwd, _gelu_matmul_bwd)


class _GeluDense(nn.Module):
  """`nn.Dense(gelu(u))`, same parameters, with a gradient that recomputes gelu(u)."""
  features: int
  use_bias: bool
  kernel_init: Any
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, u):  # [N, H] -> [N, F]
    kernel = self.param("kernel", self.kernel_init, (u.shape[-1], self.features), self.param_dtype)
    u, kernel = u.astype(self.dtype), kernel.astype(self.dtype)
    y = _gelu_matmul(u, kernel) if custom_gradients() else jnp.dot(_gelu(u), kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
    return y


def check_token_ids(tokens, vocab_size: int, what: str = "The input", ndim: int = 2) -> None:
  """One sentence for token ids an embedding cannot look up: past the table nn.Embed's gather fills
  NaN, and a negative id wraps to the table's end, both silently.

  The rank and the integer dtype are checked always; the values only where they are concrete
  (under jax.jit they are traced and cannot be looked at).
  """
  if jnp.ndim(tokens) != ndim:
    shape = "[batch, length]" if ndim == 2 else "[length]"
    raise UserError(f"{what} must be {shape} token ids, not an array of shape {jnp.shape(tokens)}"
                    + ("; for one sequence pass tokens[None]." if ndim == 2 and jnp.ndim(tokens) == 1 else "."))
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise UserError(f"{what} must be integer token ids, not {jnp.result_type(tokens)}; encode the text with the "
                    f"model's vocabulary.")
  if isinstance(tokens, jax.core.Tracer):
    return
  ids = np.asarray(tokens)  # not jnp: under a caller's jax.jit, its min and max would be traced
  if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
    raise UserError(f"{what} has token ids from {int(ids.min())} to {int(ids.max())}, outside the model's "
                    f"vocabulary 0..{vocab_size - 1}; encode it with the vocabulary the model was trained with.")


class TokenAndPositionEmbed(nn.Module):
  """Token embedding plus a learned absolute position embedding (none with `max_len` 0)."""
  vocab_size: int
  max_len: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.token = nn.Embed(self.vocab_size, self.features, embedding_init=dense_init(),
                          dtype=self.dtype, param_dtype=self.param_dtype)
    if self.max_len:
      self.position = self.param("position", dense_init(), (self.max_len, self.features), self.param_dtype)

  def __call__(self, tokens, positions):  # [B, T] int, [T] or [B, T] int -> [B, T, F]
    x = self.token(tokens)
    return x + jnp.take(self.position, positions, axis=0).astype(self.dtype) if self.max_len else x

  def attend(self, x):  # [B, T, F] -> [B, T, vocab]: the output head tied to the embedding
    return self.token.attend(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.vocab_size)  # 2-D matmul


def rotary_embedding(x, positions, max_wavelength: float = 10_000.0):
  """Rotary position embedding (RoFormer; the rotate-half layout of GPT-NeoX and LLaMA).

  x is [B, T, H, D] with D even, positions [T] or [B, T]. Feature pairs (i, i + D/2) are rotated by
  angle position * max_wavelength ** (-2i / D), in fp32, so the dot product of a rotated
  query and key depends on their positions only through the difference.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary position embedding needs an even head_dim; got {d}")
  inv_freq = max_wavelength ** (-jnp.arange(d // 2, dtype=jnp.float32) / (d // 2))
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [T, D/2] or [B, T, D/2]
  angle = angle.reshape(-1 if angle.ndim == 3 else 1, x.shape[1], 1, d // 2)  # [B|1, T, 1, D/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MultiHeadAttention(nn.Module):
  """Causal self-attention with fused QKV, grouped-query heads and a decode-time KV cache.

  In decode mode the keys and values of the new tokens are written into a cache of
  `max_len` positions starting at `decode_index`, and the queries attend to every
  cached position at or before their own. Prefill (many tokens) and one-token steps
  share this path. With `rotary`, queries and keys are rotated by their `positions` [T]
  or [B, T] (`rotary_embedding`; default: 0..T-1, or from `decode_index` when decoding) before
  the keys are cached. Outside decode mode, `segment_ids` [B, T] keep each packed sequence's
  attention to itself.

  The cache holds `max_len` positions: decoding past them is refused when `decode_index` is a
  concrete number, and is the caller's to avoid when it is traced (`aigc_jax.decoding` slides a
  window of recomputed tokens past the context instead).
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
  rotary: bool = False

  @nn.compact
  def __call__(self, x, *, positions=None, segment_ids=None, deterministic: bool = True, decode: bool = False,
               decode_index=None):
    b, t, features = x.shape
    h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = nn.Dense((h + 2 * k) * d, use_bias=self.use_bias, kernel_init=dense_init(), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="qkv")(x.reshape(b * t, features))
    q, key, value = jnp.split(qkv, [h * d, (h + k) * d], axis=-1)
    q = q.reshape(b, t, h, d)
    key = key.reshape(b, t, k, d)
    value = value.reshape(b, t, k, d)
    if decode:
      if segment_ids is not None:
        raise UserError("segment_ids mark packed sequences for training and scoring; decode without them, one "
                        "sequence per batch row.")
      if decode_index is None:
        raise UserError("Decoding writes the new tokens' keys at decode_index; pass the number of tokens already "
                        "in the cache.")
      if not isinstance(decode_index, jax.core.Tracer) and int(decode_index) + t > self.max_len:
        raise UserError(f"The KV cache holds {self.max_len} positions and {int(decode_index)} are used, so "
                        f"{t} more do not fit; keep decoding within max_len (aigc_jax.decoding.sample slides past it).")
    if self.rotary:
      if positions is None:
        positions = jnp.arange(t) + (decode_index if decode else 0)
      q, key = rotary_embedding(q, positions), rotary_embedding(key, positions)
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
      out = dot_product_attention(q, key, value, causal=True, segment_ids=segment_ids,
                                  implementation=self.implementation)
    out = nn.Dense(features, use_bias=self.use_bias, kernel_init=dense_init(self.out_init_scale), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="out")(out.reshape(b * t, h * d))
    return nn.Dropout(self.dropout_rate)(out.reshape(b, t, features), deterministic=deterministic)


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
    shape = x.shape
    features = shape[-1]
    x = x.reshape(-1, features)
    x = nn.Dense(self.hidden_dim, use_bias=self.use_bias, kernel_init=dense_init(), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc")(x)
    x = _GeluDense(features, use_bias=self.use_bias, kernel_init=dense_init(self.out_init_scale), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="proj")(x).reshape(shape)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
