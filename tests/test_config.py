import contextlib
import glob
import os
import re

import jax
import pytest
import tensorflow_datasets as tfds

from aigc_jax import config as config_lib
from aigc_jax.errors import UserError
from aigc_jax.tasks import make_task
from conftest import CPU_CONFIG, ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_parses_and_builds(path, text_file):
  base = config_lib.load_config(path)
  text = "seq_len" in base.data  # image configs run on their embedded default data, except TFDS ones
  overrides = [f"data.source=text_file:{text_file}", "data.seq_len=16"] if text else []
  with contextlib.ExitStack() as stack:
    if base.data.source.startswith("tfds:"):  # CIFAR-10: TFDS mocked with random images of the real shapes
      stack.enter_context(tfds.testing.mock_data(num_examples=4))
    config = config_lib.load_config(path, overrides)
    assert config.num_train_steps > 0 and config.batch_size > 0
    for key in ("seed", "eval_every_steps", "checkpoint_every_steps", "data.source"):
      assert key.split(".")[-1] in (config.data if key.startswith("data.") else config)
    task = make_task(config)
  params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  assert jax.tree.leaves(params)
  assert config.__class__.__name__ == "ConfigDict" and config.is_locked


def test_override_parses_value_by_field_type():
  config = config_lib.load_config(CPU_CONFIG, ["batch_size=24", "optim.learning_rate=3e-4", "model.use_bias=True",
                                               "data.source=text_file:/x y.txt", "optim.b2=0"])
  assert config.batch_size == 24
  assert config.optim.learning_rate == 3e-4
  assert config.model.use_bias is True
  assert config.data.source == "text_file:/x y.txt"
  assert config.optim.b2 == 0.0 and isinstance(config.optim.b2, float)


@pytest.mark.parametrize("override, message", [
    ("num_train_stepz=3", "Unknown config key 'num_train_stepz'"),
    ("model.widht=3", "Unknown config key 'model.widht'"),
    ("optimizer.lr=3", "Unknown config key 'optimizer'"),
    ("batch_size=big", "Config key 'batch_size' takes a int"),
    ("model.use_bias=1", "Config key 'model.use_bias' takes a bool"),
    ("batch_size", "has no '='"),
    ("num_train_steps=True", "Config key 'num_train_steps' takes a int, not 'True'"),
    ("model=5", r"Config key 'model' is a group of settings; set one of them, like --config.model.\w+=VALUE."),
    ("keep_checkpoints=0", r"'keep_checkpoints' is 0 and must be at least 1 \(the run resumes from the latest\)"),
    ("checkpoint_every_steps=0", "'checkpoint_every_steps' is 0 and must be at least 1; set"),
    ("eval_every_steps=0", "'eval_every_steps' is 0 and must be at least 1"),
    ("log_every_steps=-1", "'log_every_steps' is -1 and must be at least 1"),
    ("grad_accum_steps=0", "'grad_accum_steps' is 0 and must be at least 1"),
    ("batch_size=0", "'batch_size' is 0 and must be at least 1"),
    ("data.seq_len=0", "'data.seq_len' is 0 and must be at least 1"),
    ("data.val_fraction=1.5", r"'data.val_fraction' is 1.5 and must be between 0 and 1; set --config.data.val_"),
])
def test_bad_override_is_one_clear_sentence(override, message):
  with pytest.raises(UserError, match=message):
    config_lib.load_config(CPU_CONFIG, [override])


@pytest.mark.parametrize("name, override, message", [
    # values that used to pass the checks and then crash (a traceback) or train nonsense
    ("gpt_shakespeare_char_cpu", "model.dtype=bf16", "'model.dtype' is 'bf16' and must be one of float32, bfloat16, "
                                                     "float16; set --config.model.dtype=VALUE."),
    ("gpt_shakespeare_char_cpu", "model.num_layers=0", "'model.num_layers' is 0 and must be at least 1"),
    ("gpt_shakespeare_char_cpu", "optim.learning_rate=-1.0", "'optim.learning_rate' is -1.0 and must be above 0"),
    ("gpt_shakespeare_char_cpu", "sample.temperature=-1.0", "'sample.temperature' is -1.0 and must be 0 or more"),
    ("gpt_shakespeare_char_cpu", "sample.top_p=5.0", "'sample.top_p' is 5.0 and must be above 0 and at most 1"),
    ("gpt_shakespeare_char_cpu", "model.dropout_rate=1.0", "'model.dropout_rate' is 1.0 and must be at least 0 and "
                                                           "below 1"),
    ("gan_mnist", "model.d_steps=0", "'model.d_steps' is 0 and must be at least 1"),
    ("gan_mnist", "optim.generator.learning_rate=0.0", "'optim.generator.learning_rate' is 0.0 and must be above 0"),
    ("gan_mlp_mnist", "sample.num_samples=0", "'sample.num_samples' is 0 and must be at least 1"),
    ("gan_mlp_mnist", "model.latent_dim=0", "'model.latent_dim' is 0 and must be at least 1"),
    ("ddpm_mnist", "sample.steps=0", "'sample.steps' is 0 and must be at least 1"),
    ("ddpm_mnist", "ema_decay=1.0", "'ema_decay' is 1.0 and must be at least 0 and below 1"),
    ("ddpm_mnist", "sample.guidance=1e999", "'sample.guidance' is inf and must be a finite number"),
    ("ddpm_mnist", "data.channels=0", "'data.channels' is 0 and must be at least 1"),
    # tuples of widths: every entry is checked (these used to blame attention_resolutions, divide by zero, or train)
    ("ddpm_mnist", "model.channel_mults=(1, 0)", "'model.channel_mults' is (1, 0) and its entries must be whole "
                                                  "numbers of at least 1; set --config.model.channel_mults=(VALUE, "
                                                  "...)."),
    ("ddpm_mnist", "model.channel_mults=()", "'model.channel_mults' is empty and needs at least one entry; set "
                                             "--config.model.channel_mults=(VALUE,)."),
    ("ddpm_mnist", "model.attention_resolutions=(7, 0)", "'model.attention_resolutions' is (7, 0) and its entries"),
    ("vae_mnist", "model.features=(0, 64)", "'model.features' is (0, 64) and its entries must be whole numbers"),
    ("vae_mnist", "model.features=(32.5, 64)", "'model.features' is (32.5, 64) and its entries must be whole"),
    ("gan_mnist", "model.mlp_features=(-1, 5)", "'model.mlp_features' is (-1, 5) and its entries must be whole"),
])
def test_values_that_cannot_work_are_refused_when_the_config_loads(name, override, message):
  with pytest.raises(UserError, match=re.escape(message)):
    config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"), [override])


def test_values_at_the_edges_of_the_ranges_load():
  # negative guidance steers away from the label (as --guidance allows); no attention is a valid UNet
  overrides = ["sample.guidance=-1.0", "model.attention_resolutions=()", "model.channel_mults=(1,)"]
  config = config_lib.load_config(os.path.join(ROOT, "configs", "ddpm_mnist.py"), overrides)
  assert (config.sample.guidance, config.model.attention_resolutions, config.model.channel_mults) == (-1.0, (), (1,))


@pytest.mark.parametrize("name, override, message", [
    ("vae_mnist", "model.likelihood=normal", "Unknown model.likelihood 'normal'; use one of bernoulli, gaussian."),
    ("ddpm_mnist", "sample.steps=2000", "sample.steps is 2000 and the model has 1000 diffusion steps; set "
                                        "--config.sample.steps between 1 and 1000."),
    ("ddpm_mnist", "sample.guidance_interval=(0.5, 2.0)", "The guidance interval (0.5, 2) is not within the timestep "
                                                          "fractions 0..1; use --config.sample.guidance_interval=(LO, "
                                                          "HI) with 0 <= LO <= HI <= 1."),
])
def test_settings_a_model_cannot_take_are_refused_before_training(name, override, message):
  config = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"), [override])
  with pytest.raises(UserError, match=re.escape(message)):
    make_task(config)


@pytest.mark.parametrize("text, message", [
    (None, "is not a Python file; pass one of the .py files in configs/"),
    ("def get_config(:\n", r"failed to load \(SyntaxError: .*\); fix it, or start from a file in configs/"),
    ("import no_such_module\n", r"failed to load \(ModuleNotFoundError: No module named 'no_such_module'\); fix it"),
    ("def get_config():\n  return 5\n", "defines no get_config.. returning an ml_collections.ConfigDict"),
    ("x = 1\n", "defines no get_config.. returning an ml_collections.ConfigDict"),
])
def test_a_config_file_that_is_not_one_is_one_sentence(text, message, tmp_path):
  path = tmp_path / ("notes.md" if text is None else "broken.py")
  path.write_text(text or "# notes\n")
  with pytest.raises(UserError, match=message):
    config_lib.load_config(str(path))


def test_missing_config_file():
  with pytest.raises(UserError, match="does not exist"):
    config_lib.load_config("configs/nope.py")


def test_config_round_trips_through_json():
  config = config_lib.load_config(CPU_CONFIG)
  assert config_lib.from_json(config_lib.to_json(config)).to_dict() == config.to_dict()
