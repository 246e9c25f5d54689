"""`train_and_evaluate(config, workdir)`: the one training loop every family runs through."""

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from aigc_jax import config as config_lib
from aigc_jax.errors import UserError
from aigc_jax.plots import plot_training_curves
from aigc_jax.tasks import make_task
from aigc_jax.train import parallel
from aigc_jax.train.checkpoint import Checkpointer, abstract_with_sharding
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import reduce_metrics
from aigc_jax.files import write_atomically
from aigc_jax.train.writer import MetricWriter

CONFIG_FILE = "config.json"
# What a resumed run may change from its config.json: how long it trains, when and what it logs, evaluates, samples
# and keeps, the optimizer's settings (lowering optim.learning_rate after a divergence is how such a run goes on),
# and how many microbatches a step's batch is split into (grad_accum_steps: the same batch and mean gradient, so a
# run moved to fewer or smaller devices goes on; only the random draws of dropout or diffusion noise, made per
# microbatch, differ). Anything else (the model, the data, the batch, the seed) would make the rest of the run
# silently another one.
RESUMABLE_CHANGES = ("num_train_steps", "log_every_steps", "eval_every_steps", "eval_batches",
                     "checkpoint_every_steps", "keep_checkpoints", "grad_accum_steps", "sample.", "eval.", "optim.")


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


class Stopped(KeyboardInterrupt):
  """The run stopped early on request (SIGTERM, or Ctrl-C) after saving a checkpoint at `step`."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"stopped at step {step} by {signal_name}, after saving a checkpoint there")
    self.step, self.signal_name = step, signal_name


class StopRequests:
  """Asks the loop to stop after the step in flight, with a checkpoint of it: what a preemption's SIGTERM or a first
  Ctrl-C gives, so that they lose no steps. A second Ctrl-C stops at once (from the last checkpoint saved).

  One process catches the signals itself (from the main thread). Several processes must stop at the same step:
  JAX's preemption sync, which `jax.distributed.initialize` starts, agrees on it when any of them gets SIGTERM; a
  first Ctrl-C there is passed on to it as a SIGTERM to this process.
  """

  def __init__(self):
    self.received, self._previous, self._sync_missing = None, {}, False

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      # Several processes: SIGTERM is JAX's to catch (its preemption notifier); Ctrl-C is turned into one.
      caught = (signal.SIGINT, signal.SIGTERM) if jax.process_count() == 1 else (signal.SIGINT,)
      self._previous = {s: signal.signal(s, self._handle) for s in caught}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # asked twice: now
    self.received = signal.Signals(signum).name
    logging.warning("%s: stopping after this step, with a checkpoint (Ctrl-C again to stop at once)", self.received)
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)  # for JAX's preemption sync, which stops every process at one step

  def stop_at(self, step: int) -> str | None:
    """The signal's name if the run should stop after `step` (every process calls this at every step), else None."""
    if jax.process_count() > 1:
      try:
        return (self.received or "SIGTERM") if multihost_utils.reached_preemption_sync_point(step) else None
      except RuntimeError as e:  # no preemption service (disabled, or processes not joined by jax.distributed)
        if not self._sync_missing:
          self._sync_missing = True
          logging.warning("preemption sync is not available (%s): SIGTERM will not save a checkpoint", e)
        return None
    return self.received


class StepProfiler:
  """Traces `num_steps` training steps with `jax.profiler` into `logdir` (TensorBoard's Profile tab, from
  tensorboard-plugin-profile, shows it), starting at the second step this process runs: the first one compiles."""

  def __init__(self, logdir: str, start: int, end: int, num_steps: int):
    self.logdir, self.num_steps, self.active = logdir, num_steps, False
    self.first = min(start + 1, end - 1)
    self.last = min(self.first + num_steps, end) - 1
    if num_steps and start >= end:
      logging.info("--profile: the run is already at step %d of %d, so there is no step to trace", start, end)
    elif num_steps and self.first == start:
      logging.info("--profile: one step is left to train, so the trace includes its compilation")

  def step(self, step: int):
    """A context for running training step `step`: starts the trace at the first profiled step and names each
    traced step in it."""
    if self.num_steps and step == self.first:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active else contextlib.nullcontext()

  def done(self, step: int, outputs) -> None:
    """After step `step`: at the last profiled step, waits for its outputs and writes the trace."""
    if self.active and step == self.last:
      jax.block_until_ready(outputs)
      self.stop()
      logging.info("profiled steps %d..%d into %s (TensorBoard's Profile tab)", self.first + 1, step + 1,
                   self.logdir)

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def build_state(task, tx, config, mesh):
  """Abstract state and its shardings (replicated), and a function that initialises it."""

  def init(rng):
    init_rng, step_rng = jax.random.split(rng)
    params = task.init_params(init_rng)
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                      rng=step_rng, ema_params=params if task.ema_decay > 0 else None)

  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
  return init, abstract, shardings


class Steps(NamedTuple):
  """Everything compiled for one task on one mesh."""
  init: Callable  # rng -> TrainState, placed on the mesh
  abstract: TrainState  # shapes and shardings, for restoring
  train: Callable  # (state, batch) -> (state, metrics), state donated
  eval: Callable  # (params, batch) -> metrics


def compile_steps(task, config, mesh) -> Steps:
  parallel.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  tx = task.optimizer()
  init, abstract, state_sharding = build_state(task, tx, config, mesh)
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  train_step = jax.jit(task.make_train_step(tx), in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(task.make_eval_step(), in_shardings=(state_sharding.params, batch_sharding),
                      out_shardings=replicated)
  return Steps(jit_init(init, mesh.devices.flat[0].platform, out_shardings=state_sharding),
               abstract_with_sharding(abstract, state_sharding), MeshBound(train_step, mesh),
               MeshBound(eval_step, mesh))


class MeshBound:
  """A jitted function called (so traced) and lowered with `mesh` as the context mesh: layers that
  place work per device (`flash` attention's per-shard kernels) read the mesh from there."""

  def __init__(self, jitted: Callable, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def trace(self, *args):  # jit's staged API: .trace(...).lower().compile()
    with jax.set_mesh(self.mesh):
      return self.jitted.trace(*args)

  def lower(self, *args):
    return self.trace(*args).lower()


def jit_init(init: Callable, platform: str, **jit_kwargs) -> Callable:
  """`jax.jit` for initialisation, which runs once: on CPU at LLVM optimisation level 1.

  Its random draws (one threefry stream per parameter) take XLA:CPU's default optimisation
  long to compile: 11-23 s for the tiny test UNet, 5-6 s at level 1, which runs as fast
  (both ~15 ms; 1.3-2.3 s for an 85M-parameter GPT). Level 0 runs the 85M init in 8.8 s.
  """
  options = {"xla_backend_optimization_level": 1} if platform == "cpu" else None
  return jax.jit(init, compiler_options=options, **jit_kwargs)


def _resume(checkpointer, abstract_state, config, workdir: str, data_fingerprint: str | None, later_keys: dict):
  """The latest checkpoint's state; one sentence when it cannot be read, naming the config keys changed since the
  run's config.json when there are any (a changed model or optimizer no longer fits the saved arrays)."""
  try:
    state, meta = checkpointer.restore(abstract_state)
  except UserError:
    # Settings that shape the saved state (the optimizer's, say grad_clip's chain) can make it unreadable; how long
    # the run is and what it logs cannot, and the rest were refused before (_check_changes). Damaged files are
    # damage whatever changed: a learning rate changed along with them is not the cause.
    changed = [key for key in _changed_keys(os.path.join(workdir, CONFIG_FILE), config, later_keys=later_keys)
               if key.startswith("optim.") or not key.startswith(RESUMABLE_CHANGES)]
    if changed and checkpointer.layout_differs(checkpointer.latest_step(), abstract_state):
      raise _config_changed(checkpointer, changed) from None
    raise
  if not isinstance(meta, dict) or (meta.get("data") or {}).get("next_batch") != int(state.step):
    raise UserError(f"The checkpoint at step {int(state.step)} in {checkpointer.directory} has no record of where "
                    f"the data stream stands; {checkpointer.delete_advice(int(state.step))}.")
  if meta["data"].get("seed", config.seed) != config.seed:  # config.json, which also says so, may be missing
    raise UserError(f"The checkpoints in {checkpointer.directory} were trained with seed {meta['data']['seed']}, "
                    f"and the config has seed {config.seed}; resume with --config.seed={meta['data']['seed']}, or "
                    f"train in a new --workdir.")
  saved = meta["data"].get("fingerprint")  # checkpoints saved before fingerprints were kept have none
  if saved is not None and data_fingerprint is not None and saved != data_fingerprint:
    raise UserError(f"data.source={config.data.source} no longer reads the data the checkpoints in "
                    f"{checkpointer.directory} were trained on (its fingerprint was {saved}, now {data_fingerprint}): "
                    f"resume on the same data (for embedded text, the same Python version), or train in a new "
                    f"--workdir.")
  logging.info("resumed from step %d in %s", int(state.step), checkpointer.directory)
  return state


def _check_changes(checkpointer, config, workdir: str, later_keys: dict) -> None:
  """Refuses to resume with settings outside RESUMABLE_CHANGES changed since the run's config.json; logs the rest.

  Keys added to the configs since the run's config.json was written count with the values that reproduce what
  the code did before them (the task's `later_keys`: a run saved before data.random_flip was not augmented, and
  ddpm_cifar10.py's True would have turned flips on halfway, silently); other keys it lacks are left to the
  restore to judge."""
  changed = _changed_keys(os.path.join(workdir, CONFIG_FILE), config, missing=False, later_keys=later_keys)
  refused = [key for key in changed if not key.startswith(RESUMABLE_CHANGES)]
  if refused:
    raise _config_changed(checkpointer, refused)
  if changed:
    logging.info("resuming with %s changed since the run's %s", ", ".join(changed), CONFIG_FILE)


def _config_changed(checkpointer, keys: list[str]) -> UserError:
  return UserError(f"The checkpoints in {checkpointer.directory} were written with a different config "
                   f"({', '.join(keys)} changed since the run's {CONFIG_FILE}); resume with the run's own "
                   f"settings, or train in a new --workdir.")


def _changed_keys(saved_path: str, config, missing: bool = True, later_keys: dict | None = None) -> list[str]:
  """Dotted keys whose values differ between the JSON config at saved_path (if readable), with the `later_keys`
  it lacks filled in, and `config`; with `missing`, also those only one of them has."""
  try:
    with open(saved_path) as f:
      saved = json.loads(config_lib.to_json(config_lib.fill_missing(config_lib.from_json(f.read()), later_keys or {})))
  except (OSError, ValueError, TypeError, AttributeError):  # unreadable, or JSON that is no config
    return []

  def flat(tree, prefix=""):
    items = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        items.update(flat(value, f"{prefix}{key}."))
      else:
        items[prefix + key] = value
    return items

  old, new = flat(saved), flat(json.loads(config_lib.to_json(config)))
  keys = old.keys() | new.keys() if missing else old.keys() & new.keys()
  return sorted(k for k in keys if old.get(k) != new.get(k))


def _only_rows(make_batches: Callable, rows: slice, batch_size: int) -> tuple[Callable, int | None]:
  """A task's `train_batch` or `eval_batches` asking for only `rows` of each batch of `batch_size`, and the batch
  size to place what it gives as (`parallel.shard_batch`). A task of your own whose method takes no `rows` is
  called as it is: every process builds whole batches (of any size: None, each batch's own) and places its rows."""
  if "rows" in inspect.signature(make_batches).parameters:
    return functools.partial(make_batches, rows=rows), batch_size
  return make_batches, None


def train_and_evaluate(config, workdir: str, *, show_progress: bool = True, profile_steps: int = 0
                       ) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last evaluation (for families
  with no evaluation metrics, GANs, the last logged training metrics).

  `profile_steps` > 0 traces that many training steps (after the first, which compiles) into
  `workdir/tensorboard` with `jax.profiler` (the primary process's, in a multi-process run).

  In a multi-process run (`parallel.initialize_distributed`) every process calls this with the same config and
  workdir (a folder they share); only the primary one writes logs, samples and the config, and shows progress.
  """
  primary = parallel.is_primary()
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file; name a folder (new or holding a run).")
  os.makedirs(workdir, exist_ok=True)
  checkpointer = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  resuming = checkpointer.latest_step() is not None
  try:
    # A resumed run's task reads what the run saved (its vocabulary); a new one builds it from the data, even over
    # what a run that never reached a checkpoint left in the folder.
    task = make_task(config, workdir if resuming else None)
    mesh = parallel.data_mesh()
    steps = compile_steps(task, config, mesh)
    if resuming:
      # Before the data is read: a changed data.source is named.
      _check_changes(checkpointer, config, workdir, task.later_keys)
      fingerprint = task.data_fingerprint()
      state = _resume(checkpointer, steps.abstract, config, workdir, fingerprint, task.later_keys)
    else:
      fingerprint = task.data_fingerprint()
      state = steps.init(jax.random.PRNGKey(config.seed))
  except BaseException:
    checkpointer.close()  # stops Orbax's background threads before the error ends the process
    raise
  start = int(state.step)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(steps.abstract.params))
  logging.info("%s: %.2fM parameters, %d devices, steps %d..%d", config.model.name, n_params / 1e6,
               mesh.devices.size, start, config.num_train_steps)
  rows = parallel.process_rows(config.batch_size, mesh)  # of each batch, the ones this process's devices hold
  train_batch, train_batch_size = _only_rows(task.train_batch, rows, config.batch_size)
  make_eval_batches, eval_batch_size = _only_rows(task.eval_batches, rows, config.batch_size)
  eval_batches = {split: [parallel.shard_batch(b, mesh, eval_batch_size) for b in batches]
                  for split, batches in make_eval_batches().items()}
  # Written only once the run has started or resumed and read its data: a start that fails (a changed model, a
  # missing corpus) leaves the workdir's run as it was, still resumable and sampled as trained. A run already past
  # num_train_steps trains no further, and keeps the config it was trained with.
  if not resuming or start < config.num_train_steps:
    if primary:
      write_atomically(os.path.join(workdir, CONFIG_FILE), config_lib.to_json(config))
  elif start > config.num_train_steps:
    logging.info("the run is at step %d, past num_train_steps=%d: evaluating it as it is", start,
                 config.num_train_steps)
  if primary:
    task.save_assets(workdir)

  def evaluate(params, step, record=True):
    results = {}
    for split, batches in eval_batches.items():
      prefix = "val" if split == "validation" else split
      metrics = reduce_metrics(jax.device_get([steps.eval(params, b) for b in batches]))
      results.update({f"{prefix}_{name}": value for name, value in metrics.items()})
    if record:
      if results:  # GANs have no evaluation metrics, only samples
        writer.write_scalars(step, results)
      task.on_eval(params, step, writer)
    return results

  def data_record(next_batch: int) -> dict:  # where the data stream stands, and what data it is
    record = {"next_batch": next_batch, "seed": config.seed}
    return record if fingerprint is None else {**record, "fingerprint": fingerprint}

  writer = MetricWriter(workdir, resume_step=start, active=primary)
  progress = tqdm(total=config.num_train_steps, initial=start, disable=not (show_progress and primary), unit="step",
                  dynamic_ncols=True)
  pending, window_start, window_first = [], None, start
  profiler = StepProfiler(writer.logdir, start, config.num_train_steps, profile_steps if primary else 0)
  last_eval, last_logged, last_saved = {}, {}, checkpointer.latest_step()
  try:
    with StopRequests() as stops:
      for step in range(start, config.num_train_steps):
        with profiler.step(step):
          state, metrics = steps.train(state, parallel.shard_batch(train_batch(step), mesh, train_batch_size))
        profiler.done(step, metrics)
        pending.append(metrics)
        done = step + 1
        is_last = done == config.num_train_steps
        stop = None if is_last else stops.stop_at(done)  # a preemption or Ctrl-C: save this step, then stop
        saving = done % config.checkpoint_every_steps == 0 or is_last or stop is not None
        # A stop skips an evaluation due at its step: a preemption's grace period (often 30 s) is for the save.
        evaluating = (done % config.eval_every_steps == 0 or is_last) and stop is None
        # The first step is fetched at once: it carries the compilation, so throughput is timed after it.
        if done % config.log_every_steps == 0 or saving or evaluating or window_start is None:
          summary = reduce_metrics(jax.device_get(pending))
          if not all(math.isfinite(v) for v in summary.values()):
            kept = (f"the last good checkpoint (step {last_saved}) is kept in {checkpointer.directory}: lower "
                    f"optim.learning_rate and run again to resume from it" if last_saved is not None else
                    "no checkpoint was saved before it: lower optim.learning_rate and run again")
            raise TrainingDiverged(
                f"The loss became non-finite between steps {done - len(pending) + 1} and {done}; {kept}.")
          now = time.perf_counter()
          if window_start is not None:
            summary[f"{task.units}_per_sec"] = (done - window_first) * task.units_per_batch / (now - window_start)
            summary["ms_per_step"] = 1000 * (now - window_start) / (done - window_first)
            progress.set_postfix({"loss": f"{summary.get('loss', float('nan')):.4f}",
                                  f"{task.units}/s": f"{summary[task.units + '_per_sec']:.0f}"})
          writer.write_scalars(done, summary)  # "loss": the running training loss; evaluations log train_/val_loss
          last_logged = summary
          pending, window_start, window_first = [], now, done
        # Saved before the evaluation due at the same step: an evaluation that fails, or a host lost during it,
        # loses nothing (and the save's writing, in the background, overlaps it).
        if saving:
          checkpointer.save(done, state, {"data": data_record(done)})
          last_saved = done
          window_start = time.perf_counter()  # saving is not training throughput (its device-to-host copy blocks)
        if evaluating:
          last_eval = evaluate(state.eval_params, done)
          if last_eval and primary:  # GANs have no evaluation metrics, only samples
            progress.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
          window_start = time.perf_counter()  # nor is evaluation time
        progress.update(1)
        if stop is not None:
          raise Stopped(done, stop)
    if start >= config.num_train_steps and not last_eval:
      logging.info("already trained to step %d; evaluating", start)
      last_eval = evaluate(state.eval_params, start, record=False)  # the run's own evaluation there is kept
    if primary and os.path.exists(writer.path):  # nothing is logged by a run of 0 steps
      curves = plot_training_curves(writer.path, os.path.join(workdir, "curves.png"), task.loss_label)
      writer.write_image(max(start, config.num_train_steps), "curves", curves)  # a run resumed past the end
  finally:  # an interrupted run keeps every checkpoint it started writing
    profiler.stop()
    progress.close()
    checkpointer.close()
    writer.close()
  return last_eval or last_logged
