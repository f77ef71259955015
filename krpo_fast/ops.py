"""Public fused ops: group advantages (Kalman and GRPO baselines), the clipped
policy-gradient loss, and the fused KRPO loss.

Dispatch (docs/design.md): CUDA tensors run the compiled Triton kernels in
``krpo_fast.kernels``; CPU tensors run the vectorised PyTorch code in this file,
or the Triton kernels in Triton's interpreter when ``TRITON_INTERPRET=1``.
float64 inputs always take the PyTorch path (the kernels compute in float32), which
is what ``torch.autograd.gradcheck`` exercises.

The losses compute d loss / d logp in the forward pass and store it, so the
backward is a single scale. Gradients flow to ``logp`` only: old and reference
log-probs, advantages, rewards and the mask are treated as constants (as in TRL,
verl and Liger-Kernel).
"""

import warnings
from functools import lru_cache
from typing import NamedTuple

import torch

from krpo_fast import _validation as v
from krpo_fast import defaults as d
from krpo_fast._dispatch import interpreter_enabled, use_triton
from krpo_fast.defaults import ADVANTAGE_MODES, LOSS_AGGREGATIONS

__all__ = [
    "ADVANTAGE_MODES",
    "LOSS_AGGREGATIONS",
    "group_advantages",
    "kalman_advantages",
    "krpo_loss",
    "policy_loss",
]


# ---------------------------------------------------------------------------- validation


def _check_rewards(
    rewards: object,
    group_size: object,
    group_offsets: object,
    *,
    plain: bool = False,
    check_finite: bool = True,
) -> tuple[torch.Tensor, int | None, torch.Tensor | None, int]:
    """Validate rewards and the group layout; return (rewards, group_size, int32 offsets,
    longest group). ``plain``: ``v.plain_loss_tensors`` vouched for the tensor;
    ``check_finite=False``: the caller checks for NaN and inf itself."""
    if not plain:
        rewards = v.check_tensor("rewards", rewards, ndim=1, dtypes=v.FLOAT_DTYPES)
        if rewards.numel() == 0:
            raise ValueError("rewards is empty: need at least one reward")
    n = rewards.numel()
    if check_finite:
        v.check_all_finite("rewards", rewards)
    if (group_size is None) == (group_offsets is None):
        raise ValueError("give exactly one of group_size (uniform groups) and group_offsets")
    if group_size is not None:
        _check_group_size(group_size, n)
        return rewards.contiguous(), group_size, None, group_size
    offsets = v.check_tensor("group_offsets", group_offsets, ndim=1, dtypes=v.INT_DTYPES)
    v.check_same_device("group_offsets", offsets, "rewards", rewards)
    if offsets.numel() < 2:
        raise ValueError("group_offsets must hold at least 2 entries (n_groups + 1)")
    host = offsets.detach().cpu().long()
    if host[0] != 0 or host[-1] != n:
        raise ValueError(
            f"group_offsets must start at 0 and end at the number of rewards {n}, "
            f"got {host[0].item()} ... {host[-1].item()}"
        )
    lengths = host.diff()
    if (lengths < 0).any():
        raise ValueError("group_offsets must be non-decreasing")
    return rewards.contiguous(), None, offsets.to(torch.int32).contiguous(), int(lengths.max())


def _check_group_size(group_size: object, n: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if n % group_size:
        raise ValueError(f"group_size {group_size} does not divide the number of rewards {n}")


@v.memoised_check
def _check_kalman(
    process_var: float, meas_var: float, init_mean: float, init_var: float, eps: float
) -> tuple[float, float, float, float, float]:
    return (
        v.check_positive("process_var", process_var),
        v.check_positive("meas_var", meas_var),
        v.check_finite_number("init_mean", init_mean),
        v.check_positive("init_var", init_var),
        v.check_finite_number("eps", eps, minimum=0.0),
    )


@v.memoised_check  # positional: a cache key of keywords costs twice as much
def _check_family(
    eps_high: float,
    ratio_level: object,
    loss_type: object,
    tau_pos: object,
    tau_neg: object,
    delta: object,
    dual_clip: object,
    kl_estimator: object,
    bias_correction_kl: object,
) -> v.LossFamily:
    """The validated loss-family options (``eps_high`` checked before)."""
    return v.check_loss_family(
        eps_high=eps_high,
        ratio_level=ratio_level,
        loss_type=loss_type,
        tau_pos=tau_pos,
        tau_neg=tau_neg,
        delta=delta,
        dual_clip=dual_clip,
        kl_estimator=kl_estimator,
        bias_correction_kl=bias_correction_kl,
    )


def _check_mode(name: str, mode: object) -> str:
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"{name} must be one of {ADVANTAGE_MODES}, got {mode!r}")
    return mode


def _check_loss_inputs(
    logp: object,
    old_logp: object,
    ref_logp: object,
    mask: object,
    per_row: object,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_agg: str,
    max_len: int | None,
    check_finite: bool,
) -> tuple[bool, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(whether ``v.plain_loss_tensors`` holds, so the per-row tensor ``per_row``, the
    advantages or rewards, needs no shape or device check either; the checked log-probs
    and mask)."""
    plain = v.plain_loss_tensors(logp, old_logp, ref_logp, mask, per_row)
    if not plain:
        logp = v.check_tensor("logp", logp, ndim=2, dtypes=v.FLOAT_DTYPES)
        if logp.numel() == 0:
            raise ValueError(f"logp is empty (shape {tuple(logp.shape)}): need B >= 1 and T >= 1")
    old_logp, ref_logp, mask = v.check_loss_args(
        "logp",
        logp,
        old_logp,
        ref_logp,
        mask,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        plain=plain,
    )
    old_logp = _constant(old_logp)
    ref_logp = _constant(ref_logp)
    if check_finite:
        on = mask != 0
        for name, value in (("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp)):
            if value is not None and not bool(torch.isfinite(value.detach()[on]).all()):
                raise ValueError(f"{name} holds NaN or inf at masked-in tokens")
    return plain, logp, old_logp, ref_logp, mask


def _constant(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` cut from autograd (detach() costs a dispatch even when nothing is to cut)."""
    return tensor.detach() if tensor is not None and tensor.requires_grad else tensor


def _aggregation_weights(loss_agg: str, n_rows: int, max_len: int | None) -> tuple[float, bool]:
    """(weight of every masked token of a row, whether it is also divided by the row's
    token count). token-mean is normalised afterwards by the global token count."""
    if loss_agg == "seq-mean-token-mean":
        return 1.0 / n_rows, True
    if loss_agg == "token-mean":
        return 1.0, False
    if loss_agg == "seq-mean-token-sum":
        return 1.0 / n_rows, False
    return 1.0 / (n_rows * max_len), False


def _has_float64(*tensors: torch.Tensor | None) -> bool:
    # A loop, not any() over a generator: these run on every call of a CPU op.
    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return True
    return False


def _row_scale(
    tokens: torch.Tensor, total: torch.Tensor, loss_agg: str, max_len: int | None
) -> torch.Tensor:
    """[B] weight of each row's masked-token sum, from its token count ``tokens`` and
    the batch's ``total``. Computed from the shape inside a compiled graph, so the batch
    size is no float input that changes from call to call."""
    row_weight, per_row_mean = _aggregation_weights(loss_agg, tokens.shape[0], max_len)
    # An all-masked row has no tokens to weigh: its clamped scale multiplies zeros only.
    scale = row_weight / tokens.clamp(min=1) if per_row_mean else tokens * 0.0 + row_weight
    return scale / total if loss_agg == "token-mean" else scale


def _uses_triton(*tensors: torch.Tensor | None) -> bool:
    return use_triton(tensors[0]) and not _has_float64(*tensors)


def _mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ---------------------------------------------------------------- vectorised torch paths


@lru_cache(maxsize=64)
def _kalman_map(
    length: int,
    process_var: float,
    meas_var: float,
    init_mean: float,
    init_var: float,
    eps: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The filter as one linear map of the deviations from the group's first reward.

    P and K depend only on the position, so the estimate is x = W r + c x_0 with W
    lower-triangular (W[k, j] = K_j prod_{i=j+1..k} (1 - K_i)) and c_k = prod_{i<=k}
    (1 - K_i); each row of [W | c] sums to 1. With d = r - r_1, the advantage
    A = (r - x) * s, s = 1 / (sqrt(P) + eps), is therefore
        A = d @ ((I - W) * s[:, None]).T + (r_1 - x_0) * (c * s),
    which keeps a large common reward level from cancelling in float32. Built in
    float64; returns (matrix [L, L], c * s, -x_0 * c * s) in ``dtype`` on ``device``.
    """
    weights = torch.zeros(length, length, dtype=torch.float64)
    carry = torch.zeros(length, dtype=torch.float64)
    init_coef = torch.empty(length, dtype=torch.float64)
    scale = torch.empty(length, dtype=torch.float64)
    p, c = init_var, 1.0
    for k in range(length):
        p_pred = p + process_var
        gain = p_pred / (p_pred + meas_var)
        p = (1.0 - gain) * p_pred
        carry = carry * (1.0 - gain)
        carry[k] = gain
        weights[k] = carry
        c *= 1.0 - gain
        init_coef[k] = c
        scale[k] = 1.0 / (p**0.5 + eps)
    matrix = ((torch.eye(length, dtype=torch.float64) - weights) * scale[:, None]).T
    first_coef = init_coef * scale
    return tuple(
        t.to(dtype=dtype, device=device).contiguous()
        for t in (matrix, first_coef, -init_mean * first_coef)
    )


def _grouped(
    r: torch.Tensor, group_size: int | None, offsets: torch.Tensor | None, max_group_len: int
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """Rewards as a [n_groups, L] matrix (a view for uniform groups), the validity mask
    of ragged groups and the (group, position) index of every reward (None: uniform)."""
    if offsets is None:
        return r.view(-1, group_size), None, None
    lengths = offsets.diff().long()
    group = torch.repeat_interleave(torch.arange(len(lengths), device=r.device), lengths)
    index = (group, torch.arange(r.numel(), device=r.device) - offsets[:-1].long()[group])
    padded = r.new_zeros(len(lengths), max_group_len)
    padded[index] = r
    valid = torch.arange(max_group_len, device=r.device) < lengths[:, None]
    return padded, valid, index


def _divide(values: torch.Tensor, spread: torch.Tensor | float, eps: float) -> torch.Tensor:
    """values / (spread + eps), in place (both are the caller's temporaries); 0 / 0
    gives 0: a spread of 0 means every value is exactly 0 already (deviations of equal
    rewards, or a group of one), even with eps 0."""
    if eps > 0:
        if isinstance(spread, torch.Tensor):
            return values.div_(spread.add_(eps))
        return values.div_(spread + eps)
    return values.div_(spread).nan_to_num_(nan=0.0)


# Up to this many rewards, the filter takes the deviations from each group's first
# reward as a [G, G] matrix product (fewer calls than a slice and a broadcast, each of
# which costs ~1-2 us on such tensors), and the batch std is torch.std.
_GEMM_MAX_REWARDS = 4096


class _UniformPlan(NamedTuple):
    """Constants of ``_uniform_advantages`` for one mode, group size G and filter."""

    mode: str
    group_size: int
    eps: float
    # kalman only (None in the other modes): [G, G] x @ shift keeps x_1 and subtracts it
    # from the others (exactly: two nonzero products per output, so one rounding, like a
    # subtraction); [G, G] applied to (r_1, deviations), the filter's map with its r_1
    # coefficients in the first row; (0, -1, .., -1), the shift as a broadcast
    # multiplier; and the filter's -x_0 c s (None when x_0 = 0).
    shift: torch.Tensor | None
    matrix: torch.Tensor | None
    column: torch.Tensor | None
    bias: torch.Tensor | None
    eps_tensor: torch.Tensor  # grpo: spread + eps in one call, as a tensor operand
    size_tensor: torch.Tensor  # G, the divisor of addcdiv
    inv_dof: float  # grpo: 1 / sqrt(G - 1), the unbiased std from the norm (0 for G = 1)


@lru_cache(maxsize=64)
def _uniform_plan(
    mode: str, group_size: int, kalman: tuple[float, float, float, float], eps: float
) -> _UniformPlan:
    """The checked settings' constants, float32 on the CPU."""
    shift = matrix = column = bias = None
    if mode == "kalman":
        shift = torch.eye(group_size)
        shift[0, 1:] = -1.0
        matrix, first_coef, bias = _kalman_map(
            group_size, *kalman, eps, torch.float32, torch.device("cpu")
        )
        matrix = matrix.clone()
        matrix[0] = first_coef
        bias = bias if kalman[2] != 0.0 else None
        column = torch.full((group_size,), -1.0)
        column[0] = 0.0
    inv_dof = 1.0 / (group_size - 1) ** 0.5 if group_size > 1 else 0.0
    return _UniformPlan(
        mode,
        group_size,
        eps,
        shift,
        matrix,
        column,
        bias,
        torch.tensor(eps),
        torch.tensor(float(group_size)),
        inv_dof,
    )


@v.memoised_check
def _checked_plan(
    mode: str,
    group_size: int,
    process_var: float,
    meas_var: float,
    init_mean: float,
    init_var: float,
    eps: float,
) -> _UniformPlan:
    """``group_advantages``' settings checked and their plan: one cache look-up per call
    where three cost a microsecond more than eager's whole dr_grpo at 64 x 8."""
    mode = _check_mode("mode", mode)
    *kalman, eps = _check_kalman(process_var, meas_var, init_mean, init_var, eps)
    return _uniform_plan(mode, group_size, tuple(kalman), eps)


def _batch_std(rewards: torch.Tensor, small: bool) -> float:
    """The unbiased std of two or more float32 rewards. Large batches take the two-pass
    sum of squares about the float32 mean, less n * (the mean of the deviations)^2,
    which corrects for that mean's rounding: ~3x faster than torch.std there."""
    if small:
        return rewards.std().item()
    n = rewards.numel()
    deviations = torch.sub(rewards, rewards.sum(), alpha=1.0 / n)
    norm = torch.linalg.vector_norm(deviations).item()
    offset = deviations.sum().item()
    return (max(norm * norm - offset * offset / n, 0.0) / (n - 1)) ** 0.5


def _uniform_advantages(
    rewards: torch.Tensor, plan: _UniformPlan, check_finite: bool
) -> torch.Tensor:
    """``_mapped_advantages`` of contiguous float32 CPU rewards in uniform groups, in as
    few torch calls as the batch allows (each costs ~1-2 us at these sizes). With
    ``check_finite``, NaN or inf rewards raise, from one sum the math needs or makes
    non-finite anyway (one sync)."""
    n, size, mode = rewards.numel(), plan.group_size, plan.mode
    groups = rewards.view(-1, size)
    small = n <= _GEMM_MAX_REWARDS
    if mode == "kalman":
        if check_finite:
            v.check_finite_total("rewards", rewards, torch.dot(rewards, rewards).item())
        if small:
            shifted = torch.mm(groups, plan.shift)
        else:
            first = rewards.as_strided((n // size, 1), (size, 1))
            shifted = torch.addcmul(groups, first, plan.column)
        if plan.bias is None:
            return torch.mm(shifted, plan.matrix).ravel()
        return torch.addmm(plan.bias, shifted, plan.matrix).ravel()
    if mode == "batch_std":
        spread = _batch_std(rewards, small) if n > 1 else 0.0
        if check_finite:  # the std is NaN or inf when a reward is
            v.check_finite_total("rewards", rewards, spread if n > 1 else rewards.sum().item())
        spread += plan.eps
        scale = 1.0 / spread if spread else 0.0  # 0 only for equal rewards: all 0 already
    deviations = torch.sub(groups, rewards.as_strided((n // size, 1), (size, 1)))
    # The group mean as the kernels take it, a sum divided by G (a product with 1/G, or
    # a matrix product, rounds differently): a reward equal to it gets exactly 0.
    group_sums = deviations.sum(1, keepdim=True)
    if check_finite and mode != "batch_std":  # NaN or inf in a group's sum if a reward is
        v.check_finite_total("rewards", rewards, group_sums.sum().item())
    if small:  # one call instead of two; broadcast this way it is slower on large batches
        centred = deviations.addcdiv_(group_sums, plan.size_tensor, value=-1.0)
    else:
        centred = deviations.sub_(group_sums.div_(size))
    if mode == "batch_std":
        return centred.mul_(scale).ravel()
    if mode == "grpo":
        norm = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
        if plan.eps > 0:
            centred.div_(torch.add(plan.eps_tensor, norm, alpha=plan.inv_dof))
        else:
            centred = _divide(centred, norm.mul_(plan.inv_dof), 0.0)
    return centred.ravel()


def _group_advantages_torch(
    rewards: torch.Tensor,
    group_size: int | None,
    offsets: torch.Tensor | None,
    max_group_len: int,
    mode: str,
    kalman: tuple[float, float, float, float],
    eps: float,
) -> torch.Tensor:
    """Float32 math (float64 for float64 rewards) on a [n_groups, L] layout, on
    deviations from each group's first reward: a group of equal rewards then has
    deviations, mean and spread of exactly 0, and a large common reward level does not
    cancel."""
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if rewards.dtype != dtype:
        rewards = rewards.to(dtype)
    if offsets is None and dtype == torch.float32 and rewards.is_cpu:
        plan = _uniform_plan(mode, group_size, kalman, eps)
        return _uniform_advantages(rewards.contiguous(), plan, check_finite=False)
    kalman_map = None
    if mode == "kalman":
        kalman_map = _kalman_map(max_group_len, *kalman, eps, dtype, rewards.device)
    return _mapped_advantages(rewards, group_size, offsets, max_group_len, mode, kalman_map, eps)


def _mapped_advantages(
    rewards: torch.Tensor,
    group_size: int | None,
    offsets: torch.Tensor | None,
    max_group_len: int,
    mode: str,
    kalman_map: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    eps: float,
    traced: bool = False,
) -> torch.Tensor:
    """``_group_advantages_torch`` on float32 or float64 rewards with the filter's
    ``_kalman_map`` given: no cache look-up, so torch.compile traces it (``traced``:
    the filter's product as a broadcast sum, which Inductor fuses into its loops where
    an addmm stays a library call of its own)."""
    groups, valid, index = _grouped(rewards, group_size, offsets, max_group_len)
    first = groups.narrow(1, 0, 1)
    deviations = groups - first
    if valid is not None:
        deviations.masked_fill_(~valid, 0.0)
    if mode == "kalman":
        matrix, first_coef, bias = kalman_map
        if traced:
            adv = (deviations.unsqueeze(-1) * matrix).sum(1) + bias + first * first_coef
        else:
            adv = torch.addmm(bias, deviations, matrix).addcmul_(first, first_coef)
    elif valid is None:
        # In place, and a sum over G as the kernels take the mean (mean() is twice a
        # sum's time at 64 x 8; a product with 1/G would leave a reward equal to the mean
        # a rounding error away from 0).
        centred = deviations.sub_(deviations.sum(1, keepdim=True).div_(group_size))
        if mode == "grpo":
            # The unbiased std as a norm: torch.std along a short dim is 30x slower.
            norm = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
            spread = norm.mul_(1.0 / (group_size - 1) ** 0.5) if group_size > 1 else 0.0
    else:
        counts = valid.sum(1, keepdim=True).to(rewards.dtype)
        centred = deviations - deviations.sum(1, keepdim=True) / counts.clamp(min=1)
        centred.masked_fill_(~valid, 0.0)
        if mode == "grpo":
            norm = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
            spread = norm / (counts - 1).clamp(min=1).sqrt()
    if mode == "grpo":
        adv = _divide(centred, spread, eps)
    elif mode == "batch_std":
        adv = _divide(centred, rewards.std() if rewards.numel() > 1 else 0.0, eps)
    elif mode == "dr_grpo":
        adv = centred
    adv = adv.reshape(-1) if index is None else adv[index]
    return adv if adv.dtype == torch.float32 else adv.to(torch.float32)


# Coefficients of the k3 series d^2 (1/2 + d/6 + ... + d^6/40320), innermost first.
_K3_SERIES = (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2)


def _k3(d: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1, as the kernels' ``k3_kl``: the Taylor series to d^8 below
    |d| = 0.5 (the direct form cancels to d^2 / 2 in float32 there)."""
    series = d * (1 / 40320)
    for coefficient in _K3_SERIES:
        series.add_(coefficient).mul_(d)
    series.mul_(d)
    return torch.where(d.abs() < 0.5, series, torch.exp(d).sub_(d).sub_(1.0))


def token_terms_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token (policy term -surrogate, d loss / d logp, k3 KL, clipped) in ``logp``'s
    dtype (float32 or float64): the kernels' ``clipped_token_loss``, whose loss is the
    policy term + beta KL (left to the caller: summing each term over a row first keeps
    a compiled reduction to one pass). ``advantages`` broadcasts against ``logp``;
    ``ref_logp`` None means no KL term (KL None), ``old_logp`` None ratio 1 (clipped
    None: never)."""
    if old_logp is None:
        surrogate = advantages.expand_as(logp)
        grad = -surrogate
        clipped = None
    else:
        ratio = torch.sub(logp, old_logp).exp_()
        ratio_adv = ratio * advantages
        clipped_adv = ratio.clamp_(1.0 - eps_low, 1.0 + eps_high).mul_(advantages)
        # The clip removes the gradient exactly where it lowers the surrogate.
        clipped = ratio_adv > clipped_adv
        surrogate = torch.minimum(ratio_adv, clipped_adv)
        grad = torch.where(clipped, 0.0, ratio_adv.neg_())
    if ref_logp is None:
        return -surrogate, grad, None, clipped
    log_ratio_ref = torch.sub(ref_logp, logp)
    kl = _k3(log_ratio_ref)
    # d kl / d logp = 1 - exp(d) = -(d + kl), without cancellation near d = 0.
    grad.sub_(log_ratio_ref.add_(kl), alpha=beta)
    return -surrogate, grad, kl, clipped


def _loss_rows_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_agg: str,
    max_len: int | None,
    need_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy loss in torch: (d loss / d logp [B, T] in ``logp``'s dtype or None
    without ``need_grad``, loss, mean KL, clip fraction). Math in float32, float64 when
    ``logp`` is float64."""
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    on = mask if mask.dtype == torch.bool else mask != 0
    policy, grad, kl, clipped = token_terms_torch(
        logp.to(dtype),
        old_logp,
        ref_logp,
        advantages.to(dtype).unsqueeze(-1),
        eps_low,
        eps_high,
        beta,
    )
    tokens = on.sum(-1, dtype=dtype)
    total = tokens.sum().clamp(min=1)
    scale = _row_scale(tokens, total, loss_agg, max_len)
    # torch.where, not a product: padding may hold -inf or NaN log-probs.
    grad = (torch.where(on, grad, 0.0) * scale[:, None]).to(logp.dtype) if need_grad else None
    # Row sums of each term, combined per row: compiled, every per-token value then feeds
    # one reduction and the tokens take one fused pass (a per-token loss feeding the loss
    # and the KL sums makes Inductor store the KL first: 10-20% slower at 64 x 1024).
    row_loss = torch.where(on, policy, 0.0).sum(-1)
    if kl is None:
        kl = total * 0.0
    else:
        kl_rows = torch.where(on, kl, 0.0).sum(-1)
        row_loss = row_loss + beta * kl_rows
        kl = kl_rows.sum() / total
    loss = (row_loss * scale).sum()
    clipped = total * 0.0 if clipped is None else (clipped & on).sum(-1, dtype=dtype).sum()
    return grad, loss, kl, clipped / total


_PAPER_LOSS = v.LossFamily()


# CPU batches of at least this many tokens run ``_loss_rows_torch`` through
# torch.compile: Inductor fuses its ~30 elementwise passes and 4 reductions into one
# C++ loop (3 to 4 times faster at 64 x 1024). The first call per dtype compiles (a
# few seconds); smaller batches, float64 and machines where Inductor cannot compile
# (no C++ compiler) run it eagerly.
COMPILE_MIN_TOKENS = 4096


class _CompiledOnce:
    """``fn`` through torch.compile, compiled on first use. After a failure (e.g. no C++
    compiler) it warns once and returns None from then on, so callers run ``fn`` eagerly."""

    def __init__(self, fn: object, what: str) -> None:
        self.fn, self.what = fn, what
        self.compiled: object | None = None
        self.failed = False

    def __call__(self, *args: object) -> object | None:
        if self.failed:
            return None
        try:
            if self.compiled is None:
                # Dynamo's guards check every input's sizes and strides already; the
                # compiled code's own re-check costs ~0.6 us per tensor and call.
                self.compiled = torch.compile(
                    self.fn, dynamic=None, options={"size_asserts": False}
                )
            if not torch.is_grad_enabled():
                return self.compiled(*args)
            with torch.no_grad():  # one compiled graph whatever the caller's grad mode
                return self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any Inductor failure: run eagerly
            self.failed = True
            warnings.warn(
                f"krpo_fast: torch.compile of the CPU {self.what} failed ({error!r:.200}); "
                "running it eagerly from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            return None


_compiled_loss_rows = _CompiledOnce(_loss_rows_torch, "policy loss")


def _policy_loss_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_agg: str,
    max_len: int | None,
    family: v.LossFamily = _PAPER_LOSS,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss on validated CPU inputs (or float64 ones): float32 math, float64
    when any input is float64 (e.g. for gradcheck). The paper's loss runs the fast path
    below; the rest of the family runs ``_family_loss_rows_torch``."""
    inputs = [_constant(logp), old_logp, ref_logp, advantages, mask]
    float64 = _has_float64(logp, old_logp, ref_logp, advantages)
    if float64:
        inputs[0] = inputs[0].double()
    if token_weights is not None or not family.is_paper_loss:
        return _family_loss_torch(
            logp, inputs, token_weights, eps_low, eps_high, beta, family, loss_agg, max_len
        )
    args = (
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        torch.is_grad_enabled() and logp.requires_grad,
    )
    results = None
    if not float64 and logp.numel() >= COMPILE_MIN_TOKENS:
        # Contiguous inputs keep the compiled code to one stride layout.
        results = _compiled_loss_rows(*map(_contiguous, inputs), *args)
    return _finish_loss(logp, *(results or _loss_rows_torch(*inputs, *args)))


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # The check first: contiguous() on a contiguous tensor still costs a dispatch.
    return tensor if tensor is None or tensor.is_contiguous() else tensor.contiguous()


def _finish_loss(
    logp: torch.Tensor,
    grad: torch.Tensor | None,
    loss: torch.Tensor,
    kl: torch.Tensor,
    clip_fraction: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The public (loss, metrics) of ``_loss_rows_torch``'s results; the loss carries
    the stored gradient when there is one."""
    if logp.dtype == torch.float64:
        loss, kl, clip_fraction = (t.double() for t in (loss, kl, clip_fraction))
    elif loss.dtype != torch.float32:
        loss, kl, clip_fraction = (t.float() for t in (loss, kl, clip_fraction))
    if grad is not None:
        loss = _StoredGradLoss.apply(logp, grad.to(logp.dtype), loss)
    return loss, {"kl": kl, "clip_fraction": clip_fraction}


def _krpo_rows_torch(
    rewards: torch.Tensor,
    group_size: int,
    mode: str,
    kalman_map: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    adv_eps: float,
    logp: torch.Tensor,
    *loss_args: object,
) -> tuple[torch.Tensor, ...]:
    """(the rewards' sum, advantages, *``_loss_rows_torch``) of uniform groups of float32
    rewards: one compiled graph, so the advantages' small ops cost no call each, and the
    sum (NaN or inf when a reward is) no pass of its own."""
    advantages = _mapped_advantages(
        rewards, group_size, None, group_size, mode, kalman_map, adv_eps, traced=True
    )
    loss_rows = _loss_rows_torch(logp, *loss_args[:2], advantages, *loss_args[2:])
    return rewards.sum(), advantages, *loss_rows


_compiled_krpo_rows = _CompiledOnce(_krpo_rows_torch, "KRPO loss")


def _krpo_loss_compiled(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    mode: str,
    kalman: tuple[float, float, float, float, float],
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_agg: str,
    max_len: int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """krpo_loss of the paper's loss on a large CPU batch of uniform groups (no float64)
    through torch.compile, advantages and the check of the rewards for NaN and inf
    included; None where that path does not apply (the caller then checks the rewards
    and runs the advantages and ``_policy_loss_torch`` apart)."""
    if _compiled_krpo_rows.failed or logp.numel() < COMPILE_MIN_TOKENS:
        return None
    if rewards.dtype != torch.float32:
        rewards = rewards.float()
    kalman_map = None
    if mode == "kalman":
        kalman_map = _kalman_map(group_size, *kalman, torch.float32, rewards.device)
    outputs = _compiled_krpo_rows(
        rewards,
        group_size,
        mode,
        kalman_map,
        kalman[4],
        *map(_contiguous, (_constant(logp), old_logp, ref_logp, mask)),
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        torch.is_grad_enabled() and logp.requires_grad,
    )
    if outputs is None:
        return None
    reward_total, advantages, *results = outputs
    v.check_finite_total("rewards", rewards, reward_total.item())
    loss, metrics = _finish_loss(logp, *results)
    metrics["advantages"] = advantages
    return loss, metrics


def policy_terms_torch(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    logp: torch.Tensor,
    eps_low: float,
    eps_high: float,
    family: v.LossFamily,
) -> tuple[torch.Tensor, ...]:
    """Per-token policy term of ``family.loss_type`` (the kernels' ``policy_token_terms``):
    (term, its derivative in the log-ratio, its derivative in ``logp`` itself or None,
    low-clipped, high-clipped, dual-clipped flags or None). ``ratio`` is the token or the
    sequence ratio, ``adv`` broadcasts against it."""
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    no_flags = torch.zeros(ratio.shape, dtype=torch.bool, device=ratio.device)
    direct = dual = None
    if family.loss_type == "clip":
        unclipped = ratio if family.delta is None else ratio.clamp(max=family.delta)
        unclipped_adv = unclipped * adv
        clipped_adv = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
        # The clip (or delta's cap) removes the gradient where it lowers the surrogate.
        frozen = unclipped_adv > clipped_adv
        if family.delta is not None:
            frozen = frozen | (ratio > family.delta)
        term = -torch.minimum(unclipped_adv, clipped_adv)
        d_log_ratio = torch.where(frozen, zero, -ratio * adv)
        low = (adv < 0) & (ratio < 1.0 - eps_low)
        high = (adv > 0) & (ratio > 1.0 + eps_high)
        if family.dual_clip is not None:
            cap = -family.dual_clip * adv
            dual = (adv < 0) & (term > cap)
            term = torch.where(dual, cap, term)
            d_log_ratio = torch.where(dual, zero, d_log_ratio)
    elif family.loss_type == "cispo":
        capped = ratio.clamp(max=eps_high)
        direct = -capped * adv
        term = direct * logp
        d_log_ratio = torch.zeros_like(term)
        low, high = no_flags, (adv > 0) & (ratio > eps_high)
    else:
        tau = torch.where(adv > 0, family.tau_pos, family.tau_neg).to(ratio.dtype)
        gate = torch.sigmoid(tau * (ratio - 1.0))
        term = -gate * (4.0 / tau) * adv
        # d term / d ratio = -4 A gate (1 - gate), times ratio for the log-ratio.
        d_log_ratio = -4.0 * adv * gate * (1.0 - gate) * ratio
        low = high = no_flags
    return term, d_log_ratio, direct, low, high, dual


def kl_terms_torch(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL estimate, its derivative in ``logp``) per token (the kernels' ``kl_token_terms``),
    d = ref - logp: k3 exp(d) - d - 1, k1 -d, k2 d^2 / 2, low_var_kl k3 of d clamped to
    [-20, 20], clamped to 10."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d, torch.ones_like(d)
    if estimator == "k2":
        return 0.5 * d * d, -d
    if estimator == "k3":
        kl = _k3(d)
        return kl, -(d + kl)  # 1 - exp(d) without cancellation near d = 0
    clamped = d.clamp(-20.0, 20.0)
    kl = _k3(clamped)
    live = (d.abs() <= 20.0) & (kl <= 10.0)
    return kl.clamp(max=10.0), torch.where(live, -(clamped + kl), 0.0)


def family_token_terms_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    weights: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
    family: v.LossFamily,
) -> tuple[torch.Tensor, ...]:
    """Per-token (loss, d loss / d logp, KL or None, low, high, dual or None, ratio) of a
    token-ratio member of the family, the token weight on its policy term: the kernels'
    ``family_token_loss``. ``advantages`` and ``weights`` broadcast against ``logp``."""
    ratio = torch.ones_like(logp) if old_logp is None else torch.sub(logp, old_logp).exp_()
    term, d_log_ratio, direct, low, high, dual = policy_terms_torch(
        ratio, advantages, logp, eps_low, eps_high, family
    )
    dlogp = d_log_ratio if direct is None else d_log_ratio + direct
    if weights is not None:
        term, dlogp = term * weights, dlogp * weights
    kl = None
    if ref_logp is not None:
        kl, d_kl = kl_terms_torch(logp, ref_logp, family.kl_estimator)
        if family.bias_correction_kl:
            # beta kl r: d / d logp = beta r (d kl / d logp + kl).
            term = term + beta * kl * ratio
            dlogp = dlogp + beta * ratio * (d_kl + kl)
        else:
            term = term + beta * kl
            dlogp = dlogp + beta * d_kl
    return term, dlogp, kl, low, high, dual, ratio


def _family_loss_rows_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    token_weights: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
    family: v.LossFamily,
    loss_agg: str,
    max_len: int | None,
    need_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """Every loss of the family in torch: (d loss / d logp [B, T] or None, loss, metrics).
    Math in float32, float64 when ``logp`` is float64. With sequence ratios the gradient
    of each token adds a per-row term: the row's sum of d loss / d log s, over n_i."""
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    on = mask if mask.dtype == torch.bool else mask != 0
    x = logp.to(dtype)
    tokens = on.sum(-1, dtype=dtype)
    total = tokens.sum().clamp(min=1)
    adv = advantages.to(dtype).unsqueeze(-1)
    if old_logp is None:
        log_ratio = torch.zeros_like(x)
    else:
        # where, not a product: padding may hold -inf or NaN log-probs.
        log_ratio = torch.where(on, x - old_logp.to(dtype), 0.0)
    sequence = family.ratio_level == "sequence"
    if sequence:
        row_log_ratio = log_ratio.sum(-1, keepdim=True) / tokens.clamp(min=1)[:, None]
        ratio = row_log_ratio.exp().expand_as(x)
    else:
        ratio = log_ratio.exp()
    term, d_log_ratio, direct, low, high, dual = policy_terms_torch(
        ratio, adv, x, eps_low, eps_high, family
    )
    if token_weights is not None:
        w = token_weights.to(dtype)
        w = w[:, None] if w.dim() == 1 else w
        term, d_log_ratio = term * w, d_log_ratio * w
        direct = None if direct is None else direct * w
    per_token = term
    d_own = torch.zeros_like(x) if direct is None else direct
    kl = None
    if beta != 0.0:
        kl, d_kl = kl_terms_torch(x, ref_logp.to(dtype), family.kl_estimator)
        if family.bias_correction_kl:
            # beta kl r: its derivative in the log-ratio is beta kl r itself.
            per_token = per_token + beta * kl * ratio
            d_own = d_own + beta * d_kl * ratio
            d_log_ratio = d_log_ratio + beta * kl * ratio
        else:
            per_token = per_token + beta * kl
            d_own = d_own + beta * d_kl
    if sequence:
        row_term = torch.where(on, d_log_ratio, 0.0).sum(-1) / tokens.clamp(min=1)
        dlogp = d_own + row_term[:, None]
    else:
        dlogp = d_own + d_log_ratio
    scale = _row_scale(tokens, total, loss_agg, max_len)
    grad = (torch.where(on, dlogp, 0.0) * scale[:, None]).to(logp.dtype) if need_grad else None
    loss = (torch.where(on, per_token, 0.0).sum(-1) * scale).sum()

    def token_share(values: torch.Tensor | None) -> torch.Tensor:
        if values is None:
            return total * 0.0
        return torch.where(on, values.to(dtype), 0.0).sum() / total

    metrics = {
        "kl": token_share(kl),
        "clip_fraction": token_share(low | high),
        "clip_fraction_low": token_share(low),
        "clip_fraction_high": token_share(high),
        "dual_clip_fraction": token_share(dual),
        "ratio_mean": token_share(ratio),
    }
    return grad, loss, metrics


_compiled_family_rows = _CompiledOnce(_family_loss_rows_torch, "family loss")


def _family_loss_torch(
    logp: torch.Tensor,
    inputs: list[torch.Tensor | None],
    token_weights: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
    family: v.LossFamily,
    loss_agg: str,
    max_len: int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The family's CPU path: compiled like the paper's loss from COMPILE_MIN_TOKENS
    (one graph per family member), eager below, for float64 or when Inductor fails."""
    tensors = [*inputs, token_weights]
    args = (
        eps_low,
        eps_high,
        beta,
        family,
        loss_agg,
        max_len,
        torch.is_grad_enabled() and logp.requires_grad,
    )
    results = None
    if tensors[0].dtype != torch.float64 and logp.numel() >= COMPILE_MIN_TOKENS:
        contiguous = [None if t is None else t.contiguous() for t in tensors]
        results = _compiled_family_rows(*contiguous, *args)
    grad, loss, metrics = results or _family_loss_rows_torch(*tensors, *args)
    out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    loss = loss.to(out_dtype)
    if grad is not None:
        loss = _StoredGradLoss.apply(logp, grad.to(logp.dtype), loss)
    return loss, {name: value.to(out_dtype) for name, value in metrics.items()}


class _StoredGradLoss(torch.autograd.Function):
    """A loss whose gradient in ``logp`` the forward pass already computed: the backward
    is one scale by the upstream gradient."""

    @staticmethod
    def forward(ctx, logp, grad, loss):  # noqa: D102
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


class _FusedLoss(torch.autograd.Function):
    """Reduces the kernels' per-row partials (in a fixed order) to the loss and metrics;
    the backward scales the gradient the forward already computed."""

    @staticmethod
    def forward(ctx, logp, grad, partials, token_mean):  # noqa: D102
        out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
        loss_sum, kl_sum, clipped, tokens = partials.sum(dim=1).to(out_dtype).unbind()
        token_norm = 1.0 / tokens.clamp(min=1)
        grad_scale = token_norm if token_mean else torch.ones_like(token_norm)
        ctx.save_for_backward(grad, grad_scale)
        kl, clip_fraction = kl_sum * token_norm, clipped * token_norm
        ctx.mark_non_differentiable(kl, clip_fraction)
        return loss_sum * grad_scale, kl, clip_fraction

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_clip):  # noqa: D102
        grad, grad_scale = ctx.saved_tensors
        return grad * (grad_loss * grad_scale).to(grad.dtype), None, None, None


class _FusedFamilyLoss(torch.autograd.Function):
    """``_FusedLoss`` for the family kernels' partials [7, B] (see ``family_loss_row``):
    also the low-clipped and dual-clipped shares and the mean ratio."""

    @staticmethod
    def forward(ctx, logp, grad, partials, token_mean):  # noqa: D102
        out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
        loss_sum, kl_sum, clipped, tokens, low, dual, ratio = (
            partials.sum(dim=1).to(out_dtype).unbind()
        )
        token_norm = 1.0 / tokens.clamp(min=1)
        grad_scale = token_norm if token_mean else torch.ones_like(token_norm)
        ctx.save_for_backward(grad, grad_scale)
        metrics = tuple(
            value * token_norm for value in (kl_sum, clipped, low, clipped - low, dual, ratio)
        )
        ctx.mark_non_differentiable(*metrics)
        return (loss_sum * grad_scale, *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *_metrics):  # noqa: D102
        grad, grad_scale = ctx.saved_tensors
        return grad * (grad_loss * grad_scale).to(grad.dtype), None, None, None


# The metrics of the family, in the order ``_FusedFamilyLoss`` returns them.
_FAMILY_METRICS = (
    "kl",
    "clip_fraction",
    "clip_fraction_low",
    "clip_fraction_high",
    "dual_clip_fraction",
    "ratio_mean",
)


def _reduce_partials(
    logp: torch.Tensor, grad: torch.Tensor, partials: torch.Tensor, token_mean: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics from a token kernel's partials ([4, B] paper, [7, B] family)."""
    if partials.shape[0] == 4:
        loss, kl, clip_fraction = _FusedLoss.apply(logp, grad, partials, token_mean)
        return loss, {"kl": kl, "clip_fraction": clip_fraction}
    loss, *metrics = _FusedFamilyLoss.apply(logp, grad, partials, token_mean)
    return loss, dict(zip(_FAMILY_METRICS, metrics, strict=True))


def _kernel_family(family: v.LossFamily, token_weights: torch.Tensor | None) -> object:
    """The kernels' switches for ``family``; None for the paper's loss without weights
    (the kernels compiled without the family's code)."""
    if family.is_paper_loss and token_weights is None:
        return None
    from krpo_fast.kernels.policy_loss import family_switches

    return family_switches(*family)


# ------------------------------------------------------------------------- public ops


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_offsets: torch.Tensor | None = None,
    mode: str = d.ADV_MODE,
    process_var: float = d.PROCESS_VAR,
    meas_var: float = d.MEAS_VAR,
    init_mean: float = d.INIT_MEAN,
    init_var: float = d.INIT_VAR,
    eps: float = d.ADV_EPS,
) -> torch.Tensor:
    """Per-sequence advantages from the rewards of G samples per prompt, one launch on CUDA.

    Args:
        rewards: [B] float rewards, group after group, in rollout order (any float dtype;
            the math is float32). Must be finite.
        group_size: G for uniform groups (B = n_groups * G), or
        group_offsets: [n_groups + 1] int offsets of ragged groups (like ``cu_seqlens``).
        mode: ``"kalman"`` (KRPO: a scalar Kalman filter restarted per group,
            A_k = (r_k - x_k) / (sqrt(P_k) + eps)), ``"grpo"`` ((r - mean) / (std + eps),
            unbiased std; a group of one gets 0), ``"dr_grpo"`` (r - mean) or
            ``"batch_std"`` ((r - group mean) / (std over the batch + eps)). Equal
            rewards get exactly 0 in the GRPO modes, ``eps = 0`` included.
        process_var, meas_var, init_mean, init_var: the filter's Q, R, x_0 and P_0
            (the paper's defaults); used by ``"kalman"`` only.
        eps: added to the std (or sqrt(P)) before dividing.

    Returns:
        float32 [B] advantages on the rewards' device. Not differentiable: rewards are
        constants of the policy gradient.
    """
    if (
        group_offsets is None
        and type(group_size) is int
        and isinstance(rewards, torch.Tensor)
        and rewards.dtype == torch.float32
        and rewards.dim() == 1
        and rewards.is_cpu
        and rewards.is_contiguous()
        and rewards.numel()
        and not interpreter_enabled()
    ):
        # The common case, checked and computed in few calls.
        plan = _checked_plan(mode, group_size, process_var, meas_var, init_mean, init_var, eps)
        _check_group_size(group_size, rewards.numel())
        return _uniform_advantages(_constant(rewards), plan, check_finite=True)
    mode = _check_mode("mode", mode)
    q, r_var, m0, p0, eps = _check_kalman(process_var, meas_var, init_mean, init_var, eps)
    rewards, group_size, offsets, max_len = _check_rewards(rewards, group_size, group_offsets)
    rewards = rewards.detach()
    if _uses_triton(rewards):
        from krpo_fast.kernels.group_advantages import group_advantages_triton

        return group_advantages_triton(rewards, group_size, offsets, mode, q, r_var, m0, p0, eps)
    return _group_advantages_torch(
        rewards, group_size, offsets, max_len, mode, (q, r_var, m0, p0), eps
    )


def kalman_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_offsets: torch.Tensor | None = None,
    process_var: float = d.PROCESS_VAR,
    meas_var: float = d.MEAS_VAR,
    init_mean: float = d.INIT_MEAN,
    init_var: float = d.INIT_VAR,
    eps: float = d.ADV_EPS,
) -> torch.Tensor:
    """KRPO advantages: ``group_advantages(rewards, ..., mode="kalman")``; float32 [B]."""
    return group_advantages(
        rewards,
        group_size=group_size,
        group_offsets=group_offsets,
        mode="kalman",
        process_var=process_var,
        meas_var=meas_var,
        init_mean=init_mean,
        init_var=init_var,
        eps=eps,
    )


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = d.EPS_LOW,
    eps_high: float = d.EPS_HIGH,
    beta: float = d.BETA,
    loss_agg: str = d.LOSS_AGG,
    max_len: int | None = None,
    ratio_level: str = d.RATIO_LEVEL,
    loss_type: str = d.LOSS_TYPE,
    tau_pos: float = d.TAU_POS,
    tau_neg: float = d.TAU_NEG,
    delta: float | None = None,
    dual_clip: float | None = None,
    kl_estimator: str = d.KL_ESTIMATOR,
    bias_correction_kl: bool = False,
    token_weights: torch.Tensor | None = None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss with k3 KL (the paper's GRPOLoss), fused.

    Args:
        logp: [B, T] token log-probs of the current policy (float32, bf16, fp16).
        old_logp: [B, T] log-probs of the policy that sampled, or None for on-policy
            (the ratio is then taken against ``logp.detach()``, i.e. 1).
        ref_logp: [B, T] reference-model log-probs; required unless ``beta == 0``
            (then it is never read).
        advantages: [B] one advantage per sequence.
        mask: [B, T] bool, or integers / floats holding only 0 and 1 (checked: one
            device sync, none for bool); tokens with mask 0 are ignored entirely
            (their log-probs may be -inf or NaN).
        eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high].
        beta: weight of the k3 KL term exp(ref - logp) - (ref - logp) - 1.
        loss_agg: ``"seq-mean-token-mean"`` (paper: mean over sequences of each
            sequence's token mean; an all-masked sequence contributes 0),
            ``"token-mean"`` (sum over masked tokens / their count),
            ``"seq-mean-token-sum"`` (mean over sequences of token sums) or
            ``"seq-mean-token-sum-norm"`` (Dr. GRPO: token sums / ``max_len``, mean over
            sequences).
        max_len: the constant length of ``"seq-mean-token-sum-norm"``.
        ratio_level: ``"token"`` (r_t = exp(logp_t - old_t)) or ``"sequence"`` (GSPO:
            one ratio per sequence, exp of the mean of logp - old over its masked
            tokens, differentiated through the mean).
        loss_type: ``"clip"`` (the clipped surrogate), ``"cispo"``
            (-sg(min(r, eps_high)) A logp: ``eps_high`` is the cap itself, e.g. 5.0) or
            ``"sapo"`` (-sigmoid(tau (r - 1)) 4 / tau A).
        tau_pos, tau_neg: SAPO's tau for A > 0 and for A <= 0.
        delta: clip only: cap of the unclipped ratio (TRL's two-sided clip), > 1 + eps_high.
        dual_clip: clip only: c > 1, rows with A < 0 lose at most -c A (verl's clip_ratio_c).
        kl_estimator: ``"k3"``, ``"k1"`` (logp - ref), ``"k2"`` ((logp - ref)^2 / 2) or
            ``"low_var_kl"`` (k3 clamped as verl's).
        bias_correction_kl: multiply the KL term by the ratio (TRL's
            use_bias_correction_kl), with its gradient.
        token_weights: [B, T] or [B] constant multipliers of each token's policy term
            (not of its KL term): importance weights, entropy or off-policy masks.
            docs/loss_family.md has the exact formulas.
        check_finite: also check that log-probs are finite at masked-in tokens
            (one device sync; off by default for throughput).

    Returns:
        (loss, {"kl": mean KL estimate over masked tokens, "clip_fraction": share of
        masked tokens whose gradient the clip removes}), all 0-dim float32 tensors; the
        loss is differentiable in ``logp``. Any non-default family option adds
        "clip_fraction_low", "clip_fraction_high", "dual_clip_fraction" and "ratio_mean".
    """
    plain, logp, old_logp, ref_logp, mask = _check_loss_inputs(
        logp,
        old_logp,
        ref_logp,
        mask,
        advantages,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        check_finite,
    )
    advantages = v.check_advantages(advantages, "logp", logp, plain=plain)
    family = _check_family(
        eps_high,
        ratio_level,
        loss_type,
        tau_pos,
        tau_neg,
        delta,
        dual_clip,
        kl_estimator,
        bias_correction_kl,
    )
    token_weights = v.check_token_weights(token_weights, "logp", logp)
    return _fused_loss(
        logp,
        old_logp,
        ref_logp,
        mask,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        advantages,
        family,
        token_weights,
    )


def krpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int | None = None,
    group_offsets: torch.Tensor | None = None,
    adv_mode: str = d.ADV_MODE,
    process_var: float = d.PROCESS_VAR,
    meas_var: float = d.MEAS_VAR,
    init_mean: float = d.INIT_MEAN,
    init_var: float = d.INIT_VAR,
    eps: float = d.ADV_EPS,
    eps_low: float = d.EPS_LOW,
    eps_high: float = d.EPS_HIGH,
    beta: float = d.BETA,
    loss_agg: str = d.LOSS_AGG,
    max_len: int | None = None,
    ratio_level: str = d.RATIO_LEVEL,
    loss_type: str = d.LOSS_TYPE,
    tau_pos: float = d.TAU_POS,
    tau_neg: float = d.TAU_NEG,
    delta: float | None = None,
    dual_clip: float | None = None,
    kl_estimator: str = d.KL_ESTIMATOR,
    bias_correction_kl: bool = False,
    token_weights: torch.Tensor | None = None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fused KRPO loss: group advantages from rewards and the clipped policy loss,
    one launch on CUDA (``batch_std`` adds one reduction for the batch std).

    Equal to ``policy_loss(logp, old_logp, ref_logp, group_advantages(rewards, ...,
    mode=adv_mode), mask, ...)``; the arguments mean the same as there. Rows of
    ``logp`` are sequences in the order of ``rewards``.

    Returns:
        (loss, {"kl", "clip_fraction", "advantages" (float32 [B])}).
    """
    plain, logp, old_logp, ref_logp, mask = _check_loss_inputs(
        logp,
        old_logp,
        ref_logp,
        mask,
        rewards,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        check_finite,
    )
    mode = _check_mode("adv_mode", adv_mode)
    # NaN/inf rewards are checked below: the compiled path reads their sum from its graph.
    rewards, group_size, offsets, max_group_len = _check_rewards(
        rewards, group_size, group_offsets, plain=plain, check_finite=False
    )
    if not plain:
        if rewards.shape[0] != logp.shape[0]:
            raise ValueError(
                f"rewards must have one entry per sequence ({logp.shape[0]}), "
                f"got {rewards.shape[0]}"
            )
        v.check_same_device("rewards", rewards, "logp", logp)
    kalman = _check_kalman(process_var, meas_var, init_mean, init_var, eps)
    family = _check_family(
        eps_high,
        ratio_level,
        loss_type,
        tau_pos,
        tau_neg,
        delta,
        dual_clip,
        kl_estimator,
        bias_correction_kl,
    )
    token_weights = v.check_token_weights(token_weights, "logp", logp)
    rewards = _constant(rewards)
    float64 = _has_float64(logp, old_logp, ref_logp, rewards, token_weights)
    torch_path = float64 or not use_triton(logp)
    compilable = not float64 and token_weights is None and family.is_paper_loss and offsets is None
    if torch_path and compilable:
        fused = _krpo_loss_compiled(
            logp,
            old_logp,
            ref_logp,
            rewards,
            mask,
            group_size,
            mode,
            kalman,
            eps_low,
            eps_high,
            beta,
            loss_agg,
            max_len,
        )
        if fused is not None:
            return fused
    v.check_all_finite("rewards", rewards)
    if torch_path:
        advantages = _group_advantages_torch(
            rewards, group_size, offsets, max_group_len, mode, kalman[:4], kalman[4]
        )
        loss, metrics = _fused_loss(
            logp,
            old_logp,
            ref_logp,
            mask,
            eps_low,
            eps_high,
            beta,
            loss_agg,
            max_len,
            advantages,
            family,
            token_weights,
        )
        return loss, {**metrics, "advantages": advantages}
    from krpo_fast.kernels.krpo_loss import krpo_loss_triton

    row_weight, per_row_mean = _aggregation_weights(loss_agg, logp.shape[0], max_len)
    advantages, grad, partials = krpo_loss_triton(
        logp.detach(),
        old_logp,
        ref_logp,
        rewards,
        _mask_for_kernel(mask),
        group_size,
        offsets,
        mode,
        kalman[:4],
        kalman[4],
        eps_low,
        eps_high,
        beta,
        row_weight,
        per_row_mean,
        max_group_len,
        _kernel_family(family, token_weights),
        token_weights,
    )
    loss, metrics = _reduce_partials(logp, grad, partials, loss_agg == "token-mean")
    return loss, {**metrics, "advantages": advantages}


def _fused_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_agg: str,
    max_len: int | None,
    advantages: torch.Tensor,
    family: v.LossFamily = _PAPER_LOSS,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss on validated inputs: the kernel, whose per-row partials
    ``_FusedLoss`` reduces, or the torch path."""
    if not _uses_triton(logp, old_logp, ref_logp, advantages, token_weights):
        return _policy_loss_torch(
            logp,
            old_logp,
            ref_logp,
            advantages,
            mask,
            eps_low,
            eps_high,
            beta,
            loss_agg,
            max_len,
            family,
            token_weights,
        )
    from krpo_fast.kernels.policy_loss import policy_loss_triton

    row_weight, per_row_mean = _aggregation_weights(loss_agg, logp.shape[0], max_len)
    grad, partials = policy_loss_triton(
        logp.detach(),
        old_logp,
        ref_logp,
        advantages,
        _mask_for_kernel(mask),
        eps_low,
        eps_high,
        beta,
        row_weight,
        per_row_mean,
        _kernel_family(family, token_weights),
        token_weights,
    )
    return _reduce_partials(logp, grad, partials, loss_agg == "token-mean")
