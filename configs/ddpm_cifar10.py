"""DDPM on CIFAR-10 with the 35.7M-parameter UNet of Ho et al. 2020 (unconditional, dropout 0.1, EMA 0.9999).

  aigc-jax train --config configs/ddpm_cifar10.py --workdir workdirs/ddpm_cifar10
  aigc-jax sample --workdir workdirs/ddpm_cifar10 --steps 100

Data: TFDS `cifar10` (prepared once with network, then read without TensorFlow). This is
the one image config whose shape (32x32x3) the embedded offline digits cannot stand in for.
Training images are mirrored left to right at random, and the DDPM sampler and the bound use
the beta_t reverse variance ("fixedlarge"), both as Ho et al.'s CIFAR-10 run.
Expected result and time: not measured here; it is an accelerator recipe (Ho et al. trained
800k steps at batch 128 on a TPU v3-8, FID 3.17). `aigc-jax bench denoise` measures its UNet.
"""

import ml_collections

from aigc_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config(__file__, "ddpm_mnist.py")
  config.num_train_steps = 800_000  # optimizer updates (Ho et al.)
  config.batch_size = 128  # images per update, split over all devices
  config.log_every_steps = 500  # training metrics to metrics.jsonl / TensorBoard
  config.eval_every_steps = 20_000  # held-out loss (EMA parameters) and a DDIM sample grid
  config.checkpoint_every_steps = 10_000  # Orbax saves; training resumes from the latest
  config.ema_decay = 0.9999  # EMA of the parameters; the warm-up min(decay, (1+step)/(10+step)) reaches it at 89,990
  config.data.source = "tfds:cifar10"  # 32x32 RGB, train/test splits
  config.data.image_size = 32  # height = width
  config.data.channels = 3  # RGB
  config.data.random_flip = True  # training images mirrored left to right at random, as Ho et al.
  config.model.conditional = False  # Ho et al.'s model is unconditional
  config.model.base_features = 128  # UNet width at 32x32
  config.model.channel_mults = (1, 2, 2, 2)  # 32, 16, 8, 4
  config.model.num_res_blocks = 2  # per level going down
  config.model.attention_resolutions = (16,)  # self-attention at 16x16
  config.model.num_heads = 1  # one head, as the paper
  config.model.dropout = 0.1  # Ho et al.'s CIFAR-10 value
  config.model.norm_groups = 32  # GroupNorm groups
  config.model.dtype = "bfloat16"  # compute dtype on accelerators
  config.optim.learning_rate = 2e-4  # Ho et al.
  config.optim.min_learning_rate = 2e-4  # constant after warm-up
  config.optim.warmup_steps = 5000  # Ho et al.
  config.optim.grad_clip = 1.0  # Ho et al.
  config.sample.steps = 100  # DDIM steps for the evaluation grids
  config.sample.num_samples = 64  # images per grid
  config.sample.guidance = 1.0  # unconditional: no guidance
  config.sample.variance = "beta"  # Ho et al.'s CIFAR-10 reverse variance ("fixedlarge"), for ddpm and the bound
  config.eval.num_samples = 10_000  # samples `aigc-jax eval` would compare (needs an MNIST-like classifier)
  return config
