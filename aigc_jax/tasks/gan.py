"""GAN training: one pure step updates the discriminator (`d_steps` times) then the generator.

Each discriminator (critic) update sees its own batch of real images, as in Gulrajani et al.
(2017), Algorithm 1: a step's batch holds `d_steps` of them, images [B, d_steps, H, W, C].

`params` and `opt_state` are dicts with a `generator` and a `discriminator` entry,
each network with its own Optax optimizer from `optim.generator` / `optim.discriminator`.
"""

import jax
import jax.numpy as jnp
import optax

from aigc_jax.errors import UserError
from aigc_jax.models import gan
from aigc_jax.tasks.image import ImageTask
from aigc_jax.train.optim import learning_rate_schedule, make_optimizer

NETWORKS = ("generator", "discriminator")


class GANTask(ImageTask):
  loss_label = "discriminator / generator loss"

  def __init__(self, config, workdir: str | None = None):
    super().__init__(config, workdir)
    h, _, c = self.image_shape
    m = config.model
    if m.loss not in gan.LOSSES:
      raise UserError(f"Unknown model.loss {m.loss!r}; use one of {', '.join(gan.LOSSES)}.")
    if m.architecture not in gan.ARCHITECTURES:
      raise UserError(f"Unknown model.architecture {m.architecture!r}; use one of {', '.join(gan.ARCHITECTURES)}.")
    self.model_config = gan.GANConfig(architecture=m.architecture, image_size=h, channels=c,
                                      latent_dim=m.latent_dim, mlp_features=tuple(m.mlp_features),
                                      conv_features=m.conv_features)
    self.generator, self.discriminator = gan.build_gan(self.model_config)
    self.units_per_batch = config.batch_size * m.d_steps  # real images a step consumes
    self._generate = jax.jit(self.generate)
    self.txs = {name: make_optimizer(config.optim[name], config.num_train_steps,  # the critic: d_steps updates a step
                                     updates_per_step=m.d_steps if name == "discriminator" else 1)
                for name in NETWORKS}

  def train_batch(self, step: int, rows: slice = slice(None)):
    """`d_steps` independent batches of real images for step `step`, one per critic update: [B, d_steps, ...]."""
    d_steps, b = self.config.model.d_steps, self.config.batch_size
    start, stop, _ = rows.indices(b)  # row r holds the drawn images r * d_steps ... (r + 1) * d_steps - 1
    drawn = slice(start * d_steps, stop * d_steps)
    batch = self.dataset.batch("train", step, b * d_steps, self.config.seed, rows=drawn)
    return {name: x.reshape(stop - start, d_steps, *x.shape[1:]) for name, x in batch.items()}

  def init_params(self, rng):
    g_rng, d_rng = jax.random.split(rng)
    z = jnp.zeros((1, self.model_config.latent_dim), jnp.float32)
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    return {"generator": self.generator.init(g_rng, z)["params"],
            "discriminator": self.discriminator.init(d_rng, x)["params"]}

  def optimizer(self):
    """Optimizer state per network; the step below updates each with its own transformation."""
    return optax.GradientTransformation(
        init=lambda params: {name: self.txs[name].init(params[name]) for name in NETWORKS},
        update=None)  # never called: make_train_step applies self.txs one network at a time

  def generate(self, g_params, z):
    return self.generator.apply({"params": g_params}, z)

  def critic(self, d_params, images):
    return self.discriminator.apply({"params": d_params}, images)

  def d_loss(self, d_params, g_params, real, rng):
    """Mean discriminator loss on one batch, and its parts."""
    z_rng, gp_rng = jax.random.split(rng)
    fake = jax.lax.stop_gradient(self.generate(g_params, self.latents(z_rng, real.shape[0])))
    d_real, d_fake = self.critic(d_params, real), self.critic(d_params, fake)
    kind = self.config.model.loss
    penalty = jnp.zeros_like(d_real)
    if kind == "wgan_gp":
      penalty = gan.gradient_penalty(lambda x: self.critic(d_params, x), real, fake, gp_rng,
                                     self.config.model.gp_weight)
    loss = jnp.mean(gan.discriminator_loss(kind, d_real, d_fake, penalty))
    return loss, {"d_real": jnp.mean(d_real), "d_fake": jnp.mean(d_fake), "gradient_penalty": jnp.mean(penalty)}

  def g_loss(self, g_params, d_params, batch_size, rng):
    fake = self.generate(g_params, self.latents(rng, batch_size))
    return jnp.mean(gan.generator_loss(self.config.model.loss, self.critic(d_params, fake)))

  def latents(self, rng, n):
    return jax.random.normal(rng, (n, self.model_config.latent_dim))

  def make_train_step(self, tx):
    del tx  # the per-network optimizers in self.txs
    if self.config.grad_accum_steps != 1:
      raise UserError(f"GANs do not accumulate gradients (each step updates the critic {self.config.model.d_steps} "
                      f"time(s), then the generator), and grad_accum_steps is {self.config.grad_accum_steps}; leave "
                      f"it at 1 and set batch_size instead.")
    d_tx, g_tx = self.txs["discriminator"], self.txs["generator"]
    schedule = learning_rate_schedule(self.config.optim.generator, self.config.num_train_steps)
    d_schedule = learning_rate_schedule(self.config.optim.discriminator, self.config.num_train_steps)
    d_steps = self.config.model.d_steps

    def train_step(state, batch):
      rng = jax.random.fold_in(state.rng, state.step)
      reals = jnp.moveaxis(batch["images"], 1, 0)  # [d_steps, B, H, W, C]: the batch axis stays the sharded one
      params, opt_state = state.params, state.opt_state

      def d_update(carry, xs):  # each critic update: its own real batch, fresh fakes and interpolates
        (d_params, d_opt), (real, i) = carry, xs
        (loss, parts), grads = jax.value_and_grad(self.d_loss, has_aux=True)(
            d_params, params["generator"], real, jax.random.fold_in(rng, i))
        updates, d_opt = d_tx.update(grads, d_opt, d_params)
        return (optax.apply_updates(d_params, updates), d_opt), (loss, parts, optax.tree.norm(grads))

      (d_params, d_opt), (d_losses, d_parts, d_grad_norms) = jax.lax.scan(
          d_update, (params["discriminator"], opt_state["discriminator"]), (reals, jnp.arange(d_steps)))
      g_loss, g_grads = jax.value_and_grad(self.g_loss)(
          params["generator"], d_params, reals.shape[1], jax.random.fold_in(rng, d_steps))
      updates, g_opt = g_tx.update(g_grads, opt_state["generator"], params["generator"])
      g_params = optax.apply_updates(params["generator"], updates)
      metrics = {
          "loss": (d_losses[-1], 1.0),  # the discriminator's (critic's) loss at its last update
          "g_loss": (g_loss, 1.0),
          **{name: (value[-1], 1.0) for name, value in d_parts.items()},
          "d_grad_norm": (d_grad_norms[-1], 1.0),
          "grad_norm": (optax.tree.norm(g_grads), 1.0),
          "param_norm": (optax.tree.norm(g_params), 1.0),
          "learning_rate": (schedule(state.step), 1.0),  # the generator's
          "d_learning_rate": (d_schedule(state.step), 1.0),  # the critic's, at each of this step's d_steps updates
      }
      new_params = {"generator": g_params, "discriminator": d_params}
      new_opt = {"generator": g_opt, "discriminator": d_opt}
      return state.replace(step=state.step + 1, params=new_params, opt_state=new_opt), metrics

    return train_step

  def eval_batches(self, rows: slice = slice(None)) -> dict:
    return {}  # a GAN has no held-out likelihood; `aigc-jax eval` measures its samples

  def sample(self, params, rng, num_samples: int, labels=None, **options):
    return self._generate(params["generator"], self.latents(rng, num_samples))

