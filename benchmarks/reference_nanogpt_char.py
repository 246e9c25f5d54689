"""The PyTorch reference for `configs/gpt_shakespeare_char_cpu.py`: nanoGPT's CPU recipe, rewritten.

  pip install torch numpy   # in a separate environment: torch is not a dependency of aigc_jax
  python benchmarks/reference_nanogpt_char.py --seeds 1337 1 2 3 --out benchmarks/results/gpt_cpu_reference.json
  aigc-jax bench train --quick --shapes cpu --torch-python PATH/TO/venv/bin/python   # its step speed beside ours

nanoGPT's `model.py` and `train.py` as its README runs them on a CPU (`--device=cpu --compile=False
--eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`, the rest from `config/train_shakespeare_char.py`): no biases,
LayerNorm eps 1e-5, exact GELU, tied embeddings, normal(0.02) init with the residual projections
scaled by 1/sqrt(2 * layers), AdamW (0.9, 0.99) with weight decay 0.1 on matrices, warm-up 100
then cosine 1e-3 -> 1e-4, clip 1.0, random windows from the first 90% of the characters.

It answers two questions. How fast is the PyTorch step: `--serve` is the step timer that
`aigc-jax bench train --torch-python` runs beside our JAX steps. And what validation loss
this recipe reaches, measured precisely (the default mode). nanoGPT
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
import sys
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

  def __init__(self, width, heads):
    super().__init__()
    self.width, self.heads = width, heads
    self.c_attn = nn.Linear(width, 3 * width, bias=False)
    self.c_proj = nn.Linear(width, width, bias=False)

  def forward(self, x):  # [B, T, C]
    b, t, c = x.shape
    q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
               for z in self.c_attn(x).split(self.width, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
    return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):

  def __init__(self, width, heads):
    super().__init__()
    self.ln_1, self.attn, self.ln_2 = LayerNorm(width), Attention(width, heads), LayerNorm(width)
    self.c_fc = nn.Linear(width, 4 * width, bias=False)
    self.c_proj = nn.Linear(4 * width, width, bias=False)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):

  def __init__(self, vocab_size, layers=LAYERS, heads=HEADS, width=WIDTH, context=CONTEXT):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab_size, width), nn.Embedding(context, width)
    self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
    self.ln_f = LayerNorm(width)
    self.lm_head = nn.Linear(width, vocab_size, bias=False)
    self.wte.weight = self.lm_head.weight  # tied
    for name, p in self.named_parameters():
      if p.dim() >= 2:
        std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
        nn.init.normal_(p, 0.0, std)

  def forward(self, idx, targets):  # [B, T], [B, T] -> mean cross-entropy
    x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.lm_head(self.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def make_optimizer(model):
  params = list(model.parameters())
  return torch.optim.AdamW(
      [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.99))


def train_step(model, optimizer, step, x, y):
  """One of nanoGPT's training iterations (the batch fetch aside): lr, forward, backward, clip, AdamW."""
  for group in optimizer.param_groups:
    group["lr"] = learning_rate(step)
  loss = model(x, y)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  optimizer.step()
  optimizer.zero_grad(set_to_none=True)
  return loss


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
  optimizer = make_optimizer(model)
  x, y = get_batch(train_data)
  start = time.perf_counter()
  for step in range(STEPS):
    train_step(model, optimizer, step, x, y)
    x, y = get_batch(train_data)  # nanoGPT fetches it before the backward; no dropout, so the same batches
  train_seconds = time.perf_counter() - start
  model.eval()
  fixed = torch.Generator().manual_seed(0)  # the same 400 validation batches for every seed
  draws = [mean_loss(model, val_data, 20) for _ in range(30)]
  return {"seed": seed, "val_loss_400_batches": mean_loss(model, val_data, 400, fixed),
          "train_loss_400_batches": mean_loss(model, train_data, 400, torch.Generator().manual_seed(0)),
          "val_loss_20_batches_mean": float(np.mean(draws)), "val_loss_20_batches_sd": float(np.std(draws)),
          "val_loss_20_batches_min": float(np.min(draws)), "ms_per_step": 1000 * train_seconds / STEPS}


def serve(batches_path, layers, heads, width, vocab_size):
  """Step timer for `aigc-jax bench train --torch-python`, which reads the PyTorch step's speed through it.

  Loads token batches (`inputs` and `targets`, [n, B, T] int arrays) from an .npz file, builds
  the model at that shape, prints one JSON line (versions, threads), then for each line `N`
  on stdin runs N training steps, cycling through the batches, and prints one JSON line
  `{"ms_per_step": ...}`. The step is `train_step`, nanoGPT's iteration with the batches
  made in advance, as the JAX steps it is timed against have theirs.
  """
  with np.load(batches_path) as f:
    inputs, targets = torch.from_numpy(f["inputs"].astype(np.int64)), torch.from_numpy(f["targets"].astype(np.int64))
  torch.manual_seed(0)
  model = GPT(vocab_size, layers, heads, width, inputs.shape[-1])
  optimizer = make_optimizer(model)
  print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "params": sum(p.numel() for p in model.parameters())}), flush=True)
  step = 0
  for line in sys.stdin:
    start = time.perf_counter()
    n = int(line)
    for _ in range(n):
      loss = train_step(model, optimizer, step, inputs[step % len(inputs)], targets[step % len(inputs)])
      step += 1
    loss.item()  # eager CPU ops have finished by now; this only reads the value
    print(json.dumps({"ms_per_step": 1000 * (time.perf_counter() - start) / n}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
  parser.add_argument("--data", default=DATA)
  parser.add_argument("--out", default=None)
  parser.add_argument("--serve", metavar="BATCHES.npz", help="time steps on stdin's request (see `serve`)")
  parser.add_argument("--shape", type=int, nargs=4, metavar=("LAYERS", "HEADS", "WIDTH", "VOCAB"),
                      help="with --serve: the model's shape (the context is the batches' length)")
  args = parser.parse_args()
  if args.serve:
    serve(args.serve, *args.shape)
    return
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
