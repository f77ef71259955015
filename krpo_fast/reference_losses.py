"""Float64 eager oracle of the extended per-token policy loss (the 2026 loss family).

One readable function, :func:`policy_loss_family_reference`, that spells out every
option the fused ops accept beyond the paper's loss: sequence-level ratios (GSPO),
the CISPO and SAPO surrogates, TRL's two-sided clip (``delta``), verl's dual clip,
four KL estimators, per-token weights and the four aggregations. It is slow and
clear on purpose: the kernels and the CPU paths are checked against it, and it is
itself checked against TRL's and verl's own loss code in the tests. Autograd gives
its gradient; nothing here is fused. The semantics are written out in
``docs/loss_family.md``.
"""

import torch

from krpo_fast.defaults import LOSS_AGGREGATIONS

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "RATIO_LEVELS",
    "high_entropy_weights_reference",
    "kl_estimate_reference",
    "off_policy_weights_reference",
    "policy_loss_family_reference",
]

RATIO_LEVELS = ("token", "sequence")
LOSS_TYPES = ("clip", "cispo", "sapo")
KL_ESTIMATORS = ("k3", "k1", "k2", "low_var_kl")


def kl_estimate_reference(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    With d = ref - logp: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1, and low_var_kl =
    k3 with d clamped to [-20, 20] and the result clamped to [-10, 10] (verl's).
    """
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return torch.expm1(d) - d
    if estimator == "low_var_kl":
        d = d.clamp(-20.0, 20.0)
        return (torch.expm1(d) - d).clamp(-10.0, 10.0)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def high_entropy_weights_reference(
    entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float
) -> torch.Tensor:
    """TRL's ``top_entropy_quantile`` as float64 token weights: 1 for the masked tokens
    whose entropy is at least the (1 - top_quantile) quantile of all masked tokens'
    entropies (``torch.quantile`` in float32, as TRL takes it), 0 elsewhere."""
    m = mask.bool()
    if not m.any():
        return torch.zeros(entropy.shape, dtype=torch.float64, device=entropy.device)
    threshold = torch.quantile(entropy[m].float(), 1 - top_quantile)
    return ((entropy >= threshold) & m).to(torch.float64)


def off_policy_weights_reference(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's ``off_policy_mask_threshold``) as
    float64 row weights [B]: a row is kept (1) when its advantage is >= 0 or the mean
    over its masked tokens of sampler_logp - logp (current policy, detached; a NaN
    counts as 0) is <= threshold, dropped (0) otherwise."""
    m = mask.bool()
    gap = torch.where(m, sampler_logp.to(torch.float64) - logp.detach().to(torch.float64), 0.0)
    mean_gap = gap.nan_to_num(nan=0.0).sum(-1) / m.sum(-1).clamp(min=1)
    return ((advantages >= 0) | (mean_gap <= threshold)).to(torch.float64)


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not a product: masked-out tokens may hold -inf or NaN log-probs.
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype))


def policy_loss_family_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.01,
    loss_agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    ratio_level: str = "token",
    loss_type: str = "clip",
    delta: float | None = None,
    dual_clip: float | None = None,
    kl_estimator: str = "k3",
    bias_correction_kl: bool = False,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The extended policy loss in float64, differentiable in ``logp``.

    Tensors: ``logp``, ``old_logp``, ``ref_logp``, ``mask`` are [B, T]; ``advantages``
    is [B]; ``token_weights`` is [B, T] or [B] (constants). ``old_logp=None`` is
    on-policy (ratio 1 with the gradient of ``logp``); ``ref_logp`` is read only when
    ``beta != 0``. Per token t of row i, with A = advantages[i] and w the token weight:

    - ratio: ``"token"``: r_t = exp(logp_t - old_t); ``"sequence"`` (GSPO): r_t = s_i =
      exp(mean over the row's masked tokens of logp - old), gradient through the mean.
    - policy term by ``loss_type``:
      ``"clip"``: -min(u A, clamp(r, 1 - eps_low, 1 + eps_high) A) with u = r, or
      u = min(r, delta) when ``delta`` is set (TRL's two-sided clip); with
      ``dual_clip`` = c > 1, rows with A < 0 are capped at -c A (verl's clip_ratio_c).
      ``"cispo"``: -sg(min(r, eps_high)) A logp_t (``eps_high`` is the cap itself).
      ``"sapo"``: -sigmoid(tau (r - 1)) 4 / tau A, tau = tau_pos if A > 0 else tau_neg.
    - loss_t = w policy_t + beta kl_t, the KL from ``kl_estimator``
      (:func:`kl_estimate_reference`), multiplied by r (with its gradient) when
      ``bias_correction_kl`` (TRL's use_bias_correction_kl); the weights never touch it.
    - aggregation over masked tokens (a row without tokens contributes zero):
      ``seq-mean-token-mean`` mean over all B rows of each row's token mean;
      ``token-mean`` sum / number of masked tokens; ``seq-mean-token-sum`` sum / B;
      ``seq-mean-token-sum-norm`` sum / (B max_len).

    Returns the float64 loss and metrics over masked tokens: ``kl`` (mean of the
    estimator, 0 when beta == 0), ``ratio_mean``, ``clip_fraction_low`` (A < 0 and
    r < 1 - eps_low), ``clip_fraction_high`` (A > 0 and r > 1 + eps_high; for cispo:
    A > 0 and r > eps_high), ``clip_fraction`` (low or high), ``dual_clip_fraction``
    (A < 0 and the dual clip's cap is the loss).
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if loss_type != "clip" and (delta is not None or dual_clip is not None):
        raise ValueError(
            f"delta and dual_clip bound the clip surrogate, not loss_type={loss_type!r}"
        )

    f64 = torch.float64
    m = mask.bool()
    logp64 = _masked(logp.to(f64), m)
    old = logp64.detach() if old_logp is None else _masked(old_logp.to(f64), m)
    adv = advantages.to(f64).unsqueeze(-1)
    tokens = m.sum(-1, keepdim=True)

    log_ratio = logp64 - old
    if ratio_level == "sequence":
        row_mean = log_ratio.sum(-1, keepdim=True) / tokens.clamp(min=1)
        ratio = row_mean.exp().expand_as(logp64)
    else:
        ratio = log_ratio.exp()

    low_clipped = (adv < 0) & (ratio < 1 - eps_low)
    high_clipped = (adv > 0) & (ratio > 1 + eps_high)
    dual_clipped = torch.zeros_like(m)
    if loss_type == "clip":
        unclipped = ratio if delta is None else ratio.clamp(max=delta)
        clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
        policy = -torch.min(unclipped * adv, clipped * adv)
        if dual_clip is not None:
            cap = -dual_clip * adv
            dual_clipped = (adv < 0) & (policy > cap)
            policy = torch.where(adv < 0, torch.min(policy, cap), policy)
    elif loss_type == "cispo":
        policy = -ratio.clamp(max=eps_high).detach() * adv * logp64
        low_clipped = torch.zeros_like(m)
        high_clipped = (adv > 0) & (ratio > eps_high)
    else:
        tau = torch.where(adv > 0, tau_pos, tau_neg).to(f64)
        policy = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        low_clipped = high_clipped = torch.zeros_like(m)

    if token_weights is not None:
        weights = token_weights.to(f64)
        policy = policy * (weights.unsqueeze(-1) if weights.dim() == 1 else weights)

    if beta != 0.0:
        kl = kl_estimate_reference(logp64, _masked(ref_logp.to(f64), m), kl_estimator)
        weighted_kl = kl * ratio if bias_correction_kl else kl
        per_token = policy + beta * weighted_kl
    else:
        kl = torch.zeros_like(logp64)
        per_token = policy

    row_sums = _masked(per_token, m).sum(-1)
    n_rows = logp.shape[0]
    if loss_agg == "seq-mean-token-mean":
        loss = (row_sums / tokens.squeeze(-1).clamp(min=1)).sum() / n_rows
    elif loss_agg == "token-mean":
        loss = row_sums.sum() / tokens.sum().clamp(min=1)
    elif loss_agg == "seq-mean-token-sum":
        loss = row_sums.sum() / n_rows
    else:
        if max_len is None:
            raise ValueError("max_len is required with loss_agg='seq-mean-token-sum-norm'")
        loss = row_sums.sum() / (n_rows * max_len)

    with torch.no_grad():
        total = m.sum().clamp(min=1)

        def token_mean(values: torch.Tensor) -> torch.Tensor:
            return _masked(values.to(f64), m).sum() / total

        metrics = {
            "kl": token_mean(kl),
            "ratio_mean": token_mean(ratio),
            "clip_fraction_low": token_mean(low_clipped),
            "clip_fraction_high": token_mean(high_clipped),
            "clip_fraction": token_mean(low_clipped | high_clipped),
            "dual_clip_fraction": token_mean(dual_clipped),
        }
    return loss, metrics
