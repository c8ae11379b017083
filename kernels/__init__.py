"""Fused kernels shared by the method scripts, with a plain PyTorch path everywhere else.

Two ops, each differentiable and registered as a torch.library custom op (torch.compile keeps them
as single graph nodes):

    group_norm_act(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act="silu")
        act(GroupNorm(x) * (1 + scale) + shift)    kernels/group_norm.py
    attention(q, k, v, scale=None)
        softmax(q k^T * scale) v, non-causal       kernels/flash_attention.py

`kernels/reference.py` defines both in plain PyTorch; it is the specification and the fallback.

Which path runs is chosen per call by the backend, `set_backend(name)` or the environment variable
KERNELS_BACKEND (default "auto"):

    "torch"   the PyTorch reference, always.
    "auto"    Triton for CUDA tensors, the reference for everything else (so CPU training stays
              fast even when the Triton interpreter is switched on).
    "triton"  Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 was set before
              this package was imported (how the tests run the kernels without a GPU).

Whatever the backend, a call the kernels cannot serve falls back to the reference instead of
failing: Triton not installed (e.g. macOS), CPU tensors without the interpreter, bf16 under the
interpreter (it has no bf16), float64, empty tensors, a head dimension outside 16/32/64/128.

The first time the Triton kernels would run on a device, `kernels_agree` compares each of them
with the reference on one small input, forward and backward (a few milliseconds). On a mismatch
or an error (a NaN counts as one) it warns once, and that device uses the reference for the
rest of the process: a kernel that is wrong on some GPU or Triton release costs speed, not a
silently broken run. The check runs eagerly: a model that only ever runs under torch.compile is
not checked.
"""

import math
import os
import warnings

import torch

from . import reference

try:
    import triton
except ImportError:
    triton = None

if triton is not None:
    from . import flash_attention, group_norm

BACKENDS = ("auto", "triton", "torch")

# Triton decides at import time whether its kernels are compiled or interpreted on the CPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 32, 64, 128)


def _checked(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_backend = _checked(os.environ.get("KERNELS_BACKEND", "auto"), "KERNELS_BACKEND")


def set_backend(name):
    """Select "auto", "triton" or "torch" for every later call (see the module docstring)."""
    global _backend
    _backend = _checked(name, "kernels backend")


def get_backend():
    return _backend


_agree = {}                                     # device -> the self-check's verdict


def _relative_error(a, b):
    """||a - b|| / ||b||; inf where it is not finite (a NaN would slip through max())."""
    a, b = a.detach().double(), b.detach().double()
    error = float((a - b).norm() / b.norm().clamp(min=1e-30))
    return error if math.isfinite(error) else math.inf


def _self_check(device):
    """The largest relative L2 error of the Triton kernels against the reference on small inputs
    of each op (outputs and every input gradient), per dtype, divided by that dtype's tolerance.
    On a GPU: fp32, fp16 and bf16, head dimensions 16, 64 and 128, with and without scale/shift
    and SiLU; under the CPU interpreter (no bf16, slow): fp32 and fp16 at head dimension 16."""
    gpu = device.type == "cuda"
    dtypes = {torch.float32: 1e-2, torch.float16: 2e-2, **({torch.bfloat16: 5e-2} if gpu else {})}
    worst, g = 0.0, torch.Generator().manual_seed(0)
    for dtype, tolerance in dtypes.items():
        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

        cases = [(lambda f, a: f(*a[:3], 4, 1e-5, *a[3:], "silu"), group_norm.group_norm_act,
                  reference.group_norm_act, [randn(2, 16, 4, 4), randn(16), randn(16),
                                             randn(2, 16), randn(2, 16)]),
                 (lambda f, a: f(a[0], None, None, 4, 1e-5, None, None, None),
                  group_norm.group_norm_act, reference.group_norm_act, [randn(2, 16, 5, 3)])]
        for head_dim in (16, 64, 128) if gpu else (16,):
            cases.append((lambda f, a: f(*a), flash_attention.attention, reference.attention,
                          [randn(1, 2, 40, head_dim) for _ in range(3)]))
        for call, kernel, spec, inputs in cases:
            results = []
            for fn in (kernel, spec):
                out = call(fn, inputs)
                grad_out = 1 + torch.arange(out.numel(), device=device).reshape(out.shape) % 3
                results.append([out, *torch.autograd.grad(out, inputs, grad_out.to(dtype))])
            worst = max([worst] + [_relative_error(a, b) / tolerance for a, b in zip(*results)])
    return worst


def kernels_agree(device):
    """Whether the Triton kernels agree with the reference on `device` (checked once per device
    and process, see the module docstring): every relative error within its dtype's tolerance,
    which tf32 products and 16-bit rounding stay far inside and a wrong kernel does not. While
    torch.compile traces, the check cannot run: it runs at the first eager call."""
    key = str(device)
    if key not in _agree and torch.compiler.is_compiling():
        return True
    if key not in _agree:
        try:                         # the first call may come from inside no_grad or autocast
            with torch.inference_mode(False), torch.enable_grad(), \
                    torch.autocast(device.type, enabled=False):
                error, why = _self_check(device), None
        except Exception as failure:                                # a compile or launch error
            error, why = float("inf"), f"{type(failure).__name__}: {failure}"
        _agree[key] = error <= 1.0
        if not _agree[key]:
            warnings.warn(f"kernels: the Triton kernels disagree with the PyTorch reference on "
                          f"{key} ({why or f'error {error:.2g} x the tolerance'}); using the "
                          f"reference there for the rest of this run", stacklevel=2)
    return _agree[key]


def _use_triton(t):
    """Whether the Triton kernels can and should run on tensor t under the current backend."""
    if _backend == "torch" or triton is None or t.dtype not in _KERNEL_DTYPES or t.numel() == 0:
        return False
    if t.is_cuda:
        return kernels_agree(t.device)
    return (_backend == "triton" and t.device.type == "cpu" and _INTERPRET
            and t.dtype != torch.bfloat16 and kernels_agree(t.device))


def group_norm_act(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act="silu"):
    """act(GroupNorm(x) * (1 + scale) + shift), statistics in fp32, result in x's dtype.

    x: (B, C, H, W) or (B, C, L); weight, bias: (C,) or None (no affine); scale, shift: (B, C) or
    None, the per-sample modulation of improved-DDPM's AdaGN; act: "silu" or None.
    """
    if act not in ("silu", None):
        raise ValueError(f"act must be 'silu' or None; got {act!r}")
    if x.dim() < 2 or x.shape[1] % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the channels of x, "
                         f"shape {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    per_channel, per_image = (channels,), (batch, channels)
    for name, t, shape in (("weight", weight, per_channel), ("bias", bias, per_channel),
                           ("scale", scale, per_image), ("shift", shift, per_image)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}; "
                             f"got {tuple(t.shape)}")
    if _use_triton(x):
        return group_norm.group_norm_act(x, weight, bias, num_groups, eps, scale, shift, act)
    return reference.group_norm_act(x, weight, bias, num_groups, eps, scale, shift, act)


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v for q: (B, heads, N_q, d), k, v: (B, heads, N_kv, d), non-causal.

    scale defaults to d**-0.5. Any N; d in 16/32/64/128 runs the Triton kernel, other d the
    reference.
    """
    kernel_fits = (
        q.dim() == 4 and k.shape == v.shape and k.shape[:2] == q.shape[:2]
        and q.shape[-1] == k.shape[-1] and q.shape[-1] in _HEAD_DIMS
        and q.dtype == k.dtype == v.dtype and k.numel() > 0
    )
    if kernel_fits and _use_triton(q):
        return flash_attention.attention(q, k, v, scale)
    return reference.attention(q, k, v, scale)
