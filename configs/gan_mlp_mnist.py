"""The small MLP GAN (generator 100-256-512-784, discriminator 784-512-256-1), non-saturating loss.

Main job (embedded offline digits):
  aigc-jax train --config configs/gan_mlp_mnist.py --workdir workdirs/gan_mlp

On the offline MNIST (images 0-8,999 train, 9,000-9,999 held out):
  aigc-jax train --config configs/gan_mlp_mnist.py --workdir workdirs/gan_mlp_mnist \
      --config.data.source=mnist_idx:../shared/data/mnist
  aigc-jax eval --workdir workdirs/gan_mlp_mnist

RESULT_PLACEHOLDER
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
