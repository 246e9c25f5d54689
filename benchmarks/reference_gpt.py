"""The references `aigc-jax bench train` times our GPT step against.

* `reference_step`: the plain way to write the same recipe in Flax (separate q/k/v `nn.Dense`,
  einsum attention, an `optax` clip + adamw chain), so a row says what the zoo's model and step
  buy over it.
* `TorchRun` (`--torch-python PATH`, a Python that has torch; torch is not our dependency):
  nanoGPT's model and training iteration (`benchmarks/reference_nanogpt_char.py --serve`) in a
  subprocess fed the same batches. Its positions are nanoGPT's learned table whatever the config
  says (the row records it), and only nanoGPT's shape options exist there: fp32, tied
  embeddings, no biases, MLP ratio 4.
"""

import json
import os
import subprocess
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aigc_jax.errors import UserError
from aigc_jax.nn.layers import rotary_embedding
from aigc_jax.train.optim import decay_mask, learning_rate_schedule

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


# --- timing --------------------------------------------------------------------------------------------------

def time_steps(step, state, batches, steps):
  """Runs `steps` steps (cycling through `batches`); returns (state, ms per step)."""
  start = time.perf_counter()
  out = None
  for i in range(steps):
    state, out = step(state, batches[i % len(batches)])
  jax.block_until_ready((state, out))
  return state, (time.perf_counter() - start) / steps * 1000


def check_torch_shape(config) -> None:
  """A UserError naming what nanoGPT's model lacks, for a config it cannot run (fp32, tied, no bias, MLP 4x)."""
  m = config.model
  unsupported = [f"model.{key}={getattr(m, key)!r}" for key, ok in [
      ("mlp_ratio", m.mlp_ratio == 4), ("tie_embeddings", m.tie_embeddings), ("use_bias", not m.use_bias),
      ("dtype", m.dtype == "float32")] if not ok]
  if unsupported:
    raise UserError(f"--torch-python times nanoGPT's model, which has no {', '.join(unsupported)}; "
                    "benchmark a shape without them or leave --torch-python out.")


class TorchRun:
  """The PyTorch reference's step on the CPU, timed in a subprocess (`reference_nanogpt_char.py --serve`)."""

  compile_s: float | None = None  # start-up and the first step, where the caller measures it

  def __init__(self, python, config, vocab_size, batches):
    check_torch_shape(config)
    m = config.model
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
      raise UserError(f"--torch-python {python}: {e.strerror}; give the path of a Python that has torch.") from None
    self.info = self._read()

  def _read(self):
    line = self._proc.stdout.readline()
    if not line:
      raise UserError("The PyTorch reference stopped (its error is above); check that --torch-python has torch "
                      "and numpy installed.")
    return json.loads(line)

  def params(self) -> int | None:
    return self.info.get("params")

  def time(self, steps):
    self._proc.stdin.write(f"{steps}\n")
    self._proc.stdin.flush()
    return self._read()["ms_per_step"]

  def close(self):
    self._proc.stdin.close()
    self._proc.wait()
    self._dir.cleanup()
