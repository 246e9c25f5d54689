import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import config as config_lib
from aigc_jax.diffusion import losses, samplers, schedules
from aigc_jax.diffusion import bits_per_dim_bound, check_labels, ddim_sample, ddpm_sample, diffusion_loss, make_schedule
from aigc_jax.errors import UserError
from aigc_jax.evaluate import sampling_record
from aigc_jax.models.unet import UNet, UNetConfig
from aigc_jax.nn import likelihood
from aigc_jax.tasks import make_task
from conftest import ROOT, TINY_UNET


def rbg_key(seed):
  return jax.random.key(seed, impl="rbg")  # threefry takes XLA:CPU tens of seconds to compile; rbg a few


def shrink_by_half(x, t, labels):
  return 0.5 * x


# A denoiser in place of a task's UNet, for what the task does around its model: nothing to build or compile.
STAND_IN = type("ShrinkByHalf", (), {"apply": lambda self, params, x, t, labels, **kw: shrink_by_half(x, t, labels)})()


# --- Schedules and the forward process ---------------------------------------------------------


def test_schedule_endpoints():
  lin = make_schedule("linear", 1000)
  np.testing.assert_allclose([lin.betas[0], lin.betas[-1]], [1e-4, 0.02], rtol=1e-6)  # Ho et al.
  assert lin.num_steps == 1000 and np.all(np.diff(lin.betas) > 0)
  np.testing.assert_allclose(lin.alphas_cumprod[-1], np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-4)
  short = np.asarray(make_schedule("linear", 50).betas)
  np.testing.assert_allclose(short[[0, -1]], [2e-3, 0.4], rtol=1e-6)  # both ends scaled by 1000/T
  cos = make_schedule("cosine", 1000)
  f = lambda u: np.cos((u / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(np.asarray(cos.alphas_cumprod)[[0, 499]], [f(1) / f(0), f(500) / f(0)], rtol=1e-5)
  assert cos.betas[-1] == np.float32(0.999) and cos.alphas_cumprod[-1] < 1e-8  # clipped last step, ~pure noise
  assert np.all(np.diff(cos.alphas_cumprod) < 0) and cos.alphas_cumprod_prev[0] == 1.0
  with pytest.raises(UserError, match="linear, cosine"):
    make_schedule("quadratic", 10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_matches_closed_form_moments(name):
  schedule = make_schedule(name, 1000)
  n = 100_000
  ts = np.array([0, 250, 600, 999])
  x0 = np.array([0.7, -0.3], np.float32)
  noise = np.random.default_rng(0).normal(size=(len(ts), n, 2)).astype(np.float32)
  t = np.repeat(ts, n)
  xt = np.asarray(schedules.q_sample(schedule, np.tile(x0, (len(ts) * n, 1)), t, noise.reshape(-1, 2)))
  xt = xt.reshape(len(ts), n, 2)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[ts][:, None]  # [4, 1]
  var = np.broadcast_to(1 - abar, (len(ts), 2))
  # 5 standard errors: of the mean sqrt(var / n), of the variance var sqrt(2 / n) (Gaussian).
  np.testing.assert_array_less(np.abs(xt.mean(1) - np.sqrt(abar) * x0), 5 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(xt.var(1) - var), 5 * var * np.sqrt(2 / n))


def test_q_posterior_is_bayes_rule():
  schedule = make_schedule("cosine", 20)
  x0, xt, t = np.array([[0.3], [-0.8]], np.float32), np.array([[1.1], [0.2]], np.float32), np.array([1, 13])
  mean, var, log_var = schedules.q_posterior_mean_variance(schedule, x0, xt, t)
  abar, beta = np.asarray(schedule.alphas_cumprod, np.float64), np.asarray(schedule.betas, np.float64)
  # q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) times
  # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t), as a density in x_{t-1}.
  precision = 1 / (1 - abar[t - 1]) + (1 - beta[t]) / beta[t]
  expected_mean = (np.sqrt(abar[t - 1]) * x0[:, 0] / (1 - abar[t - 1]) + np.sqrt(1 - beta[t]) * xt[:, 0] / beta[t])
  np.testing.assert_allclose(mean[:, 0], expected_mean / precision, rtol=1e-5)
  np.testing.assert_allclose(var[:, 0], 1 / precision, rtol=1e-5)
  np.testing.assert_allclose(log_var, np.log(var), rtol=1e-5)


def test_v_prediction_round_trips():
  schedule = make_schedule("cosine", 100)
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(2, 5, 3)).astype(np.float32)
  t = np.array([0, 10, 50, 90, 99])
  xt = schedules.q_sample(schedule, x0, t, eps)
  v = schedules.v_target(schedule, x0, eps, t)
  np.testing.assert_allclose(schedules.eps_from_v(schedule, xt, t, v), eps, atol=2e-5)
  x0_v, eps_v = schedules.to_x0_and_eps(schedule, xt, t, v, "v")
  x0_e, eps_e = schedules.to_x0_and_eps(schedule, xt, t, eps, "epsilon")
  np.testing.assert_allclose(x0_v, x0, atol=2e-5)
  np.testing.assert_allclose(eps_v, eps, atol=2e-5)
  np.testing.assert_allclose(x0_e[:4], x0[:4], atol=2e-3)  # x0 from eps divides by sqrt(abar), ~0 at t = T - 1
  np.testing.assert_array_equal(eps_e, eps)


# --- The training loss ---------------------------------------------------------------------------


def test_diffusion_loss_targets_and_label_dropout():
  schedule = make_schedule("cosine", 100)
  b = 4096
  x0 = np.zeros((b, 2, 2), np.float32)
  zero = lambda params, x, t, y, rng: jnp.zeros_like(x)
  total, count = diffusion_loss(zero, None, schedule, x0, None, rbg_key(0))
  assert count == b
  # E|eps|^2 = 1; each example's loss is a mean of 4 squares (variance 2/4), so the batch mean has sd 1/sqrt(2b).
  assert abs(total / count - 1.0) < 5 / math.sqrt(2 * b)
  # With x0 = 0, v = sqrt(abar_t) eps: E|v|^2 = mean over t of abar_t.
  total, _ = diffusion_loss(zero, None, schedule, x0, None, rbg_key(1), prediction="v")
  assert abs(total / b - float(np.mean(schedule.alphas_cumprod))) < 5 / math.sqrt(2 * b)
  # A predictor that knows x0 has no loss only if the target is the noise that made x_t, at the t it was given.
  x0 = grid_images((64, 2, 2), 3)
  for prediction in ("epsilon", "v"):
    def oracle(params, x, t, y, rng, prediction=prediction):
      eps = schedules.eps_from_x0(schedule, x, t, jnp.asarray(x0))
      if prediction == "epsilon":
        return eps
      return schedules.v_target(schedule, jnp.asarray(x0), eps, t)
    total, _ = diffusion_loss(oracle, None, schedule, x0, None, rbg_key(2), prediction=prediction)
    assert float(total) / 64 < 1e-10, prediction

  seen = []

  def record(params, x, t, y, rng):
    seen.append(np.asarray(y))
    return jnp.zeros_like(x)

  labels = np.arange(b) % 10
  diffusion_loss(record, None, schedule, x0, labels, rbg_key(2), cond_drop_prob=0.0, num_classes=10)
  diffusion_loss(record, None, schedule, x0, labels, rbg_key(3), cond_drop_prob=1.0, num_classes=10)
  diffusion_loss(record, None, schedule, x0, labels, rbg_key(4), cond_drop_prob=0.25, num_classes=10)
  np.testing.assert_array_equal(seen[0], labels)
  np.testing.assert_array_equal(seen[1], 10)  # all dropped to the null class
  dropped = seen[2] == 10
  assert abs(dropped.mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / b)
  np.testing.assert_array_equal(seen[2][~dropped], labels[~dropped])
  with pytest.raises(UserError, match="class-conditional"):
    diffusion_loss(record, None, schedule, x0, labels, rbg_key(2), cond_drop_prob=0.1, num_classes=0)
  with pytest.raises(UserError, match="epsilon, v"):
    diffusion_loss(record, None, schedule, x0, None, rbg_key(2), prediction="x0")


# --- Samplers on a toy where the optimal predictor is exact ---------------------------------------
# Data x0 ~ N(MU, S^2) independently per dimension. Then x_t ~ N(a MU, V) with a = sqrt(abar_t),
# b = sqrt(1 - abar_t), V = a^2 S^2 + b^2, and the MSE-optimal predictor is E[eps | x_t] = b (x_t - a MU) / V.
# Every sampler step is then affine in x plus Gaussian noise, so the exact mean and variance of
# what a sampler produces follow from a float64 recursion (`sampler_moments`): sample moments are
# compared to that with standard-error tolerances, and to the data distribution with the recursion's
# own discretisation error (at most 1.3% of the variance for cosine T=1000) as extra slack.

MU = np.array([0.5, -1.0])
S = np.array([0.3, 0.8])
N = 20_000  # samples per run: standard errors 0.7% of sd for means, 1% of the variance for variances


def exact_eps(schedule, mu=MU):
  def apply_fn(x, t, labels):
    abar = schedule.alphas_cumprod[t][:, None]
    a, b = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    return b * (x - a * mu) / (a * a * S * S + b * b)
  return apply_fn


def sampler_moments(schedule, num_steps, *, eta=None, ddpm_variance=None):
  """Exact (mean, variance) [2] of a sampler's output under the exact predictor, from x_T ~ N(0, 1)."""
  ts = samplers.sampling_timesteps(schedule.num_steps, num_steps)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[ts]
  abar_prev = np.append(1.0, abar[:-1])
  m, v = np.zeros(2), np.ones(2)
  for i in reversed(range(len(ts))):
    a, b, ap = np.sqrt(abar[i]), np.sqrt(1 - abar[i]), abar_prev[i]
    big_v = a * a * S * S + b * b
    beta = 1 - abar[i] / ap
    post = beta * (1 - ap) / (1 - abar[i])
    if ddpm_variance is not None:
      sig2 = 0.0 if i == 0 else (post if ddpm_variance == "posterior" else beta)
      gain_x0, gain_x = np.sqrt(ap) * beta / (1 - abar[i]), np.sqrt(1 - beta) * (1 - ap) / (1 - abar[i])
    else:  # DDIM: sqrt(ap) x0_hat + c eps_hat + sigma z, written as gain_x0 x0_hat + gain_x x
      sig2 = eta ** 2 * post
      c = np.sqrt(max(1 - ap - sig2, 0.0))
      gain_x0, gain_x = np.sqrt(ap) - c * a / b, c / b
    # x0_hat = MU + a S^2 (x - a MU) / V is affine in x.
    gain = gain_x0 * a * S * S / big_v + gain_x
    m = gain_x0 * (MU - a * a * S * S * MU / big_v) + gain * m
    v = gain * gain * v + sig2
  return m, v


def assert_moments(x, mean, var, slack_mean=0.0, slack_var=0.0):
  n = x.shape[0]
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(var / n) + slack_mean)
  np.testing.assert_array_less(np.abs(x.var(0) - var), 5 * var * np.sqrt(2 / n) + slack_var * var)


@pytest.fixture(scope="module")
def toy():
  schedule = make_schedule("cosine", 1000)
  return schedule, exact_eps(schedule)


def test_ddim_eta1_matches_ddpm_ancestral_and_the_data(toy):
  schedule, eps = toy
  kw = dict(clip_x0=False)
  ddpm = np.asarray(ddpm_sample(eps, schedule, rbg_key(0), (N, 2), variance="posterior", **kw))
  ddim = np.asarray(ddim_sample(eps, schedule, rbg_key(1), (N, 2), num_steps=1000, eta=1.0, **kw))
  mean, var = sampler_moments(schedule, 1000, ddpm_variance="posterior")
  np.testing.assert_allclose((mean, var), sampler_moments(schedule, 1000, eta=1.0), rtol=1e-12)
  np.testing.assert_allclose(mean, MU, atol=1e-3)
  np.testing.assert_allclose(var, S ** 2, rtol=0.013)  # T=1000 discretisation error
  for x in (ddpm, ddim):
    assert_moments(x, mean, var)
    assert_moments(x, MU, S ** 2, slack_mean=1e-3, slack_var=0.013)
  # Two independent runs: their means differ by at most 5 sd of a difference of two means.
  np.testing.assert_array_less(np.abs(ddpm.mean(0) - ddim.mean(0)), 5 * np.sqrt(2 * var / N))
  np.testing.assert_array_less(np.abs(ddpm.var(0) - ddim.var(0)), 5 * var * np.sqrt(4 / N))
  # With the same randomness the two are the same map, sample for sample (up to fp32 rounding).
  x_init = np.random.default_rng(0).normal(size=(512, 2)).astype(np.float32)
  kw.update(x_init=x_init)
  np.testing.assert_allclose(ddim_sample(eps, schedule, rbg_key(2), (512, 2), num_steps=1000, eta=1.0, **kw),
                             ddpm_sample(eps, schedule, rbg_key(2), (512, 2), **kw), atol=1e-4)


def test_ddim_eta0_is_deterministic_and_reaches_the_data(toy):
  schedule, eps = toy
  x_init = np.random.default_rng(0).normal(size=(N, 2)).astype(np.float32)
  run = lambda rng, x: np.asarray(ddim_sample(eps, schedule, rng, x.shape, num_steps=1000, eta=0.0, clip_x0=False,
                                              x_init=x))
  a = run(rbg_key(0), x_init)
  np.testing.assert_array_equal(run(rbg_key(1), x_init[:512]), a[:512])  # other rng, same x_T: same samples
  mean, var = sampler_moments(schedule, 1000, eta=0.0)
  np.testing.assert_allclose(var, S ** 2, rtol=0.01)
  assert_moments(a, mean, var)
  assert_moments(a, MU, S ** 2, slack_mean=1e-3, slack_var=0.01)


def test_respaced_samplers_and_beta_variance_follow_their_exact_moments(toy):
  schedule, eps = toy
  x = np.asarray(ddim_sample(eps, schedule, rbg_key(2), (N, 2), num_steps=50, eta=0.5, clip_x0=False))
  assert_moments(x, *sampler_moments(schedule, 50, eta=0.5))
  x = np.asarray(ddpm_sample(eps, schedule, rbg_key(3), (N, 2), num_steps=100, variance="beta", clip_x0=False))
  assert_moments(x, *sampler_moments(schedule, 100, ddpm_variance="beta"))


def test_v_prediction_sampling_equals_epsilon_sampling():
  schedule = make_schedule("cosine", 50)
  eps = exact_eps(schedule)

  def v_fn(x, t, labels):  # v = a eps - b x0, with x0 from the exact eps
    abar = schedule.alphas_cumprod[t][:, None]
    e = eps(x, t, labels)
    return jnp.sqrt(abar) * e - jnp.sqrt(1 - abar) * (x - jnp.sqrt(1 - abar) * e) / jnp.sqrt(abar)

  kw = dict(num_steps=20, eta=0.0, clip_x0=False)
  np.testing.assert_allclose(ddim_sample(v_fn, schedule, rbg_key(0), (64, 2), prediction="v", **kw),
                             ddim_sample(eps, schedule, rbg_key(0), (64, 2), **kw), atol=1e-4)


# --- Classifier-free guidance and user errors ------------------------------------------------------

CLASS_MU = jnp.array([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])  # classes 0 and 1, then the null class


def class_eps(schedule, fixed_label=None):
  def apply_fn(x, t, labels):
    if fixed_label is not None:
      labels = jnp.full((x.shape[0],), fixed_label)
    mu = CLASS_MU[2] if labels is None else CLASS_MU[labels]
    return exact_eps(schedule, mu)(x, t, None)
  return apply_fn


def test_guidance_scales():
  schedule = make_schedule("linear", 50)
  labels = np.array([0, 1, 1, 0])
  kw = dict(num_steps=10, eta=0.0, clip_x0=False)
  run = lambda fn, **a: np.asarray(ddim_sample(fn, schedule, rbg_key(0), (4, 2), **kw, **a))
  guided = class_eps(schedule)
  uncond = run(guided)
  cond = run(lambda x, t, y: guided(x, t, jnp.asarray(labels)))
  np.testing.assert_array_equal(run(guided, labels=labels, num_classes=2, guidance=0.0), uncond)
  np.testing.assert_array_equal(run(guided, labels=labels, num_classes=2, guidance=1.0), cond)
  assert not np.allclose(cond, uncond)

  def mixed(x, t, y):  # what guidance 3 should use
    return guided(x, t, None) + 3.0 * (guided(x, t, jnp.asarray(labels)) - guided(x, t, None))

  np.testing.assert_allclose(run(guided, labels=labels, num_classes=2, guidance=3.0), run(mixed), atol=1e-5)


def test_guidance_and_eta_may_be_traced_for_a_sweep_under_one_jit():
  schedule = make_schedule("linear", 50)
  labels = np.array([0, 1, 1, 0])
  guided = class_eps(schedule)

  def sample(guidance, eta):
    return ddim_sample(guided, schedule, rbg_key(0), (4, 2), num_steps=10, eta=eta, clip_x0=False, labels=labels,
                       num_classes=2, guidance=guidance)

  swept = jax.jit(sample)
  for guidance, eta in ((3.0, 0.0), (1.0, 0.5), (0.0, 1.0)):
    np.testing.assert_allclose(swept(guidance, eta), sample(guidance, eta), atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_interval_guides_only_its_noise_levels(sampler):
  schedule = make_schedule("linear", 50)  # 10 steps visit t = 0, 5, 11, 16, 22, 27, 33, 38, 44, 49
  labels = np.array([0, 1, 1, 0])
  guided = class_eps(schedule)
  fn = dict(ddim=ddim_sample, ddpm=ddpm_sample)[sampler]
  run = lambda f, **a: np.asarray(fn(f, schedule, rbg_key(0), (4, 2), num_steps=10, clip_x0=False, **a))

  def reference(x, t, y):  # guidance 3 for 11 <= t <= 33, i.e. levels 0.22..0.67 of T - 1 = 49; conditional elsewhere
    cond = guided(x, t, jnp.asarray(labels))
    mixed = guided(x, t, None) + 3.0 * (cond - guided(x, t, None))
    return jnp.where(((t >= 11) & (t <= 33))[:, None], mixed, cond)

  expected = run(reference)
  got = run(guided, labels=labels, num_classes=2, guidance=3.0, guidance_interval=(0.2, 0.7))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  everywhere = run(guided, labels=labels, num_classes=2, guidance=3.0)
  assert not np.allclose(got, everywhere, atol=1e-3)
  np.testing.assert_array_equal(run(guided, labels=labels, num_classes=2, guidance=3.0, guidance_interval=(0, 1)),
                                everywhere)
  with pytest.raises(UserError, match=r"guidance interval \(0.5, 0.2\) .* use guidance_interval=\(LO, HI\) with 0 <= LO"):
    run(guided, labels=labels, num_classes=2, guidance=3.0, guidance_interval=(0.5, 0.2))


def test_user_errors():
  schedule = make_schedule("linear", 50)
  fn = exact_eps(schedule)
  with pytest.raises(UserError, match="has only 50 training steps; use num_steps <= 50"):
    ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=51)
  with pytest.raises(UserError, match="has only 50 training steps"):
    ddpm_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=100)
  with pytest.raises(UserError, match="positive"):
    ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=0)
  for bad in ([0, 10], [-1, 3]):
    with pytest.raises(UserError, match="outside \\[0, 10\\)"):
      ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=5, labels=np.array(bad), num_classes=10)
  with pytest.raises(UserError, match="unconditional"):
    check_labels(np.array([0, 1]), 0)
  with pytest.raises(UserError, match="unconditional"):  # traced labels: num_classes is still checked
    jax.jit(lambda y: ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=5, labels=y))(jnp.array([0, 1]))
  with pytest.raises(UserError, match="one class label per sample"):
    check_labels(np.array([0, 1, 2]), 10, batch_size=2)
  with pytest.raises(UserError, match="integers"):
    check_labels(np.array([0.5]), 10)
  with pytest.raises(UserError, match="integers"):  # traced labels: the dtype is still checked (they passed)
    jax.jit(lambda y: ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=5, labels=y, num_classes=10))(
        jnp.array([0.5, 1.0]))
  check_labels(np.array([0, 9]), 10, batch_size=2)
  with pytest.raises(UserError, match=r"Unknown reverse-process variance 'large'; use posterior \(beta~_t, Ho et "
                                      r"al.'s fixedsmall\) or beta \(beta_t, their fixedlarge\)\."):
    ddpm_sample(fn, schedule, rbg_key(0), (2, 2), variance="large")
  np.testing.assert_array_equal(ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=jnp.int32(5)),
                                ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=5))  # a concrete jax int
  with pytest.raises(UserError, match="positive integer known when the sampler is traced"):
    jax.jit(lambda n: ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=n))(5)
  with pytest.raises(UserError, match=r"x_init has shape \(1, 2\) but the samples \(2, 2\); give x_init of the"):
    ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=5, x_init=jnp.zeros((1, 2)))


def test_a_prediction_not_shaped_like_its_input_is_one_sentence_not_a_broadcast_loss():
  """E.g. a learned-variance UNet's 2C output channels, or a model that drops the channel axis."""
  schedule = make_schedule("linear", 50)
  x0 = jnp.zeros((4, 8, 8, 1))
  doubled = lambda x, t, y: jnp.concatenate([x, x], -1)
  message = r"prediction has shape \(4, 8, 8, 2\) but its input x_t \(4, 8, 8, 1\); the diffusion model must"
  with pytest.raises(UserError, match=message):
    diffusion_loss(lambda p, x, t, y, r: doubled(x, t, y), None, schedule, x0, None, rbg_key(0))
  with pytest.raises(UserError, match=message):
    bits_per_dim_bound(doubled, schedule, x0, None, rbg_key(0), stride=10)
  with pytest.raises(UserError, match=message):
    ddim_sample(doubled, schedule, rbg_key(0), (4, 8, 8, 1), num_steps=2)


# --- The variational bound in bits per dimension ---------------------------------------------------


def test_discretized_gaussian_is_a_distribution_over_256_levels():
  levels = jnp.asarray(2 * np.arange(256) / 255 - 1, jnp.float32)
  for mean, log_scale in [(0.1, np.log(0.05)), (-0.95, np.log(0.002)), (0.999, np.log(0.3))]:
    p = jnp.exp(likelihood.discretized_gaussian_log_likelihood(levels, mean, log_scale))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-4)
  # Far in a tail each pixel pays its whole cost, with a gradient: a floor on the bin's mass (1e-12) capped it at
  # 27.6 nats with zero gradient. log(Phi(u) - Phi(l)), u, l = (0.3 -+ 1/255) / 0.01, is -442.62 (scipy log_ndtr).
  logp = lambda mean: likelihood.discretized_gaussian_log_likelihood(jnp.float32(0.0), mean, jnp.log(0.01))
  for mean in (0.3, -0.3):
    np.testing.assert_allclose(logp(mean), -442.62042, rtol=1e-5)
    assert abs(float(jax.grad(logp)(mean))) > 1000


def grid_images(shape, seed):
  return (2 * np.random.default_rng(seed).integers(0, 256, size=shape) / 255 - 1).astype(np.float32)


def test_bits_per_dim_with_an_oracle_is_prior_plus_decoder():
  """A predictor that knows x0 makes every KL term 0 and the decoder mean exactly x0."""
  schedule = make_schedule("linear", 20)
  x0 = grid_images((3, 4, 4, 1), 0)
  oracle = lambda x, t, y: schedules.eps_from_x0(schedule, x, t, jnp.asarray(x0))
  out = bits_per_dim_bound(oracle, schedule, x0, None, rbg_key(0))
  np.testing.assert_allclose(out["diffusion"], 0.0, atol=2e-4)
  sd = math.sqrt(float(schedule.posterior_variance[1]))  # the variance L_0 uses
  bin_mass = math.erf(1 / 255 / sd / math.sqrt(2))  # N(0, sd^2) mass within half a bin (1/255) of its mean
  edge_mass = 0.5 * (1 + math.erf(1 / 255 / sd / math.sqrt(2)))  # the edge bins extend to +-inf
  per_dim = np.where(np.abs(x0) > 0.999, -np.log2(edge_mass), -np.log2(bin_mass)).reshape(3, -1).mean(1)
  np.testing.assert_allclose(out["decoder"], per_dim, rtol=1e-3)
  abar_T = float(np.prod(1 - np.asarray(schedule.betas, np.float64)))
  prior = 0.5 * (-1 - np.log(1 - abar_T) + (1 - abar_T) + abar_T * x0 ** 2) / np.log(2)
  np.testing.assert_allclose(out["prior"], prior.reshape(3, -1).mean(1), rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(out["total"], out["prior"] + out["decoder"] + out["diffusion"], rtol=1e-6)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_bits_per_dim_kl_terms_of_a_predictor_off_by_a_constant_are_their_closed_form(variance):
  """x0 predicted 0.05 too high everywhere (never clipped): each KL term is that of two Gaussians whose means differ
  by coef1_t * 0.05, the posterior's variance against the model's."""
  schedule = make_schedule("cosine", 20)
  x0 = np.clip(grid_images((2, 3, 3, 1), 4), -0.9, 0.9)
  off = lambda x, t, y: schedules.eps_from_x0(schedule, x, t, jnp.asarray(x0) + 0.05)
  got = bits_per_dim_bound(off, schedule, x0, None, rbg_key(0), variance=variance)["diffusion"]
  post = np.asarray(schedule.posterior_variance, np.float64)[1:]
  coef1 = np.asarray(schedule.posterior_mean_coef1, np.float64)[1:]
  model = post if variance == "posterior" else np.asarray(schedule.betas, np.float64)[1:]
  kl = 0.5 * (-1 + np.log(model / post) + post / model + (coef1 * 0.05) ** 2 / model)
  np.testing.assert_allclose(got, np.full(2, kl.sum() / np.log(2)), rtol=1e-4)


def test_a_one_step_process_has_a_bound_and_guides_its_one_step():
  """T = 1: the beta variance has no beta~_1 to take at t = 0 (it indexed past the end), and the guidance interval's
  t / (T - 1) was 0 / 0, so no interval ever guided."""
  one = make_schedule("linear", 1)
  np.testing.assert_allclose(losses.model_log_variance(one, "beta"), np.log(one.betas), rtol=1e-6)
  out = bits_per_dim_bound(lambda x, t, y: jnp.zeros_like(x), one, grid_images((2, 2, 2, 1), 0), None, rbg_key(0),
                           variance="beta")
  assert np.all(np.isfinite(out["total"])) and np.all(out["diffusion"] == 0)  # no KL term with one step
  fn = lambda x, t, y: x * (1.0 + y[:, None])  # the null class (2) predicts differently from the labels
  kw = dict(num_steps=1, labels=np.array([0, 1]), num_classes=2, guidance=3.0)
  interval = ddim_sample(fn, one, rbg_key(0), (2, 2), guidance_interval=(0.0, 0.5), **kw)
  np.testing.assert_array_equal(interval, ddim_sample(fn, one, rbg_key(0), (2, 2), **kw))  # t = 0 is guided
  assert not np.allclose(interval, ddim_sample(fn, one, rbg_key(0), (2, 2), **{**kw, "guidance": 1.0}))


def test_bits_per_dim_on_a_tiny_unet_and_the_strided_estimate():
  config = UNetConfig(image_size=8, channels=1, base_features=8, channel_mults=(1, 2), num_res_blocks=1,
                      attention_resolutions=(4,), num_heads=1, dropout=0.0, norm_groups=4)
  model = UNet(config)
  x0 = grid_images((2, 8, 8, 1), 1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x0, jnp.zeros((2,)), train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.normal(size=s.shape), jnp.float32), shapes)
  schedule = make_schedule("linear", 20)

  @jax.jit
  def bound(params, offset):
    apply_fn = lambda x, t, y: model.apply(params, x, t, y, train=False)
    full = bits_per_dim_bound(apply_fn, schedule, x0, None, rbg_key(5))
    strided = bits_per_dim_bound(apply_fn, schedule, x0, None, rbg_key(5), stride=3, offset=offset)
    return full, strided

  estimates = [bound(params, jnp.int32(o)) for o in range(3)]
  full = estimates[0][0]
  for key in ("total", "prior", "decoder", "diffusion"):
    assert np.all(np.isfinite(full[key])) and np.all(full[key] >= 0), key
  assert np.all(full["total"] > 0)
  np.testing.assert_allclose(full["total"], full["prior"] + full["decoder"] + full["diffusion"], rtol=1e-6)
  # Each timestep's noise depends only on (rng, t): the mean over the 3 offsets is the full sum.
  # T - 1 = 19 terms is not a multiple of 3, so this also checks the padding of the last group.
  mean = {k: np.mean([s[k] for _, s in estimates], axis=0) for k in full}
  for key in ("total", "diffusion"):
    np.testing.assert_allclose(mean[key], full[key], rtol=1e-5)
  np.testing.assert_allclose(estimates[1][1]["decoder"], full["decoder"], rtol=1e-6)
  assert not np.allclose(estimates[1][1]["diffusion"], full["diffusion"])


def test_unet_end_to_end_loss_gradient_and_jitted_guided_sampling():
  """The documented integration: loss and gradient through a class-conditional UNet, and a jitted
  guided DDIM sampler taking parameters and labels as arguments."""
  config = UNetConfig(image_size=4, channels=1, base_features=4, channel_mults=(1,), num_res_blocks=1,
                      attention_resolutions=(4,), num_heads=1, dropout=0.1, norm_groups=2, num_classes=3)
  model = UNet(config)
  x0 = grid_images((4, 4, 4, 1), 2)
  labels = np.array([0, 1, 2, 1])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x0, jnp.zeros((4,)), labels, train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), jnp.float32), shapes)["params"]
  schedule = make_schedule("cosine", 30)

  def train_apply(p, x, t, y, r):
    return model.apply({"params": p}, x, t, y, train=True, rngs={"dropout": r})

  def mean_loss(p, key):
    total, count = diffusion_loss(train_apply, p, schedule, x0, labels, key, prediction="v", cond_drop_prob=0.2,
                                  num_classes=3)
    return total / count

  loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params, rbg_key(0))
  assert np.isfinite(loss) and loss > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.any(grads["class_embed"]["embedding"] != 0)

  @jax.jit
  def sample(p, key, y):
    apply_fn = lambda x, t, y: model.apply({"params": p}, x, t, y, train=False)
    return [ddim_sample(apply_fn, schedule, key, (4, 4, 4, 1), num_steps=5, labels=y, num_classes=3, guidance=w,
                        prediction="v") for w in (0.0, 2.0)] + [
                            ddim_sample(apply_fn, schedule, key, (4, 4, 4, 1), num_steps=5, prediction="v")]

  check_labels(labels, 3, batch_size=4)  # under jit the samplers cannot see the labels: check them first
  unguided, guided, uncond = sample(params, rbg_key(1), labels)
  np.testing.assert_array_equal(unguided, uncond)  # guidance 0 is the unconditional (null-class) model
  assert np.all(np.abs(guided) <= 1) and not np.allclose(guided, uncond)  # x0 clipped to [-1, 1]


def test_an_unconditional_model_refuses_guidance_and_every_sampler_refuses_non_finite_settings():
  config = config_lib.load_config(os.path.join(ROOT, "configs", "ddpm_mnist.py"),
                                  TINY_UNET + ["model.conditional=False"])
  task = make_task(config)
  task.model = STAND_IN
  images = task.sample(None, jax.random.key(1), 2, steps=2)  # the config's guidance 2.0 is moot, not an error
  assert images.shape == (2, 28, 28, 1) and np.all(np.isfinite(images))
  for options in ({"guidance": 2.0}, {"guidance_interval": (0.5, 1.0)}):
    with pytest.raises(UserError, match="not class-conditional, so there is nothing to guide; leave out --guidance"):
      task.check_sample_request(2, **options)
  with pytest.raises(UserError, match="--eta is DDIM's noise scale: use a value >= 0"):
    task.check_sample_request(2, eta=float("nan"))
  conditional = make_task(config_lib.load_config(os.path.join(ROOT, "configs", "ddpm_mnist.py"), TINY_UNET))
  with pytest.raises(UserError, match="--guidance is nan; use a finite scale"):
    conditional.check_sample_request(2, guidance=float("nan"))
  # And the samplers themselves, which people call from their own code: NaN would make every pixel NaN.
  kw = dict(num_steps=2, labels=np.array([0, 1]), num_classes=2)
  for sampler, options, message in [(ddim_sample, {"guidance": float("nan")}, "guidance is nan; use a finite number."),
                                    (ddpm_sample, {"guidance": float("inf")}, "guidance is inf; use a finite number."),
                                    (ddim_sample, {"eta": float("nan")}, "eta is nan; use a finite number of at "),
                                    (ddim_sample, {"eta": -0.5}, "eta is -0.5; use a finite number of at least 0.")]:
    with pytest.raises(UserError, match=message):
      sampler(shrink_by_half, make_schedule("linear", 4), rbg_key(0), (2, 2), **kw, **options)


def test_eval_records_the_sampling_settings_each_sampler_uses():
  path = os.path.join(ROOT, "configs", "ddpm_mnist.py")
  ddim = make_task(config_lib.load_config(path, TINY_UNET))
  assert sampling_record(ddim, {"steps": 3}) == {"sampler": "ddim", "steps": 3, "eta": 0.0, "guidance": 2.0,
                                                 "guidance_interval": (0.5, 1.0)}
  ddpm = make_task(config_lib.load_config(path, TINY_UNET + ["sample.sampler=ddpm", "sample.variance=beta"]))
  assert sampling_record(ddpm, {"guidance": 1.0}) == {"sampler": "ddpm", "steps": 5, "guidance": 1.0,
                                                      "guidance_interval": (0.5, 1.0), "variance": "beta"}


def test_a_model_trained_without_label_dropout_refuses_guidance_and_sample_steps_0_is_refused():
  """With cond_drop_prob 0 the null class's embedding gets no gradient: guidance (the config's default 2) mixed in
  an untrained, random unconditional model, silently."""
  path = os.path.join(ROOT, "configs", "ddpm_mnist.py")
  with pytest.raises(UserError, match="sample.guidance is 2, but with diffusion.cond_drop_prob 0 the unconditional "
                                      ".* never trained; set --config.diffusion.cond_drop_prob=0.1"):
    make_task(config_lib.load_config(path, TINY_UNET + ["diffusion.cond_drop_prob=0.0"]))
  task = make_task(config_lib.load_config(path, TINY_UNET + ["diffusion.cond_drop_prob=0.0", "sample.guidance=1.0"]))
  params = None  # refused before the sampler runs
  for labels, guidance in ((np.array([3, 4]), 2.0), (None, None)):  # guided, or the unconditional model itself
    with pytest.raises(UserError, match="trained with diffusion.cond_drop_prob 0, so its unconditional"):
      task.sample(params, jax.random.key(1), 2, labels, guidance=guidance)
  with pytest.raises(UserError, match="use --steps between 1 and 20"):  # steps=0 was the config's steps
    task.sample(params, jax.random.key(1), 2, np.array([3, 4]), steps=0)


def test_the_configured_reverse_variance_drives_the_ddpm_sampler_and_the_bound():
  """sample.variance (Ho et al.'s fixedsmall/fixedlarge) was a library argument the config could not set."""
  path = os.path.join(ROOT, "configs", "ddpm_mnist.py")
  with pytest.raises(UserError, match=r"Unknown sample.variance 'large'; use posterior \(beta~_t, Ho et al.'s "
                                      r"fixedsmall\) or beta \(beta_t, their fixedlarge\)\."):
    make_task(config_lib.load_config(path, TINY_UNET + ["sample.variance=large"]))
  want, tasks = {}, {}
  for variance in ("posterior", "beta"):
    tasks[variance] = make_task(config_lib.load_config(path, TINY_UNET + [
        "diffusion.num_steps=10", "sample.sampler=ddpm", f"sample.variance={variance}", "eval.bound_images=2",
        "eval.bound_stride=5"]))
    tasks[variance].model = STAND_IN
    want[variance] = ddpm_sample(shrink_by_half, tasks[variance].schedule, rbg_key(1), (2, 28, 28, 1), num_steps=10,
                                 labels=jnp.array([3, 4]), num_classes=10, guidance=1.0, variance=variance)
  assert not np.allclose(want["posterior"], want["beta"])
  bounds = {}
  for variance, task in tasks.items():
    got = task.sample(None, rbg_key(1), 2, np.array([3, 4]), steps=10, guidance=1.0)
    np.testing.assert_allclose(got, want[variance], rtol=1e-5, atol=1e-5)
    bounds[variance] = task.heldout_metrics(None)
    images, labels = task.dataset.images("test")[:2], jnp.asarray(task.dataset.labels("test")[:2])
    direct = bits_per_dim_bound(shrink_by_half, task.schedule, images, labels, jax.random.PRNGKey(0), variance=variance,
                                stride=5)["total"]
    assert bounds[variance]["bound_variance"] == variance
    np.testing.assert_allclose(bounds[variance]["bits_per_dim"], float(np.mean(direct)), rtol=1e-5)
  assert bounds["posterior"]["bits_per_dim"] != bounds["beta"]["bits_per_dim"]
  # The config's DDIM eta (0.0 by default) was not handed to the DDPM sampler, which takes none; an explicit one is
  # refused.
  with pytest.raises(UserError, match="--eta is DDIM's noise scale: use a value >= 0 with sample.sampler ddim"):
    tasks["beta"].sample(None, rbg_key(1), 2, np.array([3, 4]), steps=3, eta=0.5)


def test_each_held_out_batch_draws_its_own_timesteps_and_noise():
  """Every batch drew the same timesteps and noise from one fixed key: val_loss averaged over batch_size draws,
  not eval_batches x batch_size."""
  task = make_task(config_lib.load_config(os.path.join(ROOT, "configs", "ddpm_mnist.py"),
                                          TINY_UNET + ["eval_batches=2", "batch_size=4"]))
  seen = []
  task.model = type("Record", (), {"apply": lambda self, p, x_t, t, labels, **kw: seen.append(t) or x_t})()
  batches = task.eval_batches()["validation"]
  assert [b["eval_index"].tolist() for b in batches] == [[0] * 4, [1] * 4]
  for batch in batches:
    task.loss(None, batch, None, False)
  assert seen[0].tolist() != seen[1].tolist()
  task.loss(None, batches[0], None, False)
  assert seen[2].tolist() == seen[0].tolist()  # fixed: the same batch draws the same again


def test_timesteps_samplers_settings_and_short_schedules_are_checked():
  schedule = make_schedule("linear", 10)
  x0, noise = jnp.ones((2, 3)), jnp.zeros((2, 3))
  for t in (10, -1):  # the papers' 1-based t = T was clamped to T - 1, and -1 wrapped to it
    with pytest.raises(UserError, match=rf"Timestep {t} is outside the schedule's 0..9; count steps from 0"):
      schedules.q_sample(schedule, x0, jnp.array([0, t]), noise)
  with pytest.raises(UserError, match="Timesteps must be integers"):
    schedules.q_sample(schedule, x0, jnp.array([0.5, 1.0]), noise)
  np.testing.assert_array_equal(schedules.q_sample(schedule, x0, 4, noise),  # a Python int was an AttributeError
                                schedules.q_sample(schedule, x0, jnp.array([4, 4]), noise))
  fn = exact_eps(schedule)
  # A [B] guidance or eta broadcast against the last (channel) axis, silently when B equals it.
  with pytest.raises(UserError, match=r"guidance must be one number .*not an array of shape \(2,\); for one value per "
                                      r"sample, jax.vmap the sampler"):
    ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=2, labels=np.array([0, 1]), num_classes=3,
                guidance=jnp.array([1.0, 2.0]))
  with pytest.raises(UserError, match=r"eta must be one number"):
    ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=2, eta=jnp.array([0.0, 1.0]))
  for interval in ((0.1, 0.5, 0.9), 0.5):  # too many values to unpack; 'float' object is not iterable
    with pytest.raises(UserError, match="is not two timestep fractions; use guidance_interval=.LO, HI."):
      ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=2, guidance_interval=interval)
  with pytest.raises(UserError, match="Class labels were given with num_classes=0 .*pass its num_classes"):
    ddim_sample(fn, schedule, rbg_key(0), (2, 2), num_steps=2, labels=np.array([0, 1]))
  one = make_schedule("linear", 1)  # linspace's one point was the first beta, 0.1: x_T mostly signal
  np.testing.assert_allclose([one.betas[0], one.alphas_cumprod[0]], [0.999, 0.001], rtol=1e-6)
