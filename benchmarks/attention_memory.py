"""How much memory `xla` and `chunked` attention need as the sequence grows, without running either.

  python -m benchmarks.attention_memory [--lengths 1024,2048,...] [--out benchmarks/results/attention_memory_cpu.json]

Each (implementation, length, mode) is lowered and compiled for abstract inputs
(`jax.ShapeDtypeStruct`, nothing allocated) and XLA's `memory_analysis()` gives its
buffers: temp (scratch), argument and output bytes. One attention layer of the
benchmark grid's width: batch 1, 16 heads x head_dim 128, fp32, causal. `xla` holds the
[S, S] scores per head (and the probabilities again for the backward), so it grows as
S^2; `chunked` holds a tile per head and grows as S. A length "fits" when temp +
arguments + outputs stay under this machine's physical memory (/proc/meminfo MemTotal);
nothing is run, so the machine's memory is never actually exhausted.
"""

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import jaxlib

from aigc_jax.nn import attention as attention_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def footprint(implementation, seq_len, mode, batch=1, heads=16, head_dim=128, dtype=jnp.float32):
  """XLA's memory analysis of one compiled call: dict of temp/argument/output/total bytes."""
  spec = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype)

  def attend(q, k, v):
    return attention_lib.dot_product_attention(q, k, v, causal=True, implementation=implementation)

  if mode == "fwd":
    fn, args = attend, (spec,) * 3
  else:
    def fn(q, k, v, d_out):
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(d_out)
    args = (spec,) * 4
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  sizes = dict(temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes, output=m.output_size_in_bytes)
  return dict(sizes, total=sum(sizes.values()))


def physical_memory() -> int:
  with open("/proc/meminfo") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "attention_memory_cpu.json"))
  args = parser.parse_args()
  ram = physical_memory()
  print(f"backend {jax.default_backend()}; physical memory {ram / 2 ** 30:.1f} GiB; batch 1, 16 heads x 128, fp32, "
        f"causal")
  print(f"{'implementation':>14s} {'mode':>7s} {'seq_len':>8s} {'temp GiB':>9s} {'total GiB':>9s} {'fits':>5s}")
  rows = []
  for mode in ("fwd", "fwd_bwd"):
    for implementation in ("xla", "chunked"):
      for seq_len in map(int, args.lengths.split(",")):
        sizes = footprint(implementation, seq_len, mode)
        row = dict(implementation=implementation, mode=mode, seq_len=seq_len, **{f"{k}_bytes": v
                                                                               for k, v in sizes.items()},
                   fits_in_ram=sizes["total"] <= ram)
        rows.append(row)
        print(f"{implementation:>14s} {mode:>7s} {seq_len:8d} {sizes['temp'] / 2 ** 30:9.3f} "
              f"{sizes['total'] / 2 ** 30:9.3f} {'yes' if row['fits_in_ram'] else 'NO':>5s}", flush=True)
  meta = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind, physical_memory_bytes=ram,
              shape="batch 1, heads 16, head_dim 128, float32, causal",
              method="jax.jit(f).lower(ShapeDtypeStruct...).compile().memory_analysis(); nothing executed",
              versions=dict(jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version()))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
