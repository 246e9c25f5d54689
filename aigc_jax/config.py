"""Loading experiment configs: one `ml_collections` file per experiment, locked.

A config file defines `get_config() -> ConfigDict`. Overrides come as `KEY=VALUE`
strings (from `--config.KEY=VALUE` on the command line); the value is parsed as a
Python literal and must match the type of the field it replaces. Unknown keys are
errors that name the key, because the config is locked.
"""

import ast
import contextlib
import importlib.util
import json
import math
import os
from typing import Iterable

import ml_collections

from aigc_jax.errors import UserError


# Settings that only make sense in a range: field name (at any depth: `learning_rate` is `optim.learning_rate` and
# `optim.generator.learning_rate`) -> (test, what it must be). Checked wherever a config has them, when it is loaded,
# so that a value that cannot work stops the run before it starts, not at its first evaluation.
def _at_least(n):
  return lambda v: v >= n, f"{n} or more" if n == 0 else f"at least {n}"


def _fraction(upper_open: bool = True):
  return ((lambda v: 0 <= v < 1, "at least 0 and below 1") if upper_open else
          (lambda v: 0 < v <= 1, "above 0 and at most 1"))


COUNTS = ("batch_size", "grad_accum_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
          "seq_len", "num_layers", "num_heads", "emb_dim", "mlp_ratio", "hidden_dim", "latent_dim", "d_steps",
          "base_features", "num_res_blocks", "norm_groups", "conv_features", "num_samples", "max_new_tokens", "steps",
          "num_steps", "bound_images", "bound_stride", "image_size", "channels")
# Tuples of layer widths (or width multipliers): at least one entry, each a whole number of at least 1.
WIDTHS = ("channel_mults", "features", "mlp_features")
DTYPES = ("float32", "bfloat16", "float16")
RANGES = {
    **{name: _at_least(1) for name in COUNTS},
    "keep_checkpoints": (lambda v: v >= 1, "at least 1 (the run resumes from the latest)"),
    **{name: _at_least(0) for name in ("num_train_steps", "eval_batches", "num_kv_heads", "warmup_steps",
                                       "min_learning_rate", "weight_decay", "grad_clip", "top_k", "temperature",
                                       "eta", "gp_weight")},
    # Negative scales guide away from the label, which some research wants; only inf and nan cannot work.
    "guidance": (math.isfinite, "a finite number (0 unconditional, 1 conditional, more guides)"),
    **{name: (lambda v: isinstance(v, int) and v >= 1, "whole numbers of at least 1")
       for name in (*WIDTHS, "attention_resolutions")},
    "learning_rate": (lambda v: v > 0, "above 0"),
    "eps": (lambda v: v > 0, "above 0"),
    **{name: _fraction() for name in ("b1", "b2", "dropout", "dropout_rate", "cond_drop_prob", "ema_decay")},
    "top_p": _fraction(upper_open=False),
    "val_fraction": (lambda v: 0 < v < 1, "between 0 and 1"),
    "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
}


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Imports `path`, calls its `get_config()`, applies overrides, locks it and checks the settings' ranges."""
  config = _config_from_file(path)
  config.lock()
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str],
                    groups: tuple[str, ...] | None = None, why: str = "") -> None:
  """Sets each `KEY=VALUE` of `overrides` (only keys in `groups`, if given; `why` says why) and checks the ranges."""
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"Config override {item!r} has no '='; write it as --config.KEY=VALUE.")
    if groups is not None and key.partition(".")[0] not in groups:
      raise UserError(f"--config.{key} cannot change here: {why}; override only "
                      f"{', '.join(g + '.*' for g in groups)} settings.")
    set_key(config, key, value)
  check_ranges(config, groups)


def check_ranges(config: ml_collections.ConfigDict, groups: tuple[str, ...] | None = None) -> None:
  """One sentence for the first field (in `groups`, if given) whose value, or for a tuple an entry of it, is outside
  its `RANGES` rule."""
  for key, value in _leaves(config):
    if groups is not None and key.partition(".")[0] not in groups:
      continue  # a trained run's other settings are as it was trained, whatever rules came later
    name = key.rpartition(".")[2]
    fits, what = RANGES.get(name, (None, None))
    if fits is None or isinstance(value, bool):
      continue
    if isinstance(value, (tuple, list)):
      if name in WIDTHS and not value:
        raise UserError(f"Config key {key!r} is empty and needs at least one entry; set --config.{key}=(VALUE,).")
      if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and fits(v) for v in value):
        raise UserError(f"Config key {key!r} is {tuple(value)!r} and its entries must be {what}; set "
                        f"--config.{key}=(VALUE, ...).")
    elif isinstance(value, (int, float, str)) and not fits(value):
      raise UserError(f"Config key {key!r} is {value!r} and must be {what}; set --config.{key}=VALUE.")


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  """(dotted key, value) of every field that is not itself a group."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def base_config(this_file: str, name: str) -> ml_collections.ConfigDict:
  """The config of `name`, a file beside `this_file`: how a variant derives from its base."""
  return _config_from_file(os.path.join(os.path.dirname(os.path.abspath(this_file)), name))


def _config_from_file(path: str) -> ml_collections.ConfigDict:
  if not os.path.isfile(path):
    raise UserError(f"Config file {path!r} does not exist; pass one of the files in configs/.")
  if not path.endswith(".py"):
    raise UserError(f"Config file {path!r} is not a Python file; pass one of the .py files in configs/.")
  spec = importlib.util.spec_from_file_location(f"_aigc_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config() if hasattr(module, "get_config") else None
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - whatever the file's own code raises
    raise UserError(f"Config file {path!r} failed to load ({type(e).__name__}: {e}); fix it, or start from a file "
                    f"in configs/.") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"Config file {path!r} defines no get_config() returning an ml_collections.ConfigDict; copy "
                    f"the layout of a file in configs/.")
  return config


def set_key(config: ml_collections.ConfigDict, key: str, value: str) -> None:
  """Sets dotted `key` to the literal `value`, checking the key exists and the type fits."""
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise UserError(f"Unknown config key {'.'.join(parents[:i + 1])!r}; see the config file for the valid keys.")
    node = node[part]
  if leaf not in node:
    raise UserError(f"Unknown config key {key!r}; see the config file for the valid keys.")
  old = node[leaf]
  if isinstance(old, ml_collections.ConfigDict):
    raise UserError(f"Config key {key!r} is a group of settings; set one of them, like --config.{key}."
                    f"{next(iter(old.keys()), 'KEY')}=VALUE.")
  new = _parse_value(value, old)
  if old is not None and not _type_fits(old, new):
    raise UserError(
        f"Config key {key!r} takes a {type(old).__name__}, not {value!r}; pass a value like {old!r}.")
  with node.unlocked() if old is None else contextlib.nullcontext():
    node[leaf] = new


def _parse_value(value: str, old):
  if isinstance(old, str):
    return value  # strings are taken verbatim: no quoting needed on the command line
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def _type_fits(old, new) -> bool:
  if isinstance(old, bool) or isinstance(new, bool):  # bool is an int to Python, never to a config
    return isinstance(old, bool) and isinstance(new, bool)
  if isinstance(old, float):
    return isinstance(new, (int, float)) and not isinstance(new, bool)
  if isinstance(old, (tuple, list)):
    return isinstance(new, (tuple, list))
  return isinstance(new, type(old))


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(json.loads(text))
  config.lock()
  return config


def fill_missing(config: ml_collections.ConfigDict, defaults: dict) -> ml_collections.ConfigDict:
  """`config` with each dotted key of `defaults` that it lacks set to its default value.

  How a run saved before a config key existed is read back: the default given is the value
  that reproduces what the code did before the key was added.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in defaults.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    if leaf not in node:
      node[leaf] = value
  config.lock()
  return config
