"""Segment ids for packed sequences: a query attends only to keys of its own segment.

`segment_ids` is an integer [B, T] array for self-attention (queries and keys share it),
or a pair (query ids [B, T], key ids [B, S]). The kernels (`chunked`, `flash`) compare
ids tile by tile instead of holding a [T, S] mask, and they carry a key padding mask the
same way: a hidden key gets the id `HIDDEN`, which no query has.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.errors import UserError

HIDDEN = int(jnp.iinfo(jnp.int32).min)  # the id of a key no query may see; not a valid segment id


def segment_pair(segment_ids, b: int, t: int, s: int):
  """(query ids [B, T], key ids [B, S]) as int32, or None; one sentence for anything else. A tuple is a pair; any
  other value (a list of rows too) is the ids of self-attention."""
  if segment_ids is None:
    return None
  pair = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
  pair = tuple(jnp.asarray(x) for x in pair)
  if (len(pair) != 2 or pair[0].shape != (b, t) or pair[1].shape != (b, s)
      or not all(jnp.issubdtype(x.dtype, jnp.integer) for x in pair)):
    raise UserError(f"segment_ids must be integer [B, T] = {[b, t]} (self-attention) or a tuple of query ids "
                    f"{[b, t]} and key ids {[b, s]}; got {[(x.shape, x.dtype.name) for x in pair]}.")
  return tuple(x.astype(jnp.int32) for x in pair)


def segment_mask(pair):
  """The boolean [B, 1, T, S] mask of a (query ids, key ids) pair."""
  q_ids, kv_ids = pair
  return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def rank4_shape(shape) -> tuple:
  """A mask shape with leading 1s up to rank 4, [B|1, H|1, T|1, S|1] for one that broadcasts to [B, H, T, S]."""
  return (1,) * (4 - len(shape)) + tuple(shape)


def mask_as_rank4(mask, b: int, h: int, t: int, s: int):
  """A boolean mask broadcastable to [B, H, T, S] as a rank-4 array; one sentence for one that is not.

  True keeps a key. A float mask is refused rather than cast: an additive bias (0 to keep, -inf to drop) would
  cast to the opposite mask. An integer mask is taken as 1 keeps, 0 drops (a tokenizer's attention_mask); where it
  is concrete, other values (an integer bias, 0 and -10000) are refused for the same reason.
  """
  dtype = jnp.result_type(mask)
  if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)):
    raise UserError(f"Attention mask has dtype {dtype}; give a boolean mask (True keeps a key), not an additive "
                    f"bias: for a bias b, pass b == 0.")
  if jnp.issubdtype(dtype, jnp.integer) and not isinstance(mask, jax.core.Tracer):
    values = np.unique(np.asarray(mask))
    if not set(values.tolist()) <= {0, 1}:
      raise UserError(f"Attention mask holds the integers {values[:4].tolist()}{'...' if len(values) > 4 else ''}, "
                      f"not only 0 and 1; give a boolean mask (True keeps a key), and for an additive bias b, pass "
                      f"b == 0.")
  mask = jnp.asarray(mask, bool)
  shape = rank4_shape(mask.shape)
  if mask.ndim > 4 or any(n not in (1, full) for n, full in zip(shape, (b, h, t, s))):
    raise UserError(f"Attention mask of shape {mask.shape} does not broadcast to [B, H, T, S] = "
                    f"{[b, h, t, s]}; give a boolean mask of that shape or with 1s where it broadcasts.")
  return mask.reshape(shape)


def with_key_padding(pair, mask, b: int, t: int, s: int):
  """Ids that also carry a key padding mask (broadcastable to [B, 1, 1, S]), or None if there is neither."""
  if mask is None and pair is None:
    return None
  q_ids, kv_ids = pair or (jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32))
  if mask is not None:
    mask = mask_as_rank4(mask, b, 1, 1, s)  # [B|1, 1, 1, S|1]
    keep = jnp.broadcast_to(mask[:, 0, 0, :], (b, s))
    kv_ids = jnp.where(keep, kv_ids, HIDDEN)
  return q_ids, kv_ids


def padded(pair, tp: int, sp: int):
  """Ids padded to Tp queries (id 0: their rows are dropped) and Sp keys (hidden)."""
  q_ids, kv_ids = pair
  return (jnp.pad(q_ids, ((0, 0), (0, tp - q_ids.shape[1]))),
          jnp.pad(kv_ids, ((0, 0), (0, sp - kv_ids.shape[1])), constant_values=HIDDEN))


def rows_that_see_a_key(pair, t: int, s: int, causal: bool):
  """[B|1, T] bool: whether each query row sees any key (causal: the T queries are the last T of S), or None
  when all do. A row sees a key when its segment's first key is in its causal window: found by a stable
  argsort of the key ids and a binary search per query, O((T + S) log S), never a [T, S] mask."""
  if pair is None:
    return None if not causal or t <= s else (jnp.arange(t) + (s - t) >= 0)[None]
  q_ids, kv_ids = pair
  order = jnp.argsort(kv_ids, axis=-1, stable=True)  # equal ids stay in position order
  sorted_ids = jnp.take_along_axis(kv_ids, order, axis=-1)
  at = jnp.clip(jax.vmap(functools.partial(jnp.searchsorted, side="left"))(sorted_ids, q_ids), 0, s - 1)
  present = jnp.take_along_axis(sorted_ids, at, axis=-1) == q_ids
  if not causal:
    return present
  first = jnp.take_along_axis(order, at, axis=-1)  # position of the segment's first key
  return present & (first <= jnp.arange(t)[None] + (s - t))


def check_contiguous(segment_ids) -> None:
  """One sentence for packed ids [B, T] where a segment resumes after another: positions restart there while its
  tokens still attend to its first part, so it is neither one sequence nor two. Checked where the ids are concrete
  (not traced under jax.jit)."""
  if isinstance(segment_ids, jax.core.Tracer):
    return
  ids = np.asarray(segment_ids)
  for row, row_ids in enumerate(ids.reshape(-1, ids.shape[-1]) if ids.ndim else []):
    runs = row_ids[np.concatenate([[True], row_ids[1:] != row_ids[:-1]])]  # the id of each run, in order
    if len(np.unique(runs)) != len(runs):
      again = next(i for i in runs if np.sum(runs == i) > 1)
      raise UserError(f"Segment {int(again)} of row {row} is split by another segment; packed sequences take each "
                      f"segment's tokens together, so give each piece its own id.")


def positions_in_segments(segment_ids):
  """[B, T] position of each token within its (contiguous) segment: 0 where a new segment starts."""
  segment_ids = jnp.asarray(segment_ids)
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
