"""Benchmark the method scripts end to end (training and sampling speed, peak memory) and print
markdown tables.

Each row of ROWS below is one (method, configuration) pair: the script module ("ddpm",
"patch_ddpm", "patchify_ddpm") and the flags its parse_args gets; --suite picks the rows of one
comparison. For each row and device this measures:

  - Training: one step is forward + backward + AdamW step (diffusion.training_losses on a fixed
    random batch, t and noise drawn as in training, each loss term backpropagated as the scripts'
    micro_batch_step does; no data loading, grad clipping or EMA).
    Reported: median step time over --iters timed steps after --warmup untimed ones (with the
    min-max range), and images/s = batch / median step time.
  - Sampling: method.sample(model, diffusion, shape, seeds, sampler="ddim", steps=50) for one batch,
    after one untimed 2-step warm-up run. Reported: median over --sample_iters runs, and images/s.
  - Peak memory, per measurement: on a GPU the CUDA allocator peak (torch.cuda.max_memory_allocated,
    parameters and optimizer state included); on a CPU the peak resident set size of the process
    (getrusage ru_maxrss), which includes what the process holds after importing torch. Also the
    peak above what the process held when the phase started (weights, optimizer, the batch): the
    memory the method itself needs, which patch_ddpm.py's patch-by-patch mode bounds.
  - Forward FLOPs per image (torch.utils.flop_counter.FlopCounterMode), patchify_ddpm.py's claim.

TARGETS lists the issues' targets (ratios between two rows); the report says which were met.

Every measurement (row x device x kernels backend x train/sample) runs in a fresh subprocess (this
script re-invoked with --worker) that prints one JSON line, so CPU peak RSS is that of a fresh
process and no measurement inherits caches or allocator state from another.

Kernels: on a GPU, --kernels auto (the default) runs every row with --kernels torch (the plain
PyTorch path) and --kernels triton and prints the speed ratio torch / triton from the same run.
The Triton kernels run only on CUDA tensors, so CPU rows always use the torch path.
--precision bf16 wraps both training and sampling in autocast (ddpm.py --sample itself runs fp32).

    python bench/bench_methods.py --out bench/results/methods.md          # CPU, plus GPU if present
    python bench/bench_methods.py --device cpu --suite patch_ddpm --threads 1 --iters 2 \
        --warmup 1 --sample_iters 1 --sampling_steps 5 --out bench/results/patch_ddpm_cpu.md
    python bench/bench_methods.py --device cpu --suite patchify_ddpm --threads 1 --iters 2 \
        --warmup 1 --sample_iters 1 --out bench/results/patchify_ddpm_cpu.md
    python bench/bench_methods.py --device cpu --rows patchify-64-p1-c128 patchify-256-p4-c128 \
        --iters 3 --warmup 1 --sample_iters 1 --out bench/results/patchify_ddpm_c128_cpu.md
    python bench/bench_methods.py --device cuda --suite patch_ddpm patchify_ddpm \
        --out bench/results/patch_methods_gpu.md
    python bench/bench_methods.py --device cuda --out bench/results/methods_gpu.md
    python bench/bench_methods.py --device cuda --precision bf16 \
        --out bench/results/methods_gpu_bf16.md
    python bench/bench_methods.py --device cpu --rows ddpm-32 --iters 2 --sample_iters 1   # smoke

Defaults: --iters 5 / --sample_iters 3 / --warmup 2 on CPU, 20 / 5 / 5 on GPU. CPU numbers mean
something only on an otherwise idle machine: another process using the same cores slows the
multi-threaded kernels many times over. The header records the load average at the start.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from ddpm import HelpFormatter  # noqa: E402
from report import emit, table  # noqa: E402  (bench/, next to this file)


class Row(NamedTuple):
    name: str        # what --rows selects
    module: str      # the method script, without .py
    flags: str       # the script's own flags (the bench appends --precision and --kernels)


# One row per (method, configuration). A new method script adds its rows here; `suite` groups the
# rows of one comparison (--suite selects them).
# Attention head dims: ddpm-32 has 64 channels / 4 heads = 16 at 8x8, ddpm-64 has 128 / 4 = 32 at
# 16x16, both sizes the Triton attention kernel takes.
ROWS = [
    Row("ddpm-32", "ddpm", "--preset quick --image_size 32 --batch_size 32"),
    Row("ddpm-64", "ddpm", "--preset quick --image_size 64 --base_channels 64 "
                           "--channel_mults 1,2,2,2 --attention_resolutions 16 --batch_size 16"),
]

# patch_ddpm.py (Arakawa et al.): the same U-Net (32 channels, levels 1,2,2, attention in the
# middle block only, so no level changes with the patch size) for every patch divider N, batch 8.
# K = --patch_batch: 1 runs one patch position at a time (the memory-saving mode), 0 all N*N
# positions in one batched pass (what the original code does). N = 1 is the plain DDPM baseline.
PATCH_UNET = ("--base_channels 32 --channel_mults 1,2,2 --num_res_blocks 1 "
              "--attention_resolutions ''")
for _size in (128, 256):
    for _n in (1, 2, 4, 8):
        for _k in ((1,) if _n == 1 else (1, 0)):
            ROWS.append(Row(f"patch-{_size}-n{_n}" + (f"-k{_k}" if _n > 1 else ""), "patch_ddpm",
                            f"--image_size {_size} --patch_divider {_n} --patch_batch {_k} "
                            f"{PATCH_UNET} --batch_size 8"))

# patchify_ddpm.py (Luhman & Luhman): the U-Net of the ddpm-64 row on the (H/P) x (W/P) grid,
# batch 4. The claim: P = 4 at 256x256 costs what P = 1 costs at 64x64.
PATCHIFY_UNET = "--base_channels 64 --channel_mults 1,2,2,2 --num_res_blocks 1 " \
                "--attention_resolutions 16"
for _size, _p in ((64, 1), (256, 1), (256, 2), (256, 4)):
    ROWS.append(Row(f"patchify-{_size}-p{_p}", "patchify_ddpm",
                    f"--image_size {_size} --patch_size {_p} {PATCHIFY_UNET} --batch_size 4"))

# The FLOP claim at a width nearer the paper's (c = 256 for its P = 4 rows): the 3x3 convolutions
# from and to 3 P^2 channels grow with c, the U-Net body with c^2.
for _size, _p in ((64, 1), (256, 4)):
    ROWS.append(Row(f"patchify-{_size}-p{_p}-c128", "patchify_ddpm",
                    f"--image_size {_size} --patch_size {_p} "
                    + PATCHIFY_UNET.replace("--base_channels 64", "--base_channels 128")
                    + " --batch_size 4"))

SUITES = {"ddpm": "ddpm-", "patch_ddpm": "patch-", "patchify_ddpm": "patchify-"}


class Target(NamedTuple):
    """An issue's target: metric(row) / metric(reference) compared with `bound`
    ("<=": the ratio must not exceed it; ">=": the inverse ratio must reach it)."""
    text: str
    metric: str      # train_time | sample_time | train_above | sample_above | flops
    row: str
    reference: str
    op: str
    bound: float


TARGETS = [
    Target(f"patch_ddpm {_size}x{_size}, K = 1: sampling peak memory above start, N = {_n} vs "
           f"N = 1", "sample_above", f"patch-{_size}-n{_n}-k1", f"patch-{_size}-n1", "<=", _bound)
    for _size in (128, 256) for _n, _bound in ((2, 0.35), (4, 0.15))
] + [
    Target(f"patch_ddpm {_size}x{_size}, K = 1: training peak memory above start, N = {_n} vs "
           f"N = 1", "train_above", f"patch-{_size}-n{_n}-k1", f"patch-{_size}-n1", "<=", _bound)
    for _size in (128, 256) for _n, _bound in ((2, 0.35), (4, 0.15))
] + [
    Target("patchify_ddpm: forward FLOPs per image, P = 4 at 256 vs P = 1 at 64", "flops",
           "patchify-256-p4", "patchify-64-p1", "<=", 1.05),
    Target("patchify_ddpm: training step time, P = 4 at 256 vs P = 1 at 64", "train_time",
           "patchify-256-p4", "patchify-64-p1", "<=", 1.15),
    Target("patchify_ddpm, base width 128: forward FLOPs per image, P = 4 at 256 vs P = 1 at 64",
           "flops", "patchify-256-p4-c128", "patchify-64-p1-c128", "<=", 1.05),
    Target("patchify_ddpm, base width 128: training step time, P = 4 at 256 vs P = 1 at 64",
           "train_time", "patchify-256-p4-c128", "patchify-64-p1-c128", "<=", 1.15),
    Target("patchify_ddpm: training speed-up of P = 4 over P = 1, both at 256", "train_time",
           "patchify-256-p4", "patchify-256-p1", ">=", 10.0),
    Target("patchify_ddpm: sampling speed-up of P = 4 over P = 1, both at 256", "sample_time",
           "patchify-256-p4", "patchify-256-p1", ">=", 10.0),
]

DEFAULTS = {"cpu": {"iters": 5, "sample_iters": 3, "warmup": 2},
            "cuda": {"iters": 20, "sample_iters": 5, "warmup": 5}}
RESULT_PREFIX = "BENCH_RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--suite", nargs="+", choices=sorted(SUITES), default=["ddpm"],
                   help="groups of rows to run (ignored when --rows is given)")
    p.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS],
                   help="rows to run (default: those of --suite)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and the GPU too when one is visible")
    p.add_argument("--kernels", choices=["auto", "torch", "triton"], default="auto",
                   help="GPU: auto runs torch and triton and prints the ratio; torch or triton "
                        "runs only that one. CPU rows use torch whatever this says")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="autocast dtype for training and sampling")
    p.add_argument("--iters", type=int, help="timed training steps (default: 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int,
                   help="untimed training steps first (default: 2 CPU, 5 GPU)")
    p.add_argument("--sample_iters", type=int,
                   help="timed sampling runs (default: 3 CPU, 5 GPU)")
    p.add_argument("--sampling_steps", type=int, default=50, help="DDIM steps per sampling run")
    p.add_argument("--sample_batch", type=int,
                   help="images per sampling run (default: the row's --batch_size)")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads in the workers (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed in every worker")
    p.add_argument("--out", help="also write the report to this markdown file")
    p.add_argument("--worker", help=argparse.SUPPRESS)     # internal: one measurement, JSON spec
    args = p.parse_args(argv)
    for key in ("iters", "warmup", "sample_iters", "sampling_steps", "sample_batch", "threads"):
        value = getattr(args, key)
        if value is not None and value < (0 if key == "warmup" else 1):
            p.error(f"--{key} must be at least {0 if key == 'warmup' else 1}, got {value}")
    return args


# -------------------------------------------------------------------------------------------------
# Worker: one measurement in this (fresh) process
# -------------------------------------------------------------------------------------------------


def peak_rss_mib():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10     # macOS: bytes; Linux: KiB


def current_rss_mib():
    """Resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def memory_now_mib(device):
    """What the process holds now: CUDA allocated memory on a GPU, resident memory on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device) / 2**20
    return current_rss_mib()


def build(method, args, device):
    """Model and diffusion process of a method at a resolved configuration (every script has
    build_model and build_diffusion)."""
    args.num_classes = 0
    return method.build_model(args).to(device), method.build_diffusion(args).to(device)


def training_step(diffusion, model, x0):
    """Forward and backward of every loss term of training_losses, one term at a time (patch_ddpm's
    terms are its patch chunks: only one chunk's activations are alive at a time)."""
    for term in diffusion.training_losses(model, x0):
        term().backward()


def forward_flops_per_image(model, shape, device):
    """FLOPs of one network evaluation (one sampling step) per image, counted by
    torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls and SDPA) on the plain PyTorch
    path (the counter does not see inside the Triton kernels)."""
    import kernels
    from torch.utils.flop_counter import FlopCounterMode

    backend = kernels.get_backend()
    kernels.set_backend("torch")
    try:
        x = torch.randn(shape, device=device)
        t = torch.full((shape[0],), 500, device=device, dtype=torch.long)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, None)
    finally:
        kernels.set_backend(backend)
    return counter.get_total_flops() / shape[0]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(spec):
    """Run one measurement described by `spec` (see measure()) and return its result dict."""
    import kernels

    rss_after_imports = peak_rss_mib()
    method = importlib.import_module(spec["module"])
    rss_after_imports = max(rss_after_imports, peak_rss_mib())
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["kernels"] == "triton" and kernels.triton is None:
        raise RuntimeError("--kernels triton: triton is not installed")
    kernels.set_backend(spec["kernels"])
    torch.manual_seed(spec["seed"])
    args = method.parse_args(spec["argv"])
    model, diffusion = build(method, args, device)
    dtype = {"bf16": torch.bfloat16}.get(spec["precision"])

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    if spec["phase"] == "train":
        batch = args.batch_size
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr,
                                      weight_decay=args.weight_decay)
        x0 = (torch.rand(batch, 3, *args.image_size) * 2 - 1).to(device)
        model.train()

        def step():
            with autocast():
                training_step(diffusion, model, x0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start_mib = memory_now_mib(device)                    # weights and the batch
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(spec["warmup"]):
            step()
        times = [timed(step, device) for _ in range(spec["iters"])]
    else:
        batch = spec["sample_batch"] or args.batch_size
        shape, seeds = (batch, 3, *args.image_size), list(range(batch))
        model.eval()

        def run(steps):
            with autocast():
                method.sample(model, diffusion, shape, seeds, sampler="ddim", steps=steps)

        start_mib = memory_now_mib(device)                    # weights
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run(2)                                            # warm-up: kernels compiled, caches hot
        times = [timed(lambda: run(spec["sampling_steps"]), device)
                 for _ in range(spec["sample_iters"])]

    result = {"times_s": times, "batch": batch, "threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in model.parameters()),
              "image_size": list(args.image_size), "rss_after_imports_mib": rss_after_imports,
              "start_mib": start_mib}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_mib"] = peak_rss_mib()
    if spec["phase"] == "sample":                         # after the peak is read: not in it
        model.eval()
        result["flops_per_image"] = forward_flops_per_image(model, (1, 3, *args.image_size),
                                                            device)
    return result


def measure(row, phase, device, kernels_backend, args):
    """Run one measurement in a fresh subprocess; returns (result dict, error line or None)."""
    defaults = DEFAULTS[device]
    spec = {
        "module": row.module,
        "argv": shlex.split(row.flags) + ["--precision", args.precision,
                                          "--kernels", kernels_backend],
        "phase": phase, "device": device, "kernels": kernels_backend,
        "precision": args.precision, "seed": args.seed, "threads": args.threads,
        "iters": args.iters or defaults["iters"],
        "warmup": args.warmup if args.warmup is not None else defaults["warmup"],
        "sample_iters": args.sample_iters or defaults["sample_iters"],
        "sampling_steps": args.sampling_steps, "sample_batch": args.sample_batch,
    }
    print(f"  {row.name} {device} {phase} --kernels {kernels_backend} ...", end="", flush=True,
          file=sys.stderr)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        error = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if "out of memory" in error.lower():
            error = "out of memory: " + error
        print(f" failed: {error}", file=sys.stderr)
        return None, error
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    print(f" {statistics.median(result['times_s']):.3g} s", file=sys.stderr)
    return result, None


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


def num(value):
    return "n/a" if value is None else f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def spread(times, scale):
    """'median (min-max)' of a list of seconds, multiplied by scale."""
    return f"{num(statistics.median(times) * scale)} ({num(min(times) * scale)}-" \
           f"{num(max(times) * scale)})"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def above_start(res):
    """Peak memory minus what the process held when the measured phase started."""
    return None if res.get("start_mib") is None else res["peak_mib"] - res["start_mib"]


def device_table(device, rows, backends, results, sampling_steps):
    """Markdown table of one device: a line per (row, kernels backend)."""
    memory = "peak alloc MiB" if device == "cuda" else "peak RSS MiB"
    header = ["row", "kernels", "params (M)", "fwd GFLOP/image", "batch",
              "train step ms, median (min-max)", "train images/s", f"train {memory}",
              "train above start MiB"]
    if len(backends) > 1:
        header.append("train speedup vs torch")
    header += ["sample batch", f"{sampling_steps}-step DDIM s, median (min-max)",
               "sample images/s", f"sample {memory}", "sample above start MiB"]
    if len(backends) > 1:
        header.append("sample speedup vs torch")
    lines = []
    for row in rows:
        baseline = {phase: results.get((row.name, device, "torch", phase)) for phase in
                    ("train", "sample")}
        for backend in backends:
            line = [row.name, backend]
            train = results.get((row.name, device, backend, "train"))
            sample = results.get((row.name, device, backend, "sample"))
            info = train or sample
            line += [f"{info['params'] / 1e6:.2f}" if info else "n/a"]
            line += [num(sample["flops_per_image"] / 1e9) if sample else "n/a"]
            for phase, res, scale in (("train", train, 1e3), ("sample", sample, 1.0)):
                if res is None:
                    line += ["failed"] * 5 + (["n/a"] if len(backends) > 1 else [])
                    continue
                median = statistics.median(res["times_s"])
                line += [res["batch"], spread(res["times_s"], scale), num(res["batch"] / median),
                         f"{res['peak_mib']:.0f}", num(above_start(res))]
                if len(backends) > 1:
                    base = baseline[phase]
                    line.append(f"{statistics.median(base['times_s']) / median:.2f}x"
                                if base else "n/a")
            lines.append(line)
    return table(header, lines)


def metric(results, row, device, backend, name):
    """One number of a measured row for the targets (None if it was not measured)."""
    res = results.get((row, device, backend, name.split("_")[0] if name != "flops" else "sample"))
    if res is None:
        return None
    if name.endswith("_time"):
        return statistics.median(res["times_s"]) / res["batch"]        # seconds per image
    if name == "flops":
        return res["flops_per_image"]
    return above_start(res)


def targets_table(device, backend, results):
    """The issues' targets whose rows were measured: the ratio, the bound and whether it is met."""
    lines = []
    for target in TARGETS:
        a = metric(results, target.row, device, backend, target.metric)
        b = metric(results, target.reference, device, backend, target.metric)
        if a is None or b is None:
            continue
        ratio = a / b if target.op == "<=" else b / a
        met = ratio <= target.bound if target.op == "<=" else ratio >= target.bound
        lines.append([target.text, f"`{target.row}` vs `{target.reference}`", f"{ratio:.4g}x",
                      f"{target.op} {target.bound:g}x", "met" if met else "**missed**"])
    if not lines:
        return None
    return table(["target", "rows", "measured", "bound", ""], lines)


def choose_backends(args):
    """--device and --kernels -> ({device: [kernel backends]}, notes), or an error message."""
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        return None, ("--device cuda, but no CUDA GPU is visible (torch.cuda.is_available() is "
                      "False); use --device cpu")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"],
               "auto": ["cpu"] + (["cuda"] if has_cuda else [])}[args.device]
    if "cuda" in devices and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None, "unset TRITON_INTERPRET; interpreted kernels are not worth timing."
    have_triton = triton_version() is not None
    if args.kernels == "triton" and "cuda" in devices and not have_triton:
        return None, "--kernels triton, but triton is not installed"
    notes, backends = [], {}
    if "cpu" in devices:
        backends["cpu"] = ["torch"]
        notes.append("CPU rows use the plain PyTorch path (--kernels torch): the Triton kernels "
                     "run only on CUDA tensors.")
    if "cuda" in devices:
        backends["cuda"] = {"auto": ["torch", "triton"] if have_triton else ["torch"],
                            "torch": ["torch"], "triton": ["triton"]}[args.kernels]
        if args.kernels == "auto" and not have_triton:
            notes.append("triton is not installed: GPU rows show the torch path only.")
    return backends, notes


def header(args, argv, backends, results, load_at_start):
    """The report's first lines: machine, versions, date, command and iteration counts."""
    threads = sorted({r["threads"] for (_, d, _, _), r in results.items() if d == "cpu"})
    cpu_line = f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, torch threads " \
               f"{', '.join(map(str, threads)) or torch.get_num_threads()}, 1-minute load " \
               f"average at start {load_at_start:.2f}"
    if "cuda" in backends:
        gpu_line = f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        gpu_line = "GPU: none used" + ("" if torch.cuda.is_available() else " (none visible)")
    counts = "; ".join(
        f"{d}: {args.warmup if args.warmup is not None else v['warmup']} warm-up + "
        f"{args.iters or v['iters']} timed training steps, "
        f"{args.sample_iters or v['sample_iters']} timed sampling run(s)"
        for d, v in ((d, DEFAULTS[d]) for d in backends))
    command = sys.argv if argv is None else [sys.argv[0]] + list(argv)
    return "\n".join([
        f"- {cpu_line}", f"- {gpu_line}",
        f"- torch {torch.__version__}, triton {triton_version() or 'not installed'}, "
        f"Python {platform.python_version()}",
        f"- {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{shlex.join(['python'] + command)}`",
        f"- precision {args.precision}, seed {args.seed}; {counts}",
    ])


def device_sections(device, rows, backends, results, args):
    """The table of one device, with its targets tables."""
    text = device_table(device, rows, backends, results, args.sampling_steps)
    rss = [r["rss_after_imports_mib"] for (_, d, _, _), r in results.items() if d == "cpu"]
    if device == "cpu" and rss:
        text += (f"\n\nPeak RSS is that of the whole process, including the "
                 f"{min(rss):.0f} MiB it holds after importing torch and the script.")
    if device == "cuda" and len(backends) > 1:
        text += ("\n\nSpeedup vs torch = median time with --kernels torch / median time with "
                 "this backend, both measured in this run.")
    sections = ["## CPU" if device == "cpu" else "## GPU", text]
    for backend in backends:
        targets = targets_table(device, backend, results)
        if targets:
            sections += [f"### Targets ({device}, --kernels {backend})",
                         targets + "\n\nTimes are per image (median step time / batch), so "
                         "rows with different batches compare; memory is the peak above what "
                         "the process held when the phase started (weights, optimizer, the "
                         "image batch)."]
    return sections


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    backends, notes = choose_backends(args)
    if backends is None:
        print(f"bench_methods.py: {notes}", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if r.name in args.rows] if args.rows else \
        [r for r in ROWS if any(r.name.startswith(SUITES[suite]) for suite in args.suite)]
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results, errors = {}, []
    for device, device_backends in backends.items():
        for row in rows:
            for backend in device_backends:
                for phase in ("train", "sample"):
                    result, error = measure(row, phase, device, backend, args)
                    if result is None:
                        errors.append(f"{row.name} {device} {phase} --kernels {backend}: {error}")
                    else:
                        results[(row.name, device, backend, phase)] = result
    sections = [
        "# Method benchmark: training and sampling speed, peak memory",
        header(args, argv, backends, results, load_at_start),
        "A training step is forward + backward + AdamW step on a fixed batch (no data loading, "
        "grad clipping or EMA). Sampling is one batch of DDIM (eta 0) after a 2-step warm-up run. "
        "Times are medians (min-max) of the timed iterations; images/s = batch / median. "
        "Every number comes from its own fresh process. \"Above start\" is the peak minus what "
        "the process held when the phase began (after building the model, the optimizer and the "
        "batch; AdamW's moments, allocated by the first step, count above it). Forward GFLOP per "
        "image: one network evaluation on one image, counted by "
        "torch.utils.flop_counter.FlopCounterMode on the PyTorch path.",
        "## Rows\n\n" + table(["row", "script", "flags"],
                              [[r.name, f"{r.module}.py", f"`{r.flags}`"] for r in rows]),
    ]
    for device, device_backends in backends.items():
        sections += device_sections(device, rows, device_backends, results, args)
    if notes:
        sections.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes))
    if errors:
        sections.append("Failed measurements:\n\n" + "\n".join(f"- {e}" for e in errors))
    emit("\n\n".join(sections) + "\n", args.out)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
