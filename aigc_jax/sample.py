"""Generation from a trained workdir: what `aigc-jax sample` runs (text or an image grid)."""

import os
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import config as config_lib
from aigc_jax import decoding
from aigc_jax import plots
from aigc_jax.errors import UserError
from aigc_jax.tasks import make_task, task_class
from aigc_jax.train import parallel
from aigc_jax.train.checkpoint import Checkpointer
from aigc_jax.train.loop import CONFIG_FILE, compile_steps
from aigc_jax.train.writer import SAMPLES_DIR


# What `sample` and `eval` may override in a trained run's config (`--config.eval.bound_images=100`): settings that
# do not change the trained model.
AFTER_TRAINING = ("eval", "sample")


def load_trained(workdir: str, overrides: Iterable[str] = ()):
  """(task, params, step) from the latest checkpoint in `workdir`; params are the EMA where one is kept.

  `overrides` (`KEY=VALUE`, keys under `AFTER_TRAINING`) change how the run is sampled and evaluated.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f"{workdir!r} holds no trained run ({CONFIG_FILE} is missing); train with `aigc-jax train` first.")
  with open(path) as f:
    text = f.read()
  try:
    config = config_lib.from_json(text)
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e}); restore it, or retrain into a fresh workdir.") from None
  config = config_lib.fill_missing(config, task_class(config).later_keys)
  config_lib.apply_overrides(config, overrides, AFTER_TRAINING, f"the trained model is fixed by {path}")
  task = make_task(config, workdir)
  steps = compile_steps(task, config, parallel.data_mesh())
  checkpointer = Checkpointer(workdir)
  try:
    state, _ = checkpointer.restore(steps.abstract)
  finally:
    checkpointer.close()
  return task, state.eval_params, int(state.step)


def generate_text(task, params, *, prompt: str = "\n", num_samples: int = 1, max_new_tokens: int = 500,
                  temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, beams: int = 1,
                  seed: int = 0) -> list[str]:
  """Samples (or beam-searches) continuations of `prompt` from a language-model task."""
  if num_samples < 1:
    raise UserError(f"--num-samples is {num_samples}; ask for at least one.")
  if not decoding.settings_ok(temperature, top_k, top_p):
    raise UserError("Use --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1.")
  ids = task.vocab.encode(prompt)
  decoding.check_prompt(task.model, len(ids), max_new_tokens, beams, vocab_size=task.vocab.size)
  if beams > 1:
    if num_samples > beams:
      raise UserError(f"Beam search returns at most {beams} beams; ask for --num-samples <= --beams.")
    tokens, _ = decoding.beam_search(task.model, params, jnp.asarray(ids), beams=beams, max_new_tokens=max_new_tokens)
    tokens = tokens[:num_samples]
  else:
    prompts = jnp.tile(jnp.asarray(ids)[None], (num_samples, 1))
    tokens = decoding.sample(task.model, params, prompts, jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p)
  return [task.vocab.decode(row) for row in np.asarray(tokens)]


def _name_part(value) -> str:
  return "-".join(f"{v:g}" for v in value) if isinstance(value, (tuple, list)) else f"{value:g}"


NUM_IMAGES = 64  # the grid of a run whose config has no sample.num_samples: 8x8


def generate_images(task, params, step: int, workdir: str, *, num_samples: int | None = None,
                    label: int | None = None, seed: int = 0, out: str | None = None, overrides: Iterable[str] = (),
                    **options) -> str:
  """Samples `num_samples` images (default: the run's sample.num_samples), all of class `label` or every class in
  turn, and writes a PNG grid: to `out`, or a name in DIR/samples made of every option given, the config
  `overrides` (`KEY=VALUE`) the run was loaded with included, so that grids of other settings do not overwrite
  each other."""
  if out is not None and not out.lower().endswith(".png"):
    raise UserError(f"--out {out!r} does not name a .png file; give a path like samples.png.")
  given = {"num_samples": num_samples, "label": label, **options}
  if num_samples is None:
    num_samples = task.config.sample.get("num_samples", NUM_IMAGES)
  task.check_sample_request(num_samples, **options)  # the count first: the labels are num_samples long
  labels = task.default_labels(num_samples) if label is None else np.full((num_samples,), label)
  task.check_sample_request(num_samples, None if label is None else labels, **options)
  images = task.sample(params, jax.random.PRNGKey(seed), num_samples, labels,
                       **{k: v for k, v in options.items() if v is not None})
  columns = task.num_classes if task.conditional and label is None else None
  grid = plots.image_grid(plots.to_uint8(images), columns=columns)
  if out is None:
    suffix = "".join(f"_{name}_{_name_part(value)}" for name, value in given.items() if value is not None)
    suffix += "".join("_" + re.sub(r"[^\w.-]+", "-", item.replace("=", "_", 1)) for item in overrides)
    out = os.path.join(workdir, SAMPLES_DIR, f"sample_step_{step:06d}_seed_{seed}{suffix}.png")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  plots.save_png(grid, out, scale=2)
  return out
