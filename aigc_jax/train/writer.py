"""Metric output in the workdir: `metrics.jsonl` (one JSON object per line) and TensorBoard events."""

import json
import math
import os

from tensorboardX import SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._drop_lines_after(resume_step)  # a resumed run rewrites what came after its checkpoint
    # TensorBoard drops events at steps >= purge_step: those after the checkpoint, not the checkpoint step's own.
    self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def _drop_lines_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(lines)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in scalars.items()}}) + "\n")
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    self.tensorboard.add_text(tag, "```\n" + text + "\n```", step)
    self.tensorboard.flush()

  def write_image(self, step: int, tag: str, image) -> None:
    """`image` is [H, W, C] uint8."""
    self.tensorboard.add_image(tag, image, step, dataformats="HWC")
    self.tensorboard.flush()

  def close(self) -> None:
    self.tensorboard.close()


def _jsonable(value: float):
  value = float(value)
  return value if math.isfinite(value) else str(value)
