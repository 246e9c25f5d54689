"""FlashAttention as Pallas kernels: a forward, a dK/dV and a dQ kernel behind one `jax.custom_vjp`.

On a GPU the kernels lower through Triton; elsewhere they run in Pallas interpret mode
(slow, meant for checking numerics on CPU), which needs no Triton: only compiling them imports
Pallas Triton (deprecated since jax 0.11), so a JAX without it still runs the Hopper kernels.
Adapted from JAX's reference kernels in `jax/experimental/pallas/ops/gpu/attention.py`
(Copyright 2023 The JAX Authors, Apache-2.0), with these changes for `aigc_jax.nn.attention`'s API:
  * grouped-query heads: the k/v BlockSpecs map query head h to kv head h // G, and the
    dK/dV kernel writes one slice per query head that the wrapper sums over the group;
  * any lengths: q is padded to the query block, k/v to the key block, D to a power of 2,
    and padded keys are masked;
  * causal with the T queries as the last T of S positions (cached decoding), skipping
    key blocks above the diagonal in the forward and dQ loops and query blocks below it
    in the dK/dV loop;
  * segment ids (`aigc_jax.nn.segments`) and key padding masks (broadcastable to
    [B, 1, 1, S]) as two int32 id vectors per batch row, queries' and keys' (a hidden key
    gets an id no query has), compared tile by tile;
  * separate dK/dV and dQ kernels, so T and S may have different block counts;
  * a query row that can see no key gives zeros, as in every implementation;
  * the gradient is first-order only: differentiating it again (a gradient penalty, a Hessian) is refused in
    one sentence naming `chunked` and `xla`, rather than failing inside Pallas.
On a Hopper GPU (sm90) the forward is FlashAttention-3's Mosaic GPU kernel
(`aigc_jax.nn.flash_attention_hopper`) for every bf16/fp16 call (head dims below 64 are
zero-padded to 64 for it; masks, segment ids and padded keys it takes as the same ids, causal
attention over a cache as the queries' offset), and so is the backward after it for head dims
up to 128; above, the backward is the Triton kernels here, which read the log-sum-exp both
forwards write. Elsewhere (float32, pre-Hopper GPUs) `flash` is the Triton kernels alone.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from aigc_jax.errors import UserError
from aigc_jax.nn import chunked_attention as chunked_lib
from aigc_jax.nn import flash_attention_hopper as hopper_lib
from aigc_jax.nn import gpus
from aigc_jax.nn import segments as segments_lib

_LOG2E = math.log2(math.e)  # the kernels work in base 2: e^x = 2^(x log2 e), and exp2 is the cheap one
MAX_HEAD_DIM = 256  # above this a [block, D] fp32 accumulator no longer fits a Triton program's registers


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of 2, at least 16 for Triton's dot); the reference kernel's defaults."""
  block_q: int = 128  # forward: queries per program
  block_k: int = 128  # forward: keys per loop step
  block_q_bwd: int = 32  # backward: queries per dQ program and per dK/dV loop step
  block_k_bwd: int = 32  # backward: keys per dK/dV program and per dQ loop step


def unsupported_reason(q_shape, k_shape, dtype, mask_shape=None) -> str | None:
  """Why `flash` cannot run this call (a sentence fragment), or None if it can."""
  d = q_shape[-1]
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"'flash' supports float32, bfloat16 and float16 inputs (got {jnp.dtype(dtype).name})"
  if d > MAX_HEAD_DIM:
    return f"'flash' supports head_dim <= {MAX_HEAD_DIM} (got {d})"
  if mask_shape is not None:
    shape = segments_lib.rank4_shape(mask_shape)
    if len(mask_shape) > 4 or shape[1] != 1 or shape[2] != 1:
      return (f"'flash' supports only key padding masks, broadcastable to [B, 1, 1, S] "
              f"(got mask shape {tuple(mask_shape)})")
  return None


def check_supported(reason_fn, q, k, mask) -> None:
  """Raises the one-sentence error for a call `reason_fn` (a kernel family's `unsupported_reason`) rejects."""
  reason = reason_fn(q.shape, k.shape, q.dtype, None if mask is None else jnp.shape(mask))
  if reason:
    raise unsupported_error(reason)


def unsupported_error(reason: str) -> UserError:
  return UserError(f"{reason}; use implementation 'chunked' or 'xla' for this call.")


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time facts of a call (hashable, for `nondiff_argnums` and the kernels' partials)."""
  causal: bool
  has_ids: bool  # query and key segment ids come after q, k, v
  t: int  # true lengths; arrays arrive padded
  s: int
  scale: float  # 1 / sqrt(true head_dim)
  blocks: BlockSizes
  interpret: bool
  hopper: bool  # the forward is the Hopper kernel's

  @property
  def q_offset(self) -> int:
    """Causal: query i sits at key position i + q_offset (the T queries are the last T of S positions)."""
    return self.s - self.t if self.causal else 0


def flash_attention(q, k, v, *, causal: bool = False, mask=None, segment_ids=None,
                    block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None,
                    hopper: bool | None = None):
  """Attention of q [B, T, H, D] over k, v [B, S, K, D]; `mask` is a key padding mask, boolean [B|1, 1, 1, S];
  `segment_ids` as `aigc_jax.nn.attention.dot_product_attention`'s.

  `hopper`: whether the forward is the Hopper kernel (None: wherever it can run the call on
  Hopper GPUs; True, which also cross-lowers from another machine, raises if it cannot).
  """
  b, t, h, d = q.shape
  s = k.shape[1]
  check_supported(unsupported_reason, q, k, mask)
  for name, size in dataclasses.asdict(block_sizes).items():
    if size < 16 or size & (size - 1):
      raise UserError(f"Flash attention {name} must be a power of 2 and at least 16 (got {size}).")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  # Blocks no longer than the (power-of-2 rounded) sequence, and one padded length that
  # every forward and backward block divides.
  fit = lambda block, n: max(16, min(block, pl.next_power_of_2(n)))
  blocks = BlockSizes(fit(block_sizes.block_q, t), fit(block_sizes.block_k, s), fit(block_sizes.block_q_bwd, t),
                      fit(block_sizes.block_k_bwd, s))
  tp = chunked_lib.round_up(t, max(blocks.block_q, blocks.block_q_bwd))
  sp = chunked_lib.round_up(s, max(blocks.block_k, blocks.block_k_bwd))
  dp = max(16, pl.next_power_of_2(d))
  hopper_dp = max(hopper_lib.MIN_HEAD_DIM, dp)  # the Hopper kernels take head dims from 64: smaller ones padded
  why_not = hopper_lib.unsupported_reason((b, tp, h, hopper_dp), (b, sp, k.shape[2], hopper_dp), q.dtype,
                                          causal=causal)
  if hopper is None:
    hopper = why_not is None and not interpret and gpus.on_hopper()
  elif hopper and why_not:
    raise UserError(f"The Hopper flash forward cannot run this call: {why_not}; leave hopper=None to let "
                    f"flash use its Triton forward.")
  if hopper:
    dp = hopper_dp
  q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, dp - d)))
  k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, dp - d)))
  v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, dp - d)))
  ids = segments_lib.with_key_padding(segments_lib.segment_pair(segment_ids, b, t, s), mask, b, t, s)
  ids = None if ids is None else segments_lib.padded(ids, tp, sp)  # [B, Tp], [B, Sp]
  if hopper and ids is None and not causal and sp > s:  # the Hopper kernels hide padded keys by their ids only
    ids = segments_lib.padded((jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)), tp, sp)
  st = _Static(causal, ids is not None, t, s, d ** -0.5, blocks, interpret, hopper)
  return _flash(q, k, v, ids, st)[:, :t, :, :d]


def _keep(q_pos, q_ids, k_start, block_k, kv_ids_ref, st: _Static):
  """Kept scores of a [len(q_pos), block_k] tile: bool array broadcastable to it, or None.

  `q_ids` are the tile's query segment ids, `kv_ids_ref` every key's (both None without ids).
  """
  k_pos = k_start + jnp.arange(block_k)
  keep = None
  if st.causal:  # also drops the padded keys for every real query
    keep = k_pos[None, :] <= q_pos[:, None]
  elif _padded_kv_len(st) > st.s:
    keep = (k_pos < st.s)[None, :]
  if kv_ids_ref is not None:
    same = q_ids[:, None] == kv_ids_ref[pl.ds(k_start, block_k)][None, :]
    keep = same if keep is None else jnp.logical_and(keep, same)
  return keep


def _forward_kernel(*refs, st: _Static):
  (q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref), (o_ref, lse_ref) = _split_inputs(refs, st), refs[-2:]
  block_q, block_k = st.blocks.block_q, st.blocks.block_k
  sp, dp = k_ref.shape
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]  # [bq, Dp]
  q_pos = q_start + jnp.arange(block_q) + (st.s - st.t)
  q_ids = None if q_ids_ref is None else q_ids_ref[pl.ds(q_start, block_q)]

  def body(j, carry):
    acc, m, l = carry  # [bq, Dp], [bq], [bq] fp32
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]  # [bk, Dp]
    scores = _dot(q, k, trans_b=True) * (st.scale * _LOG2E)  # [bq, bk] base-2 logits
    keep = _keep(q_pos, q_ids, k_start, block_k, kv_ids_ref, st)
    if keep is not None:
      scores = jnp.where(keep, scores, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    probs = jnp.exp2(scores - m_new[:, None])
    rescale = jnp.exp2(m - m_new)
    v = v_ref[pl.ds(k_start, block_k), :]
    acc = acc * rescale[:, None] + _dot(probs.astype(v.dtype), v)
    return acc, m_new, l * rescale + jnp.sum(probs, axis=-1)

  nk = sp // block_k
  stop = chunked_lib.key_blocks_seen(q_start, block_q, block_k, nk, st.t, st.s) if st.causal else nk
  init = (jnp.zeros((block_q, dp), jnp.float32), jnp.full((block_q,), chunked_lib.M_START, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, stop, body, init)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l), jnp.inf)  # inf: rows that see nothing get p = 0 backward


def _probs_and_dscores(q, k, v, do, lse, delta, keep, st: _Static):
  """Recomputed probabilities [bq, bk] and d(scores) [bq, bk] (natural-log scale, times the softmax scale)."""
  scores = _dot(q, k, trans_b=True) * (st.scale * _LOG2E)
  if keep is not None:
    scores = jnp.where(keep, scores, -jnp.inf)
  probs = jnp.exp2(scores - lse[:, None])
  d_probs = _dot(do, v, trans_b=True)
  return probs, probs * (d_probs - delta[:, None]) * st.scale


def _dkv_kernel(*refs, st: _Static):
  """One key block of one query head: loops over the query blocks that can see it."""
  (q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref), (do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = (
      _split_inputs(refs[:-5], st), refs[-5:])
  block_q, block_k = st.blocks.block_q_bwd, st.blocks.block_k_bwd
  tp, dp = q_ref.shape
  k_start = pl.program_id(2) * block_k
  k, v = k_ref[...], v_ref[...]  # [bk, Dp]

  def body(i, carry):
    dk, dv = carry
    q_start = i * block_q
    q = q_ref[pl.ds(q_start, block_q), :]
    do = do_ref[pl.ds(q_start, block_q), :]
    q_pos = q_start + jnp.arange(block_q) + (st.s - st.t)
    q_ids = None if q_ids_ref is None else q_ids_ref[pl.ds(q_start, block_q)]
    keep = _keep(q_pos, q_ids, k_start, block_k, kv_ids_ref, st)
    probs, d_scores = _probs_and_dscores(q, k, v, do, lse_ref[pl.ds(q_start, block_q)],
                                         delta_ref[pl.ds(q_start, block_q)], keep, st)
    dv = dv + _dot(probs.astype(do.dtype), do, trans_a=True)
    dk = dk + _dot(d_scores.astype(q.dtype), q, trans_a=True)
    return dk, dv

  nq = tp // block_q
  start = chunked_lib.first_query_block(k_start, block_q, nq, st.t, st.s) if st.causal else 0
  zeros = jnp.zeros((block_k, dp), jnp.float32)
  dk, dv = lax.fori_loop(start, nq, body, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def _padded_kv_len(st: _Static) -> int:
  return chunked_lib.round_up(st.s, max(st.blocks.block_k, st.blocks.block_k_bwd))


def _dq_kernel(*refs, st: _Static):
  """One query block of one query head: loops over the key blocks it can see."""
  (q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref), (do_ref, lse_ref, delta_ref, dq_ref) = (
      _split_inputs(refs[:-4], st), refs[-4:])
  block_q, block_k = st.blocks.block_q_bwd, st.blocks.block_k_bwd
  sp, dp = k_ref.shape
  q_start = pl.program_id(2) * block_q
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_pos = q_start + jnp.arange(block_q) + (st.s - st.t)
  q_ids = None if q_ids_ref is None else q_ids_ref[pl.ds(q_start, block_q)]

  def body(j, dq):
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    keep = _keep(q_pos, q_ids, k_start, block_k, kv_ids_ref, st)
    _, d_scores = _probs_and_dscores(q, k, v, do, lse, delta, keep, st)
    return dq + _dot(d_scores.astype(k.dtype), k)

  nk = sp // block_k
  stop = chunked_lib.key_blocks_seen(q_start, block_q, block_k, nk, st.t, st.s) if st.causal else nk
  dq_ref[...] = lax.fori_loop(0, stop, body, jnp.zeros((block_q, dp), jnp.float32)).astype(dq_ref.dtype)


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """a @ b of two 2-D tiles (either transposed), accumulated and returned in fp32: Pallas Triton's `dot` written
  with core JAX, so that only the compiled kernels need the Triton backend (`_compiler_params`)."""
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _compiler_params(st: _Static, block_a: int, block_b: int, dp: int):
  """Triton's launch parameters for a compiled kernel (None in interpret mode, which needs no Triton).

  Pallas Triton is imported here, not with the module: jax 0.11 deprecates it, and a JAX without it still runs the
  Hopper kernels, which serve every bf16/fp16 forward and the backward up to head_dim 128 on an H100/H200.
  """
  if st.interpret:
    return None
  try:
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  except Exception as e:  # an ImportError, or whatever a moved Pallas API raises at import time
    raise UserError(f"Attention implementation 'flash' runs this call on its Triton kernels (the Hopper ones take "
                    f"bf16/fp16 on an H100/H200, backward up to head_dim {hopper_lib.BWD_MAX_HEAD_DIM}), and jax "
                    f"{jax.__version__} could not import Pallas Triton ({type(e).__name__}: {e}); use 'chunked' or "
                    f"'xla' for this call.") from e
  return pl_triton.CompilerParams(num_warps=4 if block_a * block_b < 128 * 128 and dp <= 64 else 8, num_stages=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, ids, st: _Static):
  """q [B, Tp, H, Dp], k/v [B, Sp, K, Dp], ids (query [B, Tp], key [B, Sp]) int32 or None -> out [B, Tp, H, Dp]."""
  return _forward(q, k, v, ids, st)[0]


def _split_inputs(refs, st: _Static):
  """A kernel's q, k, v refs and its query and key id refs (None, None without ids)."""
  return (*refs[:3], *(refs[3:5] if st.has_ids else (None, None)))


def _id_specs(ids, index_map):
  """BlockSpecs and arguments for the query and key id vectors: each program reads its batch row whole."""
  if ids is None:
    return [], []
  return [pl.BlockSpec((None, x.shape[1]), index_map) for x in ids], list(ids)


def _first_order_only(kernels):
  """`kernels(st, ...)` as a `jax.custom_jvp` whose derivative is refused in one sentence: a second-order gradient
  of `_flash` differentiates its forward and backward kernels themselves, which failed deep inside Pallas."""
  kernels = jax.custom_jvp(kernels, nondiff_argnums=(0,))
  kernels.defjvp(_refuse_second_order)
  return kernels


def _refuse_second_order(st, primals, tangents):
  raise UserError("Attention implementation 'flash' has first-order gradients only (its kernels cannot be "
                  "differentiated again); use implementation='chunked' or 'xla' for a gradient penalty, a Hessian "
                  "or any other second-order gradient.")


def _forward(q, k, v, ids, st: _Static):
  out, lse = _forward_kernels(st, q, k, v, ids)
  return out, (q, k, v, ids, out, lse)


@_first_order_only
def _forward_kernels(st: _Static, q, k, v, ids):
  """(out [B, Tp, H, Dp], log-sum-exp [B, H, Tp] fp32)."""
  if st.hopper:
    return hopper_lib.forward(q, k, v, causal=st.causal, scale=st.scale, ids=ids, q_offset=st.q_offset)
  b, tp, h, dp = q.shape
  sp, g = k.shape[1], h // k.shape[2]
  bq = st.blocks.block_q
  in_specs = [pl.BlockSpec((None, bq, None, dp), lambda i, bi, hi: (bi, i, hi, 0)),  # q tile
              pl.BlockSpec((None, sp, None, dp), lambda i, bi, hi: (bi, 0, hi // g, 0)),  # all of k for its kv head
              pl.BlockSpec((None, sp, None, dp), lambda i, bi, hi: (bi, 0, hi // g, 0))]
  id_specs, id_args = _id_specs(ids, lambda i, bi, hi: (bi, 0))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, st=st),
      grid=(tp // bq, b, h),
      in_specs=in_specs + id_specs,
      out_specs=[pl.BlockSpec((None, bq, None, dp), lambda i, bi, hi: (bi, i, hi, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      compiler_params=_compiler_params(st, bq, st.blocks.block_k, dp),
      interpret=st.interpret,
      name="flash_attention_forward",
  )(q, k, v, *id_args)
  return out, lse


def _backward(st: _Static, residuals, d_out):
  return _backward_kernels(st, residuals, d_out)


@_first_order_only
def _backward_kernels(st: _Static, residuals, d_out):
  q, k, v, ids, out, lse = residuals
  if st.hopper and hopper_lib.backward_unsupported_reason(q.shape, k.shape) is None:
    return (*hopper_lib.backward(q, k, v, out, lse, d_out, causal=st.causal, scale=st.scale, ids=ids,
                                 q_offset=st.q_offset), None)
  b, tp, h, dp = q.shape
  sp, kv_heads = k.shape[1], k.shape[2]
  g = h // kv_heads
  bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))  # [B, H, Tp]
  whole_q = pl.BlockSpec((None, tp, None, dp), lambda bi, hi, n: (bi, 0, hi, 0))
  whole_kv = pl.BlockSpec((None, sp, None, dp), lambda bi, hi, n: (bi, 0, hi // g, 0))
  whole_rows = pl.BlockSpec((None, None, tp), lambda bi, hi, n: (bi, hi, 0))
  q_tile = pl.BlockSpec((None, bq, None, dp), lambda bi, hi, n: (bi, n, hi, 0))
  kv_tile = pl.BlockSpec((None, bk, None, dp), lambda bi, hi, n: (bi, n, hi // g, 0))
  rows_tile = pl.BlockSpec((None, None, bq), lambda bi, hi, n: (bi, hi, n))
  id_specs, id_args = _id_specs(ids, lambda bi, hi, n: (bi, 0))

  dk_per_head = pl.BlockSpec((None, bk, None, dp), lambda bi, hi, n: (bi, n, hi, 0))
  d_k, d_v = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(b, h, sp // bk),
      in_specs=[whole_q, kv_tile, kv_tile, *id_specs, whole_q, whole_rows, whole_rows],
      out_specs=[dk_per_head, dk_per_head],
      out_shape=[jax.ShapeDtypeStruct((b, sp, h, dp), jnp.float32)] * 2,  # per query head, summed below
      compiler_params=_compiler_params(st, bq, bk, dp),
      interpret=st.interpret,
      name="flash_attention_dkv",
  )(q, k, v, *id_args, d_out, lse, delta)
  d_k = d_k.reshape(b, sp, kv_heads, g, dp).sum(3).astype(k.dtype)
  d_v = d_v.reshape(b, sp, kv_heads, g, dp).sum(3).astype(v.dtype)

  d_q = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(b, h, tp // bq),
      in_specs=[q_tile, whole_kv, whole_kv, *id_specs, q_tile, rows_tile, rows_tile],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(st, bq, bk, dp),
      interpret=st.interpret,
      name="flash_attention_dq",
  )(q, k, v, *id_args, d_out, lse, delta)
  return d_q, d_k, d_v, None


_flash.defvjp(_forward, _backward)
