"""Where aigc_jax keeps what it can rebuild: trained evaluation classifiers and compiled programs.

`$AIGC_JAX_CACHE`, else `$XDG_CACHE_HOME/aigc_jax`, else `~/.cache/aigc_jax`.
"""

import os

import jax


def cache_dir() -> str:
  if os.environ.get("AIGC_JAX_CACHE"):
    return os.environ["AIGC_JAX_CACHE"]
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(xdg, "aigc_jax")


def enable_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache under `cache_dir()`; returns the directory it uses.

  A resumed run, `sample` and `eval` then load the programs an earlier run compiled instead of
  compiling them again (XLA takes seconds to a minute per program on a CPU). Programs that
  compiled in under a second are not stored (JAX's default threshold). A directory the user
  already chose (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is kept.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "jax_compilation_cache"))
  return jax.config.jax_compilation_cache_dir
