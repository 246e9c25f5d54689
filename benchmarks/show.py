"""Shows benchmark reports in TensorBoard: each report's rows, its meta and its chart.

  python -m benchmarks.show benchmarks/results/*.json   (wired as `aigc-jax bench show`)
  tensorboard --logdir benchmarks/results/tensorboard

Every suite does this itself when it finishes; this is for reports made elsewhere (a lent GPU
machine's, a colleague's) or before, written into `tensorboard/<report name>/` beside each.
"""

import argparse
import os
import sys

from aigc_jax.errors import UserError
from benchmarks import load_report, write_tensorboard


def add_arguments(parser: argparse.ArgumentParser):
  parser.add_argument("reports", nargs="+", metavar="REPORT", help="JSON reports a bench suite wrote with --out")


def run(args) -> int:
  reports = []
  for path in args.reports:  # all read before anything is written; a glob may catch other JSON files
    try:
      load_report(path)
      reports.append(path)
    except UserError as e:
      print(f"skipped: {e}")
  if not reports:
    raise UserError("None of the files given is a benchmark report; give the JSON files that a bench suite wrote "
                    "with --out.")
  folders = dict.fromkeys(os.path.dirname(write_tensorboard(path)) for path in reports)
  print(f"wrote TensorBoard events for {len(reports)} report(s); to see them: "
        + "; ".join(f"tensorboard --logdir {folder}" for folder in folders))
  return 0


if __name__ == "__main__":
  import benchmarks  # pylint: disable=g-import-not-at-top
  raise SystemExit(benchmarks.main(sys.modules[__name__]))
