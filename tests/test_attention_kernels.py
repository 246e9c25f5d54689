"""`chunked` and `flash` (Pallas, interpret mode on CPU) against the `xla` reference: outputs and gradients.

`flash` is two kernel families: Triton (GPU) and splash attention (TPU, `flash_tpu` here).
Blocks of 16 with lengths 24 and 40 make every chunked and Triton case run several tiles,
a padded last tile and (causal) skipped tiles; the TPU kernels' blocks are at least 128
(the lane width), so there every length is one padded block. Gradients are of a fixed
random linear functional sum(out * w) with respect to q, k and v.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.errors import UserError
from aigc_jax.nn import attention as attention_lib
from aigc_jax.nn import flash_attention_hopper, flash_attention_tpu, gpus, segments
from aigc_jax.nn.attention import CHUNKED_MIN_SCORES, dot_product_attention, resolve_implementation
from aigc_jax.nn.chunked_attention import chunked_attention
from aigc_jax.nn.flash_attention import BlockSizes, flash_attention

import mosaic_gpu_interpret  # tests/, on sys.path under pytest

TINY_FLASH = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
IMPLS = {
    "chunked": lambda q, k, v, **kw: chunked_attention(q, k, v, block_q=16, block_k=16, **kw),
    "flash": lambda q, k, v, **kw: flash_attention(q, k, v, block_sizes=TINY_FLASH, **kw),
    "flash_tpu": flash_attention_tpu.flash_attention,
}


def qkv(b=2, t=40, s=40, h=4, kv_heads=2, d=64, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, h, d), (b, s, kv_heads, d),
                                                                      (b, s, kv_heads, d)))
  w = rng.normal(size=(b, t, h, d)).astype(np.float32)
  return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), w


def out_and_grads(fn, q, k, v, w):
  """fn's output and d sum(out * w) / d(q, k, v), in one compiled function, as fp32 numpy arrays."""
  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(jnp.asarray(w, out.dtype)))
  return [np.asarray(x, np.float32) for x in run(q, k, v)]


def assert_matches_xla(impl, q, k, v, w, *, causal, mask=None, tol=None, **kwargs):
  got = out_and_grads(lambda q, k, v: IMPLS[impl](q, k, v, causal=causal, mask=mask, **kwargs), q, k, v, w)
  if tol is None:  # fp32: the same sums in another order
    want = out_and_grads(lambda q, k, v: dot_product_attention(q, k, v, causal=causal, mask=mask, **kwargs),
                         q, k, v, w)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
  else:
    assert_near_xla_in_fp32(got, q, k, v, w, tol, causal=causal, mask=mask, **kwargs)


def assert_near_xla_in_fp32(got, q, k, v, w, tol, **kwargs):
  """bf16 `out_and_grads` against xla's in fp32 on the same rounded inputs, relative to the largest entry."""
  want = out_and_grads(lambda q, k, v: dot_product_attention(q, k, v, **kwargs),
                       *(x.astype(jnp.float32) for x in (q, k, v)), w)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), name


# Every pair of (causal, head_dim, dtype) values once: the full product compiles twice as long.
@pytest.mark.parametrize("causal,head_dim,dtype", [(False, 64, jnp.float32), (True, 128, jnp.float32),
                                                   (True, 64, jnp.bfloat16), (False, 128, jnp.bfloat16)])
def test_chunked_matches_xla(causal, head_dim, dtype):
  q, k, v, w = qkv(b=2 if head_dim == 64 else 1, d=head_dim, dtype=dtype)  # 4 query heads on 2 kv heads
  assert_matches_xla("chunked", q, k, v, w, causal=causal, tol=None if dtype == jnp.float32 else 3e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_cross_attention_and_cached_queries(causal):
  q, k, v, w = qkv(b=1, t=24, s=40, h=2, kv_heads=1)  # causal: the 24 queries are the last 24 of 40 positions
  assert_matches_xla("chunked", q, k, v, w, causal=causal)


@pytest.mark.parametrize("mask_shape,causal", [((2, 1, 1, 40), True), ((2, 4, 40, 40), False), ((40, 40), True)])
def test_chunked_masks(mask_shape, causal):
  q, k, v, w = qkv()
  mask = np.random.default_rng(1).random(mask_shape) > 0.3
  mask[..., 0] = True  # every query row sees at least one key
  assert_matches_xla("chunked", q, k, v, w, causal=causal, mask=mask)


def test_chunked_rows_that_see_no_key_give_zeros_and_no_nans():
  q, k, v, w = qkv(b=1, t=24, s=40, h=2, kv_heads=1)
  mask = np.ones((1, 1, 24, 40), bool)
  mask[0, 0, 3] = False
  out, dq, dk, dv = out_and_grads(lambda q, k, v: IMPLS["chunked"](q, k, v, mask=mask), q, k, v, w)
  assert np.all(out[0, 3] == 0) and np.all(dq[0, 3] == 0)
  assert np.isfinite(dk).all() and np.isfinite(dv).all()


def test_chunked_rejects_a_mask_that_does_not_broadcast():
  q, k, v, _ = qkv()
  with pytest.raises(UserError, match=r"does not broadcast to \[B, H, T, S\]"):
    chunked_attention(q, k, v, mask=np.ones((3, 1, 1, 40), bool))


@pytest.mark.parametrize("impl", ["xla", "chunked", "flash"])
def test_an_additive_bias_is_refused_not_cast_to_the_opposite_mask(impl):
  q, k, v, _ = qkv()
  attend = IMPLS.get(impl) or functools.partial(dot_product_attention, implementation=impl)
  bias = np.where(np.arange(40) < 20, 0.0, -np.inf).astype(np.float32)[None, None, None, :]  # keep the first 20
  with pytest.raises(UserError, match="Attention mask has dtype float32; give a boolean mask .True keeps a key., "
                                      "not an additive bias: for a bias b, pass b == 0."):
    attend(q, k, v, mask=bias)
  ones = attend(q, k, v, mask=(bias == 0).astype(np.int32))  # 0/1 integers are a mask
  np.testing.assert_allclose(ones, attend(q, k, v, mask=bias == 0), rtol=1e-6, atol=1e-6)
  # An integer bias was cast to bool: 0 (keep) became False, -10000 (drop) True, the opposite mask.
  with pytest.raises(UserError, match=r"Attention mask holds the integers \[-10000, 0\], not only 0 and 1; give a "
                                      r"boolean mask .True keeps a key., and for an additive bias b, pass b == 0."):
    attend(q, k, v, mask=np.where(bias == 0, 0, -10000).astype(np.int32))


# flash runs interpreted here, and each case compiles for seconds: a few cases that cover the features.
@pytest.mark.parametrize("impl", ["flash", "flash_tpu"])
@pytest.mark.parametrize("case", ["causal_gqa_key_padding", "cross_head_dim_128", "cached_causal", "causal_bf16"])
def test_flash_matches_xla(impl, case):
  if case == "causal_gqa_key_padding":
    q, k, v, w = qkv(h=4, kv_heads=2)
    mask = np.random.default_rng(1).random((2, 1, 1, 40)) > 0.3
    mask[..., 0] = True
    assert_matches_xla(impl, q, k, v, w, causal=True, mask=mask)
  elif case == "cross_head_dim_128":
    q, k, v, w = qkv(b=1, t=24, s=40, h=2, kv_heads=1, d=128)
    assert_matches_xla(impl, q, k, v, w, causal=False)
  elif case == "cached_causal":  # the 24 queries are the last 24 of 40 positions
    q, k, v, w = qkv(b=1, t=24, s=40, h=2, kv_heads=1)
    assert_matches_xla(impl, q, k, v, w, causal=True)
  else:
    q, k, v, w = qkv(b=1, h=4, kv_heads=2, dtype=jnp.bfloat16)
    assert_matches_xla(impl, q, k, v, w, causal=True, tol=3e-2)


def packed(b, t, seed=3):
  """Sorted segment ids [B, T] (up to 4 packed sequences per row) and a key padding mask that keeps
  each sequence's first key, so every query row sees a key, causal or not."""
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(0, 4, size=(b, t)), axis=1).astype(np.int32)
  starts = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  return seg, ((rng.random((b, t)) > 0.3) | starts)[:, None, None]


def test_xla_segment_ids_are_the_mask_they_stand_for():
  q, k, v, _ = qkv()
  seg, _ = packed(2, 40)
  want = dot_product_attention(q, k, v, causal=True, mask=seg[:, None, :, None] == seg[:, None, None, :])
  np.testing.assert_array_equal(dot_product_attention(q, k, v, causal=True, segment_ids=seg), want)
  q_ids = seg[:, :24]  # a pair: 24 queries over the 40 keys
  want = dot_product_attention(q[:, :24], k, v, mask=q_ids[:, None, :, None] == seg[:, None, None, :])
  np.testing.assert_array_equal(dot_product_attention(q[:, :24], k, v, segment_ids=(q_ids, seg)), want)


@pytest.mark.parametrize("impl", ["chunked", "flash", "flash_tpu"])
def test_segment_ids_match_xla(impl):
  q, k, v, w = qkv(h=4, kv_heads=2)
  seg, mask = packed(2, 40)
  assert_matches_xla(impl, q, k, v, w, causal=True, mask=mask, segment_ids=seg)
  q, k, v, w = qkv(b=2, t=24, s=40, h=2, kv_heads=1)  # cross attention with a pair of ids
  assert_matches_xla(impl, q, k, v, w, causal=False, segment_ids=(seg[:, :24], seg))


def test_bad_segment_ids_are_one_sentence():
  q, k, v, _ = qkv()
  with pytest.raises(UserError, match=r"segment_ids must be integer \[B, T\] = \[2, 40\] \(self-attention\)"):
    dot_product_attention(q, k, v, segment_ids=np.zeros((2, 39), np.int32))
  with pytest.raises(UserError, match="segment_ids must be integer"):
    dot_product_attention(q, k, v, segment_ids=np.zeros((2, 40), np.float32), implementation="chunked")


def test_rows_that_see_a_key_without_a_score_matrix():
  q_ids = np.array([[0, 0, 1, 2, 2]], np.int32)
  kv_ids = np.array([[segments.HIDDEN, 0, 1, 1, 3]], np.int32)  # key 0 hidden; segment 2 has no key
  sees = lambda causal, t=5, s=5: np.asarray(segments.rows_that_see_a_key((q_ids, kv_ids), t, s, causal))
  np.testing.assert_array_equal(sees(False), [[True, True, True, False, False]])
  np.testing.assert_array_equal(sees(True), [[False, True, True, False, False]])  # row 0 sees key 0 only
  assert segments.rows_that_see_a_key(None, 5, 5, True) is None
  np.testing.assert_array_equal(segments.rows_that_see_a_key(None, 5, 3, True), [[False, False, True, True, True]])


def test_flash_tpu_rows_that_see_no_key_give_zeros_and_finite_gradients():
  q, k, v, w = qkv(b=2, t=40, s=24, h=2, kv_heads=1)  # causal with more queries than keys: rows 0-15 see none
  mask = np.ones((2, 1, 1, 24), bool)
  mask[1] = False  # and batch row 1 sees no key at all
  out, dq, dk, dv = out_and_grads(lambda q, k, v: IMPLS["flash_tpu"](q, k, v, causal=True, mask=mask), q, k, v, w)
  assert np.all(out[0, :16] == 0) and np.all(dq[0, :16] == 0) and np.all(out[1] == 0) and np.all(dq[1] == 0)
  assert np.abs(out[0, 16:]).min(axis=-1).max() > 0  # the rest attend
  assert np.isfinite(dk).all() and np.isfinite(dv).all() and np.all(dk[1] == 0) and np.all(dv[1] == 0)


def test_every_implementation_gives_zeros_and_no_gradient_where_a_row_sees_no_key():
  """`auto` moves from xla to chunked with the length: the same model must not change its outputs there."""
  # Causal with 6 queries on 4 keys: queries 0, 1 come before every key; query 2 sees key 0 only, of another
  # segment; query 3 sees keys 0, 1, of another segment too. Queries 4 and 5 see keys 2 (and 3).
  q, k, v, w = qkv(b=2, t=6, s=4, h=2, kv_heads=1, d=64)
  pair = (np.array([[0, 0, 5, 1, 1, 1]] * 2, np.int32), np.array([[0, 0, 1, 1]] * 2, np.int32))
  mask = np.ones((2, 1, 1, 4), bool)
  mask[1] = False  # batch row 1 sees no key at all
  results = {}
  for impl in ("xla", "chunked", "flash"):
    attend = lambda q, k, v: dot_product_attention(q, k, v, causal=True, mask=mask, segment_ids=pair,
                                                   implementation=impl)
    results[impl] = out, dq, dk, dv = out_and_grads(attend, q, k, v, w)
    assert np.all(out[:, :4] == 0) and np.all(dq[:, :4] == 0), impl
    assert np.all(out[1] == 0) and np.all(dq[1] == 0) and np.all(dk[1] == 0) and np.all(dv[1] == 0), impl
    assert np.abs(out[0, 4:]).min() > 0, impl  # the rest attend
  for impl in ("chunked", "flash"):
    for got, want in zip(results[impl], results["xla"]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flash_refuses_a_second_order_gradient_in_one_sentence():
  """Its backward kernels cannot be differentiated: grad of grad failed inside Pallas ("Linearization failed",
  or a bare AssertionError when causal)."""
  q, k, v, w = qkv(b=1, t=16, s=16, h=2, kv_heads=1, d=16)
  for causal in (False, True):
    def out_sum(q):
      return jnp.sum(IMPLS["flash"](q, k, v, causal=causal) * w)
    jax.grad(out_sum)(q)  # first order: fine
    with pytest.raises(UserError, match="'flash' has first-order gradients only .*; use implementation='chunked' or "
                                        "'xla' for a gradient penalty"):
      jax.grad(lambda q: jnp.sum(jax.grad(out_sum)(q) ** 2))(q)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_takes_second_order_gradients_and_explicit_sharding(causal):
  """A gradient penalty differentiates the attention's gradient; a mesh with Explicit axes types every value with
  its sharding, the loop carries included. Both worked for xla and broke chunked (auto's pick from 1024^2 scores)."""
  q, k, v, w = qkv(b=2, t=40, s=40, h=2, kv_heads=1, d=16)

  def penalty(impl):
    def out_sum(q, k, v):
      return jnp.sum(dot_product_attention(q, k, v, causal=causal, implementation=impl) * w)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.grad(out_sum)(q, k, v) ** 2), (0, 1, 2)))

  def chunked(q, k, v):  # small blocks: several of them, some skipped where causal
    return jnp.sum(IMPLS["chunked"](q, k, v, causal=causal) * w)
  chunked_penalty = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.grad(chunked)(q, k, v) ** 2), (0, 1, 2)))
  for got, want in zip(chunked_penalty(q, k, v), penalty("xla")(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = [jax.device_put(x, rows) for x in (q, k, v)]
    got = jax.jit(jax.value_and_grad(chunked, (0, 1, 2)))(*sharded)
  want = jax.value_and_grad(chunked, (0, 1, 2))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_flash_tpu_rejects_what_its_kernels_lack_in_one_sentence():
  q, k, v, _ = qkv(b=1, t=8, s=8, h=2, kv_heads=1, d=16)
  with pytest.raises(UserError, match=r"'flash' on TPU supports float32 and bfloat16 inputs \(got float16\); use"):
    flash_attention_tpu.flash_attention(q.astype(jnp.float16), k, v)
  with pytest.raises(UserError, match="only key padding masks.*'chunked' or 'xla'"):
    flash_attention_tpu.flash_attention(q, k, v, mask=np.ones((8, 8), bool))
  with pytest.raises(UserError, match="block_q must be a positive multiple of 128 \\(got 64\\)"):
    flash_attention_tpu.flash_attention(q, k, v, block_sizes=flash_attention_tpu.BlockSizes(block_q=64))


def test_flash_picks_its_kernels_by_backend(monkeypatch):
  from aigc_jax.nn import flash_attention as triton_kernels
  assert attention_lib.flash_kernels() is triton_kernels  # Triton (and Mosaic GPU): on a GPU, and interpreted here
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention_lib.flash_kernels() is flash_attention_tpu
  with pytest.raises(UserError, match="'flash' on TPU supports float32 and bfloat16.*'chunked' or 'xla'"):
    resolve_implementation("flash", jnp.float16, 64, q_len=256, kv_len=256)
  assert resolve_implementation("auto", jnp.bfloat16, 128, q_len=4096, kv_len=4096) == "chunked"


@pytest.mark.parametrize("impl", ["flash", "flash_tpu"])
def test_flash_takes_masks_that_broadcast_over_the_keys(impl):
  """[B, 1, 1, 1] keeps or hides a whole row's keys (a hidden row gives zeros, as chunked does); [1] keeps all."""
  q, k, v, _ = qkv(b=2, t=24, s=24, h=2, kv_heads=1, d=16)
  rows = np.array([True, False]).reshape(2, 1, 1, 1)
  got = np.asarray(IMPLS[impl](q, k, v, mask=rows))
  np.testing.assert_allclose(got, IMPLS["chunked"](q, k, v, mask=rows), rtol=1e-4, atol=1e-4)
  assert np.all(got[1] == 0) and np.all(got[0] != 0)
  got = IMPLS[impl](q, k, v, mask=np.ones((1,), bool))
  np.testing.assert_allclose(got, IMPLS["chunked"](q, k, v), rtol=1e-4, atol=1e-4)


def test_flash_rejects_full_masks_and_names_what_works():
  q, k, v, _ = qkv()
  with pytest.raises(UserError, match="only key padding masks.*use implementation 'chunked' or 'xla'"):
    flash_attention(q, k, v, mask=np.ones((2, 4, 40, 40), bool))
  with pytest.raises(UserError, match="only key padding masks.*'chunked' or 'xla'"):
    dot_product_attention(q, k, v, mask=np.ones((40, 40), bool), implementation="flash")
  with pytest.raises(UserError, match="power of 2"):
    flash_attention(q, k, v, block_sizes=BlockSizes(block_q=24))


@pytest.mark.parametrize("implementation", ["chunked", "flash"])
def test_public_function_dispatches(implementation):
  q, k, v, _ = qkv(b=1, t=8, s=8, h=2, kv_heads=1, d=16)
  out = dot_product_attention(q, k, v, causal=True, implementation=implementation)
  np.testing.assert_allclose(out, dot_product_attention(q, k, v, causal=True), rtol=1e-5, atol=1e-5)


def test_auto_picks_chunked_for_long_sequences_off_gpu():
  assert jax.default_backend() == "cpu"
  assert CHUNKED_MIN_SCORES == 1024 * 1024
  assert resolve_implementation("auto", jnp.float32, 64, q_len=2048, kv_len=2048) == "chunked"
  assert resolve_implementation("auto", jnp.bfloat16, 128, q_len=1024, kv_len=1024) == "chunked"
  assert resolve_implementation("auto", jnp.float32, 64, q_len=1023, kv_len=1024) == "xla"
  assert resolve_implementation("auto", jnp.float32, 64, q_len=1, kv_len=4096) == "xla"  # one cached query
  assert resolve_implementation("auto", jnp.float32, 64) == "xla"
  with pytest.raises(UserError, match="'cudnn' needs a GPU.*'chunked'"):
    resolve_implementation("cudnn", jnp.bfloat16, 64, q_len=4096, kv_len=4096)


# The GPU the cross-lowerings target: jax >= 0.11's Triton lowering asks the mesh's abstract device for the
# compute capability where no GPU is attached ("No supported GPU devices found").
H100 = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def _gpu_module(fn, *args):
  """fn cross-lowered for CUDA here (`jax.export`): the Pallas lowerings run in full, compiling for the GPU does not."""
  from jax import export
  allow = [export.DisabledSafetyCheck.custom_call(name) for name in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2")]
  h100 = jax.sharding.AbstractMesh((1,), ("_",), abstract_device=jax.sharding.AbstractDevice(**H100))
  with jax.sharding.use_abstract_mesh(h100):
    return export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=allow)(*args).mlir_module()


@pytest.mark.parametrize("causal", [False, True])
def test_flash_kernels_lower_through_triton_for_a_gpu(causal):
  """Cross-lowers for CUDA on this CPU: Pallas's Triton lowering runs in full, compiling to PTX does not."""
  q = jax.ShapeDtypeStruct((2, 300, 4, 128), jnp.bfloat16)  # grouped heads, a length no block divides
  k = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, 1, 1, 300), jnp.bool_)
  fwd = lambda q, k, v, mask: flash_attention(q, k, v, causal=causal, mask=mask, interpret=False)
  grad = jax.grad(lambda *args: fwd(*args).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  for fn, kernels in ((fwd, ["forward"]), (grad, ["forward", "dkv", "dq"])):
    module = _gpu_module(fn, q, k, k, mask)
    assert module.count("@__gpu$xla.gpu.triton(") == len(kernels)
    for kernel in kernels:
      assert f'name = "flash_attention_{kernel}"' in module


def test_flash_tpu_kernels_lower_through_mosaic_for_a_tpu():
  """Cross-lowers for TPU here (`jax.export`): Pallas's Mosaic lowering runs in full; the TPU compiler does not."""
  from jax import export
  q = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)  # grouped heads, head_dim 64, a length no block divides
  k = jax.ShapeDtypeStruct((2, 300, 2, 64), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, 1, 1, 300), jnp.bool_)
  fwd = lambda q, k, v, mask: flash_attention_tpu.flash_attention(q, k, v, causal=True, mask=mask, interpret=False)
  grad = jax.grad(lambda *args: fwd(*args).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  for fn, kernels in ((fwd, ["fwd_segmented_no_residuals"]),
                      (grad, ["fwd_segmented_residuals", "dq_segmented_no_residuals", "dkv_segmented_no_residuals"])):
    module = export.export(jax.jit(fn), platforms=("tpu",))(q, k, k, mask).mlir_module()
    assert module.count("tpu_custom_call") == len(kernels)
    for kernel in kernels:
      assert f'kernel_name = "splash_mha_{kernel}"' in module


@pytest.mark.parametrize("causal, t, s, head_dim", [(False, 200, 384, 128), (True, 300, 300, 128),
                                                    (True, 300, 300, 256), (True, 100, 500, 32)])
def test_flash_hopper_kernels_lower_for_an_h100(causal, t, s, head_dim):
  """The Mosaic GPU kernels for bf16, grouped heads and padded lengths (causal over a cache too, and a head_dim
  padded to 64): the forward, and the dQ and dK/dV kernels after it up to head_dim 128; above, the two Triton
  backward kernels."""
  q = jax.ShapeDtypeStruct((2, t, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, s, 2, head_dim), jnp.bfloat16)
  fwd = lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=False, hopper=True)
  grad = jax.grad(lambda *args: fwd(*args).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  module = _gpu_module(fwd, q, k, k)
  assert module.count("@mosaic_gpu_v2(") == 1 and "@__gpu$xla.gpu.triton(" not in module
  module = _gpu_module(grad, q, k, k)
  if head_dim <= flash_attention_hopper.BWD_MAX_HEAD_DIM:
    assert module.count("@mosaic_gpu_v2(") == 3 and "@__gpu$xla.gpu.triton(" not in module
  else:
    assert module.count("@mosaic_gpu_v2(") == 1 and module.count("@__gpu$xla.gpu.triton(") == 2
    assert 'name = "flash_attention_dkv"' in module and 'name = "flash_attention_dq"' in module


def test_flash_takes_the_hopper_kernels_only_where_they_can_run(monkeypatch):
  # K/V blocks: the longest that divides the keys and, two stages of K and V deep, fits 227 KiB of shared memory.
  assert [flash_attention_hopper.kv_block(d, 512) for d in (64, 128, 256)] == [256, 128, 64]
  assert flash_attention_hopper.kv_block(64, 384) == 128 and flash_attention_hopper.kv_block(512, 512) is None
  monkeypatch.setattr(gpus, "on_hopper", lambda: True)
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  q, k = bf16(1, 256, 2, 64), bf16(1, 256, 1, 64)
  forward = lambda causal=True, **kw: (lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=False, **kw))
  uses_hopper = lambda fn, *args: "@mosaic_gpu_v2(" in _gpu_module(fn, *args)
  assert uses_hopper(forward(), q, k, k)
  assert uses_hopper(forward(causal=False), bf16(1, 100, 2, 64), k, k)
  mask = jax.ShapeDtypeStruct((1, 1, 1, 256), jnp.bool_)
  assert uses_hopper(lambda q, k, v, m: forward(mask=m)(q, k, v), q, k, k, mask)  # masks and segments: as ids
  assert uses_hopper(forward(causal=False), q, bf16(1, 200, 1, 64), bf16(1, 200, 1, 64))  # padded keys: as ids
  assert uses_hopper(forward(), bf16(1, 128, 2, 64), k, k)  # causal over a cache: the queries' offset
  assert uses_hopper(forward(), bf16(1, 256, 2, 80), bf16(1, 256, 1, 80), bf16(1, 256, 1, 80))  # D zero-padded
  assert uses_hopper(forward(), bf16(1, 256, 2, 32), bf16(1, 256, 1, 32), bf16(1, 256, 1, 32))  # to 128, to 64
  f32 = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)
  assert not uses_hopper(forward(), f32, f32, f32)
  with pytest.raises(UserError, match="Hopper flash forward cannot run this call: it takes bfloat16 and float16 "
                                      r"\(got float32\); leave hopper=None"):
    _gpu_module(forward(hopper=True), f32, f32, f32)
  monkeypatch.setattr(gpus, "on_hopper", lambda: False)  # e.g. an A100
  assert not uses_hopper(forward(), q, k, k)


@pytest.mark.parametrize("causal, padded_keys, cache, d", [(False, False, 0, 64), (True, False, 0, 64),
                                                          (False, True, 0, 64), (True, False, 56, 32)])
def test_flash_hopper_forward_contract_meets_the_triton_backward(monkeypatch, causal, padded_keys, cache, d):
  """`flash_attention_hopper.reference` (the kernel's output and base-2 log-sum-exp, in plain JAX) in the kernel's
  place, for jax 0.10.2, which cannot interpret it: the padding (padded keys hidden by ids, head_dim 32 zero-padded
  to 64 under the true scale), the queries' offset over a cache of keys before them, and that the Triton dK/dV and
  dQ kernels (the backward above head_dim 128) read its log-sum-exp right, against xla, values and gradients."""
  calls, ids_seen = [], []
  def stand_in(*args, ids, **kwargs):
    calls.append(dict(kwargs, ids=ids is not None, head_dim=args[0].shape[-1]))
    if ids is not None:  # traced here: their values come back through a callback
      jax.debug.callback(lambda *x: ids_seen.append([np.asarray(a) for a in x]), *ids)
    return flash_attention_hopper.reference(*args, ids=ids, **kwargs)
  monkeypatch.setattr(flash_attention_hopper, "forward", stand_in)
  monkeypatch.setattr(flash_attention_hopper, "backward_unsupported_reason", lambda *shapes: "the Triton one's turn")
  s = 200 + cache if causal or padded_keys else 256
  q, k, v, w = qkv(b=1, t=200, s=s, h=2, kv_heads=1, d=d, dtype=jnp.bfloat16)
  got = out_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=causal, hopper=True), q, k, v, w)
  assert calls == [{"causal": causal, "scale": d ** -0.5, "ids": padded_keys, "q_offset": cache, "head_dim": 64}]
  if padded_keys:  # the 56 keys padded to 256 get the id no query has
    (q_ids, kv_ids), = ids_seen
    np.testing.assert_array_equal(q_ids, np.zeros((1, 256)))
    np.testing.assert_array_equal(kv_ids[0], np.where(np.arange(256) < 200, 0, segments.HIDDEN))
  assert_near_xla_in_fp32(got, q, k, v, w, 3e-2, causal=causal)


needs_mosaic_gpu_interpreter = pytest.mark.skipif(
    not mosaic_gpu_interpret.available(),
    reason="Mosaic GPU's interpreter came with jax 0.11; .ci/run runs this file on it too, under Python 3.12")


@needs_mosaic_gpu_interpreter
@pytest.mark.parametrize("b, t, s, h, kv_heads, d, causal, q_offset", [
    (1, 256, 512, 2, 1, 64, False, 0),  # grouped heads; two query tiles; K/V blocks of 256 filling both stages
    (1, 384, 384, 2, 1, 128, True, 0),  # three query tiles: skipped, masked and unmasked K/V blocks, the epilogue
    (1, 128, 256, 1, 1, 256, False, 0),  # head_dim 256: K/V blocks of 64, so slots are refilled while in use
    (1, 256, 256, 1, 1, 64, True, -100),  # 100 queries before the first key see none (zeros, lse +inf); in the
    # first program, one consumer takes no K/V block and the other one
    # (a cache of keys before the queries runs below, through `flash_attention`)
])
def test_flash_hopper_forward_kernel_runs_right_in_the_mosaic_gpu_interpreter(monkeypatch, b, t, s, h, kv_heads, d,
                                                                               causal, q_offset):
  """FlashAttention-3's kernel itself (warpgroups as threads, TMA and barriers simulated) against `reference`."""
  mosaic_gpu_interpret.install(monkeypatch)
  q, k, v, _ = qkv(b=b, t=t, s=s, h=h, kv_heads=kv_heads, d=d, dtype=jnp.bfloat16)
  kwargs = dict(causal=causal, scale=d ** -0.5, q_offset=q_offset)
  with mosaic_gpu_interpret.interpreting():
    out, lse = jax.jit(functools.partial(flash_attention_hopper.forward, **kwargs))(q, k, v)
  want_out, want_lse = flash_attention_hopper.reference(q, k, v, **kwargs)
  assert out.dtype == jnp.bfloat16 and lse.shape == (b, h, t)
  assert np.isinf(want_lse).sum() == b * h * max(0, -q_offset)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=0, atol=1e-4)
  # Both round to bf16 (a step of 2 ** -7 near 1); the kernel also multiplies P @ V with P in bf16.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32), rtol=0, atol=2 ** -6)


@needs_mosaic_gpu_interpreter
@pytest.mark.parametrize("t, s, h, kv_heads, d, q_offset", [
    (128, 128, 1, 1, 64, None),  # one program per kernel, both stages of streamed blocks
    (128, 128, 2, 1, 128, None),  # head_dim 128; a dK/dV program streams both query heads of its group
    (128, 256, 1, 1, 64, -32),  # causal, 32 queries before the first key (lse +inf: no gradient from them), the
    # diagonal inside blocks, a dK/dV program whose keys no query sees
])
def test_flash_hopper_backward_kernels_run_right_in_the_mosaic_gpu_interpreter(monkeypatch, t, s, h, kv_heads, d,
                                                                                q_offset):
  """The dQ and dK/dV kernels against JAX's gradient of `reference` in fp32, fed `reference`'s out and lse
  (non-causal where q_offset is None; causal with as many queries as keys runs in the next test, through
  `flash_attention`)."""
  mosaic_gpu_interpret.install(monkeypatch)
  q, k, v, w = qkv(b=1, t=t, s=s, h=h, kv_heads=kv_heads, d=d, dtype=jnp.bfloat16)
  d_out = jnp.asarray(w, jnp.bfloat16)
  kwargs = dict(causal=q_offset is not None, scale=d ** -0.5, q_offset=q_offset or 0)
  attend = functools.partial(flash_attention_hopper.reference, **kwargs)
  out, lse = attend(q, k, v)
  with mosaic_gpu_interpret.interpreting():
    got = jax.jit(functools.partial(flash_attention_hopper.backward, **kwargs))(q, k, v, out, lse, d_out)
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.vjp(lambda q, k, v: attend(q, k, v)[0], f32(q), f32(k), f32(v))[1](f32(d_out))
  for name, a, x, b_ in zip(("dq", "dk", "dv"), got, (q, k, v), want):
    assert a.dtype == jnp.bfloat16 and a.shape == x.shape, name
    # bf16 inputs, P and dS rounded to bf16 for the wgmma: about 0.5% of the largest entry measured
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b_)).max() <= 1e-2 * np.abs(np.asarray(b_)).max(), name


@needs_mosaic_gpu_interpreter
@pytest.mark.parametrize("backward, causal, with_ids, cache", [
    ("hopper", True, False, 0), ("triton", True, False, 0), ("hopper", False, True, 0), ("hopper", True, False, 100)])
def test_flash_with_the_interpreted_hopper_kernels_matches_xla(monkeypatch, backward, causal, with_ids, cache):
  """The whole Hopper `flash` on a CPU: the Mosaic GPU forward interpreted, then its backward kernels interpreted
  too or (as above head_dim 128) the Triton dK/dV and dQ kernels reading its log-sum-exp in Pallas interpret mode;
  a padded length, grouped heads; causal (over a cache of keys before the queries too), or packed segments with a
  key padding mask (as ids, with the padded keys and rows that see no key)."""
  mosaic_gpu_interpret.install(monkeypatch)
  calls = []

  def interpreted(kernel):  # only these kernels: the interpreter's mode would take the Triton ones too
    def run(*args, **kwargs):
      calls.append(kernel.__name__)
      with mosaic_gpu_interpret.interpreting():
        return kernel(*args, **kwargs)
    return run
  monkeypatch.setattr(flash_attention_hopper, "forward", interpreted(flash_attention_hopper.forward))
  monkeypatch.setattr(flash_attention_hopper, "backward", interpreted(flash_attention_hopper.backward))
  if backward == "triton":
    monkeypatch.setattr(flash_attention_hopper, "backward_unsupported_reason", lambda *shapes: "the Triton turn")
  q, k, v, w = qkv(b=1, t=200 - cache, s=200, h=2, kv_heads=1, dtype=jnp.bfloat16)  # the last t of s positions
  ids = {}
  if with_ids:  # segments of 50, 100 and 50 tokens; the last 60 keys masked: the last segment's rows see none
    segment_ids = jnp.asarray(np.repeat([0, 1, 2], [50, 100, 50])[None], jnp.int32)
    ids = dict(segment_ids=segment_ids, mask=(jnp.arange(200) < 140)[None, None, None])
  got = out_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=causal, hopper=True, **ids), q, k, v, w)
  assert calls == (["forward", "backward"] if backward == "hopper" else ["forward"])
  assert_near_xla_in_fp32(got, q, k, v, w, 3e-2, causal=causal, **ids)


@pytest.mark.skipif(not gpus.on_hopper(),
                    reason="runs the Mosaic GPU kernels compiled: needs a Hopper GPU (the interpreter tests above "
                           "check them anywhere)")
@pytest.mark.parametrize("causal, head_dim", [(False, 64), (True, 128)])
def test_flash_hopper_kernels_compiled_on_a_hopper_gpu_match_xla(causal, head_dim):
  """On an H100/H200: `flash` picks the Mosaic GPU forward and backward itself, and they match xla's."""
  q, k, v, w = qkv(b=2, t=512, s=512, h=4, kv_heads=2, d=head_dim, dtype=jnp.bfloat16)
  fn = lambda q, k, v: flash_attention(q, k, v, causal=causal)
  grad = jax.grad(lambda *args: fn(*args).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  assert jax.jit(grad).lower(q, k, v).as_text().count("mosaic_gpu") >= 3  # the forward, dQ and dK/dV kernels
  assert_near_xla_in_fp32(out_and_grads(fn, q, k, v, w), q, k, v, w, 3e-2, causal=causal)


DATA_PARALLEL_SCRIPT = r"""
import functools
import jax, jax.numpy as jnp, numpy as np
from jax import export
from aigc_jax.nn import flash_attention, flash_attention_tpu
from aigc_jax.nn.attention import _per_batch_shard, dot_product_attention
from aigc_jax.train import parallel
H100 = %r
assert jax.device_count() == 8, jax.devices()
rng = np.random.default_rng(0)
q, w = (jnp.asarray(rng.normal(size=(8, 24, 4, 16)), jnp.float32) for _ in range(2))
k, v = (jnp.asarray(rng.normal(size=(8, 24, 2, 16)), jnp.float32) for _ in range(2))
seg = np.sort(rng.integers(0, 3, size=(8, 24)), axis=1)  # packed: up to 3 sequences per row
starts = np.concatenate([np.ones((8, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
mask = jnp.asarray((rng.random((8, 24)) > 0.3) | starts)[:, None, None]  # each sequence's first key is kept
seg = jnp.asarray(seg, jnp.int32)

def loss(impl, q, k, v):
  out = dot_product_attention(q, k, v, causal=True, mask=mask, segment_ids=seg, implementation=impl)
  return jnp.sum(out * w)

mesh = parallel.data_mesh()
rows = parallel.batch_sharding(mesh)
q, k, v = (jax.device_put(x, rows) for x in (q, k, v))
with jax.set_mesh(mesh):
  flash = jax.jit(jax.value_and_grad(lambda *a: loss("flash", *a), argnums=(0, 1, 2)))
  jaxpr = str(jax.make_jaxpr(flash)(q, k, v))
  got = flash(q, k, v)
want = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(q, k, v)
assert jaxpr.count("shard_map") == 2, jaxpr  # the forward and the backward, each per batch shard
assert "pallas_call" in jaxpr and "f32[1,24,4,16]" in jaxpr  # the kernels see one of the 8 rows
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
assert got[1][0].sharding.spec == rows.spec  # dq stays split over the batch
# No context mesh, inputs placed on a mesh with Explicit axes (their type names the mesh): per shard all the same.
explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
on_rows = jax.sharding.NamedSharding(explicit, jax.sharding.PartitionSpec("data"))
args = [jax.device_put(x, on_rows) for x in (q, k, v)]
assert str(jax.make_jaxpr(flash)(*args)).count("shard_map") == 2
for a, b in zip(jax.tree.leaves(flash(*args)), jax.tree.leaves(want)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

# Cross-lowered for 8 GPUs and for 8 TPUs: each family's kernels sit inside the per-shard manual computations.
allow_triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
h100 = mesh.abstract_mesh.update(abstract_device=jax.sharding.AbstractDevice(**H100))  # the GPU to lower for
for platform, lib, call in (("cuda", flash_attention, "@__gpu$xla.gpu.triton("),
                            ("tpu", flash_attention_tpu, "tpu_custom_call")):
  attend = functools.partial(lib.flash_attention, causal=True, interpret=False)
  grad = jax.grad(lambda *a: jnp.sum(_per_batch_shard(attend, *a, mask, None)), argnums=(0, 1, 2))
  with jax.set_mesh(mesh), jax.sharding.use_abstract_mesh(h100 if platform == "cuda" else mesh.abstract_mesh):
    module = export.export(jax.jit(grad), platforms=(platform,), disabled_checks=allow_triton)(q, k, v).mlir_module()
  assert module.count("sdy.manual_computation") == 2 and module.count(call) == 3, platform  # fwd; bwd: dq, dkv
# And on 8 Hopper GPUs (bf16, no mask): the Mosaic GPU forward per shard, and its dQ and dK/dV kernels after it.
attend = functools.partial(flash_attention.flash_attention, causal=True, interpret=False, hopper=True)
grad = jax.grad(lambda *a: jnp.sum(_per_batch_shard(attend, *a, None, None).astype(jnp.float32)), argnums=(0, 1, 2))
bf16 = [jax.ShapeDtypeStruct((8, 128, h, 64), jnp.bfloat16, sharding=rows) for h in (4, 2, 2)]
with jax.set_mesh(mesh), jax.sharding.use_abstract_mesh(h100):
  module = export.export(jax.jit(grad), platforms=("cuda",), disabled_checks=allow_triton + [
      export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*bf16).mlir_module()
assert module.count("sdy.manual_computation") == 2 and module.count("@mosaic_gpu_v2(") == 3
assert module.count("@__gpu$xla.gpu.triton(") == 0
print("per-shard flash == xla")
""" % H100


def test_flash_runs_per_batch_shard_under_a_data_parallel_mesh():
  """8 simulated devices: the kernels run inside shard_map on each device's row; values and gradients equal xla's,
  and both kernel families cross-lower that way for a GPU and a TPU mesh, the Hopper kernels too."""
  import subprocess
  import sys
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "per-shard flash == xla" in out.stdout


@pytest.mark.parametrize("t,s", [(24, 24), (24, 40), (40, 40), (7, 33), (16, 16), (40, 24), (33, 7)])
@pytest.mark.parametrize("block_q,block_k", [(8, 8), (16, 8), (8, 16)])
def test_causal_tile_ranges_skip_exactly_the_tiles_no_query_sees(t, s, block_q, block_k):
  """The loop bounds `chunked` and the Triton kernels share, against every (query, key) pair by brute force:
  query q (of t, the last t of s positions) sees the keys k <= q + s - t."""
  from aigc_jax.nn.chunked_attention import first_query_block, key_blocks_seen, round_up
  nq, nk = round_up(t, block_q) // block_q, round_up(s, block_k) // block_k
  seen = {(q // block_q, k // block_k) for q in range(t) for k in range(s) if k <= q + s - t}
  for i in range(nq):
    assert int(key_blocks_seen(i * block_q, block_q, block_k, nk, t, s)) == max(
        (j + 1 for qi, j in seen if qi == i), default=0)
  for j in range(nk):
    start = int(first_query_block(j * block_k, block_q, nq, t, s))
    assert start == min((i for i, kj in seen if kj == j), default=start) and 0 <= start <= nq


@pytest.mark.parametrize("q_offset", [0, 1, 63, 64, 100, 200, -1, -64, -100, -300])
@pytest.mark.parametrize("rows, block", [(128, 64), (64, 128), (128, 256), (64, 64)])
def test_hopper_causal_block_ranges_are_exact(q_offset, rows, block):
  """The Hopper kernels' causal loop bounds against every (query, key) pair by brute force (query i sees the keys
  k <= i + q_offset): a skipped block is seen by none of the rows, an unmasked one whole by all of them, and the
  first and last blocks taken are the first and last any row sees."""
  from aigc_jax.nn.flash_attention_hopper import causal_key_blocks, causal_query_blocks
  n = 6  # blocks of queries and keys: 6 * block positions each
  sees = lambda i, k: k <= i + q_offset
  for start in range(0, n * block, rows):  # rows of queries from `start`: key blocks
    queries = range(start, start + rows)
    unmasked, stop = (int(x) for x in causal_key_blocks(jnp.int32(start), rows, block, n, q_offset))
    seen = [any(sees(i, k) for i in queries for k in range(j * block, (j + 1) * block)) for j in range(n)]
    whole = [all(sees(i, k) for i in queries for k in range(j * block, (j + 1) * block)) for j in range(n)]
    assert stop == max((j + 1 for j in range(n) if seen[j]), default=0)
    assert unmasked == sum(whole) and all(whole[:unmasked])  # seen whole: a prefix of the blocks
  for start in range(0, n * block, rows):  # rows of keys from `start`: query blocks
    keys = range(start, start + rows)
    first, unmasked = (int(x) for x in causal_query_blocks(jnp.int32(start), rows, block, n, q_offset))
    seen = [any(sees(i, k) for k in keys for i in range(j * block, (j + 1) * block)) for j in range(n)]
    whole = [all(sees(i, k) for k in keys for i in range(j * block, (j + 1) * block)) for j in range(n)]
    assert first == next((j for j in range(n) if seen[j]), n) and all(seen[first:])
    assert unmasked == n - sum(whole) and all(whole[unmasked:])  # seen whole: a suffix of the blocks
