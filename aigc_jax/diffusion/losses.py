"""The training loss (Ho et al.'s L_simple, with classifier-free-guidance label dropout) and the
variational bound in bits per dimension for evaluation."""

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from aigc_jax.diffusion import schedules as sched
from aigc_jax.diffusion.schedules import NoiseSchedule
from aigc_jax.errors import UserError
from aigc_jax.nn.likelihood import discretized_gaussian_log_likelihood

# apply_fn(params, x_t [B, ...], t [B] int, labels [B] int or None, rng) -> prediction [B, ...]
TrainApplyFn = Callable[..., jax.Array]
# apply_fn(x_t [B, ...], t [B] int, labels [B] int or None) -> prediction [B, ...]
ApplyFn = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


def drop_labels(labels, rng, cond_drop_prob: float, num_classes: int):
  """Labels [B] with each replaced by the null class `num_classes` with probability cond_drop_prob."""
  if cond_drop_prob <= 0 or labels is None:
    return labels
  if num_classes <= 0:
    raise UserError("Label dropout (cond_drop_prob > 0) needs a class-conditional model; set num_classes or "
                    "cond_drop_prob=0.")
  drop = jax.random.bernoulli(rng, cond_drop_prob, labels.shape)
  return jnp.where(drop, num_classes, labels)


def diffusion_loss(apply_fn: TrainApplyFn, params, schedule: NoiseSchedule, x0, labels, rng, *,
                   prediction: str = "epsilon", cond_drop_prob: float = 0.0, num_classes: int = 0):
  """(sum over the batch of each example's mean squared error, number of examples), for t ~ U[0, T).

  x0 [B, ...] is data (images scaled to [-1, 1]); the target is the noise (`epsilon`) or
  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (`v`). Divide the two on the host, or
  differentiate sum / count.
  """
  sched.check_prediction(prediction)
  t_rng, noise_rng, drop_rng, model_rng = jax.random.split(rng, 4)
  b = x0.shape[0]
  t = jax.random.randint(t_rng, (b,), 0, schedule.num_steps)  # [B]
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = sched.q_sample(schedule, x0, t, noise)
  labels = drop_labels(labels, drop_rng, cond_drop_prob, num_classes)
  pred = apply_fn(params, x_t, t, labels, model_rng)
  sched.check_prediction_shape(pred, x_t)
  target = noise if prediction == "epsilon" else sched.v_target(schedule, x0, noise, t)
  per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target).reshape(b, -1), axis=1)  # [B]
  return jnp.sum(per_example), jnp.asarray(b, jnp.float32)


# The reverse process p(x_{t-1} | x_t) = N(mean from the model, a fixed variance):
#   `posterior`: the posterior variance beta~_t (Ho et al.'s `fixedsmall`),
#   `beta`: beta_t, with beta~_1 at the first step (their `fixedlarge`, used for CIFAR-10).
VARIANCES = ("posterior", "beta")


def check_variance(variance: str, setting: str = "reverse-process variance"):
  """One sentence, naming `setting` (the config key where it came from one), for a variance not in VARIANCES."""
  if variance not in VARIANCES:
    raise UserError(f"Unknown {setting} {variance!r}; use posterior (beta~_t, Ho et al.'s fixedsmall) or beta "
                    f"(beta_t, their fixedlarge).")


def model_log_variance(schedule: NoiseSchedule, variance: str):
  """log sigma_t^2 [T] of the reverse process."""
  check_variance(variance)
  if variance == "posterior":
    return schedule.posterior_log_variance_clipped
  if schedule.num_steps == 1:  # no beta~_1 to stand in at the first step: the one step's beta, as `posterior` does
    return jnp.log(schedule.betas)
  return jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _mean_bits(a):  # [B, ...] nats -> [B] bits per dimension
  return jnp.mean(a.reshape(a.shape[0], -1), axis=1) / math.log(2.0)


def bits_per_dim_bound(apply_fn: ApplyFn, schedule: NoiseSchedule, x0, labels, rng, *, prediction: str = "epsilon",
                       variance: str = "posterior", stride: int = 1, offset: Optional[int] = None,
                       clip_x0: bool = True):
  """The variational bound -log p(x0) <= L_0 + sum_{t=1}^{T-1} L_t + L_T, in bits per dimension, per example.

  x0 [B, ...] must lie on the 256-level grid scaled to [-1, 1] (x = 2k/255 - 1). L_0 is the
  discretized Gaussian decoder, L_t (t >= 1, 0-indexed) are KLs from q(x_{t-1} | x_t, x_0) to the
  model's Gaussian with the fixed `variance`, each at one draw of x_t ~ q(x_t | x_0), and L_T is
  the KL of q(x_T | x_0) from N(0, I). The model runs once per evaluated timestep.

  stride=1 evaluates all T - 1 KL terms: the exact sum (up to the one-draw Monte Carlo of each
  term). stride=k > 1 evaluates only the t with (t - 1) % k == offset and multiplies their sum by k;
  with offset drawn uniformly from [0, k) (from `rng` when offset is None; it may be a traced int)
  every t is included with probability 1/k, so the estimate is unbiased, at ~T/k model calls. The noise for each t comes
  from fold_in(rng, t), so averaging the k offsets gives exactly the stride-1 sum. L_0 and L_T are
  always computed exactly.

  Returns a dict of [B] arrays: `total`, `prior` (L_T), `decoder` (L_0), `diffusion` (the L_t sum).
  """
  sched.check_prediction(prediction)
  if not isinstance(stride, int) or stride < 1:
    raise UserError(f"The bits/dim timestep stride must be a positive integer, not {stride!r}; use 1 for the full sum.")
  T = schedule.num_steps
  b = x0.shape[0]
  x0 = x0.astype(jnp.float32)
  noise_rng, offset_rng = jax.random.split(rng)
  if offset is None:
    offset = jax.random.randint(offset_rng, (), 0, stride)
  elif isinstance(offset, int) and not 0 <= offset < stride:  # a traced offset is the caller's to check
    raise ValueError(f"offset {offset} must be in [0, {stride})")
  n = -(-(T - 1) // stride)  # ceil: KL terms evaluated per example
  kl_t = 1 + offset + stride * jnp.arange(n)  # [n]
  ts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.minimum(kl_t, T - 1).astype(jnp.int32)])  # [1 + n]
  weights = jnp.concatenate([jnp.ones((1,)), jnp.where(kl_t <= T - 1, float(stride), 0.0)])  # [1 + n]
  log_var = model_log_variance(schedule, variance)  # [T]

  def term(_, tw):
    t, w = tw
    tb = jnp.full((b,), t)
    noise = jax.random.normal(jax.random.fold_in(noise_rng, t), x0.shape)
    x_t = sched.q_sample(schedule, x0, tb, noise)
    pred = apply_fn(x_t, tb, labels).astype(jnp.float32)
    x0_hat, _ = sched.to_x0_and_eps(schedule, x_t, tb, pred, prediction, clip_x0=clip_x0)
    model_mean, _, _ = sched.q_posterior_mean_variance(schedule, x0_hat, x_t, tb)
    true_mean, _, true_log_var = sched.q_posterior_mean_variance(schedule, x0, x_t, tb)
    kl = _mean_bits(normal_kl(true_mean, true_log_var, model_mean, log_var[t]))
    nll = -_mean_bits(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var[t]))
    return None, (jnp.where(t == 0, 0.0, w * kl), jnp.where(t == 0, nll, 0.0))  # [B], [B]

  _, (kls, nlls) = jax.lax.scan(term, None, (ts, weights))  # [1 + n, B] each
  abar_T = schedule.alphas_cumprod[-1]
  prior = _mean_bits(normal_kl(jnp.sqrt(abar_T) * x0, jnp.log1p(-abar_T), 0.0, 0.0))
  decoder, diffusion = jnp.sum(nlls, axis=0), jnp.sum(kls, axis=0)
  return {"total": prior + decoder + diffusion, "prior": prior, "decoder": decoder, "diffusion": diffusion}
