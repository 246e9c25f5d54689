"""Character GPT, the GPU recipe (nanoGPT's `train_shakespeare_char`): 10.7M parameters.

  aigc-jax train --config configs/gpt_shakespeare_char.py --workdir workdirs/gpt_gpu \
      --config.data.source=tfds:tiny_shakespeare

The PyTorch reference reaches validation loss 1.47 in about 3 minutes on one A100.
This recipe has not been run on a GPU here yet (see README.md); on the 2-core CPU it
runs but at about a step per second.
"""

import ml_collections

from aigc_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config(__file__, "gpt_shakespeare_char_cpu.py")
  config.num_train_steps = 5000  # optimizer updates
  config.batch_size = 64  # sequences per update, split over all devices
  config.eval_every_steps = 250  # validation loss and a sample
  config.eval_batches = 200  # fixed batches per split for each evaluation
  config.checkpoint_every_steps = 500  # Orbax saves
  config.data.seq_len = 256  # context length
  config.model.num_layers = 6  # Transformer blocks
  config.model.num_heads = 6  # attention heads
  config.model.emb_dim = 384  # residual stream width
  config.model.dropout_rate = 0.2  # embeddings, attention output and MLP output
  config.model.dtype = "bfloat16"  # bf16 compute, fp32 parameters
  config.model.position_encoding = "learned"  # nanoGPT's table, to compare with its 1.47; rope is untried here
  config.optim.learning_rate = 1e-3  # peak, after warm-up
  config.optim.min_learning_rate = 1e-4  # end of the cosine decay
  config.optim.warmup_steps = 100  # linear warm-up from 0
  return config
