import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.errors import UserError
from aigc_jax.models.unet import DDPM_CIFAR10, MNIST, UNet, UNetConfig
from aigc_jax.nn import image

TINY = UNetConfig(image_size=8, channels=2, base_features=8, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, dropout=0.1, norm_groups=4)


def count_params(config):
  x = jnp.zeros((1, config.image_size, config.image_size, config.channels))
  shapes = jax.eval_shape(lambda: UNet(config).init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), train=False))
  return sum(a.size for a in jax.tree.leaves(shapes))


def test_ddpm_cifar10_has_the_papers_35_7m_parameters():
  assert abs(count_params(DDPM_CIFAR10) - 35.7e6) < 0.1e6
  assert count_params(DDPM_CIFAR10) == 35_746_307


def test_mnist_shape_parameter_count():
  assert count_params(MNIST) == 1_114_209  # as documented next to the config


def test_timestep_embedding():
  emb = image.timestep_embedding(jnp.array([0.0, 3.5]), 6)
  assert emb.shape == (2, 6)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 1, 1, 1])
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3.5 * freqs), np.cos(3.5 * freqs)]), rtol=1e-6)
  assert image.timestep_embedding(jnp.array([1, 2]), 5).shape == (2, 5)  # odd dim: zero-padded


def rbg_key(seed):
  return jax.random.key(seed, impl="rbg")  # threefry takes XLA:CPU tens of seconds to compile; rbg a few


def host_normal(tree, seed, scale=0.1):
  """Random values shaped like `tree` (arrays or ShapeDtypeStructs), drawn on the host: nothing to compile."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(scale * rng.normal(size=a.shape), jnp.float32), tree)


@pytest.fixture(scope="module")
def conditional():
  """A tiny 3-class UNet, its initial parameters, and random parameters."""
  model = UNet(dataclasses.replace(TINY, num_classes=3))
  x = jnp.zeros((2, 8, 8, 2))
  params = jax.jit(lambda r: model.init(r, x, jnp.zeros((2,), jnp.int32), None, train=False))(rbg_key(0))["params"]
  apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, train=False))
  return apply, params, host_normal(params, 1)


def test_unet_init_outputs_zero_and_has_a_null_class(conditional):
  apply, params, _ = conditional
  assert params["class_embed"]["embedding"].shape == (4, 32)  # 3 classes + the null class, 4 x base wide
  x = host_normal(jnp.zeros((2, 8, 8, 2)), 2, 1.0)
  out = apply(params, x, jnp.array([0, 7]), jnp.array([0, 2]))
  assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised output conv


def test_unet_labels_null_class_dropout_and_float_timesteps(conditional):
  apply, _, params = conditional
  x = host_normal(jnp.zeros((2, 8, 8, 2)), 2, 1.0)
  t = jnp.array([1, 5])
  null = apply(params, x, t, jnp.array([3, 3]))
  assert null.shape == (2, 8, 8, 2) and np.all(np.isfinite(null))
  # labels=None is the null class, and integer and float timesteps embed the same.
  np.testing.assert_array_equal(apply(params, x, t.astype(jnp.float32), None), null)
  same_t = apply(params, x, jnp.array([5, 5]), None)
  np.testing.assert_array_equal(apply(params, x, jnp.array(5), None), same_t)  # a scalar: one timestep for all
  assert not np.allclose(apply(params, x, t, jnp.array([0, 1])), null)
  np.testing.assert_array_equal(apply(params, x, t, jnp.array(3)), null)  # a scalar: one class for all
  model = UNet(dataclasses.replace(TINY, num_classes=3))
  dropped = jax.jit(lambda p, r: model.apply({"params": p}, x, t, None, train=True, rngs={"dropout": r}))(
      params, rbg_key(3))
  assert np.all(np.isfinite(dropped)) and not np.allclose(dropped, null)  # dropout is on only in training


def test_unet_refuses_labels_the_embedding_cannot_look_up(conditional):
  _, params, _ = conditional
  model = UNet(dataclasses.replace(TINY, num_classes=3))
  x, t = jnp.zeros((2, 8, 8, 2)), jnp.array([1, 5])
  apply = lambda labels: model.apply({"params": params}, x, t, labels, train=False)  # eager: labels are concrete
  with pytest.raises(UserError, match=r"Class label 4 is outside \[0, 3\]"):
    apply(jnp.array([3, 4]))  # 3 is the null class; 4 would embed as NaN
  with pytest.raises(UserError, match=r"Class label -1 is outside"):
    apply(np.array([-1, 0]))
  with pytest.raises(UserError, match="must be integers"):
    apply(jnp.array([0.0, 1.0]))
  with pytest.raises(UserError, match=r"one class label per sample \(2 labels\)"):
    apply(jnp.array([0, 1, 2]))
  # Inside jit the values are not known: shapes and dtypes are still checked.
  with pytest.raises(UserError, match="one class label per sample"):
    jax.eval_shape(apply, jax.ShapeDtypeStruct((2, 1), jnp.int32))


def test_unconditional_unet_shape_and_refuses_labels():
  model = UNet(TINY)
  x = jax.ShapeDtypeStruct((3, 8, 8, 2), jnp.float32)
  t = jax.ShapeDtypeStruct((3,), jnp.int32)
  shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
  out = jax.eval_shape(lambda p, x, t: model.apply(p, x, t, train=False), shapes, x, t)
  assert out.shape == (3, 8, 8, 2) and "class_embed" not in shapes["params"]
  with pytest.raises(UserError, match="unconditional"):
    jax.eval_shape(lambda p, x, t: model.apply(p, x, t, jnp.zeros((3,), jnp.int32), train=False), shapes, x, t)


def test_config_errors():
  with pytest.raises(UserError, match="attention_resolutions"):
    dataclasses.replace(MNIST, attention_resolutions=(16,))
  with pytest.raises(UserError, match="halve"):
    dataclasses.replace(MNIST, channel_mults=(1, 2, 2, 2))
  with pytest.raises(UserError, match="norm_groups"):
    dataclasses.replace(TINY, norm_groups=3)
  with pytest.raises(UserError, match="UNet width 12 is not a multiple of norm_groups .8."):  # conv_in's width
    dataclasses.replace(TINY, base_features=12, channel_mults=(2, 4), norm_groups=8, num_heads=1)


def test_an_image_of_another_size_is_one_sentence():
  model = UNet(TINY)
  s = TINY.image_size
  with pytest.raises(UserError, match=rf"This UNet takes a batch of {s}x{s}x{TINY.channels} images, \[B, H, W, C\], "
                                      rf"not an array of shape \(1, {s}, 5, {TINY.channels}\); resize the images"):
    model.init(jax.random.key(0), jnp.zeros((1, s, 5, TINY.channels)), jnp.zeros((1,)), train=False)
  with pytest.raises(UserError, match=r"not an array of shape \(8, 8, 2\); .* add the batch axis"):  # one image
    model.init(jax.random.key(0), jnp.zeros((s, s, TINY.channels)), jnp.zeros(()), train=False)
  x = jnp.zeros((2, s, s, TINY.channels))
  for t in (jnp.zeros((3,)), jnp.zeros((2, 1))):  # were broadcasting errors from inside the model
    with pytest.raises(UserError, match=r"one timestep for the batch or one per image \(2\), not timesteps of shape"):
      model.init(jax.random.key(0), x, t, train=False)


@pytest.mark.parametrize("field, value", [("num_heads", 0), ("norm_groups", 0), ("dropout", 1.5),
                                          ("channel_mults", ()), ("base_features", 0)])
def test_config_fields_out_of_range_are_one_sentence(field, value):
  """num_heads or norm_groups 0 were ZeroDivisionErrors; dropout 1.5 and no levels at all built silently."""
  with pytest.raises(UserError, match="UNetConfig needs at least one level .* fix those fields"):
    dataclasses.replace(TINY, **{field: value})


def test_resblock_without_embedding_and_blocks_shapes():
  x = host_normal(jnp.zeros((2, 6, 6, 4)), 0, 1.0)
  block = image.ResBlock(8, groups=2)
  params = host_normal(jax.eval_shape(lambda: block.init(jax.random.key(1), x, None, train=False)), 1)
  assert "emb_proj" not in params["params"] and "skip" in params["params"]
  assert block.apply(params, x, None, train=False).shape == (2, 6, 6, 8)
  ss = image.ResBlock(4, groups=2, scale_shift=True)
  emb = jnp.ones((2, 5))
  p = jax.jit(lambda r: ss.init(r, x, emb, train=False))(rbg_key(1))
  assert p["params"]["emb_proj"]["kernel"].shape == (5, 8) and "skip" not in p["params"]
  np.testing.assert_allclose(ss.apply(p, x, emb, train=False), x)  # zero-init last conv: identity at init
  for block, shape in [(image.Downsample(3), (2, 3, 3, 3)), (image.Upsample(3), (2, 12, 12, 3))]:
    assert jax.eval_shape(lambda: block.init_with_output(jax.random.key(0), x))[0].shape == shape


def test_spatial_attention_matches_naive():
  x = host_normal(jnp.zeros((2, 3, 3, 4)), 0, 1.0)
  attn = image.SpatialSelfAttention(num_heads=2, groups=2, attention_implementation="xla")
  params = jax.jit(attn.init)(rbg_key(1), x)
  np.testing.assert_allclose(attn.apply(params, x), x)  # zero-init output projection
  params = host_normal(params, 2, 0.3)
  p = params["params"]
  h = np.asarray(image._group_norm(2, dtype=jnp.float32, param_dtype=jnp.float32).apply(
      {"params": p["norm"]}, x)).reshape(2, 9, 4)
  qkv = h @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])  # [B, L, 3C]
  q, k, v = (qkv.reshape(2, 9, 3, 2, 2)[:, :, i] for i in range(3))  # [B, L, heads, 2]
  s = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(2)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhlm,bmhd->blhd", w, v).reshape(2, 9, 4) @ np.asarray(p["proj"]["kernel"]) + np.asarray(
      p["proj"]["bias"])
  np.testing.assert_allclose(attn.apply(params, x), np.asarray(x) + o.reshape(2, 3, 3, 4), rtol=1e-4, atol=1e-5)
