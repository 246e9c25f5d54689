"""GPT-style decoder-only Transformer (pre-norm, learned or rotary positions, optional tied head)."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aigc_jax import nn as ann
from aigc_jax.errors import UserError
from aigc_jax.nn import layers as ann_layers
from aigc_jax.nn import segments


POSITION_ENCODINGS = ("learned", "rope")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters; variants via `dataclasses.replace`."""
  vocab_size: int
  max_len: int  # context length: learned positions and the KV cache have this many slots
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0  # 0: as many as query heads; fewer for grouped-query attention
  emb_dim: int = 128
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  use_bias: bool = False
  tie_embeddings: bool = True
  dtype: Any = jnp.float32  # compute dtype; bfloat16 computes in bf16 with fp32 params
  param_dtype: Any = jnp.float32
  attention: str = "auto"  # see aigc_jax.nn.attention
  position_encoding: str = "learned"  # learned: GPT-2's absolute table; rope: rotary, on queries and keys

  def __post_init__(self):
    for name in ("vocab_size", "max_len", "num_heads", "emb_dim", "mlp_ratio"):  # num_layers 0: a bigram model
      if getattr(self, name) < 1:
        raise UserError(f"The Transformer's {name} is {getattr(self, name)}; it must be at least 1.")
    if self.num_kv_heads < 0:
      raise UserError(f"num_kv_heads is {self.num_kv_heads}; use 0 (as many as query heads) or a divisor of "
                      f"num_heads.")
    if self.position_encoding not in POSITION_ENCODINGS:
      raise UserError(f"Unknown position_encoding {self.position_encoding!r}; use one of "
                      f"{', '.join(POSITION_ENCODINGS)}.")
    if self.emb_dim % self.num_heads:
      raise UserError(f"emb_dim {self.emb_dim} does not split into {self.num_heads} heads; use an emb_dim that is a "
                      f"multiple of num_heads.")
    if self.num_heads % (self.num_kv_heads or self.num_heads):
      raise UserError(f"{self.num_heads} query heads do not share {self.num_kv_heads} key/value heads evenly; use a "
                      f"num_kv_heads that divides num_heads.")
    if self.position_encoding == "rope" and self.head_dim % 2:
      raise UserError(f"Rotary positions rotate pairs of features and head_dim is {self.head_dim}; use an even "
                      f"emb_dim / num_heads.")

  @property
  def head_dim(self) -> int:
    return self.emb_dim // self.num_heads


class Block(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, *, positions, segment_ids, deterministic, decode, decode_index):
    c = self.config
    residual_scale = (2 * c.num_layers) ** -0.5  # GPT-2: residual projections scaled by depth
    y = ann_layers.LayerNorm(use_bias=c.use_bias, dtype=c.dtype, param_dtype=c.param_dtype, name="ln_attn")(x)
    y = ann.MultiHeadAttention(
        num_heads=c.num_heads, num_kv_heads=c.num_kv_heads or c.num_heads, head_dim=c.head_dim, max_len=c.max_len,
        dtype=c.dtype, param_dtype=c.param_dtype, use_bias=c.use_bias, dropout_rate=c.dropout_rate,
        out_init_scale=residual_scale, implementation=c.attention, rotary=c.position_encoding == "rope", name="attn",
    )(y, positions=positions, segment_ids=segment_ids, deterministic=deterministic, decode=decode,
      decode_index=decode_index)
    x = x + y
    y = ann_layers.LayerNorm(use_bias=c.use_bias, dtype=c.dtype, param_dtype=c.param_dtype, name="ln_mlp")(x)
    y = ann.MLP(c.mlp_ratio * c.emb_dim, dtype=c.dtype, param_dtype=c.param_dtype, use_bias=c.use_bias,
                dropout_rate=c.dropout_rate, out_init_scale=residual_scale, name="mlp")(y, deterministic=deterministic)
    return x + y


class Transformer(nn.Module):
  """Tokens [B, T] -> logits [B, T, vocab] (fp32).

  With `decode=True` the model keeps a KV cache (collection `cache`, made by
  `init` with `decode=True`) and takes the next T tokens of the sequences it has
  seen so far; call `apply(..., decode=True, mutable=["cache"])`.

  `segment_ids` [B, T] (integers, each sequence contiguous) pack several sequences into
  one row: each attends only to itself and its positions restart at 0, so a packed row
  gives the logits its sequences would give alone.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens, *, segment_ids=None, train: bool = False, decode: bool = False):
    c = self.config
    ann_layers.check_token_ids(tokens, c.vocab_size)
    t = tokens.shape[1]
    decode_index = None
    if decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      decode_index = index.value
      if not self.is_initializing():
        index.value = decode_index + t
      positions = decode_index + jnp.arange(t)
    elif segment_ids is not None:
      segments.check_contiguous(segment_ids)
      positions = segments.positions_in_segments(segment_ids)  # [B, T]
    else:
      positions = jnp.arange(t)
    if not decode and c.position_encoding == "learned" and t > c.max_len:
      raise UserError(f"{t} tokens are more than the {c.max_len} positions the model learned; feed at most "
                      f"{c.max_len} at a time (aigc_jax.decoding slides a window past them).")
    embed = ann.TokenAndPositionEmbed(c.vocab_size, c.max_len if c.position_encoding == "learned" else 0, c.emb_dim,
                                      dtype=c.dtype, param_dtype=c.param_dtype, name="embed")
    x = embed(tokens, positions)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=not train)
    for i in range(c.num_layers):
      x = Block(c, name=f"block_{i}")(x, positions=positions, segment_ids=segment_ids, deterministic=not train,
                                      decode=decode, decode_index=decode_index)
    x = ann_layers.LayerNorm(use_bias=c.use_bias, dtype=c.dtype, param_dtype=c.param_dtype, name="ln_final")(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, kernel_init=ann.dense_init(), dtype=c.dtype,
                        param_dtype=c.param_dtype, name="head")(x.reshape(-1, c.emb_dim))  # 2-D matmul: [B*T, F]
      logits = logits.reshape(*x.shape[:-1], c.vocab_size)
    return logits.astype(jnp.float32)
