"""Scaled dot-product attention behind one function with an `implementation` switch.

Shapes follow `jax.nn.dot_product_attention`: q is [B, T, H, D], k and v are
[B, S, K, D] with H a multiple of K (grouped-query heads). One convention differs: with
`causal` and T != S the T queries are the last T of the S positions (query i sees keys up to
i + S - T, as when decoding against a KV cache), where jax.nn aligns them with the first T.
Scores and softmax are computed in fp32 for fp32, bf16 and fp16 inputs, in float64 for
float64 ones (`jax_enable_x64`, say for gradient checks; `flash` refuses them).
Implementations:
  * `xla`: the einsum-softmax reference, any backend. Holds the [T, S] score matrix per
    batch-head (twice, with gradients).
  * `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only.
  * `chunked`: FlashAttention's blockwise online softmax in pure JAX
    (`aigc_jax.nn.chunked_attention`), any backend, any mask; O(T + S) memory.
  * `flash`: Pallas kernels, key padding masks only. On a TPU, JAX's splash-attention
    Mosaic kernels (`aigc_jax.nn.flash_attention_tpu`); elsewhere Triton kernels
    (`aigc_jax.nn.flash_attention`), compiled on a GPU and run in interpret mode (slow,
    for checking numerics) on a CPU. On a Hopper GPU the forward is FlashAttention-3's
    Mosaic GPU kernel (`aigc_jax.nn.flash_attention_hopper`) for every bf16/fp16 call (causal
    over a cache, masks and segment ids included; head dims below 64 zero-padded), and the
    backward after it Mosaic GPU kernels too up to head_dim 128.
  * `auto`: on a GPU, `cudnn` for fp16/bf16 with head_dim <= 128 (256 from Hopper on; even
    lengths where a mask, segment ids or causal with T != S reach cuDNN as a bias);
    otherwise (any backend) `chunked` once the score matrix reaches `CHUNKED_MIN_SCORES`
    entries (T * S), else `xla`.
    `flash` is opt-in until it has been timed on a GPU and a TPU (so far both kernel
    families have been checked in interpret mode and cross-lowered, never run on the hardware).
Every implementation gives zeros for a query row that can see no key (all its keys masked, outside its
segment, or after it), and no gradient through it: the same model's outputs do not change when `auto` moves
from `xla` to `chunked` with the length.

Data parallelism: under a mesh set with `jax.set_mesh` (the training loop sets its own)
whose `data` axis splits the batch, or on inputs placed on such a mesh with Explicit axes
(their type names the mesh; no context mesh needed), `flash` runs its kernels on each
device's slice of the batch inside `jax.shard_map`, as MaxText does with splash attention. A Pallas kernel
is one opaque custom call to XLA, whose partitioner has no rule for splitting it; the
other implementations are ordinary XLA ops that it partitions by itself.
"""

import functools
import importlib
import logging

import jax
import jax.numpy as jnp

from aigc_jax.errors import UserError
from aigc_jax.nn import chunked_attention as chunked_lib
from aigc_jax.nn import gpus
from aigc_jax.nn import segments as segments_lib
from aigc_jax.nn.autodiff import custom_gradients

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "flash", "auto")
BATCH_AXIS = "data"  # the mesh axis that splits the batch (aigc_jax.train.parallel's data mesh)
# Off GPU, `auto` switches from `xla` to `chunked` at T * S >= 1024 * 1024 (a 4 MiB fp32 score
# matrix per batch-head): on the 2-core EPYC chunked was faster from length 1024 up, forward and
# backward, causal or not (1.33x-2.06x), and slower at 512 (0.57x-0.93x; benchmarks/results/attention_cpu_quick.json).
CHUNKED_MIN_SCORES = 1024 * 1024


def resolve_implementation(implementation: str, dtype, head_dim: int, *, q_len: int | None = None,
                           kv_len: int | None = None, mask_shape=None, segments: bool = False,
                           causal: bool = False) -> str:
  """Turns `auto` into a concrete implementation; checks the others can run here.

  The lengths and mask shape are optional: without them `auto` treats the call as short
  and `flash` support is judged on dtype and head_dim alone.
  """
  if implementation not in IMPLEMENTATIONS:
    raise UserError(f"Unknown attention implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}.")
  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  cudnn_head_dim = cudnn_max_head_dim()
  cudnn_ok = (on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= cudnn_head_dim
              and head_dim % 8 == 0)
  q_len, kv_len = q_len or 1, kv_len or 1
  # A mask, segment ids and causal attention with T != S (whose diagonal cuDNN puts elsewhere) reach cuDNN
  # as a bias, and its backward with a bias takes only even lengths (jax's cuDNN check, raised mid-training).
  cudnn_odd = (mask_shape is not None or segments or (causal and q_len != kv_len)) and (q_len % 2 or kv_len % 2)
  if implementation == "cudnn" and cudnn_ok and cudnn_odd:
    raise UserError(f"Attention implementation 'cudnn' takes a mask or segment ids (or causal attention with "
                    f"T != S) only at even lengths, and this call has {q_len} queries and {kv_len} "
                    f"keys; use 'chunked' or 'xla', or pad to an even length.")
  cudnn_ok = cudnn_ok and not cudnn_odd
  if implementation == "auto":
    long = q_len * kv_len >= CHUNKED_MIN_SCORES
    chosen = "cudnn" if cudnn_ok else "chunked" if long else "xla"
    _log_choice(chosen, backend, jnp.dtype(dtype).name, head_dim, "long" if long else "short")
    return chosen
  if implementation == "cudnn" and not cudnn_ok:
    raise UserError(
        f"Attention implementation 'cudnn' needs a GPU and fp16/bf16 with head_dim <= {cudnn_head_dim}, a multiple "
        f"of 8 (have "
        f"{backend}, {jnp.dtype(dtype).name}, head_dim {head_dim}); use 'xla' or 'auto' (or 'chunked' for "
        f"long sequences).")
  if implementation == "flash":
    kernels = flash_kernels()
    why_not = kernels.unsupported_reason((1, q_len, 1, head_dim), (1, kv_len, 1, head_dim), dtype, mask_shape)
    if why_not is not None:
      raise kernels.unsupported_error(why_not)
    if backend not in ("gpu", "tpu"):
      _log_interpreted(backend)
  return implementation


def cudnn_max_head_dim() -> int:
  """cuDNN's fused attention takes head dims up to 256 on Hopper and later GPUs, up to 128 before
  (as `jax.nn.dot_product_attention` checks)."""
  capability = gpus.gpu_compute_capability()
  return 256 if capability and capability >= gpus.HOPPER else 128


def flash_kernels(name: str | None = None):
  """The module of `flash`'s kernels: `name`, or this backend's (`flash_attention_tpu`, JAX's splash kernels, on a
  TPU; `flash_attention`, Triton and Mosaic GPU, elsewhere).

  Imported on first use, not with this module: a JAX whose Pallas API has moved then breaks `flash` alone, in one
  sentence, and every model keeps its other implementations.
  """
  name = name or ("flash_attention_tpu" if jax.default_backend() == "tpu" else "flash_attention")
  try:
    return importlib.import_module(f"aigc_jax.nn.{name}")
  except Exception as e:  # an ImportError, or whatever a moved Pallas API raises at import time
    raise UserError(f"Attention implementation 'flash' could not load its Pallas kernels on jax {jax.__version__} "
                    f"({type(e).__name__}: {e}); use 'chunked' or 'xla', or install a jax that setup.cfg "
                    f"accepts.") from e


@functools.lru_cache(maxsize=None)
def _log_choice(chosen, backend, dtype, head_dim, length_class):
  logging.info("attention implementation 'auto' chose %r (backend %s, %s, head_dim %d, %s sequences)", chosen,
               backend, dtype, head_dim, length_class)


@functools.lru_cache(maxsize=None)
def _log_interpreted(backend):
  logging.warning("attention implementation 'flash' runs its Pallas kernels in interpret mode on %s: correct "
                  "but slow, meant for checking numerics; use 'chunked' for speed off GPU and TPU", backend)


def dot_product_attention(q, k, v, *, causal: bool = False, mask=None, segment_ids=None, implementation: str = "xla"):
  """Attention of q [B, T, H, D] over k, v [B, S, K, D].

  `mask` is boolean (True keeps a key; integer 0/1 masks are taken too), broadcastable to
  [B, H, T, S]. `segment_ids` (packed sequences) is an integer [B, T] array for
  self-attention or a tuple (query ids [B, T], key ids [B, S]): a query sees only keys with
  its id (see `aigc_jax.nn.segments`). Causal, mask and segments combine: a score is kept
  where all of them keep it; with T != S, causal query i sees keys up to i + S - T (the
  queries are the last T positions, unlike jax.nn's). The scale is D ** -0.5: scale q
  beforehand for another.

  Gradients are custom VJPs (the memory-lean backward passes): reverse mode, second order
  included, except `flash`, whose gradient cannot be differentiated again (use `chunked` or
  `xla` for a gradient penalty). Forward mode (`jax.jvp`, `jax.jacfwd`) needs
  `aigc_jax.nn.autodiff.plain_autodiff()`, under which JAX differentiates `xla` itself.
  """
  _check_inputs(q, k, v)
  b, t, h, _ = q.shape
  s = k.shape[1]
  mask = None if mask is None else segments_lib.mask_as_rank4(mask, b, h, t, s)  # [B|1, H|1, T|1, S|1]
  pair = segments_lib.segment_pair(segment_ids, b, t, s)
  if implementation == "auto" and not custom_gradients():
    implementation = "xla"  # the one implementation with plain autodiff (see aigc_jax.nn.autodiff)
  implementation = resolve_implementation(implementation, q.dtype, q.shape[-1], q_len=t, kv_len=s,
                                          mask_shape=None if mask is None else mask.shape,
                                          segments=pair is not None, causal=causal)
  if b == 0 or h == 0:  # no query rows (an empty batch); a Pallas grid cannot be empty
    return jnp.zeros_like(q)
  if implementation == "chunked":
    return chunked_lib.chunked_attention(q, k, v, causal=causal, mask=mask, segment_ids=pair)
  if implementation == "flash":
    return _per_batch_shard(functools.partial(flash_kernels().flash_attention, causal=causal), q, k, v, mask, pair)
  if pair is not None:  # xla and cudnn take the segments as a mask
    seg = segments_lib.segment_mask(pair)
    mask = seg if mask is None else jnp.logical_and(mask, seg)
  if implementation == "cudnn":
    return _cudnn_attention(q, k, v, causal=causal, mask=mask)
  return _xla_attention(q, k, v, causal=causal, mask=mask)


def _check_inputs(q, k, v) -> None:
  """One sentence for inputs the implementations would reject in their own words, or disagree on."""
  shapes = f"q {jnp.shape(q)}, k {jnp.shape(k)}, v {jnp.shape(v)}"
  if (jnp.ndim(q), jnp.ndim(k), jnp.ndim(v)) != (4, 4, 4) or k.shape != v.shape or q.shape[0] != k.shape[0] \
      or q.shape[3] != k.shape[3]:
    raise UserError(f"Attention takes q [B, T, H, D] and k, v [B, S, K, D] (one B and D) and got {shapes}; for one "
                    f"sequence add the batch axis (x[None]), for one head the head axis (x[:, :, None]).")
  if k.shape[2] == 0 or q.shape[3] == 0 or q.shape[2] % k.shape[2]:
    raise UserError(f"Attention needs at least one key/value head, a head_dim of at least 1, and query heads a "
                    f"multiple of key/value heads (grouped-query attention); got {shapes}.")
  if q.shape[1] == 0 or k.shape[1] == 0:
    raise UserError(f"Attention needs at least one query and one key; got {q.shape[1]} queries and {k.shape[1]} "
                    f"keys.")
  if len({q.dtype, k.dtype, v.dtype}) > 1 or not jnp.issubdtype(q.dtype, jnp.floating):
    # the implementations would otherwise disagree on the output's dtype, or compute in integers
    raise UserError(f"Attention takes q, k, v of one floating-point dtype and got {q.dtype}, {k.dtype}, {v.dtype}; "
                    f"cast them to one, like float32 or bfloat16.")


def _cudnn_attention(q, k, v, *, causal, mask):
  """`jax.nn.dot_product_attention`'s cuDNN kernel with this module's causal convention: the T queries are the
  last T of the S keys. cuDNN (like jax.nn) aligns them with the first T, so when T != S our diagonal goes in
  as a mask."""
  t, s = q.shape[1], k.shape[1]
  if causal and t != s:
    keep = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None, None]  # [1, 1, T, S]
    mask, causal = (keep if mask is None else jnp.logical_and(mask, keep)), False
  if mask is not None:  # cuDNN takes it as a bias of all T x S (a [B, 1, 1, S] key padding mask is refused)
    mask = jnp.broadcast_to(mask, (*jnp.shape(mask)[:2], t, s))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  if mask is None:
    return out  # (causal with T == S: every query sees itself)
  # A query row that sees no key gives zeros, as in the other implementations (not a softmax over masked keys):
  # with causal still set (T == S) cuDNN applies it, and a row the mask leaves only future keys is empty too.
  visible = mask
  if causal:
    visible = jnp.logical_and(visible, jnp.tri(t, s, dtype=bool))
  seen = jnp.any(visible, axis=-1)  # [B|1, H|1, T]
  return jnp.where(jnp.moveaxis(seen, 1, 2)[..., None], out, 0).astype(out.dtype)


def _per_batch_shard(attend, q, k, v, mask, pair):
  """`attend(q, k, v, mask=mask, segment_ids=pair)`, on each device's rows of the batch when the context
  mesh splits it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # no context mesh: inputs sharded on a mesh's Explicit axes carry that mesh in their type
    mesh = getattr(jax.typeof(q).sharding, "mesh", mesh)
  if (mesh.empty or BATCH_AXIS not in mesh.axis_names or BATCH_AXIS in mesh.manual_axes
      or q.shape[0] % mesh.shape[BATCH_AXIS]):
    return attend(q, k, v, mask=mask, segment_ids=pair)
  rows, whole = jax.sharding.PartitionSpec(BATCH_AXIS), jax.sharding.PartitionSpec()
  mask_spec = rows if mask is not None and jnp.ndim(mask) == 4 and jnp.shape(mask)[0] == q.shape[0] else whole
  if dict(zip(mesh.axis_names, mesh.axis_types))[BATCH_AXIS] == jax.sharding.AxisType.Explicit:  # typed: must match
    place = lambda x, spec: None if x is None else jax.reshard(x, jax.sharding.NamedSharding(mesh, spec))
    q, k, v, mask, pair = (place(x, spec) for x, spec in ((q, rows), (k, rows), (v, rows), (mask, mask_spec),
                                                          (pair, rows)))
  # check_vma=False: Pallas kernels declare no per-axis variance for their outputs.
  return jax.shard_map(lambda q, k, v, mask, pair: attend(q, k, v, mask=mask, segment_ids=pair), mesh=mesh,
                       in_specs=(rows, rows, rows, mask_spec, rows), out_specs=rows, axis_names={BATCH_AXIS},
                       check_vma=False)(q, k, v, mask, pair)


def _xla_attention(q, k, v, *, causal, mask):
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  g = h // kv_heads
  # Heads into the batch once, with the query heads that share a kv head stacked along
  # time, so every attention matmul is a plain batched [M, D] x [D, S] product on XLA:CPU
  # (no transposes around each dot, no k/v broadcast over the group).
  q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)  # [B, K, G*T, D]
  k = k.transpose(0, 2, 1, 3)  # [B, K, S, D]
  v = v.transpose(0, 2, 1, 3)
  acc = chunked_lib.accumulation_dtype(q.dtype)
  neg = jnp.finfo(acc).min
  bias = jnp.zeros((1, 1, 1, t, s), acc)  # additive mask, [B|1, K|1, G|1, T, S]
  if causal:
    keep = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)  # queries are the last t positions
    bias = jnp.where(keep, bias, neg)
  if mask is not None:  # [B|1, H|1, T|1, S|1]
    mask = jnp.broadcast_to(mask, (*mask.shape[:2], t, s))
    if mask.shape[1] == h:  # per query head: group the heads by the kv head they read
      mask = mask.reshape(mask.shape[0], kv_heads, g, t, s)
    else:
      mask = mask[:, :, None]
    bias = jnp.where(mask, bias, neg)
  bias = jnp.broadcast_to(bias, (*bias.shape[:2], g, t, s)).reshape(bias.shape[0], bias.shape[1], g * t, s)
  attend = _softmax_attention if custom_gradients() else lambda *a: _softmax_attention_fwd(*a)[0]
  empty_rows = mask is not None or (causal and t > s)  # can a query row see no key at all?
  out = attend(q, k, v, bias, d ** -0.5, empty_rows)  # [B, K, G*T, D]
  return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _softmax_attention(q, k, v, bias, scale, empty_rows):
  """softmax(scale q k^T + bias) v for q [B, K, M, D], k/v [B, K, S, D], bias broadcastable to [B, K, M, S]; with
  `empty_rows`, a row whose bias masks every key gives zeros."""
  return _softmax_attention_fwd(q, k, v, bias, scale, empty_rows)[0]


def _softmax_attention_fwd(q, k, v, bias, scale, empty_rows):
  scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=bias.dtype) * scale + bias
  probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  probs = probs * (1 / jnp.sum(probs, axis=-1, keepdims=True))  # [B, K, M, S] in the bias's fp32 (float64)
  if empty_rows:  # a row whose keys are all masked would spread evenly over them: it attends to nothing instead,
    # as chunked and flash do. (Only where possible: on a constant bias XLA's constant folding of this takes
    # seconds at length 4096.)
    probs = jnp.where(jnp.max(bias, axis=-1, keepdims=True) > jnp.finfo(bias.dtype).min, probs, 0)
  out = jnp.einsum("bkms,bksd->bkmd", probs.astype(v.dtype), v)
  return out, (q, k, v, probs)  # the bias is a constant mask: not saved, no gradient


def _softmax_attention_bwd(scale, empty_rows, residuals, d_out):
  q, k, v, probs = residuals
  d_v = jnp.einsum("bkms,bkmd->bksd", probs.astype(d_out.dtype), d_out)
  d_probs = jnp.einsum("bkmd,bksd->bkms", d_out, v, preferred_element_type=probs.dtype)
  # Softmax backward over the saved probabilities only: keeping `out` for FlashAttention's
  # row term sum_d(out * d_out) would cost more memory than the reduction over S saves.
  d_scores = (probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True)) * scale).astype(q.dtype)
  d_q = jnp.einsum("bkms,bksd->bkmd", d_scores, k)
  d_k = jnp.einsum("bkms,bkmd->bksd", d_scores, q)
  return d_q, d_k, d_v, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
