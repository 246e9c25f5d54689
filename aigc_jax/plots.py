"""Figures people would rather see than read, as PNG: training curves from `metrics.jsonl`."""

import json

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

CURVES = ("loss", "train_loss", "val_loss")


def plot_training_curves(metrics_path: str, png_path: str) -> np.ndarray:
  """Plots the loss curves of a run to `png_path`; returns the image as [H, W, 3] uint8."""
  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  for key in CURVES:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
    if points:
      ax.plot(*zip(*points), label={"loss": "training (running)"}.get(key, key), marker="o" if key != "loss" else None)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(png_path)
  plt.close(fig)
  return np.asarray(Image.open(png_path).convert("RGB"))
