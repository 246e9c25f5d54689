"""Character LSTM baseline (char-rnn): 2 layers of 256 units, on the GPT's data and spine.

  aigc-jax train --config configs/lstm_shakespeare_char.py --workdir workdirs/lstm \
      --config.data.source=text_file:../shared/data/tinyshakespeare/input.txt

Expected result and time: see README.md (measured run on the 2-core CPU).
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
