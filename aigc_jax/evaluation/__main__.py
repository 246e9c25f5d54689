"""`python -m aigc_jax.evaluation [SOURCE]`: trains (or loads from the cache) the classifier for SOURCE.

SOURCE is an image `data.source` (default `embedded:digits`); it prints the held-out accuracy.
"""

import sys

from aigc_jax.data.images import load_images
from aigc_jax.errors import UserError
from aigc_jax.evaluation.classifier import get_classifier


def main(argv: list[str]) -> int:
  try:
    get_classifier(load_images(argv[0] if argv else "embedded:digits"))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
