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

The loss family (docs/loss_family.md) is the same kernel with FAMILY on: the
surrogate (clip with optional delta and dual clip, cispo, sapo), the KL estimator,
the bias-corrected KL and the token weights are constexpr switches of
``family_token_loss``, which the logits kernel shares; hyperparameters (delta,
dual_clip, tau) are runtime arguments. Sequence ratios (GSPO) add a first walk over
the row: s_i = exp(mean of logp - old), and every token's gradient gets the row's
sum of d loss / d log s divided by n_i. FAMILY off compiles today's paper loss.
"""

from typing import NamedTuple

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


# Kernel switches of the loss family (docs/loss_family.md), as tl.constexpr codes.
LOSS_TYPE_CODES = {"clip": 0, "cispo": 1, "sapo": 2}
KL_ESTIMATOR_CODES = {"k3": 0, "k1": 1, "k2": 2, "low_var_kl": 3}
# token_weights: none, one per row [B], one per token [B, T].
NO_WEIGHTS, ROW_WEIGHTS, TOKEN_WEIGHTS = 0, 1, 2


@triton.jit
def kl_token_terms(logp, ref, KL_ESTIMATOR: tl.constexpr):
    """(KL estimate, its derivative in logp) per token, d = ref - logp: k3, k1 = -d,
    k2 = d^2 / 2, or low_var_kl = k3 of d clamped to [-20, 20], clamped to 10."""
    d = ref - logp
    if KL_ESTIMATOR == 0:
        kl = k3_kl(d)
        dkl = -(d + kl)  # 1 - exp(d), without cancellation near d = 0
    elif KL_ESTIMATOR == 1:
        kl = -d
        dkl = tl.full(d.shape, 1.0, tl.float32)
    elif KL_ESTIMATOR == 2:
        kl = 0.5 * d * d
        dkl = -d
    else:
        clamped = tl.minimum(tl.maximum(d, -20.0), 20.0)
        k3 = k3_kl(clamped)
        kl = tl.minimum(k3, 10.0)
        dkl = tl.where((tl.abs(d) <= 20.0) & (k3 <= 10.0), -(clamped + k3), 0.0)
    return kl, dkl


@triton.jit
def policy_token_terms(
    ratio,
    adv,
    logp,
    eps_low,
    eps_high,
    delta,
    dual_clip,
    tau_pos,
    tau_neg,
    LOSS_TYPE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL: tl.constexpr,
):
    """Policy term of LOSS_TYPE per token (float32): (term, its derivative in the
    log-ratio, its derivative in logp itself, low-, high- and dual-clipped flags).
    ``ratio`` is the token's or its sequence's ratio, ``adv`` the row's advantage."""
    adv = adv + tl.zeros(ratio.shape, tl.float32)
    direct = tl.zeros(ratio.shape, tl.float32)
    never = direct != 0.0
    dual = never
    if LOSS_TYPE == 0:
        unclipped = ratio
        if HAS_DELTA:
            unclipped = tl.minimum(ratio, delta)
        unclipped_adv = unclipped * adv
        clipped_adv = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
        # The clip (or delta's cap) removes the gradient where it lowers the surrogate.
        frozen = unclipped_adv > clipped_adv
        if HAS_DELTA:
            frozen = frozen | (ratio > delta)
        term = -tl.minimum(unclipped_adv, clipped_adv)
        d_log_ratio = tl.where(frozen, 0.0, -ratio * adv)
        low = (adv < 0) & (ratio < 1.0 - eps_low)
        high = (adv > 0) & (ratio > 1.0 + eps_high)
        if HAS_DUAL:
            cap = -dual_clip * adv
            dual = (adv < 0) & (term > cap)
            term = tl.where(dual, cap, term)
            d_log_ratio = tl.where(dual, 0.0, d_log_ratio)
    elif LOSS_TYPE == 1:
        # CISPO: the capped ratio is a constant weight of logp (eps_high is the cap).
        direct = -tl.minimum(ratio, eps_high) * adv
        term = direct * logp
        d_log_ratio = tl.zeros(ratio.shape, tl.float32)
        low = never
        high = (adv > 0) & (ratio > eps_high)
    else:
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        term = -gate * (4.0 / tau) * adv
        # d term / d ratio = -4 A gate (1 - gate); times the ratio for the log-ratio.
        d_log_ratio = -4.0 * adv * gate * (1.0 - gate) * ratio
        low = never
        high = never
    return term, d_log_ratio, direct, low, high, dual


@triton.jit
def family_token_loss(
    logp,
    old,
    ref,
    adv,
    weight,
    ratio,
    eps_low,
    eps_high,
    beta,
    delta,
    dual_clip,
    tau_pos,
    tau_neg,
    HAS_REF: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    BIAS_KL: tl.constexpr,
):
    """Per-token loss of the family with the token's weight on its policy term:
    (loss, d loss / d logp through the token itself, d policy / d log-ratio before the
    weight, d (beta KL term) / d log-ratio, KL, low, high, dual flags). With token
    ratios the gradient in logp is own + weight * policy part + KL part; with sequence
    ratios the log-ratio parts are summed over the row (the caller)."""
    term, d_log_ratio, direct, low, high, dual = policy_token_terms(
        ratio,
        adv,
        logp,
        eps_low,
        eps_high,
        delta,
        dual_clip,
        tau_pos,
        tau_neg,
        LOSS_TYPE,
        HAS_DELTA,
        HAS_DUAL,
    )
    loss = weight * term
    d_own = weight * direct
    d_kl_log_ratio = tl.zeros(logp.shape, tl.float32)
    if HAS_REF:
        kl, dkl = kl_token_terms(logp, ref, KL_ESTIMATOR)
        if BIAS_KL:
            # beta kl r: its derivative in the log-ratio is itself.
            d_kl_log_ratio = beta * kl * ratio
            loss += d_kl_log_ratio
            d_own += beta * dkl * ratio
        else:
            loss += beta * kl
            d_own += beta * dkl
    else:
        kl = tl.zeros(logp.shape, tl.float32)
    return loss, d_own, d_log_ratio, d_kl_log_ratio, kl, low, high, dual


@triton.jit
def family_loss_row(
    row,
    adv,
    logp_ptr,
    old_ptr,
    ref_ptr,
    mask_ptr,
    weights_ptr,
    grad_ptr,
    partials_ptr,
    n_rows,
    n_cols,
    stride_logp_t,
    stride_old_t,
    stride_ref_t,
    stride_mask_t,
    stride_weights_t,
    eps_low,
    eps_high,
    beta,
    row_weight,
    delta,
    dual_clip,
    tau_pos,
    tau_neg,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    PER_ROW_MEAN: tl.constexpr,
    SEQUENCE: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    BIAS_KL: tl.constexpr,
    WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``policy_loss_row`` for every loss of the family, pointers at the row. With
    sequence ratios a first walk over the row reduces what every token's gradient
    needs (mean log-ratio, masked weight sum, KL sum for the bias correction), the
    second walk writes the gradient: d loss / d logp_t = own_t + (sum over the row of
    d loss / d log s) / n. Partials [7, B]: weighted loss, KL sum, clipped, tokens,
    low-clipped, dual-clipped counts, ratio sum."""
    row_w = 1.0
    if WEIGHTS == 1:
        row_w = tl.load(weights_ptr).to(tl.float32)
    if SEQUENCE:
        acc_n = tl.zeros([BLOCK_T], tl.float32)
        acc_log_ratio = tl.zeros([BLOCK_T], tl.float32)
        acc_w = tl.zeros([BLOCK_T], tl.float32)
        acc_kl = tl.zeros([BLOCK_T], tl.float32)
        for t0 in range(0, n_cols, BLOCK_T):
            cols = t0 + tl.arange(0, BLOCK_T)
            valid = cols < n_cols
            m = tl.load(mask_ptr + cols * stride_mask_t, mask=valid, other=0).to(tl.float32)
            on = m != 0
            acc_n += m
            logp = tl.load(logp_ptr + cols * stride_logp_t, mask=valid, other=0.0).to(tl.float32)
            if HAS_OLD:
                old = tl.load(old_ptr + cols * stride_old_t, mask=valid, other=0.0)
                acc_log_ratio += tl.where(on, logp - old.to(tl.float32), 0.0)
            if WEIGHTS == 2:
                w = tl.load(weights_ptr + cols * stride_weights_t, mask=valid, other=0.0)
                acc_w += tl.where(on, w.to(tl.float32), 0.0)
            if HAS_REF and BIAS_KL:
                ref = tl.load(ref_ptr + cols * stride_ref_t, mask=valid, other=0.0)
                kl, _ = kl_token_terms(logp, ref.to(tl.float32), KL_ESTIMATOR)
                acc_kl += tl.where(on, kl, 0.0)
        n_tokens = tl.sum(acc_n, axis=0)
        inv_n = 1.0 / tl.maximum(n_tokens, 1.0)
        row_log_ratio = tl.sum(acc_log_ratio, axis=0) * inv_n
        seq_ratio = tl.exp(row_log_ratio)
        if WEIGHTS == 2:
            weight_sum = tl.sum(acc_w, axis=0)
        else:
            weight_sum = row_w * n_tokens
        kl_sum = tl.sum(acc_kl, axis=0)
    elif PER_ROW_MEAN:
        n_tokens = masked_token_count(mask_ptr, stride_mask_t, n_cols, BLOCK_T)
    if PER_ROW_MEAN:
        # An all-masked row contributes zero, not 0 / 0.
        scale = tl.where(n_tokens > 0, row_weight / tl.maximum(n_tokens, 1.0), 0.0)
    else:
        scale = row_weight
    acc_loss = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_clipped = tl.zeros([BLOCK_T], tl.float32)
    acc_tokens = tl.zeros([BLOCK_T], tl.float32)
    acc_low = tl.zeros([BLOCK_T], tl.float32)
    acc_dual = tl.zeros([BLOCK_T], tl.float32)
    acc_ratio = tl.zeros([BLOCK_T], tl.float32)
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
        w = row_w + tl.zeros([BLOCK_T], tl.float32)
        if WEIGHTS == 2:
            w = tl.load(weights_ptr + cols * stride_weights_t, mask=valid, other=0.0)
            w = w.to(tl.float32)
        if SEQUENCE:
            ratio = seq_ratio + tl.zeros([BLOCK_T], tl.float32)
        elif HAS_OLD:
            ratio = tl.exp(logp - old)
        else:
            ratio = tl.full([BLOCK_T], 1.0, tl.float32)
        loss, d_own, d_policy, d_kl, kl, low, high, dual = family_token_loss(
            logp,
            old,
            ref,
            adv,
            w,
            ratio,
            eps_low,
            eps_high,
            beta,
            delta,
            dual_clip,
            tau_pos,
            tau_neg,
            HAS_REF,
            LOSS_TYPE,
            HAS_DELTA,
            HAS_DUAL,
            KL_ESTIMATOR,
            BIAS_KL,
        )
        if SEQUENCE:
            # d policy / d log s is the same for every token of the row.
            row_part = d_policy * weight_sum
            if HAS_REF and BIAS_KL:
                row_part += beta * seq_ratio * kl_sum
            grad = d_own + row_part * inv_n
        else:
            grad = d_own + w * d_policy + d_kl
        # tl.where, not a product: padding may hold -inf or NaN log-probs.
        on = m != 0
        tl.store(grad_ptr + cols, tl.where(on, grad * m * scale, 0.0), mask=valid)
        acc_loss += tl.where(on, loss * m, 0.0)
        acc_kl += tl.where(on, kl * m, 0.0)
        acc_clipped += tl.where(on & (low | high), m, 0.0)
        acc_tokens += m
        acc_low += tl.where(on & low, m, 0.0)
        acc_dual += tl.where(on & dual, m, 0.0)
        acc_ratio += tl.where(on, ratio * m, 0.0)
    tl.store(partials_ptr + 0 * n_rows + row, tl.sum(acc_loss, axis=0) * scale)
    tl.store(partials_ptr + 1 * n_rows + row, tl.sum(acc_kl, axis=0))
    tl.store(partials_ptr + 2 * n_rows + row, tl.sum(acc_clipped, axis=0))
    tl.store(partials_ptr + 3 * n_rows + row, tl.sum(acc_tokens, axis=0))
    tl.store(partials_ptr + 4 * n_rows + row, tl.sum(acc_low, axis=0))
    tl.store(partials_ptr + 5 * n_rows + row, tl.sum(acc_dual, axis=0))
    tl.store(partials_ptr + 6 * n_rows + row, tl.sum(acc_ratio, axis=0))


@triton.jit
def _policy_loss_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    weights_ptr,
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
    stride_weights_b,
    stride_weights_t,
    eps_low,
    eps_high,
    beta,
    row_weight,
    delta,
    dual_clip,
    tau_pos,
    tau_neg,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    PER_ROW_MEAN: tl.constexpr,
    FAMILY: tl.constexpr,
    SEQUENCE: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    BIAS_KL: tl.constexpr,
    WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    if FAMILY:
        family_loss_row(
            row,
            adv,
            logp_ptr + row * stride_logp_b,
            old_ptr + row * stride_old_b,
            ref_ptr + row * stride_ref_b,
            mask_ptr + row * stride_mask_b,
            weights_ptr + row * stride_weights_b,
            grad_ptr + row * n_cols,
            partials_ptr,
            n_rows,
            n_cols,
            stride_logp_t,
            stride_old_t,
            stride_ref_t,
            stride_mask_t,
            stride_weights_t,
            eps_low,
            eps_high,
            beta,
            row_weight,
            delta,
            dual_clip,
            tau_pos,
            tau_neg,
            HAS_OLD,
            HAS_REF,
            PER_ROW_MEAN,
            SEQUENCE,
            LOSS_TYPE,
            HAS_DELTA,
            HAS_DUAL,
            KL_ESTIMATOR,
            BIAS_KL,
            WEIGHTS,
            BLOCK_T,
        )
        return
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


class FamilySwitches(NamedTuple):
    """A loss of the family as kernel arguments: the constexpr switches and the
    runtime hyperparameters (delta, dual_clip, tau_pos, tau_neg)."""

    constexprs: dict
    runtime: tuple[float, float, float, float]


def family_switches(
    ratio_level: str,
    loss_type: str,
    tau_pos: float,
    tau_neg: float,
    delta: float | None,
    dual_clip: float | None,
    kl_estimator: str,
    bias_correction_kl: bool,
) -> FamilySwitches:
    """Kernel arguments of a validated family member (the fields of
    ``krpo_fast._validation.LossFamily``, in order)."""
    return FamilySwitches(
        {
            "SEQUENCE": ratio_level == "sequence",
            "LOSS_TYPE": LOSS_TYPE_CODES[loss_type],
            "HAS_DELTA": delta is not None,
            "HAS_DUAL": dual_clip is not None,
            "KL_ESTIMATOR": KL_ESTIMATOR_CODES[kl_estimator],
            "BIAS_KL": bias_correction_kl,
        },
        (
            0.0 if delta is None else delta,
            0.0 if dual_clip is None else dual_clip,
            tau_pos,
            tau_neg,
        ),
    )


# Unused by the paper's loss (FAMILY False): any valid values.
_PAPER_SWITCHES = family_switches("token", "clip", 1.0, 1.0, None, None, "k3", False)


def family_launch_args(
    family: FamilySwitches | None, token_weights: torch.Tensor | None, like: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int], FamilySwitches]:
    """(weights pointer, its (row, token) strides, switches with FAMILY and WEIGHTS) for
    the token kernels; unused pointers point at ``like``."""
    switches = _PAPER_SWITCHES if family is None else family
    if token_weights is None:
        code, weights, strides = NO_WEIGHTS, like, (0, 0)
    elif token_weights.dim() == 1:
        code, weights, strides = ROW_WEIGHTS, token_weights, (token_weights.stride(0), 0)
    else:
        code, weights = TOKEN_WEIGHTS, token_weights
        strides = (token_weights.stride(0), token_weights.stride(1))
    constexprs = {**switches.constexprs, "FAMILY": family is not None, "WEIGHTS": code}
    return weights, strides, FamilySwitches(constexprs, switches.runtime)


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
    family: FamilySwitches | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; returns (weighted gradient [B, T] in logp's dtype, partials
    [4, B], or [7, B] with ``family``: see ``family_loss_row``).

    ``family`` None is the paper's loss (the kernel compiled without the family's
    code). Inputs are validated by the caller; ``mask`` must not be bool (pass a
    uint8 view); ``token_weights`` is [B] or [B, T].
    """
    n_rows, n_cols = logp.shape
    grad = torch.empty((n_rows, n_cols), dtype=logp.dtype, device=logp.device)
    partials = torch.empty(
        (4 if family is None else 7, n_rows), dtype=torch.float32, device=logp.device
    )
    if n_rows == 0:
        return grad, partials
    has_old = old_logp is not None
    has_ref = beta != 0.0
    old = old_logp if has_old else logp
    ref = ref_logp if has_ref else logp
    weights, weights_strides, switches = family_launch_args(family, token_weights, logp)
    _policy_loss_kernel[(n_rows,)](
        logp,
        old,
        ref,
        advantages,
        mask,
        weights,
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
        *weights_strides,
        eps_low,
        eps_high,
        beta,
        row_weight,
        *switches.runtime,
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        PER_ROW_MEAN=per_row_mean,
        **switches.constexprs,
        BLOCK_T=block_t_for(n_cols),
    )
    return grad, partials
