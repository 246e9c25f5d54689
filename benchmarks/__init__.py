"""Benchmarks: speed is measured here, never asserted in unit tests (see README and STYLE.md).

Each suite module has `add_arguments(parser)` and `run(args) -> int`; `aigc-jax bench NAME`
and `python -m benchmarks.NAME` both call them.
"""

import argparse
import json
import os
import platform
import sys


def parse_args(module, argv=None) -> argparse.Namespace:
  """The suite's flags from `argv` (default: the command line)."""
  parser = argparse.ArgumentParser(description=(module.__doc__ or "").splitlines()[0])
  module.add_arguments(parser)
  return parser.parse_args(argv)


def environment() -> dict:
  """Where a report ran, for readers to compare: `device` (with the CPU and XLA flags) and software `versions`."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax
  import jaxlib
  import optax

  from benchmarks.peak import cpu_clock_mhz, cpu_model

  device = jax.devices()[0]
  return dict(
      device=dict(backend=jax.default_backend(), kind=device.device_kind, count=jax.device_count(), cpu=cpu_model(),
                  cpu_clock_mhz=cpu_clock_mhz(), cpu_affinity_cores=len(os.sched_getaffinity(0)),
                  platform=platform.platform(), xla_flags=os.environ.get("XLA_FLAGS", "")),
      versions=dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
                    python=platform.python_version()))


def write_report(out_path: str, meta: dict, rows: list, plot) -> None:
  """Writes {meta, rows} as JSON to out_path and `plot(rows, png_path, title)` beside it."""
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  png = os.path.splitext(out_path)[0] + ".png"
  plot(rows, png, f"{meta['device']['kind']}, {meta['dtype']}, peak {meta['peak_note'].split(': ')[-1]}")
  print(f"wrote {out_path} and {png}")


def main(module) -> int:
  """`python -m benchmarks.NAME`: parses the suite's flags and runs it; bad input is one line, exit 2."""
  from aigc_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  try:
    return module.run(parse_args(module))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
