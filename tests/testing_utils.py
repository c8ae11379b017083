"""Helpers that the test files of every method script share (the scripts themselves share nothing
but `kernels/`; the tests may)."""

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CONVENTIONS.md "Command line": the training flags every script shares (each shows its default in
# --help) and the train/sample synopsis (--sample and --dry_run are switches: no default).
SHARED_FLAGS = ["--image_size", "--batch_size", "--accumulation_iters", "--max_steps", "--lr",
                "--warmup_steps", "--precision", "--ema_decay", "--ema_start", "--save_every",
                "--sample_every", "--num_workers", "--seed", "--resume", "--kernels",
                "--base_channels", "--channel_mults", "--num_res_blocks",
                "--attention_resolutions", "--dropout"]
SYNOPSIS_FLAGS = ["--dataset_path", "--output_dir", "--preset", "--sample", "--checkpoint",
                  "--num_samples", "--sampler", "--sampling_steps", "--dry_run"]

# CONVENTIONS.md "Outputs": every entry of every script's checkpoint, and its training scalars.
CHECKPOINT_KEYS = {"model", "ema", "swa", "optimizer", "scaler", "lr_scheduler", "step", "args",
                   "rng", "method", "format_version"}
TRAIN_SCALARS = ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec",
                 "train/peak_memory_mb")


def randomize(model, seed=0):
    """Give every parameter a random value (an untrained U-Net outputs exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def state_equal(a, b):
    """Bitwise equality of nested state (tensors, dicts, lists, plain values)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def run_main(script, argv, capsys):
    """script.main in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()                                             # drop earlier output
    status = script.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_user_error(script, status, err, *phrases):
    """Exit status 2 and exactly one line `<script>.py: error: ...` that contains every phrase."""
    assert status == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"{script.METHOD}.py: error: "), err
    for phrase in phrases:
        assert phrase.lower() in err.lower(), f"{phrase!r} not in {err!r}"


def save_image(array_or_image, path, **kw):
    """Write a (H, W, 3) uint8 array or a PIL image to `path` (parent folders made; the format
    from the extension, or `format=` in kw). Returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = (array_or_image if isinstance(array_or_image, Image.Image)
             else Image.fromarray(array_or_image))
    image.save(path, **kw)
    return str(path)


def two_colour_folder(root, size=8, count=32):
    """Flat images of two colours: trivially learnable. Returns the colours in [0, 1]."""
    os.makedirs(root, exist_ok=True)
    colours = [(230, 40, 40), (40, 60, 230)]
    for i in range(count):
        Image.new("RGB", (size, size), colours[i % 2]).save(os.path.join(root, f"{i:03d}.png"))
    return np.array(colours) / 255.0


def judge_two_colour_samples(folder, colours):
    """For every sample PNG in `folder`: the distance of its mean colour to the nearer of the two
    colours (largest channel difference in [0, 1] units), which colour that is, and the largest
    channel standard deviation (0 for a flat image)."""
    distances, nearest, spread = [], [], []
    for path in sorted(glob.glob(os.path.join(folder, "0*.png"))):
        pixels = np.asarray(Image.open(path)).reshape(-1, 3) / 255.0
        distance = np.abs(colours - pixels.mean(0)).max(1)          # to red, to blue
        distances.append(distance.min())
        nearest.append(distance.argmin())
        spread.append(pixels.std(0).max())
    return np.array(distances), nearest, spread


# ------------------------------------------------------------------------------------------------
# Denoisers whose answer is known, to test the samplers apart from any training


class Oracle(torch.nn.Module):
    """A 'network' that knows x_0: it returns x_0 itself (target "x0") or the exact noise that
    turns x_0 into x_t (target "eps")."""

    num_classes = 0

    def __init__(self, diffusion, x0, target="eps"):
        super().__init__()
        self.diffusion, self.x0, self.target = diffusion, x0, target

    def forward(self, x, t, y=None):
        if self.target == "x0":
            return self.x0.expand_as(x)
        ab = self.diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


class BayesOptimal(torch.nn.Module):
    """The exact E[x_0 | x_t] (target "x0") or E[eps | x_t] (target "eps") for data that is one of
    a few flat colours, each equally likely: x_0 | x_t is a mixture whose weights are the Gaussian
    likelihoods N(x_t; sqrt(ab) c, 1 - ab)."""

    num_classes = 0

    def __init__(self, diffusion, colours, target="eps"):
        super().__init__()
        self.diffusion, self.colours, self.target = diffusion, colours.double(), target

    def forward(self, x, t, y=None):
        ab = self.diffusion.alphas_cumprod[t].double().reshape(-1, 1, 1, 1)
        x = x.double()
        log_lik = torch.stack([-((x - ab.sqrt() * c.reshape(1, 3, 1, 1)) ** 2).sum((1, 2, 3))
                               / (2 * (1 - ab.flatten())) for c in self.colours], 1)
        weights = torch.softmax(log_lik, 1)                         # (B, colours)
        x0 = (weights @ self.colours).reshape(-1, 3, 1, 1)
        if self.target == "x0":
            return x0.expand_as(x).float()
        return ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).float()


# ------------------------------------------------------------------------------------------------
# Training runs. `script` is the method script's module (ddpm, patch_ddpm, patchify_ddpm) and
# `tiny` its test file's TINY argv; the test files bind both with functools.partial.


def tiny_args(script, tiny, *extra, num_classes=0):
    """The parsed arguments of `tiny` + `extra`, with the num_classes that main() would take from
    the dataset (build_model needs it)."""
    args = script.parse_args(tiny + list(extra))
    args.num_classes = num_classes
    return args


def train_run(script, tiny, tmp_path, name, *extra):
    """A 2-step run into tmp_path/name that checkpoints and samples at step 2: its folder."""
    out = str(tmp_path / name)
    argv = tiny + ["--output_dir", out, "--max_steps", "2", "--save_every", "2",
                   "--sample_every", "2"] + list(extra)
    assert script.main(argv) == 0
    return out


def trained_fixture(train_run):
    """A module fixture `trained`: a 2-step class-conditional run with SWA on the built-in dataset
    (`train_run`: train_run bound to a script and its TINY), one checkpoint that the file's tests
    of the sample command and of the command line share: a run per test would be slow."""
    @pytest.fixture(scope="module")
    def trained(tmp_path_factory):
        return train_run(tmp_path_factory.mktemp("run"), "cond", "--class_conditional", "--swa",
                         "--swa_start", "0")
    return trained


def toy_run(script, data, out, max_steps, *flags):
    """A run on a toy dataset in `data` (images of a few flat colours) with a recipe that learns
    it in a few hundred steps on a CPU: a small U-Net (base 32, two levels), batch 32, a large
    learning rate, a short EMA and 200 timesteps; it checkpoints and samples at the end only."""
    assert script.main(["--dataset_path", str(data), "--base_channels", "32", "--channel_mults",
                        "1,2", "--num_res_blocks", "1", "--batch_size", "32", "--max_steps",
                        str(max_steps), "--lr", "2e-3", "--warmup_steps", "20", "--ema_decay",
                        "0.99", "--ema_start", "50", "--timesteps", "200", "--save_every",
                        str(max_steps), "--sample_every", str(max_steps), "--output_dir", out,
                        *flags]) == 0


def assert_learns_two_colours(script, tmp_path, size, max_steps, *flags):
    """A toy_run of `max_steps` with `flags` on two_colour_folder's images of `size` pixels: 16
    samples from its last checkpoint are flat images close to red or blue, and both appear."""
    colours = two_colour_folder(tmp_path / "data", size=size)
    run, samples = str(tmp_path / "run"), str(tmp_path / "samples")
    toy_run(script, tmp_path / "data", run, max_steps, "--image_size", str(size), *flags)
    assert script.main(["--sample", "--checkpoint", os.path.join(run, "checkpoints", "last.pt"),
                        "--num_samples", "16", "--sampling_steps", "25", "--output_dir",
                        samples]) == 0
    distances, nearest, spread = judge_two_colour_samples(samples, colours)
    assert len(distances) == 16
    # Close to red or blue: a blend of the two would be 0.37 away, an arbitrary colour ~0.5.
    assert np.median(distances) < 0.15 and (distances < 0.2).sum() >= 12, distances.round(2)
    assert np.median(spread) < 0.05, spread                         # flat images, not noise
    assert set(nearest) == {0, 1}                                   # both colours appear


def conventional_outputs(run):
    """args.json of a 2-step run, as a dict, after checking that the run wrote every file of
    CONVENTIONS.md "Outputs"."""
    for name in ("args.json", "checkpoints/last.pt", "checkpoints/step_2.pt",
                 "samples/step_2.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    with open(os.path.join(run, "args.json")) as f:
        return json.load(f)


def conventional_checkpoints(run, method):
    """last.pt and step_2.pt of a 2-step run, after checking that each has exactly the
    conventional entries and names its method and step."""
    ckpts = []
    for name in ("last.pt", "step_2.pt"):
        ckpt = torch.load(os.path.join(run, "checkpoints", name), map_location="cpu",
                          weights_only=True)
        assert set(ckpt) == CHECKPOINT_KEYS, name
        assert ckpt["method"] == method and ckpt["step"] == 2, name
        ckpts.append(ckpt)
    return ckpts


def tensorboard_events(run):
    """The run's TensorBoard events, read (tensorboard is slow to import: only when needed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return events


def assert_resume_is_exact(script, argv, tmp_path, keys):
    """4 steps of `argv` in one run == resuming from that run's step-2 checkpoint for 2 more
    steps: the checkpoint entries `keys` are bitwise equal, and training did change the model.
    Returns both last checkpoints (full run, resumed run) for the caller's own checks."""
    common = argv + ["--max_steps", "4", "--save_every", "2", "--sample_every", "100"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    assert script.main(common + ["--output_dir", full]) == 0
    assert script.main(common + ["--output_dir", resumed, "--resume",
                                 os.path.join(full, "checkpoints", "step_2.pt")]) == 0
    a = torch.load(os.path.join(full, "checkpoints", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed, "checkpoints", "last.pt"), weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in keys:
        assert state_equal(a[key], b[key]), key
    two = torch.load(os.path.join(full, "checkpoints", "step_2.pt"), weights_only=True)
    assert not state_equal(two["model"], a["model"])
    return a, b


def assert_torchrun_ddp_on_cpu(script, tiny, tmp_path):
    """3 steps of `tiny` with gradient accumulation in 2 processes (torchrun, gloo), after
    checking that the run succeeds and that only rank 0 logs. Returns the last checkpoint.
    `--standalone` lets torchrun pick a free port: a fixed one makes two test sessions on one
    machine wait for each other's rendezvous until the timeout."""
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, f"{script.METHOD}.py")] + tiny +
        ["--output_dir", out, "--max_steps", "3", "--save_every", "3", "--sample_every", "3",
         "--accumulation_iters", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert ckpt["step"] == 3
    assert len(glob.glob(os.path.join(out, "events.out.tfevents.*"))) == 1   # rank 0 only
    assert result.stdout.count("parameters") == 1
    return ckpt


def ddpm_checkpoint(tmp_path):
    """The last.pt of a 1-step ddpm.py run on an 8x8 one-level U-Net: a checkpoint that the other
    scripts must refuse."""
    import ddpm

    run = str(tmp_path / "ddpm")
    assert ddpm.main(["--image_size", "8", "--channel_mults", "1", "--attention_resolutions", "",
                      "--batch_size", "2", "--procedural_size", "4", "--num_samples", "1",
                      "--sampling_steps", "1", "--max_steps", "1", "--output_dir", run]) == 0
    return os.path.join(run, "checkpoints", "last.pt")


# ------------------------------------------------------------------------------------------------
# The sample command


def assert_same_samples(script, checkpoint, tmp_path, variants):
    """`--sample` of 4 images with seed 5, once with each list of flags in `variants`: every time
    the same images (up to one level of 255, for rounding), and not 4 copies of one image.
    Returns the output folders, for the caller's checks of the files."""
    folders, images = [], []
    for i, flags in enumerate(variants):
        out = str(tmp_path / f"variant{i}")
        assert script.main(["--sample", "--checkpoint", checkpoint, "--num_samples", "4",
                            "--seed", "5", "--output_dir", out, *flags]) == 0
        folders.append(out)
        images.append([np.asarray(Image.open(os.path.join(out, f"{k:05d}.png")))
                       for k in range(4)])
    for other in images[1:]:
        for a, b in zip(images[0], other):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert not np.array_equal(images[0][0], images[0][1])
    return folders


# Each changes what --sample draws from a class-conditional run with SWA, whose defaults are DDIM
# with eta 0, the EMA weights and no guidance (ddpm.py and patch_ddpm.py).
SAMPLE_FLAGS = [["--sampler", "ddpm"],
                ["--eta", "1.0", "--weights", "model"],
                ["--guidance_scale", "3.0", "--class_label", "1", "--weights", "swa"]]


def assert_flags_change_the_samples(script, checkpoint, tmp_path, flags):
    """`--sample` with `flags` draws a grid of the same size as without them, but other images:
    the flags reach the sampler."""
    base, out = str(tmp_path / "base"), str(tmp_path / "flags")
    assert script.main(["--sample", "--checkpoint", checkpoint, "--output_dir", base]) == 0
    assert script.main(["--sample", "--checkpoint", checkpoint, "--output_dir", out] + flags) == 0
    a = np.asarray(Image.open(os.path.join(base, "grid.png")))
    b = np.asarray(Image.open(os.path.join(out, "grid.png")))
    assert a.shape == b.shape and not np.array_equal(a, b)


def assert_saves_gif(script, checkpoint, tmp_path):
    """`--sample --save_gif` writes the sampling trajectory as an animated GIF."""
    out = str(tmp_path / "gif")
    assert script.main(["--sample", "--checkpoint", checkpoint, "--output_dir", out, "--save_gif",
                        "--sampling_steps", "10"]) == 0
    assert Image.open(os.path.join(out, "trajectory.gif")).n_frames > 5


# ------------------------------------------------------------------------------------------------
# The command line


def help_blocks(script, capsys, flags, with_default):
    """`--help` option by option ({"--name": its text up to the next option}), after checking
    that it exits with status 0, lists every flag in `flags` and shows the default of every flag
    in `with_default`."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    blocks = {m.group(1): m.group(0) for m in
              re.finditer(r"^  (--\w+).*?(?=^  -|\Z)", text, flags=re.M | re.S)}
    for flag in flags:
        assert flag in blocks, f"{flag} missing from --help"
    for flag in with_default:
        assert "default" in blocks[flag], f"{flag}'s help does not show its default"
    return blocks


def dry_run(script, argv, capsys):
    """`argv --dry_run`, after checking that it exits with status 0: (the configuration it prints,
    as a dict; the parameter count it prints; its output after "parameters:")."""
    status, out, err = run_main(script, [*argv, "--dry_run"], capsys)
    assert status == 0, err
    config_text, marker, rest = out.partition("parameters:")
    assert marker, out
    parameters = int(re.match(r" ([\d,]+)", rest).group(1).replace(",", ""))
    return json.loads(config_text), parameters, rest


def assert_refused_before_any_work(script, argv, tmp_path, capsys, *phrases):
    """`argv --output_dir tmp_path/run` is a user error (see assert_user_error) found before the
    run folder is made."""
    run = tmp_path / "run"
    status, _, err = run_main(script, [*argv, "--output_dir", run], capsys)
    assert_user_error(script, status, err, *phrases)
    assert not run.exists()


def run_cli(script, args, cwd=ROOT):
    """`python <script>.py ARGS` as a user runs it, in a subprocess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, f"{script.METHOD}.py"),
                           *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)

