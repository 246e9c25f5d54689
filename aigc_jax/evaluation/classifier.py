"""The feature network behind the image metrics: a small CNN the project trains itself, once per data set.

Inception features (FID) need downloaded weights and are meaningless on 28x28 digits, so the
metrics use a classifier trained on the data's `train` split: deterministic (fixed seed, fixed
steps) and cached in `aigc_jax.cache.cache_dir()` as `classifiers/<key>.msgpack`. The key
hashes the data (train and test images and labels), the architecture version and the training
hyperparameters, so any change trains a new one. Trained on MNIST images 0-8,999 it scores 99.1%
on 9,000-9,999 in 80 CPU-seconds (116 s wall on a busy 2-core CPU): `python -m aigc_jax.evaluation mnist_idx:DIR`.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Callable

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aigc_jax.cache import cache_dir
from aigc_jax.data.images import ImageData, to_float
from aigc_jax.files import write_atomically

ARCH_VERSION = 2  # bump when ConvNet changes, so old caches are not loaded into a new network
FEATURE_DIM = 128


class ConvNet(nn.Module):
  """conv16-pool-conv32-pool-dense128-dense(classes); the 128-d penultimate layer is the feature.

  Narrow convolutions because they dominate the CPU step: conv32-conv64 costs 3x the CPU time per
  step and, trained 1,000 steps (145 CPU-s), scored 98.9% on MNIST where this net scores 99.1%
  with 1,500 steps (73 CPU-s).
  """
  num_classes: int

  @nn.compact
  def __call__(self, images):  # [B, H, W, C] in [-1, 1]
    x = _max_pool_2x2(nn.relu(nn.Conv(16, (3, 3))(images)))  # [B, H/2, W/2, 16]
    x = _max_pool_2x2(nn.relu(nn.Conv(32, (3, 3))(x)))  # [B, H/4, W/4, 32]
    features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))  # [B, 128]
    return features, nn.Dense(self.num_classes)(features)  # [B, 128], [B, classes]


def _max_pool_2x2(x):  # [B, H, W, C] -> [B, H//2, W//2, C]
  """`nn.max_pool(x, (2, 2), (2, 2))` as a reshape and max: its gradient is a cheap mask where
  XLA:CPU's select-and-scatter for the pooling gradient made the whole step ~1.7x slower."""
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@dataclasses.dataclass(frozen=True)
class TrainHParams:
  """How the classifier is trained; part of the cache key."""
  num_steps: int = 1500  # ~21 epochs of the 9,000 MNIST training images
  batch_size: int = 128
  learning_rate: float = 3e-3  # Adam, cosine-decayed to 0
  max_shift: int = 2  # augmentation: random translations of up to this many pixels
  seed: int = 0


def cache_key(data: ImageData, hparams: TrainHParams) -> str:
  """Hashes the content of the splits (not `data.name`, so `mnist_idx:DIR` spelt two ways shares a
  cache), the architecture version and the hyperparameters. The `test` split is in it because
  the cache stores the accuracy measured on it."""
  digests = {}
  for split in ("train", "test"):
    images, labels = data.splits[split]
    digest = hashlib.sha256(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(labels.astype(np.int32).tobytes())
    digests[split] = digest.hexdigest()
  blob = json.dumps({"splits": digests, "classes": data.num_classes, "arch": ARCH_VERSION,
                     "hparams": dataclasses.asdict(hparams)}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Classifier:
  """A trained ConvNet: features and predictions for images in [-1, 1]."""

  EVAL_CHUNK = 500  # images per compiled call; the last chunk is padded so there is one compile

  def __init__(self, params, num_classes: int, accuracy: float):
    self.params = params
    self.num_classes = num_classes
    self.accuracy = accuracy  # on the data's held-out `test` split

  def _outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, np.float32)
    features, logits = [], []
    for start in range(0, len(images), self.EVAL_CHUNK):
      chunk = images[start:start + self.EVAL_CHUNK]
      padded = np.pad(chunk, ((0, self.EVAL_CHUNK - len(chunk)),) + ((0, 0),) * (chunk.ndim - 1))
      f, l = _apply(self.num_classes)({"params": self.params}, padded)
      features.append(np.asarray(f)[:len(chunk)])
      logits.append(np.asarray(l)[:len(chunk)])
    return np.concatenate(features), np.concatenate(logits)

  def features(self, images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> penultimate features float32 [N, 128]."""
    return self._outputs(images)[0]

  def predict(self, images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> labels int32 [N]."""
    return self._outputs(images)[1].argmax(-1).astype(np.int32)


def get_classifier(data: ImageData, *, log: Callable[[str], None] = print,
                   hparams: TrainHParams = TrainHParams()) -> Classifier:
  """The cached classifier for `data`, trained on its `train` split (and cached) on first use."""
  path = os.path.join(cache_dir(), "classifiers", f"{cache_key(data, hparams)}.msgpack")
  if os.path.isfile(path):
    try:
      with open(path, "rb") as f:
        saved = flax.serialization.msgpack_restore(f.read())
      image = jnp.zeros((1,) + data.splits["test"][0].shape[1:])
      expected = jax.eval_shape(_init(data.num_classes), jax.random.key(0), image)["params"]
      shapes = lambda tree: jax.tree.map(lambda x: tuple(np.shape(x)), tree)
      if shapes(saved["params"]) != shapes(expected):  # parses, but is not this classifier
        raise ValueError("its parameters have other names or shapes")
      classifier = Classifier(saved["params"], data.num_classes, float(saved["accuracy"]))
      log(f"Loaded the {data.name} classifier from {path} (held-out accuracy {classifier.accuracy:.4f}).")
      return classifier
    except Exception as e:  # pylint: disable=broad-except  # a damaged cache file is rebuilt, not fatal
      log(f"Could not read the cached classifier {path} ({type(e).__name__}); training it again.")
  log(f"Training the {data.name} evaluation classifier ({hparams.num_steps} steps); it is cached afterwards.")
  start = time.perf_counter()
  params = train_classifier(data, hparams, log=log)
  classifier = Classifier(params, data.num_classes, 0.0)
  test_images, test_labels = data.splits["test"]
  classifier.accuracy = float(np.mean(classifier.predict(to_float(test_images)) == test_labels))
  log(f"Trained in {time.perf_counter() - start:.1f} s: held-out accuracy {classifier.accuracy:.4f} "
      f"on {len(test_labels)} {data.name} test images; saved to {path}.")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, flax.serialization.msgpack_serialize(  # a concurrent reader sees the old or the whole
        {"params": jax.tree.map(np.asarray, params), "accuracy": classifier.accuracy, "data": data.name}))
  except OSError as e:  # a read-only or full cache: the classifier still serves this evaluation
    log(f"Could not cache the classifier at {path} ({e.strerror or type(e).__name__}); it will be trained again "
        f"next time (set AIGC_JAX_CACHE to a writable folder).")
  return classifier


def _shifted(padded: np.ndarray, index: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
  """Crops of `padded` [N, H + 2s, W + 2s, C] at random offsets: float32 [B, H, W, C]."""
  size_h, size_w = padded.shape[1] - 2 * shift, padded.shape[2] - 2 * shift
  dy, dx = rng.integers(0, 2 * shift + 1, size=(2, len(index)))
  rows = (dy[:, None] + np.arange(size_h))[:, :, None]  # [B, H, 1]
  cols = (dx[:, None] + np.arange(size_w))[:, None, :]  # [B, 1, W]
  return padded[index[:, None, None], rows, cols]


@functools.lru_cache(maxsize=8)
def _train_step(num_classes: int, learning_rate: float, num_steps: int):
  """The optimizer and the compiled step, built once per setting so retraining skips compilation."""
  model = ConvNet(num_classes)
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))

  def train_step(params, opt_state, images, labels):  # images [B, H, W, C], labels [B]
    def loss_fn(p):
      logits = model.apply({"params": p}, images)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, jax.jit(train_step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _init(num_classes: int):
  return jax.jit(ConvNet(num_classes).init)  # one compile: op-by-op initialisation takes seconds


@functools.lru_cache(maxsize=8)
def _apply(num_classes: int):
  return jax.jit(ConvNet(num_classes).apply)


def train_classifier(data: ImageData, hparams: TrainHParams, *, log: Callable[[str], None] = print):
  """Adam on softmax cross-entropy; a pure function of (data, hparams) on a given backend."""
  images, labels = data.splits["train"]
  s = hparams.max_shift
  padded = np.pad(to_float(images), ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)  # background is -1
  params = _init(data.num_classes)(jax.random.key(hparams.seed), jnp.zeros((1,) + images.shape[1:]))["params"]
  tx, step_fn = _train_step(data.num_classes, hparams.learning_rate, hparams.num_steps)
  opt_state = tx.init(params)
  log_every = max(1, hparams.num_steps // 5)
  for step in range(hparams.num_steps):
    rng = np.random.default_rng([hparams.seed, step])
    index = rng.integers(0, len(images), size=hparams.batch_size)
    params, opt_state, loss = step_fn(params, opt_state, _shifted(padded, index, rng, s), labels[index])
    if (step + 1) % log_every == 0:
      log(f"  classifier step {step + 1}/{hparams.num_steps}: loss {float(loss):.4f}")
  return jax.tree.map(np.asarray, params)

