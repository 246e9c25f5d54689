"""Diffusion UNet throughput: forward and training step in images/s and TFLOP/s, the DDIM sampler in steps/s.

  aigc-jax bench denoise [--quick] [--out PATH] [--shapes ddpm_mnist,ddpm_cifar10] [--dtype bfloat16]

Shapes are the shipped diffusion configs' UNets: `ddpm_mnist` (configs/ddpm_mnist.py,
28x28x1, class-conditional) and `ddpm_cifar10` (configs/ddpm_cifar10.py, the 35.7M-parameter
UNet of Ho et al. at 32x32x3). FLOPs are XLA's own count for the compiled computation
(`cost_analysis()`, a multiply-add is 2 FLOPs); the sampler is counted as its steps times
the forward's FLOPs per image (XLA counts a loop body once). Both rows of a measurement count
the reference's FLOPs (the work, counted once; `xla_flops` is each program's own count).

The reference, timed alternately in the same process, is the same UNet written plainly:
stock `flax.linen.Conv` layers (XLA's own convolution gradients) and einsum-softmax attention
(`xla`), with the same parameters and inputs. Ours differs from it in what `aigc_jax.nn`
chooses for the backend: the convolutions' kernel gradient on a CPU (`aigc_jax.nn.conv`) and
the attention implementation `auto` picks (cuDNN on a GPU in bf16 where the head dim allows).
Where ours compiles to the very same program as the reference (the forward and sampler on a
CPU, whose attention `auto` leaves to `xla`), the row says so (`same_program`, `=` in the
table): its ratio is timing noise, not a speed-up. Each implementation
gets at least `--reps` timed repetitions (default 5), more until they last `--min-time`
seconds (default 0.5); `ms` is their median, and the table marks with `~` a ratio whose
interquartile range holds 1 (within the timing noise). `--quick` is the
CPU grid (small batches); the default grid is meant for a GPU. Writes JSON (rewritten after
every shape; `meta.complete` is false until the last, and `--resume` runs only the shapes
missing) and a PNG bar chart next to it.
"""

import argparse
import contextlib
import hashlib
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aigc_jax import config as config_lib
from aigc_jax import diffusion
from aigc_jax.errors import UserError
from aigc_jax.models.unet import UNet
from aigc_jax.nn import image as image_lib
from aigc_jax.tasks.diffusion import unet_config
from aigc_jax.train.loop import jit_init
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import make_train_step
from benchmarks import (Report, add_resume_argument, add_timing_arguments, default_out, environment, error_tolerance,
                        ratio_range, relative_error, time_alternately, warm_up, within_noise, xla_flops)
from benchmarks.peak import default_dtype, peak_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # name -> (config file, config overrides, image size, channels, classes)
    "ddpm_mnist": ("ddpm_mnist.py", [], 28, 1, 10),
    "ddpm_cifar10": ("ddpm_cifar10.py", [], 32, 3, 10),
    "tiny": ("ddpm_mnist.py", ["model.base_features=8", "model.channel_mults=(1,)",  # for the tests only
                               "model.attention_resolutions=(8,)", "model.num_heads=2", "model.norm_groups=4"],
             8, 1, 10),
}
# (forward batch, train batch, sampler batch, sampler steps) per shape
QUICK = {"ddpm_mnist": (64, 32, 16, 10), "ddpm_cifar10": (4, 2, 2, 2), "tiny": (2, 2, 2, 2)}
FULL = {"ddpm_mnist": (256, 128, 256, 50), "ddpm_cifar10": (128, 128, 128, 50), "tiny": (2, 2, 2, 2)}
DEFAULT_SHAPES = ("ddpm_mnist", "ddpm_cifar10")
REFERENCE = "plain_flax"
IMPLEMENTATIONS = ("ours", REFERENCE)


def add_arguments(parser: argparse.ArgumentParser):
  parser.add_argument("--quick", action="store_true", help="small batches: the CPU grid, a few minutes on 2 cores")
  parser.add_argument("--out", default=None,
                      help="JSON path (default benchmarks/results/denoise_<backend>[_quick].json)")
  parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                      help=f"comma-separated, from {', '.join(SHAPES)} ('tiny' is for tests)")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="compute dtype; default bfloat16 on a GPU or TPU, float32 elsewhere")
  add_timing_arguments(parser, "implementation and measurement")
  add_resume_argument(parser)


@contextlib.contextmanager
def stock_flax_conv():
  """Builds the UNet's convolutions from `flax.linen.Conv` (same parameters) while active."""
  ours = image_lib.Conv

  def stock(features, kernel_size, strides=(1, 1), **kw):
    return nn.Conv(features, kernel_size, strides=strides, padding="SAME", **kw)

  image_lib.Conv = stock
  try:
    yield
  finally:
    image_lib.Conv = ours


def build(name, config_file, overrides, size, channels, classes, dtype, batches, implementation, params=None):
  """Compiled (forward, train step, sampler) for one shape, with their inputs, and the parameters.

  `params` from an earlier call for the same shape are reused (the implementations share them).
  """
  config = config_lib.load_config(os.path.join(ROOT, "configs", config_file), overrides)
  ucfg = unet_config(config.model, size, channels, classes)
  plain = implementation == REFERENCE
  ucfg = type(ucfg)(**{**ucfg.__dict__, "dtype": dtype, **({"attention": "xla"} if plain else {})})
  model = UNet(ucfg)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)
  fwd_b, train_b, sample_b, sample_steps = batches
  rng = np.random.default_rng(0)
  labels = lambda b: jnp.asarray(rng.integers(0, classes, b), jnp.int32) if ucfg.num_classes else None
  x = lambda b: jnp.asarray(rng.uniform(-1, 1, (b, size, size, channels)), jnp.float32)
  if params is None:  # drawn from no `rng`, so that every implementation gets the same inputs below
    init = jit_init(lambda key, x_, t, y: model.init(key, x_, t, y, train=False)["params"], jax.default_backend())
    params = init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32),
                  jnp.zeros((1,), jnp.int32) if ucfg.num_classes else None)
    # Noise on every parameter: the output conv starts at zero, which makes every output the same whatever the
    # layers before compute, and would let the check against the reference pass vacuously. Timing is unchanged.
    keys = iter(jax.random.split(jax.random.PRNGKey(4), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype), params)
  tx = optax.adam(1e-4)

  def loss_fn(p, batch, step_rng, train):
    apply = lambda p_, x_t, t, y, r: model.apply({"params": p_}, x_t, t, y, train=train, rngs={"dropout": r})
    s, n = diffusion.diffusion_loss(apply, p, schedule, batch["images"], batch.get("labels"), step_rng,
                                    cond_drop_prob=0.1 if ucfg.num_classes else 0.0, num_classes=ucfg.num_classes)
    return s, n, {}

  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1), ema_params=params)
  train_batch = {"images": x(train_b)}
  if ucfg.num_classes:
    train_batch["labels"] = labels(train_b)
  fwd_args = (params, x(fwd_b), jnp.asarray(rng.integers(0, schedule.num_steps, fwd_b)), labels(fwd_b))
  sample_labels = labels(sample_b)

  def forward(p, x_, t, y):
    return model.apply({"params": p}, x_, t, y, train=False)

  def sample(p, key, y):
    apply = lambda x_, t, y_: model.apply({"params": p}, x_, t, y_, train=False)
    return diffusion.ddim_sample(apply, schedule, key, (sample_b, size, size, channels), num_steps=sample_steps,
                                 labels=y, num_classes=ucfg.num_classes, guidance=1.0)

  ctx = stock_flax_conv() if plain else contextlib.nullcontext()
  with ctx:
    compiled = {
        "forward": (jax.jit(forward).lower(*fwd_args).compile(), fwd_args, fwd_b),
        "train_step": (jax.jit(make_train_step(loss_fn, tx, ema_decay=0.999)).lower(state, train_batch).compile(),
                       (state, train_batch), train_b),
        "sampler": (jax.jit(sample).lower(params, jax.random.PRNGKey(2), sample_labels).compile(),
                    (params, jax.random.PRNGKey(2), sample_labels), sample_b),
    }
    # Not timed: what the train step's correctness is checked on. Its new state is no good for that: Adam's first
    # update is about lr * sign(gradient), so gradients of ~1e-9 that differ in sign flip whole entries of it.
    loss = lambda p, batch, key: loss_fn(p, batch, key, True)[0] / batch["images"].shape[0]
    grad_args = (params, train_batch, jax.random.PRNGKey(3))
    compiled["gradients"] = (jax.jit(jax.value_and_grad(loss)).lower(*grad_args).compile(), grad_args, train_b)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return compiled, n_params, sample_steps, params


def counted_flops(built, what: str) -> float | None:
  """XLA's FLOP count of one implementation's compiled `what`; the sampler's is its steps x the forward's per
  image (XLA counts a loop body once)."""
  compiled, _, sample_steps, _ = built
  fn, _, batch = compiled[what]
  if what != "sampler":
    return xla_flops(fn)
  forward, _, forward_batch = compiled["forward"]
  forward_flops = xla_flops(forward)
  return forward_flops and forward_flops / forward_batch * batch * sample_steps


def program_fingerprint(compiled) -> str:
  """A hash of the optimized HLO of a compiled function without what does not change the computation: the
  source locations, op metadata and instruction names. Equal for two implementations that compile alike."""
  text = compiled.as_text()
  text = re.sub(r"\nFileNames\n.*?\n(?=%|ENTRY)", "\n", text, flags=re.S)  # the debug-info tables
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  names = {}
  text = re.sub(r"%?\b[A-Za-z_][\w\-]*\.\d+\b", lambda m: names.setdefault(m.group(), f"v{len(names)}"), text)
  return hashlib.sha1(text.encode()).hexdigest()


def run(args) -> int:
  backend = jax.default_backend()
  dtype = default_dtype(args.dtype)
  shapes = args.shapes.split(",")
  for name in shapes:
    if name not in SHAPES:
      raise UserError(f"Unknown denoise shape {name!r}; use some of {', '.join(SHAPES)}.")
  if backend == "cpu" and not args.quick and set(shapes) - {"tiny"}:
    raise UserError("The full denoise grid is sized for a GPU (batches of 128-256: minutes per call on a CPU); "
                    "pass --quick.")
  peak, peak_note = peak_flops(dtype)
  tolerance = error_tolerance(dtype)
  grid = QUICK if args.quick else FULL
  out_path = args.out or default_out("denoise", backend, args.quick)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}); peak: {peak_note}; dtype {dtype.name}; {args.warmup} warm-up + "
        f"at least {args.reps} timed reps and {args.min_time:g} s per implementation and measurement; ms is the "
        f"median; ~ marks a ratio within the noise, = one of the same compiled program as the reference's")
  print(f"{'shape':>13s} {'what':>10s} {'implementation':>16s} {'batch':>5s} {'ms':>9s} {'images/s':>9s} "
        f"{'steps/s':>8s} {'TFLOP/s':>8s} {'% peak':>7s} {'vs ref':>7s}")
  meta = dict(suite="denoise", **environment(), peak_flops=peak, peak_note=peak_note, dtype=dtype.name,
              quick=args.quick, reps=args.reps, min_time_s=args.min_time, warmup=args.warmup,
              reference=f"{REFERENCE}: the same UNet from flax.linen.Conv, with einsum-softmax (xla) attention",
              same_program="ours compiles to the reference's very program (optimized HLO without names and source "
              "locations): the ratio is noise",
              ms="median over reps of ms per call (calls_per_rep calls a rep)",
              ratio_range="[reference q25 / q75, reference q75 / q25] over the reps",
              error_vs_reference="largest |x - reference| / largest |reference| over each output array (the forward's "
              "output; for the train step, the loss and its gradient on the same batch; the sampler's images), on "
              "the same inputs", error_tolerance=tolerance,
              flops="the reference's XLA cost_analysis of its compiled forward and step, for both rows; sampler: "
                    "forward FLOPs per image x batch x steps; xla_flops: each program's own count",
              sampler="DDIM, guidance 1 (one UNet call per step)",
              batches={k: dict(zip(("forward", "train_step", "sampler", "sampler_steps"), grid[k])) for k in shapes})
  report = Report(out_path, meta, plot, cell=("shape",),
                  same=("dtype", "quick", "reps", "min_time_s", "warmup", "batches"), lists=("wrong",),
                  resume=args.resume)
  for name in shapes:
    if report.done(shape=name):
      for row in report.kept(shape=name):  # the whole table
        print_row(row)
      continue
    rows, wrong = [], []
    config_file, overrides, size, channels, classes = SHAPES[name]
    built, params = {}, None
    for impl in IMPLEMENTATIONS:
      built[impl] = build(name, config_file, overrides, size, channels, classes, dtype, grid[name], impl, params)
      params = built[impl][3]
    for what in ("forward", "train_step", "sampler"):
      outputs, timed = {}, {}
      for impl in IMPLEMENTATIONS:  # the first call (it also allocates), kept to check, then the warm-up
        fn, fn_args, _ = built[impl][0][what]
        outputs[impl] = jax.block_until_ready(fn(*fn_args))
        if what == "train_step":  # checked on the loss and its gradients
          check, check_args, _ = built[impl][0]["gradients"]
          outputs[impl] = check(*check_args)
        timed[impl] = (fn, fn_args, *warm_up(fn, fn_args, args.warmup, args.reps, args.min_time))
      times = time_alternately(timed)  # ms per call
      ref_s = float(np.median(times[REFERENCE])) / 1000
      flops = counted_flops(built[REFERENCE], what)
      for impl in IMPLEMENTATIONS:
        compiled, n_params, sample_steps, _ = built[impl]
        fn, _, batch = compiled[what]
        seconds = float(np.median(times[impl])) / 1000
        tflops = flops / seconds / 1e12 if flops else None
        row = dict(shape=name, what=what, implementation=impl, batch=batch, params=n_params, ms=1000 * seconds,
                   images_per_sec=batch / seconds, steps_per_sec=sample_steps / seconds if what == "sampler" else None,
                   sampler_steps=sample_steps if what == "sampler" else None, flops=flops,
                   xla_flops=counted_flops(built[impl], what), tflops=tflops,
                   peak_fraction=tflops * 1e12 / peak if tflops and peak else None, ratio_to_reference=ref_s / seconds,
                   ratio_range=ratio_range(times[REFERENCE], times[impl]),
                   same_program=(None if impl == REFERENCE
                                 else program_fingerprint(fn) == program_fingerprint(built[REFERENCE][0][what][0])),
                   error_vs_reference=relative_error(outputs[impl], outputs[REFERENCE]),
                   calls_per_rep=timed[impl][2], reps=len(times[impl]), all_ms=times[impl])
        if not row["error_vs_reference"] <= tolerance:
          wrong.append(row)
        rows.append(row)
        print_row(row)
    report.add(rows, wrong=wrong)
  for row in report.meta["wrong"]:
    print(f"WRONG: {row['shape']} {row['what']} {row['implementation']}: differs from {REFERENCE} by "
          f"{row['error_vs_reference']:.2g} of its largest entry (tolerance {tolerance:g} in {dtype.name})")
  report.finish()
  return 0


def print_row(row: dict) -> None:
  """One line of the table (the header is in `run`); `~` marks a ratio within the timing noise."""
  fmt = lambda v, f: format(v, f) if v is not None else "-"
  print(f"{row['shape']:>13s} {row['what']:>10s} {row['implementation']:>16s} {row['batch']:5d} {row['ms']:9.1f} "
        f"{row['images_per_sec']:9.1f} {fmt(row['steps_per_sec'], '8.2f'):>8s} {fmt(row['tflops'], '8.4f'):>8s} "
        f"{fmt(row['peak_fraction'] and 100 * row['peak_fraction'], '6.1f'):>7s} "
        f"{'=' if row.get('same_program') else '~' if within_noise(row) else ' '}{row['ratio_to_reference']:6.2f}",
        flush=True)


def plot(rows, title):
  """Images/s per implementation, one panel per (shape, measurement), the reference ratio on each bar."""
  from aigc_jax.plots import plt  # pylint: disable=g-import-not-at-top

  panels = list(dict.fromkeys((r["shape"], r["what"]) for r in rows))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
  for ax, (shape, what) in zip(axes.flat, panels):
    cell = [r for r in rows if (r["shape"], r["what"]) == (shape, what)]
    bars = ax.bar([r["implementation"] for r in cell], [r["images_per_sec"] for r in cell], color=["C0", "C1"])
    for bar, r in zip(bars, cell):
      label = f"{'same program ' if r.get('same_program') else ''}{r['ratio_to_reference']:.2f}x"
      ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_title(f"{shape} {what} (batch {cell[0]['batch']})", fontsize=9)
    ax.set_ylabel("images/s")
    ax.tick_params(axis="x", labelsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


if __name__ == "__main__":
  import benchmarks  # pylint: disable=g-import-not-at-top
  raise SystemExit(benchmarks.main(sys.modules[__name__]))
