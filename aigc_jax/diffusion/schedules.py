"""Noise schedules of the forward process q(x_t | x_0), and the conversions between predictions.

Timesteps are 0-indexed as in Ho et al.'s code: index t in [0, T) is the paper's step t + 1,
so x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with abar_t = prod_{s <= t} (1 - beta_s).
"""

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.errors import UserError


@flax.struct.dataclass
class NoiseSchedule:
  """Per-step constants of a T-step forward process, each [T] fp32 (computed in fp64); a pytree."""
  betas: jax.Array
  alphas_cumprod: jax.Array  # abar_t
  log_alphas_cumprod: jax.Array  # log abar_t: differences of it give respaced betas without cancellation
  alphas_cumprod_prev: jax.Array  # abar_{t-1}, with abar_{-1} = 1
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array  # Var q(x_{t-1} | x_t, x_0) = beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at t = 0
  posterior_log_variance_clipped: jax.Array  # log of it, with t = 0 taking t = 1's value (Ho et al.)
  posterior_mean_coef1: jax.Array  # E q(x_{t-1} | x_t, x_0) = coef1 x_0 + coef2 x_t
  posterior_mean_coef2: jax.Array

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def schedule_from_betas(betas) -> NoiseSchedule:
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError("betas must be a 1-D array in (0, 1)")
  alphas_cumprod = np.cumprod(1.0 - betas)
  prev = np.append(1.0, alphas_cumprod[:-1])
  post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return NoiseSchedule(
      betas=f32(betas), alphas_cumprod=f32(alphas_cumprod), log_alphas_cumprod=f32(np.cumsum(np.log1p(-betas))),
      alphas_cumprod_prev=f32(prev),
      sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)), sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1 - alphas_cumprod)),
      posterior_variance=f32(post_var), posterior_log_variance_clipped=f32(post_log_var),
      posterior_mean_coef1=f32(betas * np.sqrt(prev) / (1 - alphas_cumprod)),
      posterior_mean_coef2=f32((1 - prev) * np.sqrt(1 - betas) / (1 - alphas_cumprod)))


def linear_betas(num_steps: int) -> np.ndarray:
  """Ho et al.: beta from 1e-4 to 0.02 over 1000 steps; for other T both ends scale by 1000/T, as in
  Nichol & Dhariwal, so the total noise stays the same (clipped at 0.999 for T < 21). With T = 1 the one step is
  the last (0.999): linspace's single point would be the first, 0.1, leaving x_T mostly signal."""
  scale = 1000.0 / num_steps
  if num_steps == 1:
    return np.array([0.999])
  return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64), 0.999)


def cosine_betas(num_steps: int, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal 2021: abar(t) = cos^2(pi/2 (t/T + s) / (1 + s)), betas clipped at 0.999."""
  f = lambda u: math.cos((u / num_steps + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)], np.float64)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {"linear": linear_betas, "cosine": cosine_betas}


def make_schedule(name: str, num_steps: int) -> NoiseSchedule:
  """The named schedule with `num_steps` (T) steps."""
  if name not in SCHEDULES:
    raise UserError(f"Unknown noise schedule {name!r}; use one of {', '.join(SCHEDULES)}.")
  if num_steps < 1:
    raise UserError(f"A noise schedule needs at least 1 step, not {num_steps}; set a positive number of steps.")
  return schedule_from_betas(SCHEDULES[name](num_steps))


def _at(a, t, x):
  """a[t] for integer timesteps t (one for the batch, or [B]) in [0, T), shaped [B, 1, ..., 1] to broadcast against
  x [B, ...]. Where t is concrete, a step outside [0, T) is refused: indexing would clamp it, or wrap -1 to T - 1,
  silently (the papers count t from 1 to T; here it is 0 to T - 1)."""
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer) or t.ndim > 1:
    raise UserError(f"Timesteps must be integers, one for the batch or one per sample ([B]), not {t.dtype} of shape "
                    f"{t.shape}.")
  if not isinstance(t, jax.core.Tracer) and t.size:
    steps = np.asarray(t)  # not jnp: under a caller's jax.jit, its min and max would be traced
    lo, hi = int(steps.min()), int(steps.max())
    if lo < 0 or hi >= a.shape[0]:
      raise UserError(f"Timestep {lo if lo < 0 else hi} is outside the schedule's 0..{a.shape[0] - 1}; count steps "
                      f"from 0 (the papers' t = 1 is 0 here).")
  return a[t].reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def q_sample(schedule: NoiseSchedule, x0, t, noise):
  """A draw of x_t ~ q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise [B, ...], t [B] int."""
  return _at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior_mean_variance(schedule: NoiseSchedule, x0, x_t, t):
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0); means [B, ...], the others [B, 1, ...]."""
  mean = _at(schedule.posterior_mean_coef1, t, x_t) * x0 + _at(schedule.posterior_mean_coef2, t, x_t) * x_t
  return mean, _at(schedule.posterior_variance, t, x_t), _at(schedule.posterior_log_variance_clipped, t, x_t)


# Conversions between what a model predicts (Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1 - abar) x0).
PREDICTIONS = ("epsilon", "v")


def check_prediction(prediction: str):
  if prediction not in PREDICTIONS:
    raise UserError(f"Unknown prediction type {prediction!r}; use one of {', '.join(PREDICTIONS)}.")


def v_target(schedule: NoiseSchedule, x0, noise, t):
  return _at(schedule.sqrt_alphas_cumprod, t, x0) * noise - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def eps_from_v(schedule: NoiseSchedule, x_t, t, v):
  return _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + _at(schedule.sqrt_alphas_cumprod, t, x_t) * v


def x0_from_eps(schedule: NoiseSchedule, x_t, t, eps):
  return (x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _at(schedule.sqrt_alphas_cumprod, t, x_t)


def eps_from_x0(schedule: NoiseSchedule, x_t, t, x0):
  return (x_t - _at(schedule.sqrt_alphas_cumprod, t, x_t) * x0) / _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)


def check_prediction_shape(pred, x) -> None:
  """One sentence where a model's prediction is not shaped like its input (it would broadcast into a wrong loss)."""
  if jnp.shape(pred) != jnp.shape(x):
    raise UserError(f"The model's prediction has shape {tuple(jnp.shape(pred))} but its input x_t "
                    f"{tuple(jnp.shape(x))}; the diffusion model must predict one value per input value (eps or v).")


def to_x0_and_eps(schedule: NoiseSchedule, x_t, t, pred, prediction: str, *, clip_x0: bool = False):
  """(x0, eps) implied by a model's `prediction` at x_t; with clip_x0, x0 is clipped to [-1, 1] and eps follows it."""
  check_prediction_shape(pred, x_t)
  if prediction == "epsilon":
    x0 = x0_from_eps(schedule, x_t, t, pred)
    eps = pred
  elif prediction == "v":
    x0 = _at(schedule.sqrt_alphas_cumprod, t, x_t) * x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * pred
    eps = eps_from_v(schedule, x_t, t, pred)
  else:
    check_prediction(prediction)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = eps_from_x0(schedule, x_t, t, x0)
  return x0, eps
