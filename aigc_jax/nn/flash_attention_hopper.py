"""Mosaic GPU kernels for Hopper GPUs (sm90): FlashAttention-3's forward and a warp-specialised backward.

Elsewhere on a GPU `flash` runs Triton kernels (`aigc_jax.nn.flash_attention`). Pallas's
Triton lowering gives them neither Hopper's asynchronous warpgroup MMA (wgmma) nor its
TMA copies, the two things FlashAttention-3 (Shah et al. 2024) is built on. This module is
JAX's FlashAttention-3 forward (`jax/experimental/pallas/ops/gpu/attention_mgpu.py` in
jax 0.10.2, Copyright 2024 The JAX Authors, Apache-2.0): per 128 queries, two consumer
warpgroups whose softmax overlaps the other's wgmma, and a producer warpgroup streaming
K/V blocks through TMA. Changes to it:
  * shared-memory buffers take the inputs' dtype (upstream hard-codes float16, so bfloat16,
    the dtype people train in, did not even lower);
  * the softmax scale is applied inside, folded into the base-2 exponent's constant
    (upstream leaves it to the caller);
  * it always returns the base-2 log-sum-exp [B, H, T] of the scaled scores: exactly the
    residual both backwards read, this module's (`backward`, head_dim <= 128) and the Triton
    dK/dV and dQ kernels of `aigc_jax.nn.flash_attention` (above);
  * the K/V block is the longest that fits shared memory for the head dim;
  * segment ids, which also carry key padding masks and padded keys (`aigc_jax.nn.segments`):
    the producer streams each K block's key ids beside it, and a query row that sees no key
    gives zeros and an lse of +inf (its running max starts finite, as in `chunked`);
  * causal attention over a cache (fewer queries than keys, or more): `q_offset` moves the
    diagonal, and the causal block ranges (`causal_key_blocks`, `causal_query_blocks`) follow it;
    the producer fetches no block its program will not take.
The Triton forward keeps what this kernel lacks: float32. `flash` zero-pads head dims below 64.
`backward` (below) is FlashAttention-2's backward in the same style: a dQ and a dK/dV kernel.
Off a Hopper GPU the kernels run in jax 0.11's Mosaic GPU interpreter (warpgroups as threads,
shared memory, TMA and barriers simulated), where the tests check the forward's output and
log-sum-exp against `reference`, their statement in plain JAX, the backward against JAX's
gradient of it, and both through `flash_attention` against `xla`; `tests/mosaic_gpu_interpret.py`
fills the three gaps the interpreter has for them (run_state accumulators, wgmma with A in
registers, a barrier's unobserved last phases). jax 0.10.2 has no such interpreter: there they
are cross-lowered for CUDA (`jax.export`) and `reference` stands in for the forward.
Not yet run on a Hopper GPU by this project: their speed is unmeasured.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from aigc_jax.nn import chunked_attention as chunked_lib

BLOCK_Q = 64  # queries per consumer warpgroup; a program (CTA) takes 2 * BLOCK_Q
MIN_HEAD_DIM = 64  # a 128-byte swizzled row of bf16: head dims are multiples of it
STAGES = 2  # K/V blocks in flight
SMEM_BYTES = 227 * 1024  # shared memory one H100 CTA may use


def kv_block(head_dim: int, kv_len: int) -> int | None:
  """The longest K/V block (256, 128 or 64) that divides kv_len and whose buffers fit shared memory."""
  for block in (256, 128, 64):
    smem = 2 * BLOCK_Q * head_dim * 2 + STAGES * 2 * block * head_dim * 2 + 2 * BLOCK_Q * 4  # q/out, k+v, lse
    if smem <= SMEM_BYTES and kv_len % block == 0:
      return block
  return None


def unsupported_reason(q_shape, k_shape, dtype, *, causal: bool) -> str | None:
  """Why this kernel cannot run `flash`'s padded call (a sentence fragment), or None if it can.

  q_shape and k_shape are the padded [B, Tp, H, Dp] and [B, Sp, K, Dp]. Masks, segment ids and padded keys it takes
  as ids (`forward`'s `ids`), causal attention over a cache as `q_offset`.
  """
  tp, dp, sp = q_shape[1], q_shape[3], k_shape[1]
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"it takes bfloat16 and float16 (got {jnp.dtype(dtype).name})"
  if dp % MIN_HEAD_DIM:
    return f"its head_dim must be a multiple of {MIN_HEAD_DIM} (got {dp})"
  if tp % (2 * BLOCK_Q):
    return f"the query length must be padded to a multiple of {2 * BLOCK_Q} (got {tp})"
  if kv_block(dp, sp) is None:
    return f"no K/V block divides the padded key length {sp}"
  if causal and _ptxas_miscompiles_causal():
    return "causal masking is miscompiled by ptxas in CUDA 12.8.0 to 12.9.0"
  return None


def _ptxas_miscompiles_causal() -> bool:
  """JAX's kernel refuses causal masking on CUDA runtimes 12.8.0 <= v < 12.9.1 (a ptxas bug)."""
  from jax._src.lib import cuda_versions  # None without the CUDA plugin (e.g. cross-lowering from a CPU)
  if cuda_versions is None:
    return False
  return 12080 <= cuda_versions.cuda_runtime_get_version() < 12091


# jax 0.10.2's plgpu.load takes the index apart from the ref; jax 0.11 deprecates that and jax 0.12 removes it.
_LOAD_INDEX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_TAKES_INDEX = _LOAD_INDEX is not None and _LOAD_INDEX.default is inspect.Parameter.empty


def _load(ref, layout):
  """All of `ref` into registers, in `layout`."""
  return plgpu.load(ref, (), layout=layout) if _LOAD_TAKES_INDEX else plgpu.load(ref, layout=layout)


def _same_ids(row_ids, col_ids, shape):
  """[rows, cols] bool in the wgmma layout: the row's id equals the column's (`row_ids` in the layout reduced over
  columns, `col_ids` over rows)."""
  return lax.broadcast_in_dim(row_ids, shape, [0]) == lax.broadcast_in_dim(col_ids, shape, [1])


def _causal_keep(shape, row_base, col_base, *, rows_are_queries: bool):
  """[rows, cols] bool in the wgmma layout: a query at or after the key (bases as key positions: a query's
  position plus `q_offset`)."""
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row_base
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col_base
  return rows >= cols if rows_are_queries else rows <= cols


def _blocks_below(x, block: int, n: int):
  """floor(x / block) clipped to [0, n], for a traced int32 x of either sign (a GPU's integer division truncates
  toward zero, so x is clipped at 0 before it is divided)."""
  return jnp.minimum(lax.div(jnp.maximum(x, 0), jnp.int32(block)), n)


def causal_key_blocks(q_start, rows: int, block: int, n: int, q_offset: int):
  """Causal, for the `rows` queries from q_start and n key blocks of `block`: (unmasked, stop), where every one of
  the queries sees all of blocks [0, unmasked) and none of them sees any of blocks [stop, n)."""
  unmasked = _blocks_below(q_start + q_offset + 1, block, n)
  stop = _blocks_below(q_start + rows - 1 + q_offset + block, block, n)
  return unmasked, stop


def causal_query_blocks(k_start, rows: int, block: int, n: int, q_offset: int):
  """Causal, for the `rows` keys from k_start and n query blocks of `block`: (start, unmasked), where no query of
  blocks [0, start) sees any of the keys and every query of blocks [unmasked, n) sees all of them."""
  start = _blocks_below(k_start - q_offset, block, n)
  unmasked = _blocks_below(k_start + rows - 1 - q_offset + block - 1, block, n)
  return start, unmasked


def forward(q, k, v, *, causal: bool, scale: float, ids=None, q_offset: int = 0):
  """q [B, Tp, H, D], k/v [B, Sp, K, D] (bf16/fp16, D a multiple of 64, Tp of 128) -> out [B, Tp, H, D] and
  lse [B, H, Tp] fp32, log2 of sum(2^(scale * log2(e) * q.k)) per query.

  `ids`: None or (query ids [B, Tp], key ids [B, Sp]) int32 (`aigc_jax.nn.segments`): a query sees only keys of
  its id. `q_offset`: causal, query i sits at key position i + q_offset and sees the keys up to it (s - t for t
  queries that are the last t of s positions, as `flash` passes it). A query that sees no key gets zeros and an
  lse of +inf (so the backward's probabilities are 0)."""
  batch_size, q_seq_len, num_q_heads, head_dim = q.shape
  _, kv_seq_len, num_kv_heads, _ = k.shape
  dtype = q.dtype
  q_heads_per_kv_head = num_q_heads // num_kv_heads
  block_q, block_kv = BLOCK_Q, kv_block(head_dim, kv_seq_len)
  max_concurrent_steps = min(STAGES, kv_seq_len // block_kv)
  to_base2 = scale * math.log2(math.e)

  has_ids = ids is not None
  num_kv_steps = kv_seq_len // block_kv
  # Without ids or queries before the first key, every row sees key 0 in the first block it takes: the running max
  # may start at -inf, as upstream's. Else it starts finite and rows that saw nothing are caught at the end.
  rows_may_see_nothing = has_ids or (causal and q_offset < 0)

  def kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, out_ref, lse_ref, scoped):
    batch = lax.axis_index("batch")
    q_head = lax.axis_index("heads")
    smem_buffers, buffer_barriers, consumed_barriers, schedule_barrier = scoped
    wg_idx = lax.axis_index("wg")
    qo_smem2, k_smem, v_smem, lse_smem2, q_ids_smem2, kv_ids_smem = smem_buffers
    k_barriers, v_barriers, q_barriers, ids_barriers = buffer_barriers
    k_consumed_barriers, v_consumed_barriers = consumed_barriers
    def perform_schedule_barrier():
      plgpu.barrier_arrive(schedule_barrier)
      plgpu.barrier_wait(schedule_barrier)

    if causal:  # the K/V blocks the program's later consumer needs; the producer streams these
      _, block_max_kv_steps = causal_key_blocks(lax.axis_index("q_seq") * (2 * block_q), 2 * block_q, block_kv,
                                                num_kv_steps, q_offset)
    else:
      block_max_kv_steps = num_kv_steps

    @pl.when(wg_idx < 2)
    def _compute_wg():
      plgpu.set_max_registers(232, action="increase")
      qo_smem = qo_smem2.at[wg_idx]
      lse_smem = lse_smem2.at[wg_idx]
      q_seq_base = lax.axis_index("q_seq") * (2 * block_q) + wg_idx * block_q

      if causal:  # the blocks before full_kv_steps need no mask; the consumer takes none from kv_steps on
        full_kv_steps, kv_steps = causal_key_blocks(q_seq_base, block_q, block_kv, num_kv_steps, q_offset)
      else:
        kv_steps = block_max_kv_steps

      plgpu.copy_gmem_to_smem(
          q_ref.at[batch, pl.ds(q_seq_base, block_q), q_head],
          qo_smem,
          q_barriers.at[wg_idx],
      )
      plgpu.barrier_wait(q_barriers.at[wg_idx])
      if has_ids:
        plgpu.copy_gmem_to_smem(q_ids_ref.at[batch, pl.ds(q_seq_base, block_q)], q_ids_smem2.at[wg_idx],
                                ids_barriers.at[0, wg_idx])
        plgpu.barrier_wait(ids_barriers.at[0, wg_idx])
        q_ids = _load(q_ids_smem2.at[wg_idx], plgpu.Layout.WGMMA.reduce(1))

      m_i = plgpu.layout_cast(  # finite if needed: a row whose keys a block hides entirely gets 2^(-inf - m) = 0
          jnp.full((block_q,), chunked_lib.M_START if rows_may_see_nothing else -jnp.inf, dtype=jnp.float32),
          plgpu.Layout.WGMMA.reduce(1),
      )
      l_i = plgpu.layout_cast(
          jnp.full((block_q,), 0, dtype=jnp.float32),
          plgpu.Layout.WGMMA.reduce(1),
      )
      acc = plgpu.layout_cast(
          jnp.full((block_q, head_dim), 0, dtype=jnp.float32),
          plgpu.Layout.WGMMA,
      )

      @pl.when(kv_steps > 0)
      def _():
        plgpu.barrier_wait(k_barriers.at[0])

      pl.when(wg_idx == 1)(perform_schedule_barrier)
      def kv_loop(kv_step, carry, causal: bool = False):
        acc, m_i, l_i = carry
        slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))

        # QK
        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
          perform_schedule_barrier()
          return acc_ref[...]
        qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), jnp.float32))
        if has_ids:  # read with its K block, released with it
          plgpu.barrier_wait(ids_barriers.at[1, slot])
          kv_ids = _load(kv_ids_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
          qk = jnp.where(_same_ids(q_ids, kv_ids, qk.shape), qk, -jnp.inf)
        plgpu.barrier_arrive(k_consumed_barriers.at[slot])

        if causal:
          qk = jnp.where(_causal_keep(qk.shape, q_seq_base + q_offset, kv_step * block_kv, rows_are_queries=True),
                         qk, -jnp.inf)

        # Softmax
        # We keep m scaled by scale * log2e to use FMA instructions when computing p.
        m_ij = jnp.maximum(m_i, qk.max(axis=1) * to_base2)
        alpha = jnp.exp2(m_i - m_ij)
        m_i = m_ij
        p = jnp.exp2(qk * to_base2 - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i *= alpha
        p16 = p.astype(dtype)

        def end_softmax_barriers():
          plgpu.barrier_arrive(schedule_barrier)  # Done with softmax!
          plgpu.barrier_wait(v_barriers.at[slot])
          plgpu.barrier_wait(schedule_barrier)  # Wait until TensorCore is free.
        # Can't fully explain why, but empirically the ordering here influences
        # the performance of the final kernel quite significantly.
        if head_dim <= 128:
          l_i += p.sum(axis=1)
          acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
          end_softmax_barriers()
        else:
          end_softmax_barriers()
          l_i += p.sum(axis=1)

        # PV
        def compute_pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

          wait_step = kv_step + 1
          wait_slot = lax.rem(wait_step, jnp.array(max_concurrent_steps, kv_step.dtype))
          @pl.when(wait_step < kv_steps)
          def _wait():
            plgpu.barrier_wait(k_barriers.at[wait_slot])
        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed_barriers.at[slot])
        return acc, m_i, l_i

      if not causal:
        acc, m_i, l_i = lax.fori_loop(0, block_max_kv_steps, kv_loop, (acc, m_i, l_i))
      else:
        def epilogue_kv_loop(kv_step, _):
          # This loop makes sure that all the pipelined KV data is processed, even
          # if one compute wg finishes early like with causal masking.
          slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))
          plgpu.barrier_arrive(k_consumed_barriers.at[slot])
          plgpu.barrier_arrive(v_consumed_barriers.at[slot])
          perform_schedule_barrier()
          perform_schedule_barrier()

        causal_kv_loop = functools.partial(kv_loop, causal=True)
        # With causal masking, the KV loop unrolling is split in 3 sections:
        # 1. A fast path where no causal mask is needed.
        acc, m_i, l_i = lax.fori_loop(0, full_kv_steps, kv_loop, (acc, m_i, l_i))
        # 2. Causal masking.
        acc, m_i, l_i = lax.fori_loop(full_kv_steps, kv_steps, causal_kv_loop, (acc, m_i, l_i))
        # 3. Epilogue to flush the data pipeline.
        lax.fori_loop(kv_steps, block_max_kv_steps, epilogue_kv_loop, None)
      pl.when(wg_idx == 0)(perform_schedule_barrier)

      lse = m_i + jnp.log(l_i) * (1 / math.log(2))
      if rows_may_see_nothing:  # a row that saw no key: zeros, and p = 2^(s - inf) = 0 in the backward
        seen = l_i > 0
        l_i, lse = jnp.where(seen, l_i, 1.0), jnp.where(seen, lse, jnp.inf)
      # TODO(apaszke): Invert and multiply to avoid expensive divisions.
      acc /= lax.broadcast_in_dim(l_i, (block_q, head_dim), [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem[...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          qo_smem, out_ref.at[batch, pl.ds(q_seq_base, block_q), q_head],
      )
      plgpu.copy_smem_to_gmem(
          lse_smem,
          lse_ref.at[batch, q_head, pl.ds(q_seq_base, block_q)],
      )
      plgpu.wait_smem_to_gmem(0)
    @pl.when(wg_idx == 2)
    def _memory_wg():
      plgpu.set_max_registers(40, action="decrease")
      kv_head = lax.div(q_head, jnp.array(q_heads_per_kv_head, q_head.dtype))
      def fetch_ids(step, slot):
        if has_ids:
          plgpu.copy_gmem_to_smem(kv_ids_ref.at[batch, pl.ds(step * block_kv, block_kv)], kv_ids_smem.at[slot],
                                  ids_barriers.at[1, slot])

      def first_fetch(i):
        s = (batch, pl.ds(i * block_kv, block_kv), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[i], k_barriers.at[i])
        fetch_ids(i, i)
        plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[i], v_barriers.at[i])

      for i in range(max_concurrent_steps):  # causal: none the program will not take (upstream fetches them anyway)
        pl.when(i < block_max_kv_steps)(functools.partial(first_fetch, i))

      @pl.loop(0, block_max_kv_steps - max_concurrent_steps)
      def _kv_loop(kv_step):
        tma_step = kv_step + max_concurrent_steps
        tma_slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))
        s = (batch, pl.ds(tma_step * block_kv, block_kv), kv_head)
        plgpu.barrier_wait(k_consumed_barriers.at[tma_slot])
        plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[tma_slot], k_barriers.at[tma_slot])
        fetch_ids(tma_step, tma_slot)
        plgpu.barrier_wait(v_consumed_barriers.at[tma_slot])
        plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[tma_slot], v_barriers.at[tma_slot])

  def entry(q_ref, k_ref, v_ref, *refs):
    q_ids_ref, kv_ids_ref, out_ref, lse_ref = refs if has_ids else (None, None, *refs)
    compute_wgs = 2
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    qo_scratch = plgpu.SMEM(
        (compute_wgs, block_q, head_dim), dtype,
        transforms=(tiling, swizzle),
    )
    k_scratch = plgpu.SMEM(
        (max_concurrent_steps, block_kv, head_dim), dtype,
        transforms=(tiling, swizzle),
    )
    v_scratch = plgpu.SMEM(
        (max_concurrent_steps, block_kv, head_dim), dtype,
        transforms=(tiling, swizzle),
    )
    lse_scratch = plgpu.SMEM((compute_wgs, block_q), jnp.float32)
    ids_scratch = ((plgpu.SMEM((compute_wgs, block_q), jnp.int32), plgpu.SMEM((max_concurrent_steps, block_kv),
                                                                              jnp.int32)) if has_ids else (None, None))
    scratch = [qo_scratch, k_scratch, v_scratch, lse_scratch, *ids_scratch]
    pl.run_scoped(
        lambda *args: kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, out_ref, lse_ref, args),
        scratch,
        (
            plgpu.Barrier(num_barriers=max_concurrent_steps),
            plgpu.Barrier(num_barriers=max_concurrent_steps),
            plgpu.Barrier(num_barriers=compute_wgs),
            # the query ids of each consumer, the key ids of each K/V slot
            plgpu.Barrier(num_barriers=(2, max(compute_wgs, max_concurrent_steps))) if has_ids else None,
        ),
        (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=max_concurrent_steps),) * 2,
        plgpu.Barrier(num_arrivals=compute_wgs),
        collective_axes="wg",
    )

  num_q_tiles = q_seq_len // (2 * block_q)
  # The log-sum-exp keeps the sequence minor-most, so each warpgroup's rows are one 1-D TMA copy.
  out_shape = [q, jax.ShapeDtypeStruct((batch_size, num_q_heads, q_seq_len), jnp.float32)]

  out, lse = _warp_specialized(entry, out_type=out_shape, grid=(num_q_heads, num_q_tiles, batch_size),
                               grid_names=("heads", "q_seq", "batch"))(q, k, v, *(ids or ()))
  return out, lse


def _warp_specialized(kernel, **kwargs):
  """`plgpu.kernel` with this module's three warpgroups per program ("wg" 0 and 1 compute, 2 feeds them)."""
  return plgpu.kernel(kernel, num_threads=3, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                      **kwargs)


def reference(q, k, v, *, causal: bool, scale: float, ids=None, q_offset: int = 0):
  """What `forward` computes, in plain JAX: the contract the backwards read. Tests check the interpreted kernel
  against it, and run it in the kernel's place where jax has no Mosaic GPU interpreter (0.10.2)."""
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(jnp.float32)) * (scale * math.log2(math.e))
  if causal:
    scores = jnp.where(jnp.arange(k.shape[1]) <= jnp.arange(t)[:, None] + q_offset, scores, -jnp.inf)
  if ids is not None:
    q_ids, kv_ids = ids
    scores = jnp.where((q_ids[:, :, None] == kv_ids[:, None, :])[:, None, None], scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores * math.log(2), axis=-1) / math.log(2)  # [B, K, G, T], base 2
  lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # a row that sees no key: +inf, so its probabilities are 0
  probs = jnp.exp2(scores - lse[..., None])
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32)).reshape(b, t, h, d)
  return out.astype(v.dtype), lse.reshape(b, h, t)


BWD_BLOCK = 64  # the backward's rows per consumer warpgroup, and the rows of each block it streams
BWD_MAX_HEAD_DIM = 128  # above, the backward's tiles and two stages of streamed blocks outgrow shared memory


def backward_unsupported_reason(q_shape, k_shape) -> str | None:
  """Why `backward` cannot follow `forward` for these padded shapes, or None if it can."""
  tp, dp, sp = q_shape[1], q_shape[3], k_shape[1]
  if dp > BWD_MAX_HEAD_DIM:
    return f"the Hopper backward takes head_dim <= {BWD_MAX_HEAD_DIM} (got {dp})"
  if tp % (2 * BWD_BLOCK) or sp % (2 * BWD_BLOCK):
    return f"the Hopper backward takes lengths padded to a multiple of {2 * BWD_BLOCK} (got {tp} and {sp})"
  return None


def backward(q, k, v, out, lse, d_out, *, causal: bool, scale: float, ids=None, q_offset: int = 0):
  """FlashAttention-2's backward (Dao 2023, Algorithm 2) for Hopper, as two warp-specialised Mosaic GPU kernels.

  Takes `forward`'s padded inputs, its output and base-2 log-sum-exp, and d_out; returns dq [B, Tp, H, D] and dk, dv
  [B, Sp, K, D] in the inputs' dtype. The dQ kernel gives each of two consumer warpgroups 64 queries and streams K/V
  blocks to them from a producer warpgroup through TMA (as `forward` does); the dK/dV kernel gives each consumer 64
  keys and streams blocks of Q, dO, log-sum-exp and delta = rowsum(out * dO). Every matmul is a wgmma, the softmax's
  P and dS staying in registers as its A operand. Causal programs stream only the blocks on or below the diagonal
  and mask the ones that cross it; `ids` (as `forward`'s) stream beside the blocks they belong to, and `q_offset`
  moves the diagonal as `forward`'s. With grouped heads, a dK/dV program streams the blocks of every query head of
  its kv head's group, so dK and dV are summed over the group in fp32 registers and written once. Adapted from the
  backward in jax's `attention_mgpu.py` (jax 0.11.2, Copyright 2024 The JAX Authors, Apache-2.0), which has no
  causal variant, no softmax scale and float16 buffers.
  """
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))  # [B, H, Tp]
  kwargs = dict(causal=causal, scale=scale, q_offset=q_offset)
  dq = _dq(q, k, v, d_out, lse, delta, ids, **kwargs)
  dk, dv = _dkv(q, k, v, d_out, lse, delta, ids, **kwargs)
  return dq, dk, dv


def _bwd_smem(rows, head_dim, dtype, copies):
  """Shared memory for `copies` tiles of [rows, head_dim], in wgmma's tiled, swizzled layout."""
  return plgpu.SMEM((copies, rows, head_dim), dtype,
                    transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _ids_scratch(stages):
  """Shared memory and barriers for ids: each consumer's own rows' ids, and the streamed blocks' ids per slot."""
  return ((plgpu.SMEM((2, BWD_BLOCK), jnp.int32), plgpu.SMEM((stages, BWD_BLOCK), jnp.int32)),
          plgpu.Barrier(num_barriers=(2, max(2, stages))))


def _split_refs(refs, has_ids):
  """A backward kernel's refs after its six inputs: the two id refs, the outputs and the scratch, with Nones for
  the id refs, buffers and barriers a call without ids has not."""
  if not has_ids:
    return None, None, *refs[:-1], (None, None), None, refs[-1]
  *rest, ids_buffers, ids_ready, consumed = refs[2:]
  return refs[0], refs[1], *rest, ids_buffers, ids_ready, consumed


def _dq(q, k, v, d_out, lse, delta, ids, *, causal, scale, q_offset):
  b, tp, h, d = q.shape
  sp, g = k.shape[1], h // k.shape[2]
  dtype, block = q.dtype, BWD_BLOCK
  stages = min(STAGES, sp // block)
  to_base2 = scale * math.log2(math.e)
  has_ids = ids is not None

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    (q_ids_ref, kv_ids_ref, dq_ref, buffers, loaded, k_ready, v_ready, (q_ids_smem2, kv_ids_smem), ids_ready,
     consumed) = _split_refs(refs, has_ids)
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem = buffers
    program_base = lax.axis_index("q_seq") * (2 * block)
    if causal:  # the key blocks up to the program's last query; the ones from its first query on cross it
      masked_from, stop = causal_key_blocks(program_base, 2 * block, block, sp // block, q_offset)
    else:
      stop = masked_from = jnp.int32(sp // block)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q_base = program_base + wg * block
      rows = (batch, pl.ds(q_base, block), head)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, loaded.at[0, wg])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, loaded.at[1, wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, pl.ds(q_base, block)], lse_smem2.at[wg], loaded.at[2, wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, pl.ds(q_base, block)], delta_smem2.at[wg], loaded.at[3, wg])
      for i in range(4):
        plgpu.barrier_wait(loaded.at[i, wg])
      row_lse = _load(lse_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))
      row_delta = _load(delta_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))
      if has_ids:
        plgpu.copy_gmem_to_smem(q_ids_ref.at[batch, pl.ds(q_base, block)], q_ids_smem2.at[wg], ids_ready.at[0, wg])
        plgpu.barrier_wait(ids_ready.at[0, wg])
        row_ids = _load(q_ids_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))

      def step(j, dq_acc, masked=False):
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])

        def scores_and_d_probs(refs):  # one wgmma group: S = Q K^T and dP = dO V^T
          s_ref, dp_ref = refs
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
        zeros = plgpu.layout_cast(jnp.zeros((block, block), jnp.float32), plgpu.Layout.WGMMA)
        s, dp = pl.run_state(scores_and_d_probs)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
        s = s * to_base2
        if masked:
          s = jnp.where(_causal_keep(s.shape, q_base + q_offset, j * block, rows_are_queries=True), s, -jnp.inf)
        if has_ids:
          plgpu.barrier_wait(ids_ready.at[1, slot])
          s = jnp.where(_same_ids(row_ids, _load(kv_ids_smem.at[slot], plgpu.Layout.WGMMA.reduce(0)), s.shape), s,
                        -jnp.inf)
        p = jnp.exp2(s - lax.broadcast_in_dim(row_lse, s.shape, [0]))  # 0 for a row that sees no key (lse inf)
        ds = (p * (dp - lax.broadcast_in_dim(row_delta, dp.shape, [0]))).astype(dtype)

        def accumulate(acc_ref):
          plgpu.wgmma(acc_ref, ds, k_smem.at[slot])
        dq_acc = pl.run_state(accumulate)(plgpu.ACC.init(dq_acc))
        plgpu.barrier_arrive(consumed.at[slot])
        return dq_acc

      dq_acc = plgpu.layout_cast(jnp.zeros((block, d), jnp.float32), plgpu.Layout.WGMMA)
      dq_acc = lax.fori_loop(0, masked_from, step, dq_acc)
      if causal:
        dq_acc = lax.fori_loop(masked_from, stop, functools.partial(step, masked=True), dq_acc)
      q_smem[...] = (dq_acc * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      kv_head = lax.div(head, jnp.int32(g))

      def fetch(j, slot):
        blk = (batch, pl.ds(j * block, block), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[blk], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[blk], v_smem.at[slot], v_ready.at[slot])
        if has_ids:
          plgpu.copy_gmem_to_smem(kv_ids_ref.at[batch, pl.ds(j * block, block)], kv_ids_smem.at[slot],
                                  ids_ready.at[1, slot])

      for i in range(stages):
        pl.when(i < stop)(functools.partial(fetch, i, i))

      @pl.loop(stages, stop)
      def _refill(j):
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_wait(consumed.at[slot])
        fetch(j, slot)

  return _warp_specialized(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=[
          (_bwd_smem(block, d, dtype, 2), _bwd_smem(block, d, dtype, 2), plgpu.SMEM((2, block), jnp.float32),
           plgpu.SMEM((2, block), jnp.float32), _bwd_smem(block, d, dtype, stages),
           _bwd_smem(block, d, dtype, stages)),
          plgpu.Barrier(num_barriers=(4, 2)),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          *(_ids_scratch(stages) if has_ids else ()),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      ],
      grid=(h, tp // (2 * block), b),
      grid_names=("heads", "q_seq", "batch"),
  )(q, k, v, d_out, lse, delta, *(ids or ()))


def _dkv(q, k, v, d_out, lse, delta, ids, *, causal, scale, q_offset):
  b, tp, h, d = q.shape
  sp, kv_heads = k.shape[1], k.shape[2]
  g = h // kv_heads
  dtype, block = q.dtype, BWD_BLOCK
  nq = tp // block
  stages = min(STAGES, nq)
  to_base2 = scale * math.log2(math.e)
  has_ids = ids is not None

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    (q_ids_ref, kv_ids_ref, dk_ref, dv_ref, buffers, own, ready, (kv_ids_smem2, q_ids_smem), ids_ready,
     consumed) = _split_refs(refs, has_ids)
    batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem = buffers
    program_base = lax.axis_index("kv_seq") * (2 * block)
    if causal:  # the query blocks from the program's first key on; the ones before its last key cross it
      start, unmasked_from = causal_query_blocks(program_base, 2 * block, block, nq, q_offset)
    else:
      start = unmasked_from = jnp.int32(0)
    blocks = nq - start  # streamed per query head of the group; step n is head n // blocks, block start + n % blocks

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      kv_base = program_base + wg * block
      plgpu.copy_gmem_to_smem(k_ref.at[batch, pl.ds(kv_base, block), kv_head], k_smem, own.at[0, wg])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, pl.ds(kv_base, block), kv_head], v_smem, own.at[1, wg])
      plgpu.barrier_wait(own.at[0, wg])
      plgpu.barrier_wait(own.at[1, wg])
      if has_ids:
        plgpu.copy_gmem_to_smem(kv_ids_ref.at[batch, pl.ds(kv_base, block)], kv_ids_smem2.at[wg],
                                ids_ready.at[0, wg])
        plgpu.barrier_wait(ids_ready.at[0, wg])
        row_ids = _load(kv_ids_smem2.at[wg], plgpu.Layout.WGMMA.reduce(1))

      def step(i, carry, first_step, masked=False):
        dk_acc, dv_acc = carry
        slot = lax.rem(first_step + i - start, jnp.int32(stages))
        plgpu.barrier_wait(ready.at[0, slot])

        def scores_t(acc_ref):  # S^T: [keys, queries]
          plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]
        st = pl.run_scoped(scores_t, plgpu.ACC((block, block), jnp.float32)) * to_base2
        if masked:
          st = jnp.where(_causal_keep(st.shape, kv_base, i * block + q_offset, rows_are_queries=False), st,
                         -jnp.inf)
        if has_ids:
          plgpu.barrier_wait(ids_ready.at[1, slot])
          st = jnp.where(_same_ids(row_ids, _load(q_ids_smem.at[slot], plgpu.Layout.WGMMA.reduce(0)), st.shape),
                         st, -jnp.inf)
        plgpu.barrier_wait(ready.at[2, slot])
        col_lse = _load(lse_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
        pt = jnp.exp2(st - lax.broadcast_in_dim(col_lse, st.shape, [1]))
        plgpu.barrier_wait(ready.at[1, slot])

        def values_and_d_probs(refs):  # one wgmma group: dV += P^T dO and dP^T = V dO^T
          dv_ref, dpt_ref = refs
          plgpu.wgmma(dv_ref, pt.astype(dtype), do_smem.at[slot])
          plgpu.wgmma(dpt_ref, v_smem, do_smem.at[slot].transpose((1, 0)))
        zeros = plgpu.layout_cast(jnp.zeros((block, block), jnp.float32), plgpu.Layout.WGMMA)
        dv_acc, dpt = pl.run_state(values_and_d_probs)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(zeros)))
        plgpu.barrier_wait(ready.at[3, slot])
        col_delta = _load(delta_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
        dst = (pt * (dpt - lax.broadcast_in_dim(col_delta, dpt.shape, [1]))).astype(dtype)

        def accumulate(acc_ref):
          plgpu.wgmma(acc_ref, dst, q_smem.at[slot])
        dk_acc = pl.run_state(accumulate)(plgpu.ACC.init(dk_acc))
        plgpu.barrier_arrive(consumed.at[slot])
        return dk_acc, dv_acc

      def head_steps(j, carry):  # every query block of the group's j-th query head, summed into dK and dV in fp32
        first_step = j * blocks
        if causal:
          carry = lax.fori_loop(start, unmasked_from, functools.partial(step, first_step=first_step, masked=True),
                                carry)
        return lax.fori_loop(unmasked_from, nq, functools.partial(step, first_step=first_step), carry)

      zeros = plgpu.layout_cast(jnp.zeros((block, d), jnp.float32), plgpu.Layout.WGMMA)
      dk_acc, dv_acc = lax.fori_loop(0, g, head_steps, (zeros, zeros))
      k_smem[...] = (dk_acc * scale).astype(dtype)
      v_smem[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      rows = (batch, pl.ds(kv_base, block), kv_head)
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(n, slot):
        head = kv_head * g + lax.div(n, blocks)
        i = start + lax.rem(n, blocks)
        rows = (batch, pl.ds(i * block, block), head)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], ready.at[0, slot])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], ready.at[1, slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, pl.ds(i * block, block)], lse_smem.at[slot],
                                ready.at[2, slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, pl.ds(i * block, block)], delta_smem.at[slot],
                                ready.at[3, slot])
        if has_ids:
          plgpu.copy_gmem_to_smem(q_ids_ref.at[batch, pl.ds(i * block, block)], q_ids_smem.at[slot],
                                  ids_ready.at[1, slot])

      for n in range(stages):
        pl.when(n < g * blocks)(functools.partial(fetch, jnp.int32(n), n))

      @pl.loop(stages, g * blocks)
      def _refill(n):
        slot = lax.rem(n, jnp.int32(stages))
        plgpu.barrier_wait(consumed.at[slot])
        fetch(n, slot)

  return _warp_specialized(
      kernel,
      out_type=[jax.ShapeDtypeStruct(k.shape, dtype)] * 2,
      scratch_types=[
          (_bwd_smem(block, d, dtype, 2), _bwd_smem(block, d, dtype, 2), _bwd_smem(block, d, dtype, stages),
           _bwd_smem(block, d, dtype, stages), plgpu.SMEM((stages, block), jnp.float32),
           plgpu.SMEM((stages, block), jnp.float32)),
          plgpu.Barrier(num_barriers=(2, 2)),
          plgpu.Barrier(num_barriers=(4, stages)),
          *(_ids_scratch(stages) if has_ids else ()),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      ],
      grid=(kv_heads, sp // (2 * block), b),
      grid_names=("kv_heads", "kv_seq", "batch"),
  )(q, k, v, d_out, lse, delta, *(ids or ()))
