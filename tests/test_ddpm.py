"""ddpm.py: the U-Net, the diffusion math against the papers' closed forms (float64), the samplers,
training end to end (learning, exact resume, SWA, DDP, precision) and the sample command."""

import functools
import math
import os

import numpy as np
import pytest
import torch

import ddpm
import testing_utils
from testing_utils import BayesOptimal, Oracle, randomize, state_equal

# A configuration small enough for a 2-core CPU: 16x16 images, a two-level U-Net.
TINY = ["--image_size", "16", "--base_channels", "32", "--channel_mults", "1,2",
        "--num_res_blocks", "1", "--attention_resolutions", "8", "--batch_size", "4",
        "--procedural_size", "32", "--num_samples", "4", "--sampling_steps", "4",
        "--timesteps", "100", "--warmup_steps", "2"]


# tiny_args, train_run: the shared helpers, bound to ddpm and TINY.
tiny_args = functools.partial(testing_utils.tiny_args, ddpm, TINY)
train_run = functools.partial(testing_utils.train_run, ddpm, TINY)


# ------------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("extra, shape", [
    ([], (2, 3, 16, 16)),
    (["--image_size", "16x24"], (2, 3, 16, 24)),
    (["--channel_mults", "1,2,2", "--attention_resolutions", "8,4"], (2, 3, 16, 16)),
    (["--channel_mults", "1", "--attention_resolutions", ""], (1, 3, 16, 16)),
    (["--num_res_blocks", "2", "--num_heads", "2", "--dropout", "0.1"], (3, 3, 16, 16)),
])
def test_unet_shapes(extra, shape):
    args = tiny_args(*extra)
    model = ddpm.build_model(args)
    x = torch.randn(shape)
    t = torch.randint(0, 100, (shape[0],))
    assert model(x, t).shape == shape
    # Zero-initialised output convolution: the untrained network predicts eps = 0 exactly.
    assert torch.count_nonzero(model(x, t)) == 0
    randomize(model)
    out = model(x, t)
    assert out.shape == shape and out.abs().mean() > 0


def test_unet_attention_blocks_are_where_asked():
    def count(args):
        return sum(isinstance(m, ddpm.AttentionBlock) for m in ddpm.build_model(args).modules())
    # One in the middle always; per level: num_res_blocks down + (num_res_blocks + 1) up.
    assert count(tiny_args("--attention_resolutions", "")) == 1
    assert count(tiny_args("--attention_resolutions", "8")) == 1 + 1 + 2
    assert count(tiny_args("--attention_resolutions", "16,8")) == 1 + 2 * (1 + 2)


def test_unet_conditions_on_time_and_class():
    args = tiny_args()
    args.num_classes = 3
    model = randomize(ddpm.build_model(args)).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([5, 5])
    base = model(x, t, torch.tensor([0, 0]))
    assert not torch.allclose(base, model(x, torch.tensor([50, 50]), torch.tensor([0, 0])))
    assert not torch.allclose(base, model(x, t, torch.tensor([1, 1])))
    # y = None is the null label (index num_classes).
    assert torch.allclose(model(x, t, None), model(x, t, torch.tensor([3, 3])))


def test_label_dropout_replaces_labels_by_the_null_label_in_training_only():
    args = tiny_args("--label_dropout", "0.5")
    args.num_classes = 2
    model = randomize(ddpm.build_model(args))
    t, y = torch.zeros(4000, dtype=torch.long), torch.zeros(4000, dtype=torch.long)
    null = model.class_emb.weight[2]
    dropped = (model.train().embed(t, y) - model.time_mlp(ddpm.timestep_embedding(t, 32))
               - null).abs().sum(1) < 1e-5
    assert 0.45 < dropped.float().mean() < 0.55
    dropped_eval = (model.eval().embed(t, y) - model.time_mlp(ddpm.timestep_embedding(t, 32))
                    - null).abs().sum(1) < 1e-5
    assert not dropped_eval.any()


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = ddpm.timestep_embedding(t, 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t]
    assert torch.allclose(emb, torch.tensor(expected), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Diffusion math


def test_linear_schedule_endpoints_and_scaling():
    betas = ddpm.make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    short = ddpm.make_beta_schedule("linear", 250)
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)


def test_cosine_schedule_matches_its_alpha_bar():
    T, s = 1000, 0.008
    betas = ddpm.make_beta_schedule("cosine", T)
    alpha_bar = torch.cumprod(1 - betas, 0)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 1, 250, 500, 900):
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max() <= 0.999 and betas.max() == pytest.approx(0.999)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_decreases_from_one_to_zero(kind):
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule(kind, 1000))
    ab = d.alphas_cumprod.double()
    assert (ab[1:] < ab[:-1]).all()
    assert 0.99 < ab[0] < 1 and ab[-1] < 1e-4


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_buffers_match_bayes_rule_in_float64(kind):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): the product of two Gaussians in
    x_{t-1}, with precision alpha_t / beta_t + 1 / (1 - alpha_bar_{t-1}). Computed here from the
    betas alone, independently of the closed forms (Ho et al. Eq. 7) the buffers use."""
    betas = ddpm.make_beta_schedule(kind, 1000).numpy()
    d = ddpm.GaussianDiffusion(torch.from_numpy(betas))
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    t = np.arange(1, 1000)                                          # t = 0 has zero variance
    precision = alphas[t] / betas[t] + 1 / (1 - ab_prev[t])
    variance = 1 / precision
    coef_xt = variance * np.sqrt(alphas[t]) / betas[t]
    coef_x0 = variance * np.sqrt(ab_prev[t]) / (1 - ab_prev[t])
    np.testing.assert_allclose(d.posterior_variance[t].double(), variance, rtol=1e-5)
    np.testing.assert_allclose(d.posterior_mean_coef1[t].double(), coef_x0, rtol=1e-5)
    np.testing.assert_allclose(d.posterior_mean_coef2[t].double(), coef_xt, rtol=1e-5)
    np.testing.assert_allclose(d.posterior_log_variance_clipped[t].double(), np.log(variance),
                               rtol=1e-5)
    # At t = 0 the posterior is a point mass at x_0; the log-variance is clipped to t = 1's.
    assert d.posterior_variance[0] == 0 and d.posterior_mean_coef1[0] == pytest.approx(1)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    np.testing.assert_allclose(d.sqrt_alphas_cumprod.double(), np.sqrt(ab), rtol=1e-6)
    np.testing.assert_allclose(d.sqrt_one_minus_alphas_cumprod.double(), np.sqrt(1 - ab),
                               rtol=1e-5)
    np.testing.assert_allclose(d.alphas_cumprod_prev.double(), ab_prev, rtol=1e-6)


def test_q_sample_marginal_mean_and_variance():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 1000))
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for step in (0, 100, 500, 999):
        t = torch.full((x0.shape[0],), step)
        x_t = d.q_sample(x0, t, torch.randn_like(x0))
        ab = d.alphas_cumprod[step].double().item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
        assert x_t.var().item() == pytest.approx(1 - ab, abs=5e-3 + 0.01 * (1 - ab))


def test_x0_and_eps_predictions_invert_q_sample():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    assert torch.allclose(d.predict_x0_from_eps(x_t, t, noise), x0, atol=2e-3)
    assert torch.allclose(d.predict_eps_from_x0(x_t, t, x0), noise, atol=2e-3)


def test_ddpm_step_equals_ddim_with_eta_one():
    """With consecutive steps, DDIM at eta = 1 is the ancestral DDPM step (Song et al. Sec. 4.3)."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 1000))
    torch.manual_seed(0)
    x0, eps, z = torch.rand(3, 3, 4, 4) - 0.5, torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    for step in (1, 50, 400, 999):
        t = torch.full((3,), step)
        x_t = d.q_sample(x0, t, eps)
        ancestral = d.p_sample_step(x_t, eps, t, z)
        implicit = d.ddim_step(x_t, eps, step, step - 1, eta=1.0, noise=z)
        assert torch.allclose(ancestral, implicit, atol=1e-4), step


def test_ddim_eta_zero_ignores_noise_and_final_step_returns_x0():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    x0, eps = torch.rand(2, 3, 4, 4) - 0.5, torch.randn(2, 3, 4, 4)
    x_t = d.q_sample(x0, torch.tensor([700, 700]), eps)
    a = d.ddim_step(x_t, eps, 700, 600, eta=0.0, noise=torch.randn_like(x_t))
    b = d.ddim_step(x_t, eps, 700, 600, eta=0.0, noise=torch.randn_like(x_t))
    assert torch.equal(a, b)
    assert not torch.allclose(a, d.ddim_step(x_t, eps, 700, 600, eta=0.5,
                                             noise=torch.randn_like(x_t)))
    assert torch.allclose(d.ddim_step(x_t, eps, 700, -1), x0, atol=1e-4)


@pytest.mark.parametrize("sampler, steps", [("ddim", 10), ("ddim", 1000), ("ddpm", 20)])
def test_samplers_recover_x0_with_the_true_noise(sampler, steps):
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 1000))
    x0 = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    out = d.sample(Oracle(d, x0), x0.shape, sampler=sampler, steps=steps, seeds=[1, 2])
    assert torch.allclose(out, x0, atol=1e-4)


@pytest.mark.parametrize("sampler, steps", [("ddim", 20), ("ddpm", 20), ("ddpm", 200)])
def test_samplers_draw_the_data_distribution_with_the_bayes_optimal_denoiser(sampler, steps):
    """With the exact posterior-mean denoiser, every sample is one of the two colours and both
    appear in the proportions of the data (1/2 each, within sampling error over 64 draws)."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 200))
    colours = torch.tensor([[0.8, -0.7, -0.7], [-0.7, -0.5, 0.8]])
    out = d.sample(BayesOptimal(d, colours), (64, 3, 4, 4), sampler=sampler, steps=steps,
                   seeds=range(64))
    means = out.mean((2, 3))                                        # (64, 3)
    distance = (means[:, None] - colours[None]).abs().amax(2)       # (64, 2)
    assert distance.min(1).values.max() < 1e-3
    assert 20 <= (distance.argmin(1) == 0).sum() <= 44


def test_respacing_keeps_alpha_bar_and_the_identity_respacing_is_the_process():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 1000))
    r = d.respace(50)
    assert r.num_timesteps == 50 and r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
    assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map], rtol=1e-5)
    full = d.respace(1000)
    for name in ("betas", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance"):
        assert torch.allclose(getattr(full, name), getattr(d, name), rtol=1e-4, atol=1e-7), name


def test_ddim_sampling_is_deterministic_and_seeded_per_image():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 100))
    model = randomize(ddpm.build_model(tiny_args())).eval()
    a = d.sample(model, (3, 3, 16, 16), steps=5, seeds=[7, 8, 9])
    b = d.sample(model, (3, 3, 16, 16), steps=5, seeds=[7, 8, 9])
    c = d.sample(model, (2, 3, 16, 16), steps=5, seeds=[8, 9])
    assert torch.equal(a, b)
    assert torch.allclose(a[1:], c, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_training_draws_every_timestep_including_zero():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 100))
    seen = []

    def model(x, t, y=None):
        seen.append(t)
        return torch.zeros_like(x)
    for _ in range(400):
        d.training_loss(model, torch.zeros(8, 3, 2, 2))
    seen = torch.cat(seen)
    assert set(seen.tolist()) == set(range(100))


@pytest.mark.parametrize("loss, expected", [("mse", lambda e: (e ** 2).mean()),
                                            ("l1", lambda e: e.abs().mean()),
                                            ("huber", lambda e: torch.where(
                                                e.abs() < 1, 0.5 * e ** 2, e.abs() - 0.5).mean())])
def test_training_loss_kinds(loss, expected):
    """With eps_theta = 0 the loss is a function of the drawn noise alone."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 100), loss=loss)
    torch.manual_seed(3)
    value = d.training_loss(lambda x, t, y=None: torch.zeros_like(x), torch.zeros(4, 3, 5, 5))
    torch.manual_seed(3)
    torch.randint(0, 100, (4,))
    noise = torch.randn(4, 3, 5, 5)
    assert value.item() == pytest.approx(expected(noise).item(), rel=1e-6)


def test_classifier_free_guidance_combines_conditional_and_unconditional():
    args = tiny_args()
    args.num_classes = 2
    model = randomize(ddpm.build_model(args)).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 20]), torch.tensor([0, 1])
    cond, uncond = model(x, t, y), model(x, t, torch.tensor([2, 2]))
    assert torch.allclose(ddpm.guided_eps(model, x, t, y, 1.0), cond, atol=1e-6)
    assert torch.allclose(ddpm.guided_eps(model, x, t, y, 3.0), uncond + 3 * (cond - uncond),
                          atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Training pieces


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


def test_lr_schedule():
    assert ddpm.lr_lambda(0, 10, 110, "cosine") == pytest.approx(0.1)
    assert ddpm.lr_lambda(9, 10, 110, "cosine") == pytest.approx(1.0)
    assert ddpm.lr_lambda(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert ddpm.lr_lambda(110, 10, 110, "cosine") == pytest.approx(0.0)
    assert ddpm.lr_lambda(100, 10, 110, "constant") == 1.0


def test_batch_stream_covers_each_epoch_once_and_splits_ranks():
    one = ddpm.BatchStream(10, 5, seed=0)
    assert sorted(torch.cat([one.indices(0), one.indices(1)]).tolist()) == list(range(10))
    assert not torch.equal(torch.cat([one.indices(0), one.indices(1)]),
                           torch.cat([one.indices(2), one.indices(3)]))      # reshuffled
    ranks = [ddpm.BatchStream(10, 5, seed=0, rank=r, world=2) for r in (0, 1)]
    assert sorted(torch.cat([r.indices(0) for r in ranks]).tolist()) == list(range(10))
    assert torch.equal(ddpm.BatchStream(10, 3, seed=0).indices(7),
                       ddpm.BatchStream(10, 3, seed=0).indices(7))


def test_hflip_flag():
    images = torch.randint(0, 256, (100, 3, 2, 4), dtype=torch.uint8)
    x, _ = ddpm.make_batch(images, None, torch.arange(100), False, torch.device("cpu"))
    assert torch.equal(x, images.float() / 127.5 - 1)
    torch.manual_seed(0)
    x, _ = ddpm.make_batch(images, None, torch.arange(100), True, torch.device("cpu"))
    flipped = (x == images.float().flip(3) / 127.5 - 1).flatten(1).all(1)
    kept = (x == images.float() / 127.5 - 1).flatten(1).all(1)
    assert 20 < flipped.sum() < 80 and bool((flipped | kept).all())


def test_paper_preset_is_ho_et_al():
    args = ddpm.parse_args(["--preset", "paper"])
    assert (args.base_channels, args.channel_mults, args.num_res_blocks) == (128, [1, 2, 2, 2], 2)
    assert (args.attention_resolutions, args.dropout, args.lr, args.schedule) == \
        ([16], 0.1, 2e-4, "linear")
    assert ddpm.parse_args(["--preset", "paper", "--image_size", "256"]).channel_mults == \
        [1, 1, 2, 2, 4, 4]
    assert ddpm.parse_args(["--preset", "paper", "--lr", "1e-4"]).lr == 1e-4   # flags win


# ------------------------------------------------------------------------------------------------
# End to end


def test_learns_two_colours(tmp_path):
    """A tiny model trained for 600 steps on flat red and blue images samples flat images close
    to red or blue, and both. The colour is decided at the noisiest steps, where the epsilon loss
    carries little signal, so a run this short is not exact: distances are the largest channel
    difference in [0, 1] units, judged over 16 samples. An untrained or broken model gives noise
    or arbitrary colours; the sampler itself is exact (test_samplers_draw_the_data_distribution
    _with_the_bayes_optimal_denoiser)."""
    testing_utils.assert_learns_two_colours(ddpm, tmp_path, 8, 600, "--attention_resolutions", "4")


def test_resume_is_exact(tmp_path):
    """4 steps in one run == resume from that run's step-2 checkpoint for 2 more steps, bitwise,
    with dropout, flips, gradient accumulation, label dropout and the cosine schedule in play."""
    _, resumed = testing_utils.assert_resume_is_exact(
        ddpm, TINY + ["--accumulation_iters", "2", "--dropout", "0.1", "--class_conditional",
                      "--ema_start", "1", "--swa", "--swa_start", "1"],
        tmp_path, ("model", "ema", "swa", "optimizer", "lr_scheduler", "scaler"))
    assert resumed["ema"]["num_updates"] == 4


def test_stopping_and_resuming_equals_one_run(tmp_path):
    """2N steps in one run == N steps, stop, `--resume latest --max_steps 2N`. With a constant
    learning rate after warmup, since a cosine decay depends on --max_steps itself."""
    common = TINY + ["--lr_schedule", "constant", "--save_every", "100", "--sample_every", "100",
                     "--dropout", "0.1", "--ema_start", "1"]
    one = str(tmp_path / "one")
    assert ddpm.main(common + ["--output_dir", one, "--max_steps", "4"]) == 0
    two = str(tmp_path / "two")
    assert ddpm.main(common + ["--output_dir", two, "--max_steps", "2"]) == 0
    assert ddpm.main(common + ["--output_dir", two, "--max_steps", "4", "--resume", "latest"]) == 0
    a = torch.load(os.path.join(one, "checkpoints", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(two, "checkpoints", "last.pt"), weights_only=True)
    for key in ("model", "ema", "optimizer"):
        assert state_equal(a[key], b[key]), key


def test_resume_latest_continues_a_run(tmp_path):
    out = train_run(tmp_path, "run")
    assert ddpm.main(TINY + ["--output_dir", out, "--max_steps", "3", "--resume", "latest",
                             "--save_every", "3", "--sample_every", "3"]) == 0
    assert torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)["step"] == 3
    assert os.path.exists(os.path.join(out, "checkpoints", "step_2.pt"))


def test_swa_is_the_mean_of_the_weights_after_swa_start(tmp_path):
    out = train_run(tmp_path, "swa", "--swa", "--swa_start", "1", "--max_steps", "3",
                    "--save_every", "1")
    ckpts = [torch.load(os.path.join(out, "checkpoints", f"step_{i}.pt"), weights_only=True)
             for i in (2, 3)]
    swa = ckpts[-1]["swa"]
    assert swa["n_averaged"].item() == 2
    for name, value in ckpts[-1]["model"].items():
        expected = (ckpts[0]["model"][name] + value) / 2
        assert torch.allclose(swa[f"module.{name}"], expected, atol=1e-6), name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    out = train_run(tmp_path, precision, "--precision", precision)
    ckpt = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert bool(ckpt["scaler"]) == (precision == "fp16")          # GradScaler only for fp16


def test_nonfinite_gradients_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ddpm.GaussianDiffusion, "training_loss",
                        lambda self, model, x0, y=None: model(x0, torch.zeros(
                            len(x0), dtype=torch.long)).sum() * float("nan"))
    out = str(tmp_path / "nan")
    status = ddpm.main(TINY + ["--output_dir", out, "--max_steps", "10",
                               "--max_nonfinite_steps", "3"])
    assert status == 1
    err = capsys.readouterr().err
    errors = [line for line in err.split("ddpm.py: error: ")[1:]]
    assert len(errors) == 1 and errors[0].startswith("3 consecutive steps with non-finite")
    assert "Traceback" not in err


trained = testing_utils.trained_fixture(train_run)                  # reused by the sampling tests


def test_sample_command_is_independent_of_batch_size(trained, tmp_path):
    ckpt = os.path.join(trained, "checkpoints", "last.pt")
    variants = [["--batch_size", "1"], ["--batch_size", "3"]]
    for out in testing_utils.assert_same_samples(ddpm, ckpt, tmp_path, variants):
        assert os.path.exists(os.path.join(out, "grid.png"))


@pytest.mark.parametrize("flags", testing_utils.SAMPLE_FLAGS)
def test_sample_command_flags(trained, tmp_path, flags):
    testing_utils.assert_flags_change_the_samples(
        ddpm, os.path.join(trained, "checkpoints", "last.pt"), tmp_path, flags)


def test_save_gif(trained, tmp_path):
    testing_utils.assert_saves_gif(ddpm, os.path.join(trained, "checkpoints", "last.pt"), tmp_path)


def test_torchrun_ddp_on_cpu(tmp_path):
    testing_utils.assert_torchrun_ddp_on_cpu(ddpm, TINY, tmp_path)


def test_optimisation_and_logging_flags_reach_their_targets(tmp_path, monkeypatch):
    clip_norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        clip_norms.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    out = train_run(tmp_path, "flags", "--max_steps", "3", "--save_every", "3",
                    "--sample_every", "3", "--weight_decay", "0.05", "--grad_clip", "0.5",
                    "--log_every", "1", "--loss", "l1", "--no_hflip")
    assert clip_norms == [0.5] * 3
    ckpt = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    assert ckpt["args"]["loss"] == "l1" and ckpt["args"]["hflip"] is False
    events = testing_utils.tensorboard_events(out)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]  # --log_every 1


def test_kernels_flag_runs_training_through_the_triton_kernels(tmp_path, monkeypatch):
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
    flags = ["--max_steps", "1", "--num_samples", "1", "--sampling_steps", "1",
             "--image_size", "8", "--attention_resolutions", "", "--channel_mults", "1",
             "--batch_size", "1"]                                   # the interpreter is slow
    outs = {}
    for backend in ("torch", "triton"):
        before = len(calls)
        outs[backend] = train_run(tmp_path, backend, "--kernels", backend, *flags)
        assert (len(calls) > before) == (backend == "triton")
    a, b = (torch.load(os.path.join(outs[k], "checkpoints", "last.pt"), weights_only=True)
            for k in ("torch", "triton"))
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], atol=1e-5, rtol=1e-4), name


def test_resume_keeps_the_run_configuration_and_explicit_flags_override_it(tmp_path):
    out = train_run(tmp_path, "run", "--lr", "5e-4", "--loss", "l1", "--weight_decay", "0.01")
    # No flags but --resume: the run continues with its own configuration.
    assert ddpm.main(["--resume", "latest", "--output_dir", out, "--max_steps", "3"]) == 0
    ckpt = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert (ckpt["args"]["lr"], ckpt["args"]["loss"], ckpt["args"]["image_size"]) == \
        (5e-4, "l1", [16, 16])
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    # An explicit --lr now takes effect in the optimizer, not only in args.json.
    assert ddpm.main(["--resume", "latest", "--output_dir", out, "--max_steps", "4", "--lr",
                      "1e-4", "--lr_schedule", "constant"]) == 0
    ckpt = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert ckpt["args"]["lr"] == 1e-4 and group["initial_lr"] == 1e-4
    assert group["lr"] == pytest.approx(1e-4)
    # last.pt is a hard link to the newest step checkpoint, not a second copy.
    assert os.path.samefile(os.path.join(out, "checkpoints", "last.pt"),
                            os.path.join(out, "checkpoints", "step_4.pt"))


def test_resume_with_fp16_after_fp32(tmp_path):
    out = train_run(tmp_path, "run")
    assert ddpm.main(["--resume", "latest", "--output_dir", out, "--max_steps", "3",
                      "--precision", "fp16"]) == 0


@pytest.mark.parametrize("flags, phrase", [
    (["--image_size", "32"], "--image_size [16, 16] (checkpoint) vs [32, 32] (now)"),
    (["--schedule", "linear"], "--schedule cosine (checkpoint) vs linear (now)"),
])
def test_sample_refuses_flags_that_change_the_network(trained, tmp_path, capsys, flags, phrase):
    status = ddpm.main(["--sample", "--checkpoint", os.path.join(trained, "checkpoints",
                                                                  "last.pt"),
                        "--output_dir", str(tmp_path / "s")] + flags)
    err = capsys.readouterr().err
    assert status == 2 and err.count("ddpm.py: error:") == 1 and phrase in err, err


def test_sample_refuses_class_flags_on_an_unconditional_model(tmp_path, capsys):
    out = train_run(tmp_path, "run")
    status = ddpm.main(["--sample", "--checkpoint", os.path.join(out, "checkpoints", "last.pt"),
                        "--output_dir", str(tmp_path / "s"), "--guidance_scale", "2"])
    err = capsys.readouterr().err
    assert status == 2 and "unconditional" in err and err.count("\n") == 1
