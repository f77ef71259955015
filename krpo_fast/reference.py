"""Eager PyTorch oracles that follow the paper's code (billhhh/KRPO_LLMs_RL).

Slow on purpose: a Python loop per group and per reward, exactly as the paper's
``KalmanFilter.update`` runs. These are the ground truth for the tests and the
"paper eager" baseline of the benchmarks; no hot path calls them.

``compute_dtype`` defaults to float32, the paper's dtype; the tests pass float64
to get a more accurate oracle.
"""

import torch

from krpo_fast import defaults as d

__all__ = [
    "group_advantages_reference",
    "kalman_advantages_reference",
    "policy_loss_reference",
    "token_logprobs_reference",
]


def _group_bounds(
    n: int, group_size: int | None, group_offsets: torch.Tensor | None
) -> list[tuple[int, int]]:
    if group_offsets is not None:
        offsets = [int(o) for o in group_offsets.tolist()]
        return list(zip(offsets[:-1], offsets[1:], strict=True))
    assert group_size is not None
    return [(start, start + group_size) for start in range(0, n, group_size)]


def kalman_advantages_reference(
    rewards: torch.Tensor,
    group_size: int | None = None,
    group_offsets: torch.Tensor | None = None,
    process_var: float = d.PROCESS_VAR,
    meas_var: float = d.MEAS_VAR,
    init_mean: float = d.INIT_MEAN,
    init_var: float = d.INIT_VAR,
    eps: float = d.ADV_EPS,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The paper's scalar Kalman filter, restarted for every group, in rollout order.

    For each reward r_k of a group: P- = P + Q; K = P- / (P- + R);
    x = x + K (r_k - x); P = (1 - K) P-; A_k = (r_k - x) / (sqrt(P) + eps).
    """
    flat = rewards.reshape(-1).to(compute_dtype).cpu()
    out = torch.empty_like(flat)
    for start, end in _group_bounds(flat.numel(), group_size, group_offsets):
        x = torch.tensor(init_mean, dtype=compute_dtype)
        p = torch.tensor(init_var, dtype=compute_dtype)
        for k in range(start, end):
            r = flat[k]
            p_pred = p + process_var
            gain = p_pred / (p_pred + meas_var)
            x = x + gain * (r - x)
            p = (1 - gain) * p_pred
            out[k] = (r - x) / (torch.sqrt(p) + eps)
    return out.to(torch.float32).to(rewards.device)


def group_advantages_reference(
    rewards: torch.Tensor,
    group_size: int | None = None,
    group_offsets: torch.Tensor | None = None,
    mode: str = d.ADV_MODE,
    eps: float = d.ADV_EPS,
    compute_dtype: torch.dtype = torch.float32,
    **kalman_kwargs: float,
) -> torch.Tensor:
    """Group-wise advantages, one group at a time.

    - ``kalman``: :func:`kalman_advantages_reference`.
    - ``grpo``: (r - mean_g) / (std_g + eps), std unbiased as ``torch.std``
      (the paper's ``group_advantages_baseline``). A group of one has no spread:
      its advantage is 0, not NaN.
    - ``dr_grpo``: r - mean_g.
    - ``batch_std``: (r - mean_g) / (std_batch + eps), std over all rewards.
    """
    if mode == "kalman":
        return kalman_advantages_reference(
            rewards,
            group_size,
            group_offsets,
            eps=eps,
            compute_dtype=compute_dtype,
            **kalman_kwargs,
        )
    flat = rewards.reshape(-1).to(compute_dtype).cpu()
    out = torch.empty_like(flat)
    batch_std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=compute_dtype)
    for start, end in _group_bounds(flat.numel(), group_size, group_offsets):
        if start == end:
            continue
        group = flat[start:end]
        centred = group - group.mean()
        if mode == "grpo":
            if group.numel() == 1:
                out[start:end] = 0.0
            else:
                out[start:end] = centred / (group.std() + eps)
        elif mode == "dr_grpo":
            out[start:end] = centred
        elif mode == "batch_std":
            out[start:end] = centred / (batch_std + eps)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return out.to(torch.float32).to(rewards.device)


def policy_loss_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = d.EPS_LOW,
    eps_high: float = d.EPS_HIGH,
    beta: float = d.BETA,
    loss_agg: str = d.LOSS_AGG,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's GRPOLoss (k3 KL, clipped surrogate), differentiable in ``logp``.

    Computed in the dtype of ``logp`` upcast to at least float32. A sequence whose
    mask is all zero contributes zero (the paper's masked mean would give NaN).
    Returns the loss and {"kl": mean k3 KL over masked tokens,
    "clip_fraction": share of masked tokens whose gradient the clip removes}.
    """
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp = logp.to(dtype)
    old = logp.detach() if old_logp is None else old_logp.to(dtype)
    m = mask.to(dtype)
    adv = advantages.to(dtype).unsqueeze(-1)
    if beta != 0.0:
        log_ratio_ref = ref_logp.to(dtype) - logp
        kl = log_ratio_ref.exp() - log_ratio_ref - 1
    else:
        kl = torch.zeros_like(logp)
    ratio = (logp - old).exp()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(surr1, surr2) + beta * kl

    masked_sum = (per_token * m).sum(-1)
    tokens = m.sum(-1)
    n_seq = logp.shape[0]
    if loss_agg == "seq-mean-token-mean":
        per_seq = torch.where(tokens > 0, masked_sum / tokens.clamp(min=1), 0.0)
        loss = per_seq.sum() / n_seq
    elif loss_agg == "token-mean":
        loss = masked_sum.sum() / tokens.sum().clamp(min=1)
    elif loss_agg == "seq-mean-token-sum":
        loss = masked_sum.sum() / n_seq
    elif loss_agg == "seq-mean-token-sum-norm":
        loss = masked_sum.sum() / (n_seq * max_len)
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")

    with torch.no_grad():
        clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
        total = m.sum().clamp(min=1)
        metrics = {
            "kl": (kl * m).sum() / total,
            "clip_fraction": (clipped.to(dtype) * m).sum() / total,
        }
    return loss, metrics


def token_logprobs_reference(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = d.TEMPERATURE
) -> torch.Tensor:
    """log_softmax(logits / T) gathered at ``token_ids`` (the paper's
    ``sequence_log_probs_from_logits``), in float32 or better."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logprobs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    return logprobs.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
