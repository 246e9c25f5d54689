import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.errors import UserError
from aigc_jax.nn.attention import dot_product_attention, resolve_implementation
from aigc_jax.nn import rotary_embedding


def naive_attention(q, k, v, keep):  # q [B, T, H, D], k/v [B, S, H, D], keep [T, S]
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(keep, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


def qkv(b=2, t=5, h=4, k=4, d=8, s=None):
  rng = np.random.default_rng(0)
  s = s or t
  return (rng.normal(size=(b, t, h, d)).astype(np.float32), rng.normal(size=(b, s, k, d)).astype(np.float32),
          rng.normal(size=(b, s, k, d)).astype(np.float32))


@pytest.mark.parametrize("causal", [False, True])
def test_xla_matches_naive(causal):
  q, k, v = qkv()
  keep = np.tril(np.ones((5, 5), bool)) if causal else np.ones((5, 5), bool)
  out = dot_product_attention(q, k, v, causal=causal, implementation="xla")
  np.testing.assert_allclose(out, naive_attention(q, k, v, keep), rtol=1e-5, atol=1e-5)


def test_grouped_query_heads_equal_repeated_kv_heads():
  q, k, v = qkv(h=4, k=2)
  out = dot_product_attention(q, k, v, causal=True)
  # query heads 0,1 read kv head 0; heads 2,3 read kv head 1
  expected = naive_attention(q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), np.tril(np.ones((5, 5), bool)))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_mask_and_causal_offset_for_cached_queries():
  q, k, v = qkv(t=2, s=6)
  mask = np.array([True, True, False, True, True, True])  # a padded key
  out = dot_product_attention(q, k, v, causal=True, mask=mask[None, None, None, :])
  keep = (np.arange(6)[None, :] <= np.arange(2)[:, None] + 4) & mask  # the 2 queries are positions 4 and 5
  np.testing.assert_allclose(out, naive_attention(q, k, v, keep), rtol=1e-5, atol=1e-5)


def test_auto_is_xla_on_cpu_and_cudnn_needs_a_gpu():
  assert jax.default_backend() == "cpu"
  assert resolve_implementation("auto", jnp.bfloat16, 64) == "xla"
  with pytest.raises(UserError, match="'cudnn' needs a GPU.*use 'xla' or 'auto'"):
    resolve_implementation("cudnn", jnp.bfloat16, 64)
  with pytest.raises(UserError, match="Unknown attention implementation 'flashy'"):
    resolve_implementation("flashy", jnp.float32, 64)


def test_cudnn_head_dims_follow_the_gpu_generation(monkeypatch):
  """cuDNN takes head_dim 256 from Hopper on, 128 before; `auto` follows, and the error names the bound."""
  from aigc_jax.nn import flash_attention_hopper
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(flash_attention_hopper, "gpu_compute_capability", lambda: (9, 0))  # H100
  assert resolve_implementation("auto", jnp.bfloat16, 256, q_len=4096, kv_len=4096) == "cudnn"
  assert resolve_implementation("cudnn", jnp.bfloat16, 256) == "cudnn"
  assert resolve_implementation("auto", jnp.float32, 64, q_len=4096, kv_len=4096) == "chunked"
  monkeypatch.setattr(flash_attention_hopper, "gpu_compute_capability", lambda: (8, 0))  # A100
  assert resolve_implementation("auto", jnp.bfloat16, 128) == "cudnn"
  assert resolve_implementation("auto", jnp.bfloat16, 256, q_len=4096, kv_len=4096) == "chunked"
  with pytest.raises(UserError, match="head_dim <= 128, a multiple of 8 .have gpu, bfloat16, head_dim 256"):
    resolve_implementation("cudnn", jnp.bfloat16, 256)


@pytest.fixture
def on_a_gpu(monkeypatch):
  """This CPU passed off as an A100, with jax.nn's xla path (cuDNN's conventions: causal aligned to the first
  query) standing in for its cuDNN kernel; yields the calls it got."""
  from aigc_jax.nn import flash_attention_hopper
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(flash_attention_hopper, "gpu_compute_capability", lambda: (8, 0))
  calls, xla = [], jax.nn.dot_product_attention

  def cudnn(q, k, v, *, mask, is_causal, implementation):
    assert implementation == "cudnn"
    calls.append(dict(mask=None if mask is None else mask.shape, is_causal=is_causal))
    return xla(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")

  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn)
  return calls


@pytest.mark.parametrize("t,s", [(4, 4), (2, 6), (6, 4)])
def test_cudnn_places_the_causal_diagonal_as_every_implementation_does(on_a_gpu, t, s):
  """Our causal queries are the last T of the S keys; cuDNN's are the first T, so T != S goes in as a mask."""
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(t=t, s=s, h=4, k=2, d=8))
  want = dot_product_attention(q, k, v, causal=True, implementation="xla")
  got = dot_product_attention(q, k, v, causal=True, implementation="cudnn")
  np.testing.assert_array_equal(np.isnan(np.asarray(got, np.float32)), False)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
  assert on_a_gpu == [dict(mask=None, is_causal=True) if t == s else dict(mask=(1, 1, t, s), is_causal=False)]


def test_cudnn_with_a_bias_needs_even_lengths_and_auto_goes_around_it(on_a_gpu):
  """jax's cuDNN backward refuses a mask (a bias) at odd lengths: `auto` picks another implementation there,
  an explicit 'cudnn' says so in one sentence."""
  long = dict(q_len=2047, kv_len=2047)
  assert resolve_implementation("auto", jnp.bfloat16, 64, **long) == "cudnn"  # no bias: any length
  assert resolve_implementation("auto", jnp.bfloat16, 64, q_len=2048, kv_len=2048, segments=True) == "cudnn"
  assert resolve_implementation("auto", jnp.bfloat16, 64, **long, segments=True) == "chunked"
  assert resolve_implementation("auto", jnp.bfloat16, 64, q_len=7, kv_len=7, mask_shape=(1, 1, 1, 7)) == "xla"
  assert resolve_implementation("auto", jnp.bfloat16, 64, q_len=3, kv_len=8, causal=True) == "xla"
  with pytest.raises(UserError, match="'cudnn' takes a mask or segment ids .* only at even lengths, and this call "
                                      "has 7 queries and 7 keys; use 'chunked' or 'xla', or pad"):
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(t=7, d=8))
    dot_product_attention(q, k, v, segment_ids=jnp.zeros((2, 7), jnp.int32), implementation="cudnn")
  assert on_a_gpu == []


@pytest.mark.parametrize("implementation", ["xla", "chunked", "flash"])
@pytest.mark.parametrize("shape", [(3, 1, 1, 6), (5, 6), (1, 1, 1, 7), (2, 1, 2, 4, 6)])
def test_a_mask_that_does_not_broadcast_is_one_sentence_for_every_implementation(implementation, shape):
  q, k, v = qkv(b=2, t=4, s=6, h=2, k=1, d=8)
  with pytest.raises(UserError, match=rf"Attention mask of shape \({', '.join(map(str, shape))}\) does not broadcast "
                                      r"to \[B, H, T, S\] = \[2, 2, 4, 6\]; give a boolean mask of that shape"):
    dot_product_attention(q, k, v, mask=np.ones(shape, bool), implementation=implementation)


def test_bf16_inputs_give_bf16_output_close_to_fp32():
  q, k, v = qkv()
  out = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), causal=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), naive_attention(q, k, v, np.tril(np.ones((5, 5), bool))),
                             atol=5e-2)


def test_rotary_embedding_rotates_feature_pairs_and_scores_see_only_relative_position():
  q, k, _ = qkv(b=1, t=6, h=2, k=2, d=8)
  positions = jnp.arange(6)
  rotated = np.asarray(rotary_embedding(q, positions))
  # pair (i, i + 4) at position p turns by p * 10000 ** (-i / 4): pair 0 at position 1 by 1 radian
  np.testing.assert_allclose(rotated[0, 1, :, 0], q[0, 1, :, 0] * np.cos(1) - q[0, 1, :, 4] * np.sin(1), rtol=1e-6)
  np.testing.assert_allclose(rotated[0, 1, :, 4], q[0, 1, :, 4] * np.cos(1) + q[0, 1, :, 0] * np.sin(1), rtol=1e-6)
  np.testing.assert_allclose(rotated[:, 0], q[:, 0], rtol=1e-6)  # position 0: unchanged
  np.testing.assert_allclose(np.hypot(rotated[..., :4], rotated[..., 4:]), np.hypot(q[..., :4], q[..., 4:]), rtol=1e-5)

  def scores(shift):
    return np.einsum("bthd,bshd->bhts", rotary_embedding(q, positions + shift), rotary_embedding(k, positions + shift))

  np.testing.assert_allclose(scores(37), scores(0), rtol=1e-4, atol=1e-4)
  assert not np.allclose(scores(0), np.einsum("bthd,bshd->bhts", q, k), atol=1e-2)
  with pytest.raises(ValueError, match="even head_dim"):
    rotary_embedding(q[..., :7], positions)


@pytest.mark.parametrize("dtypes, message", [
    (("bfloat16", "float32", "float32"), "one floating-point dtype; got bfloat16, float32, float32: cast them"),
    (("int32", "int32", "int32"), "one floating-point dtype; got int32, int32, int32"),
])
def test_inputs_the_implementations_would_disagree_on_are_refused(dtypes, message):
  """bf16 q with fp32 k, v came out fp32 from xla and bf16 from chunked; integer inputs computed in integers."""
  q, k, v = (jnp.ones((1, 4, 2, 8), dtype) for dtype in dtypes)
  for implementation in ("xla", "chunked", "auto"):
    with pytest.raises(ValueError, match=message):
      dot_product_attention(q, k, v, implementation=implementation)
  with pytest.raises(ValueError, match="at least one query and one key; got 4 queries and 0 keys"):
    dot_product_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 0, 2, 8)), jnp.ones((1, 0, 2, 8)),
                          implementation="chunked")  # was a ZeroDivisionError
