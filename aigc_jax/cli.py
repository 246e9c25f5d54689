"""The `aigc-jax` command line: a thin layer over the library.

  aigc-jax train --config configs/NAME.py --workdir DIR [--profile N] [--config.KEY=VALUE ...]
                 [--distributed] [--coordinator HOST:PORT --num-processes N --process-id I]
  aigc-jax sample --workdir DIR [--num-samples N] [--seed S] [--config.sample.KEY=VALUE ...]
      language models: [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--beams B]
      image models:    [--out PNG] [--label K] [--steps N] [--eta E] [--guidance W] [--guidance-interval LO HI]
  aigc-jax eval --workdir DIR [--num-samples N] [--seed S] [--steps N] [--eta E] [--guidance W]
                [--guidance-interval LO HI] [--config.eval.KEY=VALUE ...] [--config.sample.KEY=VALUE ...]
  aigc-jax bench attention|denoise|train [--quick] [--out PATH] [...]
  aigc-jax bench show REPORT.json [...]
"""

import argparse
import logging
import math
import os
import signal
import sys

from aigc_jax.cache import enable_compilation_cache
from aigc_jax.errors import UserError
from benchmarks import at_least
from benchmarks import attention as attention_bench
from benchmarks import denoise as denoise_bench
from benchmarks import show as show_bench
from benchmarks import train as train_bench

# `aigc-jax bench NAME`: a module with add_arguments(parser) and run(args); `show` puts reports in TensorBoard.
BENCHMARKS = {"attention": attention_bench, "denoise": denoise_bench, "train": train_bench, "show": show_bench}


def _finite(text: str) -> float:
  """An argparse type: a finite float (NaN and inf are usage errors, not settings)."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
  return value


def _seed(text: str) -> int:
  """An argparse type: an integer seed that fits JAX's 64-bit keys."""
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or not -2 ** 63 <= value < 2 ** 63:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number between -2**63 and 2**63 - 1")
  return value


def _train(args, overrides):
  from aigc_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from aigc_jax.train import parallel  # pylint: disable=g-import-not-at-top
  from aigc_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from aigc_jax.train.writer import SAMPLES_DIR  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(args.config, overrides)
  if args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if not parallel.is_primary():  # process 0 speaks for the run; the others only report problems
      logging.getLogger().setLevel(logging.WARNING)
  result = train_and_evaluate(config, args.workdir, profile_steps=args.profile)
  if not parallel.is_primary():
    return
  if result:
    print(", ".join(f"{k} {v:.4f}" for k, v in result.items()))
  sample = os.path.join(args.workdir, SAMPLES_DIR)
  latest = max(os.listdir(sample)) if os.path.isdir(sample) and os.listdir(sample) else None
  if latest and latest.endswith(".txt"):
    with open(os.path.join(sample, latest), encoding="utf-8") as f:
      print(f"--- sample ({latest}) ---\n{f.read()}")
  elif latest:
    print(f"samples: {os.path.join(sample, latest)}")


# Language-model sampling options and their defaults; those the run's config has under sample.* default to its value.
TEXT_OPTIONS = {"prompt": "\n", "max_new_tokens": 500, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "beams": 1}
RUN_TEXT_DEFAULTS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p")
IMAGE_OPTIONS = ("out", "label", "steps", "eta", "guidance", "guidance_interval")


def _sample(args, overrides):
  from aigc_jax import sample  # pylint: disable=g-import-not-at-top
  from aigc_jax.tasks.image import ImageTask  # pylint: disable=g-import-not-at-top

  task, params, step = sample.load_trained(args.workdir, overrides)
  is_image = isinstance(task, ImageTask)
  misplaced = [name for name in (TEXT_OPTIONS if is_image else IMAGE_OPTIONS) if getattr(args, name) is not None]
  if misplaced:
    kind = "language" if is_image else "image"
    raise UserError(f"--{misplaced[0].replace('_', '-')} applies to {kind} models only; leave it out for this one.")
  if is_image:
    path = sample.generate_images(task, params, step, args.workdir, num_samples=args.num_samples,
                                  overrides=overrides, label=args.label, seed=args.seed, out=args.out,
                                  steps=args.steps, eta=args.eta,
                                  guidance=args.guidance, guidance_interval=args.guidance_interval)
    print(f"wrote {path}")
    return
  run = task.config.sample
  defaults = {**TEXT_OPTIONS, **{name: run[name] for name in RUN_TEXT_DEFAULTS if name in run}}
  options = {name: default if getattr(args, name) is None else getattr(args, name)
             for name, default in defaults.items()}
  texts = sample.generate_text(task, params, num_samples=1 if args.num_samples is None else args.num_samples,
                               seed=args.seed, **options)
  for i, text in enumerate(texts):
    print(f"--- sample {i} ---\n{text}")


def _eval(args, overrides):
  from aigc_jax.evaluate import evaluate_workdir  # pylint: disable=g-import-not-at-top

  results = evaluate_workdir(args.workdir, num_samples=args.num_samples, seed=args.seed, overrides=overrides,
                             steps=args.steps, eta=args.eta, guidance=args.guidance,
                             guidance_interval=args.guidance_interval)
  print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))


def _bench(args, overrides):
  if overrides:
    raise UserError(f"`aigc-jax bench` takes no config overrides (got --config.{overrides[0]}); see "
                    f"`aigc-jax bench {args.suite} --help` for its options.")
  sys.exit(args.bench_run(args))


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="aigc-jax", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train a config, resuming from the workdir's latest checkpoint")
  train.add_argument("--config", required=True, help="configs/NAME.py; override fields with --config.KEY=VALUE")
  train.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events, samples")
  train.add_argument("--profile", type=at_least(1), default=0, metavar="N",
                     help="trace N training steps (after the first, which compiles) with jax.profiler into "
                     "DIR/tensorboard, for TensorBoard's Profile tab")
  hosts = train.add_argument_group("multi-process runs (one process per host, each running the same command on "
                                   "a shared --workdir)")
  hosts.add_argument("--distributed", action="store_true",
                     help="join the other processes with jax.distributed.initialize, which finds them on Cloud TPU "
                     "pods, SLURM, Open MPI and Kubernetes; the next three flags say it by hand (and imply this)")
  hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's host and a free port")
  hosts.add_argument("--num-processes", type=at_least(1), default=None, metavar="N")
  hosts.add_argument("--process-id", type=at_least(0), default=None, metavar="I", help="0 <= I < N")
  train.set_defaults(run=_train)
  sample = sub.add_parser("sample", help="generate from the latest checkpoint in a workdir")
  sample.add_argument("--workdir", required=True)
  sample.add_argument("--num-samples", type=int, default=None,
                      help="default: 1 text; a grid of the run's sample.num_samples images")
  sample.add_argument("--seed", type=_seed, default=0)
  text = sample.add_argument_group("language models")
  text.add_argument("--prompt", default=None, help="text to continue (default: the run's sample.prompt, or a newline)")
  text.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's sample.max_new_tokens, or 500")
  text.add_argument("--temperature", type=_finite, default=None,
                    help="default: the run's sample.temperature, or 0.8; 0 is greedy")
  text.add_argument("--top-k", type=int, default=None, help="default: the run's sample.top_k, or 0 (off)")
  text.add_argument("--top-p", type=_finite, default=None, help="default: the run's sample.top_p, or 1.0 (off)")
  text.add_argument("--beams", type=at_least(1), default=None, help="beam search with this many beams when > 1")
  image = sample.add_argument_group("image models")
  image.add_argument("--out", default=None, help="PNG path (default: DIR/samples/sample_step_N_seed_S.png, "
                     "with _label_K, _steps_N, ... for each option given)")
  image.add_argument("--label", type=int, default=None, help="class-conditional: all samples of this class")
  image.add_argument("--steps", type=int, default=None, help="diffusion: sampler steps (default: the config's)")
  image.add_argument("--eta", type=_finite, default=None, help="diffusion: DDIM eta (0 deterministic, 1 DDPM-like)")
  image.add_argument("--guidance", type=_finite, default=None,
                     help="diffusion: classifier-free guidance scale (0 unconditional, 1 conditional)")
  image.add_argument("--guidance-interval", type=_finite, nargs=2, default=None, metavar=("LO", "HI"),
                     help="diffusion: guide only where LO <= t / (T - 1) <= HI (default: the config's)")
  sample.set_defaults(run=_sample)
  evaluate = sub.add_parser("eval", help="measure a trained image model's samples and held-out bound; writes eval.json")
  evaluate.add_argument("--workdir", required=True)
  evaluate.add_argument("--num-samples", type=int, default=None, help="default: the config's eval.num_samples")
  evaluate.add_argument("--seed", type=_seed, default=0)
  evaluate.add_argument("--steps", type=int, default=None, help="diffusion: sampler steps (default: the config's)")
  evaluate.add_argument("--eta", type=_finite, default=None, help="diffusion: DDIM eta (default: the config's)")
  evaluate.add_argument("--guidance", type=_finite, default=None,
                        help="diffusion: guidance scale (default: the config's)")
  evaluate.add_argument("--guidance-interval", type=_finite, nargs=2, default=None, metavar=("LO", "HI"),
                        help="diffusion: guide only where LO <= t / (T - 1) <= HI (default: the config's)")
  evaluate.set_defaults(run=_eval)
  bench = sub.add_parser("bench", help="kernel and training benchmarks against a side-by-side reference")
  suites = bench.add_subparsers(dest="suite", required=True)
  for name, module in BENCHMARKS.items():
    suite = suites.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else None)
    module.add_arguments(suite)
    suite.set_defaults(run=_bench, bench_run=module.run)
  return p


def main(argv=None) -> int:
  args, rest = parser().parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      hint = (f"write the override as --config.{overrides[-1]}=VALUE, with '='" if overrides and "=" not in
              overrides[-1] else f"see `aigc-jax {args.command} --help`")
      print(f"aigc-jax: unknown argument {item!r}; {hint}.", file=sys.stderr)
      return 2
    overrides.append(item[len("--config."):])
  # force: importing orbax.checkpoint installs a root handler at WARNING, which would drop our INFO lines.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    if args.command != "bench":  # benchmarks report compile times: they compile afresh
      enable_compilation_cache()
    args.run(args, overrides)
  except UserError as e:
    print(f"aigc-jax: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    if hasattr(e, "signal_name"):  # train's loop.Stopped: it saved the step it stopped at
      print(f"aigc-jax: {e}; run the same command again to resume from it.", file=sys.stderr)
      return 128 + signal.Signals[e.signal_name].value
    again = {"train": "; run the same command again to resume from the last checkpoint",
             "bench": "; run the same command with --resume to measure only the cells still missing"}
    print(f"aigc-jax: interrupted{again.get(args.command, '')}.", file=sys.stderr)
    return 130
  return 0


def console_main() -> None:
  """The `aigc-jax` executable: `main`, then exit with its code; at once (output flushed) after a failed checkpoint
  read, whose abandoned reads would otherwise print tracebacks under the one-sentence error as Python shuts down."""
  code = main()
  from aigc_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if checkpoint.reads_abandoned:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # what the abandoned reads' threads still print, they print nowhere
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  console_main()
