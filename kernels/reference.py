"""Plain PyTorch versions of the two fused ops: the definition, and the fallback.

Each function here is the specification its Triton kernel must reproduce (the tests compare both
against an independent float64 formula), and the path `kernels` takes whenever Triton cannot run:
CPU tensors outside the Triton interpreter, a machine without Triton, bf16 under the interpreter,
an unsupported head dimension, or `set_backend("torch")`.

Numerics follow improved-DDPM's `GroupNorm32`: the statistics are computed in fp32 whatever the
input dtype, and only the final result is cast back (STYLE.md item 11).
"""

import torch.nn.functional as F


def group_norm_act(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act="silu"):
    """act(GroupNorm(x) * (1 + scale) + shift), computed in fp32 and returned in x's dtype.

    x: (B, C, *spatial); weight, bias: (C,) or None; scale, shift: (B, C) or None;
    act: "silu" or None.
    """
    batch, channels = x.shape[:2]
    # (B, C) -> (B, C, 1, ..., 1) so the per-sample, per-channel factors broadcast over space.
    per_channel = (batch, channels) + (1,) * (x.dim() - 2)
    h = F.group_norm(
        x.float(),
        num_groups,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    if scale is not None:
        h = h * (1 + scale.float().reshape(per_channel))
    if shift is not None:
        h = h + shift.float().reshape(per_channel)
    if act == "silu":
        h = F.silu(h)
    return h.to(x.dtype)


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v for (B, heads, N, d) tensors, non-causal; scale defaults to d**-0.5.

    PyTorch's scaled_dot_product_attention picks the fastest backend it has (flash,
    memory-efficient, cuDNN or the plain math one); all of them compute the softmax in fp32.
    """
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
