"""patchify_ddpm.py (Luhman & Luhman 2022): the patch rearrangements and the position encoding
against their definitions, P = 1 against ddpm.py's U-Net, the weighted x0 loss against its closed
form, the x0 sampler's last step, the paper rows, bad input, and one smoke run of the command line.

Everything else (data, EMA, checkpoints, samplers, DDP, ...) is ddpm.py's, kept identical by
tests/test_copies.py and tested in ddpm.py's tests.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ddpm
from testing_utils import randomize
import patchify_ddpm as pf

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# 16x16 images, P = 2: a two-level U-Net on the 8x8 grid (attention at grid side 4).
TINY = ["--image_size", "16", "--patch_size", "2", "--base_channels", "16", "--channel_mults",
        "1,2", "--num_res_blocks", "1", "--attention_resolutions", "4", "--num_heads", "1",
        "--batch_size", "4", "--procedural_size", "8", "--timesteps", "100", "--warmup_steps",
        "1", "--preview_samples", "2", "--preview_steps", "2", "--num_samples", "2",
        "--sampling_steps", "3", "--num_workers", "1"]


def tiny_args(*extra):
    args = pf.parse_args(TINY + list(extra))
    args.num_classes = 0                                            # main() sets it from the data
    return args


def run_main(argv, capsys):
    """pf.main in-process: (exit status, stderr)."""
    capsys.readouterr()
    status = pf.main([str(a) for a in argv])
    return status, capsys.readouterr().err


def assert_user_error(status, err):
    """Exit status 2 and one line on stderr, no traceback."""
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, (status, err)


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
    (einops `b c (h p1) (w p2) -> b (p1 p2 c) h w`), element by element."""
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
    """Sines only, f_k = exp(-ln(1e4) k / (c/2 - 1)), omega = 64 / shorter side; the first half
    encodes the column (x), the second the row (y)."""
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
def test_model_runs_on_the_grid_and_starts_at_zero(extra, shape):
    args = tiny_args(*extra)
    model = pf.build_model(args)
    p = args.patch_size
    seen = []
    model.input_conv.register_forward_hook(lambda m, i, o: seen.append((i[0].shape, o.shape)))
    x, t = torch.randn(shape), torch.randint(0, 100, (shape[0],))
    out = model(x, t)
    assert out.shape == shape
    grid = (shape[2] // p, shape[3] // p)                           # (H/P, W/P), 3 P^2 channels
    assert seen[0] == ((shape[0], 3 * p * p, *grid), (shape[0], 16, *grid))
    assert torch.count_nonzero(out) == 0                            # zero-initialised output
    randomize(model)
    assert model(x, t).abs().mean() > 0


def test_p1_is_ddpm_unet_plus_the_position_encoding():
    """With P = 1 the network is ddpm.UNet (the same parameter names) with the position encoding
    added to the input convolution's output."""
    model = randomize(pf.build_model(tiny_args("--patch_size", "1"))).eval()
    reference = ddpm.UNet(3, 3, 16, [1, 2], 1, [4], 1, 0.0, (16, 16), 0).eval()
    reference.load_state_dict(model.state_dict())                   # strict: the same keys
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 70])
    plain = reference(x, t)
    pe = pf.position_encoding_2d(16, 16, 16)
    reference.input_conv.register_forward_hook(lambda m, i, o: o + pe)
    assert torch.allclose(model(x, t), reference(x, t), atol=1e-5)
    assert not torch.allclose(model(x, t), plain, atol=1e-3)       # the encoding matters


# ------------------------------------------------------------------------------------------------
# Diffusion: the loss and the sampler's last step


def linear_model(x, t, y=None):
    """A fixed 'network' of x_t and t."""
    return 0.3 * x + 0.01 * t.reshape(-1, 1, 1, 1)


def total_loss(diffusion, model, x0):
    return sum(term() for term in diffusion.training_losses(model, x0))


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
@pytest.mark.parametrize("prediction, weight, gamma", [
    ("x0", "sqrt_snr", 0), ("x0", "snr", 0), ("x0", "none", 0), ("eps", "sqrt_snr", 0),
    ("eps", "none", 0), ("v", "sqrt_snr", 0), ("x0", "snr", 5.0)])
def test_loss_is_the_weighted_x0_error(prediction, weight, loss, gamma):
    """L = mean(w(t) e(x0 - x0_hat)), e the squared (the paper), absolute or Huber error,
    recomputed in float64 from the same t and noise; x0_hat is the output (x0) or comes from
    eps_hat or v_hat by Eq. 4; w clipped at gamma (min-SNR-gamma with w = SNR)."""
    betas = pf.make_beta_schedule("linear", 100, 0.02)
    d = pf.PatchifyDiffusion(betas, prediction, loss, "small", weight, gamma)
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    torch.manual_seed(3)
    value = total_loss(d, linear_model, x0)
    torch.manual_seed(3)
    t = torch.randint(0, 100, (6,))
    noise = torch.randn(6, 3, 4, 4).double()
    a = torch.cumprod(1 - betas, 0)[t].reshape(-1, 1, 1, 1)
    x0 = x0.double()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = linear_model(x_t, t)
    x0_hat = {"x0": out, "eps": (x_t - (1 - a).sqrt() * out) / a.sqrt(),
              "v": a.sqrt() * x_t - (1 - a).sqrt() * out}[prediction]
    snr = a / (1 - a)
    w = {"sqrt_snr": snr.sqrt(), "snr": snr, "none": torch.ones_like(snr)}[weight]
    w = w.clamp(max=gamma) if gamma else w
    e = (x0 - x0_hat).abs()
    error = {"mse": e ** 2, "l1": e, "huber": torch.where(e < 1, 0.5 * e ** 2, e - 0.5)}[loss]
    assert value.item() == pytest.approx((w * error).mean().item(), rel=1e-4)


def test_eps_prediction_with_snr_weight_is_ddpm_loss():
    """w = SNR on the x0 error of an eps network is Ho et al.'s L_simple, ddpm.py's loss."""
    betas = pf.make_beta_schedule("linear", 50)
    ours = pf.PatchifyDiffusion(betas, "eps", loss_weight="snr")
    theirs = ddpm.GaussianDiffusion(betas)
    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    torch.manual_seed(1)
    a = total_loss(ours, linear_model, x0)
    torch.manual_seed(1)
    b = total_loss(theirs, linear_model, x0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_diffusion_flags_reach_the_process():
    d = pf.build_diffusion(tiny_args("--beta_end", "0.025", "--timesteps", "1000",
                                     "--loss_weight", "none", "--prediction", "eps"))
    assert d.betas[-1].item() == pytest.approx(0.025) and d.prediction == "eps"
    assert torch.equal(d.weight, torch.ones(1000))
    d = pf.build_diffusion(tiny_args())                             # x0, sqrt(SNR)
    assert d.prediction == "x0"
    assert torch.allclose(d.weight, (d.alpha_bar / (1 - d.alpha_bar)).sqrt())


class X0Oracle(torch.nn.Module):
    """An x0 'network' that always answers x0."""

    num_classes = 0

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, y=None):
        return self.x0.expand_as(x)


def test_x0_sampler_returns_x0_hat_at_its_last_step():
    """At index 0 of the respaced process, coef_x0 = 1, coef_xt = 0 and sigma = 0: the paper's
    250-step ancestral sampler returns the network's x0_hat itself."""
    d = pf.PatchifyDiffusion(pf.make_beta_schedule("linear", 1000))
    process = d.respace(250)
    x_t, x0, z = torch.randn(3, 3, 4, 4), torch.rand(3, 3, 4, 4) - 0.5, torch.randn(3, 3, 4, 4)
    assert torch.equal(process.ddpm_step(x_t, x0, torch.zeros(3, dtype=torch.long), z), x0)
    assert not torch.allclose(process.ddpm_step(x_t, x0, torch.full((3,), 5), z), x0, atol=1e-2)
    x0 = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    out = pf.sample(X0Oracle(x0), d, x0.shape, [1, 2], sampler="ddpm", steps=250)
    assert torch.allclose(out, x0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The paper preset


@pytest.mark.parametrize("size, p", [(256, 2), (256, 4), (256, 8), (1024, 4)])
def test_paper_rows_are_applied_and_explicit_flags_win(size, p):
    """The row of (H, W, P) lands as if its flags had been given; flags given, or a checkpoint's
    configuration, win over it."""
    args = pf.parse_args(["--preset", "paper", "--image_size", str(size), "--patch_size", str(p)])
    row = pf.PAPER_CONFIGS[size, size, p]
    explicit = pf.parse_args(["--image_size", str(size), "--patch_size", str(p),
                              *[f"--{key}={value}" for key, value in row.items()]])
    for key in row:
        assert getattr(args, key) == getattr(explicit, key), key
    assert args.prediction == "x0" and args.loss_weight == "sqrt_snr"
    given = pf.parse_args(["--preset", "paper", "--image_size", str(size), "--patch_size", str(p),
                           "--batch_size", "8", "--base_channels", "64", "--adam_beta2", "0.9"])
    assert (given.batch_size, given.base_channels, given.adam_beta2) == (8, 64, 0.9)
    assert given.channel_mults == args.channel_mults                # the rest of the row stays
    base = pf.parse_args(["--preset", "paper", "--patch_size", str(p), "--image_size", str(size)],
                         {"max_steps": 7})                          # a checkpoint's configuration
    assert base.max_steps == 7


def test_paper_preset_without_a_row_is_refused(capsys):
    assert_user_error(*run_main(["--preset", "paper", "--image_size", "512", "--dry_run"], capsys))


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("flags", [
    ["--image_size", "17"],                                         # not divisible by P = 2
    ["--image_size", "18"],                                         # 9x9 grid, U-Net factor 2
    ["--image_size", "16x20", "--patch_size", "4"],                 # 4x5 grid
    ["--base_channels", "17"],                                      # odd position encoding
    ["--beta_end", "2"],
    ["--beta_end", "0"],
    ["--prediction", "epsilon"],
], ids=["not_by_P", "not_by_factor", "non_square", "odd_channels", "beta_end_2",
        "beta_end_0", "prediction"])
def test_bad_flags_exit_2_before_any_work(tmp_path, capsys, flags):
    out = tmp_path / "run"
    assert_user_error(*run_main([*TINY, *flags, "--output_dir", out, "--cache_dir",
                                 tmp_path / "cache"], capsys))
    assert not out.exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------
# One smoke run of the shared command line


def test_train_resume_and_sample(tmp_path, capsys):
    """Train 2 steps, resume to 3 with another --adam_beta2 (it reaches the optimizer), sample;
    a checkpoint of another patch size is refused."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = [*TINY, "--output_dir", out, "--cache_dir", cache, "--save_every", "2"]
    status, err = run_main([*flags, "--max_steps", "2", "--adam_beta2", "0.99"], capsys)
    assert status == 0, err
    last = out / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["method"] == "patchify_ddpm" and ckpt["step"] == 2
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    status, err = run_main(["--resume", "latest", "--output_dir", out, "--max_steps", "3",
                            "--adam_beta2", "0.95"], capsys)
    assert status == 0, err
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["step"] == 3 and ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    samples = tmp_path / "samples"
    status, err = run_main(["--sample", "--checkpoint", last, "--output_dir", samples], capsys)
    assert status == 0, err
    for name in ("00000.png", "00001.png"):
        with Image.open(samples / name) as image:
            assert image.size == (16, 16)
    assert_user_error(*run_main(["--sample", "--checkpoint", last, "--output_dir", samples,
                                 "--patch_size", "4"], capsys))


def test_learns_two_colours(tmp_path, capsys):
    """A P = 4 model (a 4x4 grid of 48 channels) trained on flat red and blue 16x16 images
    samples flat images close to red or blue, and both: flat output across patch borders shows
    that the patches agree; an untrained or broken model gives noise or arbitrary colours."""
    colours = np.array([(230, 40, 40), (40, 60, 230)])
    (tmp_path / "data").mkdir()
    for i in range(32):
        Image.new("RGB", (16, 16), tuple(colours[i % 2])).save(tmp_path / "data" / f"{i:02d}.png")
    run = tmp_path / "run"
    status, err = run_main(["--dataset_path", tmp_path / "data", "--cache_dir", tmp_path / "c",
                            "--output_dir", run, "--image_size", "16", "--patch_size", "4",
                            "--base_channels", "32", "--channel_mults", "1,2",
                            "--attention_resolutions", "2", "--batch_size", "32", "--max_steps",
                            "300", "--lr", "2e-3", "--warmup_steps", "20", "--ema_decay", "0.99",
                            "--ema_start", "50", "--timesteps", "200", "--save_every", "300",
                            "--sample_every", "300", "--preview_samples", "1",
                            "--preview_steps", "1", "--num_workers", "1"], capsys)
    assert status == 0, err
    status, err = run_main(["--sample", "--checkpoint", run / "checkpoints" / "last.pt",
                            "--num_samples", "16", "--sampling_steps", "25", "--output_dir",
                            tmp_path / "samples"], capsys)
    assert status == 0, err
    pixels = np.stack([np.asarray(Image.open(tmp_path / "samples" / f"{i:05d}.png"))
                       for i in range(16)]).reshape(16, -1, 3) / 255.0     # (16, H*W, 3)
    distance = np.abs(pixels.mean(1)[:, None] - colours[None] / 255.0).max(2)   # (16, 2)
    # Close to red or blue: a blend of the two would be 0.37 away, an arbitrary colour ~0.5.
    assert np.median(distance.min(1)) < 0.15 and (distance.min(1) < 0.2).sum() >= 12, distance
    assert np.median(pixels.std(1).max(1)) < 0.05                   # flat images, not noise
    assert set(distance.argmin(1)) == {0, 1}                        # both colours appear
