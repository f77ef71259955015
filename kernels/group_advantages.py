"""Group-wise advantages for all groups in one launch: Kalman (KRPO) and GRPO baselines.

Rewards r[B] are laid out group after group, in rollout order; a group is either
``GROUP_SIZE`` consecutive rewards (uniform, B = n_groups * G) or the slice
``offsets[g]:offsets[g + 1]`` (ragged, int32 offsets like ``cu_seqlens``).
Math in float32 whatever the reward dtype.

Modes (``MODE`` constexpr):
    0 kalman:    x_0 = m0, P_0 = p0; for k = 1..len:
                     P- = P + Q;  K = P- / (P- + R);  x = x + K (r_k - x);  P = (1 - K) P-
                     A_k = (r_k - x) / (sqrt(P) + eps)
                 (evaluated as A_k = (1 - K)(r_k - x_{k-1}) / (sqrt(P) + eps), the same value
                 without float32 cancellation)
    1 grpo:      A = (r - mean_g) / (std_g + eps), std unbiased; a group of one gets 0
    2 dr_grpo:   A = r - mean_g
    3 batch_std: A = (r - mean_g) / (std_batch + eps), std unbiased over all B rewards

One program owns BLOCK_GROUPS groups, one lane per group, and walks the group
positions; P and K depend only on the position, so every lane shares them.
"""

import torch
import triton
import triton.language as tl

MODES = {"kalman": 0, "grpo": 1, "dr_grpo": 2, "batch_std": 3}


@triton.jit
def kalman_predict_update(p, process_var, meas_var):
    """One step of the reward-independent part of the filter: returns (K, 1 - K, P_new).

    1 - K is formed as R / (P- + R), not by subtraction: the advantage is computed
    in innovation form, r_k - x_k = (1 - K)(r_k - x_{k-1}), which avoids cancelling
    r_k against x_k in float32 when K is close to 1.
    """
    p_pred = p + process_var
    gain = p_pred / (p_pred + meas_var)
    keep = meas_var / (p_pred + meas_var)
    return gain, keep, keep * p_pred


@triton.jit
def batch_mean_std(rewards_ptr, n, BLOCK: tl.constexpr):
    """Mean and unbiased std of rewards[0:n] (two passes, float32); std 0 when n == 1."""
    offs = tl.arange(0, BLOCK)
    first = tl.load(rewards_ptr).to(tl.float32)  # shift: equal rewards give std 0 exactly
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        valid = start + offs < n
        r = tl.load(rewards_ptr + start + offs, mask=valid, other=0.0).to(tl.float32)
        total += tl.where(valid, r - first, 0.0)
    mean = first + tl.sum(total, axis=0) / n
    sq = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        valid = start + offs < n
        r = tl.load(rewards_ptr + start + offs, mask=valid, other=0.0).to(tl.float32)
        sq += tl.where(valid, (r - mean) * (r - mean), 0.0)
    std = tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(n - 1, 1))
    return mean, std


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,
    offsets_ptr,
    out_ptr,
    n_rewards,
    n_groups,
    group_size,
    process_var,
    meas_var,
    init_mean,
    init_var,
    eps,
    MODE: tl.constexpr,
    RAGGED: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
    BLOCK_BATCH: tl.constexpr,
):
    groups = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    live = groups < n_groups
    if RAGGED:
        start = tl.load(offsets_ptr + groups, mask=live, other=0)
        length = tl.load(offsets_ptr + groups + 1, mask=live, other=0) - start
        n_steps = tl.max(length, axis=0)
    else:
        start = groups * group_size
        length = tl.where(live, group_size, 0)
        n_steps = group_size

    if MODE == 0:
        x = tl.zeros([BLOCK_GROUPS], tl.float32) + init_mean
        p = tl.zeros([BLOCK_GROUPS], tl.float32) + init_var
        for k in range(0, n_steps):
            valid = k < length
            r = tl.load(rewards_ptr + start + k, mask=valid, other=0.0).to(tl.float32)
            gain, keep, p = kalman_predict_update(p, process_var, meas_var)
            innovation = r - x
            x = x + gain * innovation
            tl.store(out_ptr + start + k, keep * innovation / (tl.sqrt(p) + eps), mask=valid)
    else:
        # Sum deviations from the group's first reward: a group of equal rewards then
        # has a mean equal to them exactly, hence advantage 0 rather than rounding noise
        # blown up by the std division.
        first = tl.load(rewards_ptr + start, mask=length > 0, other=0.0).to(tl.float32)
        total = tl.zeros([BLOCK_GROUPS], tl.float32)
        for k in range(0, n_steps):
            r = tl.load(rewards_ptr + start + k, mask=k < length, other=0.0).to(tl.float32)
            total += tl.where(k < length, r - first, 0.0)
        mean = first + total / tl.maximum(length, 1)
        if MODE == 1:
            sq = tl.zeros([BLOCK_GROUPS], tl.float32)
            for k in range(0, n_steps):
                valid = k < length
                r = tl.load(rewards_ptr + start + k, mask=valid, other=0.0).to(tl.float32)
                sq += tl.where(valid, (r - mean) * (r - mean), 0.0)
            std = tl.sqrt(sq / tl.maximum(length - 1, 1))
            # A group of one has no spread, nor one of equal rewards with eps = 0 (its
            # deviations are exactly 0): advantage 0 rather than 0 / 0.
            scale = tl.where((length > 1) & (std + eps > 0), 1.0 / (std + eps), 0.0)
        elif MODE == 2:
            scale = tl.zeros([BLOCK_GROUPS], tl.float32) + 1.0
        else:
            _, batch_std = batch_mean_std(rewards_ptr, n_rewards, BLOCK_BATCH)
            inverse = tl.where(batch_std + eps > 0, 1.0 / (batch_std + eps), 0.0)
            scale = tl.zeros([BLOCK_GROUPS], tl.float32) + inverse
        for k in range(0, n_steps):
            valid = k < length
            r = tl.load(rewards_ptr + start + k, mask=valid, other=0.0).to(tl.float32)
            tl.store(out_ptr + start + k, (r - mean) * scale, mask=valid)


def group_advantages_triton(
    rewards: torch.Tensor,
    group_size: int | None,
    group_offsets: torch.Tensor | None,
    mode: str,
    process_var: float = 1e-5,
    meas_var: float = 1e-2,
    init_mean: float = 0.0,
    init_var: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Launch the kernel on contiguous 1-D ``rewards``; returns float32 advantages [B].

    Exactly one of ``group_size`` (uniform groups) and ``group_offsets`` (int32,
    [n_groups + 1], starting at 0 and ending at B) is given; inputs are validated
    by the caller.
    """
    n = rewards.numel()
    out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    ragged = group_offsets is not None
    n_groups = group_offsets.numel() - 1 if ragged else n // group_size
    if n_groups == 0:
        return out
    block_groups = min(128, triton.next_power_of_2(n_groups))
    grid = (triton.cdiv(n_groups, block_groups),)
    _group_advantages_kernel[grid](
        rewards,
        group_offsets if ragged else rewards,  # unused pointer when uniform
        out,
        n,
        n_groups,
        0 if ragged else group_size,
        process_var,
        meas_var,
        init_mean,
        init_var,
        eps,
        MODE=MODES[mode],
        RAGGED=ragged,
        BLOCK_GROUPS=block_groups,
        BLOCK_BATCH=min(4096, triton.next_power_of_2(n)),
    )
    return out
