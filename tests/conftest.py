"""Shared fixtures: a tiny text corpus and a shrunk GPT config that trains in seconds."""

import atexit
import logging
import os
import shutil
import tempfile

# One persistent compilation cache for the whole session, subprocesses included (they inherit
# the variable): a test that trains, resumes and samples compiles each program once, as the
# command line does for a user (`aigc_jax.cache.enable_compilation_cache`), and never in the
# user's own cache. Set before JAX is imported, which reads it then.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aigc_jax_test_jax_cache_")
atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

from aigc_jax import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = os.path.join(ROOT, "configs", "gpt_shakespeare_char_cpu.py")


@pytest.fixture(autouse=True)
def restore_root_logging():
  """The CLI's logging.basicConfig binds a handler to the stderr pytest captured for that test; later tests
  logged into the closed stream ('--- Logging error ---' tracebacks). Each test gets the root logger back."""
  handlers, level = logging.root.handlers[:], logging.root.level
  yield
  logging.root.handlers[:], logging.root.level = handlers, level

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 20


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text(TEXT, encoding="utf-8")
  return str(path)


TINY_MODELS = {
    "transformer": ["model.num_layers=2", "model.num_heads=4", "model.emb_dim=32"],
    "lstm": ["model.num_layers=2", "model.emb_dim=16", "model.hidden_dim=32"],
}


# A two-level UNet with 20 diffusion steps: the diffusion configs' model shrunk for tests.
TINY_UNET = ["model.base_features=8", "model.channel_mults=(1, 2)", "model.attention_resolutions=(14,)",
             "model.num_heads=2", "model.norm_groups=4", "diffusion.num_steps=20", "sample.steps=5"]


def tiny_overrides(text_path: str, model: str = "transformer") -> list[str]:
  return [
      f"data.source=text_file:{text_path}", "data.seq_len=16", "batch_size=8", "num_train_steps=6",
      "eval_every_steps=3", "checkpoint_every_steps=3", "log_every_steps=1", "eval_batches=2",
      "optim.warmup_steps=2", "sample.max_new_tokens=20",
  ] + TINY_MODELS[model]


@pytest.fixture
def tiny_config(text_file):
  return config_lib.load_config(CPU_CONFIG, tiny_overrides(text_file))


@pytest.fixture
def run_bench(tmp_path):
  """Runs a benchmark suite (`benchmarks.NAME`) with `argv` into tmp_path; returns its JSON report.

  Every suite writes a PNG chart beside its JSON and shows both in TensorBoard: checked here.
  """
  import json

  import numpy as np

  from aigc_jax.plots import read_png
  from benchmarks import parse_args

  def run(module, *argv):
    name = module.__name__.rsplit(".", 1)[-1]
    out = tmp_path / (name + ".json")
    assert module.run(parse_args(module, [*argv, "--out", str(out)])) == 0
    with open(out) as f:  # strict JSON: NaN and Infinity are not JSON, and other readers refuse them
      report = json.load(f, parse_constant=lambda constant: pytest.fail(f"{out} holds {constant}"))
    events = read_tensorboard(str(tmp_path / "tensorboard" / name))
    texts = ["chart", "meta/text_summary", "rows/text_summary"]
    assert sorted(tag for tag in events if tag in texts) == texts  # besides these, a suite's scalar curves
    assert all(isinstance(value, float) for tag in events if tag not in texts for _, value in events[tag])
    [(_, chart)] = events["chart"]
    assert np.array_equal(chart, read_png(str(out.with_suffix(".png")))) and chart.shape[0] > 100
    [(_, table)] = events["rows/text_summary"]
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(report["rows"][0]) + " |" and len(lines) == 2 + len(report["rows"])
    [(_, meta)] = events["meta/text_summary"]
    assert f"| versions.jax | {report['meta']['versions']['jax']} |" in meta
    return report
  return run


@pytest.fixture
def tensorboard_events():
  """`read_tensorboard`, for tests."""
  return read_tensorboard


def read_tensorboard(logdir: str) -> dict:
  """The summaries in a TensorBoard folder's event files: {tag: [(step, value)]}, a value being a float
  (scalars), a str (text) or an [H, W, C] uint8 array (images)."""
  import io
  import struct

  import numpy as np
  from PIL import Image
  from tensorboardX.proto import event_pb2

  summaries = {}
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events.out.tfevents."):
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # TFRecords: length (u64), its CRC (u32), the record, its CRC (u32)
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        if value.HasField("image"):
          item = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
        elif value.HasField("tensor"):
          item = value.tensor.string_val[0].decode()
        else:
          item = value.simple_value
        summaries.setdefault(value.tag, []).append((event.step, item))
  return summaries
