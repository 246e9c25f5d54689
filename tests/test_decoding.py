import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import decoding
from aigc_jax.errors import UserError
from aigc_jax.nn import segments
from aigc_jax.models import LSTM, LSTMConfig, Transformer, TransformerConfig

VOCAB = 11


def transformer(**kw):
  config = TransformerConfig(vocab_size=VOCAB, max_len=8, num_layers=2, num_heads=4, emb_dim=16, attention="xla")
  return Transformer(config.__class__(**{**config.__dict__, **kw}))


MODELS = {
    "transformer": transformer(),
    "transformer_gqa_untied": transformer(num_kv_heads=2, tie_embeddings=False, use_bias=True),
    "transformer_rope": transformer(position_encoding="rope"),
    "lstm": LSTM(LSTMConfig(vocab_size=VOCAB, emb_dim=8, hidden_dim=16, num_layers=2)),
    # bf16 compute: the decode cache keeps the carry in fp32, as the full forward does
    "lstm_bf16": LSTM(LSTMConfig(vocab_size=VOCAB, emb_dim=8, hidden_dim=16, num_layers=2, dtype=jnp.bfloat16)),
}


decode_step = jax.jit(decoding.decode_step, static_argnums=0)
apply = jax.jit(lambda model, params, tokens: model.apply({"params": params}, tokens), static_argnums=0)


def params_of(model, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_full_recomputation(name):
  model = MODELS[name]
  params = params_of(model)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, VOCAB)
  full = apply(model, params, tokens)
  cache = decoding.init_cache(model, 2)
  prefill, cache = decode_step(model, params, cache, tokens[:, :3])  # a 3-token prompt, then one at a time
  pieces = [prefill]
  for t in range(3, 8):
    logits, cache = decode_step(model, params, cache, tokens[:, t:t + 1])
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def greedy_by_recomputation(model, params, prompt, n):
  tokens = list(prompt)
  max_len = decoding.context_length(model) or len(prompt) + n
  for _ in range(n):
    window = jnp.asarray(tokens[-max_len:])[None]
    tokens.append(int(jnp.argmax(apply(model, params, window)[0, -1])))
  return tokens


@pytest.mark.parametrize("name", MODELS)
def test_greedy_sampling_matches_recomputation_past_the_context(name):
  model = MODELS[name]
  params = params_of(model)
  prompt = [1, 2, 3]
  out = decoding.sample(model, params, jnp.asarray([prompt]), jax.random.PRNGKey(0), max_new_tokens=10,
                        temperature=0.0)  # 13 tokens > max_len 8: the windowed phase runs too
  assert out.shape == (1, 13)
  assert out[0].tolist() == greedy_by_recomputation(model, params, prompt, 10)


def test_prompt_longer_than_the_context():
  model = MODELS["transformer"]
  params = params_of(model)
  prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
  out = decoding.sample(model, params, jnp.asarray([prompt]), jax.random.PRNGKey(0), max_new_tokens=3, temperature=0.0)
  assert out[0].tolist() == greedy_by_recomputation(model, params, prompt, 3)


def test_pick_tokens_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)

  def support(temperature=1.0, top_k=0, top_p=1.0):
    return set(np.asarray(jax.vmap(lambda key: decoding.pick_tokens(logits, key, temperature, top_k, top_p)[0])(keys)))

  assert support(temperature=0.0) == {0}
  assert support() == {0, 1, 2, 3}
  assert support(top_k=2) == {0, 1}
  assert support(top_p=0.5) == {0}  # 0.5 alone reaches the mass
  assert support(top_p=0.7) == {0, 1}
  assert support(top_p=0.81) == {0, 1, 2}
  assert support(top_k=3, top_p=0.99) == {0, 1, 2}


def test_sampling_is_seeded_and_settings_do_not_recompile():
  model = MODELS["transformer"]
  params = params_of(model)
  prompt = jnp.asarray([[1, 2]])
  run = lambda seed, **kw: decoding.sample(model, params, prompt, jax.random.PRNGKey(seed), max_new_tokens=6, **kw)
  a = run(0, temperature=1.0)
  np.testing.assert_array_equal(a, run(0, temperature=1.0))
  assert not np.array_equal(a, run(1, temperature=1.0)) or not np.array_equal(a, run(2, temperature=1.0))
  compiled = decoding._sample._cache_size()
  run(3, temperature=0.5, top_k=3, top_p=0.9)
  run(4, temperature=0.0)
  assert decoding._sample._cache_size() == compiled


def sequence_logprob(model, params, tokens, prompt_len):
  logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(tokens)[None, :-1])[0])
  return float(sum(logp[t - 1, tokens[t]] for t in range(prompt_len, len(tokens))))


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_beam_search_scores_are_sequence_logprobs_and_beat_greedy(name):
  model = MODELS[name]
  params = params_of(model, seed=3)
  prompt = jnp.asarray([4, 5])
  tokens, scores = decoding.beam_search(model, params, prompt, beams=4, max_new_tokens=5)
  assert tokens.shape == (4, 7)
  assert np.all(np.diff(np.asarray(scores)) <= 0)  # best first
  assert len({tuple(row) for row in np.asarray(tokens).tolist()}) == 4  # distinct hypotheses
  for row, score in zip(np.asarray(tokens).tolist(), np.asarray(scores)):
    assert row[:2] == [4, 5]
    np.testing.assert_allclose(score, sequence_logprob(model, params, row, 2), rtol=1e-4, atol=1e-4)
  greedy = greedy_by_recomputation(model, params, [4, 5], 5)
  assert scores[0] >= sequence_logprob(model, params, greedy, 2) - 1e-5
  one, _ = decoding.beam_search(model, params, prompt, beams=1, max_new_tokens=5)
  assert one[0].tolist() == greedy


def test_bad_generation_requests():
  model = MODELS["transformer"]
  with pytest.raises(UserError, match="prompt is empty"):
    decoding.check_prompt(model, 0, 5)
  with pytest.raises(UserError, match="ask for at most 6 new tokens"):
    decoding.check_prompt(model, 3, 7, beams=2)
  decoding.check_prompt(model, 3, 7, beams=1)  # sampling slides past the context
  with pytest.raises(UserError, match="the prompt has 9; shorten it to at most 8 tokens, or sample without beams"):
    decoding.check_prompt(model, 9, 1, beams=2)
  with pytest.raises(UserError, match="5 beams are more than the 3 distinct continuations of 1 token.s. from a "
                                      "vocabulary of 3; use fewer beams or more new tokens"):
    decoding.check_prompt(model, 2, 1, beams=5, vocab_size=3)
  decoding.check_prompt(model, 2, 2, beams=5, vocab_size=3)  # 9 continuations of 2 tokens
  params, rng = params_of(model), jax.random.PRNGKey(0)
  for settings in (dict(top_p=0.0), dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
                   dict(temperature=float("inf")), dict(top_k=2.7)):  # 2.7 was cast to 2
    with pytest.raises(UserError, match=r"Sampling takes 0 <= temperature < inf, a whole top_k >= 0 and "
                                        r"0 < top_p <= 1; got "):
      decoding.sample(model, params, jnp.array([[1, 2]]), rng, max_new_tokens=2, **settings)
  for prompt in ([[1, VOCAB]], [[-1, 2]]):  # would silently read another token's embedding
    with pytest.raises(UserError, match=rf"outside the model's vocabulary 0..{VOCAB - 1}; encode it with"):
      decoding.sample(model, params, jnp.array(prompt), rng, max_new_tokens=2)
  with pytest.raises(UserError, match=rf"token ids from 1 to {VOCAB}, outside the model's vocabulary"):
    decoding.beam_search(model, params, jnp.array([1, VOCAB]), beams=2, max_new_tokens=2)
  # The library functions check what the command line checks (these gave NaN scores, duplicate beams, tracebacks).
  with pytest.raises(UserError, match="the prompt plus new tokens is 10; ask for at most 5 new tokens"):
    decoding.beam_search(model, params, jnp.array([1, 2, 3, 4]), beams=2, max_new_tokens=6)
  with pytest.raises(UserError, match=rf"12 beams are more than the {VOCAB} distinct continuations of 1 token"):
    decoding.beam_search(model, params, jnp.array([1, 2]), beams=12, max_new_tokens=1)
  with pytest.raises(UserError, match="beams is 0; search with at least one beam"):
    decoding.beam_search(model, params, jnp.array([1, 2]), beams=0, max_new_tokens=1)
  with pytest.raises(UserError, match=r"beam_search takes one prompt \[length\] of token ids, and got shape \(1, 2\)"):
    decoding.beam_search(model, params, jnp.array([[1, 2]]), beams=2, max_new_tokens=1)
  with pytest.raises(UserError, match=r"sample takes prompts \[batch, length\] of token ids, and got shape \(2,\); "
                                      r"for one prompt pass prompt\[None\]"):
    decoding.sample(model, params, jnp.array([1, 2]), rng, max_new_tokens=2)
  with pytest.raises(UserError, match="The prompt is empty"):
    decoding.sample(model, params, jnp.zeros((1, 0), jnp.int32), rng, max_new_tokens=2)
  with pytest.raises(UserError, match="The prompt must be integer token ids, not float32"):  # was truncated to 1
    decoding.sample(model, params, jnp.array([[1.7]]), rng, max_new_tokens=2)
  with pytest.raises(UserError, match="max_new_tokens must be a whole number known before tracing, not 2.0"):
    decoding.sample(model, params, jnp.array([[1, 2]]), rng, max_new_tokens=2.0)


@pytest.mark.parametrize("name", ["transformer", "transformer_rope", "lstm"])
def test_the_models_refuse_token_ids_their_embedding_cannot_look_up(name):
  """Called directly (not through decoding), an id past the vocabulary gave NaN logits and -1 the last token's."""
  model = MODELS[name]
  params = params_of(model)
  apply = lambda tokens: model.apply({"params": params}, tokens)
  for tokens, lowest, highest in (([[0, 1, VOCAB]], 0, VOCAB), ([[-1, 2]], -1, 2)):
    with pytest.raises(UserError, match=rf"The input has token ids from {lowest} to {highest}, outside the model's "
                                        rf"vocabulary 0..{VOCAB - 1}"):
      apply(jnp.array(tokens))
  with pytest.raises(UserError, match=r"must be \[batch, length\] token ids, not an array of shape \(3,\); for "
                                      r"one sequence pass tokens\[None\]"):
    apply(jnp.array([0, 1, 2]))
  with pytest.raises(UserError, match="must be integer token ids, not float32"):
    apply(jnp.array([[0.0, 1.0]]))
  # Under jit the ids are traced: shapes and dtypes are still checked, and in-range ids run as before.
  with pytest.raises(UserError, match="must be integer token ids"):
    jax.eval_shape(apply, jax.ShapeDtypeStruct((1, 2), jnp.float32))
  np.testing.assert_allclose(jax.jit(apply)(jnp.array([[0, VOCAB - 1]])), apply(jnp.array([[0, VOCAB - 1]])),
                             rtol=1e-5, atol=1e-7)  # jit fuses what eager runs op by op


@pytest.mark.parametrize("name", ["transformer", "transformer_rope"])
def test_decoding_past_the_cache_is_refused_where_the_index_is_known(name):
  """Past max_len the learned table gave NaN logits and rotary keys overwrote the last slot, silently."""
  model, tokens = MODELS[name], jnp.ones((1, 9), jnp.int32)  # max_len 8
  params = params_of(model)
  cache = model.init(jax.random.PRNGKey(0), tokens[:, :1], decode=True)["cache"]
  _, cache = decoding.decode_step(model, params, cache, tokens[:, :8])
  with pytest.raises(UserError, match="The KV cache holds 8 positions and 8 are used, so 1 more do not fit"):
    decoding.decode_step(model, params, cache, tokens[:, 8:])


def test_rotary_attention_positions_default_to_the_tokens_order():
  from aigc_jax.nn.layers import MultiHeadAttention
  layer = MultiHeadAttention(num_heads=2, num_kv_heads=2, head_dim=4, max_len=8, rotary=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 8)), jnp.float32)
  params = layer.init(jax.random.PRNGKey(0), x, positions=jnp.arange(5))
  np.testing.assert_array_equal(layer.apply(params, x), layer.apply(params, x, positions=jnp.arange(5)))
  # rotary attention depends on position differences: a shift changes nothing, a stretch does
  np.testing.assert_allclose(layer.apply(params, x), layer.apply(params, x, positions=jnp.arange(5) + 3), atol=1e-6)
  assert not np.allclose(layer.apply(params, x), layer.apply(params, x, positions=2 * jnp.arange(5)), atol=1e-6)


def test_generation_runs_under_the_callers_jit():
  """A prompt the caller closes over is concrete inside its jit, and checked; the calls trace through."""
  model = MODELS["transformer"]
  params, rng, prompt = params_of(model), jax.random.PRNGKey(0), jnp.array([[1, 2]])
  sampled = jax.jit(lambda p: decoding.sample(model, p, prompt, rng, max_new_tokens=3, temperature=0.0))(params)
  np.testing.assert_array_equal(sampled[0], greedy_by_recomputation(model, params, [1, 2], 3))
  beams = jax.jit(lambda p: decoding.beam_search(model, p, prompt[0], beams=2, max_new_tokens=2))(params)
  np.testing.assert_array_equal(beams[0], decoding.beam_search(model, params, prompt[0], beams=2, max_new_tokens=2)[0])
  bad = prompt + VOCAB
  with pytest.raises(UserError, match="outside the model's vocabulary"):  # still checked inside the caller's jit
    jax.jit(lambda p: decoding.sample(model, p, bad, rng, max_new_tokens=1))(params)


def test_rope_transformer_has_no_position_table_and_unknown_encodings_are_refused():
  assert "position" in params_of(MODELS["transformer"])["embed"]
  assert "position" not in params_of(MODELS["transformer_rope"])["embed"]
  with pytest.raises(UserError, match="Unknown position_encoding 'alibi'; use one of learned, rope"):
    transformer(position_encoding="alibi")


def test_transformer_shapes_that_do_not_fit_are_one_sentence():
  with pytest.raises(UserError, match="emb_dim 16 does not split into 3 heads; use an emb_dim that is a multiple"):
    transformer(num_heads=3)
  with pytest.raises(UserError, match="4 query heads do not share 3 key/value heads evenly; use a num_kv_heads"):
    transformer(num_kv_heads=3)
  with pytest.raises(UserError, match="Rotary positions rotate pairs of features and head_dim is 3; use an even"):
    transformer(position_encoding="rope", num_heads=4, emb_dim=12)
  with pytest.raises(UserError, match="The Transformer's num_heads is 0; it must be at least 1"):  # was a ZeroDivision
    transformer(num_heads=0)
  with pytest.raises(UserError, match=r"num_kv_heads is -1; use 0 \(as many as query heads\) or a divisor"):
    transformer(num_kv_heads=-1)
  model = MODELS["transformer"]  # learned positions, max_len 8
  with pytest.raises(UserError, match="9 tokens are more than the 8 positions the model learned; feed at most 8"):
    model.apply({"params": params_of(model)}, jnp.zeros((1, 9), jnp.int32))
  rope = MODELS["transformer_rope"]  # no table: longer inputs are fine outside the KV cache
  assert rope.apply({"params": params_of(rope)}, jnp.zeros((1, 9), jnp.int32)).shape == (1, 9, VOCAB)


@pytest.mark.parametrize("position_encoding,attention", [("learned", "xla"), ("rope", "chunked"), ("rope", "flash")])
def test_packed_sequences_give_the_logits_they_give_alone(position_encoding, attention):
  """Two rows, each packing sequences of lengths 3+5 and 8: positions restart and attention stays inside each."""
  model = transformer(position_encoding=position_encoding, attention=attention)
  params = params_of(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, 8)), jnp.int32)
  segment_ids = jnp.asarray([[4, 4, 4, 9, 9, 9, 9, 9], [1] * 8], jnp.int32)
  packed = model.apply({"params": params}, tokens, segment_ids=segment_ids)
  alone = [model.apply({"params": params}, tokens[:1, :3]), model.apply({"params": params}, tokens[:1, 3:]),
           model.apply({"params": params}, tokens[1:])]
  np.testing.assert_allclose(packed[0, :3], alone[0][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 3:], alone[1][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[1], alone[2][0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(packed[0, 3:], model.apply({"params": params}, tokens[:1])[0, 3:], atol=1e-3)  # not a no-op


def test_positions_restart_in_each_segment_and_decoding_refuses_segments():
  np.testing.assert_array_equal(segments.positions_in_segments(jnp.asarray([[0, 0, 1, 1, 1, 0], [5, 5, 5, 5, 5, 5]])),
                                [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])
  model = MODELS["transformer"]
  tokens = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(UserError, match="Segment 0 of row 1 is split by another segment; .* give each piece its own id"):
    model.apply({"params": params_of(model)}, tokens, segment_ids=jnp.asarray([[0, 0, 1, 1], [0, 1, 0, 1]]))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), decode=True)
  with pytest.raises(UserError, match="segment_ids mark packed sequences.*decode without them"):
    model.apply(variables, jnp.zeros((1, 1), jnp.int32), segment_ids=jnp.zeros((1, 1), jnp.int32), decode=True,
                mutable=["cache"])
