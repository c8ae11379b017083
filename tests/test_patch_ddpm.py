"""patch_ddpm.py: patch cut and stitch, the position and global content conditionings, the
invariance of samples and gradients to --patch_batch, the memory bound of chunked training, the
sampling path with a denoiser whose answer is known, learning coherent images across patch
borders, bad input, and one smoke run of the shared command line (train, resume, sample)."""

import contextlib
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import patch_ddpm
from patch_ddpm import cut_patches, stitch_patches
import testing_utils
from testing_utils import randomize

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# Small enough for a 2-core CPU: 16x16 images in 2 x 2 patches of 8 x 8, a two-level U-Net
# (feature-map sides 8 and 4).
TINY = ["--image_size", "16", "--patch_divider", "2", "--base_channels", "16",
        "--channel_mults", "1,2", "--num_res_blocks", "1", "--attention_resolutions", "4",
        "--batch_size", "4", "--procedural_size", "16", "--num_samples", "4",
        "--sampling_steps", "4", "--timesteps", "100", "--warmup_steps", "2",
        "--preview_samples", "2", "--preview_steps", "2"]


def tiny_args(*extra, num_classes=0):
    """parse_args(TINY + extra), with the num_classes main() would take from the dataset."""
    args = patch_ddpm.parse_args(TINY + list(extra))
    args.num_classes = num_classes
    return args


def assert_user_error(argv, capsys, tmp_path):
    """main(argv) exits with status 2 and one line on stderr, before it makes its run folder."""
    capsys.readouterr()
    status = patch_ddpm.main([str(a) for a in argv] + ["--output_dir", str(tmp_path / "refused"),
                                                       "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("patch_ddpm.py: error: "), err
    assert not (tmp_path / "refused").exists()


class NoScaler:
    """micro_batch_step's GradScaler, disabled, that also records each backward."""

    def __init__(self, events=None):
        self.events = events

    def scale(self, loss):
        if self.events is not None:
            self.events.append("backward")
        return loss


# ------------------------------------------------------------------------------------------------
# Patches and the network


@pytest.mark.parametrize("height, width, n", [(16, 16, 1), (16, 16, 4), (16, 32, 2), (24, 16, 8)])
def test_cut_is_patch_major_and_stitch_is_its_inverse(height, width, n):
    x = torch.randn(2, 3, height, width)
    patches = cut_patches(x, n)
    h, w = height // n, width // n
    assert patches.shape == (n * n, 2, 3, h, w)
    for i in range(n):
        for j in range(n):                                          # s = i * n + j: row i, col j
            assert torch.equal(patches[i * n + j], x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w])
    assert torch.equal(stitch_patches(patches, n), x)
    other = torch.randn_like(patches)
    assert torch.equal(cut_patches(stitch_patches(other, n), n), other)


@pytest.mark.parametrize("size, n", [("16", 1), ("16", 4), ("16x32", 2), ("32x16", 8)])
def test_model_maps_the_full_image_to_the_full_eps_for_every_divider(size, n):
    args = tiny_args("--image_size", size, "--patch_divider", str(n), "--attention_resolutions", "")
    model = patch_ddpm.build_model(args)
    assert model.input_conv.in_channels == 6                        # patch + GCC
    height, width = args.image_size
    x, t = torch.randn(2, 3, height, width), torch.tensor([3, 70])
    assert torch.count_nonzero(model(x, t)) == 0                    # zero-initialised output
    randomize(model)
    out = model(x, t)
    assert out.shape == x.shape and out.abs().mean() > 0
    last = n * n - 1
    part = model(x, t, positions=[0, last])
    assert part.shape == (2, 2, 3, height // n, width // n)
    assert torch.allclose(part[1], cut_patches(out, n)[last], atol=1e-6)


def test_position_embedding_conditions_the_output():
    """Four identical patches (the same crop and the same GCC) differ only in their one-hot
    position: the outputs differ, and become equal once the position's first layer is zeroed."""
    model = randomize(patch_ddpm.build_model(tiny_args())).eval()
    x = torch.randn(1, 3, 8, 8).repeat(1, 1, 2, 2)                  # 4 equal 8 x 8 patches
    t = torch.tensor([30])
    eps = model(x, t, positions=[0, 1, 2, 3])                       # (4, 1, 3, 8, 8)
    for s in (1, 2, 3):
        assert not torch.allclose(eps[0], eps[s], atol=1e-4), s
    with torch.no_grad():
        model.position_emb[0].weight.zero_()
    eps = model(x, t, positions=[0, 1, 2, 3])
    for s in (1, 2, 3):
        assert torch.allclose(eps[0], eps[s], atol=1e-6), s


def test_divider_one_is_a_plain_ddpm_with_the_same_network():
    """N = 1: one position, and the GCC of a 1 x 1 grid is the image itself."""
    model = randomize(patch_ddpm.build_model(tiny_args("--patch_divider", "1"))).eval()
    assert model.position_chunks() == [[0]]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 60])
    assert torch.equal(model.global_content(x), x)
    emb = model.position_emb(torch.ones(2, 1))
    expected = patch_ddpm.UNet.forward(model, torch.cat([x, x], 1), t, None, emb)
    assert torch.allclose(model(x, t), expected, atol=1e-6)


def test_gcc_is_recomputed_from_x_t_at_every_sampling_step():
    """The 3 GCC channels the U-Net receives are AvgPool_2 of the x_t of that very step, for
    every patch chunk, and change from step to step (a GCC computed once would fail)."""
    args = tiny_args()
    model = randomize(patch_ddpm.build_model(args)).eval()          # N = 2, one position at a time
    seen_x, seen_gcc = [], []
    model.register_forward_pre_hook(lambda m, inputs: seen_x.append(inputs[0].clone()))
    model.input_conv.register_forward_pre_hook(
        lambda m, inputs: seen_gcc.append(inputs[0][:, 3:].clone()))
    patch_ddpm.sample(model, patch_ddpm.build_diffusion(args), (2, 3, 16, 16), [1, 2], steps=4)
    assert len(seen_x) == 4 and len(seen_gcc) == 4 * 4              # 4 steps x 4 positions
    for step, x_t in enumerate(seen_x):
        for gcc in seen_gcc[4 * step:4 * step + 4]:
            assert torch.allclose(gcc, F.avg_pool2d(x_t, 2), atol=1e-6), step
    assert not torch.allclose(seen_gcc[0], seen_gcc[-1], atol=1e-2)


# ------------------------------------------------------------------------------------------------
# --patch_batch: the same results, fewer rows per U-Net call


def test_patch_batch_bounds_the_rows_per_unet_call():
    model = randomize(patch_ddpm.build_model(tiny_args("--patch_divider", "4",
                                                       "--attention_resolutions", ""))).eval()
    rows = []
    model.input_conv.register_forward_pre_hook(lambda m, inputs: rows.append(inputs[0].shape[0]))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    for k, expected in ((1, [3] * 16), (3, [9] * 5 + [3]), (0, [48])):
        rows.clear()
        model.patch_batch = k
        model(x, t)
        assert rows == expected, k


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samples_do_not_depend_on_patch_batch(sampler):
    """Class-conditional with guidance, 4 x 4 patches: K = 1, 3 (a short last chunk) and 0 (all
    16 positions at once, as the original code) draw the same images."""
    args = tiny_args("--patch_divider", "4", "--attention_resolutions", "", num_classes=2)
    model = randomize(patch_ddpm.build_model(args)).eval()
    diffusion = patch_ddpm.build_diffusion(args)
    outs = {}
    for k in (1, 3, 0):
        model.patch_batch = k
        outs[k] = patch_ddpm.sample(model, diffusion, (3, 3, 16, 16), [1, 2, 3], sampler, steps=4,
                                    y=torch.tensor([0, 1, 0]), guidance_scale=2.0)
    # Float rounding differs between chunkings, and the steps amplify it near the clip at +-1.
    assert torch.allclose(outs[1], outs[0], atol=1e-3)
    assert torch.allclose(outs[3], outs[0], atol=1e-3)
    assert not torch.allclose(outs[0][0], outs[0][1], atol=1e-3)


@pytest.mark.parametrize("loss, prediction, gamma", [("l1", "eps", "0"), ("mse", "v", "0"),
                                                     ("huber", "x0", "0"), ("mse", "v", "2")])
def test_chunked_loss_and_gradients_are_those_of_the_full_image(loss, prediction, gamma):
    """micro_batch_step over the loss terms of K = 0 (all 16 positions in one term), 1 and 3
    (a short last chunk): the same loss and gradients as one full-image loss, the mean error of
    the stitched output against the target (times the min-SNR weight of --min_snr_gamma), with
    the same t and noise."""
    args = tiny_args("--patch_divider", "4", "--attention_resolutions", "", "--loss", loss,
                     "--prediction", prediction, "--min_snr_gamma", gamma, num_classes=2)
    model = randomize(patch_ddpm.build_model(args)).train()
    diffusion = patch_ddpm.build_diffusion(args)
    x0, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 1])   # 2: the null label
    model.zero_grad()
    torch.manual_seed(0)                                            # the draws of training_losses
    t = torch.randint(0, args.timesteps, (4,))
    noise = torch.randn_like(x0)
    out = model(diffusion.q_sample(x0, t, noise), t, y)            # (4, 3, 16, 16), stitched
    weight = patch_ddpm.at(diffusion.loss_weight, t, x0)
    assert (weight == 1).all() == (gamma == "0")
    expected = (weight * diffusion.error(out, diffusion.target(x0, noise, t))).mean()
    expected.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    assert any(g.abs().sum() > 0 for g in reference)
    for k, terms in ((0, 1), (1, 16), (3, 6)):
        model.patch_batch = k
        model.zero_grad()
        torch.manual_seed(0)
        assert len(diffusion.training_losses(model, x0, y)) == terms
        torch.manual_seed(0)
        got = patch_ddpm.micro_batch_step(model, diffusion, x0, y, args, NoScaler(),
                                          contextlib.nullcontext(), sync=True)
        assert got == pytest.approx(expected.item(), rel=1e-5), k
        for a, b in zip(model.parameters(), reference):
            assert torch.allclose(a.grad, b, rtol=1e-4, atol=1e-6), k


def test_under_ddp_every_chunk_but_the_last_runs_in_no_sync(tmp_path):
    """The chunks are terms that run their own forward when called (ddpm.py's test covers the
    no_sync logic of micro_batch_step): in a one-process DDP (gloo) each chunk's forward and
    backward run inside no_sync except the last one's, which all-reduces; a chunk whose forward
    ran before its term was called would not. The gradients are those without DDP."""
    args = tiny_args()
    model = randomize(patch_ddpm.build_model(args))
    diffusion, x0 = patch_ddpm.build_diffusion(args), torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    patch_ddpm.micro_batch_step(model, diffusion, x0, None, args, NoScaler(),
                                contextlib.nullcontext(), sync=True)
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    events = []
    with testing_utils.recorded_ddp(model, tmp_path, events) as ddp:
        torch.manual_seed(0)
        patch_ddpm.micro_batch_step(ddp, diffusion, x0, None, args, NoScaler(events),
                                    contextlib.nullcontext(), sync=True)
    chunk = ["forward", "backward"]
    assert events == (["enter"] + chunk + ["exit"]) * 3 + chunk
    for p, g in zip(model.parameters(), reference):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)


def saved_activation_bytes(args, patch_batch):
    """Bytes of the tensors autograd saves for backward (weights excluded), per loss term, each
    term backpropagated before the next runs (as micro_batch_step does)."""
    model = randomize(patch_ddpm.build_model(args))
    model.patch_batch = patch_batch
    weights = {p.data_ptr() for p in model.parameters()}
    alive, per_term = [0], []

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            alive[0] += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for term in patch_ddpm.build_diffusion(args).training_losses(model,
                                                                     torch.rand(8, 3, 16, 16)):
            alive[0] = 0
            loss = term()
            per_term.append(alive[0])
            loss.backward()                                         # frees the term's graph
    return per_term


def test_training_keeps_one_patch_chunk_of_activations():
    """The memory claim, measured on the autograd graph: with 2 x 2 patches and --patch_batch 1,
    a term saves a quarter of the activations of all patches at once (the original code), and
    well under those of a plain DDPM with the same network (--patch_divider 1)."""
    args = tiny_args("--attention_resolutions", "")
    one, all_at_once = saved_activation_bytes(args, 1), saved_activation_bytes(args, 0)
    plain = saved_activation_bytes(tiny_args("--attention_resolutions", "",
                                             "--patch_divider", "1"), 1)
    assert len(one) == 4 and len(all_at_once) == 1 and len(plain) == 1
    assert max(one) == pytest.approx(all_at_once[0] / 4, rel=0.01)
    assert max(one) < 0.3 * plain[0]


# ------------------------------------------------------------------------------------------------
# Sampling with a denoiser whose answer is known, and learning


class PatchBayesOptimal(patch_ddpm.PatchUNet):
    """The exact E[eps | patch, GCC] for data that is one of a few equally likely images made of
    flat 2 x 2 blocks: the GCC (x_t pooled over 2 x 2, noise variance (1 - ab) / 4) is then a
    sufficient statistic, and x_0 | GCC is a mixture with weights N(GCC; sqrt(ab) pool(x_0),
    (1 - ab) / 4). Only the patch-level computation is replaced; cutting, GCC, chunking and
    stitching are PatchUNet's."""

    def __init__(self, diffusion, images):
        super().__init__(6, 3, 4, (1,), 1, (), 1, 0.0, (4, 4), 0, patch_divider=2, patch_batch=1)
        self.diffusion, self.images = diffusion, images.double()    # (A, 3, H, W)

    def denoise(self, patches, gcc, t, y, positions):
        ab = self.diffusion.alpha_bar_f64[t].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        pooled = F.avg_pool2d(self.images, 2)                       # (A, 3, H/2, W/2)
        distance = ((gcc.double()[:, None] - ab.sqrt()[:, None] * pooled[None]) ** 2).sum((2, 3, 4))
        weights = torch.softmax(-distance / (2 * (1 - ab.flatten()[:, None]) / 4), 1)   # (B, A)
        x0 = torch.einsum("ba,achw->bchw", weights, self.images)    # (B, 3, H, W)
        x0_patches = cut_patches(x0, 2)[positions]                  # (K, B, 3, H/2, W/2)
        return ((patches[positions].double() - ab.sqrt() * x0_patches) / (1 - ab).sqrt()).float()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_gcc_makes_the_patches_of_an_image_agree(sampler):
    """Data: 'red | blue' or 'blue | red' (8 x 8, 2 x 2 patches). A patch alone cannot tell which
    colour to become; with the GCC of the current x_t, the Bayes-optimal patch denoiser draws
    whole images of the data, both arrangements, never a mixed one. This checks the sampling path
    (cut, GCC, chunks, stitch, step) with a denoiser whose answer is known."""
    red, blue = torch.tensor([0.8, -0.7, -0.7]), torch.tensor([-0.7, -0.5, 0.8])
    images = torch.empty(2, 3, 8, 8)
    images[0, :, :, :4], images[0, :, :, 4:] = red[:, None, None], blue[:, None, None]
    images[1] = images[0].flip(2)                                   # blue | red
    diffusion = patch_ddpm.GaussianDiffusion(patch_ddpm.make_beta_schedule("cosine", 200))
    out = patch_ddpm.sample(PatchBayesOptimal(diffusion, images), diffusion, (32, 3, 8, 8),
                            range(32), sampler, steps=20)
    distance = (out[:, None] - images[None]).abs().amax((2, 3, 4))  # (32, 2)
    assert distance.min(1).values.max() < 1e-3
    assert 8 <= (distance.argmin(1) == 0).sum() <= 24


QUADRANTS = np.array([(230, 40, 40), (40, 60, 230), (40, 200, 60), (240, 240, 240)])


def test_learns_the_colour_of_every_patch_position(tmp_path):
    """A tiny model trained for 250 steps on 8 x 8 images with four coloured quadrants, in 2 x 2
    patches of 4 x 4, samples images whose every patch has its quadrant's colour: at the noisiest
    steps the patches are pure noise and only the one-hot position tells them apart. Distances are
    the largest channel difference in [0, 1] units between a patch's mean colour and its
    quadrant's. Trained with all positions at once, sampled one at a time; eps prediction, the
    original code's (the recipe was tuned for it)."""
    image = np.empty((8, 8, 3), dtype=np.uint8)
    image[:4, :4], image[:4, 4:], image[4:, :4], image[4:, 4:] = QUADRANTS
    os.makedirs(tmp_path / "data")
    for i in range(32):
        Image.fromarray(image).save(tmp_path / "data" / f"{i:03d}.png")
    run, samples, steps = str(tmp_path / "run"), str(tmp_path / "samples"), "250"
    assert patch_ddpm.main([
        "--dataset_path", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", run, "--image_size", "8", "--patch_divider", "2", "--patch_batch", "0",
        "--no_hflip", "--base_channels", "32", "--channel_mults", "1,2", "--attention_resolutions",
        "2", "--prediction", "eps", "--batch_size", "32", "--max_steps", steps, "--lr", "2e-3",
        "--warmup_steps", "20",
        "--ema_decay", "0.99", "--ema_start", "50", "--timesteps", "200", "--save_every", steps,
        "--sample_every", steps, "--preview_samples", "1", "--preview_steps", "1"]) == 0
    assert patch_ddpm.main(["--sample", "--checkpoint", os.path.join(run, "checkpoints", "last.pt"),
                            "--num_samples", "16", "--sampling_steps", "25", "--patch_batch", "1",
                            "--output_dir", samples]) == 0
    distances, spread = [], []
    for path in sorted(glob.glob(os.path.join(samples, "0*.png"))):
        pixels = np.asarray(Image.open(path)) / 255.0               # (8, 8, 3)
        patches = [pixels[:4, :4], pixels[:4, 4:], pixels[4:, :4], pixels[4:, 4:]]
        for colour, patch in zip(QUADRANTS / 255.0, patches):
            patch = patch.reshape(-1, 3)                            # (4, 4, 3) -> (16, 3)
            distances.append(np.abs(colour - patch.mean(0)).max())
            spread.append(patch.std(0).max())
    distances = np.array(distances)
    assert len(distances) == 16 * 4
    # Swapped quadrants would be >= 0.6 away; a blend of all four ~0.4.
    assert np.median(distances) < 0.1 and (distances < 0.2).mean() >= 0.9, distances.round(2)
    assert np.median(spread) < 0.05, spread                         # flat patches, not noise


# ------------------------------------------------------------------------------------------------
# The command line: bad input, and one smoke run


@pytest.mark.parametrize("flags", [
    ["--image_size", "18", "--patch_divider", "4"],
    ["--image_size", "16x20", "--patch_divider", "8"],
    ["--image_size", "16", "--patch_divider", "4", "--channel_mults", "1,2,2,2"],
    ["--patch_batch", "-1"],
    ["--patch_divider", "3"],
], ids=["image_not_divisible", "non_square_not_divisible", "patch_not_divisible_by_unet",
        "negative_patch_batch", "divider_not_a_choice"])
def test_bad_flags_exit_2(tmp_path, capsys, flags):
    assert_user_error(TINY + flags, capsys, tmp_path)


def test_train_resume_and_sample(tmp_path, capsys):
    """Two steps, resumed to three; --sample draws the same images whatever --batch_size and
    --patch_batch, and refuses another --patch_divider than the checkpoint's."""
    run = str(tmp_path / "run")
    argv = TINY + ["--class_conditional", "--output_dir", run, "--cache_dir",
                   str(tmp_path / "cache"), "--save_every", "2", "--sample_every", "2"]
    assert patch_ddpm.main(argv + ["--max_steps", "2"]) == 0
    assert patch_ddpm.main(argv + ["--max_steps", "3", "--resume", "latest"]) == 0
    ckpt = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)
    assert (ckpt["method"], ckpt["step"], ckpt["args"]["patch_divider"]) == ("patch_ddpm", 3, 2)
    assert os.path.isfile(os.path.join(run, "samples", "step_2.png"))
    images = []
    for i, (batch, patch_batch) in enumerate([("1", "1"), ("4", "0")]):
        out = str(tmp_path / f"samples{i}")
        assert patch_ddpm.main(["--sample", "--checkpoint", os.path.join(run, "checkpoints",
                                                                          "last.pt"),
                                "--batch_size", batch, "--patch_batch", patch_batch, "--seed", "5",
                                "--output_dir", out]) == 0
        images.append([np.asarray(Image.open(os.path.join(out, f"{k:05d}.png"))).astype(int)
                       for k in range(4)])
        assert os.path.isfile(os.path.join(out, "grid.png"))
    for a, b in zip(*images):
        assert np.abs(a - b).max() <= 1                             # rounding to uint8
    assert not np.array_equal(images[0][0], images[0][1])
    assert_user_error(["--sample", "--checkpoint", os.path.join(run, "checkpoints", "last.pt"),
                       "--patch_divider", "4"], capsys, tmp_path)
