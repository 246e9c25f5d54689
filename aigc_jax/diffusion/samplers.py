"""Ancestral (DDPM) and DDIM samplers with classifier-free guidance, each one compiled loop.

A sampler takes `apply_fn(x_t [B, ...], t [B] int, labels [B] int or None) -> prediction`, so it
works with any model; the prediction is the noise (`epsilon`) or `v`. Both run on a subsequence
of `num_steps` <= T of the training timesteps (evenly spaced from T - 1, down to 0 when num_steps > 1), with
the process respaced to it as in Nichol & Dhariwal 2021: abar' is abar on the subsequence and
beta'_i = 1 - abar'_i / abar'_{i-1}. With num_steps = T this is exactly Ho et al.'s sampler.

Guidance can be limited to an interval (after Kynkäänniemi et al. 2024, "Applying guidance in a
limited interval improves sample and distribution quality"): `guidance_interval` (lo, hi) guides
only the steps whose timestep t has lo <= t / (T - 1) <= hi, and uses the plain conditional
prediction elsewhere; (0, 1), the default, guides every step. The interval is in timesteps, not
in the paper's noise level sigma = sqrt((1 - abar) / abar), so one interval covers different sigmas
under different schedules: t / (T - 1) = 0.5 is sigma 3.4 under the linear schedule of T = 1000.

The samplers trace under `jax.jit` (close over the parameters in the jitted function); the
label check then cannot see traced labels, so call `check_labels` on the host first. `guidance`
and `eta` may be traced too (one compiled sampler for a sweep over them); a Python number lets
guidance 1 and eta 0 skip the doubled batch and the noise draws:

  @jax.jit
  def sample(params, rng, labels):
    apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y, train=False)
    return ddim_sample(apply_fn, schedule, rng, (B, H, W, C), num_steps=50, labels=labels, num_classes=10,
                       guidance=3.0)
"""

import math
import operator
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.diffusion import schedules as sched
from aigc_jax.diffusion.losses import ApplyFn, check_variance
from aigc_jax.diffusion.schedules import NoiseSchedule
from aigc_jax.errors import UserError


def check_labels(labels, num_classes: int, batch_size: Optional[int] = None, *, null_class: bool = False):
  """That class labels can condition a model with `num_classes` classes: [B] integers in [0, num_classes), or in
  [0, num_classes] with `null_class` (a model takes num_classes as the unconditional class; a sampling request
  names real classes). Shapes and dtypes are checked always, values where they are concrete (not traced under
  jax.jit): out of range, the model's embedding lookup would give NaN silently."""
  if labels is None:
    return
  if num_classes <= 0:
    raise UserError("Class labels were given with num_classes=0 (an unconditional model); for a class-conditional "
                    "model pass its num_classes, else sample without labels.")
  shape, dtype = jnp.shape(labels), jnp.result_type(labels)
  if len(shape) != 1 or (batch_size is not None and shape[0] != batch_size):
    raise UserError(f"Give one class label per sample ({batch_size} labels), not labels of shape {shape}.")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise UserError(f"Class labels must be integers, not {dtype}; pass labels in [0, {num_classes}).")
  if isinstance(labels, jax.core.Tracer):
    return
  labels = np.asarray(labels)
  bad = labels[(labels < 0) | (labels >= num_classes + null_class)]
  if bad.size and null_class:
    raise UserError(f"Class label {int(bad[0])} is outside [0, {num_classes}]; pass labels from 0 to "
                    f"{num_classes - 1}, or {num_classes} (or labels=None) for the unconditional model.")
  if bad.size:
    raise UserError(f"Class label {int(bad[0])} is outside [0, {num_classes}); "
                    f"pass labels from 0 to {num_classes - 1}.")


def sampling_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
  """The `num_steps` training timesteps a sampler visits, ascending: evenly spaced from 0 to T - 1."""
  try:
    steps = operator.index(num_steps)  # a Python or numpy integer, or a concrete jax one
  except TypeError:
    steps = 0
  if steps < 1:
    raise UserError(f"The number of sampling steps must be a positive integer known when the sampler is traced, "
                    f"not {num_steps!r}; use num_steps >= 1 (a Python int).")
  num_steps = steps
  if num_steps > num_train_steps:
    raise UserError(f"The noise schedule has only {num_train_steps} training steps; use num_steps <= "
                    f"{num_train_steps}.")
  return np.round(np.linspace(num_train_steps - 1, 0, num_steps))[::-1].astype(np.int32)


def guided_prediction(apply_fn: ApplyFn, x, t, labels, *, num_classes: int, guidance: float):
  """pred_uncond + guidance * (pred_cond - pred_uncond): 0 is the unconditional model, 1 the conditional one.

  The mix is affine (weights 1 - w and w), so mixing v predictions mixes the implied eps the same way.
  When guided, the conditional and unconditional predictions come from one call on the batch doubled.
  """
  check_scalar(guidance, "guidance")
  if labels is None or _is(guidance, 1.0):
    return apply_fn(x, t, labels)
  null = jnp.full_like(labels, num_classes)
  if _is(guidance, 0.0):
    return apply_fn(x, t, null)
  both = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
  cond, uncond = jnp.split(both, 2)
  return uncond + guidance * (cond - uncond)


def check_scalar(value, name: str, minimum: float | None = None) -> None:
  """One number, concrete or traced: a [B] array would broadcast against the images' last (channel) axis. A concrete
  one must be finite (NaN would turn every sample into NaN) and at least `minimum` where one is given."""
  if jnp.ndim(value) != 0:
    raise UserError(f"{name} must be one number (a Python float or a scalar array, traced or not), not an array of "
                    f"shape {jnp.shape(value)}; for one value per sample, jax.vmap the sampler over them.")
  if isinstance(value, jax.core.Tracer):
    return
  number = float(value)
  if not math.isfinite(number) or (minimum is not None and number < minimum):
    bound = "a finite number" if minimum is None else f"a finite number of at least {minimum:g}"
    raise UserError(f"{name} is {number}; use {bound}.")


def _is(value, number: float) -> bool:
  """Whether `value` is known at trace time to equal `number` (a traced value never is)."""
  return not isinstance(value, jax.core.Tracer) and value == number


def check_guidance_interval(interval, setting: str = "guidance_interval=(LO, HI)") -> tuple[float, float]:
  """(lo, hi) as floats with 0 <= lo <= hi <= 1, or a one-sentence error telling to use `setting`."""
  try:
    lo, hi = (float(v) for v in interval)
  except (TypeError, ValueError):
    raise UserError(f"The guidance interval {interval!r} is not two timestep fractions; use {setting} with "
                    f"0 <= LO <= HI <= 1.") from None
  if not 0.0 <= lo <= hi <= 1.0:
    raise UserError(f"The guidance interval ({lo:g}, {hi:g}) is not within the timestep fractions 0..1; "
                    f"use {setting} with 0 <= LO <= HI <= 1.")
  return lo, hi


@flax.struct.dataclass
class _Step:
  """Constants of the respaced process, one entry per sampling step ([S] each, or scalars inside the loop)."""
  abar_prev: jax.Array
  one_minus_abar: jax.Array
  one_minus_abar_prev: jax.Array
  beta: jax.Array  # 1 - abar / abar_prev

  @property
  def posterior_variance(self):
    return self.beta * self.one_minus_abar_prev / self.one_minus_abar


def _sample(apply_fn, schedule, rng, shape, *, num_steps, labels, num_classes, guidance, guidance_interval, prediction,
            clip_x0, x_init, update, stochastic=True):
  """The loop both samplers share: x_T ~ N(0, I), then num_steps updates x <- update(...) from t = T - 1 down to 0."""
  sched.check_prediction(prediction)
  lo, hi = check_guidance_interval(guidance_interval)
  check_scalar(guidance, "guidance")
  check_labels(labels, num_classes, shape[0])
  num_steps = schedule.num_steps if num_steps is None else num_steps
  ts = jnp.asarray(sampling_timesteps(schedule.num_steps, num_steps))  # [S] ascending
  # The respaced process in float32 without cancellation: from log abar, never 1 - abar / abar'.
  log_abar = schedule.log_alphas_cumprod[ts]  # [S]
  log_abar_prev = jnp.concatenate([jnp.zeros((1,)), log_abar[:-1]])  # [S]; abar = 1 after the last step
  steps = _Step(abar_prev=jnp.exp(log_abar_prev), one_minus_abar=-jnp.expm1(log_abar),
                one_minus_abar_prev=-jnp.expm1(log_abar_prev), beta=-jnp.expm1(log_abar - log_abar_prev))
  init_rng, step_rng = jax.random.split(rng)
  if x_init is not None and tuple(jnp.shape(x_init)) != tuple(shape):
    raise UserError(f"x_init has shape {tuple(jnp.shape(x_init))} but the samples {tuple(shape)}; give x_init of "
                    f"the sample shape.")
  x = jax.random.normal(init_rng, shape) if x_init is None else jnp.asarray(x_init, jnp.float32)
  if labels is not None:
    labels = jnp.asarray(labels, jnp.int32)

  def body(j, x):
    i = num_steps - 1 - j  # position in ts, counting down
    t = jnp.full((shape[0],), ts[i])
    guided = lambda: guided_prediction(apply_fn, x, t, labels, num_classes=num_classes, guidance=guidance)
    if labels is None or _is(guidance, 1.0) or (lo, hi) == (0.0, 1.0):
      pred = guided()
    else:  # outside the interval, the conditional prediction (guidance 1) at the cost of one call
      level = ts[i] / max(schedule.num_steps - 1, 1)  # T = 1: its one step, t = 0, is level 0
      pred = jax.lax.cond((level >= lo) & (level <= hi), guided, lambda: apply_fn(x, t, labels))
    pred = pred.astype(jnp.float32)
    x0, eps = sched.to_x0_and_eps(schedule, x, t, pred, prediction, clip_x0=clip_x0)
    z = jax.random.normal(jax.random.fold_in(step_rng, i), shape) if stochastic else None
    return update(x, x0, eps, z, jax.tree.map(lambda a: a[i], steps), i)

  return jax.lax.fori_loop(0, num_steps, body, x)


def ddpm_sample(apply_fn: ApplyFn, schedule: NoiseSchedule, rng, shape, *, num_steps: Optional[int] = None,
                labels=None, num_classes: int = 0, guidance: float = 1.0, guidance_interval=(0.0, 1.0),
                prediction: str = "epsilon", variance: str = "posterior", clip_x0: bool = True, x_init=None):
  """Ancestral sampling, x_{t-1} ~ N(posterior mean given the predicted x0, sigma_t^2) -> x_0 [shape].

  variance `posterior` takes sigma_t^2 = beta~_t, `beta` takes beta_t (no noise after the last step
  either way). num_steps None is all T steps; fewer respaces the process (see the module docstring).
  labels [B] with num_classes > 0 condition the model; guidance w mixes in the unconditional
  (null-class) prediction as above, at the steps inside `guidance_interval`. clip_x0 clips the
  predicted x0 to [-1, 1] (image data).
  x_init [shape] replaces the initial draw of x_T.
  """
  check_variance(variance)

  def update(x, x0, eps, z, c: _Step, i):
    coef1 = jnp.sqrt(c.abar_prev) * c.beta / c.one_minus_abar
    coef2 = jnp.sqrt(1 - c.beta) * c.one_minus_abar_prev / c.one_minus_abar
    var = c.posterior_variance if variance == "posterior" else c.beta
    return coef1 * x0 + coef2 * x + jnp.where(i > 0, jnp.sqrt(var), 0.0) * z

  return _sample(apply_fn, schedule, rng, shape, num_steps=num_steps, labels=labels, num_classes=num_classes,
                 guidance=guidance, guidance_interval=guidance_interval, prediction=prediction, clip_x0=clip_x0,
                 x_init=x_init, update=update)


def ddim_sample(apply_fn: ApplyFn, schedule: NoiseSchedule, rng, shape, *, num_steps: int, eta: float = 0.0,
                labels=None, num_classes: int = 0, guidance: float = 1.0, guidance_interval=(0.0, 1.0),
                prediction: str = "epsilon", clip_x0: bool = True, x_init=None):
  """DDIM (Song et al. 2021) over `num_steps` <= T evenly spaced timesteps -> x_0 [shape].

  x_{t'} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z with
  sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'): eta=0 is deterministic given
  x_T, eta=1 is the ancestral sampler with the posterior variance. Other arguments as `ddpm_sample`.
  """
  check_scalar(eta, "eta", minimum=0.0)

  def update(x, x0, eps, z, c: _Step, i):
    sigma2 = eta ** 2 * c.posterior_variance
    x = jnp.sqrt(c.abar_prev) * x0 + jnp.sqrt(jnp.maximum(c.one_minus_abar_prev - sigma2, 0.0)) * eps
    return x if z is None else x + jnp.sqrt(sigma2) * z

  return _sample(apply_fn, schedule, rng, shape, num_steps=num_steps, labels=labels, num_classes=num_classes,
                 guidance=guidance, guidance_interval=guidance_interval, prediction=prediction, clip_x0=clip_x0,
                 x_init=x_init, update=update, stochastic=not _is(eta, 0.0))
