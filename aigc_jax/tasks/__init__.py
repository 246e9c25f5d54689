"""What each model family contributes to the spine (see `tasks.base.Task`), by `model.name`."""

from aigc_jax.errors import UserError
from aigc_jax.tasks.base import Task
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


def register_task(name: str, task: type) -> type:
  """Makes configs with `model.name = name` train, sample and evaluate with `task`, a `tasks.base.Task` subclass:
  how a model of your own runs on the spine (`train_and_evaluate`, checkpoints, resume). Returns `task`."""
  if not (isinstance(task, type) and issubclass(task, Task)):
    raise UserError(f"register_task({name!r}, ...) takes a subclass of aigc_jax.tasks.base.Task, not {task!r}.")
  if name in TASKS and TASKS[name] is not task:
    raise UserError(f"model.name {name!r} is already {TASKS[name].__name__}'s; register {task.__name__} under "
                    f"another name.")
  TASKS[name] = task
  return task


def task_class(config):
  if config.model.name not in TASKS:
    raise UserError(f"Unknown model.name {config.model.name!r}; use one of {', '.join(TASKS)}.")
  return TASKS[config.model.name]


def make_task(config, workdir: str | None = None):
  return task_class(config)(config, workdir)
