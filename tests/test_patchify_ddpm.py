"""patchify_ddpm.py (Luhman & Luhman 2022): the patch rearrangements, the position encoding, the
x0-target loss and samplers against their formulas, P = 1 against ddpm.py's U-Net, training end to
end (learning, exact resume, DDP), the command line of CONVENTIONS.md and bad input.

The shared code (data pipeline, EMA, checkpoints, ...) is ddpm.py's, kept identical by
tests/test_copies.py and tested in tests/test_ddpm*.py; this file tests what the method changes.
"""

import functools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ddpm
import patchify_ddpm as pf
import testing_utils
from testing_utils import SHARED_FLAGS, SYNOPSIS_FLAGS, BayesOptimal, Oracle, randomize

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# A configuration small enough for a 2-core CPU: 16x16 images, P = 2, a two-level U-Net on the 8x8
# grid (attention at grid side 4).
TINY = ["--image_size", "16", "--patch_size", "2", "--base_channels", "32", "--channel_mults",
        "1,2", "--num_res_blocks", "1", "--attention_resolutions", "4", "--batch_size", "4",
        "--procedural_size", "16", "--num_samples", "4", "--sampling_steps", "4",
        "--timesteps", "100", "--warmup_steps", "2"]

# run_main, assert_user_error, tiny_args, train_run: the shared helpers, bound to pf and TINY.
run_main = functools.partial(testing_utils.run_main, pf)
assert_user_error = functools.partial(testing_utils.assert_user_error, pf)
tiny_args = functools.partial(testing_utils.tiny_args, pf, TINY)
train_run = functools.partial(testing_utils.train_run, pf, TINY)


# ------------------------------------------------------------------------------------------------
# Patching


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [(16, 16), (16, 32), (40, 8)])
def test_patchify_and_unpatchify_are_inverse(p, size):
    x = torch.randn(2, 3, *size)
    z = pf.patchify(x, p)
    assert z.shape == (2, 3 * p * p, size[0] // p, size[1] // p)
    assert torch.equal(pf.unpatchify(z, p), x)
    w = torch.randn(2, 3 * p * p, size[0] // p, size[1] // p)
    assert torch.equal(pf.patchify(pf.unpatchify(w, p), p), w)


@pytest.mark.parametrize("p", [2, 4])
def test_patchify_channel_order_is_row_column_colour(p):
    """Channel (p1 P + p2) 3 + c of cell (i, j) is pixel (i P + p1, j P + p2) of colour c
    (einops `b c (h p1) (w p2) -> b (p1 p2 c) h w`), checked element by element."""
    x = torch.arange(2 * 3 * 2 * p * 3 * p, dtype=torch.float32).reshape(2, 3, 2 * p, 3 * p)
    z = pf.patchify(x, p)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                for p1 in range(p):
                    for p2 in range(p):
                        for c in range(3):
                            assert (z[b, (p1 * p + p2) * 3 + c, i, j]
                                    == x[b, c, i * p + p1, j * p + p2])
    # Not pixel_unshuffle's (c, p1, p2) order, but the same values in another channel order.
    unshuffled = F.pixel_unshuffle(x, p)
    assert not torch.equal(z, unshuffled)
    order = [c * p * p + p1 * p + p2 for p1 in range(p) for p2 in range(p) for c in range(3)]
    assert torch.equal(z, unshuffled[:, order])


def test_position_encoding_matches_its_formula_in_float64():
    """The original's get_2d_positional_encoding: sines only, f_k = exp(-ln(1e4) k / (c/2 - 1)),
    omega = 64 / side; the first half encodes the column (x), the second the row (y)."""
    for height, width, channels in [(8, 8, 16), (4, 8, 12), (32, 32, 64)]:
        half = channels // 2
        omega = 64 / min(height, width)
        expected = np.zeros((channels, height, width))
        for k in range(half):
            f = math.exp(-math.log(1e4) * k / (half - 1)) * omega
            for i in range(height):
                for j in range(width):
                    expected[k, i, j] = math.sin(f * j)
                    expected[half + k, i, j] = math.sin(f * i)
        pe = pf.position_encoding_2d(height, width, channels)
        assert pe.shape == (channels, height, width) and pe.dtype == torch.float32
        np.testing.assert_allclose(pe.double().numpy(), expected, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("extra, shape", [
    ([], (2, 3, 16, 16)),
    (["--image_size", "16x32"], (2, 3, 16, 32)),
    (["--patch_size", "1"], (1, 3, 16, 16)),
    (["--patch_size", "4", "--attention_resolutions", "2"], (2, 3, 16, 16)),
    (["--patch_size", "8", "--channel_mults", "1", "--attention_resolutions", ""], (1, 3, 16, 16)),
])
def test_model_shapes_and_zero_initial_output(extra, shape):
    args = tiny_args(*extra)
    model = pf.build_model(args)
    p = args.patch_size
    seen = []
    model.input_conv.register_forward_hook(lambda m, i, o: seen.append((i[0].shape, o.shape)))
    x, t = torch.randn(shape), torch.randint(0, 100, (shape[0],))
    out = model(x, t)
    assert out.shape == shape
    # The U-Net runs on the (H/P) x (W/P) grid of 3 P^2 channels.
    grid = (shape[2] // p, shape[3] // p)
    assert seen[0] == ((shape[0], 3 * p * p, *grid), (shape[0], 32, *grid))
    assert torch.count_nonzero(out) == 0                            # zero-initialised output conv
    randomize(model)
    assert model(x, t).abs().mean() > 0


def test_p1_is_ddpm_unet_plus_the_position_encoding():
    """With P = 1 the network is ddpm.UNet (the same parameter names and values) with the
    position encoding added to the input convolution's output."""
    args = tiny_args("--patch_size", "1")
    model = randomize(pf.build_model(args)).eval()
    reference = ddpm.UNet(in_channels=3, out_channels=3, base_channels=32, channel_mults=[1, 2],
                          num_res_blocks=1, attention_resolutions=[4], num_heads=4,
                          image_size=[16, 16]).eval()
    reference.load_state_dict(model.state_dict())                   # strict: the same keys
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 70])
    plain = reference(x, t)
    pe = pf.position_encoding_2d(16, 16, 32)
    reference.input_conv.register_forward_hook(lambda m, i, o: o + pe)
    assert torch.allclose(model(x, t), reference(x, t), atol=1e-5)
    assert not torch.allclose(model(x, t), plain, atol=1e-3)       # the encoding matters


# ------------------------------------------------------------------------------------------------
# Diffusion math


def test_linear_schedule_ends_at_beta_end_and_scales_with_t():
    betas = pf.make_beta_schedule("linear", 1000, 0.025)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.025)
    short = pf.make_beta_schedule("linear", 500, 0.02)
    assert short[0].item() == pytest.approx(2e-4) and short[-1].item() == pytest.approx(0.04)
    assert torch.equal(pf.make_beta_schedule("cosine", 100, 0.5),
                       ddpm.make_beta_schedule("cosine", 100))


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
@pytest.mark.parametrize("target, weight", [("x0", "sqrt_snr"), ("x0", "snr"), ("x0", "none"),
                                            ("eps", "sqrt_snr"), ("eps", "snr"),
                                            ("eps", "none")])
def test_loss_is_the_weighted_x0_error(target, weight, loss):
    """L = mean(w(t) e(x0 - x0_hat)), e the squared error (the paper), the absolute error or Huber,
    recomputed in float64 from the same t and noise, with the network a fixed function of x_t;
    with target eps, x0_hat comes from eps_hat by Eq. 4."""
    d = pf.GaussianDiffusion(pf.make_beta_schedule("linear", 100, 0.02), target, weight, loss)

    def model(x, t, y=None):
        return 0.3 * x + 0.01 * t.reshape(-1, 1, 1, 1)
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    torch.manual_seed(3)
    value = d.training_loss(model, x0)
    torch.manual_seed(3)
    t = torch.randint(0, 100, (6,))
    noise = torch.randn(6, 3, 4, 4)
    ab = torch.cumprod(1 - pf.make_beta_schedule("linear", 100, 0.02), 0)[t].reshape(-1, 1, 1, 1)
    x0, noise = x0.double(), noise.double()
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = 0.3 * x_t + 0.01 * t.reshape(-1, 1, 1, 1)
    x0_hat = out if target == "x0" else (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    snr = ab / (1 - ab)
    w = {"sqrt_snr": snr.sqrt(), "snr": snr, "none": torch.ones_like(snr)}[weight]
    a = (x0 - x0_hat).abs()
    error = {"mse": a ** 2, "l1": a, "huber": torch.where(a < 1, 0.5 * a ** 2, a - 0.5)}[loss]
    expected = (w * error).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)


def test_loss_flag_reaches_the_diffusion():
    assert pf.build_diffusion(tiny_args()).loss == "mse"                 # the paper
    assert pf.build_diffusion(tiny_args("--loss", "l1")).loss == "l1"
    assert pf.build_diffusion(tiny_args("--loss", "huber")).respace(5).loss == "huber"


def test_eps_target_with_snr_weight_is_ddpm_loss():
    """sqrt(SNR) ... the weighting family contains Ho et al.'s L_simple: target eps, w = SNR."""
    ours = pf.GaussianDiffusion(pf.make_beta_schedule("linear", 50), "eps", "snr")
    theirs = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 50))

    def model(x, t, y=None):
        return 0.5 * x
    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    torch.manual_seed(1)
    a = ours.training_loss(model, x0)
    torch.manual_seed(1)
    b = theirs.training_loss(model, x0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_build_diffusion_uses_the_diffusion_flags():
    d = pf.build_diffusion(tiny_args("--target", "eps", "--loss_weight", "none", "--beta_end",
                                     "0.025", "--timesteps", "1000"))
    assert (d.target, d.loss_weight, d.num_timesteps) == ("eps", "none", 1000)
    assert d.betas[-1].item() == pytest.approx(0.025)
    d = pf.build_diffusion(tiny_args("--schedule", "cosine"))
    assert torch.allclose(d.betas.double(), ddpm.make_beta_schedule("cosine", 100).float().double())


def test_final_ancestral_step_returns_x0_hat():
    """At index 0 of a respaced process the posterior mean is x0_hat: coef1 = 1, coef2 = 0."""
    d = pf.GaussianDiffusion(pf.make_beta_schedule("linear", 1000)).respace(250)
    assert d.posterior_mean_coef1[0] == 1 and d.posterior_mean_coef2[0] == 0
    x_t, x0, z = torch.randn(3, 3, 4, 4), torch.rand(3, 3, 4, 4) - 0.5, torch.randn(3, 3, 4, 4)
    assert torch.equal(d.p_sample_step(x_t, x0, torch.zeros(3, dtype=torch.long), z), x0)
    later = d.p_sample_step(x_t, x0, torch.full((3,), 5), z)
    assert not torch.allclose(later, x0, atol=1e-2)


def test_ddim_step_on_x0_equals_ddpm_ddim_step_on_eps():
    betas = pf.make_beta_schedule("linear", 1000)
    ours, theirs = pf.GaussianDiffusion(betas), ddpm.GaussianDiffusion(betas)
    torch.manual_seed(0)
    x0, eps, z = torch.rand(2, 3, 4, 4) - 0.5, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for step, prev, eta in [(999, 900, 0.0), (500, 400, 0.5), (300, 299, 1.0), (20, -1, 0.0)]:
        x_t = theirs.q_sample(x0, torch.full((2,), step), eps)
        a = ours.ddim_step(x_t, x0, step, prev, eta, z)
        b = theirs.ddim_step(x_t, eps, step, prev, eta, z)
        assert torch.allclose(a, b, atol=2e-4), step


@pytest.mark.parametrize("sampler, steps", [("ddpm", 250), ("ddpm", 1000), ("ddim", 10)])
@pytest.mark.parametrize("target", ["x0", "eps"])
def test_samplers_return_the_true_x0(sampler, steps, target):
    d = pf.GaussianDiffusion(pf.make_beta_schedule("linear", 1000), target)
    x0 = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    out = d.sample(Oracle(d, x0, target), x0.shape, sampler=sampler, steps=steps, seeds=[1, 2])
    assert torch.allclose(out, x0, atol=1e-6 if target == "x0" else 1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_draw_the_data_distribution_with_the_bayes_optimal_x0(sampler):
    d = pf.GaussianDiffusion(pf.make_beta_schedule("linear", 200))
    colours = torch.tensor([[0.8, -0.7, -0.7], [-0.7, -0.5, 0.8]])
    out = d.sample(BayesOptimal(d, colours, "x0"), (64, 3, 4, 4), sampler=sampler, steps=20,
                   seeds=range(64))
    distance = (out.mean((2, 3))[:, None] - colours[None]).abs().amax(2)   # (64, 2)
    assert distance.min(1).values.max() < 1e-3
    assert 20 <= (distance.argmin(1) == 0).sum() <= 44


@pytest.mark.parametrize("target", ["x0", "eps"])
def test_guidance_is_the_same_in_x0_and_eps_space(target):
    args = tiny_args("--target", target)
    args.num_classes = 2
    model = randomize(pf.build_model(args)).eval()
    d = pf.build_diffusion(args)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 60]), torch.tensor([0, 1])
    cond, uncond = model(x, t, y), model(x, t, torch.tensor([2, 2]))
    assert torch.allclose(pf.guided_prediction(model, x, t, y, 1.0), cond, atol=1e-6)
    assert torch.allclose(pf.guided_prediction(model, x, t, y, 3.0), uncond + 3 * (cond - uncond),
                          atol=1e-5)

    def to_x0(out):
        return out if target == "x0" else d.predict_x0_from_eps(x, t, out)
    guided_in_x0 = to_x0(uncond) + 3 * (to_x0(cond) - to_x0(uncond))
    assert torch.allclose(d.predict_x0(model, x, t, y, 3.0), guided_in_x0.clamp(-1, 1), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("p, c, mults, blocks, batch, steps", [
    (2, 128, [1, 2, 2, 4, 4], 2, 128, 335_000),
    (4, 256, [1, 1, 2, 2], 2, 256, 275_000),
    (8, 256, [1, 1.5, 2], 3, 512, 215_000),
])
def test_paper_preset_lsun_rows(p, c, mults, blocks, batch, steps):
    args = pf.parse_args(["--preset", "paper", "--patch_size", str(p)])
    assert (args.image_size, args.base_channels, args.channel_mults, args.num_res_blocks) == \
        ([256, 256], c, mults, blocks)
    assert (args.batch_size, args.max_steps, args.beta_end, args.adam_beta2) == \
        (batch, steps, 0.02, 0.99)
    assert (args.lr, args.warmup_steps, args.lr_schedule, args.dropout) == \
        (1e-4, 5000, "constant", 0.0)
    assert (args.target, args.loss_weight, args.schedule, args.timesteps) == \
        ("x0", "sqrt_snr", "linear", 1000)
    assert (args.sampler, args.sampling_steps, args.attention_resolutions) == \
        ("ddpm", 250, [16, 8])
    assert args.ema_decay ** 100 == pytest.approx(0.99)             # 0.99 every 100 steps
    assert 512 // args.num_heads == 64                              # 64 channels per head


def test_paper_preset_default_is_p4_and_ffhq_at_1024():
    assert pf.parse_args(["--preset", "paper"]).patch_size == 4
    args = pf.parse_args(["--preset", "paper", "--image_size", "1024"])
    assert (args.patch_size, args.base_channels, args.channel_mults, args.num_res_blocks) == \
        (4, 128, [1, 2, 2, 4, 4, 4], 2)
    assert (args.batch_size, args.max_steps, args.beta_end, args.adam_beta2) == \
        (32, 780_000, 0.025, 0.98)
    assert pf.parse_args(["--preset", "paper", "--batch_size", "8"]).batch_size == 8  # flags win


def test_paper_preset_without_a_paper_configuration(capsys):
    status, _, err = run_main(["--preset", "paper", "--image_size", "512", "--dry_run"], capsys)
    assert_user_error(status, err, "no configuration for 512x512", "--patch_size 4",
                      "--base_channels")


# ------------------------------------------------------------------------------------------------
# End to end


def test_learns_two_colours(tmp_path):
    """A tiny P = 4 model (a 4x4 grid of 48 channels) trained on flat red and blue 16x16 images
    samples flat images close to red or blue, and both (distances: the largest channel difference
    in [0, 1] units, over 16 samples). Flat output across patch borders shows that the patches
    agree; an untrained or broken model gives noise or arbitrary colours."""
    testing_utils.assert_learns_two_colours(pf, tmp_path, 16, 300, "--patch_size", "4",
                                            "--attention_resolutions", "2", "--num_samples", "4",
                                            "--sampling_steps", "4")


def test_resume_is_exact(tmp_path):
    """4 steps in one run == resume from that run's step-2 checkpoint for 2 more steps, bitwise,
    with dropout, flips, gradient accumulation, label dropout and the Adam beta2 in play."""
    a, _ = testing_utils.assert_resume_is_exact(
        pf, TINY + ["--accumulation_iters", "2", "--dropout", "0.1", "--class_conditional",
                    "--ema_start", "1", "--adam_beta2", "0.99"],
        tmp_path, ("model", "ema", "optimizer", "lr_scheduler", "scaler"))
    assert a["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_explicit_adam_beta2_on_resume_reaches_the_optimizer(tmp_path):
    """Loading the optimizer's state restores the checkpoint's betas; a --adam_beta2 given on
    resume must replace them (a resumed run without it keeps the checkpoint's)."""
    out = train_run(tmp_path, "run", "--adam_beta2", "0.99")

    def betas():
        ckpt = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
        return ckpt["args"]["adam_beta2"], ckpt["optimizer"]["param_groups"][0]["betas"]

    assert pf.main(["--resume", "latest", "--output_dir", out, "--max_steps", "3"]) == 0
    assert betas() == (0.99, (0.9, 0.99))
    assert pf.main(["--resume", "latest", "--output_dir", out, "--max_steps", "4",
                    "--adam_beta2", "0.95"]) == 0
    assert betas() == (0.95, (0.9, 0.95))


def test_torchrun_ddp_on_cpu(tmp_path):
    ckpt = testing_utils.assert_torchrun_ddp_on_cpu(pf, TINY, tmp_path)
    assert ckpt["method"] == "patchify_ddpm"


# ------------------------------------------------------------------------------------------------
# Command line (CONVENTIONS.md)

METHOD_FLAGS = ["--patch_size", "--target", "--loss_weight", "--beta_end", "--adam_beta2"]


def test_help_lists_the_shared_and_the_method_flags(capsys):
    blocks = testing_utils.help_blocks(pf, capsys, SHARED_FLAGS + SYNOPSIS_FLAGS + METHOD_FLAGS,
                                       SHARED_FLAGS + METHOD_FLAGS)
    assert "{1,2,4,8}" in blocks["--patch_size"]
    assert "{x0,eps}" in blocks["--target"] and "{sqrt_snr,snr,none}" in blocks["--loss_weight"]
    squash = {flag: " ".join(text.split()) for flag, text in blocks.items()}
    # The paper preset leaves these open (its row follows the image and patch size) ...
    for flag in ("--adam_beta2", "--beta_end", "--base_channels", "--channel_mults"):
        assert "paper: chosen per --image_size" in squash[flag], squash[flag]
    # ... but not flags whose default is simply None in every preset.
    for flag in ("--dataset_path", "--output_dir", "--resume", "--class_label"):
        assert "paper:" not in squash[flag], squash[flag]


def test_dry_run_prints_the_configuration_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, parameters, _ = testing_utils.dry_run(pf, TINY, capsys)
    assert config["patch_size"] == 2 and config["image_size"] == [16, 16]
    assert config["output_dir"] == os.path.join("runs", "patchify_ddpm")
    assert parameters == pf.count_parameters(pf.build_model(tiny_args()))
    assert list(tmp_path.iterdir()) == []


def test_quick_preset_is_256_with_p8(capsys):
    args = pf.parse_args([])
    assert (args.image_size, args.patch_size, args.target, args.loss_weight) == \
        ([256, 256], 8, "x0", "sqrt_snr")


trained = testing_utils.trained_fixture(train_run)                  # reused by the CLI tests


def test_training_run_writes_the_conventional_outputs(trained):
    config = testing_utils.conventional_outputs(trained)
    assert config["patch_size"] == 2 and config["num_classes"] == 2
    ckpt = testing_utils.conventional_checkpoints(trained, "patchify_ddpm")[-1]
    pf.build_model(tiny_args("--class_conditional", num_classes=2)).load_state_dict(
        ckpt["ema"]["shadow"])
    events = testing_utils.tensorboard_events(trained)
    assert "train/loss" in events.Tags()["scalars"] and "samples" in events.Tags()["images"]
    with Image.open(os.path.join(trained, "samples", "step_2.png")) as grid:
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)               # 2x2 grid of 16px


def test_sample_command_is_independent_of_batch_size(trained, tmp_path):
    ckpt = os.path.join(trained, "checkpoints", "last.pt")
    variants = [["--batch_size", "1"], ["--batch_size", "3"]]
    for out in testing_utils.assert_same_samples(pf, ckpt, tmp_path, variants):
        assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                           "grid.png"]


@pytest.mark.parametrize("flags", [
    ["--sampler", "ddim"],
    ["--guidance_scale", "3.0", "--class_label", "1", "--weights", "swa"],
])
def test_sample_command_flags(trained, tmp_path, flags):
    testing_utils.assert_flags_change_the_samples(
        pf, os.path.join(trained, "checkpoints", "last.pt"), tmp_path, flags)


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("flags, phrases", [
    (["--image_size", "18"], ["--image_size 18x18", "--patch_size 2", "factor 2", "multiple of 4"]),
    (["--image_size", "16x20", "--patch_size", "4"], ["16x20", "multiple of 8"]),
    (["--patch_size", "3"], ["--patch_size", "invalid choice", "3"]),
    (["--target", "v"], ["--target", "invalid choice"]),
    (["--loss_weight", "p2"], ["--loss_weight", "invalid choice"]),
    (["--image_size", "16x24"], []),
    (["--base_channels", "2", "--num_heads", "1"], ["--base_channels 2", "at least 4"]),
    (["--beta_end", "2"], ["--beta_end 2"]),
    (["--dataset_path", "/nonexistent/folder"], ["/nonexistent/folder", "not a folder"]),
], ids=["not_divisible", "non_square_not_divisible", "patch_size_3", "target", "loss_weight",
        "valid_control", "base_channels_small", "beta_end", "missing_dataset"])
def test_bad_flags(tmp_path, capsys, flags, phrases):
    if not phrases:                                                 # the control case is valid
        status, _, err = run_main([*TINY, "--output_dir", tmp_path / "run", "--dry_run", *flags],
                                  capsys)
        assert status == 0, err
        return
    # No --dry_run: the refusal must come before training would create the run folder.
    testing_utils.assert_refused_before_any_work(pf, [*TINY, *flags], tmp_path, capsys, *phrases)


def test_odd_base_channels_is_refused(capsys):
    status, _, err = run_main([*TINY, "--base_channels", "33", "--num_heads", "1",
                               "--dry_run"], capsys)
    assert_user_error(status, err, "--base_channels 33", "even")


def test_ddpm_checkpoint_is_refused(tmp_path, capsys):
    path = testing_utils.ddpm_checkpoint(tmp_path)
    status, _, err = run_main(["--sample", "--checkpoint", path], capsys)
    assert_user_error(status, err, "ddpm.py checkpoint", "use ddpm.py")
    status, _, err = run_main([*TINY, "--resume", path, "--output_dir", tmp_path / "r"], capsys)
    assert_user_error(status, err, "ddpm.py checkpoint")


def test_sample_refuses_another_patch_size_or_target(trained, tmp_path, capsys):
    ckpt = os.path.join(trained, "checkpoints", "last.pt")
    for flags, phrase in [(["--patch_size", "4"], "--patch_size 2 (checkpoint) vs 4 (now)"),
                          (["--target", "eps"], "--target x0 (checkpoint) vs eps (now)")]:
        status, _, err = run_main(["--sample", "--checkpoint", ckpt, "--output_dir",
                                   tmp_path / "s", *flags], capsys)
        assert_user_error(status, err, "different configuration", phrase)


def test_cli_bad_input_end_to_end():
    result = testing_utils.run_cli(pf, ["--image_size", "100"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("patchify_ddpm.py: error: --image_size 100x100 is not "
                                    "divisible by --patch_size 8")
