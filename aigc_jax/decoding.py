"""Autoregressive generation for any language model of the zoo, as one compiled loop.

A model takes part by accepting `decode=True` with a `cache` collection (the
Transformer's KV cache, the LSTM's carry). Sampling is greedy (temperature 0),
temperature, top-k and top-p; those settings are traced values, so changing them
does not recompile. Beam search keeps `beams` hypotheses by summed log-probability.

A Transformer has a fixed context (`config.max_len`): the cache serves the
first `max_len` positions, and past them each new token is predicted from the
last `max_len` tokens recomputed in full, as nanoGPT does.
"""

import functools
import operator

import jax
import jax.numpy as jnp

from aigc_jax.errors import UserError
from aigc_jax.nn.layers import check_token_ids


def context_length(model) -> int | None:
  return getattr(model.config, "max_len", None)


def init_cache(model, batch_size: int):
  """An empty decode cache for `batch_size` sequences."""
  shapes = jax.eval_shape(
      functools.partial(model.init, decode=True), jax.random.PRNGKey(0), jnp.zeros((batch_size, 1), jnp.int32))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def decode_step(model, params, cache, tokens):
  """Feeds tokens [B, T] after those already in `cache`; returns (logits [B, T, V], cache)."""
  logits, updates = model.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
  return logits, updates["cache"]


def pick_tokens(logits, rng, temperature, top_k, top_p):
  """Samples one token per row of logits [B, V]; temperature 0 is greedy, top_k 0 and top_p 1 are off."""
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1)
  logits = logits / jnp.maximum(temperature, 1e-6)
  descending = -jnp.sort(-logits, axis=-1)
  kth = jnp.take(descending, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[:, None]
  logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
  descending = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(descending, axis=-1)
  kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the smallest prefix holding top_p of the mass
  threshold = jnp.take_along_axis(descending, jnp.sum(kept, axis=-1, keepdims=True) - 1, axis=-1)
  logits = jnp.where((top_p < 1.0) & (logits < threshold), -jnp.inf, logits)
  sampled = jax.random.categorical(rng, logits, axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def check_prompt(model, prompt_len: int, max_new_tokens: int, beams: int = 1, vocab_size: int | None = None):
  """One sentence for a request `sample` (beams 1) or `beam_search` cannot serve: an empty prompt, no new tokens,
  more beams than continuations, or a beam search past the model's context."""
  if prompt_len < 1:
    raise UserError("The prompt is empty; give at least one token (a character, for our models) to start from.")
  try:
    operator.index(max_new_tokens)  # it sizes the output: a Python (or numpy) integer
  except TypeError:
    raise UserError(f"max_new_tokens must be a whole number known before tracing, not {max_new_tokens!r}.") from None
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens is {max_new_tokens}; ask for at least one new token.")
  if beams < 1:
    raise UserError(f"beams is {beams}; search with at least one beam.")
  if beams > 1 and vocab_size is not None:
    continuations = 1  # vocab_size ** max_new_tokens, counted only as far as `beams`
    for _ in range(max_new_tokens):
      continuations *= vocab_size
      if continuations >= beams:
        break
    if continuations < beams:
      raise UserError(f"{beams} beams are more than the {continuations} distinct continuations of {max_new_tokens} "
                      f"token(s) from a vocabulary of {vocab_size}; use fewer beams or more new tokens.")
  max_len = context_length(model)
  if beams > 1 and max_len is not None and prompt_len > max_len:
    raise UserError(f"Beam search runs within the model's context of {max_len} tokens, and the prompt has "
                    f"{prompt_len}; shorten it to at most {max_len} tokens, or sample without beams.")
  if beams > 1 and max_len is not None and prompt_len + max_new_tokens > max_len + 1:
    raise UserError(
        f"Beam search runs within the model's context of {max_len} tokens, and the prompt plus new tokens "
        f"is {prompt_len + max_new_tokens}; ask for at most {max(max_len + 1 - prompt_len, 0)} new tokens.")


def settings_ok(temperature, top_k, top_p) -> bool:
  """Whether sampling can take these settings: 0 <= temperature < inf, top_k a whole number >= 0, 0 < top_p <= 1
  (NaN fails). Values traced under a caller's jax.jit cannot be looked at, and pass."""
  if any(isinstance(v, jax.core.Tracer) for v in (temperature, top_k, top_p)):
    return True
  return bool(0 <= temperature < float("inf") and 0 <= top_k < float("inf") and float(top_k).is_integer()
              and 0 < top_p <= 1)


def sample(model, params, prompt, rng, *, max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0):
  """Continues each row of prompt [B, P]; returns tokens [B, P + max_new_tokens].

  One compiled program per (model, shapes, max_new_tokens): the sampling settings are traced.
  """
  if not settings_ok(temperature, top_k, top_p):
    raise UserError(f"Sampling takes 0 <= temperature < inf, a whole top_k >= 0 and 0 < top_p <= 1; got "
                    f"{temperature}, {top_k} and {top_p}.")
  if jnp.ndim(prompt) != 2:
    raise UserError(f"sample takes prompts [batch, length] of token ids, and got shape {jnp.shape(prompt)}; for one "
                    f"prompt pass prompt[None].")
  check_prompt(model, jnp.shape(prompt)[1], max_new_tokens)
  check_token_ids(prompt, model.config.vocab_size, "The prompt")
  return _sample(model, params, jnp.asarray(prompt, jnp.int32), rng, max_new_tokens,
                 jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sample(model, params, prompt, rng, max_new_tokens, temperature, top_k, top_p):
  b, p = prompt.shape
  total = p + max_new_tokens
  max_len = context_length(model)
  cached_until = total - 1 if max_len is None else min(max_len, total - 1)  # last position predicted with the cache
  tokens = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt)

  def pick(position, logits):
    return pick_tokens(logits, jax.random.fold_in(rng, position), temperature, top_k, top_p)

  start = p
  if p <= cached_until:
    logits, cache = decode_step(model, params, init_cache(model, b), prompt)
    tokens = tokens.at[:, p].set(pick(p, logits[:, -1]))

    def cached(position, carry):  # predicts `position` from the token before it
      tokens, cache = carry
      logits, cache = decode_step(model, params, cache, jax.lax.dynamic_slice_in_dim(tokens, position - 1, 1, 1))
      return tokens.at[:, position].set(pick(position, logits[:, -1])), cache

    tokens, _ = jax.lax.fori_loop(p + 1, cached_until + 1, cached, (tokens, cache))
    start = cached_until + 1

  def windowed(position, tokens):  # predicts `position` from the last max_len tokens, recomputed
    window = jax.lax.dynamic_slice_in_dim(tokens, position - max_len, max_len, 1)
    logits = model.apply({"params": params}, window)
    return tokens.at[:, position].set(pick(position, logits[:, -1]))

  return jax.lax.fori_loop(start, total, windowed, tokens) if start < total else tokens


def beam_search(model, params, prompt, *, beams: int, max_new_tokens: int):
  """Beam search from prompt [P]; returns (tokens [beams, P + max_new_tokens], log-probs [beams]), best first.

  It runs within the model's context (prompt plus new tokens at most max_len + 1), from one prompt.
  """
  if jnp.ndim(prompt) != 1:
    raise UserError(f"beam_search takes one prompt [length] of token ids, and got shape {jnp.shape(prompt)}; search "
                    f"from each prompt in turn.")
  check_prompt(model, jnp.shape(prompt)[0], max_new_tokens, beams, vocab_size=model.config.vocab_size)
  check_token_ids(prompt, model.config.vocab_size, "The prompt", ndim=1)
  return _beam_search(model, params, jnp.asarray(prompt, jnp.int32), beams=beams, max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("model", "beams", "max_new_tokens"))
def _beam_search(model, params, prompt, *, beams: int, max_new_tokens: int):
  p = prompt.shape[0]
  total = p + max_new_tokens
  logits, cache = decode_step(model, params, init_cache(model, 1), prompt[None])
  cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0) if x.ndim else x, cache)
  logprobs = jnp.repeat(jax.nn.log_softmax(logits[:, -1]), beams, axis=0)  # [beams, V]
  scores = jnp.full((beams,), -jnp.inf).at[0].set(0.0)  # identical beams at first: expand only one
  tokens = jnp.zeros((beams, total), jnp.int32).at[:, :p].set(prompt)

  def step(position, carry):
    tokens, cache, scores, logprobs = carry
    vocab = logprobs.shape[-1]
    candidates = (scores[:, None] + logprobs).reshape(-1)
    scores, flat = jax.lax.top_k(candidates, beams)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    tokens = tokens[parent].at[:, position].set(token)
    cache = jax.tree.map(lambda x: x[parent] if x.ndim else x, cache)
    logits, cache = decode_step(model, params, cache, token[:, None])
    return tokens, cache, scores, jax.nn.log_softmax(logits[:, -1])

  tokens, _, scores, _ = jax.lax.fori_loop(p, total, step, (tokens, cache, scores, logprobs))
  return tokens, scores
