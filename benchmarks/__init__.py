"""Benchmarks: speed is measured here, never asserted in unit tests (see README and STYLE.md).

Each suite module has `add_arguments(parser)` and `run(args) -> int`; `aigc-jax bench NAME`
and `python -m benchmarks.NAME` both call them.
"""

import argparse
import datetime
import hashlib
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy

from aigc_jax.errors import UserError
from aigc_jax.files import write_atomically


def parse_args(module, argv=None) -> argparse.Namespace:
  """The suite's flags from `argv` (default: the command line)."""
  parser = argparse.ArgumentParser(description=(module.__doc__ or "").splitlines()[0])
  module.add_arguments(parser)
  return parser.parse_args(argv)


def environment() -> dict:
  """Where and when a report ran, for readers to compare: `device` (with the CPU and XLA flags), software
  `versions` (CUDA and cuDNN on a GPU: cuDNN is the reference there), the `code` measured and the `date`."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax
  import jaxlib
  import optax

  from benchmarks.peak import cpu_clock_mhz, cpu_model

  device = jax.devices()[0]
  return dict(
      device=dict(backend=jax.default_backend(), kind=device.device_kind, count=jax.device_count(), cpu=cpu_model(),
                  cpu_clock_mhz=cpu_clock_mhz(), cpu_affinity_cores=len(os.sched_getaffinity(0)),
                  platform=platform.platform(), xla_flags=os.environ.get("XLA_FLAGS", "")),
      versions=dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
                    numpy=numpy.__version__, python=platform.python_version(), **_cuda_versions()),
      jax_environment=jax.print_environment_info(return_string=True),  # nvidia-smi's driver and GPUs on a GPU
      code=code_version(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _cuda_versions() -> dict:
  """The CUDA runtime and cuDNN versions jax loaded (e.g. {"cuda_runtime": 12080, "cudnn": 91000}); {} off CUDA."""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    return {} if cuda_versions is None else dict(cuda_runtime=cuda_versions.cuda_runtime_get_version(),
                                                 cudnn=cuda_versions.cudnn_get_version())
  except Exception:  # noqa: BLE001 - a plugin without these functions: the versions are then unknown
    return {}


CODE_PATHS = ("aigc_jax", "benchmarks")  # what a measurement depends on
RESULTS_PATH = "benchmarks/results"  # ... but for the reports themselves, which are not code


def code_version() -> dict:
  """The code being measured: the git commit, and `tree`, which changes exactly when aigc_jax/ or benchmarks/ do
  (their committed files plus a hash of any uncommitted change to them; benchmarks/results/, the reports, is not
  code and counts for neither); None outside a git checkout."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  git = lambda *args: subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30,
                                     check=True).stdout
  paths = (*CODE_PATHS, f":(exclude){RESULTS_PATH}")
  try:
    commit = git("rev-parse", "HEAD").strip()
    files = [line for line in git("ls-tree", "-r", "HEAD", "--", *CODE_PATHS).splitlines()
             if not line.split("\t", 1)[-1].startswith(RESULTS_PATH + "/")]  # "mode type blob\tpath" per file
    diff = git("diff", "HEAD", "--", *paths) + git("ls-files", "--others", "--exclude-standard", "--", *paths)
  except (OSError, subprocess.SubprocessError):
    return dict(commit=None, tree=None, dirty=None)
  tree = hashlib.sha1(("\n".join(files) + "\n" + diff).encode()).hexdigest()[:16]
  return dict(commit=commit, tree=tree, dirty=bool(diff))


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_out(suite: str, backend: str, quick: bool) -> str:
  """Where a suite's report goes without --out: the committed record, benchmarks/results/SUITE_BACKEND[_quick].json."""
  return os.path.join(RESULTS, f"{suite}_{backend}{'_quick' if quick else ''}.json")


def positive_float(text: str) -> float:
  """An argparse type: a finite number > 0; anything else is argparse's one-line usage error."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
  return value


def at_least(minimum: int):
  """An argparse type: an integer >= minimum; anything else is argparse's one-line usage error."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = minimum - 1
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
    return value
  return parse


def time_calls(compiled, args, calls: int = 1) -> float:
  """ms per call over `calls` calls of `compiled(*args)` dispatched back to back, the last one waited for."""
  import jax  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  for _ in range(calls):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) * 1000 / calls


MIN_REP_MS, MAX_CALLS = 10.0, 100  # a timed repetition: back-to-back calls lasting >= 10 ms, at most 100 calls
MAX_REPS = 50  # timed repetitions of one measurement, however short it is


def add_timing_arguments(parser: argparse.ArgumentParser, what: str) -> None:
  """--reps, --min-time and --warmup: how each of `what` (e.g. "implementation and cell") is timed."""
  parser.add_argument("--reps", type=at_least(1), default=5,
                      help=f"timed repetitions per {what}, at least (see --min-time)")
  parser.add_argument("--min-time", type=positive_float, default=0.5,
                      help=f"seconds the timed repetitions of each {what} add up to, at least (more repetitions "
                      f"than --reps where needed, at most {MAX_REPS})")
  parser.add_argument("--warmup", type=at_least(1), default=1,
                      help="untimed calls after the first (whose output is checked against the reference); the "
                      "last one's time sets calls_per_rep")


def warm_up(fn, args, warmup: int, reps: int, min_time: float) -> tuple[int, int]:
  """Makes `warmup` untimed calls of `fn(*args)`, the last one timed to plan the measurement: returns (calls per
  timed repetition, repetitions). A repetition makes back-to-back calls lasting MIN_REP_MS (at most MAX_CALLS),
  so that the host's dispatch overhead (~10 us a call) hides behind sub-millisecond GPU work; one call where a
  call takes longer. Repetitions: at least `reps`, more until they last `min_time` seconds, at most MAX_REPS."""
  warm_ms = [time_calls(fn, args) for _ in range(warmup)][-1]
  calls = int(numpy.clip(numpy.ceil(MIN_REP_MS / max(warm_ms, 1e-3)), 1, MAX_CALLS))
  return calls, int(numpy.clip(numpy.ceil(min_time * 1000 / (calls * warm_ms)), reps, max(reps, MAX_REPS)))


def time_alternately(timed: dict) -> dict[str, list[float]]:
  """{name: (fn, args, calls per repetition, repetitions)} -> {name: ms per call of each repetition}, the
  repetitions of every name alternating, so that a slow phase of a shared machine hits them all alike."""
  times = {name: [] for name in timed}
  for i in range(max((reps for *_, reps in timed.values()), default=0)):
    for name, (fn, args, calls, reps) in timed.items():
      if i < reps:
        times[name].append(time_calls(fn, args, calls))
  return times


def within_noise(row: dict) -> bool:
  """Whether a row's ratio to the reference differs from 1 by less than the timing noise: its `ratio_range`
  (from the interquartile ranges) holds 1. The reference's own row (ratio exactly 1) is not marked."""
  low, high = row.get("ratio_range") or (None, None)
  return low is not None and low <= 1 <= high and row["ratio_to_reference"] != 1


def xla_flops(compiled) -> float | None:
  """XLA's FLOP count for a compiled function (`cost_analysis()`, a multiply-add is 2 FLOPs; a loop body counts
  once; under SPMD one device's share), or None where the backend gives none."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def relative_error(got, want) -> float:
  """The largest |got - want| over each output array (the gradients too), relative to that array's largest
  |want| entry (absolute where that is 0, e.g. the gradients of one key); the worst array's. inf where any
  array's error is not finite (a NaN anywhere, in either) or the two outputs are not the same arrays."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.tree.structure(got) != jax.tree.structure(want):
    return float("inf")
  errors = []
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = numpy.asarray(a, numpy.float32), numpy.asarray(b, numpy.float32)
    if a.shape != b.shape:
      return float("inf")
    scale = numpy.max(numpy.abs(b))
    errors.append(float(numpy.max(numpy.abs(a - b)) / (scale if scale > 0 else 1.0)))
  return max(errors, default=0.0) if all(math.isfinite(e) for e in errors) else float("inf")


def error_tolerance(dtype) -> float:
  """The largest `relative_error` a correct implementation shows against its reference on a suite's random inputs:
  fp32 sums in another order (1e-3); bf16/fp16 a rounding of each activation, output and gradient on top (5e-2)."""
  return 1e-3 if numpy.dtype(dtype) == numpy.float32 else 5e-2


def ratio_range(ref_times, times) -> list[float]:
  """[reference's 25th percentile / this one's 75th, reference's 75th / this one's 25th]: the ratio's spread."""
  q = lambda x, p: float(numpy.percentile(x, p))
  return [q(ref_times, 25) / q(times, 75), q(ref_times, 75) / q(times, 25)]


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--resume", action="store_true",
                      help="keep the cells that an earlier run with the same settings (one stopped partway) wrote to "
                      "--out, those it recorded as not run included, and run only the rest")


class Report:
  """A suite's JSON report {meta, rows}, rewritten after every cell so that a run stopped partway (killed, out
  of time on a lent machine) keeps what it measured; once all cells are in, the PNG chart is drawn (`plot(rows,
  title)` returns a matplotlib figure) and chart and rows are shown in TensorBoard (`write_tensorboard`).

  A cell is the rows one measurement writes together (an attention grid point with all its implementations,
  a model shape with its reference): `cell` names the row fields that identify it. With `resume`, the cells of
  an earlier run at `out_path` are kept and `done(...)` tells the suite to skip them, as long as that run had
  the same device, versions and `meta[key]` for every key in `same`: cells measured under other settings are
  refused, never mixed in. `lists` are meta fields that collect per-cell entries (as `rows` does).
  """

  def __init__(self, out_path: str, meta: dict, plot, *, cell: tuple[str, ...], same: tuple[str, ...] = (),
               lists: tuple[str, ...] = (), resume: bool = False):
    self.path, self.plot, self.cell = out_path, plot, cell
    self.meta = dict(meta, complete=False, runs=1, **{name: [] for name in lists})
    self.rows = []
    self._check_writable()
    if resume and os.path.exists(out_path):
      earlier = self._load(lists)
      fields = ("device.backend", "device.kind", "device.count", "device.cpu", "device.cpu_affinity_cores",
                "device.xla_flags", "versions", "code.tree", "peak_flops", *same)
      differing = [f for f in fields if not _same_field(f, _field(earlier["meta"], f), _field(self.meta, f))]
      if differing:
        raise UserError(f"{out_path} holds cells measured with a different {', '.join(differing)}; resume with the "
                        f"same settings, or run without --resume to start over.")
      self.rows = earlier["rows"]
      self.meta["runs"] = earlier["meta"].get("runs", 1) + 1
      for name in lists:
        self.meta[name] = earlier["meta"].get(name, [])
      print(f"resuming {out_path}: {len(self._cells())} cells already in it, kept")

  def _check_writable(self) -> None:
    """One sentence now, before any cell is measured, if the report cannot be written where asked."""
    if os.path.isdir(self.path):
      raise UserError(f"--out {self.path} is a directory; give a file path such as {self.path}/report.json.")
    try:
      make_writable_folder(os.path.dirname(os.path.abspath(self.path)))  # where _write puts the report from now on
    except OSError as e:
      raise UserError(f"Cannot write the report {self.path} ({e.strerror}); give an --out in a folder you can "
                      f"write to.") from None

  def _load(self, lists) -> dict:
    try:
      with open(self.path) as f:
        report = json.load(f)
    except ValueError:  # cut short or not JSON
      report = None
    scalar = (str, int, float, bool, type(None))
    meta, rows = (report.get("meta"), report.get("rows")) if isinstance(report, dict) else (None, None)
    if not (isinstance(meta, dict) and isinstance(rows, list)
            and all(isinstance(row, dict) and all(isinstance(row.get(k, ()), scalar) for k in self.cell)
                    for row in rows)
            and all(isinstance(meta.get(name, []), list) for name in lists)
            and isinstance(meta.get("runs", 1), int)):
      raise UserError(f"{self.path} is not a benchmark report this suite can resume; delete it, or run without "
                      f"--resume to overwrite it.")
    return report

  def _cells(self) -> set:
    return {tuple(row[k] for k in self.cell) for row in self.rows}

  def done(self, **cell) -> bool:
    """Whether the cell with these field values is already in the report."""
    return tuple(cell[k] for k in self.cell) in self._cells()

  def kept(self, **cell) -> list:
    """The rows of a cell already in the report (kept from the run resumed), for the suite to print again."""
    return [row for row in self.rows if all(row[k] == cell[k] for k in self.cell)]

  def add(self, rows: list, **entries) -> None:
    """Appends one cell's rows (and per-cell entries to the `lists` fields), then rewrites the JSON."""
    self.rows.extend(rows)
    for name, items in entries.items():
      self.meta[name].extend(items)
    self._write()

  def finish(self) -> None:
    """Marks the report complete, draws its chart and shows both in TensorBoard."""
    from aigc_jax import plots  # pylint: disable=g-import-not-at-top

    self.meta["complete"] = True
    self._write()
    png = os.path.splitext(self.path)[0] + ".png"
    meta = self.meta
    plots.save_figure(self.plot(self.rows, f"{meta['device']['kind']}, {meta['dtype']}, "
                                           f"peak {meta['peak_note'].split(': ')[-1]}"), png)
    logdir = write_tensorboard(self.path)
    print(f"wrote {self.path} and {png}; to see them in TensorBoard: tensorboard --logdir {os.path.dirname(logdir)}")

  def _write(self) -> None:
    # a run killed while writing leaves the last whole report; strict JSON: null where a number is not finite
    write_atomically(self.path, json.dumps(_finite(dict(meta=self.meta, rows=self.rows)), indent=1, allow_nan=False))


def make_writable_folder(folder: str) -> None:
  """Creates `folder` where it is missing and writes (then removes) a file in it: an OSError where either fails."""
  os.makedirs(folder, exist_ok=True)
  probe = os.path.join(folder, f".write-check-{os.getpid()}")
  write_atomically(probe, "")
  os.remove(probe)


def _finite(value):
  """`value` with every NaN or infinite float replaced by None, for strict JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


SCALAR_SUITES = ("attention",)  # suites whose module has `scalars(rows) -> [(tag, step, value)]` for TensorBoard


def tensorboard_dir(report_path: str) -> str:
  """Where a report's TensorBoard events go: `tensorboard/<report name>/` beside it, one TensorBoard run per
  report, so `tensorboard --logdir <folder>/tensorboard` compares all the reports in a folder."""
  folder, name = os.path.split(os.path.abspath(report_path))
  return os.path.join(folder, "tensorboard", os.path.splitext(name)[0])


def load_report(path: str) -> dict:
  """A benchmark report {meta, rows} from its JSON file; anything else is a UserError."""
  try:
    with open(path) as f:
      report = json.load(f)
  except OSError as e:
    raise UserError(f"Cannot read the benchmark report {path} ({e.strerror}); give the path of a report a bench "
                    f"suite wrote with --out.") from None
  except ValueError:
    report = None
  if not (isinstance(report, dict) and isinstance(report.get("meta"), dict) and isinstance(report.get("rows"), list)
          and all(isinstance(row, dict) for row in report["rows"])):
    raise UserError(f"{path} is not a benchmark report (a JSON object with `meta` and a list of `rows`); give one "
                    f"that a bench suite wrote with --out.")
  return report


def write_tensorboard(report_path: str) -> str:
  """Shows a report in TensorBoard: its rows and its meta (device, versions, peak) as tables, and its chart (the
  PNG beside it, where there is one) as an image. Replaces what an earlier run of the same report wrote there;
  returns the folder."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

  from aigc_jax import plots  # pylint: disable=g-import-not-at-top

  report = load_report(report_path)
  logdir = tensorboard_dir(report_path)
  try:
    make_writable_folder(logdir)
    for name in os.listdir(logdir):
      if name.startswith("events.out.tfevents."):
        os.remove(os.path.join(logdir, name))
  except OSError as e:
    raise UserError(f"Cannot write TensorBoard events to {logdir} ({e.strerror}); copy the report into a folder you "
                    f"can write to and show it from there.") from None
  writer = SummaryWriter(logdir)
  suite = report["meta"].get("suite")
  if suite in SCALAR_SUITES:  # curves: e.g. attention TFLOP/s against seq_len
    for tag, step, value in importlib.import_module(f"benchmarks.{suite}").scalars(report["rows"]):
      writer.add_scalar(tag, value, step)
  writer.add_text("rows", rows_markdown(report["rows"]), 0)
  writer.add_text("meta", meta_markdown(report["meta"]), 0)
  png = os.path.splitext(report_path)[0] + ".png"
  if os.path.exists(png):
    writer.add_image("chart", plots.read_png(png), 0, dataformats="HWC")
  writer.close()
  return logdir


def rows_markdown(rows: list[dict]) -> str:
  """The rows as a Markdown table, one column per field (in order of first appearance)."""
  columns = list(dict.fromkeys(key for row in rows for key in row))
  lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(_markdown_cell(row.get(key)) for key in columns) + " |" for row in rows]
  return "\n".join(lines)


def meta_markdown(meta: dict) -> str:
  """The meta fields as a two-column Markdown table, nested fields dotted (`device.kind`); what a cell recorded as
  wrong or not run, one entry per line."""
  entries = []
  for key, value in meta.items():
    if isinstance(value, dict):
      entries += [(f"{key}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list) and key in ("wrong", "not_run"):
      entries += [(key, ", ".join(f"{k} {v}" for k, v in item.items()) if isinstance(item, dict) else item)
                  for item in value] or [(key, "none")]
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
      entries.append((key, f"{len(value)} entries (in the JSON)"))  # per-cell records, e.g. timing spreads
    elif isinstance(value, list):
      entries.append((key, ", ".join(str(item) for item in value)))
    else:
      entries.append((key, value))
  return "\n".join(["| field | value |", "| --- | --- |", *(f"| {k} | {_markdown_cell(v)} |" for k, v in entries)])


def _markdown_cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value).replace("|", "\\|").replace("\n", " ")


def _same_field(name: str, a, b) -> bool:
  """Whether a resumed report's meta field matches: exactly, but for the peak within 1%, which on a virtual
  machine without cpufreq counts /proc/cpuinfo's 'cpu MHz', a reading that may move from one read to the next."""
  if name == "peak_flops" and isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
    return abs(a - b) <= 0.01 * max(a, b)
  return a == b


def _field(meta: dict, dotted: str):
  """meta's value at a dotted path (`device.kind`); None where it has none."""
  for part in dotted.split("."):
    meta = meta.get(part) if isinstance(meta, dict) else None
  return meta


def main(module) -> int:
  """`python -m benchmarks.NAME`: parses the suite's flags and runs it; bad input is one line, exit 2."""
  try:
    return module.run(parse_args(module))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
