import functools

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
  from aigc_jax.nn import gpus
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpus, "gpu_compute_capability", lambda: (9, 0))  # H100
  assert resolve_implementation("auto", jnp.bfloat16, 256, q_len=4096, kv_len=4096) == "cudnn"
  assert resolve_implementation("cudnn", jnp.bfloat16, 256) == "cudnn"
  assert resolve_implementation("auto", jnp.float32, 64, q_len=4096, kv_len=4096) == "chunked"
  monkeypatch.setattr(gpus, "gpu_compute_capability", lambda: (8, 0))  # A100
  assert resolve_implementation("auto", jnp.bfloat16, 128) == "cudnn"
  assert resolve_implementation("auto", jnp.bfloat16, 256, q_len=4096, kv_len=4096) == "chunked"
  with pytest.raises(UserError, match="head_dim <= 128, a multiple of 8 .have gpu, bfloat16, head_dim 256"):
    resolve_implementation("cudnn", jnp.bfloat16, 256)


@pytest.fixture
def on_a_gpu(monkeypatch):
  """This CPU passed off as an A100, with jax.nn's xla path (cuDNN's conventions: causal aligned to the first
  query) standing in for its cuDNN kernel; yields the calls it got."""
  from aigc_jax.nn import gpus
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpus, "gpu_compute_capability", lambda: (8, 0))
  calls, xla = [], jax.nn.dot_product_attention

  def cudnn(q, k, v, *, mask, is_causal, implementation):
    assert implementation == "cudnn"
    # jax's cuDNN call takes the mask as a bias and checks its layout (check_layout in jax/_src/cudnn): a padding
    # mask [B, 1, 1, S] raised "Bias must have same seq length as QKV" there.
    assert mask is None or mask.shape[2:] == (q.shape[1], k.shape[1]), mask.shape
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


def test_cudnn_gives_zeros_where_the_mask_and_causality_leave_no_key(on_a_gpu):
  """Left-padded prompts: queries 0 and 1 see only padding before them. The zeroing of empty rows read the mask
  alone, so with causal left to cuDNN those rows came out as a softmax over masked keys."""
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(t=4, h=2, k=2, d=8))
  mask = np.array([False, False, True, True])[None, None, None, :]
  want = dot_product_attention(q, k, v, causal=True, mask=mask, implementation="xla")
  got = dot_product_attention(q, k, v, causal=True, mask=mask, implementation="cudnn")
  np.testing.assert_array_equal(np.asarray(got[:, :2], np.float32), 0)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
  assert on_a_gpu == [dict(mask=(1, 1, 4, 4), is_causal=True)]


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
    (("bfloat16", "float32", "float32"), "one floating-point dtype and got bfloat16, float32, float32; cast them"),
    (("int32", "int32", "int32"), "one floating-point dtype and got int32, int32, int32"),
])
def test_inputs_the_implementations_would_disagree_on_are_refused(dtypes, message):
  """bf16 q with fp32 k, v came out fp32 from xla and bf16 from chunked; integer inputs computed in integers."""
  q, k, v = (jnp.ones((1, 4, 2, 8), dtype) for dtype in dtypes)
  for implementation in ("xla", "chunked", "auto"):
    with pytest.raises(UserError, match=message):
      dot_product_attention(q, k, v, implementation=implementation)
  with pytest.raises(UserError, match="Attention needs at least one query and one key; got 4 queries and 0 keys"):
    dot_product_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 0, 2, 8)), jnp.ones((1, 0, 2, 8)),
                          implementation="chunked")  # was a ZeroDivisionError


@pytest.mark.parametrize("shapes, message", [
    # k without its head axis: "query heads (2) must be a multiple of key/value heads (8)"
    (((1, 4, 2, 8), (1, 4, 8), (1, 4, 8)), r"takes q \[B, T, H, D\] and k, v \[B, S, K, D\] \(one B and D\) and got "
                                           r"q \(1, 4, 2, 8\), k \(1, 4, 8\), v \(1, 4, 8\); for one sequence"),
    (((1, 4, 2, 8), (1, 4, 1, 4), (1, 4, 1, 4)), r"and got q \(1, 4, 2, 8\), k \(1, 4, 1, 4\)"),  # other D
    (((1, 4, 2, 8), (1, 4, 0, 8), (1, 4, 0, 8)), "at least one key/value head"),  # a ZeroDivisionError
    (((1, 4, 2, 0), (1, 4, 1, 0), (1, 4, 1, 0)), "a head_dim of at least 1"),  # 0.0 ** -0.5
    (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "query heads a multiple of key/value heads"),
])
def test_shapes_no_implementation_can_take_are_one_sentence(shapes, message):
  q, k, v = (jnp.ones(shape) for shape in shapes)
  for implementation in ("xla", "chunked", "flash"):
    with pytest.raises(UserError, match=message):
      dot_product_attention(q, k, v, implementation=implementation)


@pytest.mark.parametrize("implementation", ["xla", "chunked", "flash"])
def test_an_empty_batch_gives_an_empty_output(implementation):
  """flash's Pallas grid cannot be empty: a batch (or query heads) of 0 was a slice TypeError there."""
  for b, h in ((0, 2), (2, 0)):
    q, k, v = jnp.ones((b, 4, h, 8)), jnp.ones((b, 4, 1 if h == 0 else h, 8)), jnp.ones((b, 4, 1 if h == 0 else h, 8))
    out, grads = jax.value_and_grad(lambda q: jnp.sum(dot_product_attention(q, k, v, implementation=implementation)))(q)
    assert (out, grads.shape) == (0.0, q.shape)
    assert dot_product_attention(q, k, v, implementation=implementation).shape == (b, 4, h, 8)


def test_float64_inputs_are_computed_in_float64():
  """Under jax_enable_x64 the scores and softmax were fp32: float64 out, float32 accuracy (check_grads failed)."""
  from jax.test_util import check_grads
  from aigc_jax.nn.chunked_attention import chunked_attention
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 8))) for _ in range(3))
    want = naive_attention(*map(np.asarray, (q, k, v)), np.tril(np.ones((6, 6), bool)))
    for attend in (functools.partial(dot_product_attention, implementation="xla"),
                   functools.partial(chunked_attention, block_q=4, block_k=4)):  # several tiles, one padded
      f = functools.partial(attend, causal=True)
      out = f(q, k, v)
      assert out.dtype == jnp.float64
      np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
      check_grads(f, (q, k, v), order=1, modes=["rev"])


def test_segment_ids_as_a_list_of_rows_are_self_attention_ids():
  """A list of B rows was read as a (query ids, key ids) pair and refused with shapes (5,) and (5,)."""
  q, k, v = qkv()
  rows = [[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]]
  np.testing.assert_array_equal(dot_product_attention(q, k, v, segment_ids=rows),
                                dot_product_attention(q, k, v, segment_ids=jnp.asarray(rows)))


NO_PALLAS_TRITON_SCRIPT = r"""
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # a JAX without Pallas Triton: importing it raises ImportError
import jax.numpy as jnp
import benchmarks.attention, aigc_jax.cli, aigc_jax.models, aigc_jax.train.loop  # import as ever
from aigc_jax.errors import UserError
from aigc_jax.nn.attention import dot_product_attention
from aigc_jax.nn.flash_attention import flash_attention
q = jnp.ones((1, 4, 2, 8))
for impl in ("auto", "xla", "chunked", "flash"):  # flash: its Triton kernels interpreted, as on any CPU
  print(impl, float(dot_product_attention(q, q, q, causal=True, implementation=impl).sum()))
try:
  flash_attention(q, q, q, interpret=False)  # compiled for a GPU: the Triton kernels' turn (float32)
except UserError as e:
  print(e)
# The Hopper kernels' forward, dQ and dK/dV, cross-lowered for an H100 as in test_attention_kernels.py.
import jax
from jax import export
h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
loss = lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False, hopper=True).astype(float).sum()
with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("_",), abstract_device=h100)):
  module = export.export(jax.jit(jax.grad(loss, (0, 1, 2))), platforms=("cuda",),
                         disabled_checks=[export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(x, x, x)
print("hopper kernels", module.mlir_module().count("@mosaic_gpu_v2("))
"""


def test_a_jax_without_pallas_triton_loses_only_the_compiled_triton_kernels():
  """Pallas Triton is deprecated since jax 0.11. Without it every module imports, every implementation runs here
  (flash's kernels interpreted), the Hopper kernels still lower for an H100, and compiling the Triton kernels says
  what to do in one sentence."""
  import os
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", NO_PALLAS_TRITON_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[:4] == ["auto 64.0", "xla 64.0", "chunked 64.0", "flash 64.0"]  # all ones: 4 queries x 2 heads x 8
  assert lines[4:] == [f"Attention implementation 'flash' runs this call on its Triton kernels (the Hopper ones take "
                       f"bf16/fp16 on an H100/H200, backward up to head_dim 128), and jax {jax.__version__} could not "
                       f"import Pallas Triton (ModuleNotFoundError: import of jax.experimental.pallas.triton halted; "
                       f"None in sys.modules); use 'chunked' or 'xla' for this call.", "hopper kernels 3"]


def test_flash_kernels_that_fail_to_import_are_one_sentence(monkeypatch):
  """The kernel modules are imported on first use of `flash`, so a JAX whose Pallas API has moved (jax 0.12 broke
  an import-time probe of the Hopper module, and with it every model) breaks `flash` alone."""
  import types
  from aigc_jax.nn import attention as attention_lib

  def moved(name):
    raise KeyError("idx")
  monkeypatch.setattr(attention_lib, "importlib", types.SimpleNamespace(import_module=moved))
  q = jnp.ones((1, 4, 2, 8))
  with pytest.raises(UserError) as raised:
    dot_product_attention(q, q, q, implementation="flash")
  assert str(raised.value) == (f"Attention implementation 'flash' could not load its Pallas kernels on jax "
                               f"{jax.__version__} (KeyError: 'idx'); use 'chunked' or 'xla', or install a jax that "
                               f"setup.cfg accepts.")
  assert float(dot_product_attention(q, q, q, implementation="auto").sum()) == 64.0
