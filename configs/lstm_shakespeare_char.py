"""Character LSTM baseline (char-rnn): 2 layers of 256 units, on the GPT's data and spine.

  aigc-jax train --config configs/lstm_shakespeare_char.py --workdir workdirs/lstm \
      --config.data.source=text_file:../shared/data/tinyshakespeare/input.txt

Measured on the 2-core CPU (2026-11-23, sharing it with a diffusion run): 2,000 steps of
32 x 64 characters in 14 min 50 s wall; step 2000 train_loss 1.4166, val_loss 1.6144
(the CPU GPT recipe, which sees 12 x 64 characters a step, reaches about 1.78 as shipped, 1.90 with
learned positions).
"""

import ml_collections

from aigc_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config(__file__, "gpt_shakespeare_char_cpu.py")
  config.batch_size = 32  # sequences per update
  config.model = ml_collections.ConfigDict()
  config.model.name = "lstm"  # registry name
  config.model.emb_dim = 64  # character embedding width
  config.model.hidden_dim = 256  # LSTM units per layer
  config.model.num_layers = 2  # stacked LSTM layers
  config.model.dropout_rate = 0.0  # between layers
  config.model.dtype = "float32"  # compute dtype
  config.optim.learning_rate = 2e-3  # peak, after warm-up
  config.optim.weight_decay = 0.0  # char-rnn uses none
  config.optim.min_learning_rate = 2e-4  # end of the cosine decay
  return config
