import os

import flax.serialization
import jax
import numpy as np
import pytest

from aigc_jax import cache as cache_lib
from aigc_jax.data.images import ImageData, to_float
from aigc_jax.errors import UserError
from aigc_jax.evaluation import TrainHParams, frechet_distance, get_classifier, image_metrics
from aigc_jax.evaluation import classifier as classifier_lib


TINY = TrainHParams(num_steps=3, batch_size=8, learning_rate=1e-3, max_shift=1)


def with_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
  """[n, F] points whose sample mean and (ddof=1) covariance are exactly `mean` and `cov`."""
  x = np.random.default_rng(seed).standard_normal((n, len(mean)))
  x -= x.mean(0)
  x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # sample covariance I
  return x @ np.linalg.cholesky(cov).T + mean


def test_frechet_of_a_set_with_itself_is_zero():
  a = np.random.default_rng(0).standard_normal((50, 6))
  assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_of_diagonal_gaussians_is_the_closed_form():
  mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  a = with_moments(40, mean_a, np.diag(var_a), seed=1)
  b = with_moments(30, mean_b, np.diag(var_b), seed=2)
  expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)  # 5 + 2
  assert expected == 7.0
  assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
  assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_frechet_matches_scipy_sqrtm_for_full_covariances():
  scipy_linalg = pytest.importorskip("scipy.linalg")  # scipy comes with scikit-learn
  rng = np.random.default_rng(3)
  a = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 5))
  b = rng.standard_normal((70, 5)) @ rng.standard_normal((5, 5)) + 0.5
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b)
              - 2 * np.trace(scipy_linalg.sqrtm(cov_a @ cov_b)).real)
  assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
  assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_needs_two_points_per_set():
  with pytest.raises(UserError, match="at least 2 images per set, got 1 and 3"):
    frechet_distance(np.zeros((1, 4)), np.zeros((3, 4)))


def tiny_data() -> ImageData:
  """60 8x8 images of three classes (a bright row, column or diagonal) with noise."""
  rng = np.random.default_rng(0)
  labels = np.arange(60, dtype=np.int32) % 3
  images = rng.integers(0, 40, size=(60, 8, 8, 1)).astype(np.uint8)
  for i, label in enumerate(labels):
    mask = [np.eye(8)[3][:, None], np.eye(8)[3][None, :], np.eye(8)][label].astype(bool)
    images[i, ..., 0][np.broadcast_to(mask, (8, 8))] = 255
  return ImageData("tiny", {"train": (images[:48], labels[:48]), "test": (images[48:], labels[48:])}, num_classes=3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("AIGC_JAX_CACHE", str(tmp_path))
  return tmp_path


def test_training_is_deterministic():
  a = classifier_lib.train_classifier(tiny_data(), TINY, log=lambda _: None)
  b = classifier_lib.train_classifier(tiny_data(), TINY, log=lambda _: None)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_classifier_is_cached_and_loaded_without_training(cache, monkeypatch):
  data, lines = tiny_data(), []
  trained = get_classifier(data, hparams=TINY, log=lines.append)
  assert "Training the tiny evaluation classifier (3 steps)" in lines[0] and "held-out accuracy" in lines[-1]
  assert os.listdir(cache / "classifiers") == [f"{classifier_lib.cache_key(data, TINY)}.msgpack"]

  def no_training(*args, **kwargs):
    raise AssertionError("the cached classifier should have been loaded")

  monkeypatch.setattr(classifier_lib, "train_classifier", no_training)
  loaded = get_classifier(data, hparams=TINY, log=lines.append)
  assert lines[-1].startswith("Loaded the tiny classifier")
  assert loaded.accuracy == trained.accuracy
  images = to_float(data.splits["test"][0])  # [12, 8, 8, 1]
  np.testing.assert_array_equal(loaded.features(images), trained.features(images))
  assert loaded.features(images).shape == (12, 128) and loaded.predict(images).dtype == np.int32


def test_damaged_cache_file_is_rebuilt(cache):
  data, lines = tiny_data(), []
  path = cache / "classifiers" / f"{classifier_lib.cache_key(data, TINY)}.msgpack"
  path.parent.mkdir()
  path.write_bytes(b"not msgpack")
  classifier = get_classifier(data, hparams=TINY, log=lines.append)
  assert lines[0].startswith("Could not read the cached classifier") and 0 <= classifier.accuracy <= 1
  assert get_classifier(data, hparams=TINY, log=lines.append).accuracy == classifier.accuracy
  assert lines[-1].startswith("Loaded")
  # A file that parses but lacks a layer is not this classifier either.
  saved = flax.serialization.msgpack_restore(path.read_bytes())
  del saved["params"]["Dense_1"]
  path.write_bytes(flax.serialization.msgpack_serialize(saved))
  lines.clear()
  assert 0 <= get_classifier(data, hparams=TINY, log=lines.append).accuracy <= 1
  assert lines[0].startswith("Could not read the cached classifier") and "training it again" in lines[0]


def test_a_cache_that_cannot_be_written_still_serves_the_classifier(cache, monkeypatch):
  data, lines = tiny_data(), []
  real_replace = os.replace

  def read_only(src, dst):
    if dst.endswith(".msgpack"):
      raise OSError(30, "Read-only file system")
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", read_only)
  classifier = get_classifier(data, hparams=TINY, log=lines.append)
  assert 0 <= classifier.accuracy <= 1
  assert lines[-1].startswith("Could not cache the classifier at ") and "(Read-only file system)" in lines[-1]


def test_cache_key_changes_with_data_and_hyperparameters():
  data = tiny_data()
  key = classifier_lib.cache_key(data, TINY)
  assert key == classifier_lib.cache_key(tiny_data(), TINY)
  assert key != classifier_lib.cache_key(data, TrainHParams(num_steps=4, batch_size=8, max_shift=1))
  images, labels = data.splits["train"]
  changed = ImageData("tiny", {**data.splits, "train": (images[::-1], labels[::-1])}, num_classes=3)
  assert key != classifier_lib.cache_key(changed, TINY)
  renamed = ImageData("mnist_idx:./tiny/", data.splits, num_classes=3)  # the same data named another way
  assert key == classifier_lib.cache_key(renamed, TINY)


def test_cache_folder(monkeypatch):
  monkeypatch.setenv("AIGC_JAX_CACHE", "/a")
  monkeypatch.setenv("XDG_CACHE_HOME", "/b")
  assert cache_lib.cache_dir() == "/a"
  monkeypatch.delenv("AIGC_JAX_CACHE")
  assert cache_lib.cache_dir() == "/b/aigc_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", "/home/u")
  assert cache_lib.cache_dir() == "/home/u/.cache/aigc_jax"


def test_compilation_cache_goes_under_the_cache_folder_unless_the_user_chose_one(monkeypatch):
  chosen = jax.config.jax_compilation_cache_dir  # the tests' own (conftest.py)
  assert chosen and cache_lib.enable_compilation_cache() == chosen
  monkeypatch.setenv("AIGC_JAX_CACHE", "/a")
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert cache_lib.enable_compilation_cache() == "/a/jax_compilation_cache"
    assert jax.config.jax_compilation_cache_dir == "/a/jax_compilation_cache"
  finally:
    jax.config.update("jax_compilation_cache_dir", chosen)


def test_image_metrics_compare_equal_sized_sets(cache):
  data = tiny_data()
  classifier = get_classifier(data, hparams=TINY, log=lambda _: None)
  real = to_float(data.splits["test"][0])  # [12, 8, 8, 1]: for 5 samples, halves A = real[0:10:2], B = real[1:10:2]
  samples = real[0:10:2][::-1]  # A in another order
  labels = data.splits["test"][1][0:10:2][::-1]  # the samples' true labels
  metrics = image_metrics(classifier, real, samples, labels)
  assert metrics["frechet_num_images"] == 5 and metrics["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
  features = classifier.features(real)
  assert metrics["frechet_distance_real"] == pytest.approx(frechet_distance(features[1:10:2], features[0:10:2]))
  # The share of samples classified as their label (this test passed the classifier's own predictions: 1 always).
  predicted = classifier.predict(samples)
  assert metrics["label_accuracy"] == pytest.approx(np.mean(predicted == labels))
  assert image_metrics(classifier, real, samples, predicted)["label_accuracy"] == 1.0
  assert image_metrics(classifier, real, samples, (predicted + 1) % 3)["label_accuracy"] == 0.0
  mixed = np.where(np.arange(5) < 2, predicted, (predicted + 1) % 3)  # right on the first two of five
  assert image_metrics(classifier, real, samples, mixed)["label_accuracy"] == pytest.approx(0.4)
  assert metrics["classifier_accuracy"] == classifier.accuracy
  assert "label_accuracy" not in image_metrics(classifier, real, -real)
  with pytest.raises(UserError, match=r"Samples of shape \(4, 4, 1\) cannot be compared"):
    image_metrics(classifier, real, np.zeros((5, 4, 4, 1)))
  with pytest.raises(UserError, match="at least 2 samples and 4 real images, got 1 and 12"):
    image_metrics(classifier, real, real[:1])


