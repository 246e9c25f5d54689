"""Multi-process training: `aigc-jax train` on two processes of one CPU device each, joined over TCP as hosts of
a cluster are, trains exactly as one process with two devices, writes the workdir once, and resumes."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import CPU_CONFIG, tiny_overrides


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int = 1) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _start(workdir, text_file, steps, *, processes: int = 1, every: int = 2):
  """Starts `aigc-jax train` as `processes` processes of one device each (one process of two devices when 1)."""
  argv = [sys.executable, "-m", "aigc_jax.cli", "train", "--config", CPU_CONFIG, "--workdir", workdir,
          *[f"--config.{o}" for o in tiny_overrides(text_file)], f"--config.num_train_steps={steps}",
          f"--config.eval_every_steps={every}", f"--config.checkpoint_every_steps={every}"]
  if processes == 1:
    return [subprocess.Popen(argv, env=_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  joined = ["--coordinator", f"localhost:{_free_port()}", "--num-processes", str(processes)]
  return [subprocess.Popen(argv + joined + ["--process-id", str(i)], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(processes)]


def _train(workdir, text_file, steps, *, processes: int = 1, returncode: int = 0, every: int = 2):
  """Runs `_start`'s processes to their end; returns each one's (stdout, stderr)."""
  runs = _start(workdir, text_file, steps, processes=processes, every=every)
  outputs = [run.communicate(timeout=400) for run in runs]
  for run, (_, err) in zip(runs, outputs):
    assert run.returncode == returncode, err[-3000:]
  # Gloo (the CPU collectives) prints its connection on stdout, from C++.
  return [("".join(line for line in out.splitlines(True) if not line.startswith("[Gloo] ")), err)
          for out, err in outputs]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  drop = ("tokens_per_sec", "ms_per_step")  # wall-clock throughput differs from run to run
  return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def test_two_processes_train_and_resume_as_one_process_with_two_devices(tmp_path, text_file):
  one, two = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
  [(out, err)] = _train(one, text_file, 4)
  assert "2 devices, steps 0..4" in err
  first = _train(two, text_file, 2, processes=2)
  assert "2 devices, steps 0..2" in first[0][1]
  assert "parameters" not in first[1][1] and "step 2:" not in first[1][0]  # process 1 does not repeat process 0
  (out0, err0), (out1, _) = _train(two, text_file, 4, processes=2)  # resumes at 2 and trains to 4
  assert "resumed from step 2" in err0 and out1.strip() == ""
  assert out0.splitlines()[-3:] == out.splitlines()[-3:]  # the last evaluation and the sample: the same text

  expected, got = _metrics(one), _metrics(two)
  assert [line["step"] for line in got] == [1, 2, 2, 3, 4, 4]  # each line once: only process 0 writes
  assert [line.keys() for line in got] == [line.keys() for line in expected]
  for a, b in zip(got, expected):
    assert a == pytest.approx(b, rel=1e-5), (a, b)
  for name in ("config.json", "vocab.json", "samples/step_000002.txt", "samples/step_000004.txt"):
    with open(os.path.join(one, name)) as f, open(os.path.join(two, name)) as g:
      assert f.read() == g.read(), name
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # no other files, no partly written ones
  events = [n for n in os.listdir(os.path.join(two, "tensorboard")) if n.startswith("events.out.tfevents.")]
  assert len(events) == 2  # one per run (the first and the resume), both process 0's


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_preempted_process_stops_every_process_at_one_step_with_a_checkpoint(sig, tmp_path, text_file):
  """SIGTERM to one host (a preemption notice), or Ctrl-C, stops all of them after the same step, each saving its
  part of that step's checkpoint, though checkpoints were due only at the end: JAX's preemption sync picks it."""
  import signal
  import time
  sig = signal.Signals[sig]
  workdir = str(tmp_path / "run")
  runs = _start(workdir, text_file, 100000, processes=2, every=100000)
  metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 300
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3) and time.time() < deadline:
    time.sleep(0.2)  # until the loop runs steps
  runs[1].send_signal(sig)
  errs = [run.communicate(timeout=300)[1] for run in runs]
  last = [err.splitlines()[-1] for err in errs]
  step = int(last[0].split("stopped at step ")[1].split()[0])
  got = [signal.SIGTERM, sig]  # process 1 names what it got; process 0 learns of it as a preemption
  assert [run.returncode for run in runs] == [128 + s for s in got], errs[0][-2000:] + errs[1][-2000:]
  assert last == [f"aigc-jax: stopped at step {step} by {s.name}, after saving a checkpoint there; run the same "
                  f"command again to resume from it." for s in got]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(step)]


@pytest.mark.parametrize("argv, message", [
    (["--distributed"], "aigc-jax: Cannot join a multi-process run (coordinator_address should be defined.); on a "
                        "cluster JAX does not detect, pass --coordinator HOST:PORT --num-processes N --process-id I "
                        "(0 <= I < N) to every process."),
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
     "aigc-jax: Cannot join a multi-process run (process_id and num_processes must be nonnegative, with process_id < "
     "num_processes. Got process_id=2, num_processes=2.); on a cluster"),
])
def test_a_process_that_cannot_join_says_how_to_start_it(argv, message, tmp_path, text_file):
  done = subprocess.run([sys.executable, "-m", "aigc_jax.cli", "train", "--config", CPU_CONFIG, "--workdir",
                         str(tmp_path / "run"), *argv], env=_env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and done.stderr.splitlines()[-1].startswith(message), done.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")  # nothing started
