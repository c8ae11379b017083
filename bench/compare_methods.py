"""The five methods on the same data, for the same minutes of training on this machine, sampled
with the same budget of network evaluations: one table.

    python bench/compare_methods.py --minutes 5 --out bench/results/compare_methods_cpu.md
    python bench/compare_methods.py --dataset_path DIR --minutes 5 --out bench/results/DIR.md
    python bench/compare_methods.py --preset paper --minutes 60 --num_samples 10000 \\
        --out bench/results/compare_methods_paper_gpu.md                  # on a GPU

Per method (--methods): its --preset (quick by default) on the same images, at one --image_size
for all (default 32 with quick; with paper, each paper's own resolution, and the reference at
each), with the same --seed. patchify_ddpm.py's quick patch size (8, for 256 px) is replaced by
side / 16, so that its U-Net sees a 16 x 16 grid at any size.

1. **Training for --minutes.** A 50-step run measures the seconds per step, by the wall clock
   between its logs at steps 10 and 50 (the cost of a step, not of the images it counts: a
   Patch Diffusion step has f times --batch_size crops of side R/f); the run itself then
   gets the steps that fill the minutes (its learning-rate schedule ends with them; no preview
   grids). patch_dm.py's second phase, the latent model's --latent_steps, comes after the
   U-Net's minutes: it is in the wall time, not in the budget. From the run's TensorBoard
   scalars: images/s (the median over the logged windows; the U-Net phase only for patch_dm) and
   the peak memory (the CUDA allocator's on a GPU, the process's resident set on a CPU).
2. **Sampling** in a fresh process, through the script's own --sample (bench/evaluate.py):
   --num_samples images, --nfe network evaluations each (DDIM with --nfe steps; EDM's Heun, two
   evaluations a step but the last, with (nfe + 1) / 2), in batches of --batch_size. Seconds per
   image and peak memory, measured as in training.
3. **Scores** against the training images (--reference, by default the same folder or built-in
   landscapes): FID and KID (bench/evaluate.py) when pytorch-fid's Inception weights are there
   (--inception_weights, or the torch hub cache, or a download that works); otherwise the table
   says "not computed" and gives no number in their place. Always: the Frechet distance of 8 x 8
   pixel thumbnails (bench/compare_peer.py's, 192 numbers per image), a much weaker score that
   needs no download, named as what it is. A "real images" row gives the floor of both:
   --num_samples training images against all of them (a set drawn from the reference itself,
   so a floor biased low: held-out images score higher).

CPU numbers mean something only on an otherwise idle machine.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_peer  # noqa: E402
import evaluate  # noqa: E402
import report  # noqa: E402
from evaluate import ROOT, UserError, ddpm  # noqa: E402

CALIBRATION_STEPS = 50                          # the rate is timed over steps 10 to 50


def data_flags(args):
    return (["--dataset_path", args.dataset_path] if args.dataset_path else
            ["--procedural_size", str(args.procedural_size)])


def method_flags(method, args):
    """The flags every run of `method` gets: preset, data, size, seed, cache."""
    flags = ["--preset", args.preset, *data_flags(args), "--seed", str(args.seed),
             "--cache_dir", os.path.join(args.work_dir, "cache")]
    if args.image_size:
        flags += ["--image_size", args.image_size]
        if method == "patchify_ddpm":
            side = min(ddpm.image_size(args.image_size))
            flags += ["--patch_size", str(max(1, side // 16))]
    return flags + shlex.split(args.train_flags)


def scalars(run_dir, tag, wall_time=False):
    """[(step, value)] (or [(step, wall time)]) of one TensorBoard scalar of a run."""
    events = EventAccumulator(run_dir)
    events.Reload()
    return [(e.step, e.wall_time if wall_time else e.value) for e in events.Scalars(tag)]


def train_run(method, args, out, steps, log, *extra):
    """One training run in a subprocess. -> its wall seconds."""
    cmd = [sys.executable, os.path.join(ROOT, f"{method}.py"), *method_flags(method, args),
           "--output_dir", out, "--max_steps", str(steps), "--save_every", str(steps),
           "--sample_every", str(10 ** 9), "--log_every", "10", *extra]
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        status = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if status:
        raise UserError(f"{method}.py training failed (exit {status}); see {log}")
    return time.perf_counter() - start


def train(method, args):
    """Calibrate, then train for --minutes. -> the row's training columns."""
    work = os.path.join(args.work_dir, method)
    calibration = os.path.join(work, "calibration")
    train_run(method, args, calibration, CALIBRATION_STEPS, calibration + ".log",
              *(["--latent_steps", "10"] if method == "patch_dm" else []))
    logged = dict(scalars(calibration, "train/loss", wall_time=True))   # step -> when logged
    seconds_per_step = (logged[CALIBRATION_STEPS] - logged[10]) / (CALIBRATION_STEPS - 10)
    steps = max(1, int(args.minutes * 60 / seconds_per_step))
    seconds = train_run(method, args, os.path.join(work, "run"), steps,
                        os.path.join(work, "run.log"))
    run = os.path.join(work, "run")
    per_sec = [v for s, v in scalars(run, "train/images_per_sec") if s <= steps]
    memory = max(v for _, v in scalars(run, "train/peak_memory_mb"))
    ckpt = torch.load(os.path.join(run, "checkpoints", "last.pt"), map_location="cpu",
                      weights_only=True)
    params = sum(v.numel() for v in ckpt["model"].values() if v.dtype.is_floating_point)
    return dict(method=method, steps=steps, train_minutes=seconds / 60,
                images_per_sec=float(np.median(per_sec)), train_memory_mib=memory,
                parameters=params, checkpoint=os.path.join(run, "checkpoints", "last.pt"),
                sampler=ckpt["args"]["sampler"], resolution=ckpt["args"]["image_size"])


def sample(row, args):
    """Sample the row's checkpoint in a fresh process (this script's --worker)."""
    steps = (args.nfe + 1) // 2 if row["sampler"] == "heun" else args.nfe
    spec = dict(checkpoint=row["checkpoint"], num_samples=args.num_samples,
                batch_size=args.batch_size, seed=args.seed, sampler=None,
                sampling_steps=steps, out=os.path.join(args.work_dir, row["method"], "samples"))
    shutil.rmtree(spec["out"], ignore_errors=True)                  # no earlier run's images
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                             json.dumps(spec)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"sampling {row['method']} failed: {result.stderr.strip()[-500:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    return dict(sampling_steps=steps, samples=spec["out"],
                seconds_per_image=record["sampling_seconds"] / args.num_samples,
                sample_memory_mib=record["sampling_peak_memory_mib"])


def worker(spec):
    """--worker: evaluate.sample_checkpoint in this fresh process; its record as a JSON line."""
    spec = json.loads(spec)
    out = spec.pop("out")
    sys.stdout, stdout = sys.stderr, sys.stdout                     # the script's own prints
    record = evaluate.sample_checkpoint(argparse.Namespace(**spec), out)
    print(json.dumps(record), file=stdout)


def read_images(folder, count):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png")).convert("RGB"))
                     for i in range(count)]).transpose(0, 3, 1, 2)


def reference_images(args, size):
    """The reference images at `size`, uint8 (N, 3, H, W), decoded as training decodes them."""
    data = argparse.Namespace(image_size=size, dataset_path=args.reference or args.dataset_path,
                              class_conditional=False, num_workers=4, seed=args.seed,
                              cache_dir=os.path.join(args.work_dir, "cache"),
                              procedural_size=args.procedural_size)
    return ddpm.load_dataset(data, log=lambda line: None)[0]


def scores(samples, args, weights_ok):
    """Thumbnail FD, and FID / KID when the weights are there, of a folder of samples."""
    size = list(Image.open(os.path.join(samples, "00000.png")).size[::-1])
    real = reference_images(args, size)
    fake = read_images(samples, len([f for f in os.listdir(samples)
                                     if f not in evaluate.NOT_SAMPLES]))
    out = {"thumbnail_fd": evaluate.features_frechet_distance(compare_peer.thumbnails(fake),
                                                              compare_peer.thumbnails(real))}
    if weights_ok:
        flags = ["--samples", samples, "--kid_subset_size", str(args.kid_subset_size),
                 "--cache_dir", os.path.join(args.work_dir, "cache"), "--output_dir",
                 samples + "-metrics", "--seed", str(args.seed)]
        flags += (["--reference", args.reference or args.dataset_path] if args.reference or
                  args.dataset_path else ["--reference_size", str(args.procedural_size),
                                          "--reference_seed", str(args.seed)])
        flags += ["--inception_weights", args.inception_weights] if args.inception_weights else []
        metrics = evaluate.evaluate(evaluate.build_parser().parse_args(flags))
        out.update(fid=metrics["fid"], kid=(metrics["kid_mean"], metrics["kid_std"]))
    return out


def real_row(args, size):
    """--num_samples reference images (a seeded draw; all of them if there are fewer) written
    as samples: the scores' floor at `size`."""
    real = reference_images(args, size)
    folder = os.path.join(args.work_dir, "real-{}x{}".format(*size))
    shutil.rmtree(folder, ignore_errors=True)                       # no earlier run's images
    os.makedirs(folder)
    pick = np.random.default_rng(args.seed).choice(len(real), min(len(real), args.num_samples),
                                                   replace=False)
    for i, j in enumerate(pick):
        ddpm.save_png(real[j].transpose(1, 2, 0), os.path.join(folder, f"{i:05d}.png"))
    return folder


def inception_available(args):
    """(whether FID can be computed, why not)."""
    if args.inception_weights == "random":
        return False, "random weights give no FID"
    try:
        evaluate.load_inception(evaluate.inception_weights(args.inception_weights)[0],
                                torch.device("cpu"))
        return True, ""
    except UserError as error:
        return False, str(error)


def table(args, rows, real, why_not):
    def fid(r):
        return f"{r['fid']:.2f}" if "fid" in r else "not computed"

    def kid(r):
        return f"{r['kid'][0]:.4f} +- {r['kid'][1]:.4f}" if "kid" in r else "not computed"
    body = [[f"`{r['method']}.py`", f"{r['parameters'] / 1e6:.2f}M", r["steps"],
             f"{r['train_minutes']:.1f}", f"{r['images_per_sec']:.1f}",
             f"{r['train_memory_mib']:,.0f}", f"{r['sampler']} x {r['sampling_steps']}",
             f"{r['seconds_per_image']:.3f}", f"{r['sample_memory_mib']:,.0f}", fid(r), kid(r),
             f"{r['thumbnail_fd']:.4f}"] for r in rows]
    for size, r in real.items():
        body.append([f"real images ({size})", "", "", "", "", "", "", "", "", fid(r), kid(r),
                     f"{r['thumbnail_fd']:.4f}"])
    data = args.dataset_path or f"the built-in landscapes ({args.procedural_size} images)"
    lines = report.header("The methods at the same training minutes", "compare_methods.py",
                          sys.argv[1:])
    lines += [f"Data: {data}. Training: {args.minutes} minutes of U-Net steps per method "
              f"(preset {args.preset}); sampling: {args.num_samples} images, {args.nfe} network "
              f"evaluations each, seed {args.seed}.", ""]
    if why_not:
        lines += [f"FID and KID: not computed ({why_not}).", ""]
    lines += [report.table(["method", "parameters", "steps", "training min", "images/s",
                            "peak training MiB", "sampler x steps", "sampling s/image",
                            "peak sampling MiB", "FID", f"KID (subsets of {args.kid_subset_size})",
                            "thumbnail FD (8x8 pixels, not FID)"], body), ""]
    return "\n".join(lines)


def main(argv=None):
    p = ddpm.Parser(prog="bench/compare_methods.py", description=__doc__.split("\n")[0],
                    formatter_class=ddpm.HelpFormatter)
    pos, real = ddpm.at_least(1), ddpm.at_least(0.0, float)
    p.add_argument("--methods", nargs="+", choices=evaluate.METHODS, default=evaluate.METHODS,
                   help="the scripts to compare")
    p.add_argument("--dataset_path", help="image folder (default: the built-in landscapes)")
    p.add_argument("--procedural_size", type=pos, default=1024, help="built-in images")
    p.add_argument("--reference", help="the scores' real images (default: the training data)")
    p.add_argument("--preset", choices=["quick", "paper"], default="quick",
                   help="every method's preset")
    p.add_argument("--image_size", help="one size for all (default: 32 with quick, each "
                   "paper's with paper)")
    p.add_argument("--minutes", type=real, default=5.0, help="U-Net training per method")
    p.add_argument("--train_flags", default="", help="more flags for every training run, "
                   "e.g. '--precision bf16'")
    p.add_argument("--num_samples", type=pos, default=256, help="samples per method")
    p.add_argument("--nfe", type=pos, default=50, help="network evaluations per sample")
    p.add_argument("--batch_size", type=pos, default=64, help="sampling batch")
    p.add_argument("--kid_subset_size", type=ddpm.at_least(2), default=100,
                   help="KID: images per subset (at most --num_samples)")
    p.add_argument("--inception_weights", help="pytorch-fid's file (default: the hub cache, "
                   "or a download)")
    p.add_argument("--seed", type=ddpm.at_least(0), default=0, help="training and noise seed")
    p.add_argument("--work_dir", default=os.path.join("runs", "compare_methods"),
                   help="runs, samples and caches")
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--worker", help=argparse.SUPPRESS)          # internal: one sampling run
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.image_size is None and args.preset == "quick":
        args.image_size = "32"
    if args.kid_subset_size > args.num_samples:
        raise UserError(f"--kid_subset_size {args.kid_subset_size} exceeds --num_samples "
                        f"{args.num_samples}")
    weights_ok, why_not = inception_available(args)
    rows = []
    for method in args.methods:
        print(f"{method}: training for {args.minutes} minutes", file=sys.stderr)
        row = train(method, args)
        row.update(sample(row, args))
        row.update(scores(row["samples"], args, weights_ok))
        rows.append(row)
    real = {"{}x{}".format(*size): scores(real_row(args, size), args, weights_ok)
            for size in sorted({tuple(r["resolution"]) for r in rows})}
    report.emit(table(args, rows, real, why_not), args.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"compare_methods.py: error: {error}", file=sys.stderr)
        sys.exit(2)
