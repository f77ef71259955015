"""KRPO inside verl (0.9.1): the ``"krpo"`` advantage estimator and the ``"krpo_fused"``
policy loss, registered through verl's own registries.

Importing this module registers both (``register()`` does it again, idempotently). verl
imports it by itself when krpo-fast is installed, through the ``verl.plugins`` entry
point; then select them in the config::

    algorithm.adv_estimator=krpo
    actor_rollout_ref.actor.policy_loss.loss_mode=krpo_fused

``"krpo"``: the reward of a response is the sum of its ``token_level_rewards``; responses
sharing a ``uid`` form a group, filtered in batch order (verl's rollout order), wherever
the group's rows lie in the batch. The advantage is broadcast over the response tokens
and masked; returns equal advantages (as verl's GRPO). verl's config rejects unknown
keys, so the filter's settings come from environment variables read at every call (set
them where the verl driver runs): ``KRPO_ADV_MODE`` ("kalman", or "grpo", "dr_grpo",
"batch_std"), ``KRPO_PROCESS_VAR``, ``KRPO_MEAS_VAR``, ``KRPO_INIT_MEAN``,
``KRPO_INIT_VAR``, ``KRPO_ADV_EPS`` (defaults: the paper's).

``"krpo_fused"``: krpo-fast's fused clipped loss, verl's ``"vanilla"``: clip range from
the actor's ``clip_ratio_low`` / ``clip_ratio_high`` (``clip_ratio`` where they are
unset), the dual clip ``clip_ratio_c`` (verl's default 3; off when there is no config),
the rollout correction's ``rollout_is_weights`` as the op's ``token_weights``, every
``loss_agg_mode`` of verl with its global-batch normalisation (``global_batch_info``:
dp size, global token and sequence counts, ``loss_scale_factor``). ``"krpo_fused_gspo"``
is the same with sequence-level ratios, verl's ``"gspo"`` (no dual clip there, as in
verl). Their KL weight is 0: verl adds its KL loss (``use_kl_loss``, ``kl_loss_type``)
outside the policy loss, in code that is not a registry; :func:`compute_kl_loss_krpo_fused`
is that KL loss on the fused op (k1/kl, k2/mse, low_var_kl/k3) for actors that call it.
Unlike verl's losses these do not clamp the log ratio (to [-20, 20], or the sequence's at
10). Advantages must be one value per response (outcome estimators such as ``krpo`` or
``grpo``; token-level advantages such as GAE's raise ``ValueError``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

from krpo_fast import defaults
from krpo_fast.ops import group_advantages, policy_loss

__all__ = [
    "ADV_ESTIMATOR",
    "POLICY_LOSS",
    "compute_krpo_advantage",
    "compute_kl_loss_krpo_fused",
    "compute_policy_loss_krpo_fused",
    "compute_policy_loss_krpo_fused_gspo",
    "register",
]

ADV_ESTIMATOR = "krpo"
POLICY_LOSS = "krpo_fused"
POLICY_LOSS_GSPO = "krpo_fused_gspo"
# verl's kl_loss_type names -> the op's kl_estimator (verl's "k3" is the clamped form).
KL_LOSS_TYPES = {
    "kl": "k1",
    "k1": "k1",
    "mse": "k2",
    "k2": "k2",
    "low_var_kl": "low_var_kl",
    "k3": "low_var_kl",
}

_ENV_SETTINGS = {
    "process_var": ("KRPO_PROCESS_VAR", defaults.PROCESS_VAR),
    "meas_var": ("KRPO_MEAS_VAR", defaults.MEAS_VAR),
    "init_mean": ("KRPO_INIT_MEAN", defaults.INIT_MEAN),
    "init_var": ("KRPO_INIT_VAR", defaults.INIT_VAR),
    "eps": ("KRPO_ADV_EPS", defaults.ADV_EPS),
}

# verl's agg_loss modes -> (our aggregation, whether verl normalises by sequences).
_AGGREGATIONS = {
    "token-mean": ("token-mean", False),
    "token-sum": ("token-mean", False),
    "seq-mean-token-mean": ("seq-mean-token-mean", True),
    "seq-mean-token-sum": ("seq-mean-token-sum", True),
    "seq-mean-token-sum-norm": ("seq-mean-token-sum-norm", True),
}


def _advantage_settings() -> dict[str, Any]:
    """The advantage op's keyword arguments from the ``KRPO_*`` environment variables."""
    settings: dict[str, Any] = {"mode": os.environ.get("KRPO_ADV_MODE", defaults.ADV_MODE)}
    for name, (variable, default) in _ENV_SETTINGS.items():
        value = os.environ.get(variable)
        try:
            settings[name] = default if value is None else float(value)
        except ValueError:
            raise ValueError(f"{variable} must be a number, got {value!r}") from None
    return settings


def _group_layout(index: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row order that makes every uid group contiguous and keeps batch order within a
    group, int32 offsets of the groups in that order)."""
    uids = np.asarray(index)
    if uids.shape != (n,):
        raise ValueError(f"index must hold one uid per response ({n}), got shape {uids.shape}")
    _, group_of_row = np.unique(uids, return_inverse=True)
    group_of_row = torch.from_numpy(group_of_row.reshape(-1).astype(np.int64))
    order = torch.sort(group_of_row, stable=True).indices
    offsets = torch.zeros(int(group_of_row.max()) + 2, dtype=torch.int32)
    offsets[1:] = torch.bincount(group_of_row).cumsum(0)
    return order, offsets


def compute_krpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``"krpo"``: krpo-fast group advantages per uid group.

    Args:
        token_level_rewards: (bs, response_length) rewards; a response's reward is their sum.
        response_mask: (bs, response_length) mask of the response tokens.
        index: (bs,) uid of each response's prompt (verl's ``non_tensor_batch["uid"]``).
        config: verl's ``AlgoConfig`` (unused: settings come from ``KRPO_*`` variables).
        **kwargs: other inputs verl passes to estimators (ignored).

    Returns:
        (advantages, returns), both (bs, response_length) float32, zero outside the mask.
    """
    if index is None:
        raise ValueError("the krpo estimator needs the uid index that groups responses")
    rewards = token_level_rewards.sum(dim=-1)
    order, offsets = _group_layout(index, rewards.shape[0])
    order = order.to(rewards.device)
    grouped = group_advantages(
        rewards[order], group_offsets=offsets.to(rewards.device), **_advantage_settings()
    )
    advantages = torch.empty_like(grouped)
    advantages[order] = grouped
    advantages = advantages.unsqueeze(-1) * response_mask.to(advantages.dtype)
    return advantages, advantages


def _config_get(config: Any, key: str, default: Any) -> Any:
    """``config.get`` for verl's dataclass configs and DictConfigs; default when unset."""
    value = None if config is None else config.get(key, None)
    return default if value is None else value


def _row_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per response; ValueError when they vary across its tokens."""
    tokens = mask.sum(dim=-1)
    masked_advantages = torch.where(mask, advantages, 0.0)
    row_advantages = masked_advantages.sum(dim=-1) / tokens.clamp(min=1)
    spread = torch.where(mask, advantages - row_advantages.unsqueeze(-1), 0.0).abs().max()
    if spread > 1e-5 * (1.0 + row_advantages.abs().max()):
        raise ValueError(
            "krpo_fused needs one advantage per response (an outcome estimator such as krpo "
            "or grpo); these advantages vary across a response's tokens"
        )
    return row_advantages


def _fused_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor | None,
    ref_log_prob: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fused op with verl's clip settings, scaled to verl's ``agg_loss`` of the mode."""
    if loss_agg_mode not in _AGGREGATIONS:
        raise ValueError(
            f"unknown loss_agg_mode {loss_agg_mode!r}; expected one of {list(_AGGREGATIONS)}"
        )
    tokens = mask.sum(dim=-1)
    clip_ratio = _config_get(config, "clip_ratio", 0.2)
    info = _config_get(config, "global_batch_info", {})
    dp_size = info.get("dp_size") or 1
    ours, per_sequence = _AGGREGATIONS[loss_agg_mode]
    max_len = None
    if ours == "seq-mean-token-sum-norm":
        max_len = int(info.get("loss_scale_factor") or mask.shape[-1])
    loss, stats = policy_loss(
        log_prob,
        old_log_prob,
        ref_log_prob,
        advantages,
        mask,
        eps_low=_config_get(config, "clip_ratio_low", clip_ratio),
        eps_high=_config_get(config, "clip_ratio_high", clip_ratio),
        loss_agg=ours,
        max_len=max_len,
        **options,
    )

    # Our op normalises by the local micro-batch; verl by the global counts it passes
    # (the local ones when absent), times dp_size because data parallelism averages.
    if per_sequence:
        sequences = info.get("global_batch_size")
        if sequences is None:
            sequences = (tokens > 0).sum().clamp(min=1)  # verl skips empty responses
        scale = mask.shape[0] * dp_size / sequences
    elif loss_agg_mode == "token-sum":
        scale = tokens.sum() * dp_size
    else:
        total_tokens = info.get("batch_num_tokens")
        scale = 1.0 if total_tokens is None else tokens.sum() * dp_size / total_tokens
    return loss * scale, stats


def _policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    mask = response_mask.bool()
    loss, stats = _fused_loss(
        log_prob,
        old_log_prob,
        None,
        _row_advantages(advantages, mask),
        mask,
        loss_agg_mode,
        config,
        beta=0.0,
        token_weights=None if rollout_is_weights is None else rollout_is_weights.detach(),
        **options,
    )
    with torch.no_grad():
        # Masked-out tokens may hold any value (NaN, -inf): select, do not multiply.
        log_ratio = torch.where(mask, old_log_prob - log_prob, 0.0)
        ppo_kl = log_ratio.sum() / mask.sum().clamp(min=1)
    metrics = {
        "actor/pg_clipfrac": stats["clip_fraction"].item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": stats["dual_clip_fraction"].item()
        if "dual_clip_fraction" in stats
        else 0.0,
    }
    return loss, metrics


def compute_policy_loss_krpo_fused(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``"krpo_fused"``: krpo-fast's fused clipped loss (no KL term).

    Args:
        old_log_prob, log_prob: (bs, response_length) log-probs of the sampling and the
            current policy (gradients flow to ``log_prob``).
        advantages: (bs, response_length), constant over each response's tokens.
        response_mask: (bs, response_length) bool mask.
        loss_agg_mode: one of verl's aggregations (see the module docstring).
        config: verl's ``ActorConfig`` (clip ratios, ``clip_ratio_c``,
            ``global_batch_info``) or None for the defaults (clip 0.2, no dual clip,
            local normalisation).
        rollout_is_weights: (bs, response_length) weights of verl's rollout correction,
            multiplying the policy term, or None.

    Returns:
        (loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}) as
        verl's losses return them.
    """
    dual_clip = _config_get(config, "clip_ratio_c", None)
    return _policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        dual_clip=dual_clip,
    )


def compute_policy_loss_krpo_fused_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``"krpo_fused_gspo"``: ``"krpo_fused"`` with one ratio per
    response, the geometric mean of its token ratios (GSPO; verl's ``"gspo"``, whose
    loss and gradient it equals, with ``rollout_is_weights`` constant over each response
    as verl's sequence-level correction gives them; token-level weights give verl's
    loss, but the gradient of TRL's GSPO, through the ratio's mean). No dual clip, as in
    verl's."""
    return _policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        ratio_level="sequence",
    )


def compute_kl_loss_krpo_fused(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    kl_loss_type: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
    config: Any = None,
) -> torch.Tensor:
    """verl's KL loss, ``agg_loss(kl_penalty(log_prob, ref_log_prob, kl_loss_type))``,
    through the fused op: its KL term alone (zero advantages, weight 1).

    ``kl_loss_type``: verl's ``kl``/``k1``, ``mse``/``k2``, ``low_var_kl``/``k3`` (verl's
    ``k3`` is the clamped estimator). ``abs``, ``full`` and the straight-through ``+``
    forms are not fused: ValueError.
    """
    if kl_loss_type not in KL_LOSS_TYPES:
        raise ValueError(
            f"kl_loss_type {kl_loss_type!r} is not fused; expected one of {list(KL_LOSS_TYPES)}"
        )
    mask = response_mask.bool()
    loss, _ = _fused_loss(
        log_prob,
        None,
        ref_log_prob,
        torch.zeros(mask.shape[0], dtype=log_prob.dtype, device=log_prob.device),
        mask,
        loss_agg_mode,
        config,
        beta=1.0,
        kl_estimator=KL_LOSS_TYPES[kl_loss_type],
    )
    return loss


def register() -> None:
    """Register ``"krpo"``, ``"krpo_fused"`` and ``"krpo_fused_gspo"`` with verl
    (idempotent)."""
    register_adv_est(ADV_ESTIMATOR)(compute_krpo_advantage)
    register_policy_loss(POLICY_LOSS)(compute_policy_loss_krpo_fused)
    register_policy_loss(POLICY_LOSS_GSPO)(compute_policy_loss_krpo_fused_gspo)


register()
