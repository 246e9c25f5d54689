"""Model families and the registry that builds them from a config."""

import dataclasses

import jax.numpy as jnp

from aigc_jax.errors import UserError
from aigc_jax.models.lstm import LSTM, LSTMConfig
from aigc_jax.models.transformer import Transformer, TransformerConfig

# name -> (module class, hyperparameter dataclass)
LANGUAGE_MODELS = {
    "transformer": (Transformer, TransformerConfig),
    "lstm": (LSTM, LSTMConfig),
}


def build_language_model(model_config, *, vocab_size: int, max_len: int):
  """Builds the language model named by `model_config.name` from the rest of its fields."""
  if model_config.name not in LANGUAGE_MODELS:
    raise UserError(f"Unknown model.name {model_config.name!r}; use one of {', '.join(LANGUAGE_MODELS)}.")
  module_cls, config_cls = LANGUAGE_MODELS[model_config.name]
  fields = {f.name for f in dataclasses.fields(config_cls)}
  kwargs = {k: v for k, v in model_config.items() if k != "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise UserError(f"model.{unknown[0]} is not a {model_config.name} hyperparameter; remove it from the config.")
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = jnp.dtype(kwargs[key])
  if "max_len" in fields:  # models with a context limit take it from data.seq_len
    kwargs["max_len"] = max_len
  return module_cls(config_cls(vocab_size=vocab_size, **kwargs))
