"""The command line end to end, on shrunk configs: train, resume, sample, and bad input."""

import json
import os

import pytest

from aigc_jax import cli
from aigc_jax.nn import attention
from conftest import CPU_CONFIG, ROOT, tiny_overrides


def run(argv, capsys):
  code = cli.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


CONFIGS = {"transformer": CPU_CONFIG, "lstm": os.path.join(ROOT, "configs", "lstm_shakespeare_char.py")}


def train_args(workdir, text_file, model="transformer", extra=()):
  overrides = [f"--config.{o}" for o in tiny_overrides(text_file, model)]
  return ["train", "--config", CONFIGS[model], "--workdir", workdir] + overrides + list(extra)


@pytest.mark.parametrize("model", CONFIGS)
def test_train_resume_and_sample(model, tmp_path, text_file, capsys):
  workdir = str(tmp_path / "run")
  attention._log_choice.cache_clear()  # logged once per process and shape class
  code, out, err = run(train_args(workdir, text_file, model, ["--config.num_train_steps=3"]), capsys)
  assert code == 0, err
  assert "val_loss" in out and "--- sample (step_000003.txt) ---" in out
  assert f"{model}: " in err and "parameters, 1 devices, steps 0..3" in err  # INFO lines reach the log
  if model == "transformer":
    assert "attention implementation 'auto' chose 'xla' (backend cpu, float32" in err
  code, out, err = run(train_args(workdir, text_file, model), capsys)  # resumes at 3, trains to 6
  assert code == 0, err
  assert "step 6: train_loss" in out and "step 3: " not in out and "resumed from step 3" in err
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_000003.txt", "step_000006.txt"]

  code, out, err = run(["sample", "--workdir", workdir, "--prompt", "First", "--num-samples", "2",
                        "--max-new-tokens", "12", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"], capsys)
  assert code == 0, err
  samples = out.split("--- sample ")[1:]
  assert len(samples) == 2 and all(s.split("---\n", 1)[1].startswith("First") for s in samples)
  texts = [s.split("---\n", 1)[1] for s in samples]
  assert all(t.endswith("\n") and len(t[:-1]) == 5 + 12 for t in texts)  # print's newline; a sample may end in one

  code, out, err = run(["sample", "--workdir", workdir, "--prompt", "Fir", "--beams", "3", "--num-samples", "3",
                        "--max-new-tokens", "4"], capsys)
  assert code == 0, err
  assert out.count("--- sample ") == 3


@pytest.mark.parametrize("argv, message", [
    (["--config.num_train_stepz=5"], "aigc-jax: Unknown config key 'num_train_stepz'"),
    (["--config.data.source=text_file:/no/such.txt"], "aigc-jax: Text file '/no/such.txt' does not exist"),
    (["--config.data.source=s3://bucket"], "aigc-jax: Unknown data.source 's3://bucket'"),
    (["--config.model.name=mamba"], "aigc-jax: Unknown model.name 'mamba'"),
    (["--config.model.attention=flashy"], "aigc-jax: Unknown attention implementation 'flashy'"),
    (["--config.model.position_encoding=alibi"], "aigc-jax: Unknown position_encoding 'alibi'; use one of learned"),
    (["--config.sample.prompt=QZX"], "aigc-jax: sample.prompt has characters outside the vocabulary of "
                                     "text_file:"),  # was found at the first evaluation, steps into the run
    (["--steps=5"], "aigc-jax: unknown argument '--steps=5'"),
    (["--config.eval_batches", "2"], "aigc-jax: unknown argument '2'; write the override as "
                                     "--config.eval_batches=VALUE, with '='."),
])
def test_bad_train_input_is_one_sentence(argv, message, tmp_path, text_file, capsys):
  code, _, err = run(train_args(str(tmp_path / "run"), text_file) + argv, capsys)
  assert code == 2
  assert message in err and "Traceback" not in err
  assert len(err.strip().splitlines()[-1]) > 0 and err.strip().splitlines()[-1].startswith("aigc-jax: ")


def test_profile_needs_a_step_count(tmp_path, text_file, capsys):
  with pytest.raises(SystemExit) as stop:  # argparse's usage error
    cli.main(train_args(str(tmp_path / "run"), text_file) + ["--profile", "0"])
  assert stop.value.code == 2 and "argument --profile: '0' is not a whole number >= 1" in capsys.readouterr().err


def test_gpt_runs_saved_before_position_encoding_existed_sample_with_the_learned_table(tmp_path, text_file, capsys):
  workdir = str(tmp_path / "run")
  extra = ["--config.num_train_steps=2", "--config.model.position_encoding=learned"]
  assert run(train_args(workdir, text_file, extra=extra), capsys)[0] == 0
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  del config["model"]["position_encoding"]  # as runs saved before the key was added
  with open(path, "w") as f:
    json.dump(config, f)
  code, out, err = run(["sample", "--workdir", workdir, "--prompt", "Fir", "--max-new-tokens", "5", "--temperature",
                        "0"], capsys)
  assert code == 0, err
  assert out.split("---\n", 1)[1].startswith("Fir")


def test_bad_sample_input_is_one_sentence(tmp_path, text_file, capsys):
  code, _, err = run(["sample", "--workdir", str(tmp_path / "nothing")], capsys)
  assert code == 2 and "holds no trained run" in err
  workdir = str(tmp_path / "run")
  assert run(train_args(workdir, text_file, extra=["--config.num_train_steps=3"]), capsys)[0] == 0
  code, _, err = run(["sample", "--workdir", workdir, "--prompt", "Zebra~"], capsys)
  assert code == 2 and "outside the model's vocabulary ('Zb~')" in err
  code, _, err = run(["sample", "--workdir", workdir, "--prompt", ""], capsys)
  assert code == 2 and "prompt is empty" in err
  with pytest.raises(SystemExit) as stop:  # argparse's usage error
    cli.main(["sample", "--workdir", workdir, "--beams", "0"])
  assert stop.value.code == 2 and "argument --beams: '0' is not a whole number >= 1" in capsys.readouterr().err
  vocab = os.path.join(workdir, "vocab.json")
  with open(vocab) as f:
    saved = f.read()
  with open(vocab, "w") as f:
    f.write("{")
  code, _, err = run(["sample", "--workdir", workdir], capsys)
  assert code == 2 and err == (f"aigc-jax: The vocabulary {vocab} cannot be read (JSONDecodeError); delete it to "
                               f"have `train` rebuild it from the run's data.source (the same corpus gives the same "
                               f"vocabulary).\n")
  os.remove(vocab)  # as the message says: train rebuilds it, and the run samples again
  assert run(train_args(workdir, text_file, extra=["--config.num_train_steps=3"]), capsys)[0] == 0
  with open(vocab) as f:
    assert f.read() == saved
  code, _, err = run(train_args(vocab, text_file), capsys)
  assert code == 2 and f"--workdir {vocab} is a file; name a folder" in err
  code, _, err = run(["sample", "--workdir", workdir, "--beams", "2", "--max-new-tokens", "40"], capsys)
  assert code == 2 and "ask for at most 16 new tokens" in err
  for bad in (["--temperature", "-1"], ["--top-p", "0"]):
    code, _, err = run(["sample", "--workdir", workdir] + bad, capsys)
    assert code == 2 and "Use --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1." in err, bad
  with pytest.raises(SystemExit) as stop:  # argparse's usage error
    cli.main(["sample", "--workdir", workdir, "--temperature", "nan"])
  assert stop.value.code == 2 and "argument --temperature: 'nan' is not a finite number" in capsys.readouterr().err
  code, _, err = run(["sample", "--workdir", workdir, "--config.model.num_layers=2"], capsys)
  assert code == 2 and err == (f"aigc-jax: --config.model.num_layers cannot change here: the trained model is fixed "
                               f"by {workdir}/config.json; override only eval.*, sample.* settings.\n")
  code, _, err = run(["sample", "--workdir", workdir, "--config.sample.top_p=5.0"], capsys)
  assert code == 2 and "'sample.top_p' is 5.0 and must be above 0 and at most 1" in err


def test_text_samples_default_to_the_runs_sample_settings(tmp_path, text_file, capsys):
  workdir = str(tmp_path / "run")
  assert run(train_args(workdir, text_file, extra=["--config.num_train_steps=1", "--config.sample.temperature=0.0"]),
             capsys)[0] == 0

  def text(*argv):
    code, out, err = run(["sample", "--workdir", workdir, "--max-new-tokens", "12", *argv], capsys)
    assert code == 0, err
    return out

  config_path = os.path.join(workdir, "config.json")
  with open(config_path) as f:
    saved = json.load(f)
  saved["keep_checkpoints"] = 0  # a value today's rules refuse, in a setting sampling does not read
  with open(config_path, "w") as f:
    json.dump(saved, f)
  greedy = text("--seed", "0")  # the run still samples: only the sample.* and eval.* settings are checked
  assert text("--seed", "1") == greedy  # the run's temperature 0: greedy, whatever the seed
  assert text("--seed", "1", "--config.sample.temperature=1.0") != text("--seed", "2", "--temperature", "1")
  assert text("--seed", "1", "--config.sample.temperature=1.0") == text("--seed", "1", "--temperature", "1")


def test_an_interrupted_command_says_how_to_go_on(monkeypatch, capsys):
  from benchmarks import attention as bench_attention

  def stop(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(bench_attention, "run", stop)
  code, _, err = run(["bench", "attention", "--quick"], capsys)
  assert (code, err) == (130, "aigc-jax: interrupted; run the same command with --resume to measure only the cells "
                              "still missing.\n")
  monkeypatch.setattr(cli, "_train", stop)
  code, _, err = run(["train", "--config", CPU_CONFIG, "--workdir", "unused"], capsys)
  assert (code, err) == (130, "aigc-jax: interrupted; run the same command again to resume from the last "
                              "checkpoint.\n")
  monkeypatch.setattr(cli, "_sample", stop)  # nothing to resume
  assert run(["sample", "--workdir", "unused"], capsys)[:3:2] == (130, "aigc-jax: interrupted.\n")


def test_a_start_that_fails_leaves_the_run_as_it_was(tmp_path, capsys):
  """A resume with a changed model, or a corpus that has gone, is refused in one sentence without touching the
  run's config.json; sampling needs only the run's vocabulary, not its corpus."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("to be or not to be, that is the question\n" * 40)
  workdir = str(tmp_path / "run")
  assert run(train_args(workdir, str(corpus), extra=["--config.num_train_steps=3"]), capsys)[0] == 0
  config_path = os.path.join(workdir, "config.json")
  saved = open(config_path).read()

  changed_model = ["--config.num_train_steps=3", "--config.model.emb_dim=64"]
  code, _, err = run(train_args(workdir, str(corpus), extra=changed_model), capsys)
  assert code == 2 and ("aigc-jax: The checkpoints in " in err and "were written with a different config "
                        "(model.emb_dim changed since the run's config.json); resume with the run's own settings, "
                        "or train in a new --workdir." in err), err
  code, _, err = run(train_args(workdir, str(tmp_path / "other.txt")), capsys)  # other data for the rest of it
  assert code == 2 and "(data.source changed since the run's config.json); resume with the run's own" in err
  assert open(config_path).read() == saved

  corpus.unlink()
  code, _, err = run(train_args(workdir, str(corpus)), capsys)
  assert code == 2 and "corpus.txt' does not exist" in err
  assert open(config_path).read() == saved
  code, out, err = run(["sample", "--workdir", workdir, "--max-new-tokens", "5"], capsys)
  assert code == 0, err
  assert len(out.strip()) > 0


def test_a_resume_may_change_how_long_and_how_fast_but_says_what_changed(tmp_path, text_file, capsys):
  workdir = str(tmp_path / "run")
  assert run(train_args(workdir, text_file, extra=["--config.num_train_steps=3"]), capsys)[0] == 0
  # Half the batch at a time (a run moved to a device with less memory) is the same step: it may change too.
  longer = ["--config.num_train_steps=5", "--config.optim.learning_rate=0.0005", "--config.grad_accum_steps=2"]
  code, _, err = run(train_args(workdir, text_file, extra=longer), capsys)
  assert code == 0 and ("resuming with grad_accum_steps, num_train_steps, optim.learning_rate changed since the "
                        "run's config.json") in err
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert (saved["num_train_steps"], saved["optim"]["learning_rate"], saved["grad_accum_steps"]) == (5, 0.0005, 2)
  code, _, err = run(train_args(workdir, text_file, extra=["--config.num_train_steps=5", "--config.seed=1"]), capsys)
  assert code == 2 and "(seed changed since the run's config.json)" in err
  for finished in (["--config.num_train_steps=2"], ["--config.num_train_steps=5", "--config.optim.learning_rate=0.1"]):
    assert run(train_args(workdir, text_file, extra=longer[1:] + finished), capsys)[0] == 0
    with open(os.path.join(workdir, "config.json")) as f:
      assert json.load(f) == saved  # at or past num_train_steps: evaluated as it is, its config kept
  del saved["model"]["mlp_ratio"]  # as in a run saved before a key was added to the configs (the same value)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  code, _, err = run(train_args(workdir, text_file, extra=["--config.num_train_steps=6"] + longer[1:]), capsys)
  assert code == 0, err  # a key the saved config lacks is left to the restore, which takes the checkpoint


def test_a_damaged_checkpoint_ends_the_command_on_its_one_sentence(tmp_path, text_file, capsys):
  """Orbax abandons its other reads when one fails; their tracebacks used to follow the message, pages of them."""
  import glob
  import subprocess
  import sys
  workdir = str(tmp_path / "run")
  assert run(train_args(workdir, text_file, extra=["--config.num_train_steps=2"]), capsys)[0] == 0
  for path in glob.glob(os.path.join(workdir, "checkpoints", "2", "state", "ocdbt.process_0", "d", "*")):
    with open(path, "wb") as f:
      f.write(b"garbage")
  done = subprocess.run([sys.executable, "-m", "aigc_jax.cli", "sample", "--workdir", workdir], capture_output=True,
                        text=True, timeout=300)
  message = (f"aigc-jax: The checkpoint at step 2 in {os.path.join(workdir, 'checkpoints')} could not be read "
             f"(Exception); it is the run's only checkpoint: delete {os.path.join(workdir, 'checkpoints', '2')} to "
             f"start the run over from step 0.")
  assert done.returncode == 2 and done.stderr.splitlines()[-1] == message, done.stderr[-3000:]
  # Resumed with a longer schedule and another learning rate (changes a resume may make), it is still the damage
  # that is named, not the learning rate (the arrays' layout is the config's). In a process of its own too: the
  # reads Orbax abandons run on in background threads, which in this test process raced pytest's own parsing of
  # later imports (CPython 3.11: "AST constructor recursion depth mismatch").
  done = subprocess.run([sys.executable, "-m", "aigc_jax.cli",
                         *train_args(workdir, text_file, extra=["--config.num_train_steps=4",
                                                                "--config.optim.learning_rate=3e-4"])],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and done.stderr.splitlines()[-1] == message, done.stderr[-3000:]
