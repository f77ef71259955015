"""Clipped policy-gradient loss over token log-probs, with its gradient, in one pass.

Per token t of sequence i (mask m, one advantage A_i per sequence):
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (k3, series near 0; skipped if beta = 0)
    ratio_t = exp(logp_t - old_t)                                         (1 when on-policy)
    loss_t  = -min(ratio_t A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_i) + beta kl_t
    dloss_t/dlogp_t = -A_i ratio_t [not clipped] + beta (1 - exp(ref_t - logp_t))
where "clipped" is (A > 0 and ratio > 1 + eps_high) or (A < 0 and ratio < 1 - eps_low),
the tokens whose surrogate gradient the clip removes.

The aggregation weights each masked token by ``row_weight`` (and, for
"seq-mean-token-mean", by 1 / the row's masked-token count); the kernel writes
the weighted gradient [B, T] in the log-probs' dtype, so the backward is one
scale. Per-row partial sums [4, B] (weighted loss, KL sum, clipped count, token
count) are reduced by the caller, in a fixed order, so results are deterministic.

Shapes: logp, old, ref, mask [B, T] (any strides); advantages [B].
One program per sequence, walking its tokens in BLOCK_T chunks.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def k3_kl(log_ratio):
    """exp(d) - d - 1 for d = ref - logp, accurate in float32 near d = 0.

    Evaluated directly, the three terms cancel to d^2 / 2 and lose about 1e-7 / d^2
    relative; below |d| = 0.5 the Taylor series to d^8 is used (truncation < 1e-7).
    """
    d = log_ratio
    series = (
        d
        * d
        * (
            0.5
            + d
            * (1 / 6 + d * (1 / 24 + d * (1 / 120 + d * (1 / 720 + d * (1 / 5040 + d / 40320)))))
        )
    )
    return tl.where(tl.abs(d) < 0.5, series, tl.exp(d) - d - 1.0)


@triton.jit
def clipped_token_loss(
    logp, old, ref, adv, eps_low, eps_high, beta, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr
):
    """Per-token loss, its derivative in logp, k3 KL and the clipped flag (float32)."""
    adv = adv + tl.zeros(logp.shape, tl.float32)  # the row's scalar advantage, per token
    if HAS_OLD:
        ratio = tl.exp(logp - old)
    else:
        ratio = tl.full(logp.shape, 1.0, tl.float32)
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    surrogate = tl.minimum(ratio * adv, clipped_ratio * adv)
    clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    grad = tl.where(clipped, 0.0, -adv * ratio)
    if HAS_REF:
        log_ratio_ref = ref - logp
        kl = k3_kl(log_ratio_ref)
        loss = beta * kl - surrogate
        # d kl / d logp = 1 - exp(d) = -(d + kl), without cancellation near d = 0.
        grad -= beta * (log_ratio_ref + kl)
    else:
        kl = tl.zeros(logp.shape, tl.float32)
        loss = -surrogate
    return loss, grad, kl, clipped


@triton.jit
def masked_token_count(mask_ptr, stride_mask_t, n_cols, BLOCK_T: tl.constexpr):
    """Sum of one row's mask (float32)."""
    count = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, n_cols, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        count += tl.load(mask_ptr + cols * stride_mask_t, mask=cols < n_cols, other=0).to(
            tl.float32
        )
    return tl.sum(count, axis=0)


@triton.jit
def policy_loss_row(
    row,
    adv,
    logp_ptr,
    old_ptr,
    ref_ptr,
    mask_ptr,
    grad_ptr,
    partials_ptr,
    n_rows,
    n_cols,
    stride_logp_t,
    stride_old_t,
    stride_ref_t,
    stride_mask_t,
    eps_low,
    eps_high,
    beta,
    row_weight,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    PER_ROW_MEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Loss, gradient and partial sums of one sequence, pointers already at its row."""
    if PER_ROW_MEAN:
        n_tokens = masked_token_count(mask_ptr, stride_mask_t, n_cols, BLOCK_T)
        # An all-masked row contributes zero, not 0 / 0.
        scale = tl.where(n_tokens > 0, row_weight / tl.maximum(n_tokens, 1.0), 0.0)
    else:
        scale = row_weight
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_clipped = tl.zeros([BLOCK_T], tl.float32)
    acc_tokens = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, n_cols, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        valid = cols < n_cols
        m = tl.load(mask_ptr + cols * stride_mask_t, mask=valid, other=0).to(tl.float32)
        logp = tl.load(logp_ptr + cols * stride_logp_t, mask=valid, other=0.0).to(tl.float32)
        old = logp
        ref = logp
        if HAS_OLD:
            old = tl.load(old_ptr + cols * stride_old_t, mask=valid, other=0.0).to(tl.float32)
        if HAS_REF:
            ref = tl.load(ref_ptr + cols * stride_ref_t, mask=valid, other=0.0).to(tl.float32)
        loss, grad, kl, clipped = clipped_token_loss(
            logp, old, ref, adv, eps_low, eps_high, beta, HAS_OLD, HAS_REF
        )
        # tl.where, not a product: padding may hold -inf or NaN log-probs.
        on = m != 0
        tl.store(grad_ptr + cols, tl.where(on, grad * m * scale, 0.0), mask=valid)
        acc_loss += tl.where(on, loss * m, 0.0)
        acc_kl += tl.where(on, kl * m, 0.0)
        acc_clipped += tl.where(on & clipped, m, 0.0)
        acc_tokens += m
    tl.store(partials_ptr + 0 * n_rows + row, tl.sum(acc_loss, axis=0) * scale)
    tl.store(partials_ptr + 1 * n_rows + row, tl.sum(acc_kl, axis=0))
    tl.store(partials_ptr + 2 * n_rows + row, tl.sum(acc_clipped, axis=0))
    tl.store(partials_ptr + 3 * n_rows + row, tl.sum(acc_tokens, axis=0))


@triton.jit
def _policy_loss_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    grad_ptr,
    partials_ptr,
    n_rows,
    n_cols,
    stride_logp_b,
    stride_logp_t,
    stride_old_b,
    stride_old_t,
    stride_ref_b,
    stride_ref_t,
    stride_mask_b,
    stride_mask_t,
    eps_low,
    eps_high,
    beta,
    row_weight,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    PER_ROW_MEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    policy_loss_row(
        row,
        adv,
        logp_ptr + row * stride_logp_b,
        old_ptr + row * stride_old_b,
        ref_ptr + row * stride_ref_b,
        mask_ptr + row * stride_mask_b,
        grad_ptr + row * n_cols,
        partials_ptr,
        n_rows,
        n_cols,
        stride_logp_t,
        stride_old_t,
        stride_ref_t,
        stride_mask_t,
        eps_low,
        eps_high,
        beta,
        row_weight,
        HAS_OLD,
        HAS_REF,
        PER_ROW_MEAN,
        BLOCK_T,
    )


def block_t_for(n_cols: int) -> int:
    """Token chunk per loop iteration: the whole row up to 2048 tokens."""
    return min(2048, max(16, triton.next_power_of_2(n_cols)))


def policy_loss_triton(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    row_weight: float,
    per_row_mean: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; returns (weighted gradient [B, T] in logp's dtype, partials [4, B]).

    Inputs are validated by the caller; ``mask`` must not be bool (pass a uint8 view).
    """
    n_rows, n_cols = logp.shape
    grad = torch.empty((n_rows, n_cols), dtype=logp.dtype, device=logp.device)
    partials = torch.empty((4, n_rows), dtype=torch.float32, device=logp.device)
    if n_rows == 0:
        return grad, partials
    has_old = old_logp is not None
    has_ref = beta != 0.0
    old = old_logp if has_old else logp
    ref = ref_logp if has_ref else logp
    _policy_loss_kernel[(n_rows,)](
        logp,
        old,
        ref,
        advantages,
        mask,
        grad,
        partials,
        n_rows,
        n_cols,
        logp.stride(0),
        logp.stride(1),
        old.stride(0),
        old.stride(1),
        ref.stride(0),
        ref.stride(1),
        mask.stride(0),
        mask.stride(1),
        eps_low,
        eps_high,
        beta,
        row_weight,
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        PER_ROW_MEAN=per_row_mean,
        BLOCK_T=block_t_for(n_cols),
    )
    return grad, partials
