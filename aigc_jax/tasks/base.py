"""The interface every model family implements, with the spine's defaults."""

from aigc_jax.train import steps as steps_lib
from aigc_jax.train.optim import learning_rate_schedule, make_optimizer


class Task:
  """What a family contributes to the spine: data, parameters, loss, samples.

  Subclasses set `units` (what throughput counts, e.g. "tokens") and
  `units_per_batch`, and implement `init_params(rng)`,
  `loss(params, batch, rng, train) -> (sum, count, metrics)`, `train_batch(step, rows)`,
  `eval_batches(rows) -> {split: [batch, ...]}` and `on_eval(params, step, writer)`. Batches are pure
  functions of the step, `batch_size` rows each; `rows` (a slice) asks for only those rows of them: a
  process of a multi-process run builds only the rows its devices hold. (A task whose methods take no
  `rows` builds whole batches, in every process.)
  A family whose update is not "one optimizer on one loss" (GANs) overrides
  `optimizer` and `make_train_step`; one that samples from an EMA sets `ema_decay`.
  """
  units: str = "examples"
  loss_label: str = "loss"  # the y axis of curves.png
  units_per_batch: int
  ema_decay: float = 0.0  # > 0: the state keeps an EMA of the parameters for evaluation and sampling
  # Config keys added after runs were saved without them, with the value that reproduces
  # the old behaviour: `aigc-jax sample`/`eval` on an older workdir fills them in.
  later_keys: dict = {}

  def __init__(self, config, workdir: str | None = None):
    del workdir
    self.config = config

  def data_fingerprint(self) -> str | None:
    """A string that changes when the training data does (`aigc_jax.data.fingerprint`), saved with each checkpoint;
    None: the family's data is not checked on resume."""
    return None

  def save_assets(self, workdir: str) -> None:
    """Writes what sampling needs besides the checkpoint (e.g. a vocabulary); process 0 of a run calls it."""

  def optimizer(self):
    return make_optimizer(self.config.optim, self.config.num_train_steps)

  def make_train_step(self, tx):
    """`train_step(state, batch) -> (state, metrics)`, pure; the loop jits it with the state donated."""
    return steps_lib.make_train_step(
        self.loss, tx, grad_accum_steps=self.config.grad_accum_steps, ema_decay=self.ema_decay,
        schedule=learning_rate_schedule(self.config.optim, self.config.num_train_steps))

  def make_eval_step(self):
    """`eval_step(params, batch) -> metrics` as `(sum, count)` pairs."""
    return steps_lib.make_eval_step(self.loss)

  def init_params(self, rng):
    raise NotImplementedError

  def loss(self, params, batch, rng, train: bool):
    raise NotImplementedError

  def train_batch(self, step: int, rows: slice = slice(None)):
    raise NotImplementedError

  def eval_batches(self, rows: slice = slice(None)) -> dict:
    del rows
    return {}

  def on_eval(self, params, step: int, writer) -> None:
    """Writes samples for a person to look at, through `writer` (`write_sample`): every process of a multi-process
    run calls this (sampling is a computation over all of them), and the writer writes on process 0 only."""
