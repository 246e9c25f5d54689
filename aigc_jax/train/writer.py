"""Output in the workdir: `metrics.jsonl` (one JSON object per line), TensorBoard events and `samples/`.

In a multi-process run only the primary process writes; the others' writer does nothing, so every process can run
the same evaluation code (whose sampling is a computation over all of them).
"""

import json
import math
import os

from tensorboardX import SummaryWriter

from aigc_jax import plots
from aigc_jax.files import read_jsonl, write_atomically

SAMPLES_DIR = "samples"


class MetricWriter:

  def __init__(self, workdir: str, *, resume_step: int = 0, active: bool = True):
    self.workdir, self.active = workdir, active
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.logdir = os.path.join(workdir, "tensorboard")
    self.tensorboard = None
    if active:
      self._drop_lines_after(resume_step)  # a resumed run rewrites what came after its checkpoint
      # TensorBoard drops events at steps >= purge_step: those after the checkpoint, not the checkpoint step's own.
      self.tensorboard = SummaryWriter(self.logdir, purge_step=resume_step + 1)

  def _drop_lines_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    rows = [row for row in read_jsonl(self.path) if row["step"] <= step]
    write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in rows))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in scalars.items()}}) + "\n")
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    if not self.active:
      return
    self.tensorboard.add_text(tag, "```\n" + text + "\n```", step)
    self.tensorboard.flush()

  def write_image(self, step: int, tag: str, image) -> None:
    """`image` is [H, W, C] uint8."""
    if not self.active:
      return
    self.tensorboard.add_image(tag, image, step, dataformats="HWC")
    self.tensorboard.flush()

  def write_sample(self, step: int, sample) -> None:
    """An evaluation's sample, in `samples/step_N.txt` (text) or `samples/step_N.png` (an [H, W, C] uint8 grid) and
    in TensorBoard."""
    if not self.active:
      return
    directory = os.path.join(self.workdir, SAMPLES_DIR)
    os.makedirs(directory, exist_ok=True)
    if isinstance(sample, str):
      with open(os.path.join(directory, f"step_{step:06d}.txt"), "w", encoding="utf-8") as f:
        f.write(sample)
      self.write_text(step, "sample", sample)
    else:
      plots.save_png(sample, os.path.join(directory, f"step_{step:06d}.png"), scale=2)
      self.write_image(step, "samples", sample)

  def close(self) -> None:
    if self.active:
      self.tensorboard.close()


def _jsonable(value: float):
  value = float(value)
  return value if math.isfinite(value) else str(value)
