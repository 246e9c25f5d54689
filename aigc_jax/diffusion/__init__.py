"""Gaussian diffusion: noise schedules, the training loss and bits/dim bound, and samplers."""

from aigc_jax.diffusion.losses import bits_per_dim_bound, diffusion_loss
from aigc_jax.diffusion.samplers import (check_guidance_interval, check_labels, ddim_sample, ddpm_sample,
                                         guided_prediction, sampling_timesteps)
from aigc_jax.diffusion.schedules import (NoiseSchedule, make_schedule, q_posterior_mean_variance, q_sample,
                                          schedule_from_betas, to_x0_and_eps, v_target)
