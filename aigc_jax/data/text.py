"""Character-level text data: sources, the vocabulary and resumable batches.

Sources (the `data.source` config key):
  * `embedded:python_stdlib` (the default): the top-level `*.py` files of this
    Python's standard library, in name order, cut at 1,000,000 characters. Every
    Python install has them, so the main job runs with no network.
  * `text_file:PATH`: a UTF-8 text file (e.g. Tiny Shakespeare's `input.txt`).
  * `tfds:NAME`: a TFDS text data set read through `tfds.data_source` (no
    TensorFlow needed at read time); the `text` feature of every example of every
    split, in split order, joined. `tfds:tiny_shakespeare` is the char-rnn corpus.

The text is split by characters: the first `1 - val_fraction` is `train`, the rest
`validation`. Batches are random windows (as in nanoGPT) drawn by a NumPy generator
seeded with `(seed, stream, split, step)`, so batch `step` is a pure function of the step:
that is the data position a checkpoint needs to resume on the same data.
"""

import dataclasses
import glob
import json
import os

import numpy as np

from aigc_jax.data import fingerprint, missing_path
from aigc_jax.data.tfds_source import prepare, tfds_builder
from aigc_jax.errors import UserError
from aigc_jax.files import write_atomically

EMBEDDED_CHARS = 1_000_000


def load_text(source: str) -> str:
  """Returns the whole corpus named by `source`."""
  kind, _, arg = source.partition(":")
  if kind == "embedded":
    return _embedded_text(arg)
  if kind == "text_file":
    return _read_text_file(arg)
  if kind == "tfds":
    return _tfds_text(arg)
  raise UserError(
      f"Unknown data.source {source!r}; use tfds:NAME, text_file:PATH or embedded:python_stdlib.")


def _embedded_text(name: str) -> str:
  if name != "python_stdlib":
    raise UserError(f"Unknown embedded data set {name!r}; the embedded text corpus is embedded:python_stdlib.")
  stdlib = os.path.dirname(os.__file__)
  pieces, size = [], 0
  for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      pieces.append(f.read())
    size += len(pieces[-1])
    if size >= EMBEDDED_CHARS:
      break
  return "\n".join(pieces)[:EMBEDDED_CHARS]


def _read_text_file(path: str) -> str:
  if not os.path.isfile(path):
    raise missing_path("Text file", path, "text_file:PATH")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError:
    raise UserError(f"Text file {path!r} is not UTF-8 text; convert it to UTF-8 first.") from None
  if not text:
    raise UserError(f"Text file {path!r} is empty; point data.source at a file with text in it.")
  return text


def _tfds_text(name: str) -> str:
  builder = tfds_builder(name)
  prepare(builder, name, "text_file:PATH or embedded:python_stdlib")
  known = list(builder.info.splits) or ["train"]
  splits = [s for s in ("train", "validation", "test") if s in known] + sorted(set(known) - {"train", "validation", "test"})
  pieces = []
  for split in splits:
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      example = source[i]
      if "text" not in example:
        raise UserError(f"TFDS data set {name!r} has no 'text' feature; use a text data set such as tiny_shakespeare.")
      text = example["text"]
      pieces.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
  return "".join(pieces)


@dataclasses.dataclass(frozen=True)
class CharVocab:
  """A character vocabulary: token id i is `chars[i]`."""
  chars: str

  @classmethod
  def from_text(cls, text: str) -> "CharVocab":
    return cls("".join(sorted(set(text))))

  @property
  def size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(self.chars)}
    unknown = sorted(set(text) - index.keys())
    if unknown:
      raise UserError(
          f"The text has characters outside the model's vocabulary ({''.join(unknown)!r}); "
          "use only characters the model was trained on.")
    return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)

  def save(self, path: str) -> None:
    write_atomically(path, json.dumps({"chars": self.chars}))

  @classmethod
  def load(cls, path: str) -> "CharVocab":
    try:
      with open(path, encoding="utf-8") as f:
        chars = json.load(f)["chars"]
      if not (isinstance(chars, str) and chars and len(set(chars)) == len(chars)):
        raise TypeError("chars is not a string of distinct characters")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f"The vocabulary {path} cannot be read ({type(e).__name__}); delete it to have `train` "
                      f"rebuild it from the run's data.source (the same corpus gives the same vocabulary).") from None
    return cls(chars)


class CharDataset:
  """A character corpus split into train/validation, served as random windows."""

  SPLITS = ("train", "validation")

  def __init__(self, text: str, vocab: CharVocab, seq_len: int, val_fraction: float):
    ids = vocab.encode(text)
    n_train = int(len(ids) * (1.0 - val_fraction))
    self.vocab = vocab
    self.seq_len = seq_len
    self.splits = {"train": ids[:n_train], "validation": ids[n_train:]}
    for split, data in self.splits.items():
      if len(data) <= seq_len:
        raise UserError(
            f"The {split} split has {len(data)} characters, fewer than one window of {seq_len + 1}; "
            "use more text or a smaller data.seq_len.")

  def fingerprint(self) -> str:
    """Of the token ids of both splits: the text, its vocabulary and where validation starts."""
    return fingerprint([self.splits[split] for split in self.SPLITS])

  @classmethod
  def from_config(cls, data_config, vocab: CharVocab | None = None) -> "CharDataset":
    text = load_text(data_config.source)
    return cls(text, vocab or CharVocab.from_text(text), data_config.seq_len, data_config.val_fraction)

  def batch(self, split: str, step: int, batch_size: int, seed: int, stream: int = 0,
            rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Batch number `step` of `split`: `inputs` and `targets`, each [batch_size, seq_len], or only its `rows` (the
    same windows: a process builds only the rows its devices hold).

    `stream` 0 is training, 1 the fixed evaluation batches, so they never coincide.
    """
    data = self.splits[split]
    rng = np.random.default_rng([seed, stream, self.SPLITS.index(split), step])
    starts = rng.integers(0, len(data) - self.seq_len, size=batch_size)[rows]
    windows = data[starts[:, None] + np.arange(self.seq_len + 1)]
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
