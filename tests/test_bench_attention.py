"""`benchmarks/attention.py` and `benchmarks/attention_memory.py`: FLOP counts, a tiny grid end to end, and
memory-capped runs where `chunked` fits and `xla` does not."""

import json
import os

import jax
import pytest

from aigc_jax.errors import UserError
from benchmarks import parse_args
from benchmarks import attention as bench_attention
from benchmarks import attention_memory


def test_attention_flops_follow_the_flash_attention_papers():
  assert bench_attention.attention_flops(2, 3, 128, 64, causal=False, mode="fwd") == 4 * 2 * 3 * 128 ** 2 * 64
  assert bench_attention.attention_flops(2, 3, 128, 64, causal=True, mode="fwd") == 2 * 2 * 3 * 128 ** 2 * 64
  assert bench_attention.attention_flops(2, 3, 128, 64, causal=True, mode="fwd_bwd") == 7 * 2 * 3 * 128 ** 2 * 64


def test_tiny_grid_writes_every_cell_against_the_reference_and_a_plot(run_bench):
  report = run_bench(bench_attention, "--quick", "--lengths", "64,128", "--reps", "1")
  rows = report["rows"]
  cells = [(r["seq_len"], r["causal"], r["mode"]) for r in rows if r["implementation"] == "xla"]
  assert sorted(cells) == sorted((s, c, m) for s in (64, 128) for c in (False, True) for m in ("fwd", "fwd_bwd"))
  assert sorted({r["implementation"] for r in rows}) == ["chunked", "xla"]
  for r in rows:
    assert {"implementation", "seq_len", "head_dim", "causal", "mode", "ms", "tflops", "peak_fraction",
            "ratio_to_reference"} <= set(r)
    assert r["head_dim"] == 64 and r["ms"] > 0 and r["memory_bytes"] > 0 and 1 <= r["calls_per_rep"] <= 100
    # quick grid: 2048 tokens a batch, 4 heads x 64
    flops = bench_attention.attention_flops(2048 // r["seq_len"], 4, r["seq_len"], 64, r["causal"], r["mode"])
    assert r["tflops"] == pytest.approx(flops / r["ms"] / 1e9)
    assert r["peak_fraction"] == pytest.approx(r["tflops"] * 1e12 / report["meta"]["peak_flops"])
    if r["implementation"] == "xla":
      assert r["ratio_to_reference"] == 1.0 and r["error_vs_reference"] == 0.0
    else:
      assert 0 < r["error_vs_reference"] < 1e-5  # fp32: the same sums in another order
  assert report["meta"]["reference"] == "xla" and report["meta"]["grid"]["lengths"] == [64, 128]
  assert report["meta"]["wrong"] == []
  assert report["meta"]["device"]["backend"] == "cpu" and report["meta"]["versions"]["jax"] == jax.__version__


def test_an_implementation_that_disagrees_with_the_reference_is_flagged(run_bench, monkeypatch, capsys):
  from aigc_jax.nn import chunked_attention
  right = chunked_attention.chunked_attention
  monkeypatch.setattr(chunked_attention, "chunked_attention", lambda *a, **kw: right(*a, **kw) * 1.01)
  report = run_bench(bench_attention, "--quick", "--lengths", "64", "--reps", "1")
  wrong = report["meta"]["wrong"]
  assert sorted((r["implementation"], r["causal"], r["mode"]) for r in wrong) == [
      ("chunked", c, m) for c in (False, True) for m in ("fwd", "fwd_bwd")]
  assert all(0.009 < r["error_vs_reference"] < 0.011 for r in wrong)  # the output is 1% off its largest entry
  assert "WRONG: chunked seq_len 64 head_dim 64 causal False fwd: differs from xla by 0.01" in capsys.readouterr().out


def test_a_run_stopped_partway_keeps_its_cells_and_resume_runs_only_the_rest(tmp_path, monkeypatch, capsys):
  out = tmp_path / "attention.json"
  argv = ["--quick", "--lengths", "64", "--reps", "1", "--implementations", "xla", "--out", str(out)]
  real_build, built = bench_attention.build, []

  def build_then_stop(implementation, causal, mode, arrays):
    if len(built) == 2:
      raise KeyboardInterrupt  # stopped while starting the third cell of four
    built.append((causal, mode))
    return real_build(implementation, causal, mode, arrays)

  monkeypatch.setattr(bench_attention, "build", build_then_stop)
  capsys.readouterr()
  with pytest.raises(KeyboardInterrupt):
    bench_attention.run(parse_args(bench_attention, argv))
  first_lines = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("xla")]
  partial = json.loads(out.read_text())
  assert partial["meta"]["complete"] is False and not out.with_suffix(".png").exists()
  assert [(r["causal"], r["mode"]) for r in partial["rows"]] == [(False, "fwd"), (False, "fwd_bwd")]
  assert len(partial["meta"]["spread"]) == 2

  built.clear()
  monkeypatch.setattr(bench_attention, "build", lambda *a: built.append(a[1:3]) or real_build(*a))
  assert bench_attention.run(parse_args(bench_attention, [*argv, "--resume"])) == 0
  assert built == [(True, "fwd"), (True, "fwd_bwd")]  # only the cells the first run did not finish
  printed = capsys.readouterr().out
  assert f"resuming {out}: 2 cells already in it, kept" in printed
  lines = [line for line in printed.splitlines() if line.lstrip().startswith("xla")]
  assert len(first_lines) == 2 and len(lines) == 4 and lines[:2] == first_lines  # the whole table, kept rows too
  report = json.loads(out.read_text())
  assert report["meta"]["complete"] is True and report["meta"]["runs"] == 2
  assert report["rows"][:2] == partial["rows"]  # kept as measured
  assert [(r["causal"], r["mode"]) for r in report["rows"]] == [(c, m) for c in (False, True)
                                                               for m in ("fwd", "fwd_bwd")]
  assert all(r["ms"] > 0 for r in report["rows"]) and len(report["meta"]["spread"]) == 4
  assert os.path.getsize(out.with_suffix(".png")) > 0


def test_resume_refuses_a_report_from_other_settings_and_a_file_that_is_not_one(tmp_path):
  out = tmp_path / "attention.json"
  argv = ["--quick", "--lengths", "64", "--reps", "1", "--implementations", "xla", "--out", str(out), "--resume"]
  out.write_text(json.dumps(dict(meta=dict(device=dict(backend="gpu", kind="NVIDIA H100 80GB HBM3", count=1)),
                                 rows=[])))
  with pytest.raises(UserError, match=r"holds cells measured with a different device.backend, device.kind, device.cpu, "
                                      r".*peak_flops, dtype, quick, implementations, grid, warmup, reps; resume with"):
    bench_attention.run(parse_args(bench_attention, argv))
  for damaged in ('{"meta": {"device": ',  # cut short
                  json.dumps(dict(meta={}, rows=[dict(seq_len=64, causal=False, mode="fwd")])),  # no head_dim
                  json.dumps(dict(meta=dict(wrong=None), rows=[]))):
    out.write_text(damaged)
    with pytest.raises(UserError, match="is not a benchmark report this suite can resume; delete it, or run with"):
      bench_attention.run(parse_args(bench_attention, argv))


def test_a_repetition_lasts_ten_ms_so_dispatch_is_not_timed_and_the_gpu_reference_is_cudnn_where_it_runs(
    monkeypatch):
  assert [bench_attention.calls_per_rep(ms) for ms in (0.05, 0.1, 2.5, 10.0, 300.0)] == [100, 100, 4, 1, 1]
  assert not bench_attention._cudnn_runs(jax.numpy.bfloat16, (64, 128))  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # a GPU before Hopper: cuDNN up to head_dim 128
  assert bench_attention._cudnn_runs(jax.numpy.bfloat16, (64, 128))
  assert not bench_attention._cudnn_runs(jax.numpy.float32, (64, 128))  # --dtype float32: the reference is xla
  assert not bench_attention._cudnn_runs(jax.numpy.bfloat16, (64, 256))


def test_unknown_implementation_or_length_is_a_user_error(tmp_path):
  assert bench_attention.parse_lengths("64, 128") == (64, 128)
  with pytest.raises(UserError, match="Unknown implementation 'fast'.*chunked, flash, flash_triton"):
    bench_attention.run(parse_args(bench_attention, ["--implementations", "fast", "--out", str(tmp_path / "x.json")]))
  with pytest.raises(UserError, match="--lengths takes positive integers"):
    bench_attention.run(parse_args(bench_attention, ["--lengths", "1k", "--out", str(tmp_path / "x.json")]))


def test_gpu_kernels_off_gpu_are_recorded_as_not_run_with_the_reason(run_bench):
  report = run_bench(bench_attention, "--quick", "--lengths", "64", "--reps", "1", "--implementations",
                     "flash,flash_triton")
  assert {r["implementation"] for r in report["rows"] if r["ms"] is not None} == {"xla"}  # the reference, added
  reasons = {(n["implementation"], n["reason"]) for n in report["meta"]["not_run"]}
  assert reasons == {("flash", "Pallas interpret mode off GPU and TPU: correct but not meant for timing"),
                     ("flash_triton", "flash_triton times flash's Triton forward, a GPU kernel")}


def test_a_capped_run_reports_xla_out_of_memory_where_chunked_runs():
  shape = dict(heads=4, head_dim=64)  # at length 4096 `xla` needs 552 MiB, `chunked` 63 MiB (memory analysis)
  free = attention_memory.run_capped("chunked", 4096, "fwd_bwd", attention_memory.physical_memory(), **shape)
  assert free["status"] == "ran" and free["finite"]
  # The process itself (Python, JAX, thread arenas) takes most of the address space: cap 256 MiB above it.
  limit = free["peak_virtual_bytes"] + 2 ** 28
  chunked = attention_memory.run_capped("chunked", 4096, "fwd_bwd", limit, **shape)
  xla = attention_memory.run_capped("xla", 4096, "fwd_bwd", limit, **shape)
  assert chunked["status"] == "ran" and chunked["finite"] and chunked["peak_virtual_bytes"] <= limit
  assert xla["status"] == "out_of_memory" and "RESOURCE_EXHAUSTED" in xla["error"]


def test_a_capped_run_that_fails_for_another_reason_raises():
  with pytest.raises(RuntimeError, match="failed .* for a reason other than memory"):
    attention_memory.run_capped("no_such_kernel", 64, "fwd", attention_memory.physical_memory())


def test_show_puts_reports_made_elsewhere_in_tensorboard_and_refuses_other_files(tmp_path, capsys,
                                                                                   tensorboard_events):
  from benchmarks import show
  report = tmp_path / "gpu" / "attention.json"
  report.parent.mkdir()
  rows = [dict(implementation="cudnn", seq_len=2048, ms=1.5, note="a|b"), dict(implementation="flash", ms=None)]
  report.write_text(json.dumps(dict(meta=dict(device=dict(kind="NVIDIA H100 80GB HBM3"), dtype="bfloat16",
                                              wrong=[], not_run=[dict(implementation="xla", why="memory")]),
                                    rows=rows)))
  assert show.run(parse_args(show, [str(report)])) == 0
  logdir = tmp_path / "gpu" / "tensorboard" / "attention"
  assert f"to see them: tensorboard --logdir {logdir.parent}" in capsys.readouterr().out
  events = tensorboard_events(str(logdir))
  assert sorted(events) == ["meta/text_summary", "rows/text_summary"]  # no PNG beside it: no chart
  assert events["rows/text_summary"] == [(0, "| implementation | seq_len | ms | note |\n| --- | --- | --- | --- |\n"
                                              "| cudnn | 2048 | 1.5 | a\\|b |\n| flash | - | - | - |")]
  assert events["meta/text_summary"] == [(0, "| field | value |\n| --- | --- |\n"
                                              "| device.kind | NVIDIA H100 80GB HBM3 |\n| dtype | bfloat16 |\n"
                                              "| wrong | none |\n| not_run | implementation xla, why memory |")]
  assert show.run(parse_args(show, [str(report)])) == 0  # shown again: replaces, does not add
  assert [len(v) for v in tensorboard_events(str(logdir)).values()] == [1, 1]
  other = tmp_path / "other.json"  # a glob over a results folder catches other JSON files too
  other.write_text(json.dumps(dict(machine="x", runs=[])))
  assert show.run(parse_args(show, [str(report), str(other)])) == 0
  assert (f"skipped: {other} is not a benchmark report (a JSON object with `meta` and a list of `rows`); give one "
          f"that a bench suite wrote with --out.\nwrote TensorBoard events for 1 report(s)") in capsys.readouterr().out
  with pytest.raises(UserError, match=r"None of the files given is a benchmark report"):
    show.run(parse_args(show, [str(other)]))
  with pytest.raises(UserError, match=r"None of the files given is a benchmark report"):
    show.run(parse_args(show, [str(tmp_path / "missing.json")]))
  assert "skipped: Cannot read the benchmark report " in capsys.readouterr().out
