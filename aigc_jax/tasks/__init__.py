"""What each model family contributes to the spine (see `tasks.base.Task`), by `model.name`."""

from aigc_jax.errors import UserError
from aigc_jax.tasks.diffusion import DiffusionTask
from aigc_jax.tasks.gan import GANTask
from aigc_jax.tasks.language_model import LanguageModelTask
from aigc_jax.tasks.vae import VAETask

# model.name -> task class
TASKS = {
    "transformer": LanguageModelTask,
    "lstm": LanguageModelTask,
    "vae": VAETask,
    "gan": GANTask,
    "diffusion": DiffusionTask,
}


def task_class(config):
  if config.model.name not in TASKS:
    raise UserError(f"Unknown model.name {config.model.name!r}; use one of {', '.join(TASKS)}.")
  return TASKS[config.model.name]


def make_task(config, workdir: str | None = None):
  return task_class(config)(config, workdir)
