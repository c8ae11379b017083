"""Tests of kernels/: the Triton kernels against float64 formulas written out here, the backend
dispatch, determinism, and the torch.library registration.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and the kernels run in Triton's CPU interpreter
on tiny shapes (fp32 and fp16; the interpreter has no bf16). On a GPU the same file runs them
compiled, plus the bf16 and realistic-shape tests marked `gpu`.

    python -m pytest tests/test_kernels.py -q
"""

import collections
import math
import os
import re
import subprocess
import sys
import warnings

import platform

import pytest
import torch

if sys.platform == "linux":
    import triton   # requirements.txt installs it on Linux: a broken install must fail, not skip
else:
    triton = pytest.importorskip("triton")

import kernels  # noqa: E402  (after the skip: kernels' Triton modules need triton)
from kernels import flash_attention, group_norm, reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# Relative L2 error bounds. The kernels measure about 1e-6 in fp32 and 3e-4 in fp16, the
# rounding of a value of the output dtype (fp16: 2^-11 = 4.9e-4).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def assert_rel_l2(actual, expected, tol, what):
    """||actual - expected|| <= tol * ||expected|| in float64 (exact zero: ||actual|| <= tol)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual - expected).norm().item()
    scale = expected.norm().item() or 1.0
    assert error <= tol * scale, f"{what}: relative L2 error {error / scale:.3g} > {tol:g}"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled memory, so a kernel that leaves any output element
    unwritten fails the finiteness check. Returns the number of allocations poisoned."""
    calls = collections.Counter()
    real_empty = torch.empty

    def empty(*args, **kwargs):
        calls["empty"] += 1
        out = real_empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)
    return calls


def record_launches(monkeypatch, record):
    """Call record(name, compiled kernel) after every launch of a Triton kernel of kernels/
    (the interpreter has no compiled kernel: None)."""

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def recorded(*args, **kwargs):
                compiled = launch(*args, **kwargs)
                record(self.name, compiled)
                return compiled

            return recorded

    for module in (group_norm, flash_attention):
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Recorded(name, obj))


@pytest.fixture
def launches(monkeypatch):
    """Count the launches of every Triton kernel of kernels/, by name."""
    counts = collections.Counter()
    record_launches(monkeypatch, lambda name, _compiled: counts.update([name]))
    return counts


@pytest.fixture(autouse=True, scope="module")
def kernels_checked():
    """The one-time self-check of kernels_agree runs here, before any test counts launches or
    poisons allocations, and the kernels must pass it."""
    assert kernels.kernels_agree(torch.device(DEVICE))


@pytest.fixture
def backend():
    """Restore the kernels backend after the test."""
    before = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(before)


# -------------------------------------------------------------------------------------------------
# Float64 formulas, written independently of kernels/reference.py
# -------------------------------------------------------------------------------------------------


def group_norm_act_f64(x, weight, bias, num_groups, eps, scale, shift, act):
    batch, channels = x.shape[:2]
    groups = x.reshape(batch, num_groups, -1)                      # (B, G, C/G * L)
    mean = groups.mean(-1, keepdim=True)
    var = ((groups - mean) ** 2).mean(-1, keepdim=True)
    h = ((groups - mean) / torch.sqrt(var + eps)).reshape(batch, channels, -1)  # (B, C, L)
    if weight is not None:
        h = h * weight[:, None]
    if bias is not None:
        h = h + bias[:, None]
    if scale is not None:
        h = h * (1 + scale[:, :, None])
    if shift is not None:
        h = h + shift[:, :, None]
    if act == "silu":
        h = h * torch.sigmoid(h)
    return h.reshape(x.shape)


def attention_f64(q, k, v, scale):
    scores = q @ k.transpose(-1, -2) * scale                       # (B, heads, N_q, N_kv)
    scores = scores - scores.amax(-1, keepdim=True)
    p = torch.exp(scores)
    return (p / p.sum(-1, keepdim=True)) @ v


# -------------------------------------------------------------------------------------------------
# Group norm + scale/shift + SiLU
# -------------------------------------------------------------------------------------------------


def group_norm_inputs(batch, channels, spatial, affine, modulation, dtype, offset=0.0, seed=0):
    """x, weight, bias, scale, shift; parameters in fp32 as in a model, scale/shift in x's dtype
    as they come out of a Linear under autocast. `offset` shifts x's mean away from 0."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=gen) * std + mean).to(DEVICE, dtype).requires_grad_()

    x = randn(batch, channels, *spatial, dtype=dtype, std=2.0, mean=offset)
    weight = randn(channels, std=0.5, mean=1.0) if affine in ("both", "weight") else None
    bias = randn(channels, std=0.5) if affine == "both" else None
    scale, shift = (randn(batch, channels, dtype=dtype, std=0.3) if modulation in ("both", which)
                    else None for which in ("scale", "shift"))
    return x, weight, bias, scale, shift


GROUP_NORM_CASES = [
    # (batch, channels, spatial, groups, affine, modulation, act, mean offset)
    (2, 12, (7, 9), 3, "both", "both", "silu", 0.0),     # channels not a power of two
    (2, 12, (7, 9), 4, "both", "none", None, 0.0),
    (1, 6, (5, 5), 1, "none", "both", "silu", 0.0),      # one group, no affine, batch 1
    (2, 8, (3, 5), 8, "weight", "scale", "silu", 0.0),   # groups of one channel
    (2, 6, (50,), 2, "both", "shift", None, 0.0),        # (B, C, L) input
    (1, 4, (48, 48), 2, "both", "both", "silu", 20.0),   # rows longer than one block; |mean| >> std
    (2, 12, (40, 40), 2, "both", "both", "silu", 3.0),   # 6 of 8 tile rows, 7 tiles, last partial
    (1, 96, (3, 3), 1, "both", "both", "silu", 0.0),     # one group of many channels, tiny maps
    (2, 4, (1, 1), 4, "both", "both", "silu", 0.0),      # one value per group
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GROUP_NORM_CASES)
def test_group_norm_matches_float64(case, dtype, poisoned_empty):
    batch, channels, spatial, groups, affine, modulation, act, offset = case
    inputs = group_norm_inputs(batch, channels, spatial, affine, modulation, dtype, offset)
    x, weight, bias, scale, shift = inputs
    out = group_norm.group_norm_act(x, weight, bias, groups, 1e-5, scale, shift, act)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, present, grad_out)
    # out, mean, rstd forward; dx and the two per-channel sums backward.
    assert poisoned_empty["empty"] >= 6, "the kernels no longer allocate through torch.empty"

    inputs64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    expected = group_norm_act_f64(inputs64[0], *inputs64[1:3], groups, 1e-5, *inputs64[3:], act)
    present64 = [t for t in inputs64 if t is not None]
    expected_grads = torch.autograd.grad(expected, present64, grad_out.double())

    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    assert_rel_l2(out, expected, tol, "output")
    names = [n for n, t in zip(("x", "weight", "bias", "scale", "shift"), inputs) if t is not None]
    for name, grad, expected_grad, t in zip(names, grads, expected_grads, present):
        assert grad.dtype == t.dtype
        assert_rel_l2(grad, expected_grad, tol, f"grad {name}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,side", [(128, 64), (256, 32), (512, 8)])
def test_group_norm_realistic_shapes(channels, side, dtype):
    inputs = group_norm_inputs(32, channels, (side, side), "both", "both", dtype)
    out = group_norm.group_norm_act(inputs[0], *inputs[1:3], 32, 1e-5, *inputs[3:], "silu")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = group_norm_act_f64(inputs64[0], *inputs64[1:3], 32, 1e-5, *inputs64[3:], "silu")
    expected_grads = torch.autograd.grad(expected, inputs64, grad_out.double())
    assert_rel_l2(out, expected, TOLERANCE[dtype], "output")
    for name, grad, expected_grad in zip(("x", "weight", "bias", "scale", "shift"), grads,
                                         expected_grads):
        assert_rel_l2(grad, expected_grad, TOLERANCE[dtype], f"grad {name}")


def test_group_norm_channels_last_input():
    """A non-contiguous x (channels_last) gives the same result as its contiguous copy."""
    x, weight, bias, scale, shift = group_norm_inputs(2, 12, (6, 7), "both", "both", torch.float32)
    out = group_norm.group_norm_act(x.contiguous(memory_format=torch.channels_last), weight, bias,
                                    3, 1e-5, scale, shift, "silu")
    expected = group_norm.group_norm_act(x, weight, bias, 3, 1e-5, scale, shift, "silu")
    assert torch.equal(out, expected)


# -------------------------------------------------------------------------------------------------
# Flash attention
# -------------------------------------------------------------------------------------------------


def attention_inputs(batch, heads, n_q, n_kv, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
            for n in (n_q, n_kv, n_kv)]


ATTENTION_CASES = [
    # (batch, heads, N_q, N_kv, d)
    (1, 2, 100, 100, 64),   # N not a multiple of the block
    (2, 3, 1, 1, 16),       # a single token: dq = dk = 0 exactly
    (1, 2, 16, 16, 32),
    (2, 1, 64, 64, 64),
    (1, 2, 20, 37, 32),     # queries and keys of different lengths
    (1, 1, 40, 40, 128),
]


def check_attention(q, k, v, scale, dtype, tol=None):
    out = flash_attention.attention(q, k, v, scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = attention_f64(q64, k64, v64, q.shape[-1] ** -0.5 if scale is None else scale)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())

    tol = tol or TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert_rel_l2(out, expected, tol, "output")
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert grad.dtype == dtype
        assert_rel_l2(grad, expected_grad, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_float64(case, dtype, poisoned_empty):
    check_attention(*attention_inputs(*case, dtype), None, dtype)
    assert poisoned_empty["empty"] > 0, "the kernels no longer allocate through torch.empty"


def test_attention_explicit_scale():
    check_attention(*attention_inputs(2, 2, 33, 33, 32, torch.float32), 0.3, torch.float32)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter warns on inf and NaN
def test_attention_large_negative_scores():
    """softmax is shift-invariant, so scores around -240 must work like any others. The base-2
    log-sum-exp is then below -128 and exp2(-LSE) overflows fp32, so the masked tail (N = 20 in a
    block of 32) must never evaluate it. fp32 holds a score of 240 to ~2e-5 relative, hence the
    looser bound."""
    gen = torch.Generator().manual_seed(0)
    q = (10 + torch.randn(1, 2, 20, 16, generator=gen)).to(DEVICE).requires_grad_()
    k = (-1.5 + 0.1 * torch.randn(1, 2, 20, 16, generator=gen)).to(DEVICE).requires_grad_()
    v = torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE).requires_grad_()
    check_attention(q, k, v, 1.0, torch.float32, tol=1e-4)


def test_attention_strided_inputs():
    """q, k, v as the U-Net's attention block makes them: views of one (B, 3, heads, d, N) tensor,
    stride 1 along N. The kernels read the strides, so no copy is needed."""
    batch, heads, head_dim, n = 2, 2, 32, 50
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, 3, heads, head_dim, n, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)               # 3 x (B, heads, N, d)
    assert not q.is_contiguous()
    check_attention(q, k, v, None, torch.float32)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,head_dim", [(256, 64), (1024, 64), (4096, 32), (1024, 128)])
def test_attention_realistic_shapes(n, head_dim, dtype):
    check_attention(*attention_inputs(4, 4, n, n, head_dim, dtype), None, dtype)


def test_kernels_compile_for_sm90_without_spills():
    """Every kernel at the launch configurations kernels/ picks for U-Net shapes, compiled for
    sm_90 by triton's own ptxas, no GPU needed (bench/compile_kernels.py): no stack or local
    memory. A spilling kernel is correct, only slow, so no interpreted test would notice it."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "cuobjdump")):
        # Linux x86-64 wheels ship ptxas and cuobjdump (CI is one): only elsewhere may this skip.
        assert not (sys.platform == "linux" and platform.machine() == "x86_64"), bin_dir
        pytest.skip("this triton build has no CUDA tools")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Compiled, not interpreted: under TRITON_INTERPRET=1 @triton.jit gives no compilable kernel.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    # fp32 and bf16: the two families of launch configurations (fp16 has bf16's); the committed
    # bench/results/kernel_registers_sm90.md has all three dtypes.
    result = subprocess.run([sys.executable, os.path.join(root, "bench", "compile_kernels.py"),
                             "--arch", "90", "--dtypes", "fp32", "bf16"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert re.search(r"\b\d+ kernel configurations, 0 with stack or local memory",
                     result.stdout), result.stdout[-2000:]
    # Every Triton kernel of kernels/ was compiled, a kernel added later included.
    kernel_names = {name for module in (group_norm, flash_attention) for name in vars(module)
                    if name.startswith("_") and name.endswith("_kernel")}
    compiled = re.search(r"^Kernels compiled: (.*)$", result.stdout, re.M).group(1).split(", ")
    assert set(compiled) == kernel_names


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_do_not_spill_registers(dtype, monkeypatch):
    """A block too large for the register file still compiles and passes every test above, only
    slowly: ptxas spills the excess to local memory. n_spills (bytes per thread) must be 0."""
    spills = []
    record_launches(monkeypatch, lambda name, compiled: spills.append((name, compiled.n_spills)))
    for head_dim in (16, 32, 64, 128):
        q, k, v = attention_inputs(2, 2, 1024, 1024, head_dim, dtype)
        out = flash_attention.attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    inputs = group_norm_inputs(2, 64, (64, 64), "both", "both", dtype)
    out = group_norm.group_norm_act(inputs[0], *inputs[1:3], 16, 1e-5, *inputs[3:], "silu")
    torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert len(spills) >= 8
    assert not [(name, n) for name, n in spills if n], "kernels spilling registers (bytes/thread)"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_tensors_device(backend):
    """Triton launches on the current device, not the tensors' one: with cuda:0 current, inputs
    on cuda:1 must still get the reference's results, forward and backward."""
    backend("triton")
    x, weight, bias, scale, shift = [t.detach().to("cuda:1").requires_grad_() for t in
                                     group_norm_inputs(2, 8, (6, 6), "both", "both", torch.float32)]
    q, k, v = [t.detach().to("cuda:1").requires_grad_()
               for t in attention_inputs(1, 2, 40, 40, 32, torch.float32)]
    with torch.cuda.device(0):
        h = kernels.group_norm_act(x, weight, bias, 4, scale=scale, shift=shift)
        attn = kernels.attention(q, k, v)
        grads = torch.autograd.grad(h.square().sum() + attn.square().sum(), (x, q, k, v))
    h_ref = reference.group_norm_act(x, weight, bias, 4, 1e-5, scale, shift, "silu")
    attn_ref = reference.attention(q, k, v)
    grads_ref = torch.autograd.grad(h_ref.square().sum() + attn_ref.square().sum(), (x, q, k, v))
    assert_rel_l2(h, h_ref, 1e-5, "group norm on cuda:1")
    assert_rel_l2(attn, attn_ref, 1e-5, "attention on cuda:1")
    for name, grad, grad_ref in zip(("x", "q", "k", "v"), grads, grads_ref):
        assert_rel_l2(grad, grad_ref, 1e-5, f"grad {name} on cuda:1")


# -------------------------------------------------------------------------------------------------
# Determinism (no atomics: every output element has one writer and a fixed summation order)
# -------------------------------------------------------------------------------------------------


def test_group_norm_is_bitwise_deterministic():
    inputs = group_norm_inputs(2, 12, (40, 60), "both", "both", torch.float16)

    def run():
        out = group_norm.group_norm_act(inputs[0], *inputs[1:3], 4, 1e-5, *inputs[3:], "silu")
        return (out, *torch.autograd.grad(out, inputs, torch.ones_like(out)))

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


def test_attention_is_bitwise_deterministic():
    q, k, v = attention_inputs(1, 2, 100, 100, 64, torch.float16)

    def run():
        out = flash_attention.attention(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


# -------------------------------------------------------------------------------------------------
# Backend dispatch
# -------------------------------------------------------------------------------------------------


def run_both_ops(dtype=torch.float32, head_dim=16):
    """Forward and backward of both public ops on tiny inputs; returns the two outputs."""
    x, weight, bias, scale, shift = group_norm_inputs(2, 8, (4, 4), "both", "both", dtype)
    out = kernels.group_norm_act(x, weight, bias, 4, scale=scale, shift=shift)
    out.sum().backward()
    q, k, v = attention_inputs(1, 2, 20, 20, head_dim, dtype)
    attn = kernels.attention(q, k, v)
    attn.sum().backward()
    expected = (reference.group_norm_act(x, weight, bias, 4, 1e-5, scale, shift, "silu"),
                reference.attention(q, k, v))
    return (out, attn), expected


def test_set_backend_validates(backend):
    for name in kernels.BACKENDS:
        backend(name)
        assert kernels.get_backend() == name
    with pytest.raises(ValueError, match="auto, triton, torch"):
        backend("cuda")
    assert kernels.get_backend() == "torch"


@pytest.mark.parametrize("value,ok", [("torch", True), ("tritonn", False)])
def test_backend_from_environment(value, ok):
    env = dict(os.environ, KERNELS_BACKEND=value)
    run = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.get_backend())"],
                         env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if ok:
        assert run.returncode == 0 and run.stdout.strip() == value
    else:
        assert run.returncode != 0 and "KERNELS_BACKEND must be one of" in run.stderr


def test_works_without_triton():
    """Where Triton is not installed (macOS), `import kernels` works and every call, even under
    the "triton" backend, runs the reference."""
    script = (
        "import sys; sys.modules['triton'] = None\n"   # makes `import triton` raise ImportError
        "import torch, kernels\n"
        "kernels.set_backend('triton')\n"
        "q = torch.randn(1, 2, 8, 16)\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        "assert torch.equal(kernels.attention(q, q, q), kernels.reference.attention(q, q, q))\n"
        "assert torch.equal(kernels.group_norm_act(x, None, None, 2),\n"
        "                   kernels.reference.group_norm_act(x, None, None, 2))\n"
        "print(kernels.triton, hasattr(kernels, 'flash_attention'))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["None", "False"]


def test_torch_backend_is_the_reference(backend, launches):
    backend("torch")
    outputs, expected = run_both_ops()
    assert not launches
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))


def test_auto_backend_uses_triton_only_on_gpu(backend, launches):
    backend("auto")
    outputs, expected = run_both_ops()
    if CUDA:
        assert launches["_forward_kernel"] == 1 and launches["_attn_fwd_kernel"] == 1
    else:
        assert not launches
        assert all(torch.equal(a, b) for a, b in zip(outputs, expected))


def test_triton_backend_runs_every_kernel(backend, launches):
    backend("triton")
    outputs, expected = run_both_ops()
    assert set(launches) == {
        "_forward_kernel", "_backward_kernel",
        "_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
        "_attn_bwd_dq_kernel",
    }
    for out, ref in zip(outputs, expected):
        assert_rel_l2(out, ref, 1e-5, "triton backend vs reference")


@pytest.mark.parametrize("reason", ["head_dim", "float64"] + ([] if CUDA else ["bf16"]))
def test_triton_backend_falls_back_to_the_reference(reason, backend, launches):
    backend("triton")
    dtype, head_dim = torch.float32, 16
    if reason == "head_dim":
        head_dim = 24
    elif reason == "float64":
        dtype = torch.float64
    else:                           # the interpreter has no bf16
        dtype = torch.bfloat16
    outputs, expected = run_both_ops(dtype, head_dim)
    attention_launched = launches["_attn_fwd_kernel"] > 0
    group_norm_launched = launches["_forward_kernel"] > 0
    assert not attention_launched
    assert group_norm_launched == (reason == "head_dim")
    assert torch.equal(outputs[1], expected[1])


@pytest.mark.parametrize("fault", ["wrong_result", "nan_result", "error"])
def test_kernels_that_disagree_are_replaced_by_the_reference(fault, backend, launches,
                                                             monkeypatch):
    """kernels_agree: a kernel that is off by 5%, returns NaN or fails to run makes the device use
    the reference from then on, with one warning."""
    monkeypatch.setattr(kernels, "_agree", {})
    if fault == "wrong_result":
        real = group_norm.group_norm_act
        monkeypatch.setattr(group_norm, "group_norm_act", lambda *a, **k: real(*a, **k) * 1.05)
    elif fault == "nan_result":
        real = flash_attention.attention
        monkeypatch.setattr(flash_attention, "attention", lambda *a, **k: real(*a, **k) * math.nan)
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("no kernel image for this device")
        monkeypatch.setattr(flash_attention, "attention", broken)
    backend("triton")
    with pytest.warns(UserWarning):
        assert not kernels.kernels_agree(torch.device(DEVICE))
    launches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # warned once: no second warning
        outputs, expected = run_both_ops()
    assert not launches
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))


def test_group_norm_rejects_bad_arguments():
    x = torch.randn(2, 12, 4, 4)
    with pytest.raises(ValueError, match="must divide"):
        kernels.group_norm_act(x, None, None, 5)
    with pytest.raises(ValueError, match="act must be"):
        kernels.group_norm_act(x, None, None, 3, act="relu")
    with pytest.raises(ValueError, match="scale must have shape"):
        kernels.group_norm_act(x, None, None, 3, scale=torch.zeros(2, 12, 1, 1))


# -------------------------------------------------------------------------------------------------
# torch.library registration: schema, fake (meta) kernels, autograd, and torch.compile
# -------------------------------------------------------------------------------------------------


def test_custom_ops_pass_opcheck():
    x, weight, bias, scale, shift = group_norm_inputs(2, 4, (3, 3), "both", "both", torch.float32)
    torch.library.opcheck(group_norm._forward_op, (x, weight, bias, scale, shift, 2, 1e-5, True))
    q, k, v = attention_inputs(1, 1, 16, 16, 16, torch.float32)
    torch.library.opcheck(flash_attention._forward_op, (q, k, v, 0.25))


def test_compiles_without_graph_breaks(backend):
    """fullgraph=True fails on any graph break; aot_eager also traces the backward through the
    fake kernels, without needing a C++ compiler on CPU."""
    backend("triton")

    def step(x, weight, bias, scale, shift, q, k, v):
        h = kernels.group_norm_act(x, weight, bias, 2, scale=scale, shift=shift)
        return h.square().sum() + kernels.attention(q, k, v).square().sum()

    inputs = [*group_norm_inputs(2, 4, (3, 3), "both", "both", torch.float32),
              *attention_inputs(1, 2, 20, 20, 16, torch.float32)]
    compiled = torch.compile(step, backend="inductor" if CUDA else "aot_eager", fullgraph=True)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    expected_loss = step(*inputs)
    expected_grads = torch.autograd.grad(expected_loss, inputs)
    assert_rel_l2(loss, expected_loss, 1e-5, "compiled loss")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_rel_l2(grad, expected_grad, 1e-5, "compiled grad")


# -------------------------------------------------------------------------------------------------
# The U-Net of ddpm.py, Triton kernels against the PyTorch reference
# -------------------------------------------------------------------------------------------------


def test_ddpm_unet_same_loss_and_gradients(backend, launches):
    ddpm = pytest.importorskip("ddpm")
    args = ddpm.parse_args(["--image_size", "16", "--base_channels", "32", "--channel_mults", "1,2",
                            "--num_res_blocks", "1", "--attention_resolutions", "8"])
    torch.manual_seed(0)
    model = ddpm.build_model(args).to(DEVICE)
    # The U-Net zero-initialises its output layers, which would make most gradients exactly zero:
    # re-initialise every layer (and perturb the norms' affine) so all of them carry signal.
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.reset_parameters()
    # Batch 1 keeps the interpreted run short; the kernels' batch handling is tested above.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 16, 16, generator=gen).to(DEVICE)
    t = torch.randint(0, 1000, (1,), generator=gen).to(DEVICE)
    target = torch.randn(1, 3, 16, 16, generator=gen).to(DEVICE)

    def loss_and_grads(name):
        backend(name)
        model.zero_grad()
        loss = (model(x, t) - target).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_torch, grads_torch = loss_and_grads("torch")
    assert not launches
    loss_triton, grads_triton = loss_and_grads("triton")
    assert launches["_forward_kernel"] > 0 and launches["_attn_bwd_dq_kernel"] > 0

    assert_rel_l2(loss_triton, loss_torch, 1e-4, "loss")
    # A convolution bias followed by a group norm of one channel per group is removed by the
    # normalisation: its exact gradient is 0 and both backends return rounding noise. Such
    # gradients are held to an absolute bound, relative to the whole gradient.
    total = torch.sqrt(sum(g.double().square().sum() for g in grads_torch.values())).item()
    checked = 0
    for name, grad in grads_torch.items():
        if grad.norm() < 1e-6 * total:
            assert grads_triton[name].norm() < 1e-6 * total, f"grad {name} should be ~0"
        else:
            assert_rel_l2(grads_triton[name], grad, 1e-4, f"grad {name}")
            checked += 1
    assert checked > 0.8 * len(grads_torch)
