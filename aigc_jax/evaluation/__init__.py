"""Offline sample quality for image models: a Fréchet distance in the features of our own classifier.

  classifier = get_classifier(data)  # trains once per data set (80 CPU-s for MNIST), then cached
  metrics = image_metrics(classifier, to_float(data.splits["test"][0]), samples, sample_labels)

The Fréchet distance is biased upwards for small sets, by an amount that depends on the set
sizes, so a number only means something next to another computed with the same sizes.
`image_metrics` therefore reports two figures computed alike: the held-out real images are cut
into interleaved halves A = real[0::2][:n] and B = real[1::2][:n] with n = min(M samples,
N real // 2), and

  * `frechet_distance`      = FD(samples[:n], A): the generator's score;
  * `frechet_distance_real` = FD(B, A): what a perfect generator (fresh real images) would
    score with the same n, the noise floor. A model is good when the two are close.

For MNIST's 1,000 held-out images that is 500 vs 500: generate at least N // 2 samples.
Interleaved, not first and second half, because data sets come in blocks of one writer: on MNIST
images 9,000-9,999 the first half against the second scores 118, even against odd 16 (and 500
training images against the even half 34-48, the shift between writers; our classifier).
"""

import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.evaluation.classifier import Classifier, TrainHParams, get_classifier
from aigc_jax.evaluation.frechet import frechet_distance

__all__ = ["Classifier", "TrainHParams", "frechet_distance", "get_classifier", "image_metrics"]


def image_metrics(classifier: Classifier, real_images: np.ndarray, samples: np.ndarray,
                  sample_labels: np.ndarray | None = None) -> dict[str, float]:
  """Quality of `samples` [M, H, W, C] against held-out `real_images` [N, H, W, C], both in [-1, 1].

  Returns `frechet_distance`, `frechet_distance_real` (the noise floor, see the module docstring),
  `frechet_num_images` (n), `classifier_accuracy` (on the held-out split) and, with
  `sample_labels` [M], `label_accuracy`: the fraction of samples classified as their label.
  """
  if real_images.shape[1:] != samples.shape[1:]:
    raise UserError(f"Samples of shape {samples.shape[1:]} cannot be compared with real images of shape "
                    f"{real_images.shape[1:]}; generate samples at the data's image size.")
  n = min(len(samples), len(real_images) // 2)
  if n < 2:
    raise UserError(f"The Fréchet distance needs at least 2 samples and 4 real images, got {len(samples)} "
                    f"and {len(real_images)}; generate more samples.")
  real = classifier.features(real_images[:2 * n])  # [2n, F]
  half_a, half_b = real[0::2], real[1::2]  # [n, F] each
  metrics = {
      "frechet_distance": frechet_distance(classifier.features(samples[:n]), half_a),
      "frechet_distance_real": frechet_distance(half_b, half_a),
      "frechet_num_images": n,
      "classifier_accuracy": float(classifier.accuracy),
  }
  if sample_labels is not None:
    sample_labels = np.asarray(sample_labels)
    if sample_labels.shape != (len(samples),):
      raise UserError(f"Got {sample_labels.shape} labels for {len(samples)} samples; pass one label per sample.")
    metrics["label_accuracy"] = float(np.mean(classifier.predict(samples) == sample_labels))
  return metrics
