"""Character LSTM language model: the recurrent baseline of the GPT."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aigc_jax.nn.layers import check_token_ids


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  vocab_size: int
  emb_dim: int = 128
  hidden_dim: int = 256
  num_layers: int = 2
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class LSTM(nn.Module):
  """Tokens [B, T] -> logits [B, T, vocab] (fp32). No context limit: the state carries the past.

  With `decode=True` the (c, h) carry of every layer is kept in the `cache`
  collection, so generation shares the Transformer's interface.
  """
  config: LSTMConfig

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, decode: bool = False):
    c = self.config
    check_token_ids(tokens, c.vocab_size)
    b = tokens.shape[0]
    x = nn.Embed(c.vocab_size, c.emb_dim, dtype=c.dtype, param_dtype=c.param_dtype, name="embed")(tokens)
    for i in range(c.num_layers):
      cell = nn.OptimizedLSTMCell(c.hidden_dim, dtype=c.dtype, param_dtype=c.param_dtype, name=f"lstm_{i}")
      rnn = nn.RNN(cell, return_carry=True, name=f"rnn_{i}")
      if decode:
        # (c, h) in fp32, as `nn.RNN` starts them when not decoding (the cell's param_dtype): the same numbers
        zeros = lambda: (jnp.zeros((b, c.hidden_dim), jnp.float32), jnp.zeros((b, c.hidden_dim), jnp.float32))
        carry = self.variable("cache", f"carry_{i}", zeros)
        new_carry, x = rnn(x, initial_carry=carry.value)
        if not self.is_initializing():
          carry.value = new_carry
      else:
        _, x = rnn(x)
      x = nn.Dropout(c.dropout_rate)(x, deterministic=not train)
    logits = nn.Dense(c.vocab_size, dtype=c.dtype, param_dtype=c.param_dtype, name="head")(x)
    return logits.astype(jnp.float32)
