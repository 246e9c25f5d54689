"""The `aigc-jax` command line: a thin layer over the library.

  aigc-jax train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]
  aigc-jax sample --workdir DIR [--prompt TEXT] [--num-samples N] [--max-new-tokens N]
                  [--temperature T] [--top-k K] [--top-p P] [--beams B] [--seed S]
"""

import argparse
import logging
import os
import sys

from aigc_jax.errors import UserError


def _train(args, overrides):
  from aigc_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from aigc_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(args.config, overrides)
  result = train_and_evaluate(config, args.workdir)
  print(", ".join(f"{k} {v:.4f}" for k, v in result.items()))
  sample = os.path.join(args.workdir, "samples")
  latest = max(os.listdir(sample)) if os.path.isdir(sample) and os.listdir(sample) else None
  if latest:
    with open(os.path.join(sample, latest), encoding="utf-8") as f:
      print(f"--- sample ({latest}) ---\n{f.read()}")


def _sample(args, overrides):
  if overrides:
    raise UserError(f"`aigc-jax sample` takes no config overrides (got {overrides[0]}); it reads DIR/config.json.")
  from aigc_jax.sample import generate_text  # pylint: disable=g-import-not-at-top

  texts = generate_text(args.workdir, prompt=args.prompt, num_samples=args.num_samples,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, beams=args.beams, seed=args.seed)
  for i, text in enumerate(texts):
    print(f"--- sample {i} ---\n{text}")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="aigc-jax", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train a config, resuming from the workdir's latest checkpoint")
  train.add_argument("--config", required=True, help="configs/NAME.py; override fields with --config.KEY=VALUE")
  train.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events, samples")
  train.set_defaults(run=_train)
  sample = sub.add_parser("sample", help="generate from the latest checkpoint in a workdir")
  sample.add_argument("--workdir", required=True)
  sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
  sample.add_argument("--num-samples", type=int, default=1)
  sample.add_argument("--max-new-tokens", type=int, default=500)
  sample.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
  sample.add_argument("--top-k", type=int, default=0, help="0: off")
  sample.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
  sample.add_argument("--beams", type=int, default=1, help="beam search with this many beams when > 1")
  sample.add_argument("--seed", type=int, default=0)
  sample.set_defaults(run=_sample)
  return p


def main(argv=None) -> int:
  args, rest = parser().parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      print(f"aigc-jax: unknown argument {item!r}; see `aigc-jax {args.command} --help`.", file=sys.stderr)
      return 2
    overrides.append(item[len("--config."):])
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    args.run(args, overrides)
  except UserError as e:
    print(f"aigc-jax: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("aigc-jax: interrupted; run the same command again to resume from the last checkpoint.", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
