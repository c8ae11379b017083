"""patch_diffusion.py (Wang et al. 2023, on EDM): the coordinate channels and the crops against
their definitions, the size draw against its probabilities, the crop counting, EDM's
preconditioning, sigmas and Heun sampler against closed forms, --real_p 1 against plain EDM
training and plain ddpm.py training (bitwise), a learning test, and the command line.

Everything else (data, checkpoints, DDP plumbing, ...) is ddpm.py's, kept identical by
tests/test_copies.py and tested in ddpm.py's tests.
"""

import argparse
import copy
import math
import os
import random

import numpy as np
import pytest
import torch

import ddpm
import patch_diffusion as pd
import testing_utils
from testing_utils import assert_user_error, randomize, run_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# 16x16 images, a two-level U-Net (downsampling 2: crops of 4, 8 and 16 pixels), attention at 8.
TINY = ["--image_size", "16", "--base_channels", "16", "--channel_mults", "1,2",
        "--num_res_blocks", "1", "--attention_resolutions", "8", "--num_heads", "1",
        "--batch_size", "4", "--procedural_size", "8", "--warmup_steps", "1",
        "--preview_samples", "2", "--preview_steps", "2", "--num_samples", "2",
        "--sampling_steps", "3", "--num_workers", "1"]
CPU = torch.device("cpu")


def tiny_args(*extra):
    return testing_utils.tiny_args(pd, TINY, *extra)


def grid_formula(height, width):
    """The coordinate channels of a whole image by the paper's formula, (2, H, W)."""
    x = (torch.arange(width) / (width - 1) - 0.5) * 2
    y = (torch.arange(height) / (height - 1) - 0.5) * 2
    return torch.stack([x.expand(height, width), y[:, None].expand(height, width)])


def random_images(count=8, size=16):
    return np.random.default_rng(0).integers(0, 256, (count, 3, size, size), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# Coordinates and crops


@pytest.mark.parametrize("size", [(16, 16), (16, 32), (24, 8)])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_crop_coordinates_are_the_crop_of_the_full_grid(size, factor):
    """An image that is its own coordinate grid (channels x, y, 0): every crop carries as its
    coordinate channels exactly its own first two channels."""
    h, w = size
    image = torch.cat([grid_formula(h, w), torch.zeros(1, h, w)]).expand(6, 3, h, w)
    torch.manual_seed(0)
    crops = pd.random_crops(image, factor)
    assert crops.shape == (6, 5, h // factor, w // factor)
    assert torch.equal(crops[:, :2], crops[:, 3:])
    if factor > 1:                                                  # offsets of their own
        assert len({tuple(c[3:, 0, 0].tolist()) for c in crops}) > 1


def test_full_size_crop_is_the_image_with_the_sampler_grid():
    """A full-size crop is the image itself with the grid of the formula, which is the grid the
    U-Net takes when sampling (no `pos`), from -1 to 1 on both axes of a non-square image."""
    args = tiny_args("--image_size", "8x16")
    model = randomize(pd.build_model(args)).eval()
    x, t = torch.randn(2, 3, 8, 16), torch.tensor([0.3, -0.7])
    crops = pd.random_crops(x, 1)
    assert torch.equal(crops[:, :3], x)
    assert torch.allclose(crops[:, 3:], grid_formula(8, 16).expand(2, 2, 8, 16), atol=1e-6)
    assert crops[:, 3:].amin((0, 2, 3)).tolist() == [-1, -1]
    assert crops[:, 3:].amax((0, 2, 3)).tolist() == [1, 1]
    assert torch.equal(model(x, t), model(x, t, pos=crops[:, 3:]))


def test_a_larger_canvas_extrapolates_the_grid():
    """Sampling 16x32 from a 16x16 model: the grid continues to the right, beyond 1."""
    grid = pd.patch_coordinates(16, 32, 0, 0, 1, 16, 16)
    assert torch.allclose(grid[0, :, :, :16], grid_formula(16, 16), atol=1e-6)
    assert grid[0, 0, 0, -1] == pytest.approx(1 + 2 * 16 / 15)


def test_offsets_cover_every_valid_position():
    """2x3 crops of an 8x12 image whose channels are the row and column index: all 7 x 10 top-left
    positions occur, and no other."""
    rows = torch.arange(8.0)[:, None].expand(8, 12)
    cols = torch.arange(12.0)[None].expand(8, 12)
    image = torch.stack([rows, cols, torch.zeros(8, 12)]).expand(2000, 3, 8, 12)
    torch.manual_seed(0)
    crops = pd.random_crops(image, 4)
    assert crops.shape == (2000, 5, 2, 3)
    positions = set(zip(crops[:, 0, 0, 0].int().tolist(), crops[:, 1, 0, 0].int().tolist()))
    assert positions == {(i, j) for i in range(7) for j in range(10)}


@pytest.mark.parametrize("shape", [(4, 4), (8, 8), (16, 16)])
def test_unet_runs_on_every_crop_size(shape):
    args = tiny_args()
    model = randomize(pd.build_model(args))
    crops = pd.random_crops(torch.randn(3, 3, 16, 16), 16 // shape[0])
    out = model(crops[:, :3], torch.zeros(3), pos=crops[:, 3:])
    assert out.shape == (3, 3, *shape) and torch.isfinite(out).all()
    assert model.input_conv.in_channels == 5


# ------------------------------------------------------------------------------------------------
# The size of a step and the counting in crops


@pytest.mark.parametrize("real_p", [0.5, 0.25])
def test_size_draw_follows_its_probabilities(real_p):
    args = argparse.Namespace(real_p=real_p, progressive=False)
    random.seed(0)
    draws = [pd.draw_patch_factor(args, 0.0) for _ in range(10_000)]
    counts = np.array([draws.count(f) for f in (4, 2, 1)])
    expected = 10_000 * np.array([(1 - real_p) * 0.4, (1 - real_p) * 0.6, real_p])
    assert ((counts - expected) ** 2 / expected).sum() < 13.8       # chi-square, 2 dof, 99.9 %


def test_progressive_never_takes_a_size_of_probability_0():
    args = argparse.Namespace(real_p=1.0, progressive=True)
    assert [pd.draw_patch_factor(args, d) for d in (0.0, 0.5, 1.0)] == [1, 1, 1]


def test_real_p_1_and_0():
    random.seed(0)
    assert {pd.draw_patch_factor(argparse.Namespace(real_p=1.0, progressive=False), 0)
            for _ in range(200)} == {1}
    assert {pd.draw_patch_factor(argparse.Namespace(real_p=0.0, progressive=False), 0)
            for _ in range(200)} == {4, 2}


def test_progressive_switches_at_20_and_50_percent_of_the_crops(monkeypatch):
    """--progressive at real_p 0.5: R/4 up to 20 % of --max_kimg, R/2 up to 50 %, then R; in
    training, 100 crops at batch 4: R/4 while nimg <= 20, R/2 while nimg <= 50."""
    args = argparse.Namespace(real_p=0.5, progressive=True)
    factors = [pd.draw_patch_factor(args, d) for d in (0, 0.2, 0.2001, 0.5, 0.5001, 0.99)]
    assert factors == [4, 4, 2, 2, 1, 1]
    args = tiny_args("--progressive", "--max_kimg", "0.1")
    run, drawn = pd.build_run(args, None, CPU, 0, 1), []
    real = pd.random_crops
    monkeypatch.setattr(pd, "random_crops", lambda x, f: drawn.append((run.nimg, f)) or real(x, f))
    while not pd.finished(run, args):
        pd.train_step(run, random_images(), None, args)
        pd.optimizer_step(run, args)
    assert drawn == [(0, 4), (16, 4), (32, 2), (40, 2), (48, 2), (56, 1), (60, 1), (64, 1),
                     (68, 1), (72, 1), (76, 1), (80, 1), (84, 1), (88, 1), (92, 1), (96, 1)]


@pytest.mark.parametrize("factor", [4, 2, 1])
def test_a_step_takes_batch_times_r_over_s_crops(factor, monkeypatch):
    """Two micro-batches of 4 x f crops of 16/f pixels; nimg counts 2 x 4 x f crops; the next
    step reads the next micro-batches of ddpm.py's order."""
    args = tiny_args("--accumulation_iters", "2")
    run = pd.build_run(args, None, CPU, 0, 1)
    shapes, ks = [], []
    monkeypatch.setattr(pd, "draw_patch_factor", lambda args, done: factor)
    real_step, real_indices = pd.micro_batch_step, pd.batch_indices
    monkeypatch.setattr(pd, "micro_batch_step", lambda model, diffusion, x0, *a, **k: (
        shapes.append(tuple(x0.shape)), real_step(model, diffusion, x0, *a, **k))[1])
    monkeypatch.setattr(pd, "batch_indices", lambda start, n, size, *a: ks.append(
        (start, size)) or real_indices(start, n, size, *a))
    for step in range(2):
        pd.train_step(run, random_images(), None, args)
        pd.optimizer_step(run, args)
    assert shapes == [(4 * factor, 5, 16 // factor, 16 // factor)] * 4
    assert run.nimg == 2 * 2 * 4 * factor and ks == [(4 * factor * m, 4 * factor)
                                                      for m in range(4)]


def test_ema_decay_is_edms_half_life_in_crops_and_halflife_0_keeps_the_decay(monkeypatch):
    """EDM's beta = 0.5 ** (crops of the step / half-life), the half-life min(--ema_halflife_kimg
    x 1000, 0.05 x nimg); the crops of a step of factor f are f x batch x accumulation."""
    args = tiny_args("--ema_halflife_kimg", "0", "--ema_decay", "0.9")
    run = pd.build_run(args, None, CPU, 0, 1)
    pd.train_step(run, random_images(), None, args)
    assert run.ema.decay == 0.9
    monkeypatch.setattr(pd, "draw_patch_factor", lambda args, done: 4)
    args = tiny_args("--ema_halflife_kimg", "1")
    crops = 4 * args.batch_size * args.accumulation_iters
    for nimg, halflife in ((100_000, 1000), (1000, 50)):            # past and in the ramp-up
        run = pd.build_run(args, None, CPU, 0, 1)
        run.nimg = nimg
        pd.train_step(run, random_images(), None, args)
        assert run.ema.decay == pytest.approx(0.5 ** (crops / halflife), rel=1e-12)


def test_lr_ramp_and_decay_count_crops():
    args = argparse.Namespace(warmup_steps=0, warmup_kimg=2, max_steps=100, max_kimg=10,
                              lr_schedule="constant")
    factor = [pd.lr_lambda(argparse.Namespace(step=1, nimg=n), args) for n in (0, 500, 3000)]
    assert factor == [0.0, 0.25, 1.0]
    args.lr_schedule = "cosine"                                     # 5 of 10 kimg: half done
    assert pd.lr_lambda(argparse.Namespace(step=1, nimg=5000), args) == pytest.approx(0.5)
    args.warmup_steps = 4                                           # both ramps: the slower
    assert pd.lr_lambda(argparse.Namespace(step=0, nimg=1500), args) == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------
# EDM


def test_preconditioning_against_its_formulas_and_limits():
    sigma = torch.tensor([1e-7, 0.5, 1e5], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pd.edm_precondition(sigma)
    assert c_skip[0] == pytest.approx(1.0) and c_out[0] < 1e-6        # sigma -> 0: D(x) -> x
    assert c_skip[1] == pytest.approx(0.5) and c_out[1] == pytest.approx(0.25 / math.sqrt(0.5))
    assert c_skip[2] < 1e-10 and c_out[2] == pytest.approx(0.5)       # sigma -> inf: D -> F/2
    assert torch.allclose(c_in, 1 / (sigma ** 2 + 0.25).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(weight * c_out ** 2, torch.ones(3, dtype=torch.float64))   # EDM Sec. 5
    x = torch.randn(2, 3, 4, 4)
    denoised = pd.EDM().denoise(lambda x, c: 10 * torch.randn_like(x), x, 1e-7)
    assert (denoised - x).abs().max() < 1e-4


def test_karras_sigmas():
    sigmas = pd.karras_sigmas(18)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 19 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    steps = sigmas[:-1] ** (1 / 7)                                  # evenly spaced in sigma^(1/7)
    assert torch.allclose(steps.diff(), steps.diff()[:1].expand(17))
    assert (sigmas.diff() < 0).all()


def gaussian_denoiser(calls):
    """The exact D(x; sigma) of data N(0, sigma_data^2), counting its calls."""
    return lambda x, sigma: calls.append(1) or x * 0.25 / (sigma ** 2 + 0.25)


def test_heun_sampler_on_gaussian_data():
    """Data N(0, 0.5^2): the ODE's exact solution is x(0) = x_T 0.5 / sqrt(80^2 + 0.25). Heun
    makes 2N - 1 calls and converges at second order, Euler N calls at first order; with 64
    steps the samples have standard deviation 0.5 within 2 %, with churn too."""
    torch.manual_seed(0)
    latents = torch.randn(20_000, dtype=torch.float64)
    exact = latents * 80 * 0.5 / math.sqrt(80 ** 2 + 0.25)
    errors = {}
    for second_order in (True, False):
        for n in (16, 32, 64):
            calls = []
            out = pd.heun_sampler(gaussian_denoiser(calls), latents, pd.karras_sigmas(n),
                                  second_order=second_order)
            assert len(calls) == (2 * n - 1 if second_order else n)
            errors[second_order, n] = float((out - exact).abs().max())
    assert errors[True, 16] / errors[True, 32] > 3.5 and errors[True, 32] / errors[True, 64] > 3.5
    assert 1.7 < errors[False, 32] / errors[False, 64] < 2.3
    assert errors[True, 64] < 0.01 and errors[True, 64] < errors[False, 64] / 10
    out = pd.heun_sampler(gaussian_denoiser([]), latents, pd.karras_sigmas(64))
    assert abs(float(out.std()) - 0.5) < 0.01
    draws = []
    noise = (lambda: draws.append(1) or torch.randn(20_000, dtype=torch.float64))
    out = pd.heun_sampler(gaussian_denoiser([]), latents, pd.karras_sigmas(64), S_churn=40,
                          S_min=0.05, S_max=50, noise_fn=noise)
    assert abs(float(out.std()) - 0.5) < 0.01
    assert 0 < len(draws) < 64                                      # only inside [S_min, S_max]


def test_s_noise_scales_the_churn_noise():
    """S_noise = 2 with noise z is S_noise = 1 with noise 2 z."""
    latents, z = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    runs = [pd.heun_sampler(gaussian_denoiser([]), latents, pd.karras_sigmas(8), S_churn=10,
                            S_noise=s_noise, noise_fn=lambda: scale * z)
            for s_noise, scale in ((2.0, 1.0), (1.0, 2.0), (1.0, 1.0))]
    assert torch.allclose(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_sampler_flags_reach_the_formulation():
    args = tiny_args("--S_churn", "30", "--S_min", "0.1", "--S_max", "20", "--S_noise", "1.01")
    assert pd.build_diffusion(args).churn == dict(S_churn=30, S_min=0.1, S_max=20, S_noise=1.01)


def test_guided_sampling_is_heun_on_the_guided_denoiser():
    """sample() with guidance s is EDM's sampler on D_u + s (D_c - D_u) (the original's
    sample_with_cfg), from each image's seeded noise; s = 1 is not."""
    args = tiny_args("--class_conditional")
    args.num_classes = 2
    model, edm = randomize(pd.build_model(args)).eval(), pd.EDM()
    shape, seeds, y = (2, 3, 16, 16), [4, 7], torch.tensor([0, 1])
    null = torch.full_like(y, 2)

    def guided(x, sigma):
        d_c, d_u = (edm.denoise(lambda z, c: model(z, c, labels).float(), x, sigma)
                    for labels in (y, null))
        return d_u + 2.5 * (d_c - d_u)
    noise = pd.per_image_noise(shape, seeds, CPU)
    with torch.no_grad():
        expected = pd.heun_sampler(guided, noise(), pd.karras_sigmas(3), **edm.churn,
                                   noise_fn=noise).clamp(-1, 1).float()
    got = pd.sample(model, edm, shape, seeds, "heun", 3, y=y, guidance_scale=2.5)
    assert torch.allclose(got, expected, atol=1e-4)                 # float32, batched or not
    assert not torch.allclose(pd.sample(model, edm, shape, seeds, "heun", 3, y=y), expected,
                              atol=1e-3)


def plain_edm_loss(net, images, k, args):
    """One batch of plain EDM training of a 5-channel U-Net on whole images with the full grid,
    written out from EDM's EDMLoss and EDMPrecond (ddpm.py's batch of micro-batch k)."""
    y, _ = pd.make_batch(images, None, pd.batch_indices(k * args.batch_size, len(images),
                                                        args.batch_size, args.seed), args, CPU)
    sigma = (torch.randn(y.shape[0], 1, 1, 1) * 1.2 - 1.2).exp()
    weight = (sigma ** 2 + 0.5 ** 2) / (sigma * 0.5) ** 2
    x = y + torch.randn_like(y) * sigma
    c_skip, c_out = 0.5 ** 2 / (sigma ** 2 + 0.5 ** 2), sigma * 0.5 / (sigma ** 2 + 0.5 ** 2).sqrt()
    c_in, c_noise = 1 / (sigma ** 2 + 0.5 ** 2).sqrt(), sigma.log() / 4
    grid = grid_formula(16, 16).expand(y.shape[0], 2, 16, 16)
    out = pd.UNet.forward(net, torch.cat([c_in * x, grid], 1), c_noise.reshape(-1))
    return (weight * (c_skip * x + c_out * out - y) ** 2).mean()


def test_real_p_1_is_plain_edm_training_bitwise():
    """Two steps at --real_p 1: the loss, the gradients, the weights and the EMA (EDM's half-life
    rule on the images seen) are bitwise those of plain EDM training from the same seed."""
    args = tiny_args("--real_p", "1", "--grad_clip", "0", "--lr_schedule", "constant",
                     "--ema_halflife_kimg", "0.002", "--lr", "1e-3")
    run = pd.build_run(args, None, CPU, 0, 1)
    randomize(run.raw)
    run.ema.shadow.load_state_dict(run.raw.state_dict())
    net, shadow = copy.deepcopy(run.raw), copy.deepcopy(run.raw)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    images = random_images()
    for step in range(2):
        torch.manual_seed(10 + step)
        loss = pd.train_step(run, images, None, args)
        torch.manual_seed(10 + step)
        reference = plain_edm_loss(net, images, step, args)
        reference.backward()
        assert loss == reference.item()
        for a, b in zip(run.raw.parameters(), net.parameters()):
            assert torch.equal(a.grad, b.grad)
        pd.optimizer_step(run, args)
        optimizer.step()
        optimizer.zero_grad()
        halflife = min(2.0, 0.05 * 4 * step)                         # EDM: ema_rampup_ratio
        beta = 0.5 ** (4 / max(halflife, 1e-8))
        with torch.no_grad():
            for s, p in zip(shadow.parameters(), net.parameters()):
                s.lerp_(p, 1.0 - beta)
        assert testing_utils.state_equal(run.raw.state_dict(), net.state_dict())
        assert testing_utils.state_equal(run.ema.shadow.state_dict(), shadow.state_dict())
    assert run.nimg == 8 and 0 < beta < 1


def test_ddpm_formulation_at_real_p_1_is_ddpm_training_with_five_channels():
    """--formulation ddpm: the loss and gradients of ddpm.py's GaussianDiffusion on a 5-channel
    U-Net fed the image's grid, bitwise."""
    args = tiny_args("--formulation", "ddpm", "--real_p", "1", "--timesteps", "50")
    model = randomize(pd.build_model(args))
    twin = ddpm.UNet(5, 3, 16, [1, 2], 1, [8], 1, 0.0, (16, 16), 0)
    twin.load_state_dict(model.state_dict())
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    ours = pd.build_diffusion(args).training_losses(model, pd.random_crops(x0, 1))[0]()
    ours.backward()
    grid = grid_formula(16, 16).expand(4, 2, 16, 16)
    theirs_process = ddpm.build_diffusion(ddpm.parse_args(["--timesteps", "50"]))
    torch.manual_seed(3)
    theirs = theirs_process.training_losses(
        lambda x, t, y: twin(torch.cat([x, grid], 1), t, y), x0)[0]()
    theirs.backward()
    assert torch.equal(ours, theirs)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


# ------------------------------------------------------------------------------------------------
# Learning


def test_learns_two_colours_from_crops(tmp_path, capsys):
    """Trained on flat red and blue 8x8 images, three steps in five on crops of 2 or 4 pixels
    (--real_p 0.4), the whole-image samples are flat and red or blue, both colours: the crops'
    coordinates let the model keep one colour across the image. An untrained model gives noise."""
    colours = testing_utils.two_colour_folder(tmp_path / "data", size=8)
    run = tmp_path / "run"
    status, _, err = run_main(pd, [
        "--dataset_path", tmp_path / "data", "--cache_dir", tmp_path / "c", "--output_dir", run,
        "--image_size", "8", "--base_channels", "32", "--channel_mults", "1",
        "--attention_resolutions", "", "--num_heads", "1", "--batch_size", "16", "--real_p",
        "0.4", "--max_steps", "500", "--lr", "2e-3", "--warmup_steps", "20",
        "--ema_halflife_kimg", "0.5", "--save_every", "500", "--sample_every", "500",
        "--preview_samples", "1", "--preview_steps", "1", "--num_workers", "1"], capsys)
    assert status == 0, err
    samples = tmp_path / "samples"
    status, _, err = run_main(pd, ["--sample", "--checkpoint", run / "checkpoints" / "last.pt",
                                   "--num_samples", "16", "--sampling_steps", "12",
                                   "--output_dir", samples], capsys)
    assert status == 0, err
    distance, spread = testing_utils.judge_two_colour_samples(samples, colours)
    assert np.median(distance.min(1)) < 0.15 and (distance.min(1) < 0.2).sum() >= 12, distance
    assert np.median(spread) < 0.05                                 # flat images, not noise
    assert set(distance.argmin(1)) == {0, 1}


# ------------------------------------------------------------------------------------------------
# The command line


def test_help_documents_the_method_flags(capsys):
    """Each of the method's own flags has its block in --help, with its default (the shared ones
    are ddpm.py's test)."""
    blocks = testing_utils.help_blocks(pd, capsys)
    for flag in ["--formulation", "--real_p", "--progressive", "--max_kimg", "--warmup_kimg",
                 "--ema_halflife_kimg", "--S_churn", "--S_min", "--S_max", "--S_noise"]:
        assert "default" in blocks[flag], flag


@pytest.fixture
def tiny(tmp_path):
    return TINY + ["--cache_dir", str(tmp_path / "cache")]


def test_train_resume_sample(tiny, tmp_path, capsys):
    """The conventional outputs; kimg logged in crops; exact resume; samples that do not depend
    on the batch size; a wider canvas, and one the U-Net cannot take (exit 2); --sampler euler
    and --S_churn change the samples."""
    a, _ = testing_utils.assert_resume_is_exact(pd, tiny, tmp_path, ["model", "ema", "optimizer",
                                                                     "nimg", "rng"])
    full = tmp_path / "full"
    testing_utils.conventional_outputs(full, step=4)
    kimg = testing_utils.scalars(full, "train/kimg")
    assert kimg[4] == pytest.approx(a["nimg"] / 1000) and a["nimg"] >= 4 * 4
    checkpoint = full / "checkpoints" / "last.pt"
    testing_utils.assert_same_samples(pd, checkpoint, tmp_path, [["--batch_size", "4"],
                                                                 ["--batch_size", "1"]])
    wide = testing_utils.sample_images(pd, checkpoint, tmp_path / "wide", "--image_size", "16x32")
    assert wide.shape == (2, 16, 32, 3)
    assert_user_error(pd, *run_main(pd, ["--sample", "--checkpoint", checkpoint, "--image_size",
                                         "17x32", "--output_dir", tmp_path / "odd"], capsys)[::2])
    for name, flags in {"euler": ["--sampler", "euler"], "churn": ["--S_churn", "20"]}.items():
        testing_utils.assert_flags_change_the_samples(pd, checkpoint, tmp_path / name, flags)


def test_max_kimg_ends_training(tiny, tmp_path):
    """--max_kimg 0.04 at --real_p 1 and batch 4: 40 crops, 10 steps, before --max_steps."""
    out = tmp_path / "run"
    assert pd.main(tiny + ["--output_dir", str(out), "--real_p", "1", "--max_kimg", "0.04",
                           "--max_steps", "50", "--sample_every", "50"]) == 0
    ckpt = testing_utils.load(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 10 and ckpt["nimg"] == 40


def test_ddpm_formulation_trains_and_samples(tiny, tmp_path):
    out = testing_utils.train_run(pd, tiny, tmp_path, "ddpm", "--formulation", "ddpm")
    assert testing_utils.load(os.path.join(out, "checkpoints", "last.pt"))["args"]["sampler"] == \
        "ddim"
    images = testing_utils.sample_images(pd, os.path.join(out, "checkpoints", "last.pt"),
                                         tmp_path / "s", "--sampler", "ddpm")
    assert images.shape == (2, 16, 16, 3)


def test_sample_passes_labels_and_guidance_to_the_network():
    """EDM sampling of a class-conditional model: guidance 3 draws other images than guidance 1,
    and guidance 1 with labels is the plain conditional Heun sampler."""
    args = tiny_args("--class_conditional")
    args.num_classes = 2
    model, edm = randomize(pd.build_model(args)).eval(), pd.EDM()
    y, shape = torch.tensor([0, 1]), (2, 3, 16, 16)
    plain, guided = (pd.sample(model, edm, shape, [1, 2], "heun", 3, y=y, guidance_scale=s)
                     for s in (1.0, 3.0))
    assert not torch.allclose(plain, guided, atol=1e-3)
    noise = pd.per_image_noise(shape, [1, 2], CPU)
    expected = pd.heun_sampler(lambda x, s: edm.denoise(lambda z, c: model(z, c, y), x, s),
                               noise(), pd.karras_sigmas(3))
    assert torch.allclose(plain, expected.clamp(-1, 1).float())


def test_ranks_read_one_stream_in_turn(monkeypatch):
    """Rank 0 draws f = 4 and rank 1 f = 1 (the all_gather is simulated): with 2 micro-batches,
    rank 0 reads images 0..31 of the stream and rank 1 images 32..39, and nimg counts
    both ranks' crops; the next step starts after them."""
    args = tiny_args("--accumulation_iters", "2")
    reads = {}
    for rank, own in ((0, 4), (1, 1)):
        run = pd.build_run(args, None, CPU, 0, 1)
        run.rank, run.world, ks = rank, 2, []
        monkeypatch.setattr(pd, "draw_patch_factor", lambda args, done: own)
        monkeypatch.setattr(pd.dist, "all_gather", lambda out, t: [
            o.fill_(v) for o, v in zip(out, (4, 1))])
        real = ddpm.batch_indices
        monkeypatch.setattr(pd, "batch_indices", lambda start, n, size, *a: ks.append(
            (start, size)) or real(start, n, size, *a))
        pd.train_step(run, random_images(), None, args)
        reads[rank] = (ks, run.nimg)
    assert reads[0] == ([(0, 16), (16, 16)], 40) and reads[1] == ([(32, 4), (36, 4)], 40)


def test_torchrun_ddp_counts_the_crops_of_every_rank(tiny, tmp_path):
    """Each rank draws its own sizes (Python's generator, seeded by seed + rank): nimg after 3
    steps of 2 micro-batches of 4 images is the sum of both ranks' draws."""
    ckpt, _ = testing_utils.assert_torchrun_ddp_on_cpu(pd, tiny, tmp_path)
    expected = 0
    for rank in (0, 1):
        draws = random.Random(0 + rank)
        expected += sum(draws.choices(pd.PATCH_FACTORS, weights=[0.2, 0.3, 0.5])[0]
                        for _ in range(3)) * 4 * 2
    assert ckpt["nimg"] == expected


def test_paper_preset_and_step_counts_under_both_formulations():
    """The paper preset's sampler is each formulation's own (it named heun, which refused
    --formulation ddpm), and EDM's step counts are not bounded by ddpm.py's --timesteps (which
    EDM refuses to change)."""
    assert pd.parse_args(["--preset", "paper"]).sampler == "heun"
    assert pd.parse_args(["--preset", "paper", "--formulation", "ddpm"]).sampler == "ddim"
    args = pd.parse_args([*TINY, "--sampling_steps", "1500", "--preview_steps", "1200"])
    assert (args.sampling_steps, args.preview_steps, args.timesteps) == (1500, 1200, 1000)
    with pytest.raises(pd.UserError):
        pd.parse_args([*TINY, "--formulation", "ddpm", "--sampling_steps", "1500"])


def test_progressive_reaches_whole_images_when_max_steps_ends_training_first(monkeypatch):
    """--max_kimg far beyond 4 steps: the sizes follow the steps done (0, 1/4, 2/4, 3/4 of
    --max_steps at real_p 0.5: R/4, R/2, R/2, R), so the last step trains on whole images."""
    args = tiny_args("--progressive", "--max_kimg", "1000", "--max_steps", "4")
    run, drawn = pd.build_run(args, None, CPU, 0, 1), []
    real = pd.random_crops
    monkeypatch.setattr(pd, "random_crops", lambda x, f: drawn.append(f) or real(x, f))
    while not pd.finished(run, args):
        pd.train_step(run, random_images(), None, args)
        pd.optimizer_step(run, args)
    assert drawn == [4, 2, 2, 1]


def test_full_images_only_need_the_unets_divisibility():
    """--real_p 1 never draws quarter crops, so a size divisible only by the U-Net's factor (2
    here) is accepted; any p < 1 draws them and refuses it."""
    assert pd.parse_args([*TINY, "--image_size", "12", "--real_p", "1"]).train_size == [12, 12]
    with pytest.raises(pd.UserError):
        pd.parse_args([*TINY, "--image_size", "12", "--real_p", "0.9"])


@pytest.mark.parametrize("flags", [
    ["--real_p", "1.5"],
    ["--real_p", "-0.1"],
    ["--image_size", "12"],
    ["--sampler", "ddim"],
    ["--formulation", "ddpm", "--sampler", "heun"],
    ["--max_kimg", "-1"],
    ["--progressive"],
    ["--schedule", "linear"],
    ["--eta", "0.5"],
    ["--formulation", "ddpm", "--S_churn", "10"],
    ["--S_min", "2", "--S_max", "1"],
    ["--S_max", "nan"],
], ids=["real_p_high", "real_p_low", "not_by_4x_factor", "ddim_with_edm", "heun_with_ddpm",
        "max_kimg", "progressive_without_max_kimg", "schedule_with_edm", "eta_with_edm",
        "churn_with_ddpm", "s_min_above_s_max", "s_max_nan"])
def test_bad_flags_exit_2_before_any_work(tmp_path, capsys, flags):
    testing_utils.assert_refused_before_any_work(pd, [*TINY, *flags], tmp_path, capsys)
