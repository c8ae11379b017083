"""Patch-DM's claims (Ding et al. 2024), measured with patch_dm.py's own functions.

    memory   Peak memory above the start and time of one DDIM step of sampling at 256 x 256,
             512 x 512, 1024 x 1024 and 2048 x 2048 (--sizes) with the same network (the paper
             preset's: 64 x 64 patches, base 64, multipliers 1,2,4,8; untrained, which costs
             the same), --patch_batch K (--patch_batch) and 0 (every patch in one batch, the
             original's way). Each measurement runs in its own process: on a CPU the peak is
             the peak resident set size (getrusage) minus the resident size before sampling, on
             a GPU torch's peak allocation minus the allocation before. A process that cannot
             allocate under --memory_limit GiB (address space, CPU) reports so.
    seams    The seam metric (patch_dm.seam_score: squared differences of neighbouring pixels
             across the lines of both grids over those elsewhere) of samples of trained
             checkpoints (--checkpoints, e.g. one with and one without --no_collage) at
             --image_size, and of the built-in landscapes rendered at that size (the floor: real
             images have no seams). Writes a figure of training images and samples next to --out.

    python bench/patch_dm_claims.py memory --out bench/results/patch_dm_memory_cpu.md
    python bench/patch_dm_claims.py seams --checkpoints runs/collage/checkpoints/last.pt \
        runs/independent/checkpoints/last.pt --out bench/results/patch_dm_seams_cpu.md

CPU numbers mean something only on an otherwise idle machine.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import patch_dm as pdm  # noqa: E402
import report  # noqa: E402

# The network of the memory rows: the paper preset's U-Net.
PAPER_NET = ["--preset", "paper", "--image_size", "64"]


def header(title, argv):
    return report.header(title, "patch_dm_claims.py", argv)


def resident_mb():
    """This process's resident set size now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def one(opts):
    """One measurement, in this process: a JSON line {seconds, peak_mb} (or {error})."""
    if opts.memory_limit and not torch.cuda.is_available():
        limit = int(opts.memory_limit * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = pdm.parse_args(PAPER_NET + opts.flags)
    args.num_images = 1
    pdm.kernels.set_backend(args.kernels)
    model = pdm.build_model(args).to(device).eval()
    diffusion = pdm.build_diffusion(args).to(device)
    z = torch.zeros(1, pdm.CODE_DIM, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2 ** 20
    else:
        start = resident_mb()
    begin = time.perf_counter()
    try:
        pdm.sample(model.unet, diffusion, (1, 3, opts.size, opts.size), [0], z, "ddim",
                   opts.steps, patch_batch=opts.patch_batch)
    except (RuntimeError, MemoryError) as error:
        print(json.dumps({"error": str(error).splitlines()[0][:120]}))
        return 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB -> MiB
    print(json.dumps({"seconds": time.perf_counter() - begin, "peak_mb": peak - start}))
    return 0


def memory(opts, argv):
    rows, p = [], pdm.parse_args(PAPER_NET + opts.flags).patch_size
    for size in opts.sizes:
        for k in (opts.patch_batch, 0):
            command = [sys.executable, os.path.abspath(__file__), "_one", "--size", str(size),
                       "--patch_batch", str(k), "--steps", str(opts.steps), "--memory_limit",
                       str(opts.memory_limit), "--flags", *opts.flags]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
            rows.append((size, k, lines[-1] if lines else {"error": result.stderr[-200:]}))
            print(size, k, rows[-1][2], flush=True)
    out = header("patch_dm.py: sampling memory and time against the image size", argv) + [
        f"{opts.steps} DDIM step(s) of one image, the paper preset's U-Net (untrained)"
        + (f" with {' '.join(opts.flags)}" if opts.flags else "") + f", p = {p}. Memory: above "
        f"the start of sampling.", "",
        "| size | patches (padded grid) | --patch_batch | peak memory | time | time per "
        "megapixel |", "| --- | --- | --- | --- | --- | --- |"]
    for size, k, r in rows:
        grid = f"{(size // p + 1) ** 2}"
        if "error" in r:
            out.append(f"| {size} | {grid} | {k} | failed: {r['error']} | | |")
            continue
        out.append(f"| {size} | {grid} | {k} | {r['peak_mb']:.0f} MiB | {r['seconds']:.1f} s | "
                   f"{r['seconds'] / (size * size / 1e6):.1f} s |")
    out.append("")
    for k in (opts.patch_batch, 0):
        peaks = {size: r["peak_mb"] for size, kk, r in rows if kk == k and "error" not in r}
        if 512 in peaks:
            ratios = ", ".join(f"{s}: {peaks[s] / peaks[512]:.2f}x" for s in sorted(peaks))
            out.append(f"- --patch_batch {k}: peak memory relative to 512 x 512: {ratios}.")
    return out


def seams(opts, argv):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, w = opts.image_size
    out = header("patch_dm.py: the seam metric", argv) + [
        f"Samples at {h} x {w} (--num_samples {opts.num_samples}, --sampling_steps "
        f"{opts.sampling_steps}, seed 0; codes from each checkpoint's latent model). The metric "
        f"is 1 for an image as smooth across the grid lines (every p/2) as elsewhere.", "",
        "| images | p | seam metric |", "| --- | --- | --- |"]
    figures = []
    for path in opts.checkpoints:
        ckpt = pdm.load_checkpoint(path)
        args = pdm.parse_args(["--sample", "--checkpoint", path, "--image_size", f"{h}x{w}",
                               "--num_samples", str(opts.num_samples), "--sampling_steps",
                               str(opts.sampling_steps)],
                              {k: v for k, v in ckpt["args"].items()
                               if k not in pdm.NOT_INHERITED})
        pdm.kernels.set_backend(args.kernels)
        model = pdm.build_model(args)
        model.load_state_dict({f"{name}.{k}": v for name in ("unet", "latent")
                               for k, v in ckpt["ema"][name]["shadow"].items()})
        images = pdm.generate(model.to(device).eval(), pdm.build_diffusion(args).to(device), args,
                              opts.num_samples, opts.sampling_steps, 0)
        name = "collage" if args.collage else "independent patches (--no_collage)"
        out.append(f"| {name}: {path} | {args.patch_size} | "
                   f"{pdm.seam_score(images, args.patch_size):.3f} |")
        figures.append((name, images, args))
    real = torch.stack([torch.from_numpy(pdm.procedural_landscape(i, h, w, seed=1)[0])
                        for i in range(opts.num_samples)])
    p = figures[0][2].patch_size if figures else 16
    out.append(f"| built-in landscapes rendered at {h} x {w} (no model) | {p} | "
               f"{pdm.seam_score(real, p):.3f} |")
    if opts.out and figures:
        train = figures[0][2].train_size
        shown = torch.stack([torch.from_numpy(pdm.procedural_landscape(i, *train)[0])
                             for i in range(4)])
        path = os.path.splitext(opts.out)[0]
        panels = [("training images", shown)] + [(n, im[:4]) for n, im, _ in figures]
        for i, (name, images) in enumerate(panels):
            grid = np.concatenate([np.pad(x.numpy().transpose(1, 2, 0), ((2, 2), (2, 2), (0, 0)),
                                          constant_values=255) for x in images], axis=0)
            Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3),
                                         Image.NEAREST).save(f"{path}_{i}.png")
            out.append(f"- `{os.path.basename(path)}_{i}.png`: {name}, enlarged 3x.")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["memory", "seams", "_one"])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--size", type=int, help="_one: the image side")
    p.add_argument("--patch_batch", type=int, default=64, help="memory: K of the bounded rows")
    p.add_argument("--steps", type=int, default=1, help="memory: DDIM steps per measurement")
    p.add_argument("--memory_limit", type=float, default=20.0,
                   help="memory: GiB of address space a CPU measurement may take (0: no limit)")
    p.add_argument("--checkpoints", nargs="+", default=[], help="seams: checkpoints to sample")
    p.add_argument("--image_size", type=pdm.image_size, default=[32, 256], help="seams: HxW")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--sampling_steps", type=int, default=50)
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                   help="memory: more patch_dm.py flags for the network (last)")
    p.add_argument("--out", help="write the markdown report here (and figures next to it)")
    opts = p.parse_args(argv)
    if opts.what == "_one":
        return one(opts)
    lines = (memory if opts.what == "memory" else seams)(opts, argv)
    report.emit("\n".join(lines) + "\n", opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
