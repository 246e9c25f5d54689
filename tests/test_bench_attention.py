"""`benchmarks/attention.py` and `benchmarks/attention_memory.py`: FLOP counts, a tiny grid end to end, and
memory-capped runs where `chunked` fits and `xla` does not."""

import json
import os

import jax
import pytest

from aigc_jax.errors import UserError
import benchmarks
from benchmarks import parse_args
from benchmarks import attention as bench_attention
from benchmarks import attention_memory


def test_attention_flops_follow_the_flash_attention_papers():
  assert bench_attention.attention_flops(2, 3, 128, 64, causal=False, mode="fwd") == 4 * 2 * 3 * 128 ** 2 * 64
  assert bench_attention.attention_flops(2, 3, 128, 64, causal=True, mode="fwd") == 2 * 2 * 3 * 128 ** 2 * 64
  assert bench_attention.attention_flops(2, 3, 128, 64, causal=True, mode="fwd_bwd") == 7 * 2 * 3 * 128 ** 2 * 64


def test_tiny_grid_writes_every_cell_against_the_reference_and_a_plot(run_bench):
  report = run_bench(bench_attention, "--quick", "--lengths", "64,128", "--reps", "1", "--min-time", "1e-3")
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
  assert report["meta"]["suite"] == "attention" and len(report["meta"]["code"]["tree"]) == 16
  assert report["meta"]["date"].startswith("20") and "jaxlib" in report["meta"]["jax_environment"]
  for r in rows:
    assert (r["batch"], r["num_heads"]) == (2048 // r["seq_len"], 4) and r["compile_ms"] > 0 and r["reps"] >= 1
    low, high = r["ratio_range"]
    assert low <= r["ratio_to_reference"] <= high


def test_narrowed_grid_runs_only_its_cells_and_tensorboard_gets_curves(run_bench, tensorboard_events, tmp_path):
  report = run_bench(bench_attention, "--quick", "--lengths", "64,128", "--head-dims", "32", "--causal", "true",
                     "--modes", "fwd", "--reps", "3", "--min-time", "1e-3", "--implementations", "xla")
  assert [(r["seq_len"], r["head_dim"], r["causal"], r["mode"], r["num_heads"]) for r in report["rows"]] == [
      (64, 32, True, "fwd", 8), (128, 32, True, "fwd", 8)]  # heads x head_dim stays 256
  assert all(r["reps"] == 3 for r in report["rows"])  # --reps is the least; 1 ms of --min-time adds none
  assert report["meta"]["grid"]["causal"] == [True] and report["meta"]["grid"]["modes"] == ["fwd"]
  events = tensorboard_events(str(tmp_path / "tensorboard" / "attention"))
  assert [step for step, _ in events["tflops/d32_causal_fwd/xla"]] == [64, 128]
  assert [value for _, value in events["ratio_to_reference/d32_causal_fwd/xla"]] == [1.0, 1.0]


def test_min_time_adds_repetitions_up_to_the_cap(run_bench):
  report = run_bench(bench_attention, "--quick", "--lengths", "64", "--causal", "false", "--modes", "fwd",
                     "--reps", "2", "--min-time", "1000", "--implementations", "xla")
  assert [r["reps"] for r in report["rows"]] == [benchmarks.MAX_REPS]


def test_relative_error_of_a_zero_reference_is_absolute_and_not_finite_is_wrong(run_bench, monkeypatch, capsys):
  zero = jax.numpy.zeros((2, 3))
  assert bench_attention.relative_error([zero + 1e-7], [zero]) == pytest.approx(1e-7)  # one key: zero gradients
  assert bench_attention.relative_error([zero * jax.numpy.nan], [zero + 1]) == float("inf")
  # A NaN in any array, ours or the reference's, first or not, and arrays that do not pair up are wrong too
  # (Python's max() drops a NaN that is not first).
  assert bench_attention.relative_error([zero + 1, zero * jax.numpy.nan], [zero + 1, zero + 1]) == float("inf")
  assert bench_attention.relative_error([zero + 1, zero + 1], [zero + 1, zero * jax.numpy.nan]) == float("inf")
  assert bench_attention.relative_error([zero + 1], [zero + 1, zero + 1]) == float("inf")
  assert bench_attention.relative_error([zero[:1]], [zero]) == float("inf")
  assert bench_attention.relative_error([zero + 1.5, zero + 2], [zero + 1, zero + 2]) == pytest.approx(0.5)
  from aigc_jax.nn import chunked_attention
  monkeypatch.setattr(chunked_attention, "chunked_attention", lambda q, *a, **kw: q * jax.numpy.nan)
  report = run_bench(bench_attention, "--quick", "--lengths", "64", "--causal", "false", "--modes", "fwd",
                     "--reps", "1", "--min-time", "1e-3")  # run_bench reads it with strict JSON: no NaN, Infinity
  assert [(r["implementation"], r["error_vs_reference"]) for r in report["meta"]["wrong"]] == [("chunked", None)]
  assert "WRONG: chunked seq_len 64 head_dim 64 causal False fwd: differs from xla by inf" in capsys.readouterr().out


def test_an_implementation_that_disagrees_with_the_reference_is_flagged(run_bench, monkeypatch, capsys):
  from aigc_jax.nn import chunked_attention
  right = chunked_attention.chunked_attention
  monkeypatch.setattr(chunked_attention, "chunked_attention", lambda *a, **kw: right(*a, **kw) * 1.01)
  report = run_bench(bench_attention, "--quick", "--lengths", "64", "--reps", "1", "--min-time", "1e-3")
  wrong = report["meta"]["wrong"]
  assert sorted((r["implementation"], r["causal"], r["mode"]) for r in wrong) == [
      ("chunked", c, m) for c in (False, True) for m in ("fwd", "fwd_bwd")]
  assert all(0.009 < r["error_vs_reference"] < 0.011 for r in wrong)  # the output is 1% off its largest entry
  assert "WRONG: chunked seq_len 64 head_dim 64 causal False fwd: differs from xla by 0.01" in capsys.readouterr().out


def test_a_run_stopped_partway_keeps_its_cells_and_resume_runs_only_the_rest(tmp_path, monkeypatch, capsys):
  out = tmp_path / "attention.json"
  argv = ["--quick", "--lengths", "64", "--reps", "1", "--min-time", "1e-3", "--implementations", "xla", "--out", str(out)]
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
  argv = ["--quick", "--lengths", "64", "--reps", "1", "--min-time", "1e-3", "--implementations", "xla", "--out", str(out), "--resume"]
  out.write_text(json.dumps(dict(meta=dict(device=dict(backend="gpu", kind="NVIDIA H100 80GB HBM3", count=1)),
                                 rows=[])))
  with pytest.raises(UserError, match=r"holds cells measured with a different device.backend, device.kind, device.cpu, "
                                      r".*code.tree, peak_flops, dtype, quick, implementations, grid, warmup, reps, "
                                      r"min_time_s; resume with"):
    bench_attention.run(parse_args(bench_attention, argv))
  for damaged in ('{"meta": {"device": ',  # cut short
                  json.dumps(dict(meta={}, rows=[dict(seq_len=64, causal=False, mode="fwd")])),  # no head_dim
                  json.dumps(dict(meta=dict(wrong=None), rows=[]))):
    out.write_text(damaged)
    with pytest.raises(UserError, match="is not a benchmark report this suite can resume; delete it, or run with"):
      bench_attention.run(parse_args(bench_attention, argv))


def test_a_repetition_lasts_ten_ms_so_dispatch_is_not_timed_and_the_gpu_reference_is_cudnn_where_it_runs(
    monkeypatch):
  plans = []  # (calls per repetition, repetitions) for a call of 0.05 ... 300 ms, --reps 5 --min-time 0.2
  for ms in (0.05, 0.1, 2.5, 10.0, 300.0):
    monkeypatch.setattr(benchmarks, "time_calls", lambda fn, args, calls=1, ms=ms: ms)
    plans.append(benchmarks.warm_up(None, (), warmup=1, reps=5, min_time=0.2))
  assert plans == [(100, 40), (100, 20), (4, 20), (1, 20), (1, 5)]
  assert not bench_attention._cudnn_runs(jax.numpy.bfloat16, (64, 128))  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # a GPU before Hopper: cuDNN up to head_dim 128
  assert bench_attention._cudnn_runs(jax.numpy.bfloat16, (64, 128))
  assert not bench_attention._cudnn_runs(jax.numpy.float32, (64, 128))  # --dtype float32: the reference is xla
  assert not bench_attention._cudnn_runs(jax.numpy.bfloat16, (64, 256))


@pytest.mark.parametrize("argv, message", [
    (["--implementations", "fast"], "Unknown implementation 'fast'.*chunked, flash, flash_triton"),
    (["--quick", "--lengths", "1k"], "--lengths takes positive integers separated by commas"),
    (["--quick", "--lengths", ""], "--lengths takes positive integers separated by commas, like 2048,4096; got ''"),
    (["--quick", "--head-dims", "48"], "--head-dims 48 does not divide the grid's heads x head_dim of 256"),
    (["--quick", "--modes", "bwd"], "--modes takes some of fwd,fwd_bwd separated by commas; got 'bwd'"),
    (["--lengths", "512"], "The full attention grid is sized for a GPU .*; pass --quick"),
    (["--quick", "--implementations", "xla,cudnn"], "cudnn runs on an NVIDIA GPU only and this is a cpu backend"),
    (["--quick", "--implementations", "flash_triton"], "flash_triton runs on an NVIDIA GPU only"),
    (["--quick", "--implementations", "flash"], "flash runs on a cpu backend only in Pallas interpret mode"),
])
def test_bad_arguments_are_one_sentence_before_anything_runs(argv, message, tmp_path, monkeypatch):
  monkeypatch.setattr(bench_attention, "build", lambda *a: pytest.fail("a cell ran"))
  with pytest.raises(UserError, match=message):
    bench_attention.run(parse_args(bench_attention, [*argv, "--out", str(tmp_path / "x.json")]))
  assert bench_attention.parse_lengths("64, 128") == (64, 128)


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "lots"])
def test_memory_limit_and_min_time_take_positive_numbers(value, capsys):
  for flag in ("--memory-limit-gb", "--min-time"):
    with pytest.raises(SystemExit) as exit_info:
      parse_args(bench_attention, ["--quick", flag, value])
    assert exit_info.value.code == 2 and f"{value!r} is not a number > 0" in capsys.readouterr().err


def test_an_out_path_that_cannot_be_written_is_refused_before_the_first_cell(tmp_path, monkeypatch):
  monkeypatch.setattr(bench_attention, "build", lambda *a: pytest.fail("a cell ran"))
  folder = tmp_path / "adir"
  folder.mkdir()
  with pytest.raises(UserError, match=f"--out {folder} is a directory; give a file path such as {folder}/report.json"):
    bench_attention.run(parse_args(bench_attention, ["--quick", "--out", str(folder)]))
  with pytest.raises(UserError, match=f"--out {folder} is a directory"):  # before --resume tries to read it
    bench_attention.run(parse_args(bench_attention, ["--quick", "--out", str(folder), "--resume"]))
  with pytest.raises(UserError, match=r"Cannot write the report /proc/nope/x.json \(.*\); give an --out in a folder"):
    bench_attention.run(parse_args(bench_attention, ["--quick", "--out", "/proc/nope/x.json"]))


def test_resume_refuses_cells_measured_on_other_code(tmp_path):
  out = tmp_path / "attention.json"
  argv = ["--quick", "--lengths", "64", "--causal", "false", "--modes", "fwd", "--reps", "1", "--min-time", "1e-3",
          "--implementations", "xla", "--out", str(out)]
  assert bench_attention.run(parse_args(bench_attention, argv)) == 0
  report = json.loads(out.read_text())
  report["meta"]["code"]["tree"] = "0" * 16  # as if aigc_jax/ or benchmarks/ had changed since
  out.write_text(json.dumps(report))
  with pytest.raises(UserError, match="holds cells measured with a different code.tree; resume with the same"):
    bench_attention.run(parse_args(bench_attention, [*argv, "--resume"]))


def test_the_code_version_ignores_the_reports_themselves():
  """A report written into benchmarks/results/ is not a change of the code measured: the next run's code.tree (which
  --resume compares) and dirty flag stay as they were."""
  before = benchmarks.code_version()
  report = os.path.join(benchmarks.RESULTS, f"test_report_{os.getpid()}.json")
  try:
    with open(report, "w") as f:
      f.write("{}")
    assert benchmarks.code_version() == before
  finally:
    os.remove(report)


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
  blocked = tmp_path / "blocked"  # where TensorBoard's folder would go, a file stands
  blocked.mkdir()
  (blocked / "tensorboard").write_text("")
  (blocked / "attention.json").write_text(report.read_text())
  with pytest.raises(UserError, match=r"Cannot write TensorBoard events to .*blocked/tensorboard/attention \(Not a "
                                      r"directory\); copy the report into a folder you can write to"):
    show.run(parse_args(show, [str(blocked / "attention.json")]))


def test_a_resume_takes_a_peak_that_moved_by_under_one_percent(tmp_path):
  """Without cpufreq a CPU's peak counts /proc/cpuinfo's 'cpu MHz', which some hosts report as it moves."""
  out = tmp_path / "report.json"
  meta = dict(device=dict(backend="cpu", kind="cpu", count=1), peak_flops=1.0e12)
  out.write_text(json.dumps(dict(meta=meta, rows=[])))
  benchmarks.Report(str(out), dict(meta, peak_flops=1.004e12), plot=None, cell=("seq_len",), resume=True)
  with pytest.raises(UserError, match=r"holds cells measured with a different peak_flops; resume with"):
    benchmarks.Report(str(out), dict(meta, peak_flops=1.05e12), plot=None, cell=("seq_len",), resume=True)
