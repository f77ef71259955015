"""Fused policy loss from logits (clipped surrogate + k3 KL, or the family), with its gradient.

One program per token row r (global token index g = row_start + r, sequence
i = g // T, temperature T_temp, x = z / T_temp):

    pass 1 (read the logits once):   M = max x,  S = log sum_v exp(x_v - M)   (online)
                                     logp = (x_y - M) - S
    per token (A = adv[i], w = mask[g] * seq_weight[i], the aggregation weight), the
    same per-token math as policy_loss.py (``clipped_token_loss``):
        ratio  = exp(logp - old[g])                         (1 when HAS_OLD is False)
        d      = ref[g] - logp ;  kl = exp(d) - d - 1       (0 when HAS_KL is False)
        loss   = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta kl
        clipped = (A > 0 and ratio > 1 + eps_high) or (A < 0 and ratio < 1 - eps_low)
        g_t    = w * ( -A ratio [not clipped] + beta (1 - exp(d)) )   = d(sum w loss)/d logp
    pass 2 (write the gradient once): dz_v = (onehot(y)_v - exp(x_v - M - S)) g_t / T_temp

Outputs per row (float32 [rows]): w * loss, mask * kl, mask * clipped; the
caller sums them (deterministic, no atomics). dz goes to the gradient buffer in
its dtype; that buffer may be the logits themselves (in place).

Rows with mask 0 skip both passes' reads (their dz is 0): padding costs one
write, not a read and a write.

Addressing: logits and grad are [B, T_view, V] views (last dim contiguous, any
row strides), local row r at (r // T_view, r % T_view); a [rows, V] chunk is
T_view = 1. Token tensors (ids, old, ref, mask) are contiguous [B * T] and
per-sequence tensors (adv, seq_weight) contiguous [B].

FAMILY on: the token-ratio members of the loss family and token weights through
``family_token_loss`` (policy_loss.py), one extra output row each for low-clipped,
dual-clipped and mask * ratio. WITH_ENTROPY: pass 1 also accumulates
t = sum exp(x - M) (x - M), so H = S - t / exp(S) costs no extra read; the entropy
bonus -coef * mean H adds -h p (log p + H) to pass 2's dz, h = -coef mask / (masked
tokens) / T_temp. Sequence ratios need all log-probs of a row before any gradient:
the ops compose them from the log-softmax kernels and the token kernel instead.
"""

import triton
import triton.language as tl

from krpo_fast.kernels.policy_loss import (
    _PAPER_SWITCHES,
    FamilySwitches,
    clipped_token_loss,
    family_token_loss,
)
from krpo_fast.kernels.selective_log_softmax import _row_offset, launch_config


@triton.jit
def _logits_loss_kernel(
    logits_ptr,
    grad_ptr,
    ids_ptr,
    old_ptr,
    ref_ptr,
    mask_ptr,
    adv_ptr,
    seq_weight_ptr,
    loss_ptr,
    kl_ptr,
    clip_ptr,
    weights_ptr,
    extra_ptr,
    extra_stride,
    row_start,
    seq_len,
    T_view,
    stride_b,
    stride_t,
    grad_stride_b,
    grad_stride_t,
    V,
    inv_temp,
    eps_low,
    eps_high,
    beta,
    delta,
    dual_clip,
    tau_pos,
    tau_neg,
    entropy_weight_ptr,
    BLOCK_V: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    FAMILY: tl.constexpr,
    SEQUENCE: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    BIAS_KL: tl.constexpr,
    WEIGHTS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0)
    tok = row_start + row
    seq = tok // seq_len
    base = logits_ptr + _row_offset(row, T_view, stride_b, stride_t)
    grad_base = grad_ptr + _row_offset(row, T_view, grad_stride_b, grad_stride_t)
    cols = tl.arange(0, BLOCK_V)

    m_tok = tl.load(mask_ptr + tok)
    active = m_tok != 0
    # Loads are bounded by n_read: 0 for masked rows, which then read nothing.
    n_read = tl.where(active, V, 0)

    # Pass 1: online log-sum-exp (masked rows load nothing).
    m = -float("inf")
    s = 0.0
    # With the entropy, t = sum exp(x - m) (x - m) beside s: H = log s - t / s (as in
    # selective_log_softmax.py, no cancellation between lse and E[x]).
    t = 0.0
    for start in range(0, V, BLOCK_V):
        ld_mask = start + cols < n_read
        x = tl.load(base + start + cols, mask=ld_mask, other=-float("inf")).to(tl.float32)
        x = x * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        if WITH_ENTROPY:
            rescale = tl.exp(m - m_new)
            e = tl.exp(x - m_new)
            t = tl.where(s > 0, rescale * (t + (m - m_new) * s), 0.0)
            t += tl.sum(tl.where(e > 0, e * (x - m_new), 0.0), axis=0)
            s = s * rescale + tl.sum(e, axis=0)
        else:
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # Masked rows: m = -inf, s = 0; both are set to 0 so nothing below turns NaN.
    m = tl.where(active, m, 0.0)
    log_s = tl.where(active, tl.log(s), 0.0)
    if WITH_ENTROPY:
        entropy = tl.where(active, log_s - t / tl.where(active, s, 1.0), 0.0)
        entropy_weight = tl.load(entropy_weight_ptr)

    y = tl.load(ids_ptr + tok).to(tl.int64)
    x_y = tl.load(base + y, mask=active, other=0.0).to(tl.float32) * inv_temp
    logp = (x_y - m) - log_s

    adv = tl.load(adv_ptr + seq)
    w = m_tok * tl.load(seq_weight_ptr + seq)
    old = logp
    ref = logp
    if HAS_OLD:
        old = tl.load(old_ptr + tok)
    if HAS_KL:
        ref = tl.load(ref_ptr + tok)
    if FAMILY:
        # Token ratios only: sequence ratios need the whole row's log-probs first.
        token_weight = 1.0
        if WEIGHTS == 2:
            token_weight = tl.load(weights_ptr + tok).to(tl.float32)
        ratio = 1.0 + 0.0 * logp
        if HAS_OLD:
            ratio = tl.exp(logp - old)
        loss, d_own, d_policy, d_kl, kl, low, high, dual = family_token_loss(
            logp,
            old,
            ref,
            adv,
            token_weight,
            ratio,
            eps_low,
            eps_high,
            beta,
            delta,
            dual_clip,
            tau_pos,
            tau_neg,
            HAS_KL,
            LOSS_TYPE,
            HAS_DELTA,
            HAS_DUAL,
            KL_ESTIMATOR,
            BIAS_KL,
        )
        dlogp = d_own + token_weight * d_policy + d_kl
        clipped = low | high
        tl.store(extra_ptr + row, tl.where(active & low, m_tok, 0.0))
        tl.store(extra_ptr + extra_stride + row, tl.where(active & dual, m_tok, 0.0))
        tl.store(extra_ptr + 2 * extra_stride + row, tl.where(active, m_tok * ratio, 0.0))
    else:
        loss, dlogp, kl, clipped = clipped_token_loss(
            logp, old, ref, adv, eps_low, eps_high, beta, HAS_OLD, HAS_KL
        )
    if HAS_KL:
        tl.store(kl_ptr + row, tl.where(active, m_tok * kl, 0.0))
    # tl.where, not a product: a padding token's garbage old/ref must not give 0 * inf.
    row_loss = tl.where(active, w * loss, 0.0)
    if WITH_ENTROPY:
        tl.store(extra_ptr + 3 * extra_stride + row, m_tok * entropy)
        # The entropy bonus: entropy_weight = -entropy_coef / (masked tokens).
        row_loss += entropy_weight * m_tok * entropy
    tl.store(loss_ptr + row, row_loss)
    tl.store(clip_ptr + row, tl.where(active & clipped, m_tok, 0.0))

    if WRITE_GRAD:
        # Pass 2: dz = (onehot - softmax) g / T; a row's second read hits L2 on a GPU.
        g = tl.where(active, w * dlogp, 0.0) * inv_temp
        if WITH_ENTROPY:
            # dH / dx = -p (log p + H), folded into the one write of dz.
            h = entropy_weight * m_tok * inv_temp
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < n_read, other=0.0).to(tl.float32) * inv_temp
            log_p = (x - m) - log_s
            p = tl.where(active, tl.exp(log_p), 0.0)
            dz = (tl.where(idx == y, 1.0, 0.0) - p) * g
            if WITH_ENTROPY:
                dz -= tl.where(p > 0, h * p * (log_p + entropy), 0.0)
            tl.store(grad_base + idx, dz.to(grad_ptr.dtype.element_ty), mask=idx < V)


def logits_loss_fwd(
    logits,
    grad,
    token_ids,
    old_logp,
    ref_logp,
    mask,
    advantages,
    seq_weight,
    loss_rows,
    kl_rows,
    clip_rows,
    row_start,
    seq_len,
    temperature,
    eps_low,
    eps_high,
    beta,
    write_grad=True,
    family: FamilySwitches | None = None,
    token_weights=None,
    extra_rows=None,
    entropy_weight=None,
):
    """Launch over the rows of ``logits`` ([B', T_view, V] view) = tokens row_start....

    ``old_logp`` / ``ref_logp`` may be None (ratio 1 / no KL term); ``kl_rows`` is
    left untouched when ``ref_logp`` is None. ``grad`` may alias ``logits``; it is
    not written when ``write_grad`` is False. Per-token tensors are indexed by
    global token, the per-row outputs by local row.

    ``family`` (token ratios only) selects a loss of the family, with contiguous
    per-token ``token_weights`` [B * T] or None; it writes low-clipped, dual-clipped and
    mask * ratio per row into rows 0-2 of ``extra_rows`` ([4, rows] view, row stride
    free). ``entropy_weight`` (a one-element float32 tensor, or None) computes the
    entropy in pass 1, writes mask * entropy into row 3 and adds entropy_weight *
    mask * entropy to the loss, with its gradient (entropy_weight = -entropy_coef /
    masked tokens; 0 for the metric alone).
    """
    n_rows = logits.shape[0] * logits.shape[1]
    V = logits.shape[2]
    block, num_warps = launch_config(V)
    switches = _PAPER_SWITCHES if family is None else family
    if switches.constexprs["SEQUENCE"]:
        raise ValueError("the logits kernel takes token ratios only")
    with_entropy = entropy_weight is not None
    extra = loss_rows if extra_rows is None else extra_rows
    _logits_loss_kernel[(n_rows,)](
        logits,
        grad,
        token_ids,
        old_logp if old_logp is not None else mask,
        ref_logp if ref_logp is not None else mask,
        mask,
        advantages,
        seq_weight,
        loss_rows,
        kl_rows,
        clip_rows,
        token_ids if token_weights is None else token_weights,
        extra,
        0 if extra_rows is None else extra_rows.stride(0),
        row_start,
        seq_len,
        logits.shape[1],
        logits.stride(0),
        logits.stride(1),
        grad.stride(0),
        grad.stride(1),
        V,
        1.0 / temperature,
        eps_low,
        eps_high,
        beta,
        *switches.runtime,
        entropy_weight if with_entropy else loss_rows,
        BLOCK_V=block,
        HAS_OLD=old_logp is not None,
        HAS_KL=ref_logp is not None,
        WRITE_GRAD=write_grad,
        FAMILY=family is not None,
        **switches.constexprs,
        WEIGHTS=0 if token_weights is None else 2,
        WITH_ENTROPY=with_entropy,
        num_warps=num_warps,
    )
