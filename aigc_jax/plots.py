"""Figures people would rather see than read, as PNG: training curves and sample grids."""

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from aigc_jax.files import read_jsonl  # pylint: disable=g-import-not-at-top,wrong-import-position

CURVES = ("loss", "train_loss", "val_loss", "g_loss")


def plot_training_curves(metrics_path: str, png_path: str, ylabel: str = "loss") -> np.ndarray:
  """Plots the loss curves of a run to `png_path`; returns the image as [H, W, 3] uint8."""
  rows = read_jsonl(metrics_path)
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  for key in CURVES:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
    if points:
      ax.plot(*zip(*points), label={"loss": "training (running)"}.get(key, key), marker="o" if key != "loss" else None)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return save_figure(fig, png_path)


def save_figure(fig, png_path: str, dpi: int = 100) -> np.ndarray:
  """Writes a matplotlib figure as PNG and closes it; returns the picture as [H, W, 3] uint8 (for TensorBoard)."""
  fig.savefig(png_path, dpi=dpi)
  plt.close(fig)
  return read_png(png_path)


def read_png(path: str) -> np.ndarray:
  """A PNG file as [H, W, 3] uint8."""
  return np.asarray(Image.open(path).convert("RGB"))



def to_uint8(images) -> np.ndarray:
  """float images in [-1, 1] -> uint8 in [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, C] -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] uint8 picture, row-major."""
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 64, np.uint8)
  for i, image in enumerate(images[..., :3]):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return grid


def save_png(image: np.ndarray, path: str, scale: int = 1) -> None:
  """Writes an [H, W, 3] uint8 picture, enlarged `scale` times with nearest neighbours."""
  picture = Image.fromarray(image)
  if scale > 1:
    picture = picture.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
  picture.save(path)
