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
import os
from typing import Iterable

import ml_collections

from aigc_jax.errors import UserError


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Imports `path`, calls its `get_config()`, applies overrides, and locks it."""
  config = _config_from_file(path)
  config.lock()
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"Config override {item!r} has no '='; write it as --config.KEY=VALUE.")
    set_key(config, key, value)
  return config


def base_config(this_file: str, name: str) -> ml_collections.ConfigDict:
  """The config of `name`, a file beside `this_file`: how a variant derives from its base."""
  return _config_from_file(os.path.join(os.path.dirname(os.path.abspath(this_file)), name))


def _config_from_file(path: str) -> ml_collections.ConfigDict:
  if not os.path.isfile(path):
    raise UserError(f"Config file {path!r} does not exist; pass one of the files in configs/.")
  spec = importlib.util.spec_from_file_location(f"_aigc_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"Config file {path!r} defines no get_config(); copy the layout of a file in configs/.")
  return module.get_config()


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
  if isinstance(old, bool):
    return isinstance(new, bool)
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
