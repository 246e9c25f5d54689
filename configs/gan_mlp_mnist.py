"""The small MLP GAN (generator 100-256-512-784, discriminator 784-512-256-1), non-saturating loss.

Main job (embedded offline digits):
  aigc-jax train --config configs/gan_mlp_mnist.py --workdir workdirs/gan_mlp

On the offline MNIST (images 0-8,999 train, 9,000-9,999 held out):
  aigc-jax train --config configs/gan_mlp_mnist.py --workdir workdirs/gan_mlp_mnist \
      --config.data.source=mnist_idx:../shared/data/mnist
  aigc-jax eval --workdir workdirs/gan_mlp_mnist

Measured on the 2-core CPU (2026-11-23, shared with other runs): 10,000 steps in 237 s wall;
Fréchet distance of 1,000 samples 132.6 vs 15.5 real-vs-real (our classifier's features,
500 vs 500; see README.md).
"""

import ml_collections

from aigc_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config(__file__, "gan_mnist.py")
  config.num_train_steps = 10000  # generator updates
  config.eval_every_steps = 1000  # a sample grid
  config.checkpoint_every_steps = 1000  # Orbax saves; training resumes from the latest
  config.model.architecture = "mlp"  # the fully connected pair
  return config
