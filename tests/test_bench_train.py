"""`benchmarks/train.py` and `benchmarks/denoise.py`: the FLOPs formula by hand, and tiny runs end to end."""

import os

import jax
import jax.numpy as jnp
import pytest

from aigc_jax.errors import UserError
from benchmarks import parse_args
from benchmarks import train as bench_train


def test_flops_per_token_matches_a_hand_count():
  config, vocab, _ = bench_train.shape_config("tiny", True, jnp.float32, "xla")
  params = jax.eval_shape(bench_train.SyntheticTokens(config, vocab).init_params, jax.random.PRNGKey(0))
  # tiny: L=2, H=2, C=32 (Q=16), T=16, vocab 65, MLP 4C, no biases, tied head.
  # Per block: LayerNorm scales 2 * 32, qkv 32 * 96, out 32 * 32, fc 32 * 128, proj 128 * 32 = 12352.
  n = 2 * 12352 + 32 + 65 * 32  # blocks, final LayerNorm scale, the tied head (the tables themselves do not count)
  assert bench_train.matmul_params(params, tie_embeddings=True) == n == 26816
  full, causal = bench_train.flops_per_token(n, layers=2, heads=2, head_dim=16, seq_len=16)
  assert full == 6 * 26816 + 12 * 2 * 2 * 16 * 16 == 173184
  assert causal == 6 * 26816 + 6 * 2 * 2 * 16 * 16 == 167040


def _args(*argv):
  return parse_args(bench_train, argv)


FAKE_TORCH = """#!/usr/bin/env python3
import json, sys
print(json.dumps({"torch": "fake", "threads": 1, "params": 123}), flush=True)
for line in sys.stdin:  # reference_nanogpt_char.py --serve's protocol: N steps asked, ms per step answered
  print(json.dumps({"ms_per_step": 2.5}), flush=True)
"""


def check_resume_keeps_the_rows(run_bench, monkeypatch, capsys, suite, argv, report, printed, stage):
  """`--resume` with the same arguments measures nothing again (`stage` would fail) and prints the same table."""
  table = [line for line in printed.splitlines() if line.lstrip().startswith("tiny")]
  assert len(table) == len(report["rows"])

  def unexpected(*args, **kwargs):
    raise AssertionError("a shape already in the report was measured again")

  monkeypatch.setattr(suite, stage, unexpected)
  again = run_bench(suite, *argv, "--resume")
  assert again["rows"] == report["rows"] and again["meta"]["runs"] == 2 and again["meta"]["complete"] is True
  printed = capsys.readouterr().out
  assert "resuming" in printed and [line for line in printed.splitlines() if line.lstrip().startswith("tiny")] == \
      table  # the kept rows make the same table


def test_run_on_the_tiny_shape_writes_rows_and_a_chart_and_resumes(run_bench, tmp_path, monkeypatch, capsys):
  torch_python = tmp_path / "python"  # stands in for a Python with torch: the plumbing is what is tested here
  torch_python.write_text(FAKE_TORCH)
  torch_python.chmod(0o755)
  argv = ["--quick", "--shapes", "tiny", "--reps", "1", "--warmup", "1", "--steps", "1", "--torch-python",
          str(torch_python)]
  capsys.readouterr()
  report = run_bench(bench_train, *argv)
  printed = capsys.readouterr().out
  assert {"device", "versions", "peak_flops", "peak_note", "formula", "dtype"} <= set(report["meta"])
  rows, torch_row = report["rows"][:2], report["rows"][2]
  assert [r["implementation"] for r in report["rows"]] == ["ours", "reference", "pytorch"]
  assert (torch_row["ms"], torch_row["params"], torch_row["position_encoding"], torch_row["devices"]) == \
      (2.5, 123, "learned", 1)
  assert torch_row["ratio_to_reference"] == pytest.approx(rows[1]["ms"] / 2.5)
  assert torch_row["note"] == "torch fake, 1 threads" and report["meta"]["torch"] is True
  for r in rows:
    assert {"shape", "batch", "seq_len", "ms", "tokens_per_s", "tflops", "mfu", "mfu_causal", "ratio_to_reference",
            "flops_per_token", "xla_flops_per_step", "attention"} <= set(r)
    assert (r["shape"], r["batch"], r["seq_len"], r["flops_per_token"]) == ("tiny", 2, 16, 173184)
    assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["devices"] == 1
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / report["meta"]["peak_flops"])
  assert rows[1]["ratio_to_reference"] == 1.0 and rows[1]["ratio_range"] == [1.0, 1.0]
  assert rows[0]["error_vs_plain"] < 1e-5 and rows[1]["error_vs_plain"] is None and report["meta"]["wrong"] == []
  assert report["meta"]["suite"] == "train" and report["meta"]["steps"] == 1
  assert [r["position_encoding"] for r in rows] == ["rope", "rope"]  # the CPU recipe's, in both models
  assert rows[0]["params"] == rows[1]["params"]  # like for like: no position table in either
  assert rows[0]["attention"].startswith("auto->")
  assert report["meta"]["complete"] is True
  check_resume_keeps_the_rows(run_bench, monkeypatch, capsys, bench_train, argv, report, printed, "bench_shape")


def test_ours_is_checked_against_plain_autodiff_and_a_wrong_custom_gradient_shows(monkeypatch):
  import types
  from aigc_jax.nn import layers
  args = types.SimpleNamespace(quick=True, batch_size=None, attention="auto")
  config, vocab, _ = bench_train.shape_config("tiny", True, jnp.float32, "auto")
  task = bench_train.SyntheticTokens(config, vocab)
  params, batch = task.init_params(jax.random.PRNGKey(0)), task.train_batch(0)
  assert bench_train.error_vs_plain("tiny", args, jnp.float32, params, batch) < 1e-5
  gelu_grad = layers._gelu_grad
  monkeypatch.setattr(layers, "_gelu_grad", lambda x: 1.1 * gelu_grad(x))  # ours' MLP backward, 10% off
  assert bench_train.error_vs_plain("tiny", args, jnp.float32, params, batch) > 1e-3


def test_unknown_shape_no_shape_and_a_gpu_grid_on_a_cpu_are_user_errors(tmp_path):
  from benchmarks import denoise as bench_denoise
  out = str(tmp_path / "x.json")
  with pytest.raises(UserError, match="Unknown shape"):
    bench_train.run(_args("--shapes", "gpt3", "--out", out))
  with pytest.raises(UserError, match="--shapes names no shape; give some of cpu, gpu, gpt2, tiny"):
    bench_train.run(_args("--quick", "--shapes", " ,", "--out", out))
  with pytest.raises(UserError, match="The full denoise grid is sized for a GPU .*; pass --quick"):
    bench_denoise.run(parse_args(bench_denoise, ["--shapes", "ddpm_mnist", "--out", out]))
  assert not os.path.exists(out)  # refused before a report was written


def test_counts_below_one_are_usage_errors(capsys):
  for flag in ("--batch-size", "--reps", "--warmup", "--steps"):
    with pytest.raises(SystemExit) as stop:
      _args(flag, "0")
    assert stop.value.code == 2 and f"argument {flag}: '0' is not a whole number >= 1" in capsys.readouterr().err


def test_batch_size_replaces_the_shapes_batch_and_nothing_else():
  config, _, _ = bench_train.shape_config("gpt2", False, jnp.bfloat16, "auto", batch_size=48)
  assert (config.batch_size, config.data.seq_len, config.model.emb_dim) == (48, 1024, 768)
  assert bench_train.shape_config("gpt2", False, jnp.bfloat16, "auto")[0].batch_size == 16


def _cpu_recipe(*overrides):
  from aigc_jax import config as config_lib
  return config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "gpt_shakespeare_char_cpu.py"),
                                list(overrides))


def test_torch_reference_refuses_shapes_nanogpt_lacks_and_a_missing_python(tmp_path):
  from benchmarks.reference_gpt import TorchRun
  batches = [{"inputs": jnp.zeros((2, 8), jnp.int32), "targets": jnp.zeros((2, 8), jnp.int32)}]
  with pytest.raises(UserError, match=r"nanoGPT's model, which has no model.mlp_ratio=2, model.use_bias=True;"):
    TorchRun("python", _cpu_recipe("model.mlp_ratio=2", "model.use_bias=True"), 65, batches)
  with pytest.raises(UserError, match=r"--torch-python /no/such/python: .*give the path of a Python that has torch"):
    TorchRun("/no/such/python", _cpu_recipe(), 65, batches)
  out = tmp_path / "x.json"  # refused before anything is measured: bf16 is not nanoGPT's
  with pytest.raises(UserError, match=r"nanoGPT's model, which has no model.dtype='bfloat16'"):
    bench_train.run(_args("--quick", "--shapes", "tiny", "--dtype", "bfloat16", "--torch-python", "/no/such/python",
                          "--out", str(out)))
  assert not out.exists()


def test_denoise_tiny_shape_writes_every_measurement_against_the_reference_and_a_chart_and_resumes(
    run_bench, tmp_path, monkeypatch, capsys):
  from benchmarks import denoise as bench_denoise
  argv = ["--quick", "--shapes", "tiny", "--reps", "2", "--min-time", "1e-3"]  # --reps alone, not 0.5 s
  capsys.readouterr()
  report = run_bench(bench_denoise, *argv)
  printed = capsys.readouterr().out
  rows = report["rows"]
  assert [(r["what"], r["implementation"]) for r in rows] == [
      (w, i) for w in ("forward", "train_step", "sampler") for i in ("ours", "plain_flax")]
  forward_flops_per_image = rows[0]["flops"] / rows[0]["batch"]
  for r in rows:
    assert r["shape"] == "tiny" and r["batch"] == 2 and r["ms"] > 0
    assert r["reps"] == len(r["all_ms"]) == 2 and 1 <= r["calls_per_rep"] <= 100  # 1 ms of --min-time adds none
    assert r["images_per_sec"] == pytest.approx(r["batch"] / r["ms"] * 1000)
    assert r["tflops"] == pytest.approx(r["flops"] / r["ms"] / 1e9)
    assert r["params"] == rows[0]["params"]  # the reference is the same UNet
    reference = next(ref for ref in rows if (ref["what"], ref["implementation"]) == (r["what"], "plain_flax"))
    assert r["flops"] == reference["xla_flops"]  # the work, counted once for both
    if r["implementation"] == "plain_flax":
      assert r["ratio_to_reference"] == 1.0 and r["error_vs_reference"] == 0.0 and r["same_program"] is None
    else:  # the same UNet: forward and sampler the same XLA convolutions; the kernel gradients differ in sum order
      assert r["error_vs_reference"] < (1e-5 if r["what"] == "train_step" else 1e-7)
      # On a CPU `auto` attention is `xla` at these lengths and only the conv kernel gradient differs: the
      # forward and the sampler compile to the reference's program, the train step does not.
      assert r["same_program"] == (r["what"] != "train_step")
      assert r["xla_flops"] > r["flops"] if r["what"] == "train_step" else r["xla_flops"] == r["flops"]
    low, high = r["ratio_range"]
    assert low <= r["ratio_to_reference"] <= high
  assert report["meta"]["wrong"] == [] and report["meta"]["warmup"] == 1
  sampler = rows[4]  # counted as steps x the forward's FLOPs per image
  assert sampler["flops"] == pytest.approx(forward_flops_per_image * 2 * 2)
  assert sampler["steps_per_sec"] == pytest.approx(2 / sampler["ms"] * 1000)
  assert report["meta"]["batches"] == {"tiny": {"forward": 2, "train_step": 2, "sampler": 2, "sampler_steps": 2}}
  with monkeypatch.context() as patched:
    check_resume_keeps_the_rows(run_bench, patched, capsys, bench_denoise, argv, report, printed, "build")
  # The check is not vacuous: the output conv starts at zero, which made every output equal whatever came before.
  from aigc_jax.nn import conv
  monkeypatch.setattr(conv, "conv2d_tap_grad", lambda x, kernel, strides: conv._conv(x, 1.01 * kernel, strides))
  report = run_bench(bench_denoise, "--quick", "--shapes", "tiny", "--reps", "1", "--min-time", "1e-3")
  assert {"forward", "train_step"} <= {r["what"] for r in report["meta"]["wrong"]}  # (2 sampler steps clip x0)
  assert "WRONG: tiny forward ours: differs from plain_flax by" in capsys.readouterr().out
  with pytest.raises(UserError, match="Unknown denoise shape 'unet3d'"):
    bench_denoise.run(parse_args(bench_denoise, ["--shapes", "unet3d", "--out", str(tmp_path / "x.json")]))
