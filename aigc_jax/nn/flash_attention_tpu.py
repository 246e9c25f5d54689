"""FlashAttention on TPU: JAX's Pallas splash-attention kernels behind `aigc_jax.nn.attention`'s API.

`jax.experimental.pallas.ops.tpu.splash_attention` (the kernels MaxText trains with) does
the work: a forward, a dQ and a dK/dV Mosaic TPU kernel with a `jax.custom_vjp`, grouped
query heads, block-sparse static masks and segment ids. This module adapts it:
  * layout: q [B, T, H, D] -> [B, H, T, D], the kernel vmapped over the batch;
  * the 1/sqrt(D) scale, which the kernel leaves to its caller, is folded into q (in q's
    dtype: for bf16 one more rounding of q, as in MaxText);
  * any lengths: q and k/v are padded to whole blocks (multiples of 128, the TPU lane width);
  * causal with the T queries as the last T of S positions (cached decoding) is the
    kernel's lazy `CausalMask` with offset S - T, which also hides the padded keys;
  * segment ids go to the kernel as they are; key padding masks (broadcastable to
    [B, 1, 1, S]), and padded keys when not causal, become key ids no query has
    (`aigc_jax.nn.segments`);
  * a query row that can see no key gives zeros, as `flash` does on a GPU.
On a TPU the kernels compile through Mosaic; elsewhere they run in Pallas interpret mode
(slow, for checking numerics on CPU).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from aigc_jax.errors import UserError
from aigc_jax.nn import chunked_attention as chunked_lib
from aigc_jax.nn import flash_attention as flash_lib
from aigc_jax.nn import segments as segments_lib

LANES = 128  # TPU vector lane width: splash blocks are multiples of it
unsupported_error = flash_lib.unsupported_error  # the GPU kernels' sentence


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key block lengths (multiples of 128); None: `default_block` of the length."""
  block_q: int | None = None
  block_kv: int | None = None


def unsupported_reason(q_shape, k_shape, dtype, mask_shape=None) -> str | None:
  """Why the TPU `flash` kernels cannot run this call (a sentence fragment), or None if they can."""
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
    return f"'flash' on TPU supports float32 and bfloat16 inputs (got {jnp.dtype(dtype).name})"
  return flash_lib.unsupported_reason(q_shape, k_shape, dtype, mask_shape)


def default_block(length: int) -> int:
  """Longer blocks amortise each grid step's overhead; short sequences should not pad far."""
  return 512 if length >= 2048 else 256 if length >= 512 else LANES


def flash_attention(q, k, v, *, causal: bool = False, mask=None, segment_ids=None,
                    block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None):
  """Attention of q [B, T, H, D] over k, v [B, S, K, D]; `mask` is a key padding mask, boolean [B|1, 1, 1, S];
  `segment_ids` as `aigc_jax.nn.attention.dot_product_attention`'s."""
  b, t, h, d = q.shape
  s = k.shape[1]
  flash_lib.check_supported(unsupported_reason, q, k, mask)
  block_q, block_kv = block_sizes.block_q or default_block(t), block_sizes.block_kv or default_block(s)
  for name, size in (("block_q", block_q), ("block_kv", block_kv)):
    if size <= 0 or size % LANES:
      raise UserError(f"TPU flash attention {name} must be a positive multiple of {LANES} (got {size}).")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  tp, sp = chunked_lib.round_up(t, block_q), chunked_lib.round_up(s, block_kv)
  q = jnp.pad(q * jnp.asarray(d ** -0.5, q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  ids = segments_lib.with_key_padding(segments_lib.segment_pair(segment_ids, b, t, s), mask, b, t, s)
  if ids is None and sp > s and not causal:  # causal hides the padded keys by itself
    ids = segments_lib.with_key_padding(None, jnp.ones((1, 1, 1, s), bool), b, t, s)
  kernel = _kernel(h, tp, sp, causal, s - t, block_q, block_kv, interpret)
  if ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    q_ids, kv_ids = segments_lib.padded(ids, tp, sp)
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v, splash.SegmentIds(q_ids, kv_ids))
  out = out.transpose(0, 2, 1, 3)[:, :t]
  # The kernel gives a row that sees no key the mean of v (masked scores are finite); flash gives zeros.
  sees = segments_lib.rows_that_see_a_key(ids, t, s, causal)
  return out if sees is None else jnp.where(sees[:, :, None, None], out, jnp.zeros((), out.dtype))


@functools.lru_cache(maxsize=64)
def _kernel(heads, tp, sp, causal, offset, block_q, block_kv, interpret):
  """The splash kernel for one padded shape; building it walks the mask's blocks in numpy, so it is cached.

  Built under `ensure_compile_time_eval`: its mask tables are concrete arrays even when the
  first call is being traced, so the cached kernel holds no tracer of that trace.
  """
  head_mask = splash.CausalMask((tp, sp), offset=offset) if causal else splash.FullMask((tp, sp))
  mask = splash.MultiHeadMask([head_mask] * heads)
  blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                             block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                             block_kv_dq=block_kv)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
