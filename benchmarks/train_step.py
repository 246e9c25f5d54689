"""Times one training step of a GPT config, ours against a straightforward Flax step.

  python benchmarks/train_step.py [--config configs/gpt_shakespeare_char_cpu.py] [--steps 50] [--reps 7]

Both steps run in the same process on the same batches, jitted with the state
donated, and their timed repetitions alternate so machine noise hits both alike.
Each repetition times `--steps` steps and ends in `block_until_ready`; compilation
and a few warm-up steps come first and are not timed. The reference is the plain way
to write this recipe in Flax (separate q/k/v `nn.Dense`, einsum attention, `optax`
clip + adamw chain), so the table says what the zoo's model and step buy.

With `--torch-python PATH` (a Python that has torch; torch is not our dependency) a third
row times the PyTorch reference, nanoGPT's model and training iteration
(`benchmarks/reference_nanogpt_char.py`), in a subprocess fed the same batches, its
repetitions alternating with ours. Its positions are nanoGPT's learned table whatever the
config says (the row records it), and only nanoGPT's shape options exist there: fp32, tied
embeddings, no biases, MLP ratio 4.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aigc_jax import config as config_lib  # noqa: E402
from aigc_jax.nn.layers import rotary_embedding  # noqa: E402
from aigc_jax.tasks import make_task  # noqa: E402
from aigc_jax.train.optim import decay_mask, learning_rate_schedule, make_optimizer  # noqa: E402
from aigc_jax.train.state import TrainState  # noqa: E402
from aigc_jax.train.steps import make_train_step  # noqa: E402
from benchmarks import environment  # noqa: E402
from benchmarks.peak import peak_flops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the reference: GPT written the straightforward Flax way ------------------------------------------------

class RefBlock(nn.Module):
  heads: int
  dim: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32  # compute dtype, as Flax layers take it; parameters stay fp32
  rope: bool = False

  @nn.compact
  def __call__(self, x):  # [B, T, C]
    b, t, c = x.shape
    d = c // self.heads
    init = nn.initializers.normal(0.02)
    dense = lambda features: nn.Dense(features, use_bias=False, kernel_init=init, dtype=self.dtype)
    y = nn.LayerNorm(use_bias=False, dtype=self.dtype)(x)
    q, k, v = (dense(c)(y).reshape(b, t, self.heads, d) for _ in range(3))
    if self.rope:
      q, k = rotary_embedding(q, jnp.arange(t)), rotary_embedding(k, jnp.arange(t))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)  # [B, H, T, T]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e30)
    att = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, c)
    x = x + dense(c)(att)
    y = nn.LayerNorm(use_bias=False, dtype=self.dtype)(x)
    y = dense(c)(nn.gelu(dense(self.mlp_dim)(y)))
    return x + y


class RefGPT(nn.Module):
  vocab: int
  max_len: int
  layers: int
  heads: int
  dim: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  rope: bool = False  # rotary positions on q and k instead of the learned table

  @nn.compact
  def __call__(self, tokens):  # [B, T] -> [B, T, vocab] (fp32)
    embed = nn.Embed(self.vocab, self.dim, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype)
    x = embed(tokens)
    if not self.rope:
      x = x + self.param("position", nn.initializers.normal(0.02), (self.max_len, self.dim))[: tokens.shape[1]].astype(
          self.dtype)
    for _ in range(self.layers):
      x = RefBlock(self.heads, self.dim, self.mlp_dim, self.dtype, self.rope)(x)
    return embed.attend(nn.LayerNorm(use_bias=False, dtype=self.dtype)(x)).astype(jnp.float32)


def reference_step(config, vocab_size):
  """(init(rng) -> state, step(state, batch) -> (state, loss)) for the straightforward Flax GPT.

  The shape comes from the config (`model.num_layers/num_heads/emb_dim/mlp_ratio/dtype/position_encoding`,
  `data.seq_len` as the context); `model.dropout_rate` and `model.attention` are not used.
  """
  m, o = config.model, config.optim
  model = RefGPT(vocab_size, config.data.seq_len, m.num_layers, m.num_heads, m.emb_dim, m.mlp_ratio * m.emb_dim,
                 jnp.dtype(m.dtype), m.position_encoding == "rope")
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                   optax.adamw(learning_rate_schedule(o, config.num_train_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                               weight_decay=o.weight_decay, mask=decay_mask))

  def init(rng):
    params = model.init(rng, jnp.zeros((1, config.data.seq_len), jnp.int32))["params"]
    return params, tx.init(params)

  def step(state, batch):
    params, opt_state = state

    def loss_fn(p):
      logits = model.apply({"params": p}, batch["inputs"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return init, step


# --- the machine and the model's arithmetic ------------------------------------------------------------------

def matmul_params(params, tie_embeddings: bool) -> int:
  """N of the FLOPs formula: all parameters but the token and position tables, plus the tied head."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  token = params["embed"]["token"]["embedding"]
  tables = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["embed"]))  # token (and position) table
  return total - tables + (int(np.prod(token.shape)) if tie_embeddings else 0)


def step_flops(config, params) -> float:
  """Model FLOPs of one training step (forward + backward), nanoGPT's count.

  flops = 6 * N * tokens + 12 * L * T * C * tokens, where N counts the matmul weights
  (`matmul_params`: every parameter except the token and position tables, plus vocab * C
  for a tied output head, the token table used as a matmul), tokens = B * T, and
  the second term is QK^T and PV over all T keys (forward 4 * T * C per token per
  layer, backward twice that). Causal masking is not subtracted.
  """
  m = config.model
  b, t, c = config.batch_size, config.data.seq_len, m.emb_dim
  n = matmul_params(params, m.tie_embeddings)
  tokens = b * t
  return 6 * n * tokens + 12 * m.num_layers * t * c * tokens


# --- timing --------------------------------------------------------------------------------------------------

def time_steps(step, state, batches, steps):
  """Runs `steps` steps (cycling through `batches`); returns (state, ms per step)."""
  start = time.perf_counter()
  out = None
  for i in range(steps):
    state, out = step(state, batches[i % len(batches)])
  jax.block_until_ready((state, out))
  return state, (time.perf_counter() - start) / steps * 1000


class JaxRun:
  """A jitted step and its state, timed `steps` at a time."""

  def __init__(self, step, state, batches):
    self.step, self.state, self.batches = step, state, batches

  def time(self, steps):
    self.state, ms = time_steps(self.step, self.state, self.batches, steps)
    return ms

  def close(self):
    pass


class TorchRun:
  """The PyTorch reference's step, timed in a subprocess (`reference_nanogpt_char.py --serve`)."""

  def __init__(self, python, config, vocab_size, batches):
    m = config.model
    unsupported = [f"model.{key}={getattr(m, key)!r}" for key, ok in [
        ("mlp_ratio", m.mlp_ratio == 4), ("tie_embeddings", m.tie_embeddings), ("use_bias", not m.use_bias),
        ("dtype", m.dtype == "float32")] if not ok]
    if unsupported:
      raise SystemExit(f"--torch-python times nanoGPT's model, which has no {', '.join(unsupported)}; "
                       "benchmark a config without them or leave --torch-python out.")
    self._dir = tempfile.TemporaryDirectory()
    path = os.path.join(self._dir.name, "batches.npz")
    np.savez(path, **{key: np.stack([np.asarray(b[key]) for b in batches]) for key in ("inputs", "targets")})
    script = os.path.join(ROOT, "benchmarks", "reference_nanogpt_char.py")
    shape = [str(v) for v in (m.num_layers, m.num_heads, m.emb_dim, vocab_size)]
    try:
      self._proc = subprocess.Popen([python, script, "--serve", path, "--shape", *shape], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
    except OSError as e:
      self._dir.cleanup()
      raise SystemExit(f"--torch-python {python}: {e.strerror}; give the path of a Python that has torch.") from e
    self.info = self._read()

  def _read(self):
    line = self._proc.stdout.readline()
    if not line:
      raise SystemExit("The PyTorch reference stopped (its error is above); check that --torch-python has torch "
                       "and numpy installed.")
    return json.loads(line)

  def time(self, steps):
    self._proc.stdin.write(f"{steps}\n")
    self._proc.stdin.flush()
    return self._read()["ms_per_step"]

  def close(self):
    self._proc.stdin.close()
    self._proc.wait()
    self._dir.cleanup()


def summarize(ms, tokens, flops, peak):
  ms = np.asarray(ms)
  med = float(np.median(ms))
  return {"ms_per_step_median": med, "ms_per_step_min": float(ms.min()), "ms_per_step_max": float(ms.max()),
          "ms_per_step_iqr": float(np.percentile(ms, 75) - np.percentile(ms, 25)), "ms_per_step_all": ms.tolist(),
          "tokens_per_s": tokens / med * 1000, "gflops_per_s": flops / med / 1e6,
          "fraction_of_peak": flops / med / 1e6 / peak if peak else None}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "gpt_shakespeare_char_cpu.py"))
  parser.add_argument("--steps", type=int, default=50, help="steps per timed repetition")
  parser.add_argument("--reps", type=int, default=7, help="timed repetitions of each step")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_step_cpu.json"))
  parser.add_argument("--config-override", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--torch-python", metavar="PATH",
                      help="a Python with torch: add the PyTorch reference's step, timed side by side")
  args = parser.parse_args()

  config = config_lib.load_config(args.config, args.config_override)
  task = make_task(config)
  batches = [jax.device_put(task.train_batch(i)) for i in range(min(args.steps, 50))]
  tokens = config.batch_size * config.data.seq_len

  # Ours: the zoo's model, loss, optimizer and step, as the training loop builds them.
  tx = make_optimizer(config.optim, config.num_train_steps)
  schedule = learning_rate_schedule(config.optim, config.num_train_steps)

  def ours_init(rng):
    init_rng, step_rng = jax.random.split(rng)
    params = task.init_params(init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=step_rng)

  ref_init, ref_step = reference_step(config, task.vocab.size)
  rng = jax.random.PRNGKey(config.seed)
  runs = {
      "ours": JaxRun(jax.jit(make_train_step(task.loss, tx, schedule=schedule), donate_argnums=0),
                     jax.jit(ours_init)(rng), batches),
      "reference": JaxRun(jax.jit(ref_step, donate_argnums=0), jax.jit(ref_init)(rng), batches),
  }
  if args.torch_python:
    runs["pytorch"] = TorchRun(args.torch_python, config, task.vocab.size, batches)
  flops = step_flops(config, runs["ours"].state.params)
  peak, peak_note = peak_flops(config.model.dtype)
  peak = peak and peak / 1e9  # GFLOP/s, as the results

  first_step_s = {}
  for name, run in runs.items():  # compile, then warm up
    start = time.perf_counter()
    run.time(1)
    first_step_s[name] = time.perf_counter() - start
    run.time(args.warmup)
  times = {name: [] for name in runs}
  for _ in range(args.reps):  # alternate, so slow phases of a noisy machine hit all alike
    for name, run in runs.items():
      times[name].append(run.time(args.steps))
  for run in runs.values():
    run.close()

  results = {name: dict(summarize(times[name], tokens, flops, peak), compile_and_first_step_s=first_step_s[name])
             for name in runs}
  if "pytorch" in runs:
    results["pytorch"].update(runs["pytorch"].info, position_encoding="learned",
                              script="benchmarks/reference_nanogpt_char.py")
  ratio = results["reference"]["ms_per_step_median"] / results["ours"]["ms_per_step_median"]
  report = {
      "config": os.path.relpath(os.path.abspath(args.config), ROOT), "overrides": args.config_override,
      "batch_size": config.batch_size, "seq_len": config.data.seq_len, "tokens_per_step": tokens,
      "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(runs["ours"].state.params)),
      "model_gflop_per_step": flops / 1e9, "steps_per_rep": args.steps, "reps": args.reps,
      **environment(), "peak_gflops": peak, "peak_note": peak_note,
      "results": results, "speedup_vs_reference": ratio,
  }

  print(f"{report['config']}: batch {config.batch_size} x {config.data.seq_len} tokens, "
        f"{report['params'] / 1e6:.2f}M params, {flops / 1e9:.2f} GFLOP/step")
  print(f"device: {jax.devices()[0].device_kind}; peak: {peak_note}")
  print(f"{args.reps} reps x {args.steps} steps each, after {args.warmup} warm-up steps\n")
  header = f"{'':10s} {'ms/step med':>11s} {'min':>7s} {'max':>7s} {'IQR':>6s} {'tokens/s':>9s} {'GFLOP/s':>8s} " \
           f"{'% peak':>7s} {'compile s':>9s}"
  print(header)
  for name, r in results.items():
    frac = f"{100 * r['fraction_of_peak']:6.1f}%" if r["fraction_of_peak"] is not None else f"{'-':>7s}"
    print(f"{name:10s} {r['ms_per_step_median']:11.1f} {r['ms_per_step_min']:7.1f} {r['ms_per_step_max']:7.1f} "
          f"{r['ms_per_step_iqr']:6.1f} {r['tokens_per_s']:9.0f} {r['gflops_per_s']:8.1f} {frac} "
          f"{r['compile_and_first_step_s']:9.1f}")
  print(f"\nreference / ours (median ms/step): {ratio:.2f}x")
  if "pytorch" in results:
    report["pytorch_vs_ours"] = results["pytorch"]["ms_per_step_median"] / results["ours"]["ms_per_step_median"]
    print(f"pytorch / ours (median ms/step): {report['pytorch_vs_ours']:.2f}x "
          f"(torch {results['pytorch']['torch']}, {results['pytorch']['threads']} threads, learned positions)")

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
