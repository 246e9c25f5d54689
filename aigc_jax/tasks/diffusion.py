"""Diffusion training (DDPM loss, EMA) and sampling (DDPM ancestral or DDIM, classifier-free guidance)."""

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax import diffusion
from aigc_jax.diffusion import losses as diffusion_losses
from aigc_jax.errors import UserError
from aigc_jax.models.unet import UNet, UNetConfig
from aigc_jax.tasks.image import ImageTask

SAMPLERS = ("ddim", "ddpm")
EVAL_KEY = 0  # evaluation losses draw their timesteps and noise from this fixed key


def unet_config(model_config, image_size: int, channels: int, num_classes: int) -> UNetConfig:
  """The UNet a config's `model` block describes, for images of this shape (conditional: num_classes > 0)."""
  m = model_config
  return UNetConfig(
      image_size=image_size, channels=channels, base_features=m.base_features, channel_mults=tuple(m.channel_mults),
      num_res_blocks=m.num_res_blocks, attention_resolutions=tuple(m.attention_resolutions), num_heads=m.num_heads,
      dropout=m.dropout, num_classes=num_classes if m.conditional else 0, norm_groups=m.norm_groups,
      dtype=jnp.dtype(m.dtype), attention=m.attention)


class DiffusionTask(ImageTask):
  loss_label = "noise-prediction MSE"
  sample_options = ("steps", "eta", "guidance", "guidance_interval")
  # Keys added after runs were trained, with the values that reproduce what the code did before them.
  later_keys = {**ImageTask.later_keys, "sample.guidance_interval": (0.0, 1.0), "sample.variance": "posterior"}

  def __init__(self, config, workdir: str | None = None):
    super().__init__(config, workdir)
    h, _, c = self.image_shape
    m, d = config.model, config.diffusion
    if d.prediction == "v":
      self.loss_label = "v-prediction MSE"
    self.conditional = m.conditional
    self.ema_decay = config.ema_decay
    self.unet_config = unet_config(m, h, c, self.num_classes)
    self.model = UNet(self.unet_config)
    self.schedule = diffusion.make_schedule(d.schedule, d.num_steps)
    if config.sample.sampler not in SAMPLERS:
      raise UserError(f"Unknown sample.sampler {config.sample.sampler!r}; use one of {', '.join(SAMPLERS)}.")
    if config.sample.steps > d.num_steps:  # checked here, before training, not at the first evaluation
      raise UserError(f"sample.steps is {config.sample.steps} and the model has {d.num_steps} diffusion steps; set "
                      f"--config.sample.steps between 1 and {d.num_steps}.")
    diffusion.check_guidance_interval(config.sample.guidance_interval, "--config.sample.guidance_interval=(LO, HI)")
    diffusion_losses.check_variance(config.sample.variance, "sample.variance")
    if self.conditional and d.cond_drop_prob == 0 and config.sample.guidance != 1:
      raise UserError(f"sample.guidance is {config.sample.guidance:g}, but with diffusion.cond_drop_prob 0 the "
                      f"unconditional (null-class) model that guidance mixes in is never trained; set "
                      f"--config.diffusion.cond_drop_prob=0.1 (say), or --config.sample.guidance=1.")

  def init_params(self, rng):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if self.conditional else None
    return self.model.init(rng, x, jnp.zeros((1,), jnp.int32), labels, train=False)["params"]

  def eval_batches(self, rows: slice = slice(None)) -> dict:
    """The held-out batches, each with its index (`eval_index`, one per image): the loss draws each batch's
    timesteps and noise from its own key, so eval_batches batches average over as many draws."""
    return {split: [{**batch, "eval_index": np.full((len(batch["images"]),), i, np.int32)}
                    for i, batch in enumerate(batches)]
            for split, batches in super().eval_batches(rows).items()}

  def loss(self, params, batch, rng, train: bool):
    if rng is None:  # evaluation: fixed draws, a batch's own (every batch drew the same timesteps and noise)
      rng = jax.random.PRNGKey(EVAL_KEY)
      if "eval_index" in batch:
        rng = jax.random.fold_in(rng, batch["eval_index"][0])
    d = self.config.diffusion

    def apply_fn(p, x_t, t, labels, dropout_rng):
      return self.model.apply({"params": p}, x_t, t, labels, train=train, rngs={"dropout": dropout_rng})

    labels = batch["labels"] if self.conditional else None
    loss_sum, count = diffusion.diffusion_loss(
        apply_fn, params, self.schedule, batch["images"], labels, rng, prediction=d.prediction,
        cond_drop_prob=d.cond_drop_prob if train and self.conditional else 0.0, num_classes=self.num_classes)
    return loss_sum, count, {}

  def _apply_fn(self, params):
    return lambda x, t, labels: self.model.apply({"params": params}, x, t, labels, train=False)

  def check_sample_request(self, num_samples: int, labels=None, **options) -> None:
    super().check_sample_request(num_samples, labels, **options)
    steps = options.get("steps")
    if steps is not None and not 1 <= steps <= self.schedule.num_steps:
      raise UserError(f"The model was trained with {self.schedule.num_steps} diffusion steps; use --steps between "
                      f"1 and {self.schedule.num_steps}.")
    eta = options.get("eta")
    if eta is not None and (not 0 <= eta < math.inf or self.config.sample.sampler != "ddim"):
      raise UserError("--eta is DDIM's noise scale: use a value >= 0 with sample.sampler ddim.")
    guidance, interval = options.get("guidance"), options.get("guidance_interval")
    if not self.conditional and (guidance is not None or interval is not None):
      raise UserError("This diffusion model is not class-conditional, so there is nothing to guide; leave out "
                      "--guidance and --guidance-interval.")
    if guidance is not None and not math.isfinite(guidance):
      raise UserError(f"--guidance is {guidance}; use a finite scale (0 unconditional, 1 conditional, more guides).")
    if interval is not None:
      diffusion.check_guidance_interval(interval, "--guidance-interval LO HI")

  def sample(self, params, rng, num_samples: int, labels=None, *, steps=None, eta=None, guidance=None,
             guidance_interval=None):
    s = self.config.sample
    # eta is DDIM's: the config's default is not filled in for the DDPM sampler, which refuses one.
    options = {"steps": s.steps if steps is None else steps,
               "eta": (s.eta if eta is None else eta) if s.sampler == "ddim" else eta,
               "guidance": s.guidance if guidance is None else guidance,
               "guidance_interval": tuple(s.guidance_interval if guidance_interval is None else guidance_interval)}
    if not self.conditional:  # nothing to guide: what the caller asked for is checked, the config's values are moot
      options.update(guidance=guidance, guidance_interval=guidance_interval)
    self.check_sample_request(num_samples, labels, **options)
    if not self.conditional:
      options.update(guidance=1.0, guidance_interval=(0.0, 1.0))
    elif labels is None:
      options["guidance"] = 0.0  # no label asked for: the unconditional (null-class) model
    if self.conditional and self.config.diffusion.cond_drop_prob == 0 and options["guidance"] != 1:
      raise UserError("This model was trained with diffusion.cond_drop_prob 0, so its unconditional (null-class) "
                      "model is untrained; sample with labels and --guidance 1.")
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    return self._sampler(num_samples, **options)(params, rng, labels)

  @functools.lru_cache(maxsize=8)
  def _sampler(self, num_samples: int, steps: int, eta: float, guidance: float, guidance_interval: tuple):
    """One compiled sampling loop per (batch, steps, eta, guidance, interval): a `fori_loop` over the steps."""
    shape = (num_samples, *self.image_shape)
    d, s = self.config.diffusion, self.config.sample

    def run(params, rng, labels):
      kw = dict(labels=labels, num_classes=self.num_classes, guidance=guidance, guidance_interval=guidance_interval,
                prediction=d.prediction)
      if s.sampler == "ddim":
        return diffusion.ddim_sample(self._apply_fn(params), self.schedule, rng, shape, num_steps=steps, eta=eta, **kw)
      return diffusion.ddpm_sample(self._apply_fn(params), self.schedule, rng, shape, num_steps=steps,
                                   variance=s.variance, **kw)

    return jax.jit(run)

  def heldout_metrics(self, params) -> dict:
    """The variational bound in bits/dim on held-out images (strided over timesteps: an unbiased estimate), of the
    reverse process with the variance the DDPM sampler uses (sample.variance)."""
    e, d, s = self.config.eval, self.config.diffusion, self.config.sample
    images = self.dataset.images("test")[:e.bound_images]
    labels = jnp.asarray(self.dataset.labels("test")[:e.bound_images]) if self.conditional else None
    bound = jax.jit(lambda p, x, y, rng: diffusion_losses.bits_per_dim_bound(
        self._apply_fn(p), self.schedule, x, y, rng, prediction=d.prediction, variance=s.variance,
        stride=e.bound_stride)["total"])
    totals = []
    for i in range(0, len(images), 100):  # each chunk runs the model num_steps / bound_stride times: minutes on a CPU
      totals.append(np.asarray(bound(params, images[i:i + 100], None if labels is None else labels[i:i + 100],
                                     jax.random.PRNGKey(i))))
      logging.info("variational bound: %d / %d held-out images (every %d-th timestep)", i + len(totals[-1]),
                   len(images), e.bound_stride)
    return {"bits_per_dim": float(np.mean(np.concatenate(totals))),
            "bound_images": len(images), "bound_stride": e.bound_stride, "bound_variance": s.variance}
