"""Patch Diffusion's claims (Wang et al. 2023), measured with patch_diffusion.py's own functions.

    speed     Time per 1,000 crops seen (the paper's unit) at --real_p 1, 0.5 and 0.25: the same
              network, --batch_size and seed; every run makes the same number of optimizer steps
              after a warm-up, and the sizes are drawn as in training. Also each crop size alone.
              The six runs are timed in turns, one step of each at a time.
    quality   --real_p 1 and 0.5 (or --real_p_values) each trained for the same wall-clock minutes
              (evaluations are not counted), then the full-image EDM loss of the EMA weights,
              lambda(sigma) ||D(y + sigma n; sigma) - y||^2, on a fixed held-out set of images,
              sigmas and noises: a table over sigma, plus the loss at the log-normal training
              sigmas. With --every M also the loss every M minutes on held-out and on training
              images (data efficiency: train against held-out). And 16 samples of each run (18
              Heun steps, the same seeds) side by side.

Held-out images: for the built-in landscapes, the landscapes of another seed; for a folder, every
10th file (sorted), which training never reads (it trains on a folder of links to the others).
--limit N trains on N of the other files, evenly spaced. The LR is constant after the warm-up
(the cosine decay needs an end, and a time budget has none), the same for every run.

    python bench/patch_diffusion_claims.py speed --out bench/results/patch_diffusion_speed_cpu.md
    python bench/patch_diffusion_claims.py quality --minutes 5 \
        --out bench/results/patch_diffusion_quality_landscapes.md
    python bench/patch_diffusion_claims.py quality --dataset_path DIR --minutes 5 \
        --out bench/results/patch_diffusion_quality_digits.md
    python bench/patch_diffusion_claims.py quality --dataset_path DIR --limit 300 --minutes 5 \
        --every 1 --out bench/results/patch_diffusion_data_efficiency_digits.md

CPU numbers mean something only on an otherwise idle machine. No FID is computed here: these runs
are minutes long, and FID needs thousands of samples and a trained network to mean anything.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import patch_diffusion as pd  # noqa: E402
import report  # noqa: E402

SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def header(title, argv):
    return report.header(title, "patch_diffusion_claims.py", argv)


def script_args(flags, output_dir):
    """patch_diffusion.py's checked configuration of `flags`, unconditional, kernels chosen."""
    args = pd.parse_args([*map(str, flags), "--output_dir", output_dir])
    args.num_classes = 0
    pd.kernels.set_backend(args.kernels)
    return args


# ------------------------------------------------------------------------------------------------
# speed


def timed_in_turns(runs, images, opts, device):
    """{key: (step seconds, crops)} of opts.steps optimizer steps of every run of `runs`
    ({key: (run, args, factor or None)}) after opts.warmup untimed ones, timed in turns (one
    step of each run, then the next round), so that a change in the machine's speed falls on all
    runs alike. A run's factor is forced when given, else drawn as in training from its own copy
    of Python's generator, seeded 0."""
    states, real_draw = {key: random.Random(0).getstate() for key in runs}, pd.draw_patch_factor
    times = {key: [] for key in runs}
    start_nimg = {key: run.nimg for key, (run, _, _) in runs.items()}
    try:
        for step in range(opts.warmup + opts.steps):
            for key, (run, args, factor) in runs.items():
                random.setstate(states[key])
                pd.draw_patch_factor = real_draw if factor is None else lambda a, d, f=factor: f
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                pd.train_step(run, images, None, args)
                pd.optimizer_step(run, args)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step >= opts.warmup:
                    times[key].append(time.perf_counter() - start)
                else:
                    start_nimg[key] = run.nimg
                states[key] = random.getstate()
    finally:
        pd.draw_patch_factor = real_draw
    return {key: (times[key], run.nimg - start_nimg[key]) for key, (run, _, _) in runs.items()}


def speed(opts, device, tmp):
    flags = ["--image_size", opts.image_size, "--batch_size", opts.batch_size, "--max_steps",
             10 ** 7, "--kernels", "auto", *opts.flags]
    images = np.random.default_rng(0).integers(0, 256, (512, 3, *pd.image_size(opts.image_size)),
                                               dtype=np.uint8)
    runs = {}
    for real_p in (1.0, 0.5, 0.25):
        args = script_args([*flags, "--real_p", real_p], tmp)
        runs[real_p] = (pd.build_run(args, None, device, 0, 1), args, None)
    for factor in pd.PATCH_FACTORS:
        args = script_args([*flags, "--real_p", 0.5], tmp)
        runs[f"R/{factor}"] = (pd.build_run(args, None, device, 0, 1), args, factor)
    timed = timed_in_turns(runs, images, opts, device)
    run = runs[1.0][0]
    rows = [(real_p, sum(timed[real_p][0]), timed[real_p][1]) for real_p in (1.0, 0.5, 0.25)]
    forced = [(f, statistics.median(timed[f"R/{f}"][0]), timed[f"R/{f}"][1] / opts.steps)
              for f in pd.PATCH_FACTORS]
    base = rows[0][1] / rows[0][2]
    h, w = pd.image_size(opts.image_size)
    lines = [f"- {h}x{w}, --batch_size {opts.batch_size}, "
             f"{sum(p.numel() for p in run.raw.parameters()) / 1e6:.2f}M parameters, flags: "
             f"`{' '.join(map(str, opts.flags)) or '(the quick preset)'}`; {opts.steps} timed "
             f"steps after {opts.warmup} untimed, per run, the six runs timed in turns (one step "
             "of each, then the next); the sizes drawn with Python's generator seeded 0, one "
             "copy per run.", "",
             "| --real_p | crops seen | seconds | seconds per 1,000 crops | vs --real_p 1 |",
             "| --- | --- | --- | --- | --- |"]
    for real_p, seconds, crops in rows:
        lines.append(f"| {real_p} | {crops} | {seconds:.2f} | {1000 * seconds / crops:.2f} | "
                     f"{seconds / crops / base:.3f} |")
    lines += ["", "Each crop size alone (median step time):", "",
              "| crop side | crops per step | seconds per step | seconds per 1,000 crops |",
              "| --- | --- | --- | --- |"]
    for factor, median, crops in forced:
        lines.append(f"| R/{factor} ({h // factor}x{w // factor}) | {crops:.0f} | {median:.3f} | "
                     f"{1000 * median / crops:.2f} |")
    ratio = rows[1][1] / rows[1][2] / base
    lines += ["", f"Target (issue): --real_p 0.5 at most 0.55x the time per crop of --real_p 1: "
              f"{ratio:.3f}x, {'met' if ratio <= 0.55 else 'missed'}."]
    return lines


# ------------------------------------------------------------------------------------------------
# quality


def split_folder(root, limit, tmp):
    """(a folder of links to the training files, the held-out paths): every 10th file held out."""
    paths = pd.find_images(root, False)[0]
    held_out = paths[::10]
    train = [p for i, p in enumerate(paths) if i % 10]
    if limit:
        train = [train[int(i)] for i in np.linspace(0, len(train) - 1, limit)]
    folder = os.path.join(tmp, "train")
    for i, path in enumerate(train):
        name = f"{i:05d}_{os.path.basename(path)}"
        os.makedirs(folder, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(folder, name))
    return folder, held_out, train


def as_batch(arrays, device):
    return torch.from_numpy(np.stack(arrays)).to(device).float() / 127.5 - 1


@torch.no_grad()
def edm_losses(model, images, seed):
    """lambda(sigma) ||D - y||^2 averaged over images and pixels, at each of SIGMAS and at 4
    log-normal training sigmas per image; the noise is fixed by `seed`."""
    model.eval()
    edm, g = pd.EDM(), torch.Generator().manual_seed(seed)
    noise = torch.randn(len(SIGMAS) + 4, *images.shape, generator=g).to(images.device)
    log_normal = (torch.randn(4, len(images), 1, 1, 1, generator=g) * edm.P_std
                  + edm.P_mean).exp().to(images.device)

    def loss(sigma, n):
        denoised = edm.denoise(lambda x, c: model(x, c), images + sigma * n, sigma)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        return float((weight * (denoised - images) ** 2).mean())
    per_sigma = [loss(torch.tensor(s, device=images.device), noise[i])
                 for i, s in enumerate(SIGMAS)]
    training = statistics.mean(loss(log_normal[j], noise[len(SIGMAS) + j]) for j in range(4))
    return per_sigma, training


def train_for(args, images, minutes, every, evaluate, device):
    """Train until `minutes` of training time; evaluate(ema) every `every` minutes and at the end.
    -> (run, [(minute, evaluation)], training seconds)."""
    run, log, seconds, next_eval = pd.build_run(args, None, device, 0, 1), [], 0.0, every
    run.model.train()
    while seconds < 60 * minutes:
        start = time.perf_counter()
        pd.train_step(run, images, None, args)
        pd.optimizer_step(run, args)
        seconds += time.perf_counter() - start
        if every and seconds >= 60 * next_eval and seconds < 60 * minutes:
            log.append((next_eval, evaluate(run.ema.shadow)))
            run.model.train()
            next_eval += every
    log.append((minutes, evaluate(run.ema.shadow)))
    return run, log, seconds


def quality(opts, device, tmp):
    h, w = pd.image_size(opts.image_size)
    if opts.dataset_path:
        folder, held_paths, train_paths = split_folder(opts.dataset_path, opts.limit, tmp)
        held = [r[0] for r in map(lambda p: pd.load_image(p, h, w), held_paths) if r][
            :opts.held_out]
        seen = [r[0] for r in map(lambda p: pd.load_image(p, h, w), train_paths) if r][
            :opts.held_out]
        data_flags, source = ["--dataset_path", folder], (
            f"{len(train_paths)} training images of {opts.dataset_path} "
            f"({len(held)} held out of every 10th file)")
    else:
        size = opts.limit or 4096
        held = [pd.procedural_landscape(i, h, w, seed=12345)[0] for i in range(opts.held_out)]
        seen = [pd.procedural_landscape(i, h, w, seed=0)[0] for i in range(opts.held_out)]
        data_flags = ["--procedural_size", size]
        source = f"{size} built-in landscapes (seed 0); {len(held)} held out of seed 12345"
    held, seen = as_batch(held, device), as_batch(seen, device)
    runs = {}
    for real_p in opts.real_p_values:
        args = script_args(["--image_size", opts.image_size, "--batch_size", opts.batch_size,
                            "--max_steps", 10 ** 7, "--lr_schedule", "constant", "--cache_dir",
                            os.path.join(tmp, "cache"), "--real_p", real_p, *data_flags,
                            *opts.flags], os.path.join(tmp, f"run{real_p}"))
        images = pd.load_dataset(args, log=lambda *a, **k: None)[0]
        torch.manual_seed(0)
        random.seed(0)

        def evaluate(model):
            return edm_losses(model, held, 1), edm_losses(model, seen, 1)
        run, log, seconds = train_for(args, images, opts.minutes, opts.every, evaluate, device)
        grid = pd.make_grid(pd.generate(run.ema.shadow.eval(), run.diffusion, argparse.Namespace(
            **{**vars(args), "batch_size": 16}), 16, 18, 0))
        runs[real_p] = dict(run=run, log=log, seconds=seconds, grid=grid)
    base = os.path.splitext(opts.out)[0] if opts.out else os.path.join(tmp, "quality")
    for real_p, r in runs.items():
        Image.fromarray(r["grid"]).save(f"{base}_real_p_{real_p}.png")
    grids = [r["grid"] for r in runs.values()]
    gap = np.full((grids[0].shape[0], 12, 3), 255, np.uint8)
    side = np.concatenate(sum([[g, gap] for g in grids], [])[:-1], axis=1)
    Image.fromarray(side).resize((side.shape[1] * 2, side.shape[0] * 2), Image.NEAREST).save(
        f"{base}_side_by_side.png")
    first = next(iter(runs.values()))["run"]
    lines = [f"- Data: {source}; {h}x{w}, --batch_size {opts.batch_size}, "
             f"{sum(p.numel() for p in first.raw.parameters()) / 1e6:.2f}M parameters, extra "
             f"flags `{' '.join(map(str, opts.flags)) or '(none)'}`, constant LR after the "
             f"warm-up; {opts.minutes} minutes of training per run.", "",
             "| --real_p | steps | kimg (crops) | training s | " + " | ".join(
                 f"sigma {s:g}" for s in SIGMAS) + " | training sigmas |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in SIGMAS) + " | --- |"]
    for real_p, r in runs.items():
        (per_sigma, training), _ = r["log"][-1][1]
        lines.append(f"| {real_p} | {r['run'].step} | {r['run'].nimg / 1000:.1f} | "
                     f"{r['seconds']:.0f} | " + " | ".join(f"{v:.4f}" for v in per_sigma)
                     + f" | **{training:.4f}** |")
    lines += ["", "Held-out full-image EDM loss of the EMA weights at the end (lower is better; "
              "the same images, sigmas and noises for every run).", ""]
    if opts.every:
        lines += ["Over training (loss at the training sigmas; held-out vs training images):",
                  "", "| minute | " + " | ".join(f"--real_p {p} held-out | --real_p {p} training"
                                                  for p in runs) + " |",
                  "| --- | " + " | ".join("--- | ---" for _ in runs) + " |"]
        for i, (minute, _) in enumerate(next(iter(runs.values()))["log"]):
            cells = []
            for r in runs.values():
                held_loss, seen_loss = r["log"][i][1]
                cells.append(f"{held_loss[1]:.4f} | {seen_loss[1]:.4f}")
            lines.append(f"| {minute:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Samples (18 Heun steps, EMA, seeds 0..15): `{os.path.basename(base)}_real_p_"
                 f"<p>.png`, side by side (left to right: --real_p "
                 f"{', '.join(map(str, runs))}) in `{os.path.basename(base)}_side_by_side.png`.")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["speed", "quality"])
    p.add_argument("--image_size", default="32", help="training size, N or HxW")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40, help="speed: timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="speed: untimed steps first")
    p.add_argument("--minutes", type=float, default=5.0, help="quality: training per run")
    p.add_argument("--every", type=float, default=0.0, help="quality: evaluate every M minutes")
    p.add_argument("--real_p_values", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--dataset_path", help="quality: a folder (default: built-in landscapes)")
    p.add_argument("--limit", type=int, default=0, help="quality: train on this many images")
    p.add_argument("--held_out", type=int, default=64, help="quality: evaluation images")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                   help="more patch_diffusion.py flags for every run (last)")
    p.add_argument("--out", help="write the markdown report here (and the grids next to it)")
    opts = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        title = {"speed": "patch_diffusion.py: time per 1,000 crops",
                 "quality": "patch_diffusion.py: quality at equal wall-clock"}[opts.what]
        lines = header(title, argv) + (speed if opts.what == "speed" else quality)(
            opts, device, tmp)
    report.emit("\n".join(lines) + "\n", opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
