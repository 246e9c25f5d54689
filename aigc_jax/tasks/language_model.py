"""Character language modelling: next-token cross-entropy for the Transformer and the LSTM."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aigc_jax import decoding
from aigc_jax.data.text import CharDataset, CharVocab
from aigc_jax.errors import UserError
from aigc_jax.models import build_language_model
from aigc_jax.tasks.base import Task

VOCAB_FILE = "vocab.json"


class LanguageModelTask(Task):
  units = "tokens"
  loss_label = "cross-entropy (nats/token)"

  def __init__(self, config, workdir: str | None = None):
    super().__init__(config)
    vocab_path = os.path.join(workdir, VOCAB_FILE) if workdir else None
    self.vocab = CharVocab.load(vocab_path) if vocab_path and os.path.exists(vocab_path) else None
    self._dataset = None
    if self.vocab is None:  # a new run: the corpus makes the vocabulary
      self.vocab = self.dataset.vocab
    unknown = sorted(set(config.sample.prompt) - set(self.vocab.chars))
    if unknown:  # checked here, not at the first evaluation, after the run's first steps
      raise UserError(f"sample.prompt has characters outside the vocabulary of {config.data.source} "
                      f"({''.join(unknown)!r}); set --config.sample.prompt to text made of its characters.")
    self.model = build_language_model(config.model, vocab_size=self.vocab.size, max_len=config.data.seq_len)
    self.units_per_batch = config.batch_size * config.data.seq_len

  @property
  def dataset(self) -> CharDataset:
    """The corpus, read on first use: sampling from a trained run needs only its saved vocabulary."""
    if self._dataset is None:
      self._dataset = CharDataset.from_config(self.config.data, self.vocab)
    return self._dataset

  def data_fingerprint(self) -> str:
    return self.dataset.fingerprint()

  def save_assets(self, workdir: str) -> None:
    self.vocab.save(os.path.join(workdir, VOCAB_FILE))

  def init_params(self, rng):
    return self.model.init(rng, jnp.zeros((1, self.config.data.seq_len), jnp.int32))["params"]

  def loss(self, params, batch, rng, train: bool):
    rngs = {"dropout": rng} if train else {}
    logits = self.model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32), {}

  def train_batch(self, step: int, rows: slice = slice(None)):
    return self.dataset.batch("train", step, self.config.batch_size, seed=self.config.seed, rows=rows)

  def eval_batches(self, rows: slice = slice(None)):
    return {split: [self.dataset.batch(split, i, self.config.batch_size, seed=self.config.seed, stream=1, rows=rows)
                    for i in range(self.config.eval_batches)]
            for split in CharDataset.SPLITS}

  def on_eval(self, params, step: int, writer) -> str:
    """Writes one sample to `samples/step_N.txt` and TensorBoard; returns it."""
    s = self.config.sample
    prompt = self.vocab.encode(s.prompt)
    tokens = decoding.sample(self.model, params, jnp.asarray(prompt)[None], jax.random.PRNGKey(self.config.seed),
                             max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    text = self.vocab.decode(np.asarray(tokens[0]))
    writer.write_sample(step, text)
    return text
