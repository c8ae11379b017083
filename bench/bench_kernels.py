"""Benchmark the fused kernels of kernels/ on a CUDA GPU and print markdown tables.

What is measured (bf16 unless --dtype says otherwise; times from triton.testing.do_bench, in ms):

  - Ceilings of this GPU, measured here: copy bandwidth (a 1 GiB tensor copy, read + write) and
    dense matmul throughput (an 8192^3 matmul). Achieved rates are reported as a fraction of them.
  - Group norm + scale/shift + SiLU at U-Net shapes: the Triton kernel against the PyTorch
    reference in eager mode and under torch.compile. GB/s counts the minimum traffic of the fused
    op: forward reads x and writes out (2 tensors), backward reads x and dout and writes dx (3).
  - Attention at U-Net token counts, d = 32 and 64: the Triton kernel against
    scaled_dot_product_attention with each backend forced in turn (flash, memory-efficient, cuDNN,
    math; a backend that refuses the shape is listed as n/a), the naive matmul-softmax-matmul, and
    torch.compile of the naive one. FLOPs: forward 4 B H N^2 d, backward 2.5x that. Peak memory is
    the extra memory one forward+backward allocates, which shows linear against quadratic in N.
  - End to end: one training step (forward, backward, AdamW) of ddpm.py's U-Net at 64x64,
    batch 64, bf16 autocast, with --kernels triton against --kernels torch.

Backward times are (forward+backward) - forward, the same subtraction for every implementation.

The last table compares the measurements with the targets of the kernels' issue (met, or missed
by how much), so a results file judges itself.

    python bench/bench_kernels.py --out bench/results/kernels.md
    python bench/bench_kernels.py --quick          # two shapes per section
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke   # CPU: tiny shapes, meaningless times

Without --smoke it needs a CUDA GPU and compiled kernels: otherwise it says why and exits with
status 2. --smoke runs every code path on tiny shapes on whatever device there is (on a CPU the
kernels run under the Triton interpreter, in fp32), so that a script error shows up before GPU
time is spent; tests/test_bench.py runs it.
"""

import argparse
import datetime
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report import emit, table  # noqa: E402  (bench/, next to this file)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SECTIONS = ("group_norm", "attention", "e2e")
DTYPE = torch.bfloat16                                              # set by main()

# (B, C, H, W): ResBlock norms of a U-Net from its 128x128 level down to 8x8.
GROUP_NORM_SHAPES = [(32, 128, 128, 128), (64, 128, 64, 64), (64, 256, 32, 32), (64, 256, 16, 16),
                     (64, 512, 16, 16), (64, 512, 8, 8)]
GROUP_NORM_QUICK = [(64, 256, 32, 32), (64, 512, 8, 8)]
# (B, heads, N, d): self-attention at 8x8 (N = 64) up to 64x64 (N = 4096).
ATTENTION_SHAPES = [(64, 4, 64, 32), (64, 4, 64, 64), (64, 4, 256, 32), (64, 4, 256, 64),
                    (16, 4, 1024, 32), (16, 4, 1024, 64), (4, 4, 4096, 32), (4, 4, 4096, 64)]
ATTENTION_QUICK = [(64, 4, 256, 64), (16, 4, 1024, 64)]
# --smoke: tiny shapes that still take every branch (8x8 and 32x32 maps, N <= 256 and >= 1024).
GROUP_NORM_SMOKE = [(1, 32, 8, 8), (1, 32, 32, 32)]
ATTENTION_SMOKE = [(1, 1, 16, 64), (1, 1, 1024, 64)]
E2E_SMOKE_ARGS = ("--image_size 8 --batch_size 1 --precision fp32 --base_channels 16 "
                  "--channel_mults 1 --num_res_blocks 1 --attention_resolutions 8 --num_heads 1")
E2E_ARGS = ("--image_size 64 --batch_size 64 --precision bf16 --base_channels 128 "
            "--channel_mults 1,2,2,2 --num_res_blocks 2 --attention_resolutions 16,8 --num_heads 4")


def parse_args(argv=None):
    from ddpm import HelpFormatter                                  # no "(default: None)"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", help="also write the tables to this markdown file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="sections to run")
    p.add_argument("--quick", action="store_true", help="two shapes per section")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on any device (a CPU needs TRITON_INTERPRET=1), fp32 on a "
                   "CPU: checks that the script runs; the numbers mean nothing")
    p.add_argument("--e2e_args", default=None,
                   help="ddpm.py flags of the end-to-end U-Net (d = channels / heads must be "
                        "16, 32, 64 or 128 for the attention kernel to run; default: "
                        f"{E2E_ARGS!r}, with --smoke {E2E_SMOKE_ARGS!r})")
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------------------
# Measurement helpers
# -------------------------------------------------------------------------------------------------


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bench_ms(fn):
    """Milliseconds per call: triton's do_bench on a GPU (L2 flushed between calls, median of
    100 ms of calls); on a CPU (--smoke, interpreted kernels) one call, timed with whatever
    compilation it does: there the times mean nothing, and a warm-up call would double the
    interpreter's minutes."""
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def fwd_and_fwd_bwd_ms(fn, inputs, grad_out):
    """(forward ms, forward+backward ms, extra peak MiB of one forward+backward; None on a CPU,
    which has no allocator statistics)."""
    def forward():
        return fn(*inputs)

    def forward_backward():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad_out)

    forward_ms, both_ms = bench_ms(forward), bench_ms(forward_backward)
    if DEVICE != "cuda":
        return forward_ms, both_ms, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return forward_ms, both_ms, peak_mib


def ceilings(dtype, smoke=False):
    """Copy bandwidth (bytes/s) and matmul throughput (FLOP/s) in `dtype`, measured here: a
    1 GiB copy and an 8192^3 matmul (--smoke: 16 MiB and 512^3)."""
    elements, side = (2**22, 512) if smoke else (2**29 // DTYPES_BYTES[dtype], 8192)
    src = torch.empty(elements, dtype=dtype, device=DEVICE)
    dst = torch.empty_like(src)
    copy_s = bench_ms(lambda: dst.copy_(src)) * 1e-3
    a = torch.randn(side, side, dtype=dtype, device=DEVICE)
    b = torch.randn(side, side, dtype=dtype, device=DEVICE)
    matmul_s = bench_ms(lambda: a @ b) * 1e-3
    return 2 * src.numel() * src.element_size() / copy_s, 2 * side**3 / matmul_s


DTYPES_BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}g}"


def shape_text(shape):
    return ", ".join(map(str, shape))


# -------------------------------------------------------------------------------------------------
# Group norm + scale/shift + SiLU
# -------------------------------------------------------------------------------------------------


def bench_group_norm(shapes, dtype, copy_bw):
    """Returns the markdown table and {shape: {impl: (fwd ms, fwd+bwd ms, peak MiB)}}."""
    from kernels import group_norm, reference

    header = ["B, C, H, W", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd GB/s",
              "% copy BW", "Triton speedup (fwd+bwd)"]
    rows, measured = [], {}
    for shape in shapes:
        batch, channels = shape[:2]
        x = torch.randn(shape, device=DEVICE, dtype=dtype)
        weight = torch.randn(channels, device=DEVICE)
        bias = torch.randn(channels, device=DEVICE)
        scale = torch.randn(batch, channels, device=DEVICE, dtype=dtype)
        shift = torch.randn(batch, channels, device=DEVICE, dtype=dtype)
        inputs = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
        grad_out = torch.randn_like(x)

        def eager(x, w, b, s, t):
            return reference.group_norm_act(x, w, b, 32, 1e-5, s, t, "silu")

        def triton_op(x, w, b, s, t):
            return group_norm.group_norm_act(x, w, b, 32, 1e-5, s, t, "silu")

        impls = {"triton": triton_op, "eager": eager,
                 "torch.compile(eager)": torch.compile(eager, dynamic=False)}
        results = {name: fwd_and_fwd_bwd_ms(fn, inputs, grad_out) for name, fn in impls.items()}
        measured[shape] = results
        tensor_bytes = x.numel() * x.element_size()
        triton_both = results["triton"][1]
        for name, (fwd, both, _peak) in results.items():
            gbps = 5 * tensor_bytes / (both * 1e-3) / 1e9
            rows.append([shape_text(shape), name, fmt(fwd), fmt(both - fwd), fmt(both),
                         fmt(gbps), f"{100 * gbps * 1e9 / copy_bw:.0f}%",
                         f"{both / triton_both:.2f}x"])
    return table(header, rows), measured


# -------------------------------------------------------------------------------------------------
# Attention
# -------------------------------------------------------------------------------------------------


def naive_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5       # (B, heads, N, N)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        # The backward runs the kernel that matches the forward's, so forcing the forward suffices.
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


def bench_attention(shapes, dtype, matmul_flops):
    """Returns the markdown table and {shape: {impl: (fwd ms, fwd+bwd ms, peak MiB) or None}}."""
    from torch.nn.attention import SDPBackend

    from kernels import flash_attention

    header = ["B, heads, N, d", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s",
              "fwd+bwd TFLOP/s", "% matmul peak (fwd+bwd)", "peak MiB", "Triton speedup (fwd+bwd)"]
    rows, measured = [], {}
    for shape in shapes:
        batch, heads, n, head_dim = shape
        inputs = [torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_()
                  for _ in range(3)]
        grad_out = torch.randn_like(inputs[0])
        impls = {"triton": flash_attention.attention}
        for name in SDPA_BACKENDS:
            impls[f"sdpa {name}"] = sdpa_with(getattr(SDPBackend, name))
        impls["naive"] = naive_attention
        impls["torch.compile(naive)"] = torch.compile(naive_attention, dynamic=False)

        results = {}
        for name, fn in impls.items():
            try:
                results[name] = fwd_and_fwd_bwd_ms(fn, inputs, grad_out)
            except RuntimeError as error:       # a backend that does not take this shape/device
                results[name] = None
                print(f"  {name} at {shape}: n/a ({str(error).splitlines()[0]})", file=sys.stderr)
        measured[shape] = results
        forward_flops = 4 * batch * heads * n * n * head_dim
        triton_both = results["triton"][1]
        for name, result in results.items():
            if result is None:
                rows.append([shape_text(shape), name] + ["n/a"] * (len(header) - 2))
                continue
            fwd, both, peak = result
            both_tflops = 3.5 * forward_flops / (both * 1e-3) / 1e12
            rows.append([shape_text(shape), name, fmt(fwd), fmt(both - fwd), fmt(both),
                         fmt(forward_flops / (fwd * 1e-3) / 1e12), fmt(both_tflops),
                         f"{100 * both_tflops * 1e12 / matmul_flops:.0f}%", fmt(peak, 4),
                         f"{both / triton_both:.2f}x"])
    return table(header, rows), measured


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


# -------------------------------------------------------------------------------------------------
# End to end: a training step of ddpm.py's U-Net
# -------------------------------------------------------------------------------------------------


def bench_e2e(e2e_args):
    """Returns the markdown table and {backend: ms per training step}."""
    import ddpm
    import kernels

    args = ddpm.parse_args(e2e_args.split())
    height, width = args.image_size
    torch.manual_seed(0)
    model = ddpm.build_model(args).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 3, height, width, device=DEVICE)
    t = torch.randint(0, 1000, (args.batch_size,), device=DEVICE)
    noise = torch.randn_like(x)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step():
        with torch.autocast(DEVICE, dtype=autocast, enabled=autocast is not None):
            loss = F.mse_loss(model(x, t).float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows, times = [], {}
    before = kernels.get_backend()
    try:
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            times[backend] = bench_ms(step)
            rows.append([f"--kernels {backend}", fmt(times[backend]),
                         f"{args.batch_size / (times[backend] * 1e-3):.0f}",
                         f"{times['torch'] / times[backend]:.2f}x"])
    finally:
        kernels.set_backend(before)
    header = ["backend", "step ms", "images/s", "speedup vs torch"]
    return f"ddpm.py flags: `{e2e_args}`\n\n" + table(header, rows), times


# -------------------------------------------------------------------------------------------------
# The targets (issue: kernels/), judged on this run's measurements
# -------------------------------------------------------------------------------------------------


def verdict(value, bound, at_least=True):
    """'met', or 'missed by N%' relative to the bound."""
    if value is None:
        return "not measured"
    if (value >= bound) if at_least else (value <= bound):
        return "met"
    return f"missed by {100 * abs(value - bound) / bound:.0f}%"


def target_rows(group_norm, attention, e2e, copy_bw):
    """[target, shape, measured, required, verdict] for every target that this run measured."""
    rows = []
    for shape, r in (group_norm or {}).items():
        side, triton_both = min(shape[2:]), r["triton"][1]
        eager = r["eager"][1] / triton_both
        if side >= 32:
            rows.append(["GN: speedup vs eager, >= 32x32", shape_text(shape), f"{eager:.2f}x",
                         ">= 3x", verdict(eager, 3.0)])
        elif side >= 8:
            rows.append(["GN: speedup vs eager, 8x8-16x16", shape_text(shape), f"{eager:.2f}x",
                         ">= 2x", verdict(eager, 2.0)])
        compiled = r["torch.compile(eager)"][1] / triton_both
        rows.append(["GN: speedup vs torch.compile", shape_text(shape), f"{compiled:.2f}x",
                     ">= 1.2x", verdict(compiled, 1.2)])
        tensor_bytes = DTYPES_BYTES[DTYPE] * shape[0] * shape[1] * shape[2] * shape[3]
        if tensor_bytes >= 2**26:                                    # large: >= 64 MiB per tensor
            fraction = 5 * tensor_bytes / (triton_both * 1e-3) / copy_bw
            rows.append(["GN: fraction of copy bandwidth, large shapes", shape_text(shape),
                         f"{100 * fraction:.0f}%", ">= 75%", verdict(fraction, 0.75)])
    per_token = {}
    for shape, r in (attention or {}).items():
        batch, heads, n, head_dim = shape
        triton_both = r["triton"][1]
        flash = r.get("sdpa FLASH_ATTENTION")
        if n >= 1024 and head_dim == 64:
            speedup = None if flash is None else flash[1] / triton_both
            rows.append(["attention: speedup vs SDPA flash, N >= 1024, d = 64", shape_text(shape),
                         "n/a" if speedup is None else f"{speedup:.2f}x", ">= 1.0x",
                         "SDPA flash n/a here" if speedup is None else verdict(speedup, 1.0)])
        sdpa = [r[f"sdpa {name}"][1] for name in SDPA_BACKENDS if r.get(f"sdpa {name}")]
        if n <= 256 and sdpa:
            ratio = triton_both / min(sdpa)
            rows.append(["attention: latency / fastest SDPA backend, N <= 256", shape_text(shape),
                         f"{ratio:.2f}x", "<= 1.2x", verdict(ratio, 1.2, at_least=False)])
        naive = r["naive"][1] / triton_both
        rows.append(["attention: speedup vs naive", shape_text(shape), f"{naive:.2f}x", ">= 3x",
                     verdict(naive, 3.0)])
        if r["triton"][2] is not None:
            per_token.setdefault(head_dim, []).append((n, r["triton"][2] / (batch * heads * n)))
    for head_dim, points in per_token.items():
        (n_small, small), (n_large, large) = min(points), max(points)
        if n_large > n_small:
            # Linear in N: the extra memory per token stays flat while N grows (quadratic: x N).
            growth = large / small
            rows.append(["attention: memory per token, linear in N", f"d = {head_dim}, N "
                         f"{n_small} -> {n_large}", f"{growth:.2f}x", "<= 2x (N grows "
                         f"{n_large // n_small}x)", verdict(growth, 2.0, at_least=False)])
    if e2e:
        speedup = e2e["torch"] / e2e["triton"]
        rows.append(["end to end: ddpm.py step, triton vs torch", "", f"{speedup:.2f}x",
                     ">= 1.3x", verdict(speedup, 1.3)])
    return rows


# -------------------------------------------------------------------------------------------------


def main(argv=None):
    global DTYPE
    args = parse_args(argv)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not args.smoke and DEVICE != "cuda":
        print("bench_kernels.py times GPU kernels and needs a CUDA GPU; none is visible "
              "(torch.cuda.is_available() is False). --smoke checks the script on a CPU.",
              file=sys.stderr)
        return 2
    if not args.smoke and interpreted:
        print("bench_kernels.py: unset TRITON_INTERPRET; interpreted kernels are not worth timing.",
              file=sys.stderr)
        return 2
    if DEVICE == "cpu" and not interpreted:
        print("bench_kernels.py --smoke on a CPU runs the Triton kernels in the interpreter: set "
              "TRITON_INTERPRET=1.", file=sys.stderr)
        return 2
    import triton

    # The interpreter has no bf16: a CPU smoke run uses fp32.
    DTYPE = torch.float32 if DEVICE == "cpu" else DTYPES[args.dtype]
    dtype_name = {v: k for k, v in DTYPES.items()}[DTYPE]
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    copy_bw, matmul_flops = ceilings(DTYPE, smoke=args.smoke)
    sections = [
        "# Kernel benchmark" + (" (--smoke: tiny shapes, the times mean nothing)"
                                if args.smoke else ""),
        f"{device_name}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.date.today().isoformat()}, {dtype_name}.",
        f"Measured ceilings: copy {copy_bw / 1e9:.0f} GB/s, {dtype_name} matmul "
        f"{matmul_flops / 1e12:.3g} TFLOP/s. Backward = (forward+backward) - forward.",
    ]
    group_norm = attention = e2e = None
    if "group_norm" in args.only:
        shapes = (GROUP_NORM_SMOKE if args.smoke else GROUP_NORM_QUICK if args.quick
                  else GROUP_NORM_SHAPES)
        text, group_norm = bench_group_norm(shapes, DTYPE, copy_bw)
        sections += ["## Group norm + scale/shift + SiLU (32 groups)", text]
    if "attention" in args.only:
        shapes = (ATTENTION_SMOKE if args.smoke else ATTENTION_QUICK if args.quick
                  else ATTENTION_SHAPES)
        text, attention = bench_attention(shapes, DTYPE, matmul_flops)
        sections += ["## Attention (non-causal)", text]
    if "e2e" in args.only:
        e2e_args = args.e2e_args or (E2E_SMOKE_ARGS if args.smoke else E2E_ARGS)
        text, e2e = bench_e2e(e2e_args)
        sections += ["## End to end: ddpm.py training step", text]
    sections += ["## Targets", table(["target", "shape", "measured", "required", "verdict"],
                                     target_rows(group_norm, attention, e2e, copy_bw))]
    report = "\n\n".join(sections) + "\n"
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
