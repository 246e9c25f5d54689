"""The PyTorch reference for `configs/gpt_shakespeare_char_cpu.py`: nanoGPT's CPU recipe, rewritten.

  pip install torch numpy   # in a separate environment: torch is not a dependency of aigc_jax
  python benchmarks/reference_nanogpt_char.py --seeds 1337 1 2 3 --out benchmarks/results/gpt_cpu_reference.json

nanoGPT's `model.py` and `train.py` as its README runs them on a CPU (`--device=cpu --compile=False
--eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`, the rest from `config/train_shakespeare_char.py`): no biases,
LayerNorm eps 1e-5, exact GELU, tied embeddings, normal(0.02) init with the residual projections
scaled by 1/sqrt(2 * layers), AdamW (0.9, 0.99) with weight decay 0.1 on matrices, warm-up 100
then cosine 1e-3 -> 1e-4, clip 1.0, random windows from the first 90% of the characters.

It answers one question: what validation loss this recipe reaches, measured precisely. nanoGPT
prints `estimate_loss()` with `--eval_iters=20`: 20 random batches of 12 x 64, a noisy figure.
This script reports the loss after step 2,000 on 400 fixed batches (as precise as our own
`eval_batches=50` and more), and the mean, spread and minimum of 30 draws of nanoGPT's 20-batch
estimate, so the README's single figure can be placed in its distribution.
"""

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
BATCH, CONTEXT, LAYERS, HEADS, WIDTH = 12, 64, 4, 4, 128
STEPS, WARMUP, LR, MIN_LR = 2000, 100, 1e-3, 1e-4


class LayerNorm(nn.Module):  # no bias, as nanoGPT's `bias=False`

  def __init__(self, width):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(width))

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Attention(nn.Module):

  def __init__(self):
    super().__init__()
    self.c_attn = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
    self.c_proj = nn.Linear(WIDTH, WIDTH, bias=False)

  def forward(self, x):  # [B, T, C]
    b, t, c = x.shape
    q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.c_attn(x).split(WIDTH, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
    return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):

  def __init__(self):
    super().__init__()
    self.ln_1, self.attn, self.ln_2 = LayerNorm(WIDTH), Attention(), LayerNorm(WIDTH)
    self.c_fc = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
    self.c_proj = nn.Linear(4 * WIDTH, WIDTH, bias=False)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):

  def __init__(self, vocab_size):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab_size, WIDTH), nn.Embedding(CONTEXT, WIDTH)
    self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
    self.ln_f = LayerNorm(WIDTH)
    self.lm_head = nn.Linear(WIDTH, vocab_size, bias=False)
    self.wte.weight = self.lm_head.weight  # tied
    for name, p in self.named_parameters():
      if p.dim() >= 2:
        std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith("c_proj.weight") else 0.02
        nn.init.normal_(p, 0.0, std)

  def forward(self, idx, targets):  # [B, T], [B, T] -> mean cross-entropy
    x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.lm_head(self.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def learning_rate(step):  # nanoGPT's get_lr
  if step < WARMUP:
    return LR * (step + 1) / (WARMUP + 1)
  ratio = (step - WARMUP) / (STEPS - WARMUP)
  return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def get_batch(data, generator=None):
  ix = torch.randint(len(data) - CONTEXT, (BATCH,), generator=generator)
  x = torch.stack([torch.from_numpy(data[i:i + CONTEXT]) for i in ix])
  y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + CONTEXT]) for i in ix])
  return x, y


@torch.no_grad()
def mean_loss(model, data, batches, generator=None):
  return float(np.mean([model(*get_batch(data, generator)).item() for _ in range(batches)]))


def run(seed, train_data, val_data, vocab_size):
  torch.manual_seed(seed)
  model = GPT(vocab_size)
  params = list(model.parameters())
  optimizer = torch.optim.AdamW(
      [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.99))
  x, y = get_batch(train_data)
  start = time.perf_counter()
  for step in range(STEPS):
    for group in optimizer.param_groups:
      group["lr"] = learning_rate(step)
    loss = model(x, y)
    x, y = get_batch(train_data)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  train_seconds = time.perf_counter() - start
  model.eval()
  fixed = torch.Generator().manual_seed(0)  # the same 400 validation batches for every seed
  draws = [mean_loss(model, val_data, 20) for _ in range(30)]
  return {"seed": seed, "val_loss_400_batches": mean_loss(model, val_data, 400, fixed),
          "train_loss_400_batches": mean_loss(model, train_data, 400, torch.Generator().manual_seed(0)),
          "val_loss_20_batches_mean": float(np.mean(draws)), "val_loss_20_batches_sd": float(np.std(draws)),
          "val_loss_20_batches_min": float(np.min(draws)), "ms_per_step": 1000 * train_seconds / STEPS}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
  parser.add_argument("--data", default=DATA)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  text = open(args.data, encoding="utf-8").read()
  stoi = {c: i for i, c in enumerate(sorted(set(text)))}
  data = np.array([stoi[c] for c in text], dtype=np.int64)
  n = int(0.9 * len(data))
  rows = []
  for seed in args.seeds:
    rows.append(run(seed, data[:n], data[n:], len(stoi)))
    print(json.dumps(rows[-1]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "runs": rows}, f, indent=2)


if __name__ == "__main__":
  main()
