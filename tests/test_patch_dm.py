"""patch_dm.py (Ding et al. 2024): the geometry of the two grids and the collage against their
definitions, the training block and its loss against closed forms, the semantic code in a
ResBlock against its formula, guidance, --patch_batch against the one-batch pass, the latent
model on a two-cluster distribution, a learning test with the seam metric against --no_collage,
and the command line in both phases (exact resume, DDP, bad input).

Everything else (data, checkpoints, the training loop, ...) is ddpm.py's, kept identical by
tests/test_copies.py and tested in ddpm.py's tests.
"""

import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import patch_dm as pdm
import testing_utils
from testing_utils import assert_user_error, randomize, run_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# 16 x 24 images in 8 x 8 patches (a 2 x 3 grid), a two-level U-Net with attention at 4, a small
# latent MLP.
TINY = ["--image_size", "16x24", "--patch_size", "8", "--base_channels", "8",
        "--channel_mults", "1,2", "--attention_resolutions", "4", "--num_heads", "1",
        "--latent_width", "16", "--latent_layers", "3", "--batch_size", "4",
        "--latent_batch_size", "4", "--procedural_size", "6", "--warmup_steps", "1",
        "--preview_samples", "2", "--preview_steps", "2",
        "--num_samples", "2", "--sampling_steps", "3", "--latent_sampling_steps", "3",
        "--num_workers", "1", "--ema_start", "0"]
CPU = torch.device("cpu")


def tiny_model(*extra, num_images=4):
    args = pdm.parse_args(TINY + list(extra))
    args.num_images = num_images
    return args, randomize(pdm.build_model(args)).eval()


@pytest.fixture
def tiny(tmp_path):
    return TINY + ["--cache_dir", str(tmp_path / "cache")]


# ------------------------------------------------------------------------------------------------
# The two grids and the collage


def coordinates(height, width, s, p):
    """Features at s pixels per patch of p image pixels: channel 0 the row, 1 the column of each
    feature pixel's centre in padded-image pixels, (1, 2, height, width)."""
    rows = (torch.arange(height, dtype=torch.float64) + 0.5) * p / s
    cols = (torch.arange(width, dtype=torch.float64) + 0.5) * p / s
    return torch.stack([rows[:, None].expand(height, width),
                        cols[None, :].expand(height, width)])[None]


@pytest.mark.parametrize("s", [8, 4, 2])
def test_collage_of_the_padded_grid_is_the_image_grid(s):
    """A 3 x 5 image grid of p = 8: features that are their own padded-image coordinates, at s
    feature pixels per patch (every level of a U-Net). The collage of the 4 x 6 padded-grid
    patches is, exactly, the image-grid patches: those of the padded image shifted by p/2."""
    p, N, M = 8, 3, 5
    padded = coordinates((N + 1) * s, (M + 1) * s, s, p)           # (1, 2, 4 s, 6 s)
    collaged = pdm.feature_collage(pdm.split_patches(padded, s), N + 1, M + 1)
    assert collaged.shape == (N * M, 2, s, s)
    image = coordinates(N * s, M * s, s, p) + p / 2                # image pixel + p/2 = padded
    assert torch.equal(collaged, pdm.split_patches(image, s))
    # each image-grid patch (i, j) starts half a patch after padded-grid patch (i, j)
    first = pdm.split_patches(padded, s).reshape(N + 1, M + 1, 2, s, s)[:N, :M]
    assert torch.equal(collaged.reshape(N, M, 2, s, s)[..., 0, 0], first[..., 0, 0] + p / 2)


def test_split_merge_pad():
    x = torch.randn(2, 3, 24, 40)
    patches = pdm.split_patches(x, 8)
    assert patches.shape == (2 * 3 * 5, 3, 8, 8)
    assert torch.equal(patches[5 + 2], x[0, :, 8:16, 16:24])       # image 0, row 1, column 2
    assert torch.equal(pdm.merge_patches(patches, 3, 5), x)
    padded = pdm.pad_to_grid(x, 8)
    assert padded.shape == (2, 3, 32, 48)
    assert torch.equal(padded[..., 4:-4, 4:-4], x)
    padded[..., 4:-4, 4:-4] = 0
    assert not padded.any()                                         # the ring is zero


def test_positions_of_encoder_and_decoder_patches(monkeypatch):
    """A 2 x 2 block at padded row 1, column 2: the encoder's four patches are at (1, 2), (1, 3),
    (2, 2), (2, 3); the decoder's collaged patch at (1.5, 2.5); the plain pass at the encoder's."""
    _, model = tiny_model()
    seen = []
    real = model.unet.embed
    monkeypatch.setattr(model.unet, "embed", lambda t, rows, cols, z, use: seen.append(
        (rows.tolist(), cols.tolist())) or real(t, rows, cols, z, use))
    with torch.no_grad():
        model.unet(torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.randn(1, 512),
                   torch.tensor([1]), torch.tensor([2]), torch.ones(1), plain=True)
    assert seen == [([1, 1, 2, 2], [2, 3, 2, 3]), ([1.5], [2.5])]


def test_the_collage_takes_every_skip_and_the_middle_block(monkeypatch):
    """forward collages each feature that encode returns (the input conv's, every encoder
    level's, the middle block's), at its own resolution; --no_collage collages the output."""
    _, model = tiny_model()
    x, args = torch.randn(1, 3, 16, 24), (torch.tensor([3]), torch.randn(1, 512),
                                         torch.tensor([0]), torch.tensor([0]), torch.ones(1))
    sides, real = [], pdm.feature_collage
    monkeypatch.setattr(pdm, "feature_collage", lambda h, r, q: sides.append(
        (h.shape[1], h.shape[-1])) or real(h, r, q))
    with torch.no_grad():
        model.unet(x, *args)
        features = model.unet.encode(pdm.split_patches(x, 8),
                                     model.unet.embed(*[torch.zeros(6)] * 3, torch.zeros(6, 512),
                                                      torch.ones(6)))
        assert sides == [(f.shape[1], f.shape[-1]) for f in features]
        assert len(sides) == len(model.unet.down) + 2 and {s for _, s in sides} == {8, 4}
        sides.clear()
        model.unet.collage = False
        model.unet(x, *args)
    assert sides == [(3, 8)]


def test_training_block_centre_is_its_image_grid_patch(monkeypatch):
    """x0 prediction and a network that outputs zeros: the loss is the mean square of x0 over the
    block's centre plus the masked mean square over the block; with the block at padded (1, 0)
    of a 2 x 3 grid, the centre is image-grid patch (1, 0) of the image, and the network is
    asked for it at the block's place."""
    args, model = tiny_model("--prediction", "x0")
    diffusion = pdm.build_diffusion(args)
    x0 = torch.rand(3, 3, 16, 24) * 2 - 1
    monkeypatch.setattr(pdm, "draw_blocks", lambda b, rows, cols, device: (
        torch.ones(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)))
    calls = []

    def zero_net(x_t, t, index, keep, top, left, use):
        calls.append((top.tolist(), left.tolist()))
        # the block's padding (left 4 columns, bottom 4 rows) is exactly 0, the rest is not
        assert not x_t[..., :4].any() and not x_t[..., 12:, :].any()
        assert x_t[..., :12, 4:].abs().min() > 0
        return torch.zeros(len(x_t), 3, 8, 8), torch.zeros_like(x_t)
    loss = diffusion.training_losses(zero_net, x0, torch.arange(3))[0]()
    centre = x0[:, :, 8:16, 0:8]                                    # image-grid patch (1, 0)
    block = pdm.pad_to_grid(x0, 8)[:, :, 8:24, 0:16]                # padded rows 1-2, cols 0-1
    expected = (centre ** 2).mean() + (block ** 2).sum() / block.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert calls == [([1, 1, 1], [0, 0, 0])]


@pytest.mark.parametrize("block, inside", [((1, 1), 1.0), ((0, 0), 9 / 16), ((1, 0), 12 / 16)],
                         ids=["interior", "corner", "edge"])
def test_zero_network_loss_is_one_plus_the_inside_fraction(monkeypatch, block, inside):
    """eps = 1 everywhere and the untrained network (it outputs 0): the collage term is 1, the
    plain term the fraction of the 2p x 2p block inside the image (a 3 x 3 grid)."""
    args = pdm.parse_args(TINY + ["--image_size", "24", "--prediction", "eps"])
    args.num_images = 2
    model, diffusion = pdm.build_model(args), pdm.build_diffusion(args)
    monkeypatch.setattr(pdm, "draw_blocks", lambda b, rows, cols, device: tuple(
        torch.full((b,), v, dtype=torch.long) for v in block))
    monkeypatch.setattr(torch, "randn_like", torch.ones_like)
    loss = diffusion.training_losses(model, torch.rand(2, 3, 24, 24) * 2 - 1, torch.arange(2))
    assert loss[0]().item() == pytest.approx(1 + inside, rel=1e-6)


def test_the_code_enters_the_resblock_as_stated():
    """CodeResBlock with hand-set weights against GN(h) (1 + s) + b, times (1 + Linear(SiLU(z))),
    then SiLU and conv, in float64."""
    torch.manual_seed(0)
    block = pdm.CodeResBlock(8, 8, 16, 0.0).eval()
    randomize(block)
    x, emb, z = torch.randn(2, 8, 6, 6), torch.randn(2, 32), torch.randn(2, 512)
    with torch.no_grad():
        out = block(x, torch.cat([emb, z], 1)).double()
        d = lambda m: {k: v.double() for k, v in m.state_dict().items()}
        w = d(block)
        x, emb, z = x.double(), emb.double(), z.double()
        h = F.conv2d(F.silu(F.group_norm(x, block.norm1.num_groups, w["norm1.weight"],
                                         w["norm1.bias"])), w["conv1.weight"], w["conv1.bias"],
                     padding=1)
        s, b = (F.silu(emb) @ w["emb_proj.1.weight"].T + w["emb_proj.1.bias"]).chunk(2, 1)
        c = F.silu(z) @ w["code_proj.1.weight"].T + w["code_proj.1.bias"]
        g = F.group_norm(h, block.norm2.num_groups, w["norm2.weight"], w["norm2.bias"])
        g = (g * (1 + s[..., None, None]) + b[..., None, None]) * (1 + c[..., None, None])
        expected = x + F.conv2d(F.silu(g), w["conv2.weight"], w["conv2.bias"], padding=1)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, block(x.float(), torch.cat([emb, 0 * z], 1).float()).double(),
                              atol=1e-3)


def test_guidance_zeroes_code_and_position_only_in_the_unconditional_branch():
    """Two passes: the conditional one with the code and position, the unconditional one with
    both zero; the result is out_u + s (out_c - out_u). And a dropped position embeds as the
    original's null position: the position MLP of zero sinusoids."""
    calls = []

    def net(window, t, z, top, left, use, chunk):
        calls.append((z.clone(), use.clone()))
        return window[:, :, 4:-4, 4:-4] * 0 + z[:, :1, None, None] + 10 * use[:, None, None, None]
    z = torch.full((1, 512), 3.0)
    out = pdm.guided_noise(net, torch.zeros(1, 3, 16, 16), torch.tensor([5]), z, 0, 0, 2.0, 0)
    assert torch.equal(calls[0][0], z) and calls[0][1].tolist() == [1.0]
    assert not calls[1][0].any() and calls[1][1].tolist() == [0.0]
    assert torch.allclose(out, torch.full_like(out, 0 + 2.0 * 13))  # u = 0, c = 13
    calls.clear()
    pdm.guided_noise(net, torch.zeros(1, 3, 16, 16), torch.tensor([5]), z, 0, 0, 1.0, 0)
    assert len(calls) == 1
    _, model = tiny_model()
    emb = model.unet.embed(torch.tensor([3, 3]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]),
                           torch.zeros(2, 512), torch.tensor([1.0, 0.0]))
    position = emb[:, 32:64]                                        # [time, position, code]
    null = model.unet.position_mlp(torch.zeros(1, 2 * pdm.POSITION_DIM))[0]
    assert torch.allclose(position[1], null, atol=1e-6) and not torch.allclose(position[0], null)


# ------------------------------------------------------------------------------------------------
# Sampling


def test_patch_batch_gives_the_one_batch_samples():
    """A 3 x 5 grid (24 x 40 in 8 x 8 patches), two images with their own codes, 6 DDIM steps of a
    randomised network: --patch_batch 1, 3 (windows of 1 x 1), 9 (2 x 2, cut at the edges) and
    16 (3 x 3) draw the images of 0 (one batch), within 1e-5."""
    args, model = tiny_model()
    diffusion, z = pdm.build_diffusion(args), torch.randn(2, 512)
    assert [len(pdm.tiles(3, 5, k)) for k in (0, 1, 3, 9, 16)] == [1, 15, 15, 6, 2]
    batch, *others = (pdm.sample(model.unet, diffusion, (2, 3, 24, 40), [1, 2], z, steps=6,
                                 patch_batch=k) for k in (0, 1, 3, 9, 16))
    for other in others:
        assert (other - batch).abs().max() <= 1e-5
    assert batch.std() > 0.1 and (batch[0] - batch[1]).abs().mean() > 0.1


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_the_padding_ring_stays_zero(sampler, eta):
    args, model = tiny_model()
    process = pdm.build_diffusion(args).respace(5)
    x = pdm.pad_to_grid(torch.randn(2, 3, 16, 24), 8)
    noise = pdm.pad_to_grid(torch.randn(2, 3, 16, 24), 8)
    t = torch.full((2,), 3, dtype=torch.long)
    out = pdm.denoise_step(model.unet, process, x, t, torch.randn(2, 512), sampler, eta, noise,
                           patch_batch=1)
    inner = out[..., 4:-4, 4:-4].clone()
    assert inner.abs().min() > 0
    out[..., 4:-4, 4:-4] = 0
    assert not out.any()


def test_seam_score_sees_seams():
    """A smooth ramp down and across has no seams (score 1); blocks of p/2 of different flat
    values have all their differences on the grid lines."""
    ramp = (torch.arange(32.0) + torch.arange(16.0)[:, None]).expand(1, 3, 16, 32)
    assert pdm.seam_score(ramp, 8) == pytest.approx(1.0)
    blocks = torch.arange(8.0).repeat_interleave(4)[None, None, None].expand(1, 3, 16, 32)
    blocks = blocks + 0.01 * torch.randn(1, 3, 16, 32)
    assert pdm.seam_score(blocks, 8) > 100


def test_thumbnail_codes_keep_the_distances_of_the_thumbnails():
    """With every principal component kept (N - 1 < 512), the codes are the centred thumbnails
    rotated and scaled: their pairwise distances are the thumbnails' times one factor."""
    images = np.random.default_rng(0).integers(0, 256, (10, 3, 16, 32), dtype=np.uint8)
    codes = pdm.thumbnail_codes(images).double()
    assert codes.shape == (10, 512)
    assert codes.norm(dim=1).mean().item() == pytest.approx(pdm.CODE_NORM, rel=1e-5)
    thumbs = F.adaptive_avg_pool2d(torch.tensor(images).double(), (8, 16)).flatten(1)
    ratio = torch.cdist(codes, codes)[~torch.eye(10, dtype=bool)] / \
        torch.cdist(thumbs, thumbs)[~torch.eye(10, dtype=bool)]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4)


def test_latent_mlp_is_diffaes_mlpskipnet():
    """eps_theta(z, t) against DiffAE's MLPSkipNet written out in float64 with the same (random)
    weights: e = MLP(sinusoid(t)) of 512 channels, hidden layers SiLU(LN(W h (1 + W_c SiLU(e)))),
    the input code concatenated from the second layer on; at the paper's 10 x 2048 it has
    DiffAE's parameter count."""
    net = randomize(pdm.LatentMLP(width=16, layers=3), 0)
    z, t = torch.randn(4, 512), torch.tensor([0, 10, 500, 999])
    f64 = lambda module: [p.double() for p in module.parameters()]
    e = pdm.timestep_embedding(t, 64).double()
    e = F.linear(F.silu(F.linear(e, *f64(net.time_mlp[0]))), *f64(net.time_mlp[2]))
    h = z.double()
    for i in range(2):
        h = F.linear(h if i == 0 else torch.cat([h, z.double()], 1), *f64(net.layers[i]))
        h = h * (1 + F.linear(F.silu(e), *f64(net.conds[i][1])))
        h = F.silu(F.layer_norm(h, (16,), *f64(net.norms[i])))
    expected = F.linear(torch.cat([h, z.double()], 1), *f64(net.layers[2]))
    assert torch.allclose(net(z, t).double(), expected, atol=1e-4, rtol=1e-5)
    w, n = 2048, 10
    diffae = (64 * 512 + 512 + 512 * 512 + 512) + (512 * w + w) + (n - 2) * ((w + 512) * w + w) \
        + ((w + 512) * 512 + 512) + (n - 1) * (512 * w + w) + (n - 1) * 2 * w
    assert sum(p.numel() for p in pdm.LatentMLP(w, n).parameters()) == diffae == 54_109_696


def test_latent_model_learns_two_clusters():
    """Codes at 5 +- 2 mu (mu = 1 in every entry; plus a little noise), as two kinds of images
    would have: after training the latent MLP with the latent process's loss, the codes it
    samples fall near the two centres, and in both."""
    torch.manual_seed(0)
    mu = torch.ones(512)
    table = 5 + 2 * torch.cat([mu + 0.05 * torch.randn(32, 512), -mu + 0.05 * torch.randn(32, 512)])
    mean, std = pdm.code_statistics(table)
    latent, diffusion = pdm.LatentMLP(width=64, layers=4), pdm.latent_diffusion()
    optimizer = torch.optim.AdamW(latent.parameters(), lr=2e-3, weight_decay=0.01)
    for _ in range(600):
        z0 = (table[torch.randint(0, 64, (64,))] - mean) / std
        loss = diffusion.training_losses(latent, z0)[0]()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    codes = pdm.sample_codes(latent.eval(), table, list(range(40)), steps=20)
    along = ((codes - 5) / 2) @ mu / mu.norm() ** 2                 # +1 or -1 at the centres
    error = (along - along.sign()).abs()
    assert error.median() < 0.3 and error.max() < 0.75, along
    assert 8 <= (along > 0).sum() <= 32


# ------------------------------------------------------------------------------------------------
# Learning, and the command line


def ramp_folder(root, count=8):
    """16 x 32 images whose patches differ by position: a horizontal ramp from one colour to
    another, a different pair per image."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 32)[None, :, None]
    for i in range(count):
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        image = (a + (b - a) * x) * np.ones((16, 1, 1))
        testing_utils.save_image((image * 255).astype(np.uint8), os.path.join(root,
                                                                               f"{i}.png"))
    return root


def test_learns_ramps_without_seams_where_independent_patches_have_them(tmp_path):
    """Trained on ramps, the collage model samples ramps (flat down each column, one colour at
    the left and another at the right: it knows where each patch is), with a seam metric under
    3 and under that of the same training with --no_collage."""
    data, scores = ramp_folder(str(tmp_path / "ramps")), {}
    for name, flags in {"collage": [], "independent": ["--no_collage"]}.items():
        testing_utils.toy_run(pdm, data, tmp_path / name, 300, "--image_size", "16x32",
                              "--patch_size", "8", "--channel_mults", "1,2", "--timesteps", "200",
                              "--latent_steps", "0", "--preview_size", "16x32", "--batch_size",
                              "8", *flags)
        images = testing_utils.sample_images(pdm, tmp_path / name / "checkpoints" / "last.pt",
                                             tmp_path / f"{name}-samples", "--num_samples", "8",
                                             "--sampling_steps", "20")
        assert images.shape == (8, 16, 32, 3)
        scores[name] = pdm.seam_score(torch.tensor(images).permute(0, 3, 1, 2).float(), 8)
        if name == "collage":                                       # ramps: flat down each column
            assert (images / 255).std(axis=1).mean() < 0.12        # uniform noise: 0.29
            ends = np.abs(images[:, :, -4:].mean((1, 2)) - images[:, :, :4].mean((1, 2))) / 255
            assert np.median(ends.max(1)) > 0.2                     # left and right differ
    assert scores["collage"] < scores["independent"], scores
    assert scores["collage"] < 3, scores


def test_help_documents_the_method_flags(capsys):
    """Each of the method's own flags has its block in --help (the shared ones are ddpm.py's
    test)."""
    blocks = testing_utils.help_blocks(pdm, capsys)
    for flag in ["--patch_size", "--collage", "--cfg", "--patch_batch", "--code_from",
                 "--preview_size", "--latent_steps", "--latent_batch_size", "--latent_lr",
                 "--latent_weight_decay", "--latent_width", "--latent_layers",
                 "--latent_sampling_steps"]:
        assert flag in blocks, flag


def test_resume_is_exact_in_both_phases(tiny, tmp_path):
    """2 U-Net steps and 2 latent steps in one run; resumed from step 1 (across the switch) and
    from step 3 (inside the latent phase): the same last checkpoint. The latent phase moves
    only the latent model and its EMA; the U-Net's EMA stays as its phase left it."""
    common = tiny + ["--max_steps", "2", "--latent_steps", "2", "--latent_lr", "5e-4",
                     "--save_every", "1",
                     "--sample_every", "100", "--log_every", "1"]
    full = tmp_path / "full"
    assert pdm.main(common + ["--output_dir", str(full)]) == 0
    testing_utils.conventional_outputs(full, step=4)
    last, _ = testing_utils.conventional_checkpoints(full, "patch_dm", step=4)
    for start in (1, 3):
        out = tmp_path / f"from{start}"
        assert pdm.main(common + ["--output_dir", str(out), "--resume",
                                  str(full / "checkpoints" / f"step_{start}.pt")]) == 0
        resumed = testing_utils.load(out / "checkpoints" / "last.pt")
        for key in ("model", "ema", "optimizer", "nimg", "rng"):
            assert testing_utils.state_equal(resumed[key], last[key]), (start, key)
    two = testing_utils.load(full / "checkpoints" / "step_2.pt")
    unet = lambda state: {k: v for k, v in state.items() if k.startswith("unet.")}
    assert testing_utils.state_equal(unet(two["model"]), unet(last["model"]))
    assert testing_utils.state_equal(two["ema"]["unet"], last["ema"]["unet"])
    assert not testing_utils.state_equal(two["ema"]["latent"], last["ema"]["latent"])
    assert last["model"]["latent.trained"] == 1 and two["model"]["latent.trained"] == 0
    groups = [ckpt["optimizer"]["param_groups"][0] for ckpt in (two, last)]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.01]
    assert [g["lr"] for g in groups] == pytest.approx([5e-4, 5e-4])  # from step 2 on
    # In the latent phase (step 3) --max_steps is refused: the latent model learned the codes;
    # at step 2, before it, more U-Net steps are fine.
    for start, code in ((3, 2), (2, 0)):
        assert pdm.main(common + ["--output_dir", str(tmp_path / f"longer{start}"), "--max_steps",
                                  "3", "--resume",
                                  str(full / "checkpoints" / f"step_{start}.pt")]) == code


def randomised(path):
    """A checkpoint of a 2-step run whose U-Nets (EMA and raw, each its own) are randomised, so
    that the samples depend on every flag. Returns its path."""
    ckpt = testing_utils.load(path)
    ckpt["ema"]["unet"]["shadow"] = randomize(tiny_model(num_images=6)[1].unet, 1).state_dict()
    raw = randomize(tiny_model(num_images=6)[1].unet, 2).state_dict()
    ckpt["model"].update({f"unet.{k}": v for k, v in raw.items()})
    torch.save(ckpt, path)
    return path


def test_train_and_sample_any_size(tiny, tmp_path, capsys):
    """A run of both phases writes previews 4 times as wide as its images; --sample draws at the
    training size, at a larger one (with --patch_batch), from a training image's code, and the
    same images whatever --batch_size; its flags reach the sampler; a GIF; a size that is not a
    multiple of p, a code out of range and guidance without --cfg (given now or not) exit 2."""
    out = testing_utils.train_run(pdm, tiny, tmp_path, "run", "--latent_steps", "2")
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["num_images"] == 6
    assert Image.open(os.path.join(out, "samples", "step_2.png")).size == (2 * 98 + 2, 20)
    checkpoint = randomised(os.path.join(out, "checkpoints", "last.pt"))
    testing_utils.assert_same_samples(pdm, checkpoint, tmp_path, [["--batch_size", "4"],
                                                                  ["--batch_size", "1"]])
    big = testing_utils.sample_images(pdm, checkpoint, tmp_path / "big", "--image_size", "32x64",
                                      "--patch_batch", "4")
    assert big.shape == (2, 32, 64, 3)
    code = testing_utils.sample_images(pdm, checkpoint, tmp_path / "code", "--code_from", "5")
    assert code.shape == (2, 16, 24, 3)
    for name, flags in {"ddpm": ["--sampler", "ddpm"], "eta": ["--eta", "1"],
                        "raw": ["--weights", "model"], "code": ["--code_from", "5"]}.items():
        testing_utils.assert_flags_change_the_samples(pdm, checkpoint, tmp_path / name, flags)
    testing_utils.assert_saves_gif(pdm, checkpoint, tmp_path)
    for flags in (["--image_size", "20x24"], ["--code_from", "6"], ["--guidance_scale", "2"],
                  ["--guidance_scale", "2", "--cfg"]):
        assert_user_error(pdm, *run_main(pdm, ["--sample", "--checkpoint", checkpoint,
                                               "--output_dir", tmp_path / "bad", *flags],
                                         capsys)[::2])


def test_guidance_samples_from_a_cfg_model(tiny, tmp_path):
    """--guidance_scale reaches the sampler of a --cfg checkpoint (its EMA U-Net randomised, so
    that its output depends on the code and the position)."""
    out = testing_utils.train_run(pdm, tiny, tmp_path, "cfg", "--cfg", "--latent_steps", "0",
                                  "--preview_size", "16x48")
    assert Image.open(os.path.join(out, "samples", "step_2.png")).size == (2 * 50 + 2, 20)
    path = randomised(os.path.join(out, "checkpoints", "last.pt"))
    ckpt = testing_utils.load(path)
    assert ckpt["model"]["latent.trained"] == 0 and ckpt["step"] == 2    # no latent phase
    testing_utils.assert_flags_change_the_samples(pdm, path, tmp_path, ["--guidance_scale", "2"])


def test_dry_run_of_the_paper_preset(tmp_path, capsys):
    """--dry_run writes nothing and prints the resolved configuration, with the number of
    images the code table has a row for, and the parameters of the U-Net with its codes, of the
    latent model and of both."""
    argv = ["--preset", "paper", "--procedural_size", "100", "--output_dir", str(tmp_path / "r"),
            "--dry_run"]
    status, out, _ = run_main(pdm, argv, capsys)
    assert status == 0 and not (tmp_path / "r").exists()
    config = json.loads(out[:out.index("\nparameters")])
    expected = vars(pdm.parse_args(argv)) | {"num_images": 100}
    assert config == json.loads(json.dumps(expected))
    model = pdm.build_model(argparse.Namespace(**expected))
    counts = [int(line.rsplit(" ", 1)[1].replace(",", "")) for line in out.splitlines()
              if line.startswith("parameters")]
    assert counts == [sum(p.numel() for p in part.parameters())
                      for part in (model.unet, model.latent, model)]
    assert model.unet.codes.weight.shape[0] == 100


def test_torchrun_ddp_crosses_into_the_latent_phase(tiny, tmp_path):
    """2 processes, 2 U-Net steps then 1 latent step, with accumulation: the ranks agree."""
    ckpt, _ = testing_utils.assert_torchrun_ddp_on_cpu(pdm, tiny, tmp_path, "--max_steps", "2",
                                                       "--latent_steps", "1")
    assert ckpt["model"]["latent.trained"] == 1


@pytest.mark.parametrize("flags", [
    ["--image_size", "20x24"],
    ["--patch_size", "6"],
    ["--preview_size", "16x20"],
    ["--class_conditional"],
    ["--swa"],
    ["--weights", "swa"],
    ["--code_from", "-1"],
    ["--lr", "0"],
], ids=["image_not_by_p", "p_not_by_2_levels", "preview_not_by_p", "classes", "swa",
        "weights_swa", "code_from_negative", "lr_zero_with_a_latent_phase"])
def test_bad_flags_exit_2_before_any_work(tmp_path, capsys, flags):
    testing_utils.assert_refused_before_any_work(pdm, [*TINY, *flags], tmp_path, capsys)


def test_resume_on_another_dataset_is_refused(tiny, tmp_path, capsys):
    """The code table has one row per training image: another number of images cannot resume."""
    out = testing_utils.train_run(pdm, tiny, tmp_path, "run", "--latent_steps", "0")
    assert_user_error(pdm, *run_main(pdm, [*tiny, "--procedural_size", "7", "--resume",
                                           os.path.join(out, "checkpoints", "last.pt"),
                                           "--output_dir", tmp_path / "r"], capsys)[::2])
