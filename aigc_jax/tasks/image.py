"""What the image families share: labelled image data, sample grids, sampling requests."""

import jax
import numpy as np

from aigc_jax import plots
from aigc_jax.data.images import ImageDataset
from aigc_jax.errors import UserError
from aigc_jax.tasks.base import Task


class ImageTask(Task):
  """Images [B, H, W, C] in [-1, 1] with int labels; subclasses add the model, loss and `sample`."""
  units = "images"
  conditional = False  # True: `sample` takes labels
  sample_options = ()  # names of the extra `sample` options the family takes (e.g. "steps")
  later_keys = {"data.random_flip": False}  # runs trained before the key were not augmented

  def __init__(self, config, workdir: str | None = None):
    super().__init__(config)
    self.dataset = ImageDataset.from_config(config.data)
    self.image_shape = self.dataset.data.image_shape  # (H, W, C)
    if self.image_shape[0] != self.image_shape[1]:
      raise UserError(f"The image models take square images and {config.data.source} gives "
                      f"{self.image_shape[0]}x{self.image_shape[1]} ones; use a data set of square images.")
    self.num_classes = self.dataset.num_classes
    self.units_per_batch = config.batch_size

  def train_batch(self, step: int, rows: slice = slice(None)):
    return self.dataset.batch("train", step, self.config.batch_size, self.config.seed, rows=rows)

  def data_fingerprint(self) -> str:
    return self.dataset.fingerprint()

  def eval_batches(self, rows: slice = slice(None)) -> dict:
    return {"validation": self.dataset.eval_batches("test", self.config.eval_batches, self.config.batch_size,
                                                    self.config.seed, rows=rows)}

  def sample(self, params, rng, num_samples: int, labels=None, **options):
    """`num_samples` images [N, H, W, C] in [-1, 1]; `labels` [N] for conditional families."""
    raise NotImplementedError

  def heldout_metrics(self, params) -> dict[str, float]:
    """The family's own figure on the whole held-out split (e.g. a likelihood bound); none by default."""
    del params
    return {}

  def check_sample_request(self, num_samples: int, labels=None, **options) -> None:
    """One clear sentence for a request this family cannot serve."""
    if num_samples < 1:
      raise UserError(f"--num-samples is {num_samples}; ask for at least one.")
    unknown = [name for name, value in options.items() if value is not None and name not in self.sample_options]
    if unknown:
      raise UserError(f"--{unknown[0].replace('_', '-')} does not apply to a {self.config.model.name} model; leave it "
                      f"out.")
    if labels is not None:
      if not self.conditional:
        raise UserError(f"This {self.config.model.name} model is not class-conditional; leave out --label.")
      bad = [int(k) for k in np.atleast_1d(labels) if not 0 <= int(k) < self.num_classes]
      if bad:
        raise UserError(f"Label {bad[0]} is outside the model's classes 0..{self.num_classes - 1}; pick one of those.")

  def default_labels(self, num_samples: int):
    """Conditional grids show each class in turn: labels 0, 1, ..., K-1, 0, ..."""
    return np.arange(num_samples) % self.num_classes if self.conditional else None

  def on_eval(self, params, step: int, writer) -> None:
    n = self.config.sample.num_samples
    labels = self.default_labels(n)
    images = self.sample(params, jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step), n, labels)
    writer.write_sample(step, plots.image_grid(plots.to_uint8(images),
                                               columns=self.num_classes if self.conditional else None))
