"""Fused GroupNorm + scale/shift + SiLU in Triton, forward and backward.

The U-Net's ResBlock spends most of its memory traffic on one pattern (improved-DDPM's adaptive
group norm, "AdaGN"):

    out = act(GN(x) * (1 + scale) + shift),    GN(x) = (x - mean_g) * rstd_g * gamma + beta

for x of shape (B, C, *spatial), C channels split into G groups of C/G consecutive channels,
gamma/beta of shape (C,), the timestep-conditioned scale/shift of shape (B, C), and act = SiLU
(z * sigmoid(z)) or the identity. In eager PyTorch this is five kernels that each read and write
the whole activation; here it is two passes forward and two backward, each reading x once.
`reference.group_norm_act` is the same function in plain PyTorch.

Group statistics
----------------
Row (n, c) is the L = H*W contiguous values of channel c of sample n. Group (n, g) is C/G
consecutive rows, M = (C/G) * L values:

    mean_g = (1/M) sum x,    var_g = (1/M) sum (x - mean_g)^2,    rstd_g = 1 / sqrt(var_g + eps)

always in fp32, whatever x's dtype (improved-DDPM's GroupNorm32 does the same). The naive
E[x^2] - E[x]^2 loses every digit when |mean| >> std, so each row is reduced block by block: a
block's own mean and centred sum of squares M2 are exact in registers, and blocks are merged with
Chan et al.'s parallel update (count n_a + n_b, delta = mean_b - mean_a):

    mean = mean_a + delta * n_b / (n_a + n_b)
    M2   = M2_a + M2_b + delta^2 * n_a * n_b / (n_a + n_b)

The group then merges its C/G rows the same way (they all have L values):
M2_g = sum_c M2_c + L * sum_c (mean_c - mean_g)^2.

The folded affine
-----------------
For a fixed (n, c), everything before the activation is one affine map of x:

    z = a * x + b,    a = rstd * gamma * (1 + s),    b = (beta - mean * rstd * gamma) * (1 + s) + t

so the apply pass is one multiply-add and a sigmoid per element. Forward = two launches: per-row
statistics (B*C programs, plenty of parallelism even at 8x8), then per-row merge + apply. The
group's first row saves (mean, rstd) in fp32 for the backward; the output is never saved.

Backward
--------
With xhat = (x - mean) * rstd, y = gamma * xhat + beta and z = y * (1 + s) + t, the upstream
gradient dout goes back through the activation, SiLU'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))):

    g = dout * act'(z)

Two per-row sums carry every parameter gradient (pass 1, recomputing z from x):

    S1[n, c] = sum_l g,    S2[n, c] = sum_l g * xhat

    dshift[n, c] = S1                    dbias[c]   = sum_n (1 + s) * S1
    dscale[n, c] = gamma * S2 + beta * S1    dweight[c] = sum_n (1 + s) * S2

(the last four are [B, C] arithmetic, done in PyTorch). For x, write w_c = gamma_c * (1 + s_nc)
so dxhat = w_c * g, and the usual normalisation backward over the M values of the group gives

    dx = rstd * (w_c * g - A / M - xhat * B / M),    A = sum_{c in g} w_c S1,  B = sum_{c in g} w_c S2

Pass 2 recomputes g and xhat per element and applies this. It is written with xhat rather than
expanded into c1 * g + c2 * x + c3 because c2 * x + c3 cancels catastrophically when |mean| >> std.
Every reduction has exactly one writer and a fixed order: no atomics, bitwise deterministic.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import on_device

# The kernels hold one row block in registers; beyond 2048 values they loop over the row.
_MAX_BLOCK = 2048


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _channel_stats_kernel(X, RowMean, RowM2, L, BLOCK: tl.constexpr):
    """Mean and centred sum of squares M2 of one row (n, c) of L values, in fp32."""
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(0, L, BLOCK):
        in_row = start + offsets < L
        x = tl.load(X + row * L + start + offsets, mask=in_row, other=0.0).to(tl.float32)
        block_count = tl.minimum(L - start, BLOCK).to(tl.float32)
        block_mean = tl.sum(x, axis=0) / block_count
        centred = tl.where(in_row, x - block_mean, 0.0)
        block_m2 = tl.sum(centred * centred, axis=0)
        # Chan et al.'s merge of (count, mean, m2) with the block's statistics.
        total = count + block_count
        delta = block_mean - mean
        mean = mean + delta * (block_count / total)
        m2 = m2 + block_m2 + delta * delta * (count * block_count / total)
        count = total
    tl.store(RowMean + row, mean)
    tl.store(RowM2 + row, m2)


@triton.jit
def _group_stats(RowMean, RowM2, group, L, eps, CPG, CPG_BLOCK: tl.constexpr):
    """(mean, rstd) of a group, merged from the statistics of its CPG rows (channels)."""
    channels = tl.arange(0, CPG_BLOCK)
    in_group = channels < CPG
    row_means = tl.load(RowMean + group * CPG + channels, mask=in_group, other=0.0)
    row_m2s = tl.load(RowM2 + group * CPG + channels, mask=in_group, other=0.0)
    mean = tl.sum(row_means, axis=0) / CPG
    spread = tl.where(in_group, row_means - mean, 0.0)
    m2 = tl.sum(row_m2s, axis=0) + L * tl.sum(spread * spread, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / (CPG * L) + eps)
    return mean, rstd


@triton.jit
def _folded_affine(Weight, Bias, Scale, Shift, row, c, mean, rstd,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(a, b) of row (n, c) such that z = a * x + b; a missing gamma/beta/scale/shift is the identity."""
    gamma = 1.0
    beta = 0.0
    one_plus_s = 1.0
    t = 0.0
    if HAS_WEIGHT:
        gamma = tl.load(Weight + c).to(tl.float32)
    if HAS_BIAS:
        beta = tl.load(Bias + c).to(tl.float32)
    if HAS_SCALE:
        # scale is (B, C) contiguous, so row n*C + c is also its flat index.
        one_plus_s = 1.0 + tl.load(Scale + row).to(tl.float32)
    if HAS_SHIFT:
        t = tl.load(Shift + row).to(tl.float32)
    a = rstd * gamma * one_plus_s
    b = (beta - mean * rstd * gamma) * one_plus_s + t
    return a, b


@triton.jit
def _silu_grad(z):
    """d/dz [z * sigmoid(z)] = sigmoid(z) * (1 + z * (1 - sigmoid(z)))."""
    sig = tl.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _forward_kernel(X, Out, RowMean, RowM2, Mean, Rstd, Weight, Bias, Scale, Shift,
                    C, L, eps, CPG,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                    SILU: tl.constexpr, CPG_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """out = act(a * x + b) for one row, with the folded per-(n, c) affine (a, b)."""
    row = tl.program_id(0).to(tl.int64)
    c = row % C
    group = row // CPG
    mean, rstd = _group_stats(RowMean, RowM2, group, L, eps, CPG, CPG_BLOCK)
    # One writer per group, so the saved statistics are deterministic.
    is_first_channel = c % CPG == 0
    tl.store(Mean + group, mean, mask=is_first_channel)
    tl.store(Rstd + group, rstd, mask=is_first_channel)

    a, b = _folded_affine(Weight, Bias, Scale, Shift, row, c, mean, rstd,
                          HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    offsets = tl.arange(0, BLOCK)
    for start in range(0, L, BLOCK):
        in_row = start + offsets < L
        x = tl.load(X + row * L + start + offsets, mask=in_row, other=0.0).to(tl.float32)
        z = a * x + b
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(Out + row * L + start + offsets, z.to(Out.dtype.element_ty), mask=in_row)


@triton.jit
def _backward_sums_kernel(X, GradOut, Mean, Rstd, Weight, Bias, Scale, Shift, SumG, SumGXhat,
                          C, L, CPG,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                          SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: S1 = sum g and S2 = sum g * xhat over one row, g = dout * act'(z)."""
    row = tl.program_id(0).to(tl.int64)
    c = row % C
    group = row // CPG
    mean = tl.load(Mean + group)
    rstd = tl.load(Rstd + group)
    a, b = _folded_affine(Weight, Bias, Scale, Shift, row, c, mean, rstd,
                          HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    offsets = tl.arange(0, BLOCK)
    # Per-lane partial sums, reduced once at the end: fewer rounding steps than a scalar running sum.
    sum_g = tl.zeros([BLOCK], dtype=tl.float32)
    sum_g_xhat = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, L, BLOCK):
        in_row = start + offsets < L
        x = tl.load(X + row * L + start + offsets, mask=in_row, other=0.0).to(tl.float32)
        # Masked lanes load dout = 0, hence g = 0, so they add nothing to either sum.
        g = tl.load(GradOut + row * L + start + offsets, mask=in_row, other=0.0).to(tl.float32)
        if SILU:
            g = g * _silu_grad(a * x + b)
        sum_g += g
        sum_g_xhat += g * (x - mean) * rstd
    tl.store(SumG + row, tl.sum(sum_g, axis=0))
    tl.store(SumGXhat + row, tl.sum(sum_g_xhat, axis=0))


@triton.jit
def _backward_dx_kernel(X, GradOut, GradX, Mean, Rstd, Weight, Bias, Scale, Shift, SumG, SumGXhat,
                        C, L, CPG,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                        SILU: tl.constexpr, CPG_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: dx = rstd * w_c * g - rstd * (A / M + xhat * B / M) for one row."""
    row = tl.program_id(0).to(tl.int64)
    c = row % C
    group = row // CPG
    mean = tl.load(Mean + group)
    rstd = tl.load(Rstd + group)

    # A = sum_c w_c S1[c] and B = sum_c w_c S2[c] over the channels of this group.
    channels = tl.arange(0, CPG_BLOCK)
    in_group = channels < CPG
    w = tl.full([CPG_BLOCK], 1.0, dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(Weight + (c - c % CPG) + channels, mask=in_group, other=0.0).to(tl.float32)
    if HAS_SCALE:
        w = w * (1.0 + tl.load(Scale + group * CPG + channels, mask=in_group, other=0.0).to(tl.float32))
    sums_g = tl.load(SumG + group * CPG + channels, mask=in_group, other=0.0)
    sums_g_xhat = tl.load(SumGXhat + group * CPG + channels, mask=in_group, other=0.0)
    group_size = CPG * L
    mean_dxhat = tl.sum(w * sums_g, axis=0) / group_size
    mean_dxhat_xhat = tl.sum(w * sums_g_xhat, axis=0) / group_size

    # a = rstd * w_c, the first term's coefficient.
    a, b = _folded_affine(Weight, Bias, Scale, Shift, row, c, mean, rstd,
                          HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    offsets = tl.arange(0, BLOCK)
    for start in range(0, L, BLOCK):
        in_row = start + offsets < L
        x = tl.load(X + row * L + start + offsets, mask=in_row, other=0.0).to(tl.float32)
        g = tl.load(GradOut + row * L + start + offsets, mask=in_row, other=0.0).to(tl.float32)
        if SILU:
            g = g * _silu_grad(a * x + b)
        x_hat = (x - mean) * rstd
        dx = a * g - rstd * (mean_dxhat + x_hat * mean_dxhat_xhat)
        tl.store(GradX + row * L + start + offsets, dx.to(GradX.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as PyTorch custom ops so torch.compile treats them as opaque nodes
# ---------------------------------------------------------------------------------------------


def _row_launch(length):
    """Block size and warps for a row of `length` values: one block per row up to _MAX_BLOCK."""
    block = min(triton.next_power_of_2(length), _MAX_BLOCK)
    return block, min(max(block // 256, 1), 8)


def _flags(weight, bias, scale, shift, silu, x):
    """constexpr switches, and a stand-in pointer for each absent tensor (its loads are compiled out)."""
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=silu)
    pointers = [x if t is None else t.contiguous() for t in (weight, bias, scale, shift)]
    return flags, pointers


@torch.library.custom_op("kernels::group_norm_act_fwd", mutates_args=())
def _forward_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int,
                eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    batch, channels = x.shape[:2]
    rows, length, cpg = batch * channels, x[0, 0].numel(), channels // num_groups
    row_mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    row_m2 = torch.empty(rows, dtype=torch.float32, device=x.device)
    mean = torch.empty(batch, num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty(batch, num_groups, dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block, num_warps = _row_launch(length)
    flags, (w, b, s, t) = _flags(weight, bias, scale, shift, silu, x)
    with on_device(x):
        _channel_stats_kernel[(rows,)](x, row_mean, row_m2, length, BLOCK=block,
                                       num_warps=num_warps)
        _forward_kernel[(rows,)](x, out, row_mean, row_m2, mean, rstd, w, b, s, t,
                                 channels, length, eps, cpg,
                                 CPG_BLOCK=triton.next_power_of_2(cpg), BLOCK=block,
                                 num_warps=num_warps, **flags)
    return out, mean, rstd


@_forward_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, silu):
    stats = x.new_empty(x.shape[0], num_groups, dtype=torch.float32)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), stats, torch.empty_like(stats)


@torch.library.custom_op("kernels::group_norm_act_bwd", mutates_args=())
def _backward_op(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                 silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx and the per-(n, c) sums S1 = sum g, S2 = sum g * xhat, both (B, C) fp32."""
    x, grad_out = x.contiguous(), grad_out.contiguous()
    batch, channels = x.shape[:2]
    rows, length, cpg = batch * channels, x[0, 0].numel(), channels // mean.shape[1]
    sum_g = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    sum_g_xhat = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block, num_warps = _row_launch(length)
    flags, (w, b, s, t) = _flags(weight, bias, scale, shift, silu, x)
    with on_device(x):
        _backward_sums_kernel[(rows,)](x, grad_out, mean, rstd, w, b, s, t, sum_g, sum_g_xhat,
                                       channels, length, cpg, BLOCK=block, num_warps=num_warps,
                                       **flags)
        _backward_dx_kernel[(rows,)](x, grad_out, grad_x, mean, rstd, w, b, s, t, sum_g,
                                     sum_g_xhat, channels, length, cpg,
                                     CPG_BLOCK=triton.next_power_of_2(cpg), BLOCK=block,
                                     num_warps=num_warps, **flags)
    return grad_x, sum_g, sum_g_xhat


@_backward_op.register_fake
def _(grad_out, x, mean, rstd, weight, bias, scale, shift, silu):
    sums = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), sums, torch.empty_like(sums)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, _num_groups, _eps, silu = inputs
    _out, mean, rstd = output
    # x and the fp32 statistics are enough to recompute z; the output itself is not kept.
    ctx.save_for_backward(x, mean, rstd, weight, bias, scale, shift)
    ctx.silu = silu


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
    grad_x, sum_g, sum_g_xhat = _backward_op(grad_out, x, mean, rstd, weight, bias, scale, shift,
                                             ctx.silu)
    # The parameter gradients are [B, C] arithmetic on the two sums (module docstring).
    one_plus_s = 1.0 if scale is None else 1.0 + scale.float()
    gamma = 1.0 if weight is None else weight.float()
    beta = 0.0 if bias is None else bias.float()
    needs = ctx.needs_input_grad
    grad_weight = (one_plus_s * sum_g_xhat).sum(0).to(weight.dtype) if needs[1] else None
    grad_bias = (one_plus_s * sum_g).sum(0).to(bias.dtype) if needs[2] else None
    grad_scale = (gamma * sum_g_xhat + beta * sum_g).to(scale.dtype) if needs[3] else None
    grad_shift = sum_g.to(shift.dtype) if needs[4] else None
    return grad_x, grad_weight, grad_bias, grad_scale, grad_shift, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_act(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act="silu"):
    """act(GN(x) * (1 + scale) + shift) with the Triton kernels; see `kernels.group_norm_act`."""
    out, _mean, _rstd = _forward_op(x.contiguous(), weight, bias, scale, shift, num_groups,
                                    float(eps), act == "silu")
    return out
