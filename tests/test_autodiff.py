"""`plain_autodiff`: forward mode through the models, agreeing with the custom gradients used by default."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.models import Transformer, TransformerConfig
from aigc_jax.models.unet import UNet, UNetConfig
from aigc_jax.nn import plain_autodiff


def _gpt():
  model = Transformer(TransformerConfig(vocab_size=11, max_len=8, num_layers=2, num_heads=4, num_kv_heads=2,
                                        emb_dim=16, attention="auto"))
  tokens = jnp.arange(8)[None] % 11
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  return (lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2)), params


def _unet():
  # 8 features at full resolution: the convolutions take the custom kernel gradient on CPU
  # (attention is the Transformer case's; one level keeps the second-order programs quick to compile)
  model = UNet(UNetConfig(image_size=8, channels=2, base_features=8, channel_mults=(1,), num_res_blocks=1,
                          attention_resolutions=(), num_heads=2, norm_groups=4, num_classes=3))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 2)), jnp.float32)
  t, y = jnp.array([3, 7]), jnp.array([0, 2])
  params = jax.jit(lambda key: model.init(key, x, t, y, train=False))(jax.random.PRNGKey(0))["params"]
  params = jax.tree.map(lambda p: p + 0.01, params)  # the zero-initialised output conv would hide the rest

  return (lambda p: jnp.sum(model.apply({"params": p}, x, t, y, train=False) ** 2)), params


def _dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# The Hessian-vector product is checked on the Transformer only: its second-order programs compile quickly.
@pytest.mark.parametrize("build, second_order", [(_gpt, True), (_unet, False)], ids=["transformer", "unet"])
def test_forward_mode_passes_inside_plain_autodiff_and_agrees_with_the_custom_gradients(build, second_order):
  loss, params = build()
  tangent = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).normal(size=p.shape), p.dtype), params)
  custom = jax.jit(jax.grad(loss))(params)
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff .jvp. to a custom_vjp function"):
    jax.jvp(loss, (params,), (tangent,))  # the default: the blocks' own, reverse-only gradients
  with plain_autodiff():  # traced (and jitted) inside the context
    value, directional = jax.jit(lambda p, v: jax.jvp(loss, (p,), (v,)))(params, tangent)
    plain = jax.jit(jax.grad(loss))(params)
    if second_order:  # forward over reverse: a Hessian-vector product, which no custom VJP allows
      hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, tangent)
  assert float(value) == pytest.approx(float(jax.jit(loss)(params)), rel=1e-6)  # the same forward values
  assert float(directional) == pytest.approx(float(_dot(custom, tangent)), rel=1e-4)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(custom)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  if second_order:
    reverse_hvp = jax.jit(jax.grad(lambda p: _dot(jax.grad(loss)(p), tangent)))(params)  # reverse over reverse
    for a, b in zip(jax.tree.leaves(hvp), jax.tree.leaves(reverse_hvp)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
