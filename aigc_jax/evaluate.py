"""`aigc-jax eval`: sample quality in our own classifier's feature space, and each family's held-out figure."""

import json
import logging
import os
import time

import jax
import numpy as np

from aigc_jax import plots
from aigc_jax.errors import UserError
from aigc_jax.evaluation import get_classifier, image_metrics
from aigc_jax.sample import load_trained
from aigc_jax.tasks.image import ImageTask

EVAL_FILE = "eval.json"
SAMPLE_CHUNK = 500  # images sampled per compiled call


def sample_many(task, params, num_samples: int, labels, rng, **options):
  """`num_samples` images [N, H, W, C] in [-1, 1], sampled in chunks of `SAMPLE_CHUNK`."""
  chunks = []
  for i, start in enumerate(range(0, num_samples, SAMPLE_CHUNK)):
    n = min(SAMPLE_CHUNK, num_samples - start)
    chunk_labels = None if labels is None else labels[start:start + n]
    chunks.append(np.asarray(task.sample(params, jax.random.fold_in(rng, i), n, chunk_labels, **options)))
    logging.info("sampled %d / %d images", start + n, num_samples)
  return np.concatenate(chunks)


def sampling_record(task, options: dict) -> dict:
  """The sampling settings a result was measured with: `options` given, the run's `sample.*` for the rest."""
  used = {name: options.get(name, task.config.sample[name]) for name in task.sample_options}
  if "sampler" in task.config.sample:  # diffusion: ddim or ddpm, which --config.sample.sampler may have changed
    used = {"sampler": task.config.sample.sampler, **used}
    if used["sampler"] == "ddpm":  # its noise is set by sample.variance, and eta (DDIM's) plays no part
      del used["eta"]
      used["variance"] = task.config.sample.variance
  return used


def evaluate_workdir(workdir: str, *, num_samples: int | None = None, seed: int = 0, overrides=(), **options) -> dict:
  """Writes and returns `DIR/eval.json`: Fréchet distances, label and classifier accuracy, the family's bound.

  `options` are the family's sampling options (diffusion: `steps`, `eta`, `guidance`, `guidance_interval`); None
  keeps the config's `sample.*` value. The values used are recorded in the results. `overrides` (`KEY=VALUE`) change
  the run's `eval.*` and `sample.*` settings, like `eval.bound_images=100` for a quicker bound.
  """
  task, params, step = load_trained(workdir, overrides)
  if not isinstance(task, ImageTask):
    raise UserError("`aigc-jax eval` measures image models; a language model's held-out loss is in metrics.jsonl.")
  num_samples = task.config.eval.num_samples if num_samples is None else num_samples
  if num_samples < 2:
    raise UserError(f"--num-samples is {num_samples}; the Fréchet distance needs at least 2.")
  labels = task.default_labels(num_samples)
  task.check_sample_request(num_samples, labels, **options)
  options = {k: v for k, v in options.items() if v is not None}
  classifier = get_classifier(task.dataset.data, log=logging.info)
  start = time.perf_counter()
  samples = sample_many(task, params, num_samples, labels, jax.random.PRNGKey(seed), **options)
  sampling_seconds = time.perf_counter() - start
  if not np.all(np.isfinite(samples)):
    raise UserError(f"The model at step {step} samples non-finite pixels (NaN or inf), which no metric can score; "
                    f"retrain it, with a lower optim.learning_rate if its loss grew.")
  results = {"step": step, "num_samples": num_samples, **sampling_record(task, options),
             "sampling_seconds": round(sampling_seconds, 1),
             **image_metrics(classifier, task.dataset.images("test"), samples, labels)}
  results.update(task.heldout_metrics(params))
  grid = plots.image_grid(plots.to_uint8(samples[:100]), columns=10)
  plots.save_png(grid, os.path.join(workdir, "eval_samples.png"), scale=2)
  with open(os.path.join(workdir, EVAL_FILE), "w") as f:
    json.dump(results, f, indent=2)
  return results
