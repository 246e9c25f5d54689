"""Data sources. `data.source` names one: `tfds:NAME`, `text_file:PATH` or `embedded:NAME`."""

import os

from aigc_jax.errors import UserError


def missing_path(what: str, path: str, source: str) -> UserError:
  """The error for a data path that is not there; a relative one is read from the current directory, which is
  not where the run trained when `sample` or `eval` runs elsewhere."""
  where = ("" if os.path.isabs(path) else f" in {os.getcwd()} (a relative path is read from the current directory, "
           f"and a run keeps data.source as given: run from where it trained, or train with an absolute path)")
  return UserError(f"{what} {path!r} does not exist{where}; check data.source={source}.")
