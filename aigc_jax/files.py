"""Writing files that other processes (or a later run) may read while they are written."""

import contextlib
import json
import logging
import os


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` through a temporary file beside it, replaced in one step: a reader (another process
  of the run, a resumed run after a kill) sees the old file or the whole new one, never a part. On failure the
  temporary file is removed and the error raised."""
  partial = f"{path}.partial.{os.getpid()}"
  try:
    if isinstance(data, bytes):
      with open(partial, "wb") as f:
        f.write(data)
    else:
      with open(partial, "w", encoding="utf-8") as f:
        f.write(data)
    os.replace(partial, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(partial)
    raise


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a one-object-per-line file (metrics.jsonl). A line cut short (a full disk, a kill in the
  middle of a write) is skipped with a warning rather than ending every later resume in a traceback."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
      else:
        logging.warning("%s: line %d is not a complete record (%r...); skipped", path, number, line[:40])
  return rows
