"""patch_ddpm.py: patch cut and stitch, the position and global content conditionings, the
invariance of samples and gradients to --patch_batch, the loss on the stitched image, training end
to end (learning coherent images across patch borders, exact resume, DDP), the CLI of
CONVENTIONS.md and bad input."""

import contextlib
import functools
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ddpm
import patch_ddpm
import testing_utils
from testing_utils import SHARED_FLAGS, SYNOPSIS_FLAGS, TRAIN_SCALARS, randomize
from patch_ddpm import cut_patches, stitch_patches

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# A configuration small enough for a 2-core CPU: 16x16 images in 2 x 2 patches of 8 x 8, a
# two-level U-Net (feature-map sides 8 and 4).
TINY = ["--image_size", "16", "--patch_divider", "2", "--base_channels", "32",
        "--channel_mults", "1,2", "--num_res_blocks", "1", "--attention_resolutions", "4",
        "--batch_size", "4", "--procedural_size", "32", "--num_samples", "4",
        "--sampling_steps", "4", "--timesteps", "100", "--warmup_steps", "2"]

# run_main, assert_user_error, tiny_args, train_run: the shared helpers, bound to patch_ddpm and
# TINY.
run_main = functools.partial(testing_utils.run_main, patch_ddpm)
assert_user_error = functools.partial(testing_utils.assert_user_error, patch_ddpm)
tiny_args = functools.partial(testing_utils.tiny_args, patch_ddpm, TINY)
train_run = functools.partial(testing_utils.train_run, patch_ddpm, TINY)


# ------------------------------------------------------------------------------------------------
# Patches


@pytest.mark.parametrize("height, width, n", [
    (16, 16, 1), (16, 16, 2), (16, 16, 4), (16, 16, 8), (16, 32, 2), (16, 32, 4), (24, 16, 8)])
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


@pytest.mark.parametrize("size, n", [("16", 1), ("16", 2), ("16", 4), ("32", 8), ("16x32", 2),
                                     ("16x32", 4), ("32x16", 8)])
def test_model_shapes_for_every_divider(size, n):
    args = tiny_args("--image_size", size, "--patch_divider", str(n), "--attention_resolutions", "")
    model = patch_ddpm.build_model(args)
    assert model.input_conv.in_channels == 6                        # patch + GCC
    height, width = args.image_size
    x, t = torch.randn(2, 3, height, width), torch.tensor([3, 70])
    # Zero-initialised output convolution: the untrained network predicts eps = 0 exactly.
    assert torch.count_nonzero(model(x, t)) == 0
    randomize(model)
    out = model(x, t)
    assert out.shape == x.shape and out.abs().mean() > 0
    last = n * n - 1
    part = model(x, t, positions=[0, last])
    assert part.shape == (2, 2, 3, height // n, width // n)
    assert torch.allclose(part[1], cut_patches(out, n)[last], atol=1e-6)


def test_position_embedding_conditions_the_output():
    """Four identical patches (the same crop and the same GCC) differ only in their one-hot
    position: the outputs differ, and become equal once the position layer is zeroed."""
    model = randomize(patch_ddpm.build_model(tiny_args())).eval()
    x = torch.randn(1, 3, 8, 8).repeat(1, 1, 2, 2)                  # 4 equal 8 x 8 patches
    t = torch.tensor([30])
    eps = model(x, t, positions=[0, 1, 2, 3])                       # (4, 1, 3, 8, 8)
    for s in (1, 2, 3):
        assert not torch.allclose(eps[0], eps[s], atol=1e-4), s
    with torch.no_grad():
        model.position_mlp[0].weight.zero_()
    eps = model(x, t, positions=[0, 1, 2, 3])
    for s in (1, 2, 3):
        assert torch.allclose(eps[0], eps[s], atol=1e-6), s


def test_gcc_is_recomputed_from_x_t_at_every_sampling_step():
    """The 3 GCC channels the U-Net receives are AvgPool_2 of the x_t of that very step, for
    every patch chunk, and change from step to step (a GCC computed once would fail)."""
    args = tiny_args()
    model = randomize(patch_ddpm.build_model(args)).eval()          # N = 2, one position at a time
    seen_x, seen_gcc = [], []
    model.register_forward_pre_hook(lambda m, inputs: seen_x.append(inputs[0].clone()))
    model.input_conv.register_forward_pre_hook(
        lambda m, inputs: seen_gcc.append(inputs[0][:, 3:].clone()))
    patch_ddpm.build_diffusion(args).sample(model, (2, 3, 16, 16), steps=4, seeds=[1, 2])
    assert len(seen_x) == 4 and len(seen_gcc) == 4 * 4              # 4 steps x 4 positions
    for step, x_t in enumerate(seen_x):
        for gcc in seen_gcc[4 * step:4 * step + 4]:
            assert torch.allclose(gcc, F.avg_pool2d(x_t, 2), atol=1e-6), step
    assert not torch.allclose(seen_gcc[0], seen_gcc[-1], atol=1e-2)


def test_divider_one_is_a_plain_ddpm_with_the_same_network():
    """N = 1: one position, and the GCC of a 1 x 1 grid is the image itself."""
    args = tiny_args("--patch_divider", "1")
    model = randomize(patch_ddpm.build_model(args)).eval()
    assert model.position_chunks() == [[0]]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 60])
    assert torch.equal(model.global_content(x), x)
    expected = patch_ddpm.UNet.forward(model, torch.cat([x, x], 1), (t, torch.ones(2, 1)), None)
    assert torch.allclose(model(x, t), expected, atol=1e-6)


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
        outs[k] = diffusion.sample(model, (3, 3, 16, 16), sampler=sampler, steps=4,
                                   seeds=[1, 2, 3], y=torch.tensor([0, 1, 0]), guidance_scale=2.0)
    assert torch.allclose(outs[1], outs[0], atol=1e-5)
    assert torch.allclose(outs[3], outs[0], atol=1e-5)
    assert not torch.allclose(outs[0][0], outs[0][1], atol=1e-3)


def test_training_gradients_do_not_depend_on_patch_batch():
    """Chunked backward (K = 1, 3, 0) and the differentiable total give the gradient of one
    full-image loss; the per-image label dropout is drawn once, whatever K."""
    args = tiny_args("--patch_divider", "4", "--attention_resolutions", "", "--label_dropout",
                     "0.5", num_classes=2)
    model = randomize(patch_ddpm.build_model(args)).train()
    diffusion = patch_ddpm.build_diffusion(args)
    x0, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 0, 1])

    def gradients(k, chunked):
        model.patch_batch = k
        model.zero_grad()
        torch.manual_seed(0)
        if chunked:
            loss = diffusion.training_loss(model, x0, y, backward=lambda part: part.backward())
            assert not loss.requires_grad
        else:
            loss = diffusion.training_loss(model, x0, y)
            loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    reference_loss, reference = gradients(0, chunked=False)
    for k, chunked in ((0, True), (1, True), (3, True), (1, False)):
        loss, grads = gradients(k, chunked)
        assert loss == pytest.approx(reference_loss, rel=1e-5), k
        for a, b in zip(grads, reference):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k
    assert any(g.abs().sum() > 0 for g in reference)


def test_each_chunk_runs_forward_and_backward_in_its_no_sync_context():
    """The training loop passes DDP's no_sync for every chunk but the last one (of the last
    micro-batch): each chunk's forward and backward must run inside the context it gets."""
    args = tiny_args()
    model = randomize(patch_ddpm.build_model(args))
    events = []

    @contextlib.contextmanager
    def no_sync(last_chunk):
        events.append(f"enter {last_chunk}")
        yield
        events.append("exit")
    model.register_forward_pre_hook(lambda m, inputs: events.append("forward"))
    patch_ddpm.build_diffusion(args).training_loss(
        model, torch.zeros(2, 3, 16, 16), no_sync=no_sync,
        backward=lambda loss: events.append("backward") or loss.backward())
    chunk = ["forward", "backward", "exit"]
    assert events == (["enter False"] + chunk) * 3 + ["enter True"] + chunk


def saved_activation_bytes(args, patch_batch):
    """Bytes of the tensors autograd saves for backward (weights excluded), per training chunk."""
    model = randomize(patch_ddpm.build_model(args))
    model.patch_batch = patch_batch
    weights = {p.data_ptr() for p in model.parameters()}
    alive, per_chunk = [0], []

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            alive[0] += tensor.numel() * tensor.element_size()
        return tensor

    def backward(loss):
        per_chunk.append(alive[0])
        alive[0] = 0
        loss.backward()                                             # frees the chunk's graph
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        patch_ddpm.build_diffusion(args).training_loss(model, torch.rand(8, 3, 16, 16),
                                                       backward=backward)
    return per_chunk


def test_training_keeps_one_patch_chunk_of_activations():
    """The memory claim, measured on the autograd graph: with 2 x 2 patches and --patch_batch 1,
    a chunk saves a quarter of the activations of all patches at once (the original code), and of
    a plain DDPM with the same network (--patch_divider 1)."""
    args = tiny_args("--attention_resolutions", "")
    one, all_at_once = saved_activation_bytes(args, 1), saved_activation_bytes(args, 0)
    plain = saved_activation_bytes(tiny_args("--attention_resolutions", "",
                                             "--patch_divider", "1"), 1)
    assert len(one) == 4 and len(all_at_once) == 1 and len(plain) == 1
    assert max(one) == pytest.approx(all_at_once[0] / 4, rel=0.01)
    assert max(one) < 0.3 * plain[0]


@pytest.mark.parametrize("loss", ["l1", "mse", "huber"])
def test_training_loss_is_the_loss_of_the_stitched_image(loss):
    args = tiny_args("--loss", loss)
    model = randomize(patch_ddpm.build_model(args)).eval()
    diffusion = patch_ddpm.build_diffusion(args)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    got = diffusion.training_loss(model, x0)
    torch.manual_seed(0)                                            # the same t and noise
    t = torch.randint(0, 100, (4,))
    noise = torch.randn_like(x0)
    eps = model(diffusion.q_sample(x0, t, noise), t)
    expected = {"l1": F.l1_loss, "mse": F.mse_loss, "huber": F.smooth_l1_loss}[loss](eps, noise)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# End to end


QUADRANTS = np.array([(230, 40, 40), (40, 60, 230), (40, 200, 60), (240, 240, 240)])


def quadrant_folder(root, size=8, count=32):
    """Images whose four quadrants are red, blue (top) and green, white (bottom): with 2 x 2
    patches, each patch position has its own colour."""
    os.makedirs(root, exist_ok=True)
    image = np.empty((size, size, 3), dtype=np.uint8)
    half = size // 2
    image[:half, :half], image[:half, half:] = QUADRANTS[0], QUADRANTS[1]
    image[half:, :half], image[half:, half:] = QUADRANTS[2], QUADRANTS[3]
    for i in range(count):
        Image.fromarray(image).save(os.path.join(root, f"{i:03d}.png"))
    return QUADRANTS / 255.0


def test_learns_the_colour_of_every_patch_position(tmp_path):
    """A tiny model trained for 600 steps on 8 x 8 images with four coloured quadrants, in 2 x 2
    patches of 4 x 4, samples images whose every patch has its quadrant's colour: at the noisiest
    steps the patches are pure noise and only the one-hot position tells them apart. Distances are
    the largest channel difference in [0, 1] units between a patch's mean colour and its
    quadrant's colour. Trained with all positions at once, sampled one at a time."""
    colours = quadrant_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    testing_utils.toy_run(patch_ddpm, tmp_path / "data", out, 600, "--image_size", "8",
                          "--patch_divider", "2", "--patch_batch", "0", "--no_hflip",
                          "--attention_resolutions", "2", "--num_samples", "4")
    samples = str(tmp_path / "samples")
    assert patch_ddpm.main(["--sample", "--checkpoint", os.path.join(out, "checkpoints", "last.pt"),
                            "--num_samples", "16", "--sampling_steps", "25", "--patch_batch", "1",
                            "--output_dir", samples]) == 0
    distances, spread = [], []
    for path in sorted(glob.glob(os.path.join(samples, "0*.png"))):
        pixels = np.asarray(Image.open(path)) / 255.0               # (8, 8, 3)
        patches = [pixels[:4, :4], pixels[:4, 4:], pixels[4:, :4], pixels[4:, 4:]]
        for colour, patch in zip(colours, patches):
            patch = patch.reshape(-1, 3)
            distances.append(np.abs(colour - patch.mean(0)).max())
            spread.append(patch.std(0).max())
    distances = np.array(distances)
    assert len(distances) == 16 * 4
    # Swapped quadrants would be >= 0.6 away; a blend of all four ~0.4.
    assert np.median(distances) < 0.1 and (distances < 0.2).mean() >= 0.9, distances.round(2)
    assert np.median(spread) < 0.05, spread                         # flat patches, not noise


class PatchBayesOptimal(patch_ddpm.PatchUNet):
    """The exact E[eps | patch, GCC] for data that is one of a few equally likely images made of
    flat 2 x 2 blocks: the GCC (x_t pooled over 2 x 2, noise variance (1 - ab) / 4) is then a
    sufficient statistic, and x_0 | GCC is a mixture with weights N(GCC; sqrt(ab) pool(x_0),
    (1 - ab) / 4). Only the patch-level computation is replaced; cutting, GCC, chunking and
    stitching are PatchUNet's."""

    def __init__(self, diffusion, images):
        super().__init__(patch_divider=2, patch_batch=1, in_channels=6, base_channels=4,
                         channel_mults=(1,), attention_resolutions=(), num_heads=1,
                         image_size=(4, 4))
        self.diffusion, self.images = diffusion, images.double()    # (A, 3, H, W)

    def denoise_patches(self, patches, gcc, t, y, positions):
        ab = self.diffusion.alphas_cumprod[t].double().reshape(-1, 1, 1, 1)   # (B, 1, 1, 1)
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
    (cut, GCC, chunks, stitch, step) with a denoiser whose answer is known; whether a trained
    U-Net learns to use the GCC this well is a question of training, not of this code."""
    red, blue = torch.tensor([0.8, -0.7, -0.7]), torch.tensor([-0.7, -0.5, 0.8])
    images = torch.empty(2, 3, 8, 8)
    images[0, :, :, :4], images[0, :, :, 4:] = red[:, None, None], blue[:, None, None]
    images[1] = images[0].flip(2)                                   # blue | red
    diffusion = patch_ddpm.GaussianDiffusion(patch_ddpm.make_beta_schedule("cosine", 200))
    out = diffusion.sample(PatchBayesOptimal(diffusion, images), (32, 3, 8, 8), sampler=sampler,
                           steps=20, seeds=range(32))
    distance = (out[:, None] - images[None]).abs().amax((2, 3, 4))  # (32, 2)
    assert distance.min(1).values.max() < 1e-3
    assert 8 <= (distance.argmin(1) == 0).sum() <= 24


def test_resume_is_exact(tmp_path):
    """4 steps in one run == resume from that run's step-2 checkpoint for 2 more steps, bitwise,
    with patch chunks, dropout, flips, gradient accumulation, label dropout and the cosine
    schedule in play."""
    testing_utils.assert_resume_is_exact(
        patch_ddpm, TINY + ["--accumulation_iters", "2", "--dropout", "0.1", "--class_conditional",
                            "--ema_start", "1", "--swa", "--swa_start", "1"],
        tmp_path, ("model", "ema", "swa", "optimizer", "lr_scheduler", "scaler"))


def test_torchrun_ddp_on_cpu(tmp_path):
    """2 processes (gloo), gradient accumulation and patch chunks: the gradient is all-reduced
    once per step, in the last chunk of the last micro-batch."""
    ckpt = testing_utils.assert_torchrun_ddp_on_cpu(patch_ddpm, TINY, tmp_path)
    assert ckpt["method"] == "patch_ddpm"


# ------------------------------------------------------------------------------------------------
# CLI (CONVENTIONS.md)

PATCH_FLAGS = ["--patch_divider", "--patch_batch"]


def test_help_lists_every_shared_flag_and_the_patch_flags_with_defaults(capsys):
    blocks = testing_utils.help_blocks(patch_ddpm, capsys,
                                       SHARED_FLAGS + PATCH_FLAGS + SYNOPSIS_FLAGS,
                                       SHARED_FLAGS + PATCH_FLAGS)
    assert "{1,2,4,8}" in blocks["--patch_divider"]
    assert "default: 2; paper: 4" in " ".join(blocks["--patch_divider"].split())
    assert "default: 1" in blocks["--patch_batch"]


def test_dry_run_prints_the_configuration_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, parameters, _ = testing_utils.dry_run(patch_ddpm, TINY + ["--patch_batch", "0"], capsys)
    assert (config["patch_divider"], config["patch_batch"], config["loss"]) == (2, 0, "l1")
    assert config["output_dir"] == os.path.join("runs", "patch_ddpm")
    assert parameters == ddpm.count_parameters(patch_ddpm.build_model(tiny_args()))
    assert list(tmp_path.iterdir()) == []


def test_paper_preset_is_the_original_config():
    args = patch_ddpm.parse_args(["--preset", "paper"])
    assert (args.image_size, args.patch_divider, args.base_channels, args.channel_mults) == \
        ([128, 128], 4, 128, [1, 2, 4, 8])
    assert (args.batch_size, args.max_steps, args.lr, args.lr_schedule, args.warmup_steps) == \
        (32, 100_000, 1e-4, "constant", 0)
    assert (args.grad_clip, args.ema_start, args.loss, args.schedule, args.seed) == \
        (0.0, 2000, "l1", "cosine", 1234)
    assert args.ema_decay ** 10 == pytest.approx(0.995)             # 0.995 every 10 steps
    assert patch_ddpm.parse_args(["--preset", "paper", "--patch_divider", "2"]).patch_divider == 2


trained = testing_utils.trained_fixture(train_run)                  # reused by the CLI tests


def test_training_run_writes_the_conventional_outputs(trained):
    config = testing_utils.conventional_outputs(trained)
    assert config["patch_divider"] == 2 and config["num_classes"] == 2
    for ckpt in testing_utils.conventional_checkpoints(trained, "patch_ddpm"):
        assert ckpt["format_version"] == patch_ddpm.FORMAT_VERSION
    model = patch_ddpm.build_model(tiny_args(num_classes=2))
    model.load_state_dict(ckpt["ema"]["shadow"])
    events = testing_utils.tensorboard_events(trained)
    for tag in TRAIN_SCALARS:
        assert [e.step for e in events.Scalars(tag)] == [2], tag
    assert "samples" in events.Tags()["images"]


def test_sample_command_is_independent_of_batch_size_and_patch_batch(trained, tmp_path):
    ckpt = os.path.join(trained, "checkpoints", "last.pt")
    variants = [["--batch_size", batch, "--patch_batch", patch_batch]
                for batch, patch_batch in (("1", "1"), ("3", "0"), ("4", "3"))]
    for out in testing_utils.assert_same_samples(patch_ddpm, ckpt, tmp_path, variants):
        assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                           "grid.png"]


@pytest.mark.parametrize("flags", testing_utils.SAMPLE_FLAGS)
def test_sample_command_flags(trained, tmp_path, flags):
    testing_utils.assert_flags_change_the_samples(
        patch_ddpm, os.path.join(trained, "checkpoints", "last.pt"), tmp_path, flags)


def test_save_gif(trained, tmp_path):
    testing_utils.assert_saves_gif(patch_ddpm, os.path.join(trained, "checkpoints", "last.pt"),
                                   tmp_path)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    out = train_run(tmp_path, precision, "--precision", precision, "--num_samples", "1")
    ckpt = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert bool(ckpt["scaler"]) == (precision == "fp16")          # GradScaler only for fp16


# ------------------------------------------------------------------------------------------------
# Bad input: exit status 2, one line on stderr that names the fix


@pytest.mark.parametrize("flags, phrases", [
    (["--image_size", "18", "--patch_divider", "4"],
     ["--image_size 18x18 is not divisible by --patch_divider 4", "multiple of 4"]),
    (["--image_size", "16x20", "--patch_divider", "8"], ["16x20", "--patch_divider 8"]),
    (["--image_size", "16", "--patch_divider", "4", "--channel_mults", "1,2,2,2"],
     ["4x4 patches", "downsampling factor 8", "multiple of 32"]),
    (["--patch_batch", "-1"], ["--patch_batch", "-1", "0 (all 4 patch positions at once)"]),
    (["--patch_divider", "3"], ["--patch_divider", "invalid choice", "3"]),
], ids=["image_not_divisible", "non_square_not_divisible", "patch_not_divisible_by_unet",
        "negative_patch_batch", "divider_not_a_choice"])
def test_bad_flags(tmp_path, capsys, flags, phrases):
    testing_utils.assert_refused_before_any_work(patch_ddpm, [*TINY, *flags], tmp_path, capsys,
                                                 *phrases)


def test_missing_dataset_folder(tmp_path, capsys):
    status, _, err = run_main([*TINY, "--dataset_path", tmp_path / "nope"], capsys)
    assert_user_error(status, err, "is not a folder", str(tmp_path / "nope"))


def test_a_ddpm_checkpoint_is_refused(tmp_path, capsys):
    path = testing_utils.ddpm_checkpoint(tmp_path)
    status, _, err = run_main(["--sample", "--checkpoint", path, "--output_dir",
                               tmp_path / "out"], capsys)
    assert_user_error(status, err, "is a ddpm.py checkpoint", "use ddpm.py with it")
    status, _, err = run_main([*TINY, "--output_dir", tmp_path / "run", "--resume", path], capsys)
    assert_user_error(status, err, "is a ddpm.py checkpoint")


def test_sample_refuses_another_patch_divider(trained, tmp_path, capsys):
    status, _, err = run_main(["--sample", "--checkpoint",
                               os.path.join(trained, "checkpoints", "last.pt"),
                               "--patch_divider", "4", "--output_dir", tmp_path / "s"], capsys)
    assert_user_error(status, err, "--patch_divider 2 (checkpoint) vs 4 (now)")
