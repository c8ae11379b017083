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

    python bench/bench_kernels.py --out bench/results/kernels.md
    python bench/bench_kernels.py --quick          # a few shapes, to check the script runs

On a machine without CUDA it prints why it cannot run and exits with status 2.
"""

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SECTIONS = ("group_norm", "attention", "e2e")

# (B, C, H, W): ResBlock norms of a U-Net from its 128x128 level down to 8x8.
GROUP_NORM_SHAPES = [(32, 128, 128, 128), (64, 128, 64, 64), (64, 256, 32, 32), (64, 256, 16, 16),
                     (64, 512, 16, 16), (64, 512, 8, 8)]
GROUP_NORM_QUICK = [(64, 256, 32, 32), (64, 512, 8, 8)]
# (B, heads, N, d): self-attention at 8x8 (N = 64) up to 64x64 (N = 4096).
ATTENTION_SHAPES = [(64, 4, 64, 32), (64, 4, 64, 64), (64, 4, 256, 32), (64, 4, 256, 64),
                    (16, 4, 1024, 32), (16, 4, 1024, 64), (4, 4, 4096, 32), (4, 4, 4096, 64)]
ATTENTION_QUICK = [(64, 4, 256, 64), (16, 4, 1024, 64)]
E2E_ARGS = ("--image_size 64 --batch_size 64 --precision bf16 --base_channels 128 "
            "--channel_mults 1,2,2,2 --num_res_blocks 2 --attention_resolutions 16,8 --num_heads 4")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="also write the tables to this markdown file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="sections to run")
    p.add_argument("--quick", action="store_true", help="two shapes per section")
    p.add_argument("--e2e_args", default=E2E_ARGS,
                   help="ddpm.py flags of the end-to-end U-Net (d = channels / heads must be "
                        "16, 32, 64 or 128 for the attention kernel to run)")
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------------------
# Measurement helpers
# -------------------------------------------------------------------------------------------------


def bench_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def fwd_and_fwd_bwd_ms(fn, inputs, grad_out):
    """(forward ms, forward+backward ms, extra peak MiB of one forward+backward)."""
    def forward():
        return fn(*inputs)

    def forward_backward():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad_out)

    forward_ms, both_ms = bench_ms(forward), bench_ms(forward_backward)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return forward_ms, both_ms, peak_mib


def ceilings():
    """Copy bandwidth (bytes/s) and bf16 matmul throughput (FLOP/s) measured on this GPU."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")    # 1 GiB
    dst = torch.empty_like(src)
    copy_s = bench_ms(lambda: dst.copy_(src)) * 1e-3
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    matmul_s = bench_ms(lambda: a @ b) * 1e-3
    return 2 * src.numel() * src.element_size() / copy_s, 2 * 8192**3 / matmul_s


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}g}"


# -------------------------------------------------------------------------------------------------
# Group norm + scale/shift + SiLU
# -------------------------------------------------------------------------------------------------


def bench_group_norm(shapes, dtype, copy_bw):
    from kernels import group_norm, reference

    header = ["B, C, H, W", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd GB/s",
              "% copy BW", "Triton speedup (fwd+bwd)"]
    rows = []
    for batch, channels, height, width in shapes:
        x = torch.randn(batch, channels, height, width, device="cuda", dtype=dtype)
        weight = torch.randn(channels, device="cuda")
        bias = torch.randn(channels, device="cuda")
        scale = torch.randn(batch, channels, device="cuda", dtype=dtype)
        shift = torch.randn(batch, channels, device="cuda", dtype=dtype)
        inputs = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
        grad_out = torch.randn_like(x)

        def eager(x, w, b, s, t):
            return reference.group_norm_act(x, w, b, 32, 1e-5, s, t, "silu")

        def triton_op(x, w, b, s, t):
            return group_norm.group_norm_act(x, w, b, 32, 1e-5, s, t, "silu")

        impls = {"triton": triton_op, "eager": eager,
                 "torch.compile(eager)": torch.compile(eager, dynamic=False)}
        results = {name: fwd_and_fwd_bwd_ms(fn, inputs, grad_out) for name, fn in impls.items()}
        tensor_bytes = x.numel() * x.element_size()
        triton_both = results["triton"][1]
        for name, (fwd, both, _peak) in results.items():
            gbps = 5 * tensor_bytes / (both * 1e-3) / 1e9
            rows.append([f"{batch}, {channels}, {height}, {width}", name, fmt(fwd), fmt(both - fwd),
                         fmt(both), fmt(gbps), f"{100 * gbps * 1e9 / copy_bw:.0f}%",
                         f"{both / triton_both:.2f}x"])
    return table(header, rows)


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
    from torch.nn.attention import SDPBackend

    from kernels import flash_attention

    header = ["B, heads, N, d", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s",
              "fwd+bwd TFLOP/s", "% matmul peak (fwd+bwd)", "peak MiB", "Triton speedup (fwd+bwd)"]
    rows = []
    for batch, heads, n, head_dim in shapes:
        inputs = [torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype).requires_grad_()
                  for _ in range(3)]
        grad_out = torch.randn_like(inputs[0])
        impls = {"triton": flash_attention.attention}
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            impls[f"sdpa {name}"] = sdpa_with(getattr(SDPBackend, name))
        impls["naive"] = naive_attention
        impls["torch.compile(naive)"] = torch.compile(naive_attention, dynamic=False)

        results = {}
        for name, fn in impls.items():
            try:
                results[name] = fwd_and_fwd_bwd_ms(fn, inputs, grad_out)
            except RuntimeError as error:       # a backend that does not take this shape/GPU
                results[name] = None
                print(f"  {name} at {(batch, heads, n, head_dim)}: n/a ({str(error).splitlines()[0]})",
                      file=sys.stderr)
        forward_flops = 4 * batch * heads * n * n * head_dim
        triton_both = results["triton"][1]
        for name, result in results.items():
            shape = f"{batch}, {heads}, {n}, {head_dim}"
            if result is None:
                rows.append([shape, name] + ["n/a"] * (len(header) - 2))
                continue
            fwd, both, peak = result
            both_tflops = 3.5 * forward_flops / (both * 1e-3) / 1e12
            rows.append([shape, name, fmt(fwd), fmt(both - fwd), fmt(both),
                         fmt(forward_flops / (fwd * 1e-3) / 1e12), fmt(both_tflops),
                         f"{100 * both_tflops * 1e12 / matmul_flops:.0f}%", f"{peak:.0f}",
                         f"{both / triton_both:.2f}x"])
    return table(header, rows)


# -------------------------------------------------------------------------------------------------
# End to end: a training step of ddpm.py's U-Net
# -------------------------------------------------------------------------------------------------


def bench_e2e(e2e_args):
    import ddpm
    import kernels

    args = ddpm.parse_args(e2e_args.split())
    height, width = args.image_size
    torch.manual_seed(0)
    model = ddpm.build_model(args).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 3, height, width, device="cuda")
    t = torch.randint(0, 1000, (args.batch_size,), device="cuda")
    noise = torch.randn_like(x)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step():
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
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
    return f"ddpm.py flags: `{e2e_args}`\n\n" + table(header, rows)


# -------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py times GPU kernels and needs a CUDA GPU; none is visible "
              "(torch.cuda.is_available() is False).", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels.py: unset TRITON_INTERPRET; interpreted kernels are not worth timing.",
              file=sys.stderr)
        return 2
    import triton

    dtype = DTYPES[args.dtype]
    copy_bw, matmul_flops = ceilings()
    sections = [
        "# Kernel benchmark",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.date.today().isoformat()}, {args.dtype}.",
        f"Measured ceilings: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul "
        f"{matmul_flops / 1e12:.0f} TFLOP/s. Backward = (forward+backward) - forward.",
    ]
    if "group_norm" in args.only:
        shapes = GROUP_NORM_QUICK if args.quick else GROUP_NORM_SHAPES
        sections += ["## Group norm + scale/shift + SiLU (32 groups)",
                     bench_group_norm(shapes, dtype, copy_bw)]
    if "attention" in args.only:
        shapes = ATTENTION_QUICK if args.quick else ATTENTION_SHAPES
        sections += ["## Attention (non-causal)", bench_attention(shapes, dtype, matmul_flops)]
    if "e2e" in args.only:
        sections += ["## End to end: ddpm.py training step", bench_e2e(args.e2e_args)]
    report = "\n\n".join(sections) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
