"""Selective log-softmax: the log-probability of one token per row, from logits.

Forward, per row r with logits z[r, :V], token y_r, temperature T, x = z / T:

    M_r       = max_v x_v,  S_r = log sum_v exp(x_v - M_r)   (online, chunks of V)
    logp_r    = (x_{y_r} - M_r) - S_r     (not x_y - lse: with |x| ~ 1e4 the lse
                                            would lose 1e-3 to float32 rounding)
    entropy_r = -sum_v softmax(x)_v log softmax(x)_v    (optional, same pass)

Backward, for upstream gradients g_r (of logp) and h_r (of entropy), p = softmax(x):

    dz_v = [ g_r (onehot(y_r)_v - p_v) - h_r p_v (log p_v + entropy_r) ] / T

Shapes: logits are addressed as rows of a [B, T_view, V] view with any row
strides (last dim contiguous), so a [N, V] tensor is B = N, T_view = 1 and a
slice such as ``logits[:, :-1]`` needs no copy. Per-row tensors (token ids,
logp, M, S, entropy, g, h) are contiguous [rows]. Every load of the logits is
upcast to float32 at once (bf16/fp16 arithmetic is float32 inside); dz is stored
in the gradient buffer's dtype, which may be the logits' own storage (in place).
"""

import triton
import triton.language as tl

# Large vocabulary chunks: few loop iterations per row (each costs ~1 ms in the
# interpreter) while the chunk still fits in registers when compiled.
MAX_BLOCK_V = 8192


def launch_config(vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab_size`` logits."""
    block = min(triton.next_power_of_2(vocab_size), MAX_BLOCK_V)
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


@triton.jit
def _row_offset(row, T_view, stride_b, stride_t):
    # int64: rows * V exceeds 2**31 for large batches at 150k vocabularies.
    row = row.to(tl.int64)
    return (row // T_view) * stride_b + (row % T_view) * stride_t


@triton.jit
def _selective_log_softmax_fwd_kernel(
    logits_ptr,
    ids_ptr,
    logp_ptr,
    max_ptr,
    logsum_ptr,
    entropy_ptr,
    T_view,
    stride_b,
    stride_t,
    V,
    inv_temp,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + _row_offset(row, T_view, stride_b, stride_t)
    cols = tl.arange(0, BLOCK_V)

    m = -float("inf")
    s = 0.0
    # t = sum exp(x - m) (x - m): entropy = log s - t / s, with no cancellation
    # between lse and E[x] (both ~ max logit) that lse - E[x] would suffer.
    t = 0.0
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(base + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        x = x * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        if WITH_ENTROPY:
            # Re-centre t on m_new; the first chunk (s == 0) has nothing to move.
            t = tl.where(s > 0, scale * (t + (m - m_new) * s), 0.0)
            # e == 0 where x == -inf: 0 * -inf would be NaN.
            t += tl.sum(tl.where(e > 0, e * (x - m_new), 0.0), axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)

    y = tl.load(ids_ptr + row).to(tl.int64)
    x_y = tl.load(base + y).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, (x_y - m) - log_s)
    tl.store(max_ptr + row, m)
    tl.store(logsum_ptr + row, log_s)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_s - t / s)


@triton.jit
def _selective_log_softmax_bwd_kernel(
    logits_ptr,
    grad_ptr,
    ids_ptr,
    max_ptr,
    logsum_ptr,
    entropy_ptr,
    g_logp_ptr,
    g_entropy_ptr,
    T_view,
    stride_b,
    stride_t,
    grad_stride_b,
    grad_stride_t,
    V,
    inv_temp,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + _row_offset(row, T_view, stride_b, stride_t)
    grad_base = grad_ptr + _row_offset(row, T_view, grad_stride_b, grad_stride_t)
    cols = tl.arange(0, BLOCK_V)

    y = tl.load(ids_ptr + row).to(tl.int64)
    m = tl.load(max_ptr + row)
    log_s = tl.load(logsum_ptr + row)
    g = tl.load(g_logp_ptr + row) * inv_temp
    if WITH_ENTROPY_GRAD:
        h = tl.load(g_entropy_ptr + row) * inv_temp
        entropy = tl.load(entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) * inv_temp
        log_p = (x - m) - log_s
        p = tl.exp(log_p)
        dz = (tl.where(idx == y, 1.0, 0.0) - p) * g
        if WITH_ENTROPY_GRAD:
            dz -= tl.where(p > 0, h * p * (log_p + entropy), 0.0)
        # In place, this overwrites the chunk just read: each element is read
        # and written by this program only, read first.
        tl.store(grad_base + idx, dz.to(grad_ptr.dtype.element_ty), mask=mask)


def selective_log_softmax_fwd(
    logits, token_ids, logp, row_max, log_sum, entropy, temperature, with_entropy
):
    """Launch the forward kernel over every row of a [B, T_view, V] view.

    ``logits`` is a 3D view (last dim contiguous); ``token_ids``, ``logp``,
    ``row_max`` (M), ``log_sum`` (S) and ``entropy`` are contiguous with
    B * T_view elements (``entropy`` is not written when ``with_entropy`` is False).
    """
    n_rows = logits.shape[0] * logits.shape[1]
    V = logits.shape[2]
    block, num_warps = launch_config(V)
    _selective_log_softmax_fwd_kernel[(n_rows,)](
        logits,
        token_ids,
        logp,
        row_max,
        log_sum,
        entropy if with_entropy else logp,
        logits.shape[1],
        logits.stride(0),
        logits.stride(1),
        V,
        1.0 / temperature,
        BLOCK_V=block,
        WITH_ENTROPY=with_entropy,
        num_warps=num_warps,
    )


def selective_log_softmax_bwd(
    logits, grad, token_ids, row_max, log_sum, entropy, g_logp, g_entropy, temperature
):
    """Launch the backward kernel: write dz into ``grad`` (may alias ``logits``).

    ``logits`` and ``grad`` are [B, T_view, V] views; ``g_entropy`` is None when
    the entropy received no gradient.
    """
    n_rows = logits.shape[0] * logits.shape[1]
    V = logits.shape[2]
    block, num_warps = launch_config(V)
    with_entropy_grad = g_entropy is not None
    _selective_log_softmax_bwd_kernel[(n_rows,)](
        logits,
        grad,
        token_ids,
        row_max,
        log_sum,
        entropy if with_entropy_grad else log_sum,
        g_logp,
        g_entropy if with_entropy_grad else g_logp,
        logits.shape[1],
        logits.stride(0),
        logits.stride(1),
        grad.stride(0),
        grad.stride(1),
        V,
        1.0 / temperature,
        BLOCK_V=block,
        WITH_ENTROPY_GRAD=with_entropy_grad,
        num_warps=num_warps,
    )
