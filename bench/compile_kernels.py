"""Compile every Triton kernel of kernels/ for a GPU architecture, without a GPU, and print what
ptxas made of it: registers, stack and local memory per thread. It runs on any Linux machine with
triton installed (triton ships ptxas and cuobjdump); nothing is launched.

Why: a kernel whose tiles are too large still compiles and passes every test, only slowly,
because ptxas spills registers to local memory; and registers per thread decide how many programs
share an SM (65,536 registers per SM on sm_90), hence how much memory latency is hidden. This
checks the launch configurations that kernels/ picks, at U-Net shapes, before any GPU time is
spent. The numbers are compile-time facts, not speed.

    python bench/compile_kernels.py                      # sm_90 (H100/H200), bf16/fp16/fp32
    python bench/compile_kernels.py --arch 80 --out bench/results/kernel_registers_sm80.md
"""

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import flash_attention, group_norm  # noqa: E402
from report import emit, table  # noqa: E402  (bench/, next to this file)

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (channels per group, values per channel): groups of 32 at 128-512 channels, maps 8x8 to 128x128,
# and the awkward ones (one channel per group; one group of many channels).
GROUP_NORM_SHAPES = [(4, 128 * 128), (4, 64 * 64), (8, 32 * 32), (8, 16 * 16), (16, 8 * 8),
                     (1, 32 * 32), (512, 8 * 8)]
# (N, head dim): attention at 8x8 to 64x64 feature maps.
ATTENTION_SHAPES = [(64, 32), (64, 64), (256, 64), (1024, 32), (1024, 64), (4096, 64),
                    (1024, 128), (1024, 16)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    p.add_argument("--dtypes", nargs="+", choices=list(TRITON_TYPES.values()),
                   default=list(TRITON_TYPES.values()),
                   help="input dtypes to compile for (fp16 and bf16 share their launch "
                   "configurations; fp32 has its own)")
    p.add_argument("--out", help="also write the table to this markdown file")
    return p.parse_args(argv)


def compile_kernel(fn, signature, constexprs, target, num_warps, num_stages=3):
    """triton.compile of `fn` for `target`: signature maps every argument to its Triton type
    ("*bf16", "i32", "fp32" or "constexpr"), constexprs maps the constexpr ones to values."""
    names = list(signature)
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(kernel):
    """(registers, stack bytes, local bytes) per thread of the cubin triton built (the binary a
    GPU would run), from cuobjdump. Local memory, and a stack frame in these kernels, which have
    no local arrays, are registers that did not fit: spills."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", text, re.S)
    return tuple(int(v) for v in found.groups())


def group_norm_kernels(dtype, cpg, length, target):
    """The forward and backward kernel for groups of `cpg` channels of `length` values, with the
    tile and warps group_norm._tile_launch picks, every optional input present and SiLU."""
    t = TRITON_TYPES[dtype]
    cpg_block, l_block, num_warps = group_norm._tile_launch(cpg, length)
    flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True,
                 CPG_BLOCK=cpg_block, L_BLOCK=l_block)
    common = {"Mean": "*fp32", "Rstd": "*fp32", "Weight": "*fp32", "Bias": "*fp32",
              "Scale": f"*{t}", "Shift": f"*{t}"}
    forward = {"X": f"*{t}", "Out": f"*{t}", **common, "C": "i32", "L": "i32", "eps": "fp32",
               "CPG": "i32", **{k: "constexpr" for k in flags}}
    backward = {"X": f"*{t}", "GradOut": f"*{t}", "GradX": f"*{t}", **common, "SumG": "*fp32",
                "SumGXhat": "*fp32", "C": "i32", "L": "i32", "CPG": "i32",
                **{k: "constexpr" for k in flags}}
    config = f"tile {cpg_block}x{l_block}, {num_warps} warps"
    return [("group_norm forward", config,
             compile_kernel(group_norm._forward_kernel, forward, flags, target, num_warps)),
            ("group_norm backward", config,
             compile_kernel(group_norm._backward_kernel, backward, flags, target, num_warps))]


def attention_kernels(dtype, n, head_dim, target):
    """The forward, dK/dV, dQ and Delta kernels with the blocks flash_attention._launch_configs
    picks for self-attention over n tokens; the head dimension is contiguous (stride 1), as in the
    U-Net."""
    t = TRITON_TYPES[dtype]
    forward_cfg, dkdv_cfg, dq_cfg = flash_attention._launch_configs(n, n, head_dim, dtype)
    precision = flash_attention._dot_precision(dtype)

    def strides(*tensors):
        signature, constexprs = {}, {}
        for name in tensors:
            for axis in ("b", "h", "n"):
                signature[f"stride_{name}{axis}"] = "i32"
            signature[f"stride_{name}d"] = "constexpr"
            constexprs[f"stride_{name}d"] = 1
        return signature, constexprs

    kernels = []
    for label, fn, pointers, tensors, extra, cfg in [
        ("attention forward", flash_attention._attn_fwd_kernel, ["Q", "K", "V", "O", "LSE"],
         ["q", "k", "v", "o"], {"heads": "i32", "n_q": "i32", "n_kv": "i32",
                                "qk_scale": "fp32"}, forward_cfg),
        ("attention dK/dV", flash_attention._attn_bwd_dkdv_kernel,
         ["Q", "K", "V", "dO", "dK", "dV", "LSE", "Delta"], ["q", "k", "v", "do"],
         {"heads": "i32", "n_q": "i32", "n_kv": "i32", "qk_scale": "fp32", "sm_scale": "fp32"},
         dkdv_cfg),
        ("attention dQ", flash_attention._attn_bwd_dq_kernel,
         ["Q", "K", "V", "dO", "dQ", "LSE", "Delta"], ["q", "k", "v", "do"],
         {"heads": "i32", "n_q": "i32", "n_kv": "i32", "qk_scale": "fp32", "sm_scale": "fp32"},
         dq_cfg),
    ]:
        signature = {p: "*fp32" if p in ("LSE", "Delta") else f"*{t}" for p in pointers}
        stride_signature, constexprs = strides(*tensors)
        signature.update(stride_signature)
        signature.update(extra)
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N")}
        constexprs.update(HEAD_DIM=head_dim, DOT_PRECISION=precision, **blocks)
        signature.update({k: "constexpr" for k in ("HEAD_DIM", "BLOCK_M", "BLOCK_N",
                                                   "DOT_PRECISION")})
        config = (f"blocks {cfg['BLOCK_M']}x{cfg['BLOCK_N']}, {cfg['num_warps']} warps, "
                  f"{cfg['num_stages']} stages")
        kernels.append((label, config, compile_kernel(fn, signature, constexprs, target,
                                                      cfg["num_warps"], cfg["num_stages"])))
    # Delta = rowsum(O * dO), on blocks of its own size and 4 warps, as _backward_op launches it.
    delta_block = flash_attention._fit(flash_attention._DELTA_BLOCK, n)
    signature = {"O": f"*{t}", "dO": f"*{t}", "Delta": "*fp32"}
    stride_signature, constexprs = strides("o", "do")
    signature.update(stride_signature)
    signature.update(heads="i32", n_q="i32", HEAD_DIM="constexpr", BLOCK_M="constexpr")
    constexprs.update(HEAD_DIM=head_dim, BLOCK_M=delta_block)
    kernels.append(("attention Delta", f"block {delta_block}, 4 warps",
                    compile_kernel(flash_attention._attn_bwd_delta_kernel, signature, constexprs,
                                   target, num_warps=4)))
    return kernels


def main(argv=None):
    args = parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    header = ["kernel", "dtype", "shape", "launch", "registers", "stack B", "local B"]
    rows, names = [], set()
    for dtype in [d for d, name in TRITON_TYPES.items() if name in args.dtypes]:
        for cpg, length in GROUP_NORM_SHAPES:
            for label, config, kernel in group_norm_kernels(dtype, cpg, length, target):
                rows.append([label, TRITON_TYPES[dtype], f"C/G {cpg}, L {length}", config,
                             *resource_usage(kernel)])
                names.add(kernel.metadata.name)
        for n, head_dim in ATTENTION_SHAPES:
            for label, config, kernel in attention_kernels(dtype, n, head_dim, target):
                rows.append([label, TRITON_TYPES[dtype], f"N {n}, d {head_dim}", config,
                             *resource_usage(kernel)])
                names.add(kernel.metadata.name)
    spilling = [r for r in rows if r[5] or r[6]]
    lines = [f"# Kernels compiled for sm_{args.arch} (no GPU involved)", "",
             f"triton {triton.__version__}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}; `python bench/compile_kernels.py --arch "
             f"{args.arch}`. Registers, stack and local bytes are per thread, read with "
             f"cuobjdump from the cubin triton built; stack or local bytes are spills.", "",
             f"{len(rows)} kernel configurations, {len(spilling)} with stack or local memory.",
             f"Kernels compiled: {', '.join(sorted(names))}", "", table(header, rows)]
    report = "\n".join(lines) + "\n"
    emit(report, args.out)
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
