"""What each model family contributes to the spine: its data, loss, samples.

A task has `units` (what throughput counts, e.g. "tokens"), `units_per_batch`,
`init_params(rng)`, `loss(params, batch, rng, train) -> (sum, count)`,
`train_batch(step)`, `eval_batches() -> {split: [batch, ...]}`,
`on_eval(params, step, writer) -> str` (writes samples; returns a summary to print)
and `save_assets(workdir)`.
"""

from aigc_jax.errors import UserError
from aigc_jax.tasks.language_model import LanguageModelTask

# model.name -> task class
TASKS = {
    "transformer": LanguageModelTask,
    "lstm": LanguageModelTask,
}


def make_task(config, workdir: str | None = None):
  if config.model.name not in TASKS:
    raise UserError(f"Unknown model.name {config.model.name!r}; use one of {', '.join(TASKS)}.")
  return TASKS[config.model.name](config, workdir)
