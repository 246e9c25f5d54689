"""Labelled image data: sources, held-out splits and resumable batches.

Sources (the `data.source` config key); every one gives a `train` and a held-out `test` split:
  * `embedded:digits` (the default): scikit-learn's bundled handwritten digits (1,797 8x8
    images, 0-16), made MNIST-like: bilinear upsampling to 24x24, 2 px of black padding to
    28x28x1 uint8, white digit on black. The first 90% (1,617) is `train`, the last 10% (180)
    `test`. Needs no network.
  * `mnist_idx:DIR`: the raw MNIST IDX files in DIR, gzipped or not. With `train-*` files,
    `train` is the train files and `test` the `t10k-*` files. With only the `t10k-*` files (the
    offline copy), images 0-8,999 are `train` and 9,000-9,999 `test`.
  * `tfds:NAME`: a TFDS image data set with `image` and `label` features (`mnist`,
    `fashion_mnist`, `cifar10`, ...) read through `as_data_source` (no TensorFlow at read time).

Batches are images sampled with replacement by a NumPy generator seeded with
`(seed, stream, split, step)`, so batch `step` is a pure function of the step and a restored
checkpoint continues on the same data. With `data.random_flip` each training image is mirrored
left to right with probability 1/2 (Ho et al.'s CIFAR-10 augmentation), drawn from the same
generator after the images are picked: the same batches as without it, half of them mirrored.
"""

import dataclasses
import gzip
import os

import numpy as np

from aigc_jax.data import fingerprint, missing_path
from aigc_jax.data.tfds_source import prepare, tfds_builder
from aigc_jax.errors import UserError

SCHEMES = "embedded:digits, mnist_idx:DIR or tfds:NAME"
DIGITS_TRAIN_FRACTION = 0.9
MNIST_T10K_TRAIN = 9_000  # with only the t10k files: images [0, 9000) train, [9000, 10000) test

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: compared by identity, never array by array
class ImageData:
  """Images and labels per split: `splits[name] = (images uint8 [N, H, W, C], labels int32 [N])`."""
  name: str
  splits: dict[str, tuple[np.ndarray, np.ndarray]]
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.splits["train"][0].shape[1:])  # (H, W, C)


def load_images(source: str) -> ImageData:
  """Returns the `train` and `test` splits of the data set named by `source`."""
  kind, _, arg = source.partition(":")
  if kind == "embedded":
    return _embedded_images(arg)
  if kind == "mnist_idx":
    return _mnist_idx(arg)
  if kind == "tfds":
    return _tfds_images(arg)
  raise UserError(f"Unknown image data.source {source!r}; use {SCHEMES}.")


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] in [0, 255] -> float32 in [-1, 1], the range models see."""
  return images.astype(np.float32) / 127.5 - 1.0


# embedded:digits


def _embedded_images(name: str) -> ImageData:
  if name != "digits":
    raise UserError(f"Unknown embedded image data set {name!r}; the embedded image data set is embedded:digits.")
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError:
    raise UserError("embedded:digits needs scikit-learn; `pip install scikit-learn` or use "
                    "data.source=mnist_idx:DIR or tfds:mnist.") from None
  digits = load_digits()
  small = digits.images * (255.0 / 16.0)  # [1797, 8, 8] float64 in [0, 255]
  resize = _bilinear_matrix(8, 24)  # [24, 8]
  big = np.einsum("ij,njk,lk->nil", resize, small, resize)  # [1797, 24, 24]
  images = np.pad(np.clip(np.rint(big), 0, 255).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))[..., None]
  labels = digits.target.astype(np.int32)
  n_train = int(len(images) * DIGITS_TRAIN_FRACTION)
  return ImageData("embedded:digits", {"train": (images[:n_train], labels[:n_train]),
                                       "test": (images[n_train:], labels[n_train:])}, num_classes=10)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of bilinear resampling with half-pixel centres: `jax.image.resize(x, ..., "linear")`
  to 3e-7, in NumPy so the embedded data set is the same bytes on every backend."""
  x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(x).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), lo), 1.0 - (x - lo))
  np.add.at(weights, (np.arange(n_out), hi), x - lo)
  return weights


# mnist_idx:DIR


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (gzipped or raw, told apart by content) into an array of its shape."""
  if not os.path.isfile(path):
    raise missing_path("IDX file", path, "mnist_idx:DIR")
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError) as e:
    raise _corrupt(path, f"{type(e).__name__}: {e}") from None
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
    raise _corrupt(path, "bad magic number")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise _corrupt(path, "truncated header")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  if len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
    raise _corrupt(path, f"{len(raw) - header} data bytes for shape {shape}")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _corrupt(path: str, why: str) -> UserError:
  return UserError(f"IDX file {path!r} is corrupt ({why}); download it again.")


def _find_idx(directory: str, prefix: str, kind: str) -> str | None:
  """The path of e.g. `train-images-idx3-ubyte[.gz]` (or the `train-images.idx3-ubyte` spelling)."""
  ndim = 3 if kind == "images" else 1
  for sep in ("-", "."):
    for ext in (".gz", ""):
      path = os.path.join(directory, f"{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}")
      if os.path.isfile(path):
        return path
  return None


def _idx_pair(directory: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
  paths = [_find_idx(directory, prefix, kind) for kind in ("images", "labels")]
  for kind, path in zip(("images", "labels"), paths):
    if path is None:
      raise UserError(f"{directory!r} has no {prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte[.gz] file; "
                      "put the MNIST IDX files there or use data.source=tfds:mnist.")
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or images.dtype != np.uint8:
    raise _corrupt(paths[0], f"expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise _corrupt(paths[1], f"expected {len(images)} labels to match {paths[0]!r}, got shape {labels.shape}")
  return images[..., None], labels.astype(np.int32)  # [N, H, W, 1], [N]


def _mnist_idx(directory: str) -> ImageData:
  if not os.path.isdir(directory):
    raise missing_path("MNIST directory", directory, "mnist_idx:DIR")
  test = _idx_pair(directory, "t10k")
  if _find_idx(directory, "train", "images") or _find_idx(directory, "train", "labels"):
    train = _idx_pair(directory, "train")
  else:  # Only the test split is here: hold out its last 1,000 images.
    if len(test[0]) <= MNIST_T10K_TRAIN:
      raise UserError(f"{directory!r} has only t10k files with {len(test[0])} images, too few to hold out "
                      f"images {MNIST_T10K_TRAIN}+; add the train-* files.")
    train = (test[0][:MNIST_T10K_TRAIN], test[1][:MNIST_T10K_TRAIN])
    test = (test[0][MNIST_T10K_TRAIN:], test[1][MNIST_T10K_TRAIN:])
  num_classes = int(max(train[1].max(), test[1].max())) + 1
  return ImageData(f"mnist_idx:{directory}", {"train": train, "test": test}, num_classes)


# tfds:NAME


def _tfds_images(name: str) -> ImageData:
  builder = tfds_builder(name)
  features = builder.info.features
  if features is None or "image" not in features or "label" not in features:
    raise UserError(f"TFDS data set {name!r} has no 'image' and 'label' features; use an image data set such as mnist.")
  prepare(builder, name, "mnist_idx:DIR or embedded:digits")
  splits = builder.info.splits  # known once prepared (empty under tfds.testing.mock_data, which invents them)
  missing = [s for s in ("train", "test") if splits and s not in splits]
  if missing:
    raise UserError(f"TFDS data set {name!r} has no {missing[0]!r} split; use a data set with train and test splits.")
  splits = {split: _materialise(builder.as_data_source(split=split), name) for split in ("train", "test")}
  return ImageData(f"tfds:{name}", splits, int(features["label"].num_classes))


def _materialise(source, name: str) -> tuple[np.ndarray, np.ndarray]:
  """All examples of a TFDS data source as (uint8 [N, H, W, C], int32 [N]).

  One read per example: decoding is per example anyway, and `__getitems__` breaks under
  `tfds.testing.mock_data`.
  """
  examples = [source[i] for i in range(len(source))]
  shapes = {np.shape(e["image"]) for e in examples}
  if len(shapes) > 1:
    raise UserError(f"TFDS data set {name!r} has images of {len(shapes)} different sizes; use one whose images "
                    f"share a size, such as mnist or cifar10.")
  images = np.stack([e["image"] for e in examples]).astype(np.uint8)
  if images.ndim == 3:  # some data sets store grayscale images as [H, W]
    images = images[..., None]
  return images, np.array([e["label"] for e in examples], np.int32)


class ImageDataset:
  """ImageData checked against the config's image shape, served as resumable batches in [-1, 1].

  random_flip mirrors training images (stream 0) left to right with probability 1/2; held-out
  batches are never augmented.
  """

  SPLITS = ("train", "test")

  def __init__(self, data: ImageData, image_size: int | tuple[int, int], channels: int, random_flip: bool = False):
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if data.image_shape != (height, width, channels):
      h, w, c = data.image_shape
      raise UserError(
          f"{data.name} has {h}x{w} images with {c} channel(s) but the config expects {height}x{width} with "
          f"{channels}; set data.image_size={h if h == w else (h, w)} and data.channels={c}.")
    if not isinstance(random_flip, bool):
      raise UserError(f"data.random_flip is {random_flip!r}; set it to True or False.")
    self.data = data
    self.num_classes = data.num_classes
    self.random_flip = random_flip

  @classmethod
  def from_config(cls, data_config) -> "ImageDataset":
    return cls(load_images(data_config.source), data_config.image_size, data_config.channels,
               data_config.random_flip)

  def fingerprint(self) -> str:
    """Of the images and labels of every split."""
    return fingerprint([array for split in self.SPLITS for array in self.data.splits[split]])

  def images(self, split: str) -> np.ndarray:
    """All images of `split` in [-1, 1]: float32 [N, H, W, C]."""
    return to_float(self.data.splits[split][0])

  def labels(self, split: str) -> np.ndarray:
    return self.data.splits[split][1]  # int32 [N]

  def batch(self, split: str, step: int, batch_size: int, seed: int, stream: int = 0,
            rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Batch number `step` of `split`: `images` float32 [B, H, W, C] in [-1, 1] and `labels` int32 [B], or only its
    `rows` (the same images: a process builds only the rows its devices hold).

    `stream` 0 is training (mirrored at random with random_flip), 1 the fixed evaluation batches,
    so they never coincide.
    """
    images, labels = self.data.splits[split]
    rng = np.random.default_rng([seed, stream, self.SPLITS.index(split), step])
    index = rng.integers(0, len(images), size=batch_size)
    mirror = rng.random(batch_size)[rows] < 0.5 if self.random_flip and stream == 0 else None
    index = index[rows]
    picked = images[index]
    if mirror is not None:
      picked = np.where(mirror[:, None, None, None], picked[:, :, ::-1], picked)
    return {"images": to_float(picked), "labels": labels[index]}

  def eval_batches(self, split: str, num_batches: int, batch_size: int, seed: int,
                   rows: slice = slice(None)) -> list[dict[str, np.ndarray]]:
    """The same `num_batches` batches every call (stream 1), for comparable evaluation losses."""
    return [self.batch(split, step, batch_size, seed, stream=1, rows=rows) for step in range(num_batches)]
