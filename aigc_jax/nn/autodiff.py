"""Which gradients the shared blocks use: their own by default, JAX's plain autodiff inside `plain_autodiff()`.

LayerNorm, the MLP's GELU projection, `xla` attention and the CPU convolutions carry `jax.custom_vjp` gradients
that recompute rather than store (measured faster and leaner; see each block). A custom VJP admits reverse mode
only: `jax.jvp`, `jax.jacfwd` and `jax.linearize` cannot pass through it. Inside `plain_autodiff()` those blocks
trace as plain JAX, so forward mode and derivatives of every order pass through the models (`auto` attention picks
`xla` there; `chunked` and `flash`, asked for by name, keep their kernels' gradients). The forward values are the
same either way.

The choice is made when a function is traced: call (and `jax.jit`) the function inside the context. A jitted
function already traced outside it keeps the custom gradients for those argument shapes.
"""

import contextlib
import contextvars

_PLAIN = contextvars.ContextVar("aigc_jax_plain_autodiff", default=False)


@contextlib.contextmanager
def plain_autodiff(enabled: bool = True):
  """Within this context the shared blocks use JAX's own autodiff (forward mode, any order) instead of their
  custom gradients."""
  token = _PLAIN.set(enabled)
  try:
    yield
  finally:
    _PLAIN.reset(token)


def custom_gradients() -> bool:
  """Whether the blocks traced now use their custom gradients (outside `plain_autodiff`)."""
  return not _PLAIN.get()
