"""The fused KRPO loss: group advantages and the clipped policy-gradient loss in one launch.

One program per sequence i. It finds its group (uniform: i // G; ragged: a binary
search over the int32 offsets), computes its own advantage A_i from the group's
rewards (the Kalman filter runs over the group prefix r_1..r_k up to its own
position k; the GRPO modes reduce the whole group), writes A_i, and then runs the
policy loss over its tokens exactly as ``policy_loss.py`` does:

    Kalman:  P- = P + Q;  K = P- / (P- + R);  x = x + K (r - x);  P = (1 - K) P-
             A_k = (r_k - x_k) / (sqrt(P_k) + eps)
    loss_t = -min(ratio_t A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_i) + beta kl_t

Recomputing the group's filter per sequence costs O(G) scalar work per row,
nothing beside its T tokens, and keeps one program per row (full occupancy).
``batch_std`` needs the std over all rewards: the caller passes it precomputed.

Shapes: rewards [B]; offsets [n_groups + 1] int32 (ragged); logp, old, ref, mask
[B, T]; outputs: advantages [B] float32, gradient [B, T], partials [4, B].
"""

import torch
import triton
import triton.language as tl

from krpo_fast.kernels.group_advantages import MODES, kalman_predict_update
from krpo_fast.kernels.policy_loss import (
    FamilySwitches,
    block_t_for,
    family_launch_args,
    family_loss_row,
    policy_loss_row,
)


@triton.jit
def find_group(offsets_ptr, row, n_groups, N_SEARCH_STEPS: tl.constexpr):
    """Largest g with offsets[g] <= row: the group that holds ``row`` (empty groups skipped)."""
    lo = row * 0
    hi = lo + n_groups - 1
    for _ in tl.static_range(N_SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        go_right = tl.load(offsets_ptr + mid) <= row
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo


@triton.jit
def row_advantage(
    rewards_ptr,
    start,
    length,
    pos,
    batch_std_ptr,
    process_var,
    meas_var,
    init_mean,
    init_var,
    eps,
    MODE: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Advantage of the reward at ``start + pos`` within its group of ``length``."""
    own = tl.load(rewards_ptr + start + pos).to(tl.float32)
    if MODE == 0:
        x = init_mean + 0.0 * own
        p = init_var + 0.0 * own
        innovation = 0.0 * own
        keep = 0.0 * own
        for k in range(0, pos + 1):
            r = tl.load(rewards_ptr + start + k).to(tl.float32)
            gain, keep, p = kalman_predict_update(p, process_var, meas_var)
            innovation = r - x
            x = x + gain * innovation
        # Innovation form of (r_k - x_k) / (sqrt(P_k) + eps): see kalman_predict_update.
        return keep * innovation / (tl.sqrt(p) + eps)
    else:
        offs = tl.arange(0, BLOCK_G)
        # Deviations from the group's first reward (see group_advantages.py): equal
        # rewards get advantage 0 exactly.
        first = tl.load(rewards_ptr + start).to(tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        for k0 in range(0, length, BLOCK_G):
            valid = k0 + offs < length
            r = tl.load(rewards_ptr + start + k0 + offs, mask=valid, other=0.0)
            total += tl.where(valid, r.to(tl.float32) - first, 0.0)
        mean = first + tl.sum(total, axis=0) / length
        if MODE == 1:
            sq = tl.zeros([BLOCK_G], tl.float32)
            for k0 in range(0, length, BLOCK_G):
                valid = k0 + offs < length
                r = tl.load(rewards_ptr + start + k0 + offs, mask=valid, other=0.0)
                d = r.to(tl.float32) - mean
                sq += tl.where(valid, d * d, 0.0)
            std = tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(length - 1, 1))
            # A group of one has no spread, nor one of equal rewards with eps = 0:
            # advantage 0 rather than 0 / 0.
            return tl.where((length > 1) & (std + eps > 0), (own - mean) / (std + eps), 0.0)
        elif MODE == 2:
            return own - mean
        else:
            spread = tl.load(batch_std_ptr) + eps
            return tl.where(spread > 0, (own - mean) / spread, 0.0)


@triton.jit
def _krpo_loss_kernel(
    rewards_ptr,
    offsets_ptr,
    batch_std_ptr,
    adv_out_ptr,
    logp_ptr,
    old_ptr,
    ref_ptr,
    mask_ptr,
    weights_ptr,
    grad_ptr,
    partials_ptr,
    n_rows,
    n_cols,
    n_groups,
    group_size,
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
    process_var,
    meas_var,
    init_mean,
    init_var,
    eps,
    eps_low,
    eps_high,
    beta,
    row_weight,
    delta,
    dual_clip,
    tau_pos,
    tau_neg,
    MODE: tl.constexpr,
    RAGGED: tl.constexpr,
    N_SEARCH_STEPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
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
    if RAGGED:
        group = find_group(offsets_ptr, row, n_groups, N_SEARCH_STEPS)
        start = tl.load(offsets_ptr + group)
        length = tl.load(offsets_ptr + group + 1) - start
    else:
        start = (row // group_size) * group_size
        length = group_size
    adv = row_advantage(
        rewards_ptr,
        start,
        length,
        row - start,
        batch_std_ptr,
        process_var,
        meas_var,
        init_mean,
        init_var,
        eps,
        MODE,
        BLOCK_G,
    )
    tl.store(adv_out_ptr + row, adv)
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


def krpo_loss_triton(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int | None,
    group_offsets: torch.Tensor | None,
    mode: str,
    kalman: tuple[float, float, float, float],
    eps: float,
    eps_low: float,
    eps_high: float,
    beta: float,
    row_weight: float,
    per_row_mean: bool,
    max_group_len: int,
    family: FamilySwitches | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel; returns (advantages [B] float32, gradient [B, T], partials
    [4, B], or [7, B] with ``family``, as ``policy_loss_triton``).

    ``kalman`` is (process_var, meas_var, init_mean, init_var); ``max_group_len`` sizes
    the GRPO modes' reduction block. Inputs are validated by the caller; ``mask``
    must not be bool (pass a uint8 view).
    """
    n_rows, n_cols = logp.shape
    device = logp.device
    advantages = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = torch.empty((n_rows, n_cols), dtype=logp.dtype, device=device)
    partials = torch.empty((4 if family is None else 7, n_rows), dtype=torch.float32, device=device)
    if n_rows == 0:
        return advantages, grad, partials
    ragged = group_offsets is not None
    n_groups = group_offsets.numel() - 1 if ragged else n_rows // group_size
    if mode == "batch_std":
        # Deviations from the first reward: equal rewards give a std of exactly 0.
        shifted = rewards.float() - rewards[0].float()
        batch_std = shifted.std() if n_rows > 1 else shifted.new_zeros(())
    else:
        batch_std = advantages  # unused pointer
    has_old = old_logp is not None
    has_ref = beta != 0.0
    old = old_logp if has_old else logp
    ref = ref_logp if has_ref else logp
    process_var, meas_var, init_mean, init_var = kalman
    weights, weights_strides, switches = family_launch_args(family, token_weights, logp)
    _krpo_loss_kernel[(n_rows,)](
        rewards,
        group_offsets if ragged else rewards,  # unused pointer when uniform
        batch_std,
        advantages,
        logp,
        old,
        ref,
        mask,
        weights,
        grad,
        partials,
        n_rows,
        n_cols,
        n_groups,
        0 if ragged else group_size,
        logp.stride(0),
        logp.stride(1),
        old.stride(0),
        old.stride(1),
        ref.stride(0),
        ref.stride(1),
        mask.stride(0),
        mask.stride(1),
        *weights_strides,
        process_var,
        meas_var,
        init_mean,
        init_var,
        eps,
        eps_low,
        eps_high,
        beta,
        row_weight,
        *switches.runtime,
        MODE=MODES[mode],
        RAGGED=ragged,
        N_SEARCH_STEPS=max(1, (n_groups - 1).bit_length()),
        BLOCK_G=min(1024, triton.next_power_of_2(max(max_group_len, 1))),
        HAS_OLD=has_old,
        HAS_REF=has_ref,
        PER_ROW_MEAN=per_row_mean,
        **switches.constexprs,
        BLOCK_T=block_t_for(n_cols),
    )
    return advantages, grad, partials
