"""Fused GroupNorm + scale/shift + SiLU in Triton, forward and backward.

The U-Net's ResBlock spends most of its memory traffic on one pattern (improved-DDPM's adaptive
group norm, "AdaGN"):

    out = act(GN(x) * (1 + scale) + shift),    GN(x) = (x - mean_g) * rstd_g * gamma + beta

for x of shape (B, C, *spatial), C channels split into G groups of C/G consecutive channels,
gamma/beta of shape (C,), the timestep-conditioned scale/shift of shape (B, C), and act = SiLU
(z * sigmoid(z)) or the identity. In eager PyTorch this is five kernels that each read and write
the whole activation; here it is one kernel forward and one backward.
`reference.group_norm_act` is the same function in plain PyTorch.

One program per group
---------------------
Channel c of sample n is a row of L = H*W contiguous values, and the C/G channels of group (n, g)
are consecutive rows: the whole group is one contiguous span of M = (C/G) * L values. Each program
owns one group and walks it twice in [C/G, L_BLOCK] tiles (channels x positions, so everything
per-channel is a vector along the first axis): once for the statistics, once for the output.

Why one program per group, and not one per row with separate statistics and apply kernels: the
second walk re-reads what the same program read a moment before. The group (at most a few hundred
kilobytes for U-Net shapes) should then still be in the GPU's L2 cache (50 MB on an H100), so that
DRAM sees each tensor once: the forward moves the minimum 2T (read x, write out; T = one tensor's
bytes) and the backward 3T (read x and dout, write dx); bench/bench_kernels.py measures whether
it does. Kernels split at the statistics would move 3T and 5T,
because by the time the second kernel runs, the tensor has long left L2 (eager PyTorch: about
9T + 14T). The price is parallelism: B*G programs (1024-2048 in training at batch 32-64) instead of
B*C; at batch 1-4 (sampling) a GPU is not filled, which costs little time in absolute terms.

Group statistics
----------------
    mean_g = (1/M) sum x,    var_g = (1/M) sum (x - mean_g)^2,    rstd_g = 1 / sqrt(var_g + eps)

always in fp32, whatever x's dtype (improved-DDPM's GroupNorm32 does the same). The naive
E[x^2] - E[x]^2 loses every digit when |mean| >> std, so the group is reduced tile by tile: a
tile's own mean and centred sum of squares M2 are exact in registers, and tiles are merged with
Chan et al.'s parallel update (count n_a + n_b, delta = mean_b - mean_a):

    mean = mean_a + delta * n_b / (n_a + n_b)
    M2   = M2_a + M2_b + delta^2 * n_a * n_b / (n_a + n_b)

The folded affine
-----------------
For a fixed (n, c), everything before the activation is one affine map of the centred x:

    z = a * (x - mean) + b,    a = rstd * gamma * (1 + s),    b = beta * (1 + s) + t

so the output walk is a subtraction, a multiply-add and a sigmoid per element, with (a, b) a vector
over the tile's channels. Folding the mean into b as well (z = a * x + (b - a * mean)) would save
the subtraction but cancel catastrophically where |mean| * rstd is large: a group of nearly equal
values (a flat image region, one value per group) has rstd up to 1/sqrt(eps) = 316, and a * x and
a * mean then agree in all but the last few bits. The forward saves (mean, rstd) in fp32 for the
backward; the output is never saved.

Backward
--------
With xhat = (x - mean) * rstd, y = gamma * xhat + beta and z = y * (1 + s) + t, the upstream
gradient dout goes back through the activation, SiLU'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))):

    g = dout * act'(z)

Two per-channel sums carry every parameter gradient (first walk, recomputing z from x):

    S1[n, c] = sum_l g,    S2[n, c] = sum_l g * xhat

    dshift[n, c] = S1                    dbias[c]   = sum_n (1 + s) * S1
    dscale[n, c] = gamma * S2 + beta * S1    dweight[c] = sum_n (1 + s) * S2

(the kernel stores S1 and S2; the last four are [B, C] arithmetic, done in PyTorch). For x, write
w_c = gamma_c * (1 + s_nc) so dxhat = w_c * g, and the usual normalisation backward over the M
values of the group gives

    dx = rstd * (w_c * g - A / M - xhat * B / M),    A = sum_{c in g} w_c S1,
                                                      B = sum_{c in g} w_c S2

The second walk recomputes g and xhat per element and applies this. It is written with xhat rather
than expanded into c1 * g + c2 * x + c3 because c2 * x + c3 cancels catastrophically when
|mean| >> std. Every sum has exactly one writer (the group's program) and a fixed order: no
atomics, bitwise deterministic.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import on_device

# A tile holds at most this many values of a group (channels x positions) in registers: with 8
# warps, 8 per thread. Larger tiles need more registers per thread, so fewer programs share an SM
# and fewer loads are in flight to hide the memory latency (ptxas, sm_90: a 4096-value tile of the
# backward takes ~190 registers per thread, one program per SM; 2048 values fit in ~130).
_MAX_TILE = 2048


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(group, L, start, CPG, CPG_BLOCK: tl.constexpr, L_BLOCK: tl.constexpr):
    """Offsets and mask of the [CPG_BLOCK, L_BLOCK] tile at position `start` of a group: rows
    are the group's channels, columns L_BLOCK consecutive positions of each channel."""
    channels = tl.arange(0, CPG_BLOCK)
    positions = start + tl.arange(0, L_BLOCK)
    offsets = group * CPG * L + channels[:, None] * L + positions[None, :]
    mask = (channels[:, None] < CPG) & (positions[None, :] < L)
    return offsets, mask


@triton.jit
def _folded_affine(Weight, Bias, Scale, Shift, group, rstd, C, CPG,
                   CPG_BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Per-channel vectors of the group: (a, b) of z = a * (x - mean) + b, shaped [CPG_BLOCK, 1]
    to broadcast over a tile, and w = gamma * (1 + s). A missing gamma/beta/scale/shift is the
    identity."""
    channels = tl.arange(0, CPG_BLOCK)
    in_group = channels < CPG
    row = group * CPG + channels                                    # n * C + c, also into (B, C)
    c = row % C
    gamma = tl.full([CPG_BLOCK], 1.0, dtype=tl.float32)
    beta = tl.zeros([CPG_BLOCK], dtype=tl.float32)
    one_plus_s = tl.full([CPG_BLOCK], 1.0, dtype=tl.float32)
    t = tl.zeros([CPG_BLOCK], dtype=tl.float32)
    if HAS_WEIGHT:
        gamma = tl.load(Weight + c, mask=in_group, other=1.0).to(tl.float32)
    if HAS_BIAS:
        beta = tl.load(Bias + c, mask=in_group, other=0.0).to(tl.float32)
    if HAS_SCALE:
        # scale is (B, C) contiguous, so row n*C + c is also its flat index.
        one_plus_s = 1.0 + tl.load(Scale + row, mask=in_group, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        t = tl.load(Shift + row, mask=in_group, other=0.0).to(tl.float32)
    w = gamma * one_plus_s
    return (rstd * w)[:, None], (beta * one_plus_s + t)[:, None], w


@triton.jit
def _silu_grad(z):
    """d/dz [z * sigmoid(z)] = sigmoid(z) * (1 + z * (1 - sigmoid(z)))."""
    sig = tl.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _load_x_and_g(X, GradOut, offsets, mask, a, b, mean, SILU: tl.constexpr):
    """A tile's x and g = dout * act'(z) in fp32. Masked lanes load dout = 0, hence g = 0, so they
    add nothing to the backward's sums."""
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GradOut + offsets, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        g = g * _silu_grad(a * (x - mean) + b)
    return x, g


@triton.jit
def _forward_kernel(X, Out, Mean, Rstd, Weight, Bias, Scale, Shift, C, L, eps, CPG,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                    CPG_BLOCK: tl.constexpr, L_BLOCK: tl.constexpr):
    """One group (n, g): its (mean, rstd) by Chan's merge over tiles, then
    out = act(a * (x - mean) + b)."""
    group = tl.program_id(0).to(tl.int64)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(0, L, L_BLOCK):
        offsets, mask = _tile(group, L, start, CPG, CPG_BLOCK, L_BLOCK)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_count = (CPG * tl.minimum(L - start, L_BLOCK)).to(tl.float32)
        tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tile_count
        centred = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
        # Chan et al.'s merge of (count, mean, m2) with the tile's statistics.
        total = count + tile_count
        delta = tile_mean - mean
        mean = mean + delta * (tile_count / total)
        m2 = m2 + tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(Mean + group, mean)
    tl.store(Rstd + group, rstd)

    # The second walk reads the tiles this program has just read: they come from L2, not DRAM.
    a, b, _w = _folded_affine(Weight, Bias, Scale, Shift, group, rstd, C, CPG, CPG_BLOCK,
                              HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    for start in range(0, L, L_BLOCK):
        offsets, mask = _tile(group, L, start, CPG, CPG_BLOCK, L_BLOCK)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        z = a * (x - mean) + b
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(Out + offsets, z.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(X, GradOut, GradX, Mean, Rstd, Weight, Bias, Scale, Shift, SumG, SumGXhat,
                     C, L, CPG,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                     CPG_BLOCK: tl.constexpr, L_BLOCK: tl.constexpr):
    """One group (n, g): S1 = sum g and S2 = sum g * xhat per channel (stored for the parameter
    gradients), then dx = rstd * (w_c * g - A / M - xhat * B / M) on a second walk."""
    group = tl.program_id(0).to(tl.int64)
    mean = tl.load(Mean + group)
    rstd = tl.load(Rstd + group)
    a, b, w = _folded_affine(Weight, Bias, Scale, Shift, group, rstd, C, CPG, CPG_BLOCK,
                             HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    # Per-element partial sums, reduced once at the end: fewer rounding steps than a running sum.
    sum_g = tl.zeros([CPG_BLOCK, L_BLOCK], dtype=tl.float32)
    sum_g_xhat = tl.zeros([CPG_BLOCK, L_BLOCK], dtype=tl.float32)
    for start in range(0, L, L_BLOCK):
        offsets, mask = _tile(group, L, start, CPG, CPG_BLOCK, L_BLOCK)
        x, g = _load_x_and_g(X, GradOut, offsets, mask, a, b, mean, SILU)
        sum_g += g
        sum_g_xhat += g * (x - mean) * rstd
    s1 = tl.sum(sum_g, axis=1)                                      # [CPG_BLOCK], per channel
    s2 = tl.sum(sum_g_xhat, axis=1)
    channels = tl.arange(0, CPG_BLOCK)
    tl.store(SumG + group * CPG + channels, s1, mask=channels < CPG)
    tl.store(SumGXhat + group * CPG + channels, s2, mask=channels < CPG)

    # A / M and B / M over the group; padded channels have w = 1 but S1 = S2 = 0.
    group_size = CPG * L * 1.0                                      # fp32 (CPG or L may be 1)
    mean_dxhat = tl.sum(w * s1, axis=0) / group_size
    mean_dxhat_xhat = tl.sum(w * s2, axis=0) / group_size
    for start in range(0, L, L_BLOCK):
        offsets, mask = _tile(group, L, start, CPG, CPG_BLOCK, L_BLOCK)
        x, g = _load_x_and_g(X, GradOut, offsets, mask, a, b, mean, SILU)
        x_hat = (x - mean) * rstd
        # rstd outside the bracket: where the group is nearly constant the bracket cancels to
        # about 0, and rstd (up to 1/sqrt(eps)) would otherwise amplify two roundings of w_c * g.
        dx = rstd * (w[:, None] * g - mean_dxhat - x_hat * mean_dxhat_xhat)
        tl.store(GradX + offsets, dx.to(GradX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as PyTorch custom ops so torch.compile treats them as opaque nodes
# ---------------------------------------------------------------------------------------------


def _tile_launch(cpg, length):
    """Tile shape [CPG_BLOCK, L_BLOCK] and warps for groups of `cpg` channels of `length` values:
    all of the group's channels in every tile, as many positions as _MAX_TILE leaves (the whole
    row when it fits, so small feature maps take one tile)."""
    cpg_block = triton.next_power_of_2(cpg)
    l_block = min(triton.next_power_of_2(length), max(_MAX_TILE // cpg_block, 1))
    return cpg_block, l_block, min(max(cpg_block * l_block // 256, 1), 8)


def _flags(weight, bias, scale, shift, silu, x):
    """constexpr switches, and a stand-in pointer for each absent tensor (its loads are compiled
    out)."""
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
    length, cpg = x[0, 0].numel(), channels // num_groups
    mean = torch.empty(batch, num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty(batch, num_groups, dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cpg_block, l_block, num_warps = _tile_launch(cpg, length)
    flags, (w, b, s, t) = _flags(weight, bias, scale, shift, silu, x)
    with on_device(x):
        _forward_kernel[(batch * num_groups,)](x, out, mean, rstd, w, b, s, t, channels, length,
                                               eps, cpg, CPG_BLOCK=cpg_block, L_BLOCK=l_block,
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
    num_groups = mean.shape[1]
    length, cpg = x[0, 0].numel(), channels // num_groups
    sum_g = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    sum_g_xhat = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cpg_block, l_block, num_warps = _tile_launch(cpg, length)
    flags, (w, b, s, t) = _flags(weight, bias, scale, shift, silu, x)
    with on_device(x):
        _backward_kernel[(batch * num_groups,)](x, grad_out, grad_x, mean, rstd, w, b, s, t,
                                                sum_g, sum_g_xhat, channels, length, cpg,
                                                CPG_BLOCK=cpg_block, L_BLOCK=l_block,
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
