"""Benchmarks: speed is measured here, never asserted in unit tests (see README and STYLE.md).

Each suite module has `add_arguments(parser)` and `run(args) -> int`; `aigc-jax bench NAME`
and `python -m benchmarks.NAME` both call them.
"""

import argparse
import sys


def parse_args(module, argv=None) -> argparse.Namespace:
  """The suite's flags from `argv` (default: the command line)."""
  parser = argparse.ArgumentParser(description=(module.__doc__ or "").splitlines()[0])
  module.add_arguments(parser)
  return parser.parse_args(argv)


def main(module) -> int:
  """`python -m benchmarks.NAME`: parses the suite's flags and runs it; bad input is one line, exit 2."""
  from aigc_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  try:
    return module.run(parse_args(module))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
