"""Data sources. `data.source` names one: `tfds:NAME`, `text_file:PATH` or `embedded:NAME`."""

import hashlib
import os

import numpy as np

from aigc_jax.errors import UserError


def missing_path(what: str, path: str, source: str) -> UserError:
  """The error for a data path that is not there; a relative one is read from the current directory, which is
  not where the run trained when `sample` or `eval` runs elsewhere."""
  where = ("" if os.path.isabs(path) else f" in {os.getcwd()} (a relative path is read from the current directory, "
           f"and a run keeps data.source as given: run from where it trained, or train with an absolute path)")
  return UserError(f"{what} {path!r} does not exist{where}; check data.source={source}.")


def fingerprint(arrays) -> str:
  """A short SHA-256 of arrays' shapes, dtypes and bytes: the same data gives the same string, other data another.
  Saved with each checkpoint, so a resume on data that changed (an edited file, another Python's embedded corpus)
  is refused instead of silently continuing on it."""
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.shape}{array.dtype.str}".encode())
    digest.update(array.data)
  return digest.hexdigest()[:16]
