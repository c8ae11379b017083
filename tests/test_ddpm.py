"""ddpm.py: the U-Net, the diffusion math against the papers' closed forms (float64), the samplers
against denoisers whose answer is known, the training pieces, and training end to end (learning,
exact resume, DDP, precision, SWA, non-finite steps) with the sample command.

tests/test_ddpm_data.py has the data path, the command line's errors and a run's outputs."""

import argparse
import contextlib
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
import testing_utils
from testing_utils import BayesOptimal, Oracle, load, randomize, scalars, state_equal

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# A configuration small enough for a 2-core CPU: 16x16 images, a two-level U-Net of width 8.
TINY = ["--image_size", "16", "--base_channels", "8", "--channel_mults", "1,2",
        "--num_res_blocks", "1", "--attention_resolutions", "8", "--num_heads", "2",
        "--batch_size", "4", "--procedural_size", "16", "--num_samples", "4",
        "--sampling_steps", "4", "--preview_samples", "4", "--preview_steps", "4",
        "--timesteps", "100", "--warmup_steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """TINY with a cache folder of this module's own (never runs/cache)."""
    return TINY + ["--cache_dir", str(tmp_path_factory.mktemp("cache"))]


def tiny_args(*extra, num_classes=0):
    return testing_utils.tiny_args(ddpm, TINY, *extra, num_classes=num_classes)


def train_run(tiny, tmp_path, name, *extra):
    return testing_utils.train_run(ddpm, tiny, tmp_path, name, *extra)


def f64(x):
    return torch.as_tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("extra, shape", [
    ([], (2, 3, 16, 16)),
    (["--image_size", "16x24"], (2, 3, 16, 24)),
    (["--channel_mults", "1,2,2", "--attention_resolutions", "8,4"], (2, 3, 16, 16)),
    (["--channel_mults", "1", "--attention_resolutions", ""], (1, 3, 16, 16)),
    (["--num_res_blocks", "2", "--dropout", "0.1"], (3, 3, 16, 16)),
])
def test_unet_shapes_and_zero_output_at_init(extra, shape):
    model = ddpm.build_model(tiny_args(*extra))
    x, t = torch.randn(shape), torch.randint(0, 100, (shape[0],))
    # Zero-initialised output convolution: the untrained network outputs exactly 0.
    assert model(x, t).shape == shape and torch.count_nonzero(model(x, t)) == 0
    out = randomize(model)(x, t)
    assert out.shape == shape and out.abs().mean() > 0


def test_unet_attention_blocks_are_where_asked():
    def count(*extra):
        return sum(isinstance(m, ddpm.AttentionBlock)
                   for m in ddpm.build_model(tiny_args(*extra)).modules())
    # One in the middle always; per level: num_res_blocks down + (num_res_blocks + 1) up.
    assert count("--attention_resolutions", "") == 1
    assert count("--attention_resolutions", "8") == 1 + 1 + 2
    assert count("--attention_resolutions", "16,8") == 1 + 2 * (1 + 2)


def test_unet_conditions_on_time_and_class():
    model = randomize(ddpm.build_model(tiny_args(num_classes=3))).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    base = model(x, t, torch.tensor([0, 0]))
    assert not torch.allclose(base, model(x, torch.tensor([50, 50]), torch.tensor([0, 0])))
    assert not torch.allclose(base, model(x, t, torch.tensor([1, 1])))
    # y = None is the null label (index num_classes); the model itself never drops labels.
    assert torch.equal(model(x, t, None), model(x, t, torch.tensor([3, 3])))
    y, many = torch.zeros(256, dtype=torch.long), t.repeat(128)
    assert torch.equal(model.train().embed(many, y), model.eval().embed(many, y))


def test_unet_emb_is_added_to_the_time_and_class_embedding(monkeypatch):
    model = randomize(ddpm.build_model(tiny_args(num_classes=2))).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 70]), torch.tensor([1, 0])
    emb = torch.randn(2, 4 * 8)                                     # (B, 4 * base_channels)
    expected = (model.time_mlp(ddpm.timestep_embedding(t, 8)) + model.class_emb(y) + emb)
    assert torch.allclose(model.embed(t, y, emb), expected, atol=1e-6)
    with_emb = model(x, t, y, emb)
    assert not torch.allclose(with_emb, model(x, t, y))
    # forward(..., emb) is the network run on that sum.
    monkeypatch.setattr(model, "embed", lambda t, y=None, e=None: expected)
    assert torch.allclose(model(x, t, y), with_emb, atol=1e-6)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = ddpm.timestep_embedding(t, 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t]
    assert torch.allclose(emb, torch.tensor(expected), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Diffusion math, in float64 against closed forms computed here from the betas


def closed_forms(betas):
    """alpha_bar, alpha_bar_prev and the posterior q(x_{t-1} | x_t, x_0) from the betas alone
    (numpy float64): the product of two Gaussians in x_{t-1}, of precision alpha_t / beta_t +
    1 / (1 - alpha_bar_{t-1}), independently of Ho et al.'s Eq. 7 that the script uses."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = 1 / (alphas / betas + 1 / (1 - ab_prev))
        coef_xt = variance * np.sqrt(alphas) / betas
        coef_x0 = variance * np.sqrt(ab_prev) / (1 - ab_prev)
    variance[0], coef_xt[0], coef_x0[0] = 0.0, 0.0, 1.0             # t = 0: a point mass at x_0
    return dict(ab=ab, ab_prev=ab_prev, variance=variance, coef_x0=coef_x0, coef_xt=coef_xt)


def test_linear_schedule_endpoints_and_scaling():
    betas = ddpm.make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas[1:] - betas[:-1], betas[1:2] - betas[:1])      # linear
    short = ddpm.make_beta_schedule("linear", 250)
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)
    with pytest.raises(ddpm.UserError):                             # 0.02 * 1000 / 20 = 1
        ddpm.make_beta_schedule("linear", 20)


def test_cosine_schedule_matches_its_alpha_bar():
    T, s = 1000, 0.008
    betas = ddpm.make_beta_schedule("cosine", T)
    alpha_bar = torch.cumprod(1 - betas, 0)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 1, 250, 500, 900):
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max() <= 0.999 and betas.max() == pytest.approx(0.999)


def test_sigmoid_schedule_matches_its_alpha_bar_at_both_ends():
    """Jabri et al.'s g(t) = (sig(3) - sig(6 t - 3)) / (sig(3) - sig(-3)): alpha_bar_t = g(t / T),
    except the last step, whose beta is clipped at 0.999 (g(1) = 0)."""
    T = 1000

    def sig(z):
        return 1 / (1 + math.exp(-z))

    def g(t):
        return (sig(3) - sig(6 * t / T - 3)) / (sig(3) - sig(-3))
    alpha_bar = torch.cumprod(1 - ddpm.make_beta_schedule("sigmoid", T), 0)
    for t in (0, 1, 500, 998):
        assert alpha_bar[t].item() == pytest.approx(g(t + 1), rel=1e-9)
    assert alpha_bar[0].item() == pytest.approx(0.9997, abs=1e-4)
    assert alpha_bar[-1].item() == pytest.approx(0.001 * g(T - 1), rel=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights_against_their_formula(prediction):
    """Hang et al.: the x0 error is weighted by min(SNR, gamma); the own-target error of eps, x0
    and v already carries SNR, 1 and SNR + 1, so loss_weight is min(SNR, gamma) over that."""
    betas = ddpm.make_beta_schedule("cosine", 1000)
    ab = f64(closed_forms(betas)["ab"])
    snr = ab / (1 - ab)
    implied = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
    d = ddpm.GaussianDiffusion(betas, prediction=prediction, min_snr_gamma=5.0)
    np.testing.assert_allclose(d.loss_weight.double(), torch.minimum(snr, torch.tensor(5.0))
                               / implied, rtol=1e-6)
    assert torch.equal(ddpm.GaussianDiffusion(betas, prediction).loss_weight, torch.ones(1000))
    assert d.respace(10).options["min_snr_gamma"] == 5.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_decreases_from_one_to_zero(kind):
    ab = ddpm.GaussianDiffusion(ddpm.make_beta_schedule(kind, 1000)).alpha_bar_f64
    assert ab.dtype == torch.float64
    assert (ab[1:] < ab[:-1]).all() and 0.99 < ab[0] < 1 and ab[-1] < 1e-4


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_buffers_match_bayes_rule_in_float64(kind):
    betas = ddpm.make_beta_schedule(kind, 1000)
    d = ddpm.GaussianDiffusion(betas)                               # variance small
    c = closed_forms(betas)
    np.testing.assert_allclose(d.alpha_bar_f64, c["ab"], rtol=1e-12)
    np.testing.assert_allclose(d.alpha_bar.double(), c["ab"], rtol=1e-6)
    np.testing.assert_allclose(d.alpha_bar_prev.double(), c["ab_prev"], rtol=1e-6)
    np.testing.assert_allclose(d.coef_x0.double(), c["coef_x0"], rtol=1e-5)
    np.testing.assert_allclose(d.coef_xt.double(), c["coef_xt"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d.sigma.double() ** 2, c["variance"], rtol=1e-5)
    assert d.sigma[0] == 0 and d.coef_x0[0] == pytest.approx(1) and d.coef_xt[0] == 0


@pytest.mark.parametrize("steps", [None, 10, 37])
def test_variance_small_and_large_against_their_closed_forms(steps):
    """small: sigma_t^2 = beta~_t (the posterior variance); large: sigma_t^2 = beta_t for t >= 1
    (Ho et al. Sec. 3.2), with respacing the respaced betas 1 - alpha_bar_k / alpha_bar_{k-1};
    no noise in the last step either way. The ancestral step adds exactly sigma_t z."""
    full = {v: ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 1000), variance=v)
            for v in ("small", "large")}
    d = {v: full[v] if steps is None else full[v].respace(steps) for v in full}
    use = np.arange(1000) if steps is None else d["small"].timestep_map.numpy()
    assert len(use) == (steps or 1000) and use[0] == 0 and use[-1] == 999
    assert torch.equal(d["small"].timestep_map, d["large"].timestep_map)
    ab = full["small"].alpha_bar_f64.numpy()[use]
    betas = 1 - ab / np.concatenate([[1.0], ab[:-1]])
    c = closed_forms(betas)
    np.testing.assert_allclose(d["large"].sigma[1:].double() ** 2, betas[1:], rtol=1e-5)
    np.testing.assert_allclose(d["small"].sigma[1:].double() ** 2, c["variance"][1:], rtol=1e-5)
    assert d["large"].sigma[0] == d["small"].sigma[0] == 0
    assert d["large"].sigma[1] > 1.1 * d["small"].sigma[1]          # they differ: testable
    x_t, out, z = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 1, len(use) // 2, len(use) - 1])
    for v, sigma2 in (("large", betas), ("small", c["variance"])):
        added = d[v].ddpm_step(x_t, out, t, z) - d[v].ddpm_step(x_t, out, t, torch.zeros_like(z))
        expected = np.sqrt(sigma2[t.numpy()]).reshape(-1, 1, 1, 1) * z.double().numpy()
        expected[0] = 0
        np.testing.assert_allclose(added.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_is_eq_4_to_float32_precision(kind):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with both coefficients accurate to float32 precision
    (relative 1e-5) at every t, also near t = 0, where 1 - ab is about 1e-4."""
    betas = ddpm.make_beta_schedule(kind, 1000)
    d = ddpm.GaussianDiffusion(betas)
    t = torch.arange(1000)
    ab = closed_forms(betas)["ab"]
    ones, zeros = torch.ones(1000, 1, 1, 1), torch.zeros(1000, 1, 1, 1)
    np.testing.assert_allclose(d.q_sample(ones, t, zeros).flatten(), np.sqrt(ab), rtol=1e-6)
    np.testing.assert_allclose(d.q_sample(zeros, t, ones).flatten(), np.sqrt(1 - ab), rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(1000, 3, 2, 2, generator=g) * 2 - 1, torch.randn(1000, 3, 2, 2,
                                                                            generator=g)
    expected = (np.sqrt(ab).reshape(-1, 1, 1, 1) * x0.double().numpy()
                + np.sqrt(1 - ab).reshape(-1, 1, 1, 1) * noise.double().numpy())
    np.testing.assert_allclose(d.q_sample(x0, t, noise), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_targets_and_conversions_in_float64(prediction):
    """target: eps, x0 or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho Sec. 4);
    x0_and_eps inverts it: from x_t and the true target it returns the true (x0, eps)."""
    betas = ddpm.make_beta_schedule("cosine", 1000)
    d = ddpm.GaussianDiffusion(betas, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 990])
    ab = d.alpha_bar_f64[t].reshape(-1, 1, 1, 1)                   # the exact schedule
    expected = {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]
    target = d.target(x0, noise, t)
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-7)  # float32 coefficients
    x0_hat, eps_hat = d.x0_and_eps(d.q_sample(x0, t, noise), t, target)
    # v inverts through sqrt(ab)^2 + sqrt(1 - ab)^2 = 1, which float32 coefficients keep to 1e-7.
    torch.testing.assert_close(x0_hat, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-6, atol=1e-6)


def test_ddpm_step_equals_ddim_with_eta_one():
    """With consecutive steps, DDIM at eta = 1 is the ancestral step with the small variance
    (Song et al. Sec. 4.3)."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 1000))
    torch.manual_seed(0)
    x0, eps, z = torch.rand(3, 3, 4, 4) - 0.5, torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    for step in (1, 50, 400, 999):
        t = torch.full((3,), step)
        x_t = d.q_sample(x0, t, eps)
        assert torch.allclose(d.ddpm_step(x_t, eps, t, z), d.ddim_step(x_t, eps, t, z, eta=1.0),
                              atol=1e-4), step


def test_ddim_eta_zero_ignores_noise_and_the_last_step_returns_x0():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    x0, eps = torch.rand(2, 3, 4, 4) - 0.5, torch.randn(2, 3, 4, 4)
    t = torch.tensor([700, 700])
    x_t = d.q_sample(x0, t, eps)
    a = d.ddim_step(x_t, eps, t, torch.randn_like(x_t), eta=0.0)
    assert torch.equal(a, d.ddim_step(x_t, eps, t, None, eta=0.0))
    assert not torch.allclose(a, d.ddim_step(x_t, eps, t, torch.randn_like(x_t), eta=0.5))
    zero = torch.tensor([0, 0])
    assert torch.allclose(d.ddim_step(d.q_sample(x0, zero, eps), eps, zero, None), x0, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler, steps", [("ddim", 10), ("ddim", 1000), ("ddpm", 20)])
def test_samplers_recover_x0_from_an_oracle(sampler, steps, prediction):
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 1000), prediction=prediction)
    x0 = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    out = ddpm.sample(Oracle(d, x0, prediction), d, x0.shape, [1, 2], sampler, steps)
    assert torch.allclose(out, x0, atol=1e-4)


@pytest.mark.parametrize("sampler, steps, variance", [
    ("ddim", 20, "small"), ("ddpm", 20, "small"), ("ddpm", 200, "small"), ("ddpm", 20, "large")])
def test_samplers_draw_the_data_distribution_with_the_bayes_optimal_denoiser(sampler, steps,
                                                                             variance):
    """With the exact posterior-mean denoiser, every sample is one of the two colours and both
    appear in the proportions of the data (1/2 each, within sampling error over 64 draws). eps,
    x0 and v prediction are the same sampler: the same seeds give the same samples."""
    colours = torch.tensor([[0.8, -0.7, -0.7], [-0.7, -0.5, 0.8]])
    outs = {}
    for prediction in ("eps", "x0", "v"):
        d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 200), prediction=prediction,
                                   variance=variance)
        outs[prediction] = ddpm.sample(BayesOptimal(d, colours, prediction), d, (64, 3, 4, 4),
                                       range(64), sampler, steps)
        means = outs[prediction].mean((2, 3))                       # (64, 3)
        distance = (means[:, None] - colours[None]).abs().amax(2)   # (64, 2)
        assert distance.min(1).values.max() < 1e-3, prediction
        assert 20 <= (distance.argmin(1) == 0).sum() <= 44, prediction
    for prediction in ("x0", "v"):
        assert torch.allclose(outs[prediction], outs["eps"], atol=1e-4), prediction


def test_respacing_keeps_alpha_bar_and_the_identity_respacing_is_the_process():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 1000), prediction="v",
                               loss="l1", variance="large")
    r = d.respace(50)
    assert r.num_timesteps == 50 and r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
    assert (r.timestep_map[1:] > r.timestep_map[:-1]).all()
    np.testing.assert_allclose(r.alpha_bar_f64, d.alpha_bar_f64[r.timestep_map], rtol=1e-9)
    assert r.options == d.options == dict(prediction="v", loss="l1", variance="large",
                                          min_snr_gamma=0.0)
    assert (r.prediction, r.loss) == ("v", "l1")
    twice = r.respace(10)                                           # maps to the original steps
    assert torch.equal(twice.timestep_map, r.timestep_map[torch.linspace(0, 49, 10).round().long()])
    np.testing.assert_allclose(twice.alpha_bar_f64, d.alpha_bar_f64[twice.timestep_map], rtol=1e-9)
    full = d.respace(1000)
    assert torch.equal(full.timestep_map, torch.arange(1000))
    for name in ("betas", "alpha_bar", "alpha_bar_prev", "coef_x0", "coef_xt", "sigma"):
        assert torch.allclose(getattr(full, name), getattr(d, name), rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_deterministic_and_seeded_per_image(sampler):
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 100))
    model = randomize(ddpm.build_model(tiny_args())).eval()
    a = ddpm.sample(model, d, (3, 3, 16, 16), [7, 8, 9], sampler, 5)
    assert torch.equal(a, ddpm.sample(model, d, (3, 3, 16, 16), [7, 8, 9], sampler, 5))
    assert torch.allclose(a[1:], ddpm.sample(model, d, (2, 3, 16, 16), [8, 9], sampler, 5),
                          atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_per_image_noise_does_not_depend_on_the_batch():
    both = ddpm.per_image_noise((2, 3, 4, 4), [3, 4], torch.device("cpu"))
    alone = ddpm.per_image_noise((1, 3, 4, 4), [4], torch.device("cpu"))
    first, second = both(), both()
    assert torch.equal(first[1:], alone()) and torch.equal(second[1:], alone())
    assert not torch.equal(first, second) and not torch.equal(first[0], first[1])


def test_sample_trajectory_records_the_way_to_x0():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 100))
    x0 = torch.rand(2, 3, 4, 4) - 0.5
    trajectory = []
    out = ddpm.sample(Oracle(d, x0), d, x0.shape, [0, 1], "ddim", 50, trajectory=trajectory)
    assert 20 <= len(trajectory) <= 50
    assert torch.equal(trajectory[-1], out)
    assert (trajectory[0] - x0).abs().mean() > (trajectory[len(trajectory) // 2] - x0).abs().mean()


# ------------------------------------------------------------------------------------------------
# The loss and one training step


def test_training_draws_every_timestep_including_zero():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 100))
    seen = []

    def model(x, t, y=None):
        seen.append(t)
        return torch.zeros_like(x)
    for _ in range(400):
        for term in d.training_losses(model, torch.zeros(8, 3, 2, 2)):
            term()
    assert set(torch.cat(seen).tolist()) == set(range(100))


def huber(e):
    return torch.where(e.abs() < 1, 0.5 * e ** 2, e.abs() - 0.5)


@pytest.mark.parametrize("loss, prediction, error, gamma", [
    ("mse", "eps", lambda e: e ** 2, 0), ("l1", "eps", lambda e: e.abs(), 0),
    ("huber", "eps", huber, 0), ("mse", "x0", lambda e: e ** 2, 0),
    ("mse", "v", lambda e: e ** 2, 0), ("mse", "v", lambda e: e ** 2, 2.0),
    ("mse", "eps", lambda e: e ** 2, 2.0)])
def test_training_loss_is_the_error_on_the_target(loss, prediction, error, gamma):
    """With out_theta = 0 the loss is the mean error of the target: for the drawn t and noise,
    eps, x0, or sqrt(ab) eps - sqrt(1 - ab) x0, times the min-SNR weight when gamma > 0. ddpm's
    loss is one term."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 100), prediction=prediction,
                               loss=loss, min_snr_gamma=gamma)
    x0 = torch.rand(4, 3, 5, 5) * 2 - 1
    torch.manual_seed(3)
    terms = d.training_losses(lambda x, t, y=None: torch.zeros_like(x), x0)
    assert len(terms) == 1
    torch.manual_seed(3)
    t = torch.randint(0, 100, (4,))
    noise = torch.randn(4, 3, 5, 5)
    ab = f64(closed_forms(ddpm.make_beta_schedule("linear", 100))["ab"])[t].reshape(-1, 1, 1, 1)
    target = {"eps": noise.double(), "x0": x0.double(),
              "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]
    snr = ab / (1 - ab)
    weight = snr.clamp(max=gamma) / {"eps": snr, "v": snr + 1}[prediction] if gamma else 1
    assert terms[0]().item() == pytest.approx((weight * error(target)).mean().item(), rel=1e-5)


def test_micro_batch_step_backpropagates_every_term_and_returns_their_sum():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    calls = []

    class ThreeTerms:
        def training_losses(self, model, x0, y=None):
            return [lambda: calls.append(1) or w.sum(), lambda: calls.append(2) or (2 * w).sum(),
                    lambda: calls.append(3) or (w ** 2).sum()]
    args = argparse.Namespace(accumulation_iters=2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    total = ddpm.micro_batch_step(torch.nn.Linear(1, 1), ThreeTerms(), None, None, args, scaler,
                                  contextlib.nullcontext(), True)
    assert calls == [1, 2, 3]
    assert total == pytest.approx((3 + 6 + 5) / 2)                  # / accumulation_iters
    assert torch.allclose(w.grad, (1 + 2 + 2 * w.detach()) / 2)


@pytest.mark.parametrize("sync", [True, False])
def test_under_ddp_only_the_last_term_of_the_syncing_micro_batch_all_reduces(tmp_path, sync):
    """A one-process DDP (gloo): every loss term's forward and backward run inside DDP's no_sync
    but the last term of the micro-batch that syncs (the last of an accumulation round); the
    gradients are those without DDP."""
    torch.manual_seed(0)
    model, x, events = torch.nn.Linear(3, 1), torch.randn(4, 3), []

    class ThreeTerms:
        def training_losses(self, net, x0, y=None):
            return [lambda k=k: (net(x0) * k).pow(2).mean() for k in (1.0, 2.0, 3.0)]

    class Scaler:                                                   # records each backward
        def scale(self, loss):
            events.append("backward")
            return loss
    args = argparse.Namespace(accumulation_iters=1)
    ddpm.micro_batch_step(model, ThreeTerms(), x, None, args, Scaler(), contextlib.nullcontext(),
                          sync)
    reference, events[:] = [p.grad.clone() for p in model.parameters()], []
    model.zero_grad()
    with testing_utils.recorded_ddp(model, tmp_path, events) as ddp:
        ddpm.micro_batch_step(ddp, ThreeTerms(), x, None, args, Scaler(),
                              contextlib.nullcontext(), sync)
    term = ["forward", "backward"]
    assert events == (["enter"] + term + ["exit"]) * 2 + (term if sync else
                                                          ["enter"] + term + ["exit"])
    for p, g in zip(model.parameters(), reference):
        assert torch.allclose(p.grad, g, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_equals_one_big_batch(monkeypatch):
    """One micro-batch of 4 and two of 2 (--accumulation_iters 2) give the same loss and the same
    gradient for the same images, timesteps and noise (dropout 0)."""
    args = tiny_args()
    model = randomize(ddpm.build_model(args))
    diffusion = ddpm.build_diffusion(args)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    t, noise = torch.randint(0, 100, (4,), generator=g), torch.randn(4, 3, 16, 16, generator=g)

    def step(micro):
        draws = [list(t.split(micro)), list(noise.split(micro))]
        monkeypatch.setattr(torch, "randint", lambda *a, **k: draws[0].pop(0))
        monkeypatch.setattr(torch, "randn_like", lambda x: draws[1].pop(0))
        model.zero_grad()
        iters = 4 // micro
        run_args = argparse.Namespace(accumulation_iters=iters)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss = sum(ddpm.micro_batch_step(model, diffusion, x0[i * micro:(i + 1) * micro], None,
                                         run_args, scaler, contextlib.nullcontext(), i == iters - 1)
                   for i in range(iters))
        return loss, [p.grad.clone() for p in model.parameters()]
    loss_one, grads_one = step(4)
    loss_two, grads_two = step(2)
    assert loss_one == pytest.approx(loss_two, rel=1e-6)
    for a, b in zip(grads_one, grads_two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_classifier_free_guidance():
    model = randomize(ddpm.build_model(tiny_args(num_classes=2))).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 20]), torch.tensor([0, 1])
    cond, uncond = model(x, t, y), model(x, t, torch.tensor([2, 2]))
    passes = []
    model.register_forward_hook(lambda m, inputs, out: passes.append(inputs[2].tolist()))
    assert torch.allclose(ddpm.guided_output(model, x, t, y, 1.0), cond, atol=1e-6)
    assert passes == [[0, 1]]                                       # s = 1: one conditional pass
    assert torch.allclose(ddpm.guided_output(model, x, t, y, 3.0), uncond + 3 * (cond - uncond),
                          atol=1e-5)


def test_ema_update_rule_and_start():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = ddpm.EMA(model, decay=0.9, start=1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)                                               # update 1: plain copy
    assert torch.equal(ema.shadow.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)                                               # 0.9 * 1 + 0.1 * 3
    assert torch.allclose(ema.shadow.weight, torch.full((1, 2), 1.2))
    restored = ddpm.EMA(model, decay=0.9, start=1)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2 and torch.equal(restored.shadow.weight, ema.shadow.weight)


def lr_factor(step, warmup_steps, max_steps, schedule):
    """ddpm.lr_lambda at `step` of a run with these flags."""
    return ddpm.lr_lambda(argparse.Namespace(step=step), argparse.Namespace(
        warmup_steps=warmup_steps, max_steps=max_steps, lr_schedule=schedule))


def test_lr_schedule():
    assert lr_factor(0, 10, 110, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, "cosine") == pytest.approx(0.0)
    assert lr_factor(5, 10, 110, "constant") == pytest.approx(0.6)
    assert lr_factor(100, 10, 110, "constant") == 1.0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")
def test_optimizer_step_clips_and_skips_non_finite_gradients(monkeypatch):
    def run_with(grad_clip, max_nonfinite=2):
        args = tiny_args("--grad_clip", grad_clip, "--max_nonfinite_steps", max_nonfinite)
        run = ddpm.build_run(args, None, torch.device("cpu"), 0, 1)
        norms, real_step = [], run.optimizer.step

        def step(*a, **k):
            norms.append(float(torch.cat([p.grad.flatten() for p in run.raw.parameters()]).norm()))
            return real_step(*a, **k)
        monkeypatch.setattr(run.optimizer, "step", step)
        return args, run, norms

    def set_grads(run, value):
        for p in run.raw.parameters():
            p.grad = torch.full_like(p, value)
    numel = sum(p.numel() for p in ddpm.build_model(tiny_args()).parameters())
    for clip, expected in (("0.5", 0.5), ("0", math.sqrt(numel) * 3)):
        args, run, norms = run_with(clip)
        set_grads(run, 3.0)
        grad_norm, lr = ddpm.optimizer_step(run, args)
        assert grad_norm == pytest.approx(math.sqrt(numel) * 3, rel=1e-4)   # before clipping
        assert norms == [pytest.approx(expected, rel=1e-4)] and run.step == 1
    args, run, norms = run_with("1.0", max_nonfinite=2)
    before = {k: v.clone() for k, v in run.raw.state_dict().items()}
    set_grads(run, float("nan"))
    ddpm.optimizer_step(run, args)                                  # skipped, counted
    assert norms == [] and (run.step, run.skipped, run.nonfinite) == (1, 1, 1)
    assert state_equal(run.raw.state_dict(), before)
    set_grads(run, 1.0)
    ddpm.optimizer_step(run, args)                                  # a finite step resets
    assert len(norms) == 1 and (run.skipped, run.nonfinite) == (1, 0)
    set_grads(run, float("inf"))
    ddpm.optimizer_step(run, args)
    set_grads(run, float("inf"))
    with pytest.raises(ddpm.TrainingDiverged):                      # 2 in a row: stop
        ddpm.optimizer_step(run, args)
    assert len(norms) == 1


def test_batch_indices_cover_each_epoch_once_and_split_ranks():
    def batch(k, batch_size=5, rank=0, world=1, seed=0):
        return ddpm.batch_indices(k * batch_size * world, 10, batch_size, seed, rank,
                                  world).tolist()
    epoch0, epoch1 = batch(0) + batch(1), batch(2) + batch(3)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1 and epoch0 != batch(0, seed=1) + batch(1, seed=1)   # reshuffled
    ranks = [batch(0, rank=r, world=2) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    # Batch size 3: positions 0..11, an epoch of 10 and the next epoch's first 2, which are
    # what batch size 5 gives at the same positions: the order depends on the position alone.
    across = [i for k in range(4) for i in batch(k, 3)]
    assert sorted(across[:10]) == list(range(10)) and across[10:] == batch(2)[:2]


def test_make_batch_scales_and_flips():
    images = np.random.default_rng(0).integers(0, 256, (100, 3, 2, 4), dtype=np.uint8)
    expected = torch.from_numpy(images).float() / 127.5 - 1
    cpu = torch.device("cpu")
    args = argparse.Namespace(hflip=False, label_dropout=0.0, num_classes=0)
    x, y = ddpm.make_batch(images, None, torch.arange(100), args, cpu)
    assert torch.equal(x, expected) and y is None
    torch.manual_seed(0)
    x, _ = ddpm.make_batch(images, None, torch.arange(100), argparse.Namespace(
        hflip=True, label_dropout=0.0, num_classes=0), cpu)
    flipped = (x == expected.flip(3)).flatten(1).all(1)
    kept = (x == expected).flatten(1).all(1)
    assert 20 < flipped.sum() < 80 and bool((flipped | kept).all())
    x, _ = ddpm.make_batch(images, None, torch.tensor([5, 5, 9]), args, cpu)
    assert torch.equal(x, expected[[5, 5, 9]])


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_make_batch_label_dropout(rate):
    """Labels become the null label (num_classes) with probability --label_dropout."""
    images = np.zeros((4000, 3, 1, 1), dtype=np.uint8)
    labels = torch.arange(4000) % 3
    args = argparse.Namespace(hflip=False, label_dropout=rate, num_classes=3)
    torch.manual_seed(0)
    _, y = ddpm.make_batch(images, labels, torch.arange(4000), args, torch.device("cpu"))
    dropped = y == 3
    assert abs(dropped.float().mean().item() - rate) < 0.03
    assert torch.equal(y[~dropped], labels[~dropped])


def test_a_preset_is_the_same_as_giving_its_flags():
    """--preset paper sets each of its values as if given as flags (None: chosen per image size);
    flags given win over it."""
    flags = []
    for key, value in ddpm.PRESETS["paper"].items():
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no_{key}")
        elif value is not None:
            flags += [f"--{key}", str(value)]
    paper, explicit = ddpm.parse_args(["--preset", "paper"]), ddpm.parse_args(flags)
    per_size = [k for k, v in ddpm.PRESETS["paper"].items() if v is None]
    for key, value in vars(paper).items():
        if key != "preset" and key not in per_size:
            assert value == getattr(explicit, key), key
    assert vars(paper) != vars(ddpm.parse_args([]))
    assert ddpm.parse_args(["--preset", "paper", "--lr", "1e-4"]).lr == 1e-4
    if "channel_mults" in per_size:
        sizes = {s: ddpm.parse_args(["--preset", "paper", "--image_size", s]).channel_mults
                 for s in ("32", "256")}
        assert sizes == {s: ddpm.paper_channel_mults(int(s), int(s)) for s in sizes}
        assert sizes["32"] != sizes["256"]


# ------------------------------------------------------------------------------------------------
# End to end: a model that learns, and the sample command on it


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """300 steps of a class-conditional U-Net (v prediction) with SWA on flat red (class 0) and
    blue (class 1) images at 8x8: the checkpoint that the sample command's tests share."""
    base = tmp_path_factory.mktemp("learned")
    colours = testing_utils.two_colour_folder(base / "data", size=8, classes=True)
    run = base / "run"
    testing_utils.toy_run(ddpm, base / "data", run, 300, "--image_size", "8",
                          "--class_conditional", "--prediction", "v", "--swa", "--swa_start",
                          "250", "--sampling_steps", "10")
    return {"colours": colours, "checkpoint": run / "checkpoints" / "last.pt", "base": base}


def test_learns_two_colours_per_class(learned, tmp_path):
    """16 samples of the trained model (classes cycled) are flat images close to their class's
    colour: a distance of 0.37 would be a blend of the two, noise has a spread of ~0.3."""
    out = tmp_path / "samples"
    assert ddpm.main(["--sample", "--checkpoint", str(learned["checkpoint"]), "--num_samples",
                      "16", "--sampling_steps", "25", "--output_dir", str(out)]) == 0
    distances, spread = testing_utils.judge_two_colour_samples(out, learned["colours"])
    assert len(distances) == 16
    own = distances[np.arange(16), np.arange(16) % 2]
    assert own.max() < 0.1, distances.round(2)
    assert np.median(spread) < 0.15 and spread.max() < 0.25, spread.round(2)
    # --class_label with guidance: every sample blue.
    out = tmp_path / "blue"
    assert ddpm.main(["--sample", "--checkpoint", str(learned["checkpoint"]), "--num_samples",
                      "4", "--class_label", "1", "--guidance_scale", "1.5",
                      "--output_dir", str(out)]) == 0
    distances, _ = testing_utils.judge_two_colour_samples(out, learned["colours"])
    assert distances[:, 1].max() < 0.15, distances.round(2)


def test_sample_command_is_independent_of_batch_size(learned, tmp_path):
    for out in testing_utils.assert_same_samples(ddpm, learned["checkpoint"], tmp_path,
                                                 [["--batch_size", "1"], ["--batch_size", "3"]]):
        assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                           "grid.png"]


@pytest.mark.parametrize("flags, base", [(flags, []) for flags in testing_utils.SAMPLE_FLAGS]
                         + [(["--variance", "large"], ["--sampler", "ddpm"]),
                            (["--sampling_steps", "20"], [])])
def test_sample_command_flags_reach_the_sampler(learned, tmp_path, flags, base):
    testing_utils.assert_flags_change_the_samples(ddpm, learned["checkpoint"], tmp_path, flags,
                                                  base)


def test_save_gif(learned, tmp_path):
    testing_utils.assert_saves_gif(ddpm, learned["checkpoint"], tmp_path)


@pytest.mark.parametrize("flags", [["--image_size", "16"], ["--prediction", "eps"],
                                   ["--base_channels", "32"]])
def test_sample_refuses_flags_that_change_the_network(learned, tmp_path, capsys, flags):
    status, _, err = testing_utils.run_main(ddpm, ["--sample", "--checkpoint",
                                                   learned["checkpoint"], "--output_dir",
                                                   tmp_path / "s", *flags], capsys)
    testing_utils.assert_user_error(ddpm, status, err)
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def plain(tiny, tmp_path_factory):
    """A 2-step unconditional run on the built-in dataset."""
    return train_run(tiny, tmp_path_factory.mktemp("plain"), "run")


@pytest.mark.parametrize("flags", [["--guidance_scale", "2"], ["--class_label", "0"]])
def test_sample_refuses_class_flags_on_an_unconditional_model(plain, tmp_path, capsys, flags):
    status, _, err = testing_utils.run_main(ddpm, ["--sample", "--checkpoint", os.path.join(
        plain, "checkpoints", "last.pt"), "--output_dir", tmp_path / "s", *flags], capsys)
    testing_utils.assert_user_error(ddpm, status, err)


@pytest.mark.parametrize("mode", ["sample", "resume"])
def test_a_preset_given_with_a_checkpoint(plain, tmp_path, capsys, monkeypatch, mode):
    """--preset with --sample or --resume: the checkpoint's configuration applies over the
    preset's, and flags given win over both."""
    ckpt = os.path.join(plain, "checkpoints", "last.pt")
    trained = load(ckpt)["args"]
    argv = (["--sample", "--checkpoint", ckpt, "--num_samples", "1"] if mode == "sample" else
            ["--resume", ckpt, "--max_steps", "3"])
    used, sample_main = [], ddpm.sample_main
    monkeypatch.setattr(ddpm, "sample_main", lambda args, c: used.append(args) or
                        sample_main(args, c))
    status, _, err = testing_utils.run_main(ddpm, [*argv, "--preset", "paper", "--output_dir",
                                                   tmp_path / "out"], capsys)
    assert status == 0, err
    if mode == "resume":
        resumed = load(tmp_path / "out" / "checkpoints" / "last.pt")
        used.append(argparse.Namespace(**resumed["args"]))
        assert resumed["step"] == 3 and used[0].max_steps == 3             # the flag given
    paper = ddpm.PRESETS["paper"]
    for key in ("base_channels", "lr", "batch_size", "sampler", "sampling_steps", "variance"):
        assert getattr(used[0], key) == trained[key] != paper[key], key


# ------------------------------------------------------------------------------------------------
# End to end: training


def test_resume_is_exact(tmp_path):
    """4 steps in one run == resume from its step-2 checkpoint for 2 more, bitwise (model, EMA,
    SWA, optimizer, LR schedule, random generators, the logged loss), on an image folder read
    through the cache, with dropout, flips, gradient accumulation, label dropout and the cosine
    schedule in play."""
    testing_utils.two_colour_folder(tmp_path / "data", size=16, count=12, classes=True)
    argv = TINY + ["--dataset_path", tmp_path / "data", "--cache_dir", tmp_path / "cache",
                   "--accumulation_iters", "2", "--dropout", "0.1", "--class_conditional",
                   "--label_dropout", "0.3", "--ema_start", "1", "--swa", "--swa_start", "1"]
    _, resumed = testing_utils.assert_resume_is_exact(
        ddpm, argv, tmp_path, ("model", "ema", "swa", "optimizer", "lr_scheduler", "scaler",
                               "rng"))
    assert resumed["ema"]["num_updates"] == 4


def test_stopping_and_resuming_equals_one_run(tiny, tmp_path):
    """2N steps in one run == N steps, stop, `--resume latest --max_steps 2N`. With a constant
    learning rate after warmup, since a cosine decay depends on --max_steps itself."""
    common = tiny + ["--lr_schedule", "constant", "--save_every", "100", "--sample_every", "100",
                     "--dropout", "0.1", "--ema_start", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert ddpm.main(common + ["--output_dir", one, "--max_steps", "4"]) == 0
    assert ddpm.main(common + ["--output_dir", two, "--max_steps", "2"]) == 0
    assert ddpm.main(common + ["--output_dir", two, "--max_steps", "4", "--resume", "latest"]) == 0
    a, b = (load(os.path.join(run, "checkpoints", "last.pt")) for run in (one, two))
    for key in ("model", "ema", "optimizer", "rng"):
        assert state_equal(a[key], b[key]), key


def test_resume_on_another_number_of_processes_does_not_replay_step_0(tiny, tmp_path):
    """A checkpoint of 2 processes resumed in 1 has no generators for that layout: the run draws
    from a seed of the step, not the draws of step 0 again, also at step 10^6 (a seed past 2^32
    is wrapped); an older checkpoint, rank 0's generators only, resumed in 1 process restores
    them."""
    ckpt = load(os.path.join(train_run(tiny, tmp_path, "run"), "checkpoints", "last.pt"))
    args, cpu = ddpm.parse_args([str(a) for a in tiny]), torch.device("cpu")
    ckpt["step"] = ckpt["lr_scheduler"]["last_epoch"] = 10 ** 6
    world_2 = dict(ckpt, rng_other_ranks=[ckpt["rng"]])
    format_3 = {key: value for key, value in ckpt.items() if key != "rng_other_ranks"}
    draws = {}
    for name, state in (("fresh", None), ("world 2", world_2), ("format 3", format_3)):
        ddpm.build_run(args, state, cpu, 0, 1)
        draws[name] = torch.rand(8)
    assert not torch.equal(draws["world 2"], draws["fresh"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    assert torch.equal(draws["format 3"], torch.rand(8))
    assert not torch.equal(draws["world 2"], draws["format 3"])


def test_resume_with_another_batch_size_goes_on_where_the_data_stream_stopped(tiny, tmp_path,
                                                                            monkeypatch):
    """2 steps of 4 of the 16 images, resumed for 2 steps of 6: the 20 images drawn are positions
    0..19 of batch_indices' stream (each image once in the first epoch), not positions 0..7 and
    then 12..23, which a position of step x batch size would give."""
    drawn, make_batch = [], ddpm.make_batch
    monkeypatch.setattr(ddpm, "make_batch", lambda images, labels, indices, *a: (
        drawn.extend(indices.tolist()), make_batch(images, labels, indices, *a))[1])
    out = str(tmp_path / "run")
    assert ddpm.main(tiny + ["--output_dir", out, "--max_steps", "2"]) == 0
    assert ddpm.main(tiny + ["--output_dir", out, "--max_steps", "4", "--resume", "latest",
                             "--batch_size", "6"]) == 0
    assert drawn == ddpm.batch_indices(0, 16, 20, seed=0).tolist()
    assert sorted(drawn[:16]) == list(range(16))


def test_resume_keeps_the_run_configuration_and_explicit_flags_override_it(tiny, tmp_path):
    out = train_run(tiny, tmp_path, "run", "--lr", "5e-4", "--loss", "l1", "--weight_decay",
                    "0.01")
    # No flags but --resume: the run continues with its own configuration.
    assert ddpm.main(["--resume", "latest", "--output_dir", out, "--max_steps", "3"]) == 0
    ckpt = load(os.path.join(out, "checkpoints", "last.pt"))
    assert (ckpt["step"], ckpt["args"]["lr"], ckpt["args"]["loss"]) == (3, 5e-4, "l1")
    assert ckpt["args"]["image_size"] == [16, 16]
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    # An explicit --lr takes effect in the optimizer, not only in args.json.
    assert ddpm.main(["--resume", "latest", "--output_dir", out, "--max_steps", "4", "--lr",
                      "1e-4", "--lr_schedule", "constant", "--precision", "fp16"]) == 0
    ckpt = load(os.path.join(out, "checkpoints", "last.pt"))
    group = ckpt["optimizer"]["param_groups"][0]
    assert ckpt["args"]["lr"] == 1e-4 and group["initial_lr"] == 1e-4
    assert group["lr"] == pytest.approx(1e-4) and ckpt["args"]["precision"] == "fp16"
    assert ckpt["scaler"]                                           # fp16 after fp32: a scaler
    testing_utils.conventional_checkpoints(out, "ddpm", step=4)     # last.pt == step_4.pt
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_2.pt"))


def test_resume_continues_in_the_folder_that_holds_the_checkpoint(tiny, tmp_path, monkeypatch):
    """A run folder moved, resumed from another working directory without --output_dir: the run
    goes on in the folder its checkpoint is in (not in the relative --output_dir it was started
    with); an explicit --output_dir still wins."""
    monkeypatch.chdir(tmp_path)
    assert ddpm.main([str(a) for a in tiny] + ["--output_dir", "run", "--max_steps", "2",
                                               "--save_every", "2", "--sample_every", "2"]) == 0
    os.rename(tmp_path / "run", tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert ddpm.main(["--resume", str(tmp_path / "moved" / "checkpoints" / "last.pt"),
                      "--max_steps", "3"]) == 0
    assert load(tmp_path / "moved" / "checkpoints" / "last.pt")["step"] == 3
    assert os.listdir(tmp_path / "elsewhere") == []
    assert ddpm.main(["--resume", str(tmp_path / "moved" / "checkpoints" / "last.pt"),
                      "--max_steps", "4", "--output_dir", str(tmp_path / "other")]) == 0
    assert load(tmp_path / "other" / "checkpoints" / "last.pt")["step"] == 4


def test_swa_is_the_mean_of_the_weights_after_swa_start(tiny, tmp_path):
    out = train_run(tiny, tmp_path, "swa", "--swa", "--swa_start", "1", "--max_steps", "3",
                    "--save_every", "1")
    ckpts = [load(os.path.join(out, "checkpoints", f"step_{i}.pt")) for i in (1, 2, 3)]
    assert ckpts[0]["swa"]["n_averaged"].item() == 0
    swa = ckpts[-1]["swa"]
    assert swa["n_averaged"].item() == 2
    for name, value in ckpts[-1]["model"].items():
        expected = (ckpts[1]["model"][name] + value) / 2
        assert torch.allclose(swa[f"module.{name}"], expected, atol=1e-6), name


def test_ema_starts_after_ema_start_steps(tiny, tmp_path):
    out = train_run(tiny, tmp_path, "ema", "--ema_start", "1", "--ema_decay", "0.5",
                    "--save_every", "1")
    one, two = (load(os.path.join(out, "checkpoints", f"step_{i}.pt")) for i in (1, 2))
    assert state_equal(one["ema"]["shadow"], one["model"])          # step 1: a copy
    for name, value in two["model"].items():
        expected = 0.5 * one["model"][name] + 0.5 * value
        assert torch.allclose(two["ema"]["shadow"][name], expected, atol=1e-6), name


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_precision_is_the_autocast_dtype_inside_the_model(tiny, tmp_path, monkeypatch, precision,
                                                          dtype):
    """The dtype of the first convolution's output in every training forward pass is the
    autocast dtype of --precision; only fp16 has a GradScaler."""
    seen, build_model = [], ddpm.build_model

    def build(args):
        model = build_model(args)
        model.input_conv.register_forward_hook(
            lambda module, inputs, out: seen.append((module.training, out.dtype)))
        return model
    monkeypatch.setattr(ddpm, "build_model", build)
    out = train_run(tiny, tmp_path, precision, "--precision", precision)
    assert {d for training, d in seen if training} == {dtype}
    assert sum(training for training, _ in seen) == 2               # one forward per step
    ckpt = load(os.path.join(out, "checkpoints", "last.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert bool(ckpt["scaler"]) == (precision == "fp16")


def nan_after(monkeypatch, steps):
    """Make the loss NaN from call `steps` of training_losses on (or, with a negative number,
    for the first -steps calls). Returns the list of calls."""
    calls, real = [], ddpm.GaussianDiffusion.training_losses

    def training_losses(self, model, x0, y=None):
        calls.append(1)
        bad = len(calls) > steps if steps >= 0 else len(calls) <= -steps
        return [(lambda f=f: f() * float("nan")) if bad else f for f in real(self, model, x0, y)]
    monkeypatch.setattr(ddpm.GaussianDiffusion, "training_losses", training_losses)
    return calls


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_non_finite_steps_are_skipped(tiny, tmp_path, monkeypatch):
    """Two NaN steps, then finite ones: the run finishes, the skipped steps left the weights
    alone and the optimizer took only the finite steps."""
    nan_after(monkeypatch, -2)
    out = train_run(tiny, tmp_path, "skip", "--max_steps", "4", "--save_every", "2",
                    "--max_nonfinite_steps", "3", "--log_every", "1")
    torch.manual_seed(0)                                            # build_run's initial weights
    initial = ddpm.build_model(ddpm.parse_args(tiny)).state_dict()
    two, four = (load(os.path.join(out, "checkpoints", f"step_{i}.pt")) for i in (2, 4))
    assert state_equal(two["model"], initial) and not state_equal(four["model"], initial)
    assert four["optimizer"]["state"][0]["step"].item() == 2
    assert scalars(out, "train/nonfinite_steps")[4] == 2


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_non_finite_steps_stop_the_run(tiny, tmp_path, monkeypatch, capsys):
    calls = nan_after(monkeypatch, 0)
    status, _, err = testing_utils.run_main(ddpm, tiny + [
        "--output_dir", tmp_path / "nan", "--max_steps", "10", "--max_nonfinite_steps", "3"],
        capsys)
    assert status == 1 and len(calls) == 3
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("ddpm.py: error: ")
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()


def test_torchrun_ddp_on_cpu_shares_one_dataset_file_and_resumes_exactly(tmp_path):
    """2 processes (torchrun, gloo) on an image folder: rank 0 decodes it once into one array
    file, both ranks map that file, and both end with the same weights. Resumed at step 2 in 2
    processes, the run ends with bitwise the weights of the uninterrupted one: each rank's
    generators are saved and restored (rank 1's noise and timesteps differ otherwise)."""
    testing_utils.two_colour_folder(tmp_path / "data", size=16, count=10)
    cache = tmp_path / "cache"
    ckpt, records = testing_utils.assert_torchrun_ddp_on_cpu(
        ddpm, TINY + ["--dataset_path", tmp_path / "data", "--cache_dir", cache], tmp_path,
        "--save_every", "2")
    resumed, _ = testing_utils.assert_torchrun_ddp_on_cpu(
        ddpm, ["--resume", tmp_path / "ddp" / "checkpoints" / "step_2.pt"], tmp_path,
        name="resumed")
    for key in ("model", "ema", "optimizer"):
        assert testing_utils.state_equal(ckpt[key], resumed[key]), key
    assert [r["built"] for r in records] == [1, 0]
    arrays = sorted(p for p in os.listdir(cache) if p.endswith(".npy"))
    assert len(arrays) == 1 and [p for p in os.listdir(cache) if ".tmp" in p] == []
    assert records[0]["mapped"] == records[1]["mapped"] == [str(cache / arrays[0])]
    model = ddpm.build_model(ddpm.parse_args(TINY))
    assert testing_utils.weights_hash(ckpt["model"], model) == records[0]["weights"]


def test_kernels_flag_runs_training_through_the_triton_kernels(tiny, tmp_path, monkeypatch):
    """--kernels triton (Triton's interpreter on this CPU) trains to the same weights as
    --kernels torch, and really launches the kernels."""
    pytest.importorskip("triton")
    import kernels
    if not (torch.cuda.is_available() or kernels._INTERPRET):
        pytest.skip("no GPU and no Triton interpreter")
    monkeypatch.setattr(kernels, "_backend", kernels.get_backend())  # restored after the test
    calls = []
    real = kernels.group_norm.group_norm_act
    monkeypatch.setattr(kernels.group_norm, "group_norm_act",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    flags = ["--max_steps", "1", "--preview_samples", "1", "--preview_steps", "1",
             "--image_size", "8", "--attention_resolutions", "", "--channel_mults", "1",
             "--batch_size", "1"]                                   # the interpreter is slow
    outs = {}
    for backend in ("torch", "triton"):
        before = len(calls)
        outs[backend] = train_run(tiny, tmp_path, backend, "--kernels", backend, *flags)
        assert (len(calls) > before) == (backend == "triton")
    a, b = (load(os.path.join(outs[k], "checkpoints", "last.pt")) for k in ("torch", "triton"))
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], atol=1e-5, rtol=1e-4), name


def test_non_square_class_conditional_run_on_the_built_in_dataset(tiny, tmp_path):
    """16x24 images of the built-in dataset with its two classes (day, dusk): the run trains,
    previews and samples at that size, one image of each class."""
    out = train_run(tiny, tmp_path, "run", "--image_size", "16x24", "--class_conditional")
    assert load(os.path.join(out, "checkpoints", "last.pt"))["args"]["num_classes"] == 2
    images = testing_utils.sample_images(ddpm, os.path.join(out, "checkpoints", "last.pt"),
                                         tmp_path / "s", "--num_samples", "2")
    assert images.shape == (2, 16, 24, 3)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_logged_learning_rate_is_warmup_then_the_schedule(tiny, tmp_path, schedule):
    out = train_run(tiny, tmp_path, schedule, "--max_steps", "6", "--warmup_steps", "2",
                    "--lr", "0.01", "--lr_schedule", schedule, "--log_every", "1")
    lrs = scalars(out, "train/lr")
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    for step, lr in lrs.items():                                    # step s used lr(s - 1)
        assert lr == pytest.approx(0.01 * lr_factor(step - 1, 2, 6, schedule), rel=1e-5)
    assert (lrs[6] < lrs[3]) == (schedule == "cosine")


def test_progress_lines_every_log_every_steps_when_not_a_terminal(tiny, tmp_path):
    """A run whose output goes to a pipe (a log file, nohup) prints a progress line every
    --log_every steps and at the last step."""
    result = testing_utils.run_cli(ddpm, tiny + ["--output_dir", tmp_path / "run", "--max_steps",
                                                 "5", "--log_every", "2", "--save_every", "5",
                                                 "--sample_every", "5"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3, result.stdout


def test_final_preview_uses_the_preview_flags(tiny, tmp_path, monkeypatch):
    """Previews draw --preview_samples images with --preview_steps steps, not --num_samples and
    --sampling_steps."""
    calls, sample = [], ddpm.sample
    monkeypatch.setattr(ddpm, "sample", lambda model, diffusion, shape, seeds, sampler, steps,
                        *a, **k: calls.append((shape[0], steps)) or sample(
                            model, diffusion, shape, seeds, sampler, steps, *a, **k))
    out = train_run(tiny, tmp_path, "run", "--preview_samples", "2", "--preview_steps", "3",
                    "--num_samples", "5", "--sampling_steps", "7")
    assert calls == [(2, 3)]
    with Image.open(os.path.join(out, "samples", "step_2.png")) as grid:
        expected = ddpm.make_grid(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape
        assert (grid.height, grid.width, 3) == expected
