"""ddpm.py against lucidrains' denoising-diffusion-pytorch at the same budget, on a folder you name.

Both train on the same folder for the same number of steps of the same batch at the same size,
with the same seed; both then draw the same number of samples with 50 deterministic DDIM steps
from their EMA weights. The table gives, per row: parameters; the time of one training step,
every row measured in this process on the same batch, in turns (A B A B ...: a change in the
machine's speed falls on all rows alike), on the training device, as the median and the range of
10 steps (the speed comparison: only a difference larger than the ranges says something); the
wall time of the whole training run (startup, data, previews included); a Frechet distance;
the samples left in noise; and, when the folder has class subfolders, the classes covered.

    python bench/compare_peer.py --dataset_path DIR --out bench/results/peer_DIR.md
    python bench/compare_peer.py --out bench/results/peer_landscapes.md    # built-in landscapes
    python bench/compare_peer.py --dataset_path DIR --no_peer --variant eps= \\
        --variant v="--prediction v --schedule sigmoid"                     # an ablation

Each --variant NAME=FLAGS is one ddpm.py row: the flags are added to the shared budget flags
(default: one row, "ddpm.py", with the quick preset). The peer is not a dependency of this
repository; install it in its own environment and run this script with that environment's
python, so that both run on one torch build:
    python -m venv peer && peer/bin/pip install denoising-diffusion-pytorch -r requirements.txt
(denoising-diffusion-pytorch imports torchvision, which needs its matching torch release.) The
peer's Dataset reads only .jpg, .jpeg, .png and .tiff files and wants at least 100 of them;
ddpm.py also reads .bmp, .gif, .tif and .webp: give both a folder of the former.
The peer row is its README's setup: Unet(dim, dim_mults) and GaussianDiffusion with their
defaults (v prediction, sigmoid schedule), its Trainer with Adam at --peer_lr, EMA 0.995. Its
Trainer updates the EMA every 10 steps (its default), so its average spans about 10 times as many
steps as ddpm.py's (decay 0.995 every step): a difference of the two setups, not of this script.

The feature space of the Frechet distance (Heusel et al. 2017) is pixel statistics: every image,
real or sampled, is box-filtered to an 8 x 8 RGB thumbnail, 192 numbers in [0, 1], and the
distance is taken between Gaussians fitted to the samples and to all real images (the training
set: a model that memorised it would score best). The table's reference rows are real images
against themselves (as many as the samples, drawn at random from the reference itself, which
biases this floor low), for the built-in landscapes also held-out ones (landscapes after the
first --num_real, which no run trains on), and uniform noise. "Left in noise": samples whose
high-frequency energy, the mean |x - 3x3 box blur of x| of their grey values, exceeds that of
every real image. "Classes": distinct classes among
the samples' nearest real images in thumbnail space.
"""

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ddpm  # noqa: E402
import evaluate  # noqa: E402

PEER_INSTALL = ("install it in its own environment and run this script with that python: "
                "python -m venv peer && peer/bin/pip install denoising-diffusion-pytorch "
                "-r requirements.txt")


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def thumbnails(images):
    """uint8 (N, 3, H, W) -> float64 (N, 192): 8 x 8 box-filtered thumbnails in [0, 1]."""
    x = torch.from_numpy(np.array(images)).double() / 255                 # a copy
    return F.adaptive_avg_pool2d(x, 8).flatten(1).numpy()


def high_frequency(images):
    """uint8 (N, 3, H, W) -> (N,): mean |g - box3x3(g)| of the grey values g in [0, 1]."""
    g = torch.from_numpy(np.asarray(images)).float().mean(1, keepdim=True) / 255
    blur = F.avg_pool2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (g - blur).abs().mean((1, 2, 3)).numpy()


def score(samples, real, labels):
    """-> (FD, samples left in noise, classes covered or None) of uint8 samples against reals."""
    fd = evaluate.features_frechet_distance(thumbnails(samples), thumbnails(real))
    noisy = int((high_frequency(samples) > high_frequency(real).max()).sum())
    if labels is None:
        return fd, noisy, None
    s, r = torch.from_numpy(thumbnails(samples)), torch.from_numpy(thumbnails(real))
    nearest = torch.cdist(s, r).argmin(1).numpy()
    return fd, noisy, len(set(np.asarray(labels)[nearest].tolist()))


# ------------------------------------------------------------------------------------------------
# The two implementations
# ------------------------------------------------------------------------------------------------


def budget_flags(args):
    data = (["--dataset_path", args.dataset_path] if args.dataset_path
            else ["--procedural_size", str(args.num_real)])                # the peer's images
    return data + ["--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
                   "--max_steps", str(args.steps), "--channel_mults", args.channel_mults,
                   "--base_channels", str(args.dim), "--seed", str(args.seed)]


def step_times(steps, device, repeats=10):
    """{name: (median, fastest, slowest) seconds} of the training-step functions `steps`, after
    two warm-up calls each, timed in turns (A B A B ...) on `device`, synchronised."""
    def timed(step):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for step in steps.values():
        timed(step), timed(step)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: (float(np.median(t)), min(t), max(t)) for name, t in times.items()}


def ours_step(args, flags, device):
    """(parameters, a training step) of ddpm.py's network and loss (at its --precision) on a
    random batch on `device`."""
    config = ddpm.parse_args(budget_flags(args) + flags)
    torch.manual_seed(0)
    model = ddpm.build_model(config).to(device)
    diffusion = ddpm.build_diffusion(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    def step():
        for term in diffusion.training_losses(model, x0):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = term()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sum(p.numel() for p in model.parameters()), step


def peer_diffusion(args):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    dim_mults = tuple(int(m) for m in args.channel_mults.split(","))
    return GaussianDiffusion(Unet(dim=args.dim, dim_mults=dim_mults), image_size=args.image_size,
                             timesteps=1000, sampling_timesteps=50)


def peer_step(args, device):
    """(parameters, a training step) of the peer on a random batch on `device`, as its Trainer
    (fp32: its Trainer's default)."""
    torch.manual_seed(0)
    diffusion = peer_diffusion(args).to(device)
    opt = torch.optim.Adam(diffusion.parameters(), lr=args.peer_lr, betas=(0.9, 0.99))
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)

    def step():
        diffusion(x).backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sum(p.numel() for p in diffusion.model.parameters()), step


def run_ours(args, name, flags, work):
    """Train ddpm.py in a subprocess, then sample it. -> (wall seconds of training, samples)."""
    out = os.path.join(work, name)
    train = ([sys.executable, os.path.join(ROOT, "ddpm.py"), *budget_flags(args),
              "--output_dir", out, "--cache_dir", os.path.join(work, "cache"),
              "--save_every", str(args.steps), "--sample_every", str(args.steps)] + flags)
    start = time.perf_counter()
    subprocess.run(train, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    samples = os.path.join(out, "samples")
    subprocess.run([sys.executable, os.path.join(ROOT, "ddpm.py"), "--sample", "--checkpoint",
                    os.path.join(out, "checkpoints", "last.pt"), "--num_samples",
                    str(args.num_samples), "--sampling_steps", "50", "--sampler", "ddim",
                    "--eta", "0", "--batch_size", "100", "--output_dir", samples,
                    "--seed", str(args.seed)], check=True, stdout=subprocess.DEVNULL)
    images = [np.asarray(Image.open(os.path.join(samples, f"{i:05d}.png")).convert("RGB"))
              for i in range(args.num_samples)]
    return seconds, np.stack(images).transpose(0, 3, 1, 2)


def run_peer(args, folder, work):
    """Train the peer with its Trainer on `folder`, then sample its EMA model in batches of 100.
    -> (wall seconds of training, uint8 samples)."""
    from denoising_diffusion_pytorch import Trainer
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    trainer = Trainer(peer_diffusion(args), folder, train_batch_size=args.batch_size,
                      train_lr=args.peer_lr, train_num_steps=args.steps, ema_decay=0.995,
                      save_and_sample_every=args.steps, num_samples=16,
                      results_folder=os.path.join(work, "peer"), convert_image_to="RGB",
                      calculate_fid=False)
    trainer.train()
    seconds = time.perf_counter() - start
    torch.manual_seed(args.seed)
    model, images = trainer.ema.ema_model.eval(), []
    with torch.no_grad():
        for start in range(0, args.num_samples, 100):
            batch = model.sample(batch_size=min(100, args.num_samples - start))
            images.append((batch.clamp(0, 1) * 255).round().byte().cpu().numpy())
    return seconds, np.concatenate(images)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def landscapes(args, indices):
    """uint8 (N, 3, S, S) built-in landscapes of --seed (those ddpm.py trains on), and labels."""
    size = args.image_size
    drawn = [ddpm.procedural_landscape(i, size, size, args.seed) for i in indices]
    return np.stack([d[0] for d in drawn]), [d[1] for d in drawn]


def real_images(args, work):
    """uint8 (N, 3, S, S) real images, their labels (or None), and a folder the peer can read
    (the user's folder, or the built-in landscapes, day and dusk, written out as PNG files)."""
    size = args.image_size
    if args.dataset_path is None:
        images, labels = landscapes(args, range(args.num_real))
        folder = os.path.join(work, "landscapes")
        os.makedirs(folder, exist_ok=True)
        for i, image in enumerate(images):
            ddpm.save_png(image.transpose(1, 2, 0), os.path.join(folder, f"{i:05d}.png"))
        return images, labels, folder
    paths, labels, _ = ddpm.find_images(args.dataset_path, args.classes)
    loaded = [ddpm.load_image(p, size, size) for p in paths]
    keep = [i for i, image in enumerate(loaded) if image is not None]
    labels = None if labels is None else [labels[i] for i in keep]
    return np.stack([loaded[i][0] for i in keep]), labels, args.dataset_path


def main(argv=None):
    try:
        return compare(parse_args(argv))
    except ddpm.UserError as error:
        print(f"compare_peer.py: error: {error}", file=sys.stderr)
        return 2


def parse_args(argv):
    """The command line, checked before any work: the peer importable, --out writable."""
    pos = ddpm.at_least(1)
    p = ddpm.Parser(prog="compare_peer.py", description=__doc__.split("\n")[0])
    p.add_argument("--dataset_path", help="image folder (default: the built-in landscapes)")
    p.add_argument("--classes", action="store_true",
                   help="the folder's top-level subfolders are classes (the classes column)")
    p.add_argument("--out", required=True, help="the Markdown table to write")
    p.add_argument("--work_dir", default=os.path.join("runs", "compare_peer"))
    p.add_argument("--steps", type=pos, default=2000)
    p.add_argument("--batch_size", type=pos, default=16)
    p.add_argument("--image_size", type=pos, default=32)
    p.add_argument("--dim", type=pos, default=32, help="the base width of both U-Nets")
    p.add_argument("--channel_mults", default="1,2,4", help="both U-Nets' width per level")
    p.add_argument("--num_samples", type=pos, default=400)
    p.add_argument("--num_real", type=pos, default=4096, help="built-in images (no folder)")
    p.add_argument("--peer_lr", type=ddpm.at_least(0.0, float), default=2e-4)
    p.add_argument("--seed", type=ddpm.at_least(0), default=0)
    p.add_argument("--variant", action="append", metavar="NAME=FLAGS",
                   help="a ddpm.py row: its name and the flags it adds (repeatable)")
    p.add_argument("--no_peer", action="store_true", help="ddpm.py rows only")
    p.add_argument("--time_only", action="store_true",
                   help="only the step times (a random batch: no data, no training runs)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.variants = [v.partition("=")[::2] for v in args.variant or ["ddpm.py="]]
    if not args.no_peer:
        try:
            import denoising_diffusion_pytorch  # noqa: F401
        except ImportError:
            raise ddpm.UserError(f"denoising-diffusion-pytorch is missing; {PEER_INSTALL}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.access(folder, os.W_OK):
        raise ddpm.UserError(f"--out {args.out}: not a file in a writable folder")
    for name, flags in args.variants:                               # each variant's own checks
        try:
            ddpm.parse_args(budget_flags(args) + shlex.split(flags))
        except ValueError as error:                                 # shlex: an open quote
            raise ddpm.UserError(f"--variant {name}={flags}: {error}") from None
    return args


def compare(args):
    """Time the steps, train and sample every row, score them, write the table."""
    variants, device = args.variants, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The step times first, in turns in this process, before any training run.
    built = {name: ours_step(args, shlex.split(flags), device) for name, flags in variants}
    if not args.no_peer:
        built["peer"] = peer_step(args, device)
    times = step_times({name: step for name, (_, step) in built.items()}, device)
    steps = {name: (built[name][0], times[name]) for name in built}
    del built                                                       # free the timing models
    if args.time_only:
        return write_step_table(args, steps, device)
    os.makedirs(args.work_dir, exist_ok=True)
    real, labels, folder = real_images(args, args.work_dir)
    base = os.path.splitext(args.out)[0]
    rows = []

    def add_row(name, params, step, seconds, samples, flags=None):
        fd, noisy, covered = score(samples, real, labels)
        ddpm.save_png(ddpm.make_grid(torch.from_numpy(samples[:64])),
                      f"{base}_{re.sub(r'[^A-Za-z0-9.-]+', '_', name).strip('_')}.png")
        rows.append((name, flags, params, step, seconds, fd, noisy, covered))
        print(f"{name}: FD {fd:.4f}, {noisy} left in noise, classes {covered}", flush=True)

    for name, flags in variants:
        seconds, samples = run_ours(args, name.replace(" ", "_"), shlex.split(flags),
                                    args.work_dir)
        add_row(name, *steps[name], seconds, samples, flags)
    if not args.no_peer:
        seconds, samples = run_peer(args, folder, args.work_dir)
        add_row("peer", *steps["peer"], seconds, samples)
    write_table(args, rows, real, labels)
    return 0


def header(args, device, title):
    """The table's first lines: what, where, and the command that wrote it."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return [f"# ddpm.py against denoising-diffusion-pytorch: {title}", "",
            f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, training on {where}, torch {torch.__version__}."
            f" Written by", "", f"    python bench/compare_peer.py {shlex.join(args.argv)}", ""]


def write_step_table(args, steps, device):
    """--time_only: parameters and step times of every row."""
    lines = header(args, device, "step times") + [
        f"Seconds per training step on a random batch of {args.batch_size} at {args.image_size} x "
        f"{args.image_size}: the median (fastest - slowest) of 10, every row timed in turns.", "",
        "| row | parameters | step (s) |", "| --- | --- | --- |"]
    for name, (params, (median, fastest, slowest)) in steps.items():
        lines.append(f"| {name} | {params / 1e6:.2f}M | {median:.3f} ({fastest:.3f} - "
                     f"{slowest:.3f}) |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def write_table(args, rows, real, labels):
    rng = np.random.default_rng(args.seed)
    drawn = real[rng.choice(len(real), min(args.num_samples, len(real)), replace=False)]
    noise = rng.integers(0, 256, (args.num_samples, *real.shape[1:]), dtype=np.uint8)
    references = [("real images (drawn)", drawn)]
    if args.dataset_path is None:                                   # other images, same generator
        held_out = range(args.num_real, args.num_real + args.num_samples)
        references.append(("real images (held out)", landscapes(args, held_out)[0]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = header(args, device, args.dataset_path or "the built-in landscapes") + [
        f"{len(real)} real images at {args.image_size} x {args.image_size}; every row: "
        f"{args.steps} steps of batch {args.batch_size}, seed {args.seed}; {args.num_samples} "
        f"samples, 50 DDIM steps (eta 0), EMA weights. Step: seconds per training step, the "
        f"median (fastest - slowest) of 10, every row measured in turns in one process; wall: "
        f"the whole training run. FD: Frechet distance of 8 x 8 thumbnails (lower is better).",
        "",
        "| row | ddpm.py flags | parameters | step (s) | wall (s) | FD | left in noise | classes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    classes = "-" if labels is None else len(set(labels))
    for name, flags, params, step, seconds, fd, noisy, covered in rows:
        flags = "(peer)" if flags is None else f"`{flags}`" if flags else "(quick preset)"
        step = f"{step[0]:.3f} ({step[1]:.3f} - {step[2]:.3f})"
        lines.append(f"| {name} | {flags} | {params / 1e6:.2f}M | {step} | {seconds:.0f} | "
                     f"{fd:.4f} | {noisy} / {args.num_samples} | "
                     f"{'-' if covered is None else covered} / {classes} |")
    for name, images in references + [("uniform noise", noise)]:
        fd, noisy, covered = score(images, real, labels)
        lines.append(f"| {name} | | | | | {fd:.4f} | {noisy} / {len(images)} | "
                     f"{'-' if covered is None else covered} / {classes} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
