"""Flash attention (FlashAttention-2 style) in Triton, forward and backward, non-causal.

    O = softmax(S) V,    S = scale * Q K^T,    Q: (N_q, d), K, V: (N_kv, d), per batch and head

The U-Net's self-attention at 64x64 has N = 4096 tokens, so the N x N matrix S would be 64 MiB
per head in fp32. Flash attention never stores it: each program keeps a block of Q rows in
registers and streams K and V through in blocks, so memory is linear in N and each of Q, K, V is
read once (Dao et al., "FlashAttention-2", 2023, arXiv:2307.08691).
`reference.attention` is the same function in plain PyTorch.

Online softmax and the log-sum-exp
----------------------------------
Row i of the softmax needs the maximum and the sum over all N_kv columns before any output can be
normalised. The online softmax carries, per row, the running maximum m, the running sum
l = sum_j exp(S_ij - m) and the unnormalised output acc = sum_j exp(S_ij - m) V_j. When a new
block of scores S_blk arrives:

    m_new = max(m, rowmax(S_blk))
    alpha = exp(m - m_new)                       (rescales what was accumulated under the old max)
    P_blk = exp(S_blk - m_new)
    l     = alpha * l + rowsum(P_blk)
    acc   = alpha * acc + P_blk V_blk

and at the end O = acc / l. Subtracting the running maximum keeps every exponent <= 0, so nothing
overflows in fp16/bf16. The kernel works in base 2 (exp2 is one hardware instruction): it scales
the scores by scale * log2(e) once, and exp2(x * log2(e)) = exp(x). It stores the fp32 log-sum-exp
per row, in base 2 as well,

    LSE_i = m_i + log2(l_i),    so that    P_ij = exp2(S_ij * log2(e) - LSE_i)

which lets the backward rebuild any block of P exactly from Q and K alone.

Backward
--------
With dO the upstream gradient, the chain rule through O = P V and the softmax gives

    dV    = P^T dO
    dP    = dO V^T
    dS    = P * (dP - Delta),    Delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
    dQ    = scale * dS K
    dK    = scale * dS^T Q

Delta is computed first by a small kernel from O and dO (the second form needs no P). Then two
kernels, neither of which stores P or dS:
  - dK, dV: one program per block of K/V rows, looping over all Q blocks (non-causal: from the
    first one) and recomputing P^T from Q, K and LSE;
  - dQ: one program per block of Q rows, looping over all K/V blocks.
Each output block has exactly one writer and a fixed summation order, so there are no atomics
and results are bitwise deterministic. Recomputing P in both kernels costs two extra block
products over the minimum; it is what buys the determinism.

Numerics: scores, softmax statistics and all accumulators are fp32. P and dS are cast to the
input dtype (fp16, bf16 or fp32, never a hard-coded fp16) before their block products, like every
flash attention. In fp32, tl.dot is pinned to IEEE fp32 instead of TF32 so fp32 stays exact.
Sequence tails (N not a multiple of the block) are masked: out-of-range key columns get a score
of -inf, so P = 0 there; the dK/dV kernel explains why its out-of-range query rows need no mask.
"""


import torch
import triton
import triton.language as tl

from .launch import on_device

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_on, stride_od,
                     heads, n_q, n_kv, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One block of BLOCK_M query rows of one (batch, head): O and LSE by the online softmax."""
    batch_head = tl.program_id(1)
    batch, head = (batch_head // heads).to(tl.int64), (batch_head % heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    O += batch * stride_ob + head * stride_oh

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    # Rows past n_q load zeros; their results are computed but never stored.
    q = tl.load(Q + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                mask=rows[:, None] < n_q, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_kv, BLOCK_N):
        kv_cols = start_n + cols
        in_kv = kv_cols < n_kv
        # K is loaded transposed, (HEAD_DIM, BLOCK_N), ready for Q K^T.
        k_t = tl.load(K + kv_cols[None, :] * stride_kn + dims[:, None] * stride_kd,
                      mask=in_kv[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        # Every block has at least one real column (start_n < n_kv), so m_new stays finite.
        s = tl.where(in_kv[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + kv_cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=in_kv[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + rows[:, None] * stride_on + dims[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=rows[:, None] < n_q)
    tl.store(LSE + batch_head.to(tl.int64) * n_q + rows, m_i + tl.log2(l_i), mask=rows < n_q)


@triton.jit
def _attn_bwd_delta_kernel(O, dO, Delta,
                           stride_ob, stride_oh, stride_on, stride_od,
                           stride_dob, stride_doh, stride_don, stride_dod,
                           heads, n_q,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(O * dO) in fp32 for one block of query rows."""
    batch_head = tl.program_id(1)
    batch, head = (batch_head // heads).to(tl.int64), (batch_head % heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    in_q = rows[:, None] < n_q
    o = tl.load(O + batch * stride_ob + head * stride_oh
                + rows[:, None] * stride_on + dims[None, :] * stride_od, mask=in_q, other=0.0)
    do = tl.load(dO + batch * stride_dob + head * stride_doh
                 + rows[:, None] * stride_don + dims[None, :] * stride_dod, mask=in_q, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + batch_head.to(tl.int64) * n_q + rows, delta, mask=rows < n_q)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, dO, dK, dV, LSE, Delta,
                          stride_qb, stride_qh, stride_qn, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_don, stride_dod,
                          heads, n_q, n_kv, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """dK and dV for one block of BLOCK_N key/value rows, looping over every query block.

    Works on transposed scores, S^T (BLOCK_N, BLOCK_M), so that dV = P^T dO and dK = dS^T Q are
    plain products of what is in registers. dK and dV have the layout of K and V (contiguous).
    """
    batch_head = tl.program_id(1)
    batch, head = (batch_head // heads).to(tl.int64), (batch_head % heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    dO += batch * stride_dob + head * stride_doh
    LSE += batch_head.to(tl.int64) * n_q
    Delta += batch_head.to(tl.int64) * n_q

    kv_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    in_kv = kv_rows[:, None] < n_kv
    k = tl.load(K + kv_rows[:, None] * stride_kn + dims[None, :] * stride_kd, mask=in_kv, other=0.0)
    v = tl.load(V + kv_rows[:, None] * stride_vn + dims[None, :] * stride_vd, mask=in_kv, other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, n_q, BLOCK_M):
        q_rows = start_m + cols
        in_q = q_rows < n_q
        q_t = tl.load(Q + q_rows[None, :] * stride_qn + dims[:, None] * stride_qd,
                      mask=in_q[None, :], other=0.0)
        lse = tl.load(LSE + q_rows, mask=in_q, other=0.0)
        # P^T rebuilt from the saved log-sum-exp. Query columns past n_q need no mask: they load
        # q = 0, LSE = 0, dO = 0 and Delta = 0, so P^T = 1 there and P^T dO = dS^T = 0.
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
        # Key rows past n_kv load k = 0, a score of 0, and exp2(0 - LSE) overflows to inf when all
        # real scores of a query are very negative. Their dK, dV rows are never stored, but -inf
        # (P = 0) keeps every intermediate finite.
        s_t = tl.where(in_kv, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        do = tl.load(dO + q_rows[:, None] * stride_don + dims[None, :] * stride_dod,
                     mask=in_q[:, None], other=0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        # dP^T = V dO^T, dS^T = P^T * (dP^T - Delta).
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        delta = tl.load(Delta + q_rows, mask=in_q, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)

    out_offsets = (batch_head.to(tl.int64) * n_kv * HEAD_DIM + kv_rows[:, None] * HEAD_DIM
                   + dims[None, :])
    tl.store(dK + out_offsets, (dk * sm_scale).to(dK.dtype.element_ty), mask=in_kv)
    tl.store(dV + out_offsets, dv.to(dV.dtype.element_ty), mask=in_kv)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, dO, dQ, LSE, Delta,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_don, stride_dod,
                        heads, n_q, n_kv, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """dQ for one block of BLOCK_M query rows, looping over every key/value block."""
    batch_head = tl.program_id(1)
    batch, head = (batch_head // heads).to(tl.int64), (batch_head % heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    dO += batch * stride_dob + head * stride_doh

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    in_q = rows < n_q
    q = tl.load(Q + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                mask=in_q[:, None], other=0.0)
    do = tl.load(dO + rows[:, None] * stride_don + dims[None, :] * stride_dod,
                 mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + batch_head.to(tl.int64) * n_q + rows, mask=in_q, other=0.0)
    delta = tl.load(Delta + batch_head.to(tl.int64) * n_q + rows, mask=in_q, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_kv, BLOCK_N):
        kv_cols = start_n + cols
        in_kv = kv_cols < n_kv
        k_t = tl.load(K + kv_cols[None, :] * stride_kn + dims[:, None] * stride_kd,
                      mask=in_kv[None, :], other=0.0)
        v_t = tl.load(V + kv_cols[None, :] * stride_vn + dims[:, None] * stride_vd,
                      mask=in_kv[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        # Key columns past n_kv load k = 0, a score of 0, and exp2(0 - LSE) overflows to inf when
        # all real scores of the row are very negative (then inf * 0 = NaN in dS K): P = 0 there.
        s = tl.where(in_kv[None, :], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)

    out_offsets = (batch_head.to(tl.int64) * n_q * HEAD_DIM + rows[:, None] * HEAD_DIM
                   + dims[None, :])
    tl.store(dQ + out_offsets, (dq * sm_scale).to(dQ.dtype.element_ty), mask=in_q[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers, registered as PyTorch custom ops so torch.compile treats them as opaque nodes
# ---------------------------------------------------------------------------------------------


# Query rows per program of the Delta kernel: it holds O and dO for them in fp32, and at 128 rows
# x d = 128 on 4 warps that spilled (248 bytes per thread, sm_90, bench/compile_kernels.py).
_DELTA_BLOCK = 64


def _fit(block, length):
    """Shrink a block to the sequence (short sequences waste no lanes), but keep tl.dot's
    minimum of 16."""
    return max(16, min(block, triton.next_power_of_2(length)))


def _launch_configs(n_q, n_kv, head_dim, dtype):
    """Fixed block sizes per shape and dtype, chosen by rule rather than autotuned.

    Autotuning picks its winner by timing, so two processes could pick different blocks, and the
    block size sets the summation order: fixed rules keep results bitwise reproducible across runs.
    16-bit inputs (tensor cores). Forward: large query blocks amortise the K/V stream. Backward
    (FlashAttention-2 split): the dK/dV kernel keeps a large K/V block resident and streams small
    Q blocks, the dQ kernel the reverse. d = 128 halves the streamed block to stay within
    registers and shared memory. Both backward kernels run 8 warps: with 4, each thread holds a
    quarter of the resident block's fp32 accumulators (dK and dV: 2 x 128 x 64 values at d = 64),
    and ptxas spills 296 bytes per thread of the dK/dV kernel to the stack (sm_90,
    `python bench/compile_kernels.py`).

    fp32 gets smaller blocks over 8 warps. Its "ieee" products run on the CUDA cores, where each
    thread keeps its rows of A and columns of B in registers over the whole reduction; at the
    16-bit blocks that is far beyond the 255 registers a thread can have, and ptxas spills up to
    12 KB per thread to local memory (the d = 64 dK/dV kernel, sm_90). These blocks fit every head
    dimension without a spill.
    """
    if dtype == torch.float32:
        forward = dict(BLOCK_M=_fit(64, n_q), BLOCK_N=_fit(32, n_kv), num_warps=8, num_stages=2)
        # 32 resident K/V rows at d = 32: with 64, triton 3.6 (not 3.9) gives the dK/dV kernel a
        # 16-byte stack frame (bench/compile_kernels.py).
        resident = 32 if head_dim == 32 else 64
        dkdv = dict(BLOCK_M=_fit(16, n_q), BLOCK_N=_fit(resident, n_kv), num_warps=8,
                    num_stages=2)
        dq = dict(BLOCK_M=_fit(64, n_q), BLOCK_N=_fit(16, n_kv), num_warps=8, num_stages=2)
        return forward, dkdv, dq
    stream = 64 if head_dim <= 64 else 32
    fwd_m = _fit(128 if n_q >= 1024 else 64, n_q)
    forward = dict(BLOCK_M=fwd_m, BLOCK_N=_fit(stream, n_kv),
                   num_warps=8 if fwd_m == 128 else 4, num_stages=3)
    resident = 128 if head_dim <= 64 else 64
    dkdv = dict(BLOCK_M=_fit(stream // 2, n_q), BLOCK_N=_fit(resident, n_kv),
                num_warps=8, num_stages=3 if head_dim <= 64 else 2)
    dq = dict(BLOCK_M=_fit(resident, n_q), BLOCK_N=_fit(stream // 2, n_kv),
              num_warps=8, num_stages=3 if head_dim <= 64 else 2)
    return forward, dkdv, dq


def _dot_precision(dtype):
    """fp32 stays IEEE fp32 (not TF32); 16-bit inputs always use tensor cores, "tf32" is the
    default."""
    return "ieee" if dtype == torch.float32 else "tf32"


@torch.library.custom_op("kernels::flash_attention_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns O (contiguous) and the base-2 log-sum-exp, (B, heads, N_q) fp32."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, n_q, dtype=torch.float32, device=q.device)
    forward, _, _ = _launch_configs(n_q, n_kv, head_dim, q.dtype)
    grid = (triton.cdiv(n_q, forward["BLOCK_M"]), batch * heads)
    with on_device(q):
        _attn_fwd_kernel[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(),
                               *o.stride(), heads, n_q, n_kv, scale * _LOG2E, HEAD_DIM=head_dim,
                               DOT_PRECISION=_dot_precision(q.dtype), **forward)
    return o, lse


@_forward_op.register_fake
def _(q, k, v, scale):
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), lse


@torch.library.custom_op("kernels::flash_attention_bwd", mutates_args=())
def _backward_op(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 o: torch.Tensor, lse: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dQ, dK, dV, contiguous; inputs may have any strides."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    forward, dkdv, dq = _launch_configs(n_q, n_kv, head_dim, q.dtype)
    precision = _dot_precision(q.dtype)
    qk_scale = scale * _LOG2E

    delta = torch.empty(batch, heads, n_q, dtype=torch.float32, device=q.device)
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_o.stride())
    with on_device(q):
        delta_block = _fit(_DELTA_BLOCK, n_q)
        _attn_bwd_delta_kernel[(triton.cdiv(n_q, delta_block), batch * heads)](
            o, grad_o, delta, *o.stride(), *grad_o.stride(), heads, n_q,
            HEAD_DIM=head_dim, BLOCK_M=delta_block, num_warps=4)
        _attn_bwd_dkdv_kernel[(triton.cdiv(n_kv, dkdv["BLOCK_N"]), batch * heads)](
            q, k, v, grad_o, grad_k, grad_v, lse, delta, *strides, heads, n_q, n_kv, qk_scale,
            scale, HEAD_DIM=head_dim, DOT_PRECISION=precision, **dkdv)
        _attn_bwd_dq_kernel[(triton.cdiv(n_q, dq["BLOCK_M"]), batch * heads)](
            q, k, v, grad_o, grad_q, lse, delta, *strides, heads, n_q, n_kv, qk_scale, scale,
            HEAD_DIM=head_dim, DOT_PRECISION=precision, **dq)
    return grad_q, grad_k, grad_v


@_backward_op.register_fake
def _(grad_o, q, k, v, o, lse, scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    # P is never saved: the backward rebuilds it block by block from q, k and the fp32 LSE.
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, grad_o, _grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _backward_op(grad_o, q, k, v, o, lse, ctx.scale)
    return grad_q, grad_k, grad_v, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v with the Triton kernels; see `kernels.attention`."""
    sm_scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, _lse = _forward_op(q, k, v, float(sm_scale))
    return o
