"""Writing files that other processes (or a later run) may read while they are written."""

import contextlib
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
