"""Training throughput and MFU of the GPT configs, ours against a straightforward Flax GPT.

  python -m benchmarks.train [--quick] [--shapes cpu,gpu,gpt2] [--dtype bfloat16] [--attention auto] [--batch-size N]
  (wired as `aigc-jax bench train`: `add_arguments(parser)` and `run(args)`)

Shapes (batch x seq_len):
  * `cpu`: configs/gpt_shakespeare_char_cpu.py as shipped, 12 x 64 (0.8M parameters).
  * `gpu`: configs/gpt_shakespeare_char.py, 64 x 256 (10.7M); `--quick`: 4 x 256.
  * `gpt2`: GPT-2 124M derived from the GPU config (12 layers, 12 heads, width 768, vocab
    50304 = GPT-2's 50257 padded to a multiple of 64, tied embeddings, no bias),
    16 x 1024; `--quick`: 1 x 256, context shortened to 256 (the row says so).
  * `tiny`: for the tests only (2 layers, width 32, 2 x 16).
The full grid is the GPU grid (bf16 by default): do not run it on a CPU, where GPT-2 at
16 x 1024 takes minutes per step (`run` refuses the gpu and gpt2 shapes on a CPU without
`--quick`). `--quick` is the CPU-sized run, under ~3 minutes on an idle 2-core CPU.
Dropout is 0 in every shape (the GPU recipe ships 0.2; the reference has no dropout, so
both run without; the row's `note` says so). The data are random tokens of the shape's
vocabulary (65 characters for Tiny Shakespeare): speed does not depend on them.
`--attention` picks our attention implementation (xla, cudnn, chunked, flash, auto); the
row's `attention` records what `auto` chose (e.g. `auto->cudnn`).

Ours is the training loop's own step (`aigc_jax.train.loop.compile_steps` on a language-model
task: our Transformer, loss, AdamW chain, jitted with the state donated); the reference is
`benchmarks/reference_gpt.py:reference_step` (separate q/k/v `nn.Dense`, einsum attention,
optax clip + adamw) at the same shape and dtype. With `--torch-python PATH` (a Python with
torch) a `pytorch` row adds nanoGPT's model and iteration at the same shape, fed the same
batches in a subprocess (`reference_gpt.TorchRun`; nanoGPT's learned positions; shapes with
options nanoGPT lacks, bf16 among them, are refused). Each is compiled ahead of time, warmed
up, then timed in alternating repetitions of `steps` steps ending in `block_until_ready`;
`ms` is the median over repetitions of ms per step. The JSON is rewritten after every
shape (`meta.complete` is false until the last); `--resume` runs only the shapes missing.

FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, with L layers,
H heads, Q head_dim, T seq_len. N is the parameters that take part in matmuls: every
parameter except the token and position tables, plus the tied token table counted once as
the output head (vocab x width) -- the table lookup is a gather, the head a matmul. This is
nanoGPT's reading (`get_num_params()` drops only the position table of a tied model); PaLM
ties its embeddings too, and LayerNorm scales, included here, are a rounding error. The
attention term counts the full T x T score matrix, as PaLM and nanoGPT do: `mfu` uses it.
A causal kernel needs only half of it, so `mfu_causal` uses 6 N + 6 L H Q T. MFU =
tokens/s x FLOPs/token / (peak x devices), the peak per device from `benchmarks/peak.py` for
the compute dtype; both steps run data parallel over every device (`devices` in the rows). A
CPU's peak already counts every core of the process, however many devices XLA makes of them
(`--xla_force_host_platform_device_count`), so there it is not multiplied.
`xla_flops_per_step` is XLA's own cost analysis of the compiled step (one device's program)
times the devices, for comparison (it counts every op, the optimizer included, and whatever
the kernels really compute).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import config as config_lib
from aigc_jax.errors import UserError
from aigc_jax.models import build_language_model
from aigc_jax.nn.attention import IMPLEMENTATIONS, resolve_implementation
from aigc_jax.tasks.language_model import LanguageModelTask
from aigc_jax.train import parallel
from aigc_jax.train.loop import compile_steps
from aigc_jax.nn import plain_autodiff
from benchmarks import (Report, add_resume_argument, at_least, default_out, environment, error_tolerance, ratio_range,
                        relative_error, within_noise, xla_flops)
from benchmarks.peak import default_dtype, peak_flops
from benchmarks.reference_gpt import TorchRun, check_torch_shape, matmul_params, reference_step, time_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAR_VOCAB = 65  # Tiny Shakespeare's characters
GPT2 = ["model.num_layers=12", "model.num_heads=12", "model.emb_dim=768", "model.mlp_ratio=4",
        "model.tie_embeddings=True", "model.use_bias=False", "model.dropout_rate=0.0"]
# name -> config file, overrides, vocab, (batch, seq_len) for the full grid and for --quick
SHAPES = {
    "cpu": dict(config="gpt_shakespeare_char_cpu.py", overrides=[], vocab=CHAR_VOCAB, full=(12, 64), quick=(12, 64)),
    "gpu": dict(config="gpt_shakespeare_char.py", overrides=[], vocab=CHAR_VOCAB, full=(64, 256), quick=(4, 256)),
    "gpt2": dict(config="gpt_shakespeare_char.py", overrides=GPT2, vocab=50304,  # 50257 padded to a multiple of 64
                 full=(16, 1024), quick=(1, 256), context=1024),
    "tiny": dict(config="gpt_shakespeare_char_cpu.py", vocab=CHAR_VOCAB, full=(2, 16), quick=(2, 16),
                 overrides=["model.num_layers=2", "model.num_heads=2", "model.emb_dim=32"]),
}
DEFAULT_SHAPES = ("cpu", "gpu", "gpt2")
FORMULA = ("flops_per_token = 6*N + 12*L*H*Q*T (PaLM appendix B; full T x T attention); "
           "flops_per_token_causal = 6*N + 6*L*H*Q*T (attention term halved for the causal mask); "
           "N = parameters used in matmuls: all but the token and position tables, plus vocab*width for the "
           "tied output head (nanoGPT's count); MFU = tokens/s * flops_per_token / (peak per device * devices; "
           "a CPU's peak, which counts the process's cores, once)")


def add_arguments(parser: argparse.ArgumentParser):
  parser.add_argument("--quick", action="store_true",
                      help="the CPU-sized run (cpu 12x64, gpu 4x256, gpt2 1x256), under ~3 minutes on 2 cores")
  parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                      help=f"comma-separated, from {', '.join(SHAPES)} ('tiny' is for tests)")
  parser.add_argument("--out", default=None, help="JSON path (a PNG chart is written next to it); default "
                      "benchmarks/results/train_<backend>[_quick].json")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="compute dtype of both models; default bfloat16 on a GPU or TPU, float32 elsewhere")
  parser.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                      help="our attention implementation (the reference always uses einsum attention)")
  parser.add_argument("--reps", type=at_least(1), default=None,
                      help="timed repetitions of each step (default 3 quick, 7)")
  parser.add_argument("--warmup", type=at_least(1), default=None,
                      help="untimed steps after compiling and one first step (default 1 quick, 3)")
  parser.add_argument("--steps", type=at_least(1), default=None,
                      help="steps per repetition; default: as many as fill ~0.5 s (quick) or ~2 s, at most 50")
  parser.add_argument("--batch-size", type=at_least(1), default=None,
                      help="sequences per step for every shape, replacing the grid's (e.g. to find the batch where "
                      "GPT-2's MFU levels off)")
  parser.add_argument("--torch-python", metavar="PATH",
                      help="a Python with torch (not our dependency): add nanoGPT's PyTorch step as a third row")
  add_resume_argument(parser)


def shape_config(name: str, quick: bool, dtype, attention: str, batch_size: int | None = None):
  """(locked config, vocab size, note) of one benchmark shape, `batch_size` replacing its batch; dropout is off."""
  spec = SHAPES[name]
  batch, seq_len = spec["quick" if quick else "full"]
  batch = batch_size or batch
  overrides = spec["overrides"] + [f"batch_size={batch}", f"data.seq_len={seq_len}", "grad_accum_steps=1",
                                   f"model.dtype={jnp.dtype(dtype).name}", f"model.attention={attention}",
                                   "model.dropout_rate=0.0"]
  config = config_lib.load_config(os.path.join(ROOT, "configs", spec["config"]), overrides)
  notes = []
  shipped = config_lib.load_config(os.path.join(ROOT, "configs", spec["config"]), spec["overrides"])
  if shipped.model.dropout_rate:
    notes.append(f"dropout {shipped.model.dropout_rate} -> 0 (the reference has none)")
  if spec.get("context", seq_len) != seq_len:
    notes.append(f"seq_len shortened from {spec['context']} to {seq_len} (position table {seq_len} rows)")
  return config, spec["vocab"], "; ".join(notes)


class SyntheticTokens(LanguageModelTask):
  """The language-model task (model, loss, optimizer, step) on random tokens: no corpus to load."""

  def __init__(self, config, vocab_size: int):
    self.config = config
    self.model = build_language_model(config.model, vocab_size=vocab_size, max_len=config.data.seq_len)
    self.vocab_size = vocab_size
    self.units_per_batch = config.batch_size * config.data.seq_len

  def train_batch(self, step: int, rows: slice = slice(None)):
    rng = np.random.default_rng(step)
    tokens = rng.integers(0, self.vocab_size, (self.config.batch_size, self.config.data.seq_len + 1), np.int32)[rows]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}  # [B, T] each


def flops_per_token(n: int, layers: int, heads: int, head_dim: int, seq_len: int) -> tuple[float, float]:
  """(PaLM's 6N + 12LHQT, the same with the attention term halved for the causal mask)."""
  attention = 12 * layers * heads * head_dim * seq_len
  return 6 * n + attention, 6 * n + attention / 2


def error_vs_plain(name: str, args, dtype, params, batch) -> float:
  """`relative_error` of ours' loss and gradient on one batch against the same model and parameters with `xla`
  attention and JAX's own autodiff (`plain_autodiff`: no custom VJP): a fast kernel or custom gradient that is
  wrong shows here, which timing alone would not show."""
  def loss_and_gradient(attention):
    config, vocab, _ = shape_config(name, args.quick, dtype, attention, args.batch_size)
    task = SyntheticTokens(config, vocab)
    mean_loss = lambda p: (lambda total, count, _: total / count)(*task.loss(p, batch, jax.random.PRNGKey(0), False))
    return jax.jit(jax.value_and_grad(mean_loss))(params)

  got = loss_and_gradient(args.attention)
  with plain_autodiff():
    want = loss_and_gradient("xla")
  return relative_error(got, want)


class JaxRun:
  """A compiled step and its (donated) state, timed `steps` at a time."""

  def __init__(self, step, state, batches, compile_s: float):
    self.step, self.state, self.batches, self.compile_s = step, state, batches, compile_s

  def time(self, steps: int) -> float:
    """ms per step over `steps` steps."""
    self.state, ms = time_steps(self.step, self.state, self.batches, steps)
    return ms

  def params(self) -> int:
    tree = self.state.params if hasattr(self.state, "params") else self.state[0]  # ours, the reference's tuple
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

  def xla_flops(self, devices: int) -> float | None:
    """XLA's count for the whole step: the SPMD program is one device's share."""
    per_device = xla_flops(self.step)
    return per_device and per_device * devices


def bench_shape(name: str, args, dtype, peak):
  """The rows (ours, the reference, and pytorch with --torch-python) of one shape."""
  config, vocab, note = shape_config(name, args.quick, dtype, args.attention, args.batch_size)
  m = config.model
  batch, seq_len = config.batch_size, config.data.seq_len
  head_dim = m.emb_dim // m.num_heads
  task = SyntheticTokens(config, vocab)
  mesh = parallel.data_mesh()
  steps = compile_steps(task, config, mesh)
  host_batches = [task.train_batch(i) for i in range(4)]
  batches = [parallel.shard_batch(b, mesh) for b in host_batches]
  rng = jax.random.PRNGKey(config.seed)
  ref_init, ref_step = reference_step(config, vocab)

  warmup = args.warmup or (1 if args.quick else 3)
  runs = {}
  for impl, init, step in (("ours", steps.init, steps.train),
                           ("reference", jax.jit(ref_init), jax.jit(ref_step, donate_argnums=0))):
    state = init(rng)
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    state, _ = time_steps(compiled, state, batches, 1)  # the first run allocates
    runs[impl] = JaxRun(compiled, state, batches, compile_s)
  if args.torch_python:
    start = time.perf_counter()
    runs["pytorch"] = TorchRun(args.torch_python, config, vocab, host_batches)
    runs["pytorch"].time(1)
    runs["pytorch"].compile_s = time.perf_counter() - start  # start-up and the first step
  times = {impl: [] for impl in runs}
  try:
    warm_ms = {impl: run.time(max(1, warmup)) for impl, run in runs.items()}
    params = runs["ours"].state.params
    n = matmul_params(params, m.tie_embeddings)
    per_token, per_token_causal = flops_per_token(n, m.num_layers, m.num_heads, head_dim, seq_len)
    tokens = batch * seq_len
    total_peak = peak and (peak if jax.default_backend() == "cpu" else peak * mesh.size)  # see the module doc
    target_s = 0.5 if args.quick else 2.0  # seconds per timed repetition
    n_steps = args.steps or int(np.clip(round(target_s * 1000 / warm_ms["ours"]), 1, 50))
    for _ in range(args.reps or (3 if args.quick else 7)):  # alternate, so slow phases of the machine hit all
      for impl, run in runs.items():
        times[impl].append(run.time(n_steps))
  finally:
    if "pytorch" in runs:
      runs["pytorch"].close()

  error = error_vs_plain(name, args, dtype, runs["ours"].state.params, batches[0])
  attention = m.attention
  if attention == "auto":
    attention = f"auto->{resolve_implementation('auto', dtype, head_dim, q_len=seq_len, kv_len=seq_len)}"
  ref_ms = float(np.median(times["reference"]))
  rows = []
  for impl, run in runs.items():
    ms = float(np.median(times[impl]))
    tokens_per_s = tokens / ms * 1000
    torch = impl == "pytorch"
    rows.append(dict(
        shape=name, implementation=impl,
        attention=attention if impl == "ours" else "torch sdpa" if torch else "einsum",
        dtype=jnp.dtype(dtype).name, batch=batch, seq_len=seq_len, vocab=vocab, layers=m.num_layers,
        heads=m.num_heads, width=m.emb_dim, position_encoding="learned" if torch else m.position_encoding,
        note=f"torch {run.info['torch']}, {run.info['threads']} threads" if torch else note,
        params=run.params(), matmul_params=n, flops_per_token=per_token, flops_per_token_causal=per_token_causal,
        model_flops_per_step=per_token * tokens, xla_flops_per_step=None if torch else run.xla_flops(mesh.size),
        ms=ms, ms_all=times[impl], ms_iqr=float(np.percentile(times[impl], 75) - np.percentile(times[impl], 25)),
        steps_per_rep=n_steps, compile_s=run.compile_s, tokens_per_s=tokens_per_s,
        tflops=tokens_per_s * per_token / 1e12,
        devices=1 if torch else mesh.size, mfu=tokens_per_s * per_token / total_peak if peak else None,
        mfu_causal=tokens_per_s * per_token_causal / total_peak if peak else None,
        ratio_to_reference=ref_ms / ms, ratio_range=ratio_range(times["reference"], times[impl]),
        error_vs_plain=error if impl == "ours" else None))
  return rows


def run(args) -> int:
  backend = jax.default_backend()
  dtype = default_dtype(args.dtype)
  names = [s.strip() for s in args.shapes.split(",") if s.strip()]
  if not names:
    raise UserError(f"--shapes names no shape; give some of {', '.join(SHAPES)}, separated by commas.")
  for name in names:
    if name not in SHAPES:
      raise UserError(f"Unknown shape {name!r} for the training benchmark; use some of {', '.join(SHAPES)}.")
  if backend == "cpu" and not args.quick and set(names) & {"gpu", "gpt2"}:
    raise UserError("The full training grid is sized for a GPU (GPT-2 at 16 x 1024 takes minutes per step on a "
                    "CPU); pass --quick, or --shapes cpu.")
  if args.torch_python:
    if backend != "cpu":
      raise UserError(f"The PyTorch reference runs on the CPU, and ours here on the {backend}; compare them on a "
                      f"CPU, or leave --torch-python out.")
    for name in names:  # before anything is measured
      check_torch_shape(shape_config(name, args.quick, dtype, args.attention, args.batch_size)[0])
  peak, peak_note = peak_flops(dtype)
  out_path = args.out or default_out("train", backend, args.quick)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}); peak: {peak_note}; dtype {dtype.name}; attention (ours) "
        f"{args.attention}; ~ marks a ratio within the timing noise\n")
  print(f"{'shape':>5s} {'impl':>9s} {'attention':>13s} {'batch':>5s} {'seq':>5s} {'ms/step':>9s} {'tokens/s':>9s} "
        f"{'TFLOP/s':>8s} {'MFU':>6s} {'MFU c.':>6s} {'vs ref':>6s}")
  meta = dict(
      suite="train", **environment(), peak_flops=peak, peak_note=peak_note, dtype=dtype.name, quick=args.quick,
      shapes=names, attention=args.attention, batch_size=args.batch_size, torch=bool(args.torch_python),
      formula=FORMULA,
      warmup=args.warmup or (1 if args.quick else 3), reps=args.reps or (3 if args.quick else 7), steps=args.steps,
      ms="median over repetitions of ms per step (each repetition: steps_per_rep steps, block_until_ready)",
      ratio_to_reference="reference ms / ms (above 1: faster than the reference)",
      ratio_range="[reference q25 / q75, reference q75 / q25] over the repetitions",
      error_vs_plain="ours: largest |x - plain| / largest |plain| over the loss and each gradient on one batch, "
      "plain being the same model and parameters with xla attention and JAX's own autodiff",
      error_tolerance=error_tolerance(dtype),
      data="random tokens of the shape's vocabulary", dropout=0.0,
      reference="benchmarks/reference_gpt.py:reference_step (straightforward Flax GPT, einsum attention)")
  report = Report(out_path, meta, plot, cell=("shape",), same=("dtype", "quick", "shapes", "attention", "batch_size",
                                                               "warmup", "reps", "steps", "torch"),
                  lists=("wrong",), resume=args.resume)
  for name in names:
    if report.done(shape=name):
      print_shape(report.kept(shape=name))  # the whole table
      continue
    shape_rows = bench_shape(name, args, dtype, peak)
    report.add(shape_rows, wrong=[r for r in shape_rows if r["error_vs_plain"] is not None
                                  and not r["error_vs_plain"] <= report.meta["error_tolerance"]])
    print_shape(shape_rows)
  print()
  for r in report.meta["wrong"]:
    print(f"WRONG: {r['shape']} ours differs from the plain model (xla attention, JAX autodiff) by "
          f"{r['error_vs_plain']:.2g} of the largest loss or gradient entry (tolerance "
          f"{report.meta['error_tolerance']:g} in {dtype.name})")
  report.finish()
  return 0


def print_shape(shape_rows: list) -> None:
  """A shape's lines of the table (ours, the reference, pytorch; the header is in `run`) and its model's size."""
  pct = lambda x: f"{100 * x:5.1f}%" if x is not None else "-"
  for r in shape_rows:
    print(f"{r['shape']:>5s} {r['implementation']:>9s} {r['attention']:>13s} {r['batch']:5d} {r['seq_len']:5d} "
          f"{r['ms']:9.1f} {r['tokens_per_s']:9.0f} {r['tflops']:8.4f} {pct(r['mfu']):>6s} "
          f"{pct(r['mfu_causal']):>6s} {'~' if within_noise(r) else ' '}{r['ratio_to_reference']:5.2f}", flush=True)
  ours = shape_rows[0]
  xla = f"{ours['xla_flops_per_step'] / ours['model_flops_per_step']:.2f}x" if ours["xla_flops_per_step"] else "-"
  print(f"      {ours['matmul_params'] / 1e6:.2f}M matmul params, {ours['flops_per_token'] / 1e6:.1f} MFLOP/token;"
        f" XLA cost analysis / model FLOPs (ours): {xla}; ours vs plain autodiff and xla attention, loss and "
        f"gradient: {ours['error_vs_plain']:.1e}" + (f"; {ours['note']}" if ours["note"] else ""))


def plot(rows, title):
  """Bars per shape: MFU (PaLM formula) of ours and the reference, and ours' speed-up over the reference."""
  from aigc_jax.plots import plt  # pylint: disable=g-import-not-at-top

  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  labels = [f"{s}\n{r['batch']}x{r['seq_len']}" for s in shapes for r in rows
            if r["shape"] == s and r["implementation"] == "ours"]
  x = np.arange(len(shapes))
  fig, (ax_mfu, ax_ratio) = plt.subplots(1, 2, figsize=(4 + 2 * len(shapes), 3.6))
  impls = list(dict.fromkeys(r["implementation"] for r in rows))  # ours, reference (, pytorch)
  width = 0.8 / len(impls)
  for i, impl in enumerate(impls):
    values = [next((100 * (r["mfu"] or 0) for r in rows if (r["shape"], r["implementation"]) == (s, impl)), 0)
              for s in shapes]
    ax_mfu.bar(x + (i - (len(impls) - 1) / 2) * width, values, width, label=impl)
  ax_mfu.set_xticks(x, labels, fontsize=8)
  ax_mfu.set_ylabel("MFU (%), PaLM formula")
  ax_mfu.legend(fontsize=8)
  ratios = [next(r["ratio_to_reference"] for r in rows if (r["shape"], r["implementation"]) == (s, "ours"))
            for s in shapes]
  ax_ratio.bar(x, ratios, 0.5, color="tab:green")
  ax_ratio.axhline(1.0, color="gray", lw=0.8)
  ax_ratio.set_xticks(x, labels, fontsize=8)
  ax_ratio.set_ylabel("speed-up of ours over reference")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


if __name__ == "__main__":
  import benchmarks  # pylint: disable=g-import-not-at-top
  raise SystemExit(benchmarks.main(sys.modules[__name__]))
