"""How much memory `xla` and `chunked` attention need as the sequence grows, and whether they run.

  python -m benchmarks.attention_memory [--lengths 1024,2048,...] [--out benchmarks/results/attention_memory_cpu.json]
  python -m benchmarks.attention_memory --run [--lengths 4096,8192,16384] [--memory-limit-gib G]

One attention layer of the benchmark grid's width: batch 1, 16 heads x head_dim 128, fp32,
causal. `xla` holds the [S, S] scores per head (and the probabilities again for the
backward), so it grows as S^2; `chunked` holds a tile per head and grows as S.

Without `--run` nothing is executed: each (implementation, length, mode) is lowered and
compiled for abstract inputs (`jax.ShapeDtypeStruct`) and XLA's `memory_analysis()` gives
its buffers (temp, argument and output bytes). A length "fits" when they stay under this
machine's physical memory (/proc/meminfo MemTotal).

With `--run`, forward + backward runs once per implementation and length, each in its own
process whose address space is capped (`RLIMIT_AS`) at `--memory-limit-gib`, by default
the physical memory: a program that needs more fails there with an allocation error
instead of swapping or waking the kernel's OOM killer. A row records `ran` (with compile
and run seconds and the child's peak resident memory) or `out_of_memory` (with the error).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib

from aigc_jax.errors import UserError
from aigc_jax.nn import attention as attention_lib
from benchmarks.attention import parse_lengths
from benchmarks.peak import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
RUN_LENGTHS = (4096, 8192, 16384)
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "bad_alloc", "Cannot allocate memory", "MemoryError", "Out of memory")


def attention_program(implementation, seq_len, mode, batch=1, heads=16, head_dim=128, dtype=jnp.float32):
  """(function, argument specs) of causal attention forward, or forward + backward."""
  spec = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype)

  def attend(q, k, v):
    return attention_lib.dot_product_attention(q, k, v, causal=True, implementation=implementation)

  if mode == "fwd":
    return attend, (spec,) * 3

  def fwd_bwd(q, k, v, d_out):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(d_out)
  return fwd_bwd, (spec,) * 4


def footprint(implementation, seq_len, mode, **shape):
  """XLA's memory analysis of one compiled call: dict of temp/argument/output/total bytes."""
  fn, specs = attention_program(implementation, seq_len, mode, **shape)
  m = jax.jit(fn).lower(*specs).compile().memory_analysis()
  sizes = dict(temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes, output=m.output_size_in_bytes)
  return dict(sizes, total=sum(sizes.values()))


def run_once(implementation, seq_len, mode, **shape) -> dict:
  """Compiles and runs one program on random inputs in this process: seconds, peak memory, finiteness."""
  fn, specs = attention_program(implementation, seq_len, mode, **shape)
  keys = jax.random.split(jax.random.PRNGKey(0), len(specs))
  args = [jax.random.normal(key, spec.shape, spec.dtype) for key, spec in zip(keys, specs)]
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  outputs = jax.block_until_ready(compiled(*args))
  run_s = time.perf_counter() - start
  finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(outputs))
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
  with open("/proc/self/status") as f:
    peak_virtual = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmPeak:"))
  return dict(compile_s=compile_s, run_s=run_s, peak_rss_bytes=peak_rss, peak_virtual_bytes=peak_virtual,
              finite=finite)


def run_capped(implementation, seq_len, mode, limit_bytes: int, timeout_s: float = 3600, **shape) -> dict:
  """`run_once` in a child process whose address space is capped at `limit_bytes`.

  Returns {"status": "ran", ...run_once's figures} or {"status": "out_of_memory", "error": ...};
  any other failure raises, so a broken program is never reported as out of memory.
  """
  request = json.dumps(dict(implementation=implementation, seq_len=seq_len, mode=mode, limit_bytes=limit_bytes,
                            **shape))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.attention_memory", "--child", request], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout_s)
  if proc.returncode == 0:
    return dict(status="ran", **json.loads(proc.stdout.strip().splitlines()[-1]))
  reason = next((line.strip() for line in reversed(proc.stderr.splitlines())
                 if any(marker in line for marker in OUT_OF_MEMORY)), None)
  if reason is None:
    raise RuntimeError(f"{implementation} at length {seq_len} failed (exit {proc.returncode}) for a reason other "
                       f"than memory:\n{proc.stderr[-3000:]}")
  return dict(status="out_of_memory", error=reason[:300])


def physical_memory() -> int:
  with open("/proc/meminfo") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def metadata(method: str) -> dict:
  return dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind, cpu=cpu_model(),
              physical_memory_bytes=physical_memory(), shape="batch 1, heads 16, head_dim 128, float32, causal",
              method=method,
              versions=dict(jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version()))


def analyse(lengths) -> tuple[dict, list]:
  ram = physical_memory()
  print(f"backend {jax.default_backend()}; physical memory {ram / 2 ** 30:.1f} GiB; batch 1, 16 heads x 128, fp32, "
        f"causal")
  print(f"{'implementation':>14s} {'mode':>7s} {'seq_len':>8s} {'temp GiB':>9s} {'total GiB':>9s} {'fits':>5s}")
  rows = []
  for mode in ("fwd", "fwd_bwd"):
    for implementation in ("xla", "chunked"):
      for seq_len in lengths:
        sizes = footprint(implementation, seq_len, mode)
        row = dict(implementation=implementation, mode=mode, seq_len=seq_len, **{f"{k}_bytes": v
                                                                               for k, v in sizes.items()},
                   fits_in_ram=sizes["total"] <= ram)
        rows.append(row)
        print(f"{implementation:>14s} {mode:>7s} {seq_len:8d} {sizes['temp'] / 2 ** 30:9.3f} "
              f"{sizes['total'] / 2 ** 30:9.3f} {'yes' if row['fits_in_ram'] else 'NO':>5s}", flush=True)
  return metadata("jax.jit(f).lower(ShapeDtypeStruct...).compile().memory_analysis(); nothing executed"), rows


def run_all(lengths, limit_bytes: int) -> tuple[dict, list]:
  print(f"backend {jax.default_backend()}; forward + backward, batch 1, 16 heads x 128, fp32, causal; each run in a "
        f"process capped at {limit_bytes / 2 ** 30:.1f} GiB of address space")
  print(f"{'implementation':>14s} {'seq_len':>8s} {'needs GiB':>9s} {'status':>13s} {'run s':>7s} "
        f"{'peak RSS GiB':>12s}")
  rows = []
  for seq_len in lengths:
    for implementation in ("xla", "chunked"):
      needs = footprint(implementation, seq_len, "fwd_bwd")["total"]
      result = run_capped(implementation, seq_len, "fwd_bwd", limit_bytes)
      rows.append(dict(implementation=implementation, mode="fwd_bwd", seq_len=seq_len, analysed_total_bytes=needs,
                       **result))
      ran = result["status"] == "ran"
      print(f"{implementation:>14s} {seq_len:8d} {needs / 2 ** 30:9.2f} {result['status']:>13s} "
            f"{result['run_s'] if ran else float('nan'):7.1f} "
            f"{result['peak_rss_bytes'] / 2 ** 30 if ran else float('nan'):12.2f}", flush=True)
      if not ran:
        print(f"{'':>14s} {result['error']}")
  meta = metadata("each (implementation, length) compiled and run once on random normal inputs in a child process "
                  "that sets RLIMIT_AS to the memory limit first; run_s excludes compilation; peak RSS is the "
                  "child's ru_maxrss, peak virtual its VmPeak")
  return dict(meta, memory_limit_bytes=limit_bytes), rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default=None, help=f"comma-separated; default {','.join(map(str, LENGTHS))}, "
                      f"with --run {','.join(map(str, RUN_LENGTHS))}")
  parser.add_argument("--run", action="store_true", help="run forward + backward in memory-capped child processes")
  parser.add_argument("--memory-limit-gib", type=float, default=None,
                      help="with --run: the address-space cap per run; default the physical memory")
  parser.add_argument("--out", default=None, help="default benchmarks/results/attention_memory[_run]_cpu.json")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run_capped's child: a JSON request
  args = parser.parse_args()
  if args.child:
    request = json.loads(args.child)
    limit = request.pop("limit_bytes")
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # before the program allocates anything
    print(json.dumps(run_once(request.pop("implementation"), request.pop("seq_len"), request.pop("mode"), **request)))
    return
  try:
    lengths = parse_lengths(args.lengths) if args.lengths else RUN_LENGTHS if args.run else LENGTHS
  except UserError as e:
    parser.error(str(e))
  if args.run:
    limit = int(args.memory_limit_gib * 2 ** 30) if args.memory_limit_gib else physical_memory()
    meta, rows = run_all(lengths, limit)
  else:
    meta, rows = analyse(lengths)
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"attention_memory{'_run' if args.run else ''}_{jax.default_backend()}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
