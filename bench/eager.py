"""Vectorised eager PyTorch versions of the ops: the benchmarks' "eager" peer.

This is the batched torch a user would write without krpo-fast: uniform groups as a
``[n_groups, G]`` view, the Kalman filter as a loop over the G positions with every
group updated at once, ``log_softmax`` + ``gather`` on the full logits and the loss on
top with autograd. Wrapped in ``torch.compile`` it is also the benchmarks'
"compiled" peer, so it avoids data-dependent Python control flow.

Same math and defaults as ``krpo_fast.reference`` (the paper's loops); unlike those it
handles uniform groups only and computes in float32. Like the public ops, tensors are
positional and every hyperparameter is keyword-only.
"""

import torch

from krpo_fast import defaults

__all__ = [
    "group_advantages_eager",
    "krpo_loss_eager",
    "policy_loss_eager",
    "policy_loss_from_hidden_eager",
    "policy_loss_from_logits_eager",
    "selective_log_softmax_eager",
]


def group_advantages_eager(
    rewards: torch.Tensor,
    *,
    group_size: int,
    mode: str = defaults.ADV_MODE,
    process_var: float = defaults.PROCESS_VAR,
    meas_var: float = defaults.MEAS_VAR,
    init_mean: float = defaults.INIT_MEAN,
    init_var: float = defaults.INIT_VAR,
    eps: float = defaults.ADV_EPS,
) -> torch.Tensor:
    """Advantages of uniform groups ([B] rewards, B = n_groups * group_size), float32.

    Modes as ``krpo_fast.group_advantages``: ``kalman``, ``grpo``, ``dr_grpo``,
    ``batch_std``.
    """
    r = rewards.float().view(-1, group_size)
    if mode == "kalman":
        # P and K depend on the position only: scalars, not tensors.
        x = torch.full_like(r[:, 0], init_mean)
        p = init_var
        out = []
        for k in range(group_size):
            p_pred = p + process_var
            gain = p_pred / (p_pred + meas_var)
            x = x + gain * (r[:, k] - x)
            p = (1.0 - gain) * p_pred
            out.append((r[:, k] - x) / (p**0.5 + eps))
        return torch.stack(out, dim=1).view(-1)
    centred = r - r.mean(dim=1, keepdim=True)
    if mode == "dr_grpo":
        return centred.view(-1)
    if mode == "grpo":
        return (centred / (r.std(dim=1, keepdim=True) + eps)).view(-1)
    if mode == "batch_std":
        return (centred / (r.std() + eps)).view(-1)
    raise ValueError(f"unknown mode {mode!r}; choose from {defaults.ADVANTAGE_MODES}")


def policy_loss_eager(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = defaults.EPS_LOW,
    eps_high: float = defaults.EPS_HIGH,
    beta: float = defaults.BETA,
) -> torch.Tensor:
    """The clipped policy-gradient loss with k3 KL, "seq-mean-token-mean", in float32.

    ``logp``, ``old_logp``, ``ref_logp``, ``mask``: [B, T]; ``advantages``: [B].
    """
    logp = logp.float()
    m = mask.float()
    adv = advantages.float().unsqueeze(-1)
    log_ratio_ref = ref_logp.float() - logp
    kl = log_ratio_ref.exp() - log_ratio_ref - 1
    ratio = (logp - old_logp.float()).exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    per_token = beta * kl - surrogate
    # clamp: an all-masked sequence contributes 0 instead of 0 / 0.
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def krpo_loss_eager(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int,
    eps_low: float = defaults.EPS_LOW,
    eps_high: float = defaults.EPS_HIGH,
    beta: float = defaults.BETA,
) -> torch.Tensor:
    """Kalman advantages from the rewards, then :func:`policy_loss_eager`."""
    advantages = group_advantages_eager(rewards, group_size=group_size)
    return policy_loss_eager(
        logp, old_logp, ref_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high, beta=beta
    )


def selective_log_softmax_eager(
    logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = defaults.TEMPERATURE
) -> torch.Tensor:
    """``log_softmax(logits / T)`` at ``token_ids`` as the logit minus the row's
    logsumexp (no [.., V] log-prob tensor), in float32."""
    x = logits.float() / temperature
    picked = x.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def policy_loss_from_logits_eager(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = defaults.EPS_LOW,
    eps_high: float = defaults.EPS_HIGH,
    beta: float = defaults.BETA,
    temperature: float = defaults.TEMPERATURE,
) -> torch.Tensor:
    """:func:`selective_log_softmax_eager` then :func:`policy_loss_eager`."""
    logp = selective_log_softmax_eager(logits, token_ids, temperature=temperature)
    return policy_loss_eager(
        logp, old_logp, ref_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high, beta=beta
    )


def policy_loss_from_hidden_eager(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = defaults.EPS_LOW,
    eps_high: float = defaults.EPS_HIGH,
    beta: float = defaults.BETA,
    temperature: float = defaults.TEMPERATURE,
) -> torch.Tensor:
    """The full [B, T, V] logits ``hidden @ W.T``, then
    :func:`policy_loss_from_logits_eager`. ``hidden``: [B, T, H]; weight: [V, H]."""
    logits = hidden @ lm_head_weight.T
    return policy_loss_from_logits_eager(
        logits,
        token_ids,
        old_logp,
        ref_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        temperature=temperature,
    )
