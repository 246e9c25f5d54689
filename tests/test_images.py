import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from aigc_jax.data.images import ImageData, ImageDataset, load_images, read_idx, to_float
from aigc_jax.errors import UserError

MNIST_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "mnist")


def idx_bytes(array: np.ndarray) -> bytes:
  """An IDX file of a uint8 array: magic 0x0000 0x08 ndim, big-endian dims, then the data."""
  return bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()


def write_mnist(directory, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
  for kind, array, ndim in (("images", images, 3), ("labels", labels, 1)):
    data = idx_bytes(array)
    name = f"{prefix}-{kind}-idx{ndim}-ubyte" + (".gz" if gz else "")
    (directory / name).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_raw_and_gzipped(tmp_path, gz):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  write_mnist(tmp_path, "t10k", images, np.array([7, 2], np.uint8), gz)
  suffix = ".gz" if gz else ""
  np.testing.assert_array_equal(read_idx(str(tmp_path / f"t10k-images-idx3-ubyte{suffix}")), images)
  np.testing.assert_array_equal(read_idx(str(tmp_path / f"t10k-labels-idx1-ubyte{suffix}")), [7, 2])


def test_train_files_make_the_train_split_and_t10k_the_test_split(tmp_path):
  write_mnist(tmp_path, "train", np.full((3, 2, 2), 5), np.array([0, 1, 2]), gz=True)
  write_mnist(tmp_path, "t10k", np.full((2, 2, 2), 9), np.array([2, 1]), gz=False)
  data = load_images(f"mnist_idx:{tmp_path}")
  assert data.splits["train"][0].shape == (3, 2, 2, 1) and data.splits["test"][0].shape == (2, 2, 2, 1)
  np.testing.assert_array_equal(data.splits["test"][1], [2, 1])
  assert data.splits["train"][1].dtype == np.int32 and data.num_classes == 3 and data.image_shape == (2, 2, 1)


def test_offline_mnist_holds_out_the_last_thousand_test_images():
  data = load_images(f"mnist_idx:{MNIST_DIR}")
  (train_images, train_labels), (test_images, test_labels) = data.splits["train"], data.splits["test"]
  assert train_images.shape == (9000, 28, 28, 1) and test_images.shape == (1000, 28, 28, 1)
  assert train_images.dtype == np.uint8 and data.num_classes == 10
  np.testing.assert_array_equal(train_labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
  assert len(test_labels) == 1000 and set(test_labels) == set(range(10))


def test_embedded_digits_are_mnist_like_and_deterministic():
  data = load_images("embedded:digits")
  (train_images, train_labels), (test_images, test_labels) = data.splits["train"], data.splits["test"]
  assert train_images.shape == (1617, 28, 28, 1) and test_images.shape == (180, 28, 28, 1)
  assert train_images.dtype == np.uint8 and train_labels.dtype == np.int32
  assert set(test_labels) <= set(range(10))
  assert train_images.min() == 0 and train_images.max() == 255
  assert not train_images[:, :2].any() and not train_images[:, :, -2:].any()  # black 2 px border
  assert train_images.mean() < 64  # white digit on black, like MNIST
  assert set(train_labels) == set(range(10)) and data.num_classes == 10
  np.testing.assert_array_equal(load_images("embedded:digits").splits["test"][0], test_images)


def test_tfds_image_source_reads_train_and_test():
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    expected = tfds.data_source("mnist", split="test")[3]
    data = load_images("tfds:mnist")
  images, labels = data.splits["test"]
  assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(images[3], expected["image"])
  assert labels[3] == expected["label"] and data.num_classes == 10 and data.splits["train"][0].shape[0] == 5


@pytest.mark.parametrize("source, message", [
    ("mnist_idx:/no/such/dir", "MNIST directory '/no/such/dir' does not exist"),
    ("webdataset:foo", "Unknown image data.source 'webdataset:foo'; use embedded:digits, mnist_idx:DIR or tfds:NAME"),
    ("embedded:imagenet", "Unknown embedded image data set 'imagenet'"),
    ("tfds:no_such_dataset", "TFDS has no data set 'no_such_dataset'"),
])
def test_bad_source_is_one_clear_sentence(source, message):
  with pytest.raises(UserError, match=message):
    load_images(source)


def test_tfds_data_set_without_images_is_refused():
  with pytest.raises(UserError, match="no 'image' and 'label' features"):
    load_images("tfds:tiny_shakespeare")


def test_missing_and_corrupt_idx_files(tmp_path):
  with pytest.raises(UserError, match="has no t10k-images-idx3-ubyte"):
    load_images(f"mnist_idx:{tmp_path}")
  write_mnist(tmp_path, "t10k", np.zeros((2, 2, 2)), np.array([0, 1]), gz=True)
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-6])  # truncated download
  with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz' is corrupt.*download it again"):
    load_images(f"mnist_idx:{tmp_path}")
  path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + np.array([2, 2, 2], ">u4").tobytes() + b"\x00" * 7))
  with pytest.raises(UserError, match=r"corrupt \(7 data bytes for shape \(2, 2, 2\)\)"):
    load_images(f"mnist_idx:{tmp_path}")
  path.write_bytes(b"<html>Not Found</html>")
  with pytest.raises(UserError, match="bad magic number"):
    load_images(f"mnist_idx:{tmp_path}")


def tiny_data() -> ImageData:
  images = np.broadcast_to(np.arange(0, 250, 25, dtype=np.uint8)[:, None, None, None], (10, 4, 4, 1))  # image i is 25 i
  labels = np.arange(10, dtype=np.int32) % 3
  return ImageData("tiny", {"train": (images[:8], labels[:8]), "test": (images[8:], labels[8:])}, num_classes=3)


def test_random_flips_mirror_about_half_the_training_images_and_no_held_out_ones():
  images = np.arange(8 * 2 * 3, dtype=np.uint8).reshape(8, 2, 3, 1) * 5  # no image is its own mirror image
  labels = np.arange(8, dtype=np.int32)  # one class an image: the labels say which images a batch picked
  data = ImageData("ramps", {"train": (images, labels), "test": (images, labels)}, num_classes=8)
  plain, flipping = ImageDataset(data, (2, 3), 1), ImageDataset(data, (2, 3), 1, random_flip=True)
  mirrored = 0
  for step in range(20):
    a, b = plain.batch("train", step, 10, seed=3), flipping.batch("train", step, 10, seed=3)
    np.testing.assert_array_equal(a["labels"], b["labels"])  # the same images picked, in the same order
    same = np.all(a["images"] == b["images"], axis=(1, 2, 3))
    np.testing.assert_array_equal(b["images"][~same], a["images"][~same][:, :, ::-1])  # the others left to right
    mirrored += int((~same).sum())
    np.testing.assert_array_equal(b["images"], flipping.batch("train", step, 10, seed=3)["images"])  # resumable
    rows = flipping.batch("train", step, 10, seed=3, rows=slice(5, 10))  # a process's rows: the same, mirrored alike
    np.testing.assert_array_equal(rows["images"], b["images"][5:])
    np.testing.assert_array_equal(rows["labels"], b["labels"][5:])
  assert 70 <= mirrored <= 130  # of 200, each with probability 1/2 (P(outside) < 1e-4)
  np.testing.assert_array_equal(flipping.eval_batches("test", 3, 10, seed=3)[2]["images"],
                                plain.eval_batches("test", 3, 10, seed=3)[2]["images"])
  np.testing.assert_array_equal(flipping.eval_batches("test", 3, 10, seed=3, rows=slice(0, 5))[2]["images"],
                                plain.eval_batches("test", 3, 10, seed=3)[2]["images"][:5])
  with pytest.raises(UserError, match=r"data.random_flip is 1; set it to True or False\."):
    ImageDataset(data, (2, 3), 1, random_flip=1)


def test_wrong_image_shape_for_the_config_says_which_keys_to_set():
  with pytest.raises(UserError, match=r"tiny has 4x4 images with 1 channel\(s\) but the config expects 28x28 "
                                      r"with 3; set data.image_size=4 and data.channels=1"):
    ImageDataset(tiny_data(), image_size=28, channels=3)


def test_batches_are_pure_functions_of_the_step_in_minus_one_to_one():
  data = ImageDataset(tiny_data(), image_size=4, channels=1)
  a = data.batch("train", 5, 6, seed=0)
  assert a["images"].shape == (6, 4, 4, 1) and a["images"].dtype == np.float32 and a["labels"].dtype == np.int32
  np.testing.assert_array_equal(a["images"], data.batch("train", 5, 6, seed=0)["images"])
  assert not np.array_equal(a["images"], data.batch("train", 6, 6, seed=0)["images"])
  assert not np.array_equal(a["images"], data.batch("train", 5, 6, seed=0, stream=1)["images"])
  index = np.rint((a["images"][:, 0, 0, 0] + 1) * 127.5 / 25)  # [6] which image each is
  np.testing.assert_array_equal(a["labels"], index % 3)  # images keep their labels
  test = data.batch("test", 0, 50, seed=0)["images"]
  assert set(np.rint((test[:, 0, 0, 0] + 1) * 127.5 / 25)) == {8, 9}  # only the test images
  evals = data.eval_batches("test", 2, 3, seed=1)
  np.testing.assert_array_equal(evals[1]["images"], data.eval_batches("test", 2, 3, seed=1)[1]["images"])
  np.testing.assert_array_equal(to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  assert data.images("train").min() == -1.0 and data.labels("test").tolist() == [2, 0]


def test_tfds_images_of_different_sizes_are_refused():
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(UserError, match="TFDS data set 'tf_flowers' has images of .* different sizes; use one whose"):
      load_images("tfds:tf_flowers")
