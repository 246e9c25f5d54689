"""aigc_jax: a JAX model zoo for generative models on one training spine."""

__version__ = "0.1.0"
