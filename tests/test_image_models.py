"""VAE and GAN on the shared spine, end to end on shrunk configs; the CPU-fast convolution."""

import functools
import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from aigc_jax import cli
from aigc_jax import evaluate as evaluate_lib
from aigc_jax.errors import UserError
from aigc_jax.evaluation import TrainHParams, get_classifier
from aigc_jax.models import gan as gan_lib
from aigc_jax.nn.conv import TAP_GRAD_MIN_FEATURES, Conv, upsample_nearest
from aigc_jax.sample import load_trained
from aigc_jax.train import loop, parallel
from aigc_jax.train.checkpoint import Checkpointer
from conftest import ROOT, TINY_UNET

CONFIGS = {name: os.path.join(ROOT, "configs", f"{name}.py") for name in ("vae_mnist", "gan_mnist", "gan_mlp_mnist")}
TINY = ["num_train_steps=4", "batch_size=8", "eval_every_steps=2", "checkpoint_every_steps=2", "log_every_steps=1",
        "eval_batches=1", "sample.num_samples=4", "eval.num_samples=8"]
TINY_MODELS = {
    "vae_mnist": ["model.latent_dim=4", "model.features=(8, 8)", "model.hidden_dim=16"],
    "gan_mnist": ["model.conv_features=8"],
    "gan_mlp_mnist": ["model.mlp_features=(16, 32)", "model.latent_dim=8"],
}


def run(argv, capsys):
  code = cli.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def train_args(config, workdir, extra=()):
  overrides = [f"--config.{o}" for o in TINY + TINY_MODELS[config]]
  return ["train", "--config", CONFIGS[config], "--workdir", workdir] + overrides + list(extra)


@pytest.mark.parametrize("features", [2, TAP_GRAD_MIN_FEATURES])  # XLA's kernel gradient, then ours on CPU
@pytest.mark.parametrize("stride, kernel", [(1, 3), (1, 4), (2, 4), (2, 3)])
def test_conv_matches_flax_conv_and_its_gradients(stride, kernel, features):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
  ours = Conv(features, (kernel, kernel), strides=(stride, stride))
  ref = nn.Conv(features, (kernel, kernel), strides=stride, padding="SAME")
  params = ref.init(jax.random.PRNGKey(0), x)
  grad = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_upsample_nearest_repeats_pixels():
  x = jnp.arange(4.0).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(upsample_nearest(x)[0, :, :, 0],
                                [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


def test_gradient_penalty_is_zero_for_a_unit_slope_critic():
  critic = lambda x: jnp.sum(x, axis=(1, 2, 3)) / np.sqrt(12.0)  # |grad| = 1 everywhere
  real, fake = jnp.ones((3, 2, 2, 3)), jnp.zeros((3, 2, 2, 3))
  np.testing.assert_allclose(gan_lib.gradient_penalty(critic, real, fake, jax.random.PRNGKey(0)), 0.0, atol=1e-4)
  doubled = lambda x: 2.0 * critic(x)  # |grad| = 2 -> weight * (2 - 1)^2
  np.testing.assert_allclose(gan_lib.gradient_penalty(doubled, real, fake, jax.random.PRNGKey(0)), 10.0, rtol=1e-4)
  # Data of any rank, as the paper's 2-D toy points: a linear critic's gradient is w at every interpolate.
  w = jnp.array([1.5, -0.8])
  real, fake = jnp.arange(8.0).reshape(4, 2), -jnp.ones((4, 2))
  expected = 10.0 * (np.linalg.norm([1.5, -0.8]) - 1.0) ** 2
  np.testing.assert_allclose(gan_lib.gradient_penalty(lambda x: x @ w, real, fake, jax.random.PRNGKey(0)),
                             [expected] * 4, rtol=1e-5)
  sequences = jnp.ones((4, 5, 2))  # [B, T, C]: the norm is over T and C, sqrt(10) for a summing critic
  np.testing.assert_allclose(gan_lib.gradient_penalty(lambda x: jnp.sum(x, axis=(1, 2)), sequences, 0 * sequences,
                                                      jax.random.PRNGKey(0)), [10.0 * (np.sqrt(10) - 1) ** 2] * 4,
                             rtol=1e-5)
  with pytest.raises(UserError, match=r"one \[B, \.\.\.\] shape; got \(4, 2\) and \(4, 3\)"):
    gan_lib.gradient_penalty(lambda x: x[:, 0], real, jnp.ones((4, 3)), jax.random.PRNGKey(0))
  # Where the gradient is taken: linear critics have the same gradient everywhere (the penalty at x_hat = real
  # passed the checks above). sum(x^2) has gradient 2 x_hat, at x_hat = eps real + (1 - eps) fake, eps per example.
  real, fake, key = jnp.arange(24.0).reshape(4, 3, 2) / 10, -jnp.ones((4, 3, 2)), jax.random.PRNGKey(3)
  eps = np.asarray(jax.random.uniform(key, (4, 1, 1)))
  x_hat = eps * np.asarray(real) + (1 - eps) * np.asarray(fake)
  want = 10.0 * (2 * np.linalg.norm(x_hat.reshape(4, -1), axis=1) - 1) ** 2
  np.testing.assert_allclose(gan_lib.gradient_penalty(lambda x: jnp.sum(x ** 2, axis=(1, 2)), real, fake, key), want,
                             rtol=1e-5)


def test_gan_shapes_that_do_not_fit_are_one_sentence(monkeypatch):
  with pytest.raises(UserError, match="Unknown GAN architecture 'dc'; use one of mlp, dcgan"):
    gan_lib.GANConfig(architecture="dc")
  with pytest.raises(UserError, match="The DCGAN halves image_size twice and it is 30; use a multiple of 4"):
    gan_lib.GANConfig(image_size=30)
  with pytest.raises(UserError, match=r"GroupNorm splits conv_features \(12\) into 8 groups; use a multiple of 8"):
    gan_lib.GANConfig(conv_features=12)
  assert gan_lib.GANConfig(architecture="mlp", image_size=30).image_size == 30  # the MLP GAN takes any size
  # One image or latent without its batch axis: the MLP discriminator gave one "logit" a row, the DCGAN's 7.
  for architecture in ("mlp", "dcgan"):
    config = gan_lib.GANConfig(architecture=architecture, latent_dim=4, conv_features=8, mlp_features=(8,))
    generator, discriminator = gan_lib.build_gan(config)
    with pytest.raises(UserError, match=r"The discriminator takes images of shape \[batch, 28, 28, 1\], not "
                                        r"\(28, 28, 1\); add the batch axis"):
      discriminator.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
    with pytest.raises(UserError, match=r"The generator takes latents of shape \[batch, 4\], not \(4,\); add the "
                                        r"batch axis"):
      generator.init(jax.random.key(0), jnp.zeros((4,)))
  from aigc_jax.models.vae import VAEConfig
  with pytest.raises(UserError, match="The VAE halves image_size 3 times .one per entry of features. and it is 12; "
                                      "use an image_size that is a multiple of 8, or fewer features."):
    VAEConfig(image_size=12, features=(8, 8, 8))  # was a broadcasting TypeError from deep inside the decoder
  assert VAEConfig(image_size=12, features=(8, 8)).image_size == 12

  from aigc_jax import config as config_lib
  from aigc_jax.data import images
  from aigc_jax.tasks import make_task
  wide = types.SimpleNamespace(data=types.SimpleNamespace(image_shape=(28, 24, 1)), num_classes=10)
  monkeypatch.setattr(images.ImageDataset, "from_config", lambda data: wide)  # a data set of 28x24 images
  with pytest.raises(UserError, match="The image models take square images and embedded:digits gives 28x24 ones"):
    make_task(config_lib.load_config(CONFIGS["gan_mnist"]))


def test_gan_losses_match_their_definitions():
  d_real, d_fake = jnp.array([2.0]), jnp.array([-1.0])
  np.testing.assert_allclose(gan_lib.discriminator_loss("non_saturating", d_real, d_fake),
                             -np.log(jax.nn.sigmoid(2.0)) - np.log(1 - jax.nn.sigmoid(-1.0)), rtol=1e-6)
  np.testing.assert_allclose(gan_lib.generator_loss("non_saturating", d_fake), -np.log(jax.nn.sigmoid(-1.0)),
                             rtol=1e-6)
  np.testing.assert_allclose(gan_lib.discriminator_loss("wgan_gp", d_real, d_fake, 0.5), -1.0 - 2.0 + 0.5)
  np.testing.assert_allclose(gan_lib.discriminator_loss("non_saturating", d_real, d_fake, 0.5),  # was dropped
                             gan_lib.discriminator_loss("non_saturating", d_real, d_fake) + 0.5, rtol=1e-6)
  np.testing.assert_allclose(gan_lib.generator_loss("wgan_gp", d_fake), 1.0)
  for loss in (lambda: gan_lib.discriminator_loss("hinge", d_real, d_fake), lambda: gan_lib.generator_loss("hinge",
                                                                                                          d_fake)):
    with pytest.raises(UserError, match="Unknown GAN loss 'hinge'; use one of non_saturating, wgan_gp."):
      loss()  # was the WGAN loss, silently


def test_each_critic_update_sees_its_own_real_batch():
  """WGAN-GP's Algorithm 1 draws fresh real images for every one of the n_critic updates; they reused one batch."""
  from aigc_jax import config as config_lib
  from aigc_jax.tasks import make_task
  from aigc_jax.train.state import TrainState
  config = config_lib.load_config(CONFIGS["gan_mlp_mnist"], ["batch_size=4", "model.loss=wgan_gp", "model.d_steps=3",
                                                             "model.mlp_features=(8, 8)"])
  task = make_task(config)
  batch = task.train_batch(0)
  assert batch["images"].shape == (4, 3, 28, 28, 1) and batch["labels"].shape == (4, 3)
  assert task.units_per_batch == 12
  np.testing.assert_array_equal(batch["images"].reshape(12, 28, 28, 1),
                                task.dataset.batch("train", 0, 12, config.seed)["images"])
  rows = task.train_batch(0, slice(1, 3))  # what a process holding rows 1 and 2 builds: their d_steps images each
  assert rows["images"].shape == (2, 3, 28, 28, 1)
  np.testing.assert_array_equal(rows["images"], batch["images"][1:3])
  seen = []
  d_loss = task.d_loss
  def recording_d_loss(d_params, g_params, real, rng):
    jax.debug.callback(lambda r: seen.append(np.asarray(r)), real)
    return d_loss(d_params, g_params, real, rng)
  task.d_loss = recording_d_loss
  params = task.init_params(jax.random.key(0))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=task.optimizer().init(params), rng=jax.random.key(1))
  state, metrics = jax.jit(task.make_train_step(None))(state, batch)
  jax.block_until_ready(state)
  assert len(seen) == 3
  for i, real in enumerate(seen):
    np.testing.assert_array_equal(real, batch["images"][:, i])
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"][0]))


@pytest.fixture
def tiny_classifier(monkeypatch):
  """`aigc-jax eval` with a classifier trained for 3 steps (the real one trains for a minute)."""
  monkeypatch.setattr(evaluate_lib, "get_classifier", functools.partial(
      get_classifier, hparams=TrainHParams(num_steps=3, batch_size=8, learning_rate=1e-3, max_shift=1)))


@pytest.mark.parametrize("config, extra", [
    ("vae_mnist", []),
    ("gan_mnist", ["--config.model.loss=wgan_gp", "--config.model.d_steps=2"]),
    ("gan_mlp_mnist", []),
])
def test_train_resume_sample_and_eval(config, extra, tmp_path, capsys, monkeypatch, tiny_classifier):
  monkeypatch.setenv("AIGC_JAX_CACHE", str(tmp_path / "cache"))
  workdir = str(tmp_path / "run")
  code, out, err = run(train_args(config, workdir, ["--config.num_train_steps=2"] + extra), capsys)
  assert code == 0, err
  code, out, err = run(train_args(config, workdir, extra), capsys)  # resumes at 2, trains to 4
  assert code == 0, err
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and all(len(r) > 1 for r in rows)
  if config == "vae_mnist":
    assert "step 4: " in out and "step 2: " not in out
    assert {"val_loss", "val_bits_per_dim", "val_kl", "val_recon"} <= set(rows[-1])
  else:  # no evaluation metrics: no empty "step N:" lines, and the last logged training metrics at the end
    assert "step 4:" not in out and any(line.startswith("d_fake ") and ", g_loss " in line and ", loss " in line
                                        for line in out.splitlines())
    assert {"g_loss", "d_real", "d_fake", "gradient_penalty", "d_grad_norm"} <= {k for r in rows for k in r}
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_000002.png", "step_000004.png"]
  assert os.path.exists(os.path.join(workdir, "curves.png"))

  out_png = str(tmp_path / "grid.png")
  code, out, err = run(["sample", "--workdir", workdir, "--num-samples", "6", "--out", out_png], capsys)
  assert code == 0 and os.path.exists(out_png), err
  code, out, err = run(["eval", "--workdir", workdir], capsys)
  assert code == 0, err
  results = json.load(open(os.path.join(workdir, "eval.json")))
  assert results["step"] == 4 and results["num_samples"] == 8
  assert {"frechet_distance", "frechet_distance_real", "classifier_accuracy"} <= set(results)
  assert "label_accuracy" not in results  # neither family here is class-conditional
  if config == "vae_mnist":
    assert results["nelbo_nats"] > 0 and results["bits_per_dim"] == pytest.approx(
        results["nelbo_nats"] / (28 * 28 * np.log(2)))


def test_bad_image_input_is_one_sentence(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  code, _, err = run(train_args("vae_mnist", workdir, ["--config.data.image_size=32"]), capsys)
  assert code == 2 and "28x28 images with 1 channel(s) but the config expects 32x32" in err
  code, _, err = run(train_args("gan_mnist", workdir, ["--config.model.loss=hinge"]), capsys)
  assert code == 2 and "Unknown model.loss 'hinge'" in err
  code, _, err = run(train_args("gan_mnist", workdir, ["--config.grad_accum_steps=2"]), capsys)
  assert code == 2 and "GANs do not accumulate gradients" in err and "leave it at 1 and set batch_size" in err
  code, _, err = run(train_args("gan_mlp_mnist", workdir, ["--config.num_train_steps=1"]), capsys)
  assert code == 0, err
  for argv, message in [(["--label", "3"], "not class-conditional"), (["--steps", "5"], "--steps does not apply"),
                        (["--guidance-interval", "0", "1"], "--guidance-interval does not apply to a gan model"),
                        (["--out", str(tmp_path / "grid.jpg")], "does not name a .png file; give a path like"),
                        (["--num-samples", "-2", "--label", "3"], "--num-samples is -2; ask for at least one"),
                        (["--prompt", "hi"], "--prompt applies to language models only"),
                        (["--num-samples", "0"], "ask for at least one")]:
    code, _, err = run(["sample", "--workdir", workdir] + argv, capsys)
    assert code == 2 and message in err, (argv, err)
  for argv, message in [(["--seed", "99999999999999999999"], "is not a whole number between -2**63 and 2**63 - 1"),
                        (["--eta", "nan"], "argument --eta: 'nan' is not a finite number")]:
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
      cli.main(["sample", "--workdir", workdir] + argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
  out = tmp_path / "new" / "folder" / "grid.png"  # missing folders are made
  assert run(["sample", "--workdir", workdir, "--num-samples", "2", "--out", str(out)], capsys)[0] == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


DDPM = os.path.join(ROOT, "configs", "ddpm_mnist.py")
TINY_DDPM = TINY + TINY_UNET + ["sample.steps=5", "eval.bound_images=8", "eval.bound_stride=5"]


def test_diffusion_train_resume_sample_and_eval(tmp_path, capsys, monkeypatch, tiny_classifier):
  monkeypatch.setenv("AIGC_JAX_CACHE", str(tmp_path / "cache"))
  workdir = str(tmp_path / "run")
  args = ["train", "--config", DDPM, "--workdir", workdir] + [f"--config.{o}" for o in TINY_DDPM]
  assert run(args + ["--config.num_train_steps=2"], capsys)[0] == 0
  code, out, err = run(args, capsys)  # resumes at 2, trains to 4
  assert code == 0 and "step 4: val_loss" in out and "step 2: " not in out, err
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_000002.png", "step_000004.png"]

  task, params, step = load_trained(workdir)
  state, _ = Checkpointer(workdir).restore(loop.compile_steps(task, task.config, parallel.data_mesh()).abstract)
  assert step == 4 and state.ema_params is not None  # the EMA is in the checkpoint and is what sampling uses
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params)))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))

  out_png = str(tmp_path / "grid.png")
  code, out, err = run(["sample", "--workdir", workdir, "--num-samples", "3", "--label", "7", "--steps", "4",
                        "--eta", "0.5", "--guidance", "2", "--out", out_png], capsys)
  assert code == 0 and os.path.exists(out_png), err
  code, out, err = run(["sample", "--workdir", workdir, "--num-samples", "2", "--label", "7", "--steps", "4",
                        "--guidance-interval", "0.5", "1"], capsys)  # the default name tells the options apart
  named = os.path.join(workdir, "samples", "sample_step_000004_seed_0_num_samples_2_label_7_steps_4_"
                       "guidance_interval_0.5-1.png")
  assert code == 0 and out.strip() == f"wrote {named}" and os.path.exists(named), err
  code, out, err = run(["sample", "--workdir", workdir, "--config.sample.steps=3", "--config.sample.num_samples=2"],
                       capsys)  # config overrides name the file too
  named = os.path.join(workdir, "samples", "sample_step_000004_seed_0_sample.steps_3_sample.num_samples_2.png")
  assert code == 0 and out.strip() == f"wrote {named}" and os.path.exists(named), err
  code, out, err = run(["eval", "--workdir", workdir, "--guidance", "1.5", "--steps", "3",
                        "--guidance-interval", "0.25", "1", "--config.eval.bound_images=3"], capsys)
  assert code == 0, err
  assert "variational bound: 3 / 3 held-out images (every 5-th timestep)" in err  # progress of the slow part
  results = json.load(open(os.path.join(workdir, "eval.json")))
  assert {"frechet_distance", "frechet_distance_real", "label_accuracy", "classifier_accuracy"} <= set(results)
  assert (results["steps"], results["eta"], results["guidance"]) == (3, 0.0, 1.5)  # what was used, recorded
  assert results["guidance_interval"] == [0.25, 1.0]
  assert 0 <= results["label_accuracy"] <= 1 and results["bits_per_dim"] > 0 and results["bound_stride"] == 5
  assert results["bound_images"] == 3 and json.load(open(os.path.join(workdir, "config.json")))["eval"][
      "bound_images"] == 8  # the override was for this command: the run's config is as trained

  code, _, err = run(["eval", "--workdir", workdir, "--steps", "21"], capsys)
  assert code == 2 and "use --steps between 1 and 20" in err
  for argv, message in [(["--steps", "21"], "trained with 20 diffusion steps; use --steps between 1 and 20"),
                        (["--label", "10"], "Label 10 is outside the model's classes 0..9"),
                        (["--eta", "-1"], "--eta is DDIM's noise scale"),
                        (["--guidance-interval", "0.9", "0.1"], "use --guidance-interval LO HI with 0 <= LO <= HI <= 1")]:
    code, _, err = run(["sample", "--workdir", workdir, "--num-samples", "2"] + argv, capsys)
    assert code == 2 and message in err, (argv, err)

  # A run saved before `sample.guidance_interval` existed samples as it did then: guidance at every step. (And
  # before sample.variance and data.random_flip, which take the values that reproduce the code before them.)
  config_path = os.path.join(workdir, "config.json")
  saved = json.load(open(config_path))
  common = ["sample", "--workdir", workdir, "--num-samples", "2", "--steps", "3", "--guidance", "2", "--out"]
  assert run(common + [str(tmp_path / "new.png"), "--guidance-interval", "0", "1"], capsys)[0] == 0
  del saved["sample"]["guidance_interval"], saved["sample"]["variance"], saved["data"]["random_flip"]
  json.dump(saved, open(config_path, "w"))
  code, _, err = run(common + [str(tmp_path / "old.png")], capsys)
  assert code == 0, err
  assert np.array_equal(np.asarray(Image.open(tmp_path / "old.png")), np.asarray(Image.open(tmp_path / "new.png")))
  open(config_path, "w").write("{not json")
  code, _, err = run(["sample", "--workdir", workdir], capsys)
  assert code == 2 and "config.json is not valid JSON" in err and "retrain into a fresh workdir" in err, err



def test_vae_reconstructs_pixels_in_the_units_its_encoder_was_trained_on():
  """Reconstruction takes [-1, 1] pixels; the Bernoulli encoder trained on {0, 1} pixels sees them as such."""
  from aigc_jax.models.vae import VAE, VAEConfig
  model = VAE(VAEConfig(image_size=8, latent_dim=4, features=(8, 8), hidden_dim=16))
  binary = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 1)) < 0.3, jnp.float32)  # {0, 1}
  params = model.init(jax.random.key(0), binary, jax.random.key(1))
  mean = model.apply(params, binary, method=lambda m, x: m.encoder(x)[0])
  want = model.apply(params, mean, method=VAE.decode)
  got = model.apply(params, 2 * binary - 1, method=VAE.reconstruct)  # the same images in [-1, 1]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.shape == (2, 8, 8, 1) and float(jnp.min(got)) >= -1 and float(jnp.max(got)) <= 1
  # Images it cannot score: 3 channels broadcast against the 1-channel decoder, [-1, 1] pixels gave the Bernoulli
  # likelihood positive log-probabilities, and 2 - 1 pixels fall outside reconstruct's units.
  rng = jax.random.key(2)
  with pytest.raises(UserError, match=r"This VAE takes \[batch, 8, 8, 1\] images, not shape \(2, 8, 8, 3\); "
                                      "resize the images or build it for their size and channels"):
    model.apply(params, jnp.zeros((2, 8, 8, 3)), rng)
  with pytest.raises(UserError, match=r"Pixels run from -1 to 1; this VAE takes binarized pixels in \{0, 1\}"):
    model.apply(params, 2 * binary - 1, rng)
  with pytest.raises(UserError, match=r"Pixels run from 0 to 3; this VAE takes pixels in \[-1, 1\] to reconstruct"):
    model.apply(params, 3 * binary, method=VAE.reconstruct)
  with pytest.raises(UserError, match=r"Pixels take values between the 2 levels from 0 to 1; this VAE takes "
                                      r"binarized pixels"):  # grey pixels: a number, but no log-probability
    model.apply(params, 0.5 * binary, rng)
  assert jax.jit(lambda x: model.apply(params, x, rng))(binary)["nelbo"].shape == (2,)  # traced: shape checked only


def test_gaussian_vae_scores_8_bit_pixels_with_probabilities():
  """A continuous density on the 8-bit grid gave -0.65 bits/dim for a sharp, perfect reconstruction; the
  discretized Gaussian gives each pixel its bin's probability, so the figure stays a bound (>= 0)."""
  import math
  from aigc_jax.models.vae import VAE, VAEConfig, bits_per_dim
  config = VAEConfig(image_size=4, latent_dim=2, features=(8,), hidden_dim=8, likelihood="gaussian")
  model = VAE(config)
  levels = np.array([0, 1, 128, 254, 255, 7, 200, 60] * 2, np.float32).reshape(1, 4, 4, 1)
  x = jnp.asarray(2 * levels / 255 - 1)
  params = model.init(jax.random.key(0), x, jax.random.key(1))["params"]
  sigma = 0.002
  params = {**params, "log_scale": jnp.full((1,), math.log(sigma))}
  ll = model.apply({"params": params}, x, x, method=VAE.log_likelihood)  # the decoder's mean is the image itself
  half_bin = (1 / 255) / sigma
  inner, edge = math.erf(half_bin / math.sqrt(2)), 0.5 * (1 + math.erf(half_bin / math.sqrt(2)))
  num_edges = int(np.sum((levels == 0) | (levels == 255)))
  want = num_edges * math.log(edge) + (16 - num_edges) * math.log(inner)
  np.testing.assert_allclose(ll, [want], rtol=1e-5)
  assert 0 < float(bits_per_dim(-ll[0], config)) == pytest.approx(-want / (16 * math.log(2)), rel=1e-5)
  with pytest.raises(UserError, match=r"Pixels take values between the 256 levels from -1 to 1; this VAE takes 8-bit "
                                      r"pixels mapped to \[-1, 1\] \(k / 127.5 - 1\)"):  # 8-bit data scaled to [0, 1]
    model.apply({"params": params}, jnp.asarray(levels / 255), jax.random.key(1))
