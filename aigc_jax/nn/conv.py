"""2-D convolution with a kernel gradient XLA:CPU computes quickly.

XLA:CPU lowers a convolution's kernel gradient to a convolution whose "image" is
the whole batch (and, for strided or transposed convolutions, a dilated one); on a
2-core CPU that took 10x the forward's time for a stride-1 3x3 conv at 28x28 (and
a transposed conv's gradient 100x). Here a stride-1 kernel gradient is one 2-D
matmul of the kernel-tap patches with dY, dW = patches^T @ dY, at matmul speed
(2.4x faster for the whole gradient of that conv); the forward and the input
gradient stay XLA's own. Strided convolutions (whose native gradient measured
faster than this), convolutions to fewer than 8 channels (an output layer: a
matmul only that wide is memory-bound, and XLA's gradient measured 9x faster for
28x28, 32 -> 1) and GPU/TPU use XLA's gradient. Upsampling is nearest-neighbour resize + convolution
(no transposed convolutions: their XLA:CPU lowering is slow, and resize-conv
avoids checkerboard artifacts, Odena et al. 2016).

Which kernel gradient wins depends on the program around it: jitted alone (jax 0.10.2),
XLA's kernel gradient of a 28x28, 32 -> 32 conv was the faster one (16 vs 64 ms at batch
32), while inside the MNIST UNet's whole train step this path measured 1.20x faster than
stock `flax.linen.Conv` (`aigc-jax bench denoise --quick`). Re-measure with the whole step.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.nn.autodiff import custom_gradients

_DIMS = ("NHWC", "HWIO", "NHWC")
TAP_GRAD_MIN_FEATURES = 8  # narrower outputs keep XLA's kernel gradient (see the module docstring)


def _pads(kernel_shape, strides, in_hw):
  return jax.lax.padtype_to_pads(in_hw, kernel_shape[:2], strides, "SAME")


def _conv(x, kernel, strides):
  return jax.lax.conv_general_dilated(x, kernel, strides, "SAME", dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_tap_grad(x, kernel, strides):
  """SAME convolution of x [B, H, W, C] with kernel [kh, kw, C, F]; kernel gradient by per-tap matmuls."""
  return _conv(x, kernel, strides)


def _fwd(x, kernel, strides):
  return _conv(x, kernel, strides), (x, kernel)


def _bwd(strides, residuals, d_y):
  x, kernel = residuals
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, kernel, strides), x)
  (d_x,) = vjp_x(d_y)
  kh, kw, c, f = kernel.shape
  b, ho, wo, _ = d_y.shape
  (ph, _), (pw, _) = _pads(kernel.shape, strides, x.shape[1:3])
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), (ph, kh + sh * ho), (pw, kw + sw * wo), (0, 0)))  # enough room for every tap
  dy = d_y.reshape(-1, f)  # [B*Ho*Wo, F]
  patches = jnp.concatenate([xp[:, i:i + sh * ho:sh, j:j + sw * wo:sw] for i in range(kh) for j in range(kw)],
                            axis=-1).reshape(-1, kh * kw * c)  # [B*Ho*Wo, kh*kw*C]
  d_kernel = jax.lax.dot_general(patches, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  d_kernel = d_kernel.reshape(kh, kw, c, f).astype(kernel.dtype)
  return d_x, d_kernel


conv2d_tap_grad.defvjp(_fwd, _bwd)


class Conv(nn.Module):
  """`nn.Conv` with SAME padding (same parameters: `kernel` [kh, kw, C, F], `bias`), fast to train on CPU."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H / s, W / s, features]
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides = tuple(self.strides)
    if (jax.default_backend() == "cpu" and strides == (1, 1) and self.features >= TAP_GRAD_MIN_FEATURES
        and custom_gradients()):
      y = conv2d_tap_grad(x, kernel, strides)
    else:
      y = _conv(x, kernel, strides)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
    return y


def upsample_nearest(x, factor: int = 2):
  """[B, H, W, C] -> [B, factor H, factor W, C], each pixel repeated."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)
