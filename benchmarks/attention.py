"""Times the attention implementations side by side on FlashAttention's benchmark grid.

  python -m benchmarks.attention [--quick] [--lengths 2048,4096] [--head-dims 128] [--causal true] [--modes fwd]
      [--out benchmarks/results/attention.json]
  (wired as `aigc-jax bench attention`: `add_arguments(parser)` and `run(args)`)

The full grid is the FlashAttention papers': batch x length = 16k tokens, heads x head_dim
= 2048, lengths 512 ... 16k, head_dim 64 and 128, causal or not, forward ("fwd") and
forward + backward ("fwd_bwd"). `--quick` is what a 2-core CPU finishes in about two
minutes: 2k tokens (batch 1 at 4096), 4 heads x head_dim 64, lengths 512 ... 4096 (xla's
fwd_bwd needs 552 MiB there by XLA's memory analysis), both modes, both causal settings.
`--lengths`, `--head-dims`, `--causal` and `--modes` narrow either grid; each row records its
`batch` and `num_heads`. A CPU runs only the quick grid (the full one takes seconds per call).

FLOPs are 4 B H S^2 D for the forward (half of it when causal) and 3.5x that for
fwd_bwd (the backward does 2.5x the forward's matmul work). Every implementation of a
cell runs in this process on the same arrays, compiled first, then warmed up, then timed
in alternating repetitions; a repetition is `calls_per_rep` calls dispatched back to back
(enough to last 10 ms, at most 100: one in the CPU grid, many for a GPU's sub-millisecond
cells, whose ~10 us dispatch each would otherwise be timed too), ending in
`block_until_ready`. Each implementation gets at least `--reps` repetitions (default 5) and
more, up to 50, until they add up to `--min-time` seconds (default 0.5). A row's `ms` is the
median over repetitions of ms per call, and `compile_ms` its compile time.
`ratio_to_reference` is the reference's ms over this row's ms (above 1: faster than the
reference; cudnn on a GPU where it takes the dtype, xla elsewhere); `ratio_range` is the
ratio's spread, [reference's 25th percentile / this row's 75th, 75th / 25th], and the table
marks with `~` a ratio whose range holds 1: a difference within the timing noise. A cell whose compiled memory
(XLA's memory analysis) would exceed `--memory-limit-gb`, or that is unsupported or runs
out of memory, is recorded with `ms` null and the reason in `meta.not_run`. Each
implementation's first output (and, in fwd_bwd, its gradients) is compared with the
reference's on the same inputs (`error_vs_reference`); a row over the dtype's tolerance is
printed as WRONG and listed in `meta.wrong`: a fast kernel is only news if it is right.
Each row also records `memory_bytes`, XLA's memory analysis of the compiled cell
(temporaries, arguments and outputs): the memory side of the same comparison.
The JSON is rewritten after every cell (`meta.complete` is false until the last): a run
stopped partway keeps its cells, and `--resume` runs only the cells still missing.

On a Hopper GPU `flash` is Mosaic GPU kernels (FlashAttention-3's forward, and up to head_dim
128 a warp-specialised backward); the grid also times `flash_triton` there, `flash` with its
Triton kernels, so both families are measured side by side.
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.nn import attention as attention_lib
from aigc_jax.nn import gpus
from benchmarks import (Report, add_resume_argument, add_timing_arguments, default_out, environment, error_tolerance,
                        positive_float, ratio_range, relative_error, time_alternately, warm_up, within_noise)
from benchmarks.peak import default_dtype, peak_flops

FULL = dict(tokens=16384, width=2048, lengths=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128))
QUICK = dict(tokens=2048, width=256, lengths=(512, 1024, 2048, 4096), head_dims=(64,))
MODES = ("fwd", "fwd_bwd")
FLASH_TRITON = "flash_triton"  # `flash` with its Triton forward even on a Hopper GPU
CAUSAL = {"both": (False, True), "true": (True,), "false": (False,)}


def add_arguments(parser: argparse.ArgumentParser):
  parser.add_argument("--quick", action="store_true", help="the small grid a CPU finishes in about two minutes")
  parser.add_argument("--out", default=None, help="JSON path (a PNG plot is written next to it); default "
                      "benchmarks/results/attention_<backend>[_quick].json")
  parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths, replacing the grid's "
                      "(the batch still keeps the grid's tokens per batch)")
  parser.add_argument("--head-dims", default=None, help="comma-separated head dims, replacing the grid's (the heads "
                      "still keep the grid's heads x head_dim)")
  parser.add_argument("--causal", default="both", choices=tuple(CAUSAL), help="causal cells, non-causal, or both")
  parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, some of fwd,fwd_bwd")
  parser.add_argument("--implementations", default=None,
                      help="comma-separated; default: cudnn,xla,chunked,flash on a GPU (and flash_triton on a "
                      "Hopper GPU), xla,chunked,flash on a TPU, xla,chunked elsewhere")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                      help="default bfloat16 on a GPU or TPU, float32 elsewhere")
  add_timing_arguments(parser, "implementation and cell")
  parser.add_argument("--memory-limit-gb", type=positive_float, default=None,
                      help="skip a cell whose compiled memory exceeds this; default: half the free device memory "
                      "on a GPU, a quarter of the available RAM on a CPU (others share it)")
  add_resume_argument(parser)


def parse_lengths(text: str, flag: str = "--lengths", example: str = "2048,4096") -> tuple[int, ...]:
  """`--lengths`: "2048,4096" -> (2048, 4096)."""
  items = [n.strip() for n in text.split(",")]
  if not all(n.isdigit() and int(n) > 0 for n in items):
    raise UserError(f"{flag} takes positive integers separated by commas, like {example}; got {text!r}.")
  return tuple(map(int, items))


def grid_spec(args) -> dict:
  """The grid's sizes: `--quick`'s or the full one, narrowed by `--lengths`, `--head-dims`, `--causal`, `--modes`."""
  g = dict(QUICK if args.quick else FULL, causal=CAUSAL[args.causal])
  if args.lengths is not None:
    g["lengths"] = parse_lengths(args.lengths)
  if args.head_dims is not None:
    g["head_dims"] = parse_lengths(args.head_dims, "--head-dims", "64,128")
    wide = [d for d in g["head_dims"] if g["width"] % d]
    if wide:
      raise UserError(f"--head-dims {wide[0]} does not divide the grid's heads x head_dim of {g['width']}; use a "
                      f"divisor of it, such as 64.")
  modes = [m.strip() for m in args.modes.split(",")]
  if any(m not in MODES for m in modes):
    raise UserError(f"--modes takes some of {','.join(MODES)} separated by commas; got {args.modes!r}.")
  g["modes"] = tuple(m for m in MODES if m in modes)
  return g


def grid(g: dict):
  """(seq_len, head_dim, causal, mode, batch, heads) cells in run order."""
  for d in g["head_dims"]:
    for causal in g["causal"]:
      for mode in g["modes"]:
        for s in g["lengths"]:
          yield s, d, causal, mode, max(1, g["tokens"] // s), g["width"] // d


def attention_flops(batch, heads, seq_len, head_dim, causal, mode) -> float:
  fwd = 4 * batch * heads * seq_len ** 2 * head_dim * (0.5 if causal else 1.0)
  return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def default_memory_limit() -> float:
  device = jax.devices()[0]
  if device.platform == "cpu":
    with open("/proc/meminfo") as f:
      available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available / 4
  stats = device.memory_stats() or {}
  return (stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)) / 2 or float("inf")


def build(implementation, causal, mode, args):
  """A compiled function of `args` for one implementation and mode, and its memory footprint in bytes."""
  def attend(q, k, v):
    if implementation == FLASH_TRITON:
      return attention_lib.flash_kernels("flash_attention").flash_attention(q, k, v, causal=causal, hopper=False)
    return attention_lib.dot_product_attention(q, k, v, causal=causal, implementation=implementation)

  if mode == "fwd":
    fn = attend
  else:
    def fn(q, k, v, d_out):  # forward and the backward of sum(out * d_out)
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(d_out)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_ms = (time.perf_counter() - start) * 1000
  memory = compiled.memory_analysis()
  footprint = None if memory is None else (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                           + memory.output_size_in_bytes)
  return compiled, footprint, compile_ms


def _cudnn_runs(dtype, head_dims) -> bool:
  """Whether `cudnn` takes this dtype and every head_dim of the grid here (not fp32, for one)."""
  try:
    for d in head_dims:
      attention_lib.resolve_implementation("cudnn", dtype, d)
  except UserError:
    return False
  return True


def check_runnable(implementations, backend: str) -> None:
  """One sentence before anything runs for an implementation asked for by name that cannot be timed here."""
  for name in implementations:
    if name in ("cudnn", FLASH_TRITON) and backend != "gpu":
      raise UserError(f"{name} runs on an NVIDIA GPU only and this is a {backend} backend; leave it out of "
                      f"--implementations (xla and chunked run everywhere).")
    if name == "flash" and backend not in ("gpu", "tpu"):
      raise UserError(f"flash runs on a {backend} backend only in Pallas interpret mode, which checks its numbers but "
                      f"is not meant for timing; leave it out of --implementations.")


def print_row(row: dict, iqr: float | None) -> None:
  """One line of the table (the header is in `run`); `~` marks a ratio within the timing noise."""
  fmt = lambda x, f: format(x, f) if x is not None else "-"
  noisy = "~" if within_noise(row) else " "
  print(f"{row['implementation']:>14s} {row['seq_len']:7d} {row['head_dim']:8d} {str(row['causal']):>6s} "
        f"{row['mode']:>7s} {fmt(row['ms'], '9.2f'):>9s} {fmt(iqr, '7.2f'):>7s} {fmt(row['tflops'], '8.4f'):>8s} "
        f"{fmt(row['peak_fraction'] and 100 * row['peak_fraction'], '6.1f'):>7s} "
        f"{noisy}{fmt(row['ratio_to_reference'], '6.2f'):>6s} {fmt(row['error_vs_reference'], '7.1e'):>7s} "
        f"{fmt(row['memory_bytes'] and row['memory_bytes'] / 2 ** 20, '7.1f'):>7s}", flush=True)


def run(args) -> int:
  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  dtype = default_dtype(args.dtype)
  implementations = (args.implementations.split(",") if args.implementations
                     else ["cudnn", "xla", "chunked", "flash"] + [FLASH_TRITON] * gpus.on_hopper() if on_gpu
                     else ["xla", "chunked", "flash"] if backend == "tpu" else ["xla", "chunked"])
  known = [i for i in attention_lib.IMPLEMENTATIONS if i != "auto"] + [FLASH_TRITON]
  for name in implementations:
    if name not in known:
      raise UserError(f"Unknown implementation {name!r} for the attention benchmark; use some of {', '.join(known)}.")
  check_runnable(implementations, backend)
  if backend == "cpu" and not args.quick:
    raise UserError("The full attention grid is sized for a GPU (16k tokens and heads x head_dim 2048 a cell: "
                    "seconds per call on a CPU); pass --quick, which --lengths, --head-dims, --causal and --modes "
                    "narrow further.")
  g = grid_spec(args)
  reference = "cudnn" if on_gpu and _cudnn_runs(dtype, g["head_dims"]) else "xla"
  if reference not in implementations:
    implementations.insert(0, reference)
  peak, peak_note = peak_flops(dtype)
  limit = args.memory_limit_gb * 2 ** 30 if args.memory_limit_gb else default_memory_limit()
  out_path = args.out or default_out("attention", backend, args.quick)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}); peak: {peak_note}; dtype {dtype.name}; "
        f"memory limit {limit / 2 ** 30:.1f} GiB; {args.warmup} warm-up + at least {args.reps} timed reps and "
        f"{args.min_time:g} s per implementation and cell; ms is the median; ~ marks a ratio within the noise")

  tolerance = error_tolerance(dtype)
  meta = dict(
      suite="attention", **environment(), peak_flops=peak, peak_note=peak_note, dtype=dtype.name, reference=reference,
      quick=args.quick,
      implementations=implementations,
      grid=dict(tokens_per_batch=g["tokens"], heads_times_head_dim=g["width"], lengths=list(g["lengths"]),
                head_dims=list(g["head_dims"]), causal=list(g["causal"]), modes=list(g["modes"])),
      flops="fwd 4*B*H*S^2*D (x0.5 causal); fwd_bwd 3.5x fwd", warmup=args.warmup, reps=args.reps,
      min_time_s=args.min_time, ms="median over reps of ms per call (calls_per_rep calls a rep)",
      compile_ms="lowering and compiling the cell, ms", ratio_to_reference="reference ms / ms",
      ratio_range="[reference q25 / q75, reference q75 / q25] over the reps", non_finite="written as null",
      memory_limit_bytes=limit,
      memory_bytes="XLA memory analysis of the compiled cell: temporaries + arguments + outputs",
      error_vs_reference="largest |x - reference| / largest |reference| over the output (and the gradients in "
      "fwd_bwd), the same inputs", error_tolerance=tolerance)
  report = Report(out_path, meta, plot, cell=("seq_len", "head_dim", "causal", "mode"),
                  same=("dtype", "quick", "implementations", "grid", "warmup", "reps", "min_time_s"),
                  lists=("wrong", "not_run", "spread"), resume=args.resume)
  header = (f"{'implementation':>14s} {'seq_len':>7s} {'head_dim':>8s} {'causal':>6s} {'mode':>7s} {'ms':>9s} "
            f"{'IQR ms':>7s} {'TFLOP/s':>8s} {'% peak':>7s} {'vs ref':>7s} {'error':>7s} {'MiB':>7s}")
  print(header)
  for seq_len, head_dim, causal, mode, batch, heads in grid(g):
    if report.done(seq_len=seq_len, head_dim=head_dim, causal=causal, mode=mode):
      for row in report.kept(seq_len=seq_len, head_dim=head_dim, causal=causal, mode=mode):  # the whole table
        spread = [s for s in report.meta["spread"] if all(s[k] == row[k] for k in ("implementation", *report.cell))]
        print_row(row, spread[0]["iqr_ms"] if spread else None)
      continue
    rows, not_run, spreads, wrong = [], [], [], []
    rng = np.random.default_rng([seq_len, head_dim, causal, MODES.index(mode)])  # the same inputs when resumed
    shape = (batch, seq_len, heads, head_dim)
    arrays = [jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4 if mode == "fwd_bwd" else 3)]
    timed, outputs, footprints, calls, compile_ms = {}, {}, {}, {}, {}
    for name in implementations:
      reason = None
      try:
        fn, footprint, compile_ms[name] = build(name, causal, mode, arrays)
        if footprint is not None and footprint > limit:
          reason = f"needs {footprint / 2 ** 30:.1f} GiB (XLA memory analysis) > limit {limit / 2 ** 30:.1f} GiB"
        else:
          outputs[name] = jax.block_until_ready(fn(*arrays))  # the first run also allocates; kept to check
          calls[name], reps = warm_up(fn, arrays, args.warmup, args.reps, args.min_time)
          timed[name], footprints[name] = (fn, arrays, calls[name], reps), footprint
      except UserError as e:
        reason = f"unsupported: {e}"
      except Exception as e:  # noqa: BLE001 - XlaRuntimeError and friends: out of memory, lowering failures
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      if reason:
        not_run.append(dict(implementation=name, seq_len=seq_len, head_dim=head_dim, causal=causal, mode=mode,
                            reason=reason))
    times = time_alternately(timed)
    flops = attention_flops(batch, heads, seq_len, head_dim, causal, mode)
    ref_ms = float(np.median(times[reference])) if reference in times else None
    for name in implementations:
      ms = float(np.median(times[name])) if name in times else None
      tflops = flops / ms / 1e9 if ms else None
      row = dict(implementation=name, seq_len=seq_len, head_dim=head_dim, causal=causal, mode=mode, ms=ms,
                 tflops=tflops, peak_fraction=tflops * 1e12 / peak if tflops and peak else None,
                 ratio_to_reference=ref_ms / ms if ms and ref_ms else None,
                 ratio_range=ratio_range(times[reference], times[name]) if ms and ref_ms else None,
                 error_vs_reference=(relative_error(outputs[name], outputs[reference])
                                     if name in outputs and reference in outputs else None),
                 memory_bytes=footprints.get(name), compile_ms=compile_ms.get(name), calls_per_rep=calls.get(name),
                 reps=len(times[name]) if ms else None, batch=batch, num_heads=heads)
      if row["error_vs_reference"] is not None and not row["error_vs_reference"] <= tolerance:
        wrong.append(row)
      rows.append(row)
      iqr = float(np.percentile(times[name], 75) - np.percentile(times[name], 25)) if ms else None
      spreads.append(dict(implementation=name, seq_len=seq_len, head_dim=head_dim, causal=causal, mode=mode,
                          all_ms=times.get(name), iqr_ms=iqr))
      print_row(row, iqr)
    del arrays, timed, outputs, footprints
    report.add(rows, wrong=wrong, not_run=not_run, spread=spreads)

  for row in report.meta["wrong"]:
    print(f"WRONG: {row['implementation']} seq_len {row['seq_len']} head_dim {row['head_dim']} causal "
          f"{row['causal']} {row['mode']}: differs from {reference} by {row['error_vs_reference']:.2g} of its "
          f"largest entry (tolerance {tolerance:g} in {dtype.name})")
  for item in report.meta["not_run"]:
    print(f"not run: {item['implementation']} seq_len {item['seq_len']} head_dim {item['head_dim']} "
          f"causal {item['causal']} {item['mode']}: {item['reason']}")
  report.finish()
  return 0


def scalars(rows):
  """TensorBoard curves, step = seq_len: TFLOP/s and the ratio to the reference per implementation and panel."""
  for r in rows:
    panel = f"d{r['head_dim']}_{'causal' if r['causal'] else 'full'}_{r['mode']}"
    for field in ("tflops", "ratio_to_reference"):
      if r.get(field) is not None:
        yield f"{field}/{panel}/{r['implementation']}", r["seq_len"], r[field]


def plot(rows, title):
  """TFLOP/s against seq_len per implementation, one panel per (head_dim, causal, mode)."""
  from aigc_jax.plots import plt  # pylint: disable=g-import-not-at-top

  panels = sorted({(r["head_dim"], r["causal"], r["mode"]) for r in rows})
  cols = 4
  nrows = -(-len(panels) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
  for ax, (d, causal, mode) in zip(axes.flat, panels):
    for name in dict.fromkeys(r["implementation"] for r in rows):
      pts = [(r["seq_len"], r["tflops"]) for r in rows if (r["implementation"], r["head_dim"], r["causal"],
                                                           r["mode"]) == (name, d, causal, mode) and r["tflops"]]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_title(f"d={d} {'causal' if causal else 'full'} {mode}", fontsize=9)
    ax.set_xlabel("seq_len")
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


if __name__ == "__main__":
  import benchmarks  # pylint: disable=g-import-not-at-top
  raise SystemExit(benchmarks.main(sys.modules[__name__]))
