"""VAE training: negative ELBO in nats per image, bits per dim, prior samples."""

import jax
import jax.numpy as jnp

from aigc_jax.models.vae import VAE, VAEConfig, bits_per_dim
from aigc_jax.tasks.image import ImageTask

EVAL_KEY = 0  # evaluation draws its binarization and posterior noise from this fixed key


class VAETask(ImageTask):
  loss_label = "negative ELBO (nats/image)"

  def __init__(self, config, workdir: str | None = None):
    super().__init__(config, workdir)
    h, _, c = self.image_shape
    m = config.model
    self.model_config = VAEConfig(image_size=h, channels=c, latent_dim=m.latent_dim, features=tuple(m.features),
                                  hidden_dim=m.hidden_dim, likelihood=m.likelihood)
    self.model = VAE(self.model_config)

    self._decode = jax.jit(lambda params, z: self.model.apply({"params": params}, z, method=VAE.decode))
    self._eval_loss = jax.jit(lambda params, batch: self.loss(params, batch, None, False))

  def init_params(self, rng):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.model.init(rng, x, jax.random.PRNGKey(0))["params"]

  def targets(self, images, rng):
    """Bernoulli: pixels binarized by sampling with probability (x + 1) / 2 (dynamic binarization)."""
    if self.model_config.likelihood == "bernoulli":
      return jax.random.bernoulli(rng, (images + 1.0) / 2.0).astype(jnp.float32)
    return images

  def loss(self, params, batch, rng, train: bool):
    rng = jax.random.PRNGKey(EVAL_KEY) if rng is None else rng
    data_rng, z_rng = jax.random.split(rng)
    x = self.targets(batch["images"], data_rng)
    parts = self.model.apply({"params": params}, x, z_rng)
    count = jnp.asarray(x.shape[0], jnp.float32)
    metrics = {name: (jnp.sum(parts[name]), count) for name in ("recon", "kl")}
    metrics["bits_per_dim"] = (jnp.sum(bits_per_dim(parts["nelbo"], self.model_config)), count)
    return jnp.sum(parts["nelbo"]), count, metrics

  def sample(self, params, rng, num_samples: int, labels=None, **options):
    return self._decode(params, jax.random.normal(rng, (num_samples, self.model_config.latent_dim)))

  def reconstruct(self, params, images):
    return self.model.apply({"params": params}, images, method=VAE.reconstruct)

  def heldout_metrics(self, params) -> dict[str, float]:
    """Negative ELBO on every held-out image (one posterior sample each, fixed binarization noise)."""
    images = self.dataset.images("test")
    total = 0.0
    for start in range(0, len(images), 500):
      total += float(self._eval_loss(params, {"images": images[start:start + 500]})[0])
    nelbo = total / len(images)
    return {"nelbo_nats": nelbo, "bits_per_dim": float(bits_per_dim(nelbo, self.model_config)),
            "likelihood": self.model_config.likelihood}
