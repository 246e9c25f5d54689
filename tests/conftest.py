"""Shared fixtures: a tiny text corpus and a shrunk GPT config that trains in seconds."""

import atexit
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
             "model.num_heads=2", "model.norm_groups=4", "diffusion.num_steps=20"]


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

  Every suite writes a PNG chart beside its JSON: that it is there and not empty is checked here.
  """
  import json

  from benchmarks import parse_args

  def run(module, *argv):
    out = tmp_path / (module.__name__.rsplit(".", 1)[-1] + ".json")
    assert module.run(parse_args(module, [*argv, "--out", str(out)])) == 0
    assert os.path.getsize(out.with_suffix(".png")) > 0
    with open(out) as f:
      return json.load(f)
  return run
