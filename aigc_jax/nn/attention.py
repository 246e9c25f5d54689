"""Scaled dot-product attention behind one function with an `implementation` switch.

Shapes follow `jax.nn.dot_product_attention`: q is [B, T, H, D], k and v are
[B, S, K, D] with H a multiple of K (grouped-query heads). Implementations:
  * `xla`: the einsum-softmax reference, any backend; scores and softmax in fp32.
  * `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only.
  * `auto`: `cudnn` on a GPU for fp16/bf16 inputs it supports, otherwise `xla`.
"""

import functools
import logging

import jax
import jax.numpy as jnp

from aigc_jax.errors import UserError

IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
  """Turns `auto` into a concrete implementation; checks the others can run here."""
  if implementation not in IMPLEMENTATIONS:
    raise UserError(f"Unknown attention implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}.")
  on_gpu = jax.default_backend() == "gpu"
  cudnn_ok = on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0
  if implementation == "auto":
    chosen = "cudnn" if cudnn_ok else "xla"
    _log_choice(chosen, jax.default_backend(), jnp.dtype(dtype).name, head_dim)
    return chosen
  if implementation == "cudnn" and not cudnn_ok:
    raise UserError(
        f"Attention implementation 'cudnn' needs a GPU and fp16/bf16 with head_dim <= 128 (have "
        f"{jax.default_backend()}, {jnp.dtype(dtype).name}, head_dim {head_dim}); use 'xla' or 'auto'.")
  return implementation


@functools.lru_cache(maxsize=None)
def _log_choice(chosen, backend, dtype, head_dim):
  logging.info("attention implementation 'auto' chose %r (backend %s, %s, head_dim %d)", chosen, backend, dtype, head_dim)


def dot_product_attention(q, k, v, *, causal: bool = False, mask=None, implementation: str = "xla"):
  """Attention of q [B, T, H, D] over k, v [B, S, K, D]; `mask` is boolean, broadcastable to [B, H, T, S]."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
    raise ValueError(f"attention wants q [B, T, H, D] and k, v [B, S, K, D]; got {q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
  implementation = resolve_implementation(implementation, q.dtype, q.shape[-1])
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  return _xla_attention(q, k, v, causal=causal, mask=mask)


def _xla_attention(q, k, v, *, causal, mask):
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # group query heads by the kv head they read
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  s = k.shape[1]
  if causal:
    keep = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)  # queries are the last t positions
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, h, t, s)).reshape(b, kv_heads, h // kv_heads, t, s)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)
