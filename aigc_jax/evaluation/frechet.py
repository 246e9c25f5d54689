"""The Fréchet distance between two sets of features, each summarised as a Gaussian."""

import numpy as np

from aigc_jax.errors import UserError


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for features [N, F] and [M, F], in float64.

  Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the product in brackets is symmetric
  positive semi-definite, so both roots come from `eigh` with tiny negative eigenvalues clipped,
  which stays real and stable where a general `sqrtm` returns complex noise.
  """
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"frechet_distance takes two [N, F] arrays with the same F, got {a.shape} and {b.shape}.")
  if len(a) < 2 or len(b) < 2:
    raise UserError(f"The Fréchet distance needs at least 2 images per set, got {len(a)} and {len(b)}; "
                    "use more samples.")
  mu_a, mu_b = a.mean(0), b.mean(0)  # [F]
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # [F, F]
  root_a = _sqrt_psd(cov_a)
  middle = root_a @ cov_b @ root_a
  trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
  distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
  return float(max(distance, 0.0))  # a squared distance; rounding can leave -1e-12


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric positive semi-definite matrix."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
