"""Memory-efficient attention in pure JAX: blockwise over queries and keys with an online softmax.

FlashAttention's algorithm (Dao et al. 2022, with FlashAttention-2's loop order) written
with `lax` loops, so it runs on any backend, CPU included. The forward keeps a running
max and sum per query row and holds one [block_q, block_k] tile of scores per
batch-head at a time; the backward (a `jax.custom_vjp`) recomputes each tile from q, k, v
and the saved logsumexp. Memory is O(T + S) per batch-head, not the O(T * S) of `xla`.

Conventions follow `aigc_jax.nn.attention`: q [B, T, H, D], k/v [B, S, K, D] with H a
multiple of K; `causal` treats the T queries as the last T of the S positions; `mask`
is boolean and broadcastable to [B, H, T, S] (any such shape); `segment_ids` (packed
sequences, `aigc_jax.nn.segments`) are compared tile by tile, never expanded to [T, S].
A query row that can see no key at all gives zeros, as in every implementation. Tiles are computed in fp32
(float64 for float64 inputs).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from aigc_jax.errors import UserError
from aigc_jax.nn import segments as segments_lib

# Measured on a 2-core EPYC (benchmarks/attention.py): square 512 tiles skip most causal work
# and keep a [512, 512] fp32 tile per batch-head (1 MiB) in cache-sized pieces.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
M_START = -1e30  # running max starts finite, so a fully masked tile gives exp(-inf - M_START) = 0, never NaN


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about a call that is known at trace time (hashable, for `nondiff_argnums`)."""
  causal: bool
  t: int  # true query length; the arrays are padded to a multiple of block_q
  s: int  # true key length; padded to a multiple of block_k
  block_q: int
  block_k: int
  scale: float


def chunked_attention(q, k, v, *, causal: bool = False, mask=None, segment_ids=None, block_q: int = DEFAULT_BLOCK_Q,
                      block_k: int = DEFAULT_BLOCK_K):
  """Attention of q [B, T, H, D] over k, v [B, S, K, D] in [block_q, block_k] tiles; lengths need not divide."""
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  g = h // kv_heads
  if block_q < 1 or block_k < 1:
    raise UserError(f"Chunked attention block sizes must be positive (got block_q={block_q}, block_k={block_k}).")
  bq, bk = min(block_q, t), min(block_k, s)
  tp, sp = round_up(t, bq), round_up(s, bk)
  # Query heads that share a kv head sit next to each other within a time step, so one
  # query tile is a plain [block_q * G, D] matrix and k/v are never repeated over the group.
  q5 = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, D]
  k4 = k.transpose(0, 2, 1, 3)  # [B, K, S, D]
  v4 = v.transpose(0, 2, 1, 3)
  if tp > t:
    q5 = jnp.pad(q5, ((0, 0), (0, 0), (0, tp - t), (0, 0), (0, 0)))
  if sp > s:
    k4 = jnp.pad(k4, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    v4 = jnp.pad(v4, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  mask5 = None if mask is None else _grouped_mask(mask, b, h, kv_heads, t, s, tp, sp)
  pair = segments_lib.segment_pair(segment_ids, b, t, s)
  masks = (mask5, None if pair is None else segments_lib.padded(pair, tp, sp))
  out = _attention(q5, k4, v4, masks, _Static(causal, t, s, bq, bk, d ** -0.5))  # [B, K, Tp, G, D]
  return out[:, :, :t].transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def _grouped_mask(mask, b, h, kv_heads, t, s, tp, sp):
  """A boolean mask broadcastable to [B, H, T, S] as [B|1, K|1, Tp|1, G|1, Sp|1], padding masked out."""
  mask = segments_lib.mask_as_rank4(mask, b, h, t, s)
  shape = mask.shape
  if shape[1] == h and h > 1:  # per query head: [B, H, T, S] -> [B, K, T, G, S]
    mask = mask.reshape(shape[0], kv_heads, h // kv_heads, shape[2], shape[3]).transpose(0, 1, 3, 2, 4)
  else:
    mask = mask[:, :, :, None, :]  # [B|1, 1, T|1, 1, S|1]
  pads = [(0, 0)] * 5
  if shape[2] == t and tp > t:
    pads[2] = (0, tp - t)
  if shape[3] == s and sp > s:
    pads[4] = (0, sp - s)
  return jnp.pad(mask, pads) if any(p != (0, 0) for p in pads) else mask


def _tile_keep(masks, i, j, st: _Static, sp: int):
  """Which scores of tile (query block i, key block j) are kept: bool broadcastable to [B, K, bq, G, bk], or None.

  `masks` is (mask5 as `_grouped_mask` or None, (query ids [B, Tp], key ids [B, Sp]) or None).
  """
  mask5, pair = masks
  keep = None
  if st.causal or sp > st.s:
    kpos = j * st.block_k + jnp.arange(st.block_k)  # [bk]
    if st.causal:  # also drops the padded keys for every real query
      qpos = i * st.block_q + jnp.arange(st.block_q) + (st.s - st.t)  # [bq]
      keep = (kpos[None, :] <= qpos[:, None])[:, None, :]  # [bq, 1, bk]
    else:
      keep = kpos < st.s
  if mask5 is not None:
    m = mask5
    if m.shape[2] > 1:
      m = lax.dynamic_slice_in_dim(m, i * st.block_q, st.block_q, axis=2)
    if m.shape[4] > 1:
      m = lax.dynamic_slice_in_dim(m, j * st.block_k, st.block_k, axis=4)
    keep = m if keep is None else keep & m
  if pair is not None:
    q_ids = lax.dynamic_slice_in_dim(pair[0], i * st.block_q, st.block_q, axis=1)  # [B, bq]
    kv_ids = lax.dynamic_slice_in_dim(pair[1], j * st.block_k, st.block_k, axis=1)  # [B, bk]
    m = (q_ids[:, :, None] == kv_ids[:, None, :])[:, None, :, None, :]  # [B, 1, bq, 1, bk]
    keep = m if keep is None else keep & m
  return keep


def _scores(q_tile, k_tile, keep, st: _Static):
  """Scaled scores of q_tile [B, K, bq*G, D] against k_tile [B, K, bk, D], -inf where not kept: fp32 (float64
  for float64 inputs)."""
  scores = jnp.einsum("bkmd,bksd->bkms", q_tile, k_tile, preferred_element_type=_acc(q_tile)) * st.scale
  if keep is None:
    return scores
  b, kv_heads, m, bk = scores.shape
  scores = jnp.where(keep, scores.reshape(b, kv_heads, st.block_q, m // st.block_q, bk), -jnp.inf)
  return scores.reshape(b, kv_heads, m, bk)


def accumulation_dtype(dtype):
  """What scores, softmax and sums are computed in: fp32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _acc(x):
  return accumulation_dtype(x.dtype)


def round_up(n, multiple):
  """The smallest multiple of `multiple` that is at least n (a length padded to whole blocks)."""
  return -(-n // multiple) * multiple


# The causal tile ranges, shared with the Pallas kernels (`aigc_jax.nn.flash_attention`): the T queries are the
# last T of the S positions. Written with lax.div of non-negative numbers, which Pallas's Triton lowering takes,
# where floor division of a negative number is not.
def key_blocks_seen(q_start, block_q: int, block_k: int, nk: int, t: int, s: int):
  """Causal: key blocks [0, n) hold every key visible from the block_q queries from q_start (the rest are
  skipped)."""
  last_q = jnp.minimum(q_start + block_q, t) - 1 + (s - t)
  return jnp.minimum(jnp.where(last_q < 0, 0, lax.div(jnp.maximum(last_q, 0), block_k) + 1), nk)


def first_query_block(k_start, block_q: int, nq: int, t: int, s: int):
  """Causal: the query blocks before this one see none of the keys from k_start."""
  first = k_start - (s - t)
  return jnp.minimum(jnp.where(first < 0, 0, lax.div(jnp.maximum(first, 0), block_q)), nq)


def _only_where(runs, step):
  """A fori_loop body that runs `step(i, carry)` where `runs(i)` and passes the carry on elsewhere. The causal loops
  skip blocks this way, not by a traced trip count: a loop with static bounds is a scan, which reverse-mode AD
  can go through (a second-order gradient of the custom VJP, e.g. a gradient penalty), and a while loop is not."""
  return lambda i, carry: lax.cond(runs(i), step, lambda _, c: c, i, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, masks, st: _Static):
  """q [B, K, Tp, G, D], k/v [B, K, Sp, D], masks as `_tile_keep`'s -> out [B, K, Tp, G, D]."""
  return _forward(q, k, v, masks, st)[0]


def _forward(q, k, v, masks, st: _Static):
  b, kv_heads, tp, g, d = q.shape
  sp = k.shape[2]
  nq, nk = tp // st.block_q, sp // st.block_k
  rows = st.block_q * g

  def query_block(i):
    q_tile = lax.dynamic_slice_in_dim(q, i * st.block_q, st.block_q, axis=2).reshape(b, kv_heads, rows, d)

    def key_step(j, carry):
      acc, m, l = carry  # [B, K, rows, D], [B, K, rows], [B, K, rows] fp32
      k_tile = lax.dynamic_slice_in_dim(k, j * st.block_k, st.block_k, axis=2)  # [B, K, bk, D]
      v_tile = lax.dynamic_slice_in_dim(v, j * st.block_k, st.block_k, axis=2)
      scores = _scores(q_tile, k_tile, _tile_keep(masks, i, j, st, sp), st)  # [B, K, rows, bk]
      m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
      probs = jnp.exp(scores - m_new[..., None])
      rescale = jnp.exp(m - m_new)
      l = l * rescale + jnp.sum(probs, axis=-1)
      acc = acc * rescale[..., None] + jnp.einsum("bkms,bksd->bkmd", probs.astype(v.dtype), v_tile,
                                                  preferred_element_type=acc.dtype)
      return acc, m_new, l

    # The carries are made from the inputs (`*_like`), so they carry the inputs' sharding: under an Explicit
    # mesh a loop whose body returns batch-sharded values must start from batch-sharded ones.
    init = (jnp.zeros_like(q_tile, _acc(q)), jnp.full_like(q_tile[..., 0], M_START, _acc(q)),
            jnp.zeros_like(q_tile[..., 0], _acc(q)))
    if st.causal:  # the key blocks after `stop` are all in the future: skipped
      stop = key_blocks_seen(i * st.block_q, st.block_q, st.block_k, nk, st.t, st.s)
      acc, m, l = lax.fori_loop(0, nk, _only_where(lambda j: j < stop, key_step), init)
    else:
      acc, m, l = lax.fori_loop(0, nk, key_step, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # inf: rows that see nothing get p = 0
    return out.astype(q.dtype).reshape(b, kv_heads, st.block_q, g, d), lse.reshape(b, kv_heads, st.block_q, g)

  out, lse = lax.map(query_block, jnp.arange(nq))  # [nq, B, K, bq, G, D], [nq, B, K, bq, G]
  out = jnp.moveaxis(out, 0, 2).reshape(b, kv_heads, tp, g, d)
  lse = jnp.moveaxis(lse, 0, 2).reshape(b, kv_heads, tp, g)
  return out, (q, k, v, masks, out, lse)


def _backward(st: _Static, residuals, d_out):
  q, k, v, masks, out, lse = residuals
  b, kv_heads, tp, g, d = q.shape
  sp = k.shape[2]
  nq, nk = tp // st.block_q, sp // st.block_k
  rows = st.block_q * g
  acc = _acc(q)
  delta = jnp.sum(out.astype(acc) * d_out.astype(acc), axis=-1)  # [B, K, Tp, G]

  def rows_of(x, i):  # block i of a [B, K, Tp, G, ...] array as [B, K, rows, ...]
    tile = lax.dynamic_slice_in_dim(x, i * st.block_q, st.block_q, axis=2)
    return tile.reshape(b, kv_heads, rows, *x.shape[4:])

  def key_block(d_q, j):
    k_tile = lax.dynamic_slice_in_dim(k, j * st.block_k, st.block_k, axis=2)  # [B, K, bk, D]
    v_tile = lax.dynamic_slice_in_dim(v, j * st.block_k, st.block_k, axis=2)

    def query_step(i, carry):
      d_q, d_k, d_v = carry
      q_tile, do_tile = rows_of(q, i), rows_of(d_out, i)  # [B, K, rows, D]
      scores = _scores(q_tile, k_tile, _tile_keep(masks, i, j, st, sp), st)  # [B, K, rows, bk]
      probs = jnp.exp(scores - rows_of(lse, i)[..., None])
      d_v = d_v + jnp.einsum("bkms,bkmd->bksd", probs.astype(d_out.dtype), do_tile, preferred_element_type=acc)
      d_probs = jnp.einsum("bkmd,bksd->bkms", do_tile, v_tile, preferred_element_type=acc)
      d_scores = (probs * (d_probs - rows_of(delta, i)[..., None]) * st.scale).astype(q.dtype)
      d_k = d_k + jnp.einsum("bkms,bkmd->bksd", d_scores, q_tile, preferred_element_type=acc)
      d_q_tile = jnp.einsum("bkms,bksd->bkmd", d_scores, k_tile, preferred_element_type=acc)
      d_q = lax.dynamic_update_slice_in_dim(
          d_q, lax.dynamic_slice_in_dim(d_q, i * st.block_q, st.block_q, axis=2)
          + d_q_tile.reshape(b, kv_heads, st.block_q, g, d), i * st.block_q, axis=2)
      return d_q, d_k, d_v

    zeros = jnp.zeros_like(k_tile, acc)  # sharded as k (see _forward)
    if st.causal:  # the query blocks before `start` see none of these keys: skipped
      start = first_query_block(j * st.block_k, st.block_q, nq, st.t, st.s)
      query_step = _only_where(lambda i: i >= start, query_step)
    d_q, d_k, d_v = lax.fori_loop(0, nq, query_step, (d_q, zeros, zeros))
    return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype))

  d_q, (d_k, d_v) = lax.scan(key_block, jnp.zeros_like(q, acc), jnp.arange(nk))  # d_k [nk, B, K, bk, D]
  d_k = jnp.moveaxis(d_k, 0, 2).reshape(k.shape)
  d_v = jnp.moveaxis(d_v, 0, 2).reshape(v.shape)
  return d_q.astype(q.dtype), d_k, d_v, None


_attention.defvjp(_forward, _backward)
