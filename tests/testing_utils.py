"""Helpers that the test files of the method scripts can share (the scripts themselves share
nothing but `kernels/`; the tests may). Each helper that runs a script takes its module
(`ddpm`, `patch_ddpm`, ...) as `script`; the argv lists given to them must carry a
`--cache_dir` under the test's tmp_path, so that no test writes into runs/."""

import contextlib
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CONVENTIONS.md "Command line": the training flags every script shares (each shows its default in
# --help) and the train/sample synopsis (--sample and --dry_run are switches: no default).
SHARED_FLAGS = ["--image_size", "--batch_size", "--accumulation_iters", "--max_steps", "--lr",
                "--warmup_steps", "--precision", "--ema_decay", "--ema_start", "--save_every",
                "--sample_every", "--num_workers", "--seed", "--resume", "--kernels",
                "--base_channels", "--channel_mults", "--num_res_blocks",
                "--attention_resolutions", "--dropout", "--cache_dir"]
SYNOPSIS_FLAGS = ["--dataset_path", "--output_dir", "--preset", "--sample", "--checkpoint",
                  "--num_samples", "--sampler", "--sampling_steps", "--dry_run"]

# CONVENTIONS.md "Outputs": every entry of every script's checkpoint, and its training scalars.
CHECKPOINT_KEYS = {"model", "ema", "swa", "optimizer", "scaler", "lr_scheduler", "step", "args",
                   "rng", "rng_other_ranks", "method", "format_version", "nimg"}
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
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k])
                                                                    for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def load(path):
    """A checkpoint, loaded as the scripts load it (weights_only: plain tensors and containers)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run_main(script, argv, capsys):
    """script.main in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()                                             # drop earlier output
    status = script.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_user_error(script, status, err):
    """Exit status 2 and exactly one line on stderr, `<script>.py: error: ...`, no traceback
    (CONVENTIONS.md "Errors"). The wording is not checked."""
    assert status == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"{script.METHOD}.py: error: "), err


def save_image(array_or_image, path, **kw):
    """Write a (H, W, 3) uint8 array or a PIL image to `path` (parent folders made; the format
    from the extension, or `format=` in kw). Returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = (array_or_image if isinstance(array_or_image, Image.Image)
             else Image.fromarray(array_or_image))
    image.save(path, **kw)
    return str(path)


def folder_state(root):
    """{relative path: (size, mtime_ns)} of everything under `root`: to show that a run left a
    folder as it found it."""
    state = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            state[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return state


# ------------------------------------------------------------------------------------------------
# Learning: flat images of two colours


COLOURS = [(230, 40, 40), (40, 60, 230)]                            # red, blue


def two_colour_folder(root, size=8, count=32, classes=False):
    """Flat images of two colours, alternating (classes: in class folders "a_red" and "b_blue",
    so that the class index is the colour's index). Returns the colours in [0, 1]."""
    for i in range(count):
        folder = os.path.join(root, ("a_red", "b_blue")[i % 2]) if classes else str(root)
        os.makedirs(folder, exist_ok=True)
        Image.new("RGB", (size, size), COLOURS[i % 2]).save(os.path.join(folder, f"{i:03d}.png"))
    return np.array(COLOURS) / 255.0


def judge_two_colour_samples(folder, colours):
    """For every sample PNG in `folder`: the distance of its mean colour to each of the two
    colours (largest channel difference in [0, 1] units), shape (N, 2), and the largest channel
    standard deviation of each sample (0 for a flat image)."""
    distances, spread = [], []
    for path in sorted(glob.glob(os.path.join(folder, "0*.png"))):
        pixels = np.asarray(Image.open(path)).reshape(-1, 3) / 255.0
        distances.append(np.abs(colours - pixels.mean(0)).max(1))   # to red, to blue
        spread.append(pixels.std(0).max())
    return np.array(distances), np.array(spread)


def toy_run(script, data, out, max_steps, *flags):
    """A run on a toy dataset in `data` (flat images of a few colours) with a recipe that learns
    it in a few hundred steps on a CPU: a small U-Net, batch 16, a large learning rate, a short
    EMA and 200 timesteps; it checkpoints and previews at the end only. `flags` come last and
    override the recipe."""
    cache = os.path.join(os.path.dirname(str(out)), "cache")
    assert script.main([str(a) for a in [
        "--dataset_path", data, "--base_channels", "16", "--channel_mults", "1",
        "--attention_resolutions", "", "--num_heads", "1", "--num_res_blocks", "1",
        "--batch_size", "16", "--max_steps", max_steps, "--lr", "2e-3", "--warmup_steps", "20",
        "--ema_decay", "0.99", "--ema_start", "50", "--timesteps", "200", "--save_every",
        max_steps, "--sample_every", max_steps, "--preview_samples", "4", "--preview_steps", "4",
        "--output_dir", out, "--cache_dir", cache, *flags]]) == 0


# ------------------------------------------------------------------------------------------------
# Denoisers whose answer is known, to test the samplers apart from any training. Both are called
# as the samplers call a network: model(x_t, t, y) with t the ORIGINAL timestep (timestep_map),
# so they take alpha_bar from the full process `diffusion`, never from a respaced one.


def as_prediction(x, x0, alpha_bar, prediction):
    """The network output for `prediction` when the denoised image is x0, from the closed forms
    (Ho et al. Eq. 4; v of Salimans & Ho), computed here and not by the script."""
    eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0.expand_as(x)
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


class Oracle(torch.nn.Module):
    """A 'network' that knows x_0: it outputs the exact eps, x0 or v of x_t relative to x_0."""

    num_classes = 0

    def __init__(self, diffusion, x0, prediction="eps"):
        super().__init__()
        self.alpha_bar, self.x0, self.prediction = diffusion.alpha_bar_f64, x0.double(), prediction

    def forward(self, x, t, y=None, emb=None):
        ab = self.alpha_bar[t].reshape(-1, 1, 1, 1)
        return as_prediction(x.double(), self.x0, ab, self.prediction).float()


class BayesOptimal(torch.nn.Module):
    """The exact E[x_0 | x_t] (and the eps or v that go with it) for data that is one of a few
    flat colours, each equally likely: x_0 | x_t is a mixture whose weights are the Gaussian
    likelihoods N(x_t; sqrt(ab) c, 1 - ab). eps, x0 and v are affine in x0, so each is its own
    Bayes-optimal prediction, and the three give one sampler."""

    num_classes = 0

    def __init__(self, diffusion, colours, prediction="eps"):
        super().__init__()
        self.alpha_bar, self.colours = diffusion.alpha_bar_f64, colours.double()
        self.prediction = prediction

    def forward(self, x, t, y=None, emb=None):
        ab = self.alpha_bar[t].reshape(-1, 1, 1, 1)
        x = x.double()
        log_lik = torch.stack([-((x - ab.sqrt() * c.reshape(1, 3, 1, 1)) ** 2).sum((1, 2, 3))
                               / (2 * (1 - ab.flatten())) for c in self.colours], 1)
        weights = torch.softmax(log_lik, 1)                         # (B, colours)
        x0 = (weights @ self.colours).reshape(-1, 3, 1, 1)
        return as_prediction(x, x0, ab, self.prediction).float()


# ------------------------------------------------------------------------------------------------
# Training runs. `script` is the method script's module and `tiny` its test file's argv of a tiny
# configuration (with a --cache_dir).


def tiny_args(script, tiny, *extra, num_classes=0):
    """The parsed arguments of `tiny` + `extra`, with the num_classes that main() would take from
    the dataset (build_model needs it)."""
    args = script.parse_args([str(a) for a in tiny + list(extra)])
    args.num_classes = num_classes
    return args


def train_run(script, tiny, tmp_path, name, *extra):
    """A 2-step run into tmp_path/name that checkpoints and previews at step 2: its folder."""
    out = str(tmp_path / name)
    argv = tiny + ["--output_dir", out, "--max_steps", "2", "--save_every", "2",
                   "--sample_every", "2"] + list(extra)
    assert script.main([str(a) for a in argv]) == 0
    return out


def conventional_outputs(run, step=2):
    """args.json of a run that ended at `step`, as a dict, after checking that the run wrote every
    file of CONVENTIONS.md "Outputs" and left no temporary file (every write is atomic)."""
    for name in ("args.json", "checkpoints/last.pt", f"checkpoints/step_{step}.pt",
                 f"samples/step_{step}.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert glob.glob(os.path.join(run, "events.out.tfevents.*"))
    leftovers = [p for p in glob.glob(os.path.join(run, "**", "*"), recursive=True)
                 if ".tmp" in os.path.basename(p)]
    assert leftovers == []
    with open(os.path.join(run, "args.json")) as f:
        return json.load(f)


def conventional_checkpoints(run, method, step=2):
    """last.pt and step_<step>.pt of a run that ended at `step`, after checking that each has
    exactly the conventional entries, names its method and step, and that last.pt is the last
    step's checkpoint (equal entries)."""
    last, numbered = (load(os.path.join(run, "checkpoints", name))
                      for name in ("last.pt", f"step_{step}.pt"))
    for ckpt in (last, numbered):
        assert set(ckpt) == CHECKPOINT_KEYS
        assert ckpt["method"] == method and ckpt["step"] == step
        assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state_equal(last, numbered)
    return last, numbered


def tensorboard_events(run):
    """The run's TensorBoard events, read (tensorboard is slow to import: only when needed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return events


def scalars(run, tag):
    """{step: value} of one TensorBoard scalar of a run."""
    return {e.step: e.value for e in tensorboard_events(run).Scalars(tag)}


def assert_resume_is_exact(script, argv, tmp_path, keys):
    """4 steps of `argv` in one run == resuming from that run's step-2 checkpoint for 2 more
    steps: the checkpoint entries `keys` are bitwise equal, so is the logged loss of steps 3 and
    4, and training did change the model. Returns both last checkpoints (full run, resumed run)."""
    common = [str(a) for a in argv] + ["--max_steps", "4", "--save_every", "2", "--sample_every",
                                       "100", "--log_every", "1"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    assert script.main(common + ["--output_dir", full]) == 0
    assert script.main(common + ["--output_dir", resumed, "--resume",
                                 os.path.join(full, "checkpoints", "step_2.pt")]) == 0
    a = load(os.path.join(full, "checkpoints", "last.pt"))
    b = load(os.path.join(resumed, "checkpoints", "last.pt"))
    assert a["step"] == b["step"] == 4
    for key in keys:
        assert state_equal(a[key], b[key]), key
    losses = scalars(full, "train/loss")
    assert scalars(resumed, "train/loss") == {3: losses[3], 4: losses[4]}
    two = load(os.path.join(full, "checkpoints", "step_2.pt"))
    assert not state_equal(two["model"], a["model"])
    return a, b


@contextlib.contextmanager
def recorded_ddp(model, tmp_path, events):
    """`model` in a one-process DDP (gloo) that appends "enter" and "exit" to `events` around each
    no_sync and "forward" at each forward pass."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        no_sync = ddp.no_sync

        @contextlib.contextmanager
        def recorded_no_sync():
            with no_sync():
                events.append("enter")
                yield
                events.append("exit")
        ddp.no_sync = recorded_no_sync
        hook = model.register_forward_pre_hook(lambda m, inputs: events.append("forward"))
        yield ddp
        hook.remove()
    finally:
        dist.destroy_process_group()


# A script run under torchrun through this wrapper records, per rank, in OUT/probe-<rank>.json:
# how many times it built the dataset cache, which array files it mapped, and a hash of its final
# weights (DDP keeps the replicas identical).
PROBE = '''\
import hashlib, json, os, sys
sys.path.insert(0, {root!r})
import numpy as np
import {method} as script

record, runs = {{"built": 0, "mapped": []}}, []
real_build, real_load, real_build_run = script.build_cache, np.load, script.build_run


def build_cache(*args, **kwargs):
    record["built"] += 1
    return real_build(*args, **kwargs)


def load(path, *args, **kwargs):
    if kwargs.get("mmap_mode"):
        record["mapped"].append(os.path.realpath(str(path)))
    return real_load(path, *args, **kwargs)


def build_run(*args, **kwargs):
    runs.append(real_build_run(*args, **kwargs))
    return runs[-1]


script.build_cache, script.build_run, np.load = build_cache, build_run, load
status = script.main()
weights = b"".join(p.detach().cpu().numpy().tobytes() for p in runs[0].raw.parameters())
record["weights"] = hashlib.sha256(weights).hexdigest()
with open(os.path.join({out!r}, "probe-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(record, f)
sys.exit(status)
'''


def weights_hash(state_dict, model):
    """The hash PROBE takes of a model's parameters, from a checkpoint's state dict."""
    names = [name for name, _ in model.named_parameters()]
    return hashlib.sha256(b"".join(state_dict[n].numpy().tobytes() for n in names)).hexdigest()


def assert_torchrun_ddp_on_cpu(script, tiny, tmp_path, *overrides, name="ddp"):
    """3 steps of `tiny` (then `overrides`, which may split the 3 steps otherwise) with gradient
    accumulation in 2 processes (torchrun, gloo), after
    checking that the run succeeds, that only rank 0 logs, and that both ranks end with the same
    weights. `--standalone` lets torchrun pick a free port: a fixed one makes two test sessions
    on one machine wait for each other's rendezvous until the timeout. Writes to tmp_path/name;
    returns the last checkpoint and the two ranks' PROBE records."""
    out = tmp_path / name
    out.mkdir()
    probe = tmp_path / f"probe-{name}.py"
    probe.write_text(PROBE.format(root=ROOT, method=script.METHOD, out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(probe)] + [str(a) for a in tiny] +
        ["--output_dir", str(out), "--max_steps", "3", "--save_every", "3", "--sample_every",
         "3", "--accumulation_iters", "2", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 1   # rank 0 only
    assert result.stdout.count("parameters") == 1
    records = [json.loads((out / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["weights"] == records[1]["weights"]
    return ckpt, records


# ------------------------------------------------------------------------------------------------
# The sample command


def sample_images(script, checkpoint, out, *flags):
    """`--sample` of `checkpoint` into `out` with `flags`: its images, (N, H, W, 3) uint8."""
    assert script.main(["--sample", "--checkpoint", str(checkpoint), "--output_dir", str(out),
                        *map(str, flags)]) == 0
    paths = sorted(glob.glob(os.path.join(str(out), "0*.png")))
    return np.stack([np.asarray(Image.open(p)) for p in paths])


def assert_same_samples(script, checkpoint, tmp_path, variants):
    """`--sample` of 4 images with seed 5, once with each list of flags in `variants`: every time
    the same images (up to one level of 255, for rounding), and not 4 copies of one image.
    Returns the output folders, for the caller's checks of the files."""
    folders, images = [], []
    for i, flags in enumerate(variants):
        folders.append(tmp_path / f"variant{i}")
        images.append(sample_images(script, checkpoint, folders[-1], "--num_samples", "4",
                                    "--seed", "5", *flags).astype(int))
    assert images[0].shape[0] == 4
    for other in images[1:]:
        assert np.abs(images[0] - other).max() <= 1
    assert not np.array_equal(images[0][0], images[0][1])
    return folders


# Each changes what --sample draws from a class-conditional run with SWA, whose defaults are DDIM
# with eta 0, the EMA weights and no guidance.
SAMPLE_FLAGS = [["--sampler", "ddpm"],
                ["--eta", "1.0", "--weights", "model"],
                ["--guidance_scale", "3.0", "--class_label", "1", "--weights", "swa"]]


def assert_flags_change_the_samples(script, checkpoint, tmp_path, flags, base=()):
    """`--sample` with `base` + `flags` draws as many images of the same size as with `base`
    alone, but other images: the flags reach the sampler."""
    a = sample_images(script, checkpoint, tmp_path / "base", "--num_samples", "4", *base)
    b = sample_images(script, checkpoint, tmp_path / "flags", "--num_samples", "4", *base, *flags)
    assert a.shape == b.shape and not np.array_equal(a, b)


def assert_saves_gif(script, checkpoint, tmp_path):
    """`--sample --save_gif` writes the sampling trajectory as an animated GIF, ending on the
    final grid."""
    out = str(tmp_path / "gif")
    assert script.main(["--sample", "--checkpoint", str(checkpoint), "--output_dir", out,
                        "--save_gif", "--sampling_steps", "10", "--num_samples", "2"]) == 0
    with Image.open(os.path.join(out, "trajectory.gif")) as gif:
        assert gif.n_frames > 5
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB")).astype(int)
    grid = np.asarray(Image.open(os.path.join(out, "grid.png"))).astype(int)
    assert last.shape == grid.shape
    assert np.abs(last - grid).mean() < 8                           # GIF palette quantisation
    assert [p for p in os.listdir(out) if ".tmp" in p] == []


# ------------------------------------------------------------------------------------------------
# The command line


def help_text(script, capsys):
    """`--help`, after checking that it exits with status 0."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def help_blocks(script, capsys):
    """{flag: its block of --help (the flag's line and its help)}."""
    return {m.group(1): m.group(0) for m in re.finditer(
        r"^  (--\w+).*?(?=^  -|^\S|\Z)", help_text(script, capsys), flags=re.M | re.S)}


def assert_refused_before_any_work(script, argv, tmp_path, capsys):
    """`argv --output_dir tmp_path/run --cache_dir tmp_path/cache` is a user error (see
    assert_user_error) found before the run folder or the cache is made."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    status, _, err = run_main(script, [*argv, "--output_dir", run, "--cache_dir", cache], capsys)
    assert_user_error(script, status, err)
    assert not run.exists() and not cache.exists()


def run_cli(script, args, cwd=ROOT, timeout=120):
    """`python <script>.py ARGS` as a user runs it, in a subprocess (stdout and stderr pipes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, f"{script.METHOD}.py"),
                           *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
