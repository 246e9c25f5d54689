import json
import os
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aigc_jax import config as config_lib
from aigc_jax.data.text import CharVocab
from aigc_jax.errors import UserError
from aigc_jax.files import read_jsonl
from aigc_jax.plots import read_png
from aigc_jax.tasks import make_task
from aigc_jax.train import loop, parallel
from aigc_jax.train import steps as steps_lib
from aigc_jax.train.checkpoint import Checkpointer, checksums
from aigc_jax.train.state import TrainState
from aigc_jax.train.writer import MetricWriter
from conftest import CPU_CONFIG, ROOT, TEXT, TINY_UNET, tiny_overrides


def final_params(workdir, config):
  steps = loop.compile_steps(make_task(config, workdir), config, parallel.data_mesh())
  state, meta = Checkpointer(workdir).restore(steps.abstract)
  return state, meta


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


class Interrupt(Exception):
  pass


def test_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  loop.train_and_evaluate(tiny_config, straight, show_progress=False)

  real_make_task = loop.make_task

  def make_task_that_stops(config, workdir):  # simulates a kill right after the step-3 checkpoint
    task = real_make_task(config, workdir)
    real_batch = task.train_batch
    def train_batch(step):
      if step == 4:
        raise Interrupt()
      return real_batch(step)
    task.train_batch = train_batch
    return task

  monkeypatch.setattr(loop, "make_task", make_task_that_stops)
  with pytest.raises(Interrupt):
    loop.train_and_evaluate(tiny_config, resumed, show_progress=False)
  monkeypatch.setattr(loop, "make_task", real_make_task)
  assert Checkpointer(resumed).latest_step() == 3
  loop.train_and_evaluate(tiny_config, resumed, show_progress=False)

  a, meta_a = final_params(straight, tiny_config)
  b, meta_b = final_params(resumed, tiny_config)
  fingerprint = make_task(tiny_config).data_fingerprint()
  assert int(a.step) == int(b.step) == 6 and meta_a == meta_b == {"data": {"next_batch": 6, "seed": 0,
                                                                            "fingerprint": fingerprint}}
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  rows_a, rows_b = read_metrics(straight), read_metrics(resumed)
  assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
  for key in ("loss", "val_loss"):
    assert [r[key] for r in rows_a if key in r] == pytest.approx([r[key] for r in rows_b if key in r], rel=1e-6)
  assert [r["step"] for r in rows_b if "val_loss" in r] == [3, 6]


def test_workdir_outputs(tiny_config, tmp_path, tensorboard_events):
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
  assert set(result) == {"train_loss", "val_loss"}
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert all({"grad_norm", "param_norm", "learning_rate"} <= set(r) for r in rows if "loss" in r)
  assert all({"tokens_per_sec", "ms_per_step"} <= set(r) for r in rows if "loss" in r and r["step"] > 1)
  assert rows[-1]["val_loss"] == pytest.approx(result["val_loss"])
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_000003.txt", "step_000006.txt"]
  events = tensorboard_events(os.path.join(workdir, "tensorboard"))
  assert [step for step, _ in events["loss"]] == [1, 2, 3, 4, 5, 6]
  assert events["val_loss"] == [(r["step"], pytest.approx(r["val_loss"])) for r in rows if "val_loss" in r]
  assert [step for step, _ in events["sample/text_summary"]] == [3, 6]
  [(step, curves)] = events["curves"]  # the curves.png picture, at the last step
  assert step == 6 and np.array_equal(curves, read_png(os.path.join(workdir, "curves.png")))
  assert os.path.exists(os.path.join(workdir, "config.json")) and os.path.exists(os.path.join(workdir, "vocab.json"))
  assert Checkpointer(workdir).manager.all_steps() == [3, 6]
  # Run again when already trained: the final evaluation is returned, not written a second time.
  again = loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
  assert again == pytest.approx(result) and read_metrics(workdir) == rows
  # A line cut short (a full disk, a kill mid-write) is skipped, not a JSONDecodeError on every later resume.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "grad_no')
  assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [r["step"] for r in rows]
  # A resume from step 3 keeps step 3's TensorBoard events and drops those after it (and the cut line).
  assert MetricWriter(workdir, resume_step=3).tensorboard.purge_step == 4
  assert max(r["step"] for r in read_metrics(workdir)) == 3
  assert all(line.endswith("}\n") for line in open(os.path.join(workdir, "metrics.jsonl")))


def test_a_logging_window_averages_the_work_and_keeps_the_last_learning_rate():
  from aigc_jax.train.steps import reduce_metrics  # the learning rate averaged over a warm-up window was no step's
  history = [{"loss": (6.0, 2.0), "grad_norm": (1.0, 1.0), "learning_rate": (0.1, 1.0), "param_norm": (3.0, 1.0),
              "d_learning_rate": (0.5, 1.0)},
             {"loss": (2.0, 2.0), "grad_norm": (3.0, 1.0), "learning_rate": (0.2, 1.0), "param_norm": (4.0, 1.0),
              "d_learning_rate": (0.25, 1.0)}]
  assert reduce_metrics(history) == {"loss": 2.0, "grad_norm": 2.0, "learning_rate": 0.2, "param_norm": 4.0,
                                     "d_learning_rate": 0.25}


def test_gradient_accumulation_equals_the_full_batch(tiny_config):
  task = make_task(tiny_config)
  mesh = parallel.data_mesh()
  batch = parallel.shard_batch(task.train_batch(0), mesh)
  results = []
  for accum in (1, 4):
    with tiny_config.unlocked():
      tiny_config.grad_accum_steps = accum
    steps = loop.compile_steps(task, tiny_config, mesh)
    state, metrics = steps.train(steps.init(jax.random.PRNGKey(0)), batch)
    results.append((state.params, metrics["loss"]))
  for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_weights_microbatches_by_their_counts():
  """A loss over a varying number of tokens per microbatch: accumulating gives the full batch's mean gradient."""
  def loss_fn(params, batch, rng, train):  # squared error over the unmasked entries
    errors = (params["w"] * batch["x"] - 1.0) ** 2 * batch["mask"]
    return jnp.sum(errors), jnp.sum(batch["mask"]), {}

  batch = {"x": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]),
           "mask": jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])}  # 4 tokens, then 1
  params = {"w": jnp.array(0.5)}
  new = {}
  for accum in (1, 2):
    step = steps_lib.make_train_step(loss_fn, optax.sgd(1.0), grad_accum_steps=accum)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=optax.sgd(1.0).init(params),
                       rng=jax.random.PRNGKey(0))
    new[accum], _ = step(state, batch)
  # d/dw mean((w x - 1)^2) over x = 1, 2, 3, 4, 5: 2 * sum(x (w x - 1)) / 5 = 2 * (0.5 * 55 - 15) / 5 = 5
  np.testing.assert_allclose(new[1].params["w"], 0.5 - 5.0, rtol=1e-6)
  np.testing.assert_allclose(new[2].params["w"], new[1].params["w"], rtol=1e-6)
  three = steps_lib.make_train_step(loss_fn, optax.sgd(1.0), grad_accum_steps=3)
  with pytest.raises(UserError, match="A batch of 4 rows does not split into 3 accumulation steps; use a batch size "
                                      "that is a multiple of 3."):
    three(state, batch)  # was a reshape TypeError


def test_an_optimizer_applied_several_times_a_step_follows_the_schedule_once_a_step(tiny_config):
  """A GAN's critic takes d_steps updates a training step; its warm-up and decay still run over training steps."""
  from aigc_jax.train.optim import learning_rate_schedule
  base = learning_rate_schedule(tiny_config.optim, 6)  # warm-up 2 steps, cosine to step 6
  critic = learning_rate_schedule(tiny_config.optim, 6, updates_per_step=5)
  assert [float(critic(count)) for count in range(30)] == [float(base(step)) for step in range(6) for _ in range(5)]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir, show_progress=False)  # good checkpoints at 3 and 6
  with tiny_config.unlocked():
    tiny_config.num_train_steps = 12
    tiny_config.optim.learning_rate = float("nan")
  with pytest.raises(loop.TrainingDiverged, match=r"non-finite between steps 7 and 7; the last good checkpoint \(step 6\)"):
    loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
  assert Checkpointer(workdir).latest_step() == 6


def test_non_finite_loss_before_any_checkpoint_says_so(tiny_config, tmp_path):
  with tiny_config.unlocked():
    tiny_config.optim.learning_rate = float("nan")
  with pytest.raises(loop.TrainingDiverged, match=r"non-finite between steps 1 and 1; no checkpoint was saved "
                                                  r"before it: lower optim.learning_rate and run again\.$"):
    loop.train_and_evaluate(tiny_config, str(tmp_path / "run"), show_progress=False)


def test_the_checkpoint_due_with_an_evaluation_is_saved_before_it(tiny_config, tmp_path, monkeypatch):
  """An evaluation that failed (or a host lost during it) lost the checkpoint due at the same step."""
  from aigc_jax.tasks.language_model import LanguageModelTask

  def failing(self, params, step, writer):
    raise RuntimeError("the evaluation failed")

  monkeypatch.setattr(LanguageModelTask, "on_eval", failing)
  workdir = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="the evaluation failed"):
    loop.train_and_evaluate(tiny_config, workdir, show_progress=False)  # checkpoint and evaluation both at step 3
  assert Checkpointer(workdir).latest_step() == 3


def test_keys_added_since_a_run_was_saved_resume_with_the_values_it_trained_with(tmp_path):
  """A run saved before data.random_flip existed was not augmented; ddpm_cifar10.py's True turned flips on
  halfway through, silently (keys the saved config lacks were skipped)."""
  from aigc_jax.tasks.diffusion import DiffusionTask
  path = os.path.join(ROOT, "configs", "ddpm_cifar10.py")
  saved = json.loads(config_lib.to_json(config_lib.load_config(path)))
  del saved["data"]["random_flip"], saved["sample"]["variance"]
  with open(tmp_path / loop.CONFIG_FILE, "w") as f:
    json.dump(saved, f)
  checkpointer = Checkpointer(str(tmp_path))
  with pytest.raises(UserError, match=r"written with a different config \(data.random_flip changed since the "
                                      r"run's config.json\); resume with the run's own settings"):
    loop._check_changes(checkpointer, config_lib.load_config(path), str(tmp_path), DiffusionTask.later_keys)
  # The run's own setting resumes; sample.variance may change after training, as every sample.* key.
  loop._check_changes(checkpointer, config_lib.load_config(path, ["data.random_flip=False"]), str(tmp_path),
                      DiffusionTask.later_keys)
  # Nor does a failed restore's explanation name a key the run lacks but had in effect (it listed every such key).
  saved_path, own = str(tmp_path / loop.CONFIG_FILE), config_lib.load_config(path, ["data.random_flip=False"])
  assert "data.random_flip" in loop._changed_keys(saved_path, own)
  assert loop._changed_keys(saved_path, own, later_keys=DiffusionTask.later_keys) == ["sample.variance"]


def flip_sites(folder):
  """(file, byte offset) pairs to flip a bit at: the middle and a third of each file, largest files first."""
  for path in sorted((os.path.join(folder, name) for name in os.listdir(folder)), key=os.path.getsize, reverse=True):
    size = os.path.getsize(path)
    yield from ((path, size // 2), (path, size // 3))


def test_changed_data_and_a_corrupt_checkpoint_are_one_clear_sentence(tiny_config, tmp_path, text_file):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
  _, meta = final_params(workdir, tiny_config)
  assert meta["data"]["fingerprint"] == make_task(tiny_config).data_fingerprint()
  # The same characters in another order: the same vocabulary and shapes, other data. It resumed silently.
  with open(text_file, "w", encoding="utf-8") as f:
    f.write(TEXT[::-1])
  with pytest.raises(UserError, match=r"data.source=text_file:.* no longer reads the data the checkpoints in .* were "
                                      r"trained on .*: resume on the same data"):
    loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
  with open(text_file, "w", encoding="utf-8") as f:
    f.write(TEXT)
  # Without the run's config.json (only checkpoints/ copied) another seed resumed silently; the checkpoint says.
  os.remove(os.path.join(workdir, "config.json"))
  with tiny_config.unlocked():
    tiny_config.seed = 5
  with pytest.raises(UserError, match=r"were trained with seed 0, and the config has seed 5; resume with "
                                      r"--config.seed=0, or train in a new --workdir"):
    loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
  with tiny_config.unlocked():
    tiny_config.seed = 0
  # What tells a config that changed the saved arrays' layout (it names the keys) from damaged files (below).
  abstract = lambda config: loop.compile_steps(make_task(config), config, parallel.data_mesh()).abstract
  wider = config_lib.load_config(CPU_CONFIG, tiny_overrides(text_file) + ["model.emb_dim=64"])
  checkpointer = Checkpointer(workdir)
  assert checkpointer.layout_differs(6, abstract(wider)) and not checkpointer.layout_differs(6, abstract(tiny_config))
  # One flipped bit in the arrays' files: Orbax often read it back as other numbers, silently. The files are
  # compressed and laid out differently from run to run, so a flip may also break decompression (the sentence for
  # unreadable checkpoints) or land where no restored value changes; bits are flipped until one changes values.
  damaged = r"checkpoint at step 6 .* is damaged: \d+ of its arrays \(.*\) no longer match the checksums saved " \
            r"with them; delete .*6 to resume from the one before it \(step 3\)"
  unreadable = r"checkpoint at step 6 .* could not be read .*delete .*6 to resume from the one before it \(step 3\)"
  target = abstract(tiny_config)
  data = os.path.join(workdir, "checkpoints", "6", "state", "ocdbt.process_0", "d")
  outcomes = []
  for path, at in flip_sites(data):
    with open(path, "rb") as f:
      intact = f.read()
    with open(path, "wb") as f:
      f.write(intact[:at] + bytes([intact[at] ^ 0x10]) + intact[at + 1:])
    try:
      checkpointer.restore(target)
      outcomes.append("unchanged")
    except UserError as e:
      assert re.search(damaged, str(e)) or re.search(unreadable, str(e)), str(e)
      outcomes.append("damaged" if re.search(damaged, str(e)) else "unreadable")
    with open(path, "wb") as f:
      f.write(intact)
    if outcomes[-1] == "damaged":
      break
  assert outcomes[-1] == "damaged", outcomes
  assert int(checkpointer.restore(target)[0].step) == 6
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "6", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  running = set(threading.enumerate())
  with pytest.raises(UserError, match=unreadable):
    checkpointer.restore(target)
  # The reads Orbax abandoned are finished before the error is raised: their threads raced this worker's next test.
  assert set(threading.enumerate()) <= running


def test_checksums_change_with_any_flipped_bit_or_moved_value():
  tree = {"f": jnp.array([1.5, -2.0, 3.25]), "h": jnp.array([0.5, 7.0], jnp.bfloat16), "i": jnp.array([3, 0], jnp.int8),
          "b": jnp.array([True, False]), "key": jax.random.key(1), "none": None}
  base = checksums(tree)
  assert sorted(base) == ["['b']", "['f']", "['h']", "['i']", "['key']"]  # None is no array
  assert checksums(jax.device_get(tree)) == base
  for name in ("f", "h", "i"):
    x = np.asarray(tree[name])
    words = x.view(f"uint{8 * x.itemsize}")
    for index in range(x.size):
      for bit in range(8 * x.itemsize):
        flipped = words.copy()
        flipped[index] ^= words.dtype.type(1 << bit)
        assert checksums({**tree, name: jnp.asarray(flipped.view(x.dtype))})[f"['{name}']"] != base[f"['{name}']"]
  assert checksums({**tree, "f": tree["f"][::-1]})["['f']"] != base["['f']"]
  assert checksums({**tree, "b": ~tree["b"]})["['b']"] != base["['b']"]
  assert checksums({**tree, "key": jax.random.key(2)})["['key']"] != base["['key']"]


def test_batch_must_split_over_devices(tiny_config):
  with tiny_config.unlocked():
    tiny_config.grad_accum_steps = 3
  with pytest.raises(UserError, match="batch_size 8 does not split over 1 devices x 3"):
    loop.compile_steps(make_task(tiny_config), tiny_config, parallel.data_mesh())


def test_a_process_places_the_rows_of_the_batch_it_built():
  """One process holds every row; a process of a multi-process run builds and places only its devices' rows (the
  two-process run in test_distributed.py trains as one process)."""
  mesh = parallel.data_mesh()
  assert parallel.process_rows(8, mesh) == slice(0, 8)
  batch = {"x": np.arange(16).reshape(8, 2), "y": np.arange(8)}
  placed = parallel.shard_batch(batch, mesh, 8)
  for name in batch:
    assert placed[name].shape == batch[name].shape and placed[name].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(placed[name], batch[name])
  with pytest.raises(ValueError, match="got 3 rows; this process holds rows 0..8 of 8"):
    parallel.shard_batch({"x": np.zeros((3, 2))}, mesh, 8)


SHARDED_SCRIPT = r"""
import sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from aigc_jax import config as config_lib
from aigc_jax.tasks import make_task
from aigc_jax.train import loop, parallel
from aigc_jax.train.checkpoint import checksums
assert jax.device_count() == 8, jax.devices()
config = config_lib.load_config({config!r}, {overrides!r} + ["batch_size=16"])
task = make_task(config)
final = []
for mesh in (parallel.data_mesh(), jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                                                 axis_types=(jax.sharding.AxisType.Auto,))):
  steps = loop.compile_steps(task, config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  for step in range(3):
    state, metrics = steps.train(state, parallel.shard_batch(task.train_batch(step), mesh))
  if mesh.devices.size == 8:  # parameters and optimizer state replicated on all eight
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state))
    assert checksums(state) == checksums(jax.device_get(state))  # what a checkpoint keeps: the same on one device
    spread = jax.device_put(np.arange(40.0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert checksums(spread) == checksums(np.arange(40.0)) != checksums(np.arange(40.0)[::-1])
  final.append((jax.device_get(state), float(metrics["loss"][0])))
for x, y in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1])):
  np.testing.assert_allclose(x, y, rtol={rtol}, atol={atol})
print("sharded == single", final[0][1], final[1][1])
"""

IMAGE_TINY = ["num_train_steps=3", "eval_every_steps=3", "checkpoint_every_steps=3", "log_every_steps=1"]


@pytest.mark.parametrize("family", ["gpt", "dcgan_wgan_gp", "ddpm"])
def test_sharded_step_on_8_devices_matches_one_device(family, text_file):
  """The whole state (parameters, both GAN optimizers, the EMA) after 3 steps over 8 devices equals 1 device's."""
  configs = {
      "gpt": (CPU_CONFIG, tiny_overrides(text_file), 2e-5, 2e-6),
      # Adam's eps of 1 keeps its update smooth in the gradient. With the default 1e-8 its first updates are
      # lr * sign(g), so an entry of ~1e-9 whose sign differs with the summation order (8 devices or 1) moves a
      # parameter by 2 lr, as one critic bias entry of 8 did (0.0041 vs 0.0039 after 3 steps).
      "dcgan_wgan_gp": (os.path.join(ROOT, "configs", "gan_mnist.py"),
                        IMAGE_TINY + ["model.conv_features=8", "model.loss=wgan_gp", "model.d_steps=2",
                                      "optim.generator.eps=1.0", "optim.discriminator.eps=1.0"], 1e-4, 1e-5),
      "ddpm": (os.path.join(ROOT, "configs", "ddpm_mnist.py"),
               IMAGE_TINY + TINY_UNET, 1e-4, 1e-5),
  }
  config, overrides, rtol, atol = configs[family]
  script = SHARDED_SCRIPT.format(tests=os.path.join(ROOT, "tests"), config=config, overrides=overrides,
                                 rtol=rtol, atol=atol)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "sharded == single" in out.stdout


def test_train_step_runs_flash_kernels_per_batch_shard(text_file):
  """The loop traces its steps under its mesh, so `flash` attention runs inside shard_map; the step equals xla's."""
  losses = {}
  for attention in ("flash", "xla"):
    config = config_lib.load_config(CPU_CONFIG, tiny_overrides(text_file) + [f"model.attention={attention}"])
    task, mesh = make_task(config), parallel.data_mesh()
    steps = loop.compile_steps(task, config, mesh)
    state = steps.init(jax.random.PRNGKey(0))
    batch = parallel.shard_batch(task.train_batch(0), mesh)
    shard_maps = str(steps.train.trace(state, batch).jaxpr).count("shard_map")
    assert shard_maps == (4 if attention == "flash" else 0)  # 2 layers, forward and backward
    _, metrics = steps.train(state, batch)
    losses[attention] = float(metrics["loss"][0])  # (sum, count) over the batch
  assert losses["flash"] == pytest.approx(losses["xla"], rel=1e-5)


def test_zero_steps_on_a_new_run_evaluates_the_initial_model(tiny_config, tmp_path):
  tiny_config.num_train_steps = 0
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)  # what a run on another corpus, stopped before its first checkpoint, left behind
  CharVocab.from_text("0123456789").save(os.path.join(workdir, "vocab.json"))
  result = loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
  assert set(result) == {"train_loss", "val_loss"} and result["val_loss"] == pytest.approx(np.log(len(set(TEXT))), abs=0.2)  # near uniform
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and Checkpointer(workdir).latest_step() is None
  assert CharVocab.load(os.path.join(workdir, "vocab.json")).chars == "".join(sorted(set(TEXT)))  # this run's corpus


def test_profile_traces_the_steps_after_the_compiling_one_into_tensorboard(tiny_config, tmp_path):
  import glob
  import gzip
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir, show_progress=False, profile_steps=2)
  [trace] = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.trace.json.gz"))
  assert glob.glob(os.path.join(os.path.dirname(trace), "*.xplane.pb"))  # what TensorBoard's Profile tab reads
  with gzip.open(trace) as f:
    events = json.load(f)["traceEvents"]
  assert sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train") == [1, 2]
  assert any(e.get("name") == "PjitFunction(train_step)" for e in events)


def test_a_task_of_your_own_trains_resumes_and_samples_on_the_spine(tmp_path, monkeypatch):
  """A model outside the zoo: a Task subclass, registered under its model.name, gets the loop, checkpoints and
  resume, as the families do."""
  import flax.linen as nn
  import ml_collections

  from aigc_jax import tasks
  from aigc_jax.sample import load_trained
  from aigc_jax.tasks.base import Task

  data = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
  targets = data @ np.array([1.0, -2.0, 0.5], np.float32)

  class Regression(Task):
    units = "examples"

    def __init__(self, config, workdir=None):
      super().__init__(config)
      self.model, self.units_per_batch = nn.Dense(1), config.batch_size

    def init_params(self, rng):
      return self.model.init(rng, jnp.zeros((1, 3)))["params"]

    def loss(self, params, batch, rng, train):
      err = (self.model.apply({"params": params}, batch["x"])[:, 0] - batch["y"]) ** 2
      return jnp.sum(err), jnp.asarray(err.size, jnp.float32), {}

    def train_batch(self, step):
      rows = np.arange(step * 16, step * 16 + 16) % 64
      return {"x": data[rows], "y": targets[rows]}

    def eval_batches(self):
      return {"validation": [{"x": data, "y": targets}]}

  monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))  # the registry as it was, after the test
  assert tasks.register_task("regression", Regression) is Regression
  config = ml_collections.ConfigDict(dict(
      seed=0, num_train_steps=40, batch_size=16, grad_accum_steps=1, log_every_steps=20, eval_every_steps=20,
      eval_batches=1, checkpoint_every_steps=20, keep_checkpoints=2, model=dict(name="regression"),
      optim=dict(learning_rate=0.1, min_learning_rate=0.0, warmup_steps=0, b1=0.9, b2=0.99, eps=1e-8,
                 weight_decay=0.0, grad_clip=0.0)))
  workdir = str(tmp_path / "run")
  first = loop.train_and_evaluate(config, workdir, show_progress=False)
  config.num_train_steps = 80
  resumed = loop.train_and_evaluate(config, workdir, show_progress=False)
  initial = float(np.mean(targets ** 2))  # the zero-initialised bias and a small kernel start near predicting 0
  assert resumed["val_loss"] < first["val_loss"] / 2 < initial / 8, (first, resumed, initial)
  task, params, step = load_trained(workdir)
  assert isinstance(task, Regression) and step == 80
  total, count, _ = task.loss(params, task.eval_batches()["validation"][0], None, train=False)
  assert float(total / count) == pytest.approx(resumed["val_loss"], rel=1e-6)  # what sampling loads is what trained

  with pytest.raises(UserError, match="model.name 'regression' is already Regression's; register Other under"):
    tasks.register_task("regression", type("Other", (Task,), {}))
  with pytest.raises(UserError, match="takes a subclass of aigc_jax.tasks.base.Task"):
    tasks.register_task("dense", nn.Dense)


def test_a_stop_request_saves_the_step_in_flight_and_the_run_resumes_as_if_never_stopped(tmp_path, text_file):
  """SIGTERM (a preemption) and a first Ctrl-C stop the run after the step in flight, with a checkpoint of it,
  though checkpoints are due only at the end: no step is lost."""
  import signal
  import time
  workdir = str(tmp_path / "run")
  constant = tiny_overrides(text_file) + ["optim.min_learning_rate=0.001"]  # after warm-up: whatever the run's length
  overrides = [f"--config.{o}" for o in constant] + [
      "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000"]
  metrics = os.path.join(workdir, "metrics.jsonl")
  stopped_at = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    logged = len(open(metrics).readlines()) if os.path.exists(metrics) else 0
    run = subprocess.Popen([sys.executable, "-m", "aigc_jax.cli", "train", "--config", CPU_CONFIG, "--workdir",
                            workdir, *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= logged + 3) and time.time() < deadline:
      time.sleep(0.2)  # until the loop runs steps
    run.send_signal(sig)
    _, err = run.communicate(timeout=300)
    step = int(err.split("stopped at step ")[-1].split()[0])
    assert run.returncode == 128 + sig and err.splitlines()[-1] == (
        f"aigc-jax: stopped at step {step} by {sig.name}, after saving a checkpoint there; run the same command "
        f"again to resume from it."), err[-3000:]
    assert Checkpointer(workdir).latest_step() == step
    stopped_at.append(step)
  assert stopped_at[0] < stopped_at[1]  # the second run resumed from the first one's stop

  end = stopped_at[1] + 2
  config = config_lib.load_config(CPU_CONFIG, constant + [f"num_train_steps={end}"])
  resumed = loop.train_and_evaluate(config, workdir, show_progress=False)
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"), show_progress=False)
  assert resumed == pytest.approx(straight, rel=1e-6)
