"""Importance weights that correct for the rollout engine's log-probs differing from
the trainer's (vLLM's bf16 kernels, another precision, a stale copy of the weights).

The samples come from the engine's distribution q, the loss assumes the trainer's
p (its log-probs at rollout time, ``old_logp``). Reweighting each sample by p / q,
bounded, removes most of that bias; TRL, verl and most current trainers do it. The
weights returned here go into the loss ops' ``token_weights``.
"""

import math

import torch

from krpo_fast._validation import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_mask_values,
    check_same_device,
    check_same_shape,
    check_tensor,
)

__all__ = ["ROLLOUT_CORRECTION_MODES", "rollout_correction"]

ROLLOUT_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _check_bound(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {value}")
    return float(value)


def _counted_stats(
    values: torch.Tensor, counted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, min and max of ``values`` where ``counted``; all 1 (no correction) when
    nothing is counted. No device sync."""
    one = torch.ones((), dtype=values.dtype, device=values.device)
    if values.numel() == 0:
        return one, one, one
    n_counted = counted.sum()
    mean = torch.where(counted, values, 0).sum() / n_counted.clamp(min=1)
    low = torch.where(counted, values, math.inf).amin()
    high = torch.where(counted, values, -math.inf).amax()
    has_any = n_counted > 0
    return tuple(torch.where(has_any, stat, one) for stat in (mean, low, high))


def rollout_correction(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bounded importance weights p_old / q_sampler for the sampled tokens, TRL's way.

    ``old_logp``, ``sampler_logp`` and ``mask`` are [B, T]: the trainer's log-probs of
    the sampled tokens at rollout time, the engine's log-probs of the same tokens,
    and the completion mask. Per masked token d = old - sampler; a NaN (a token the
    engine could not score) counts as no mismatch, d = 0. Then, by ``mode``:

    - ``token_truncate``: w_t = clamp(exp(d_t), clip_min, clip_max), shape [B, T].
    - ``token_mask``: w_t = exp(d_t), or 0 outside [clip_min, clip_max], [B, T].
    - ``sequence_truncate``: w_i = clamp(exp(sum of d over the row), ...), shape [B]:
      the ratio of the whole sequence's probabilities (a SUM of log ratios, as TRL
      1.16 and verl do, not the mean that makes the GSPO ratio).
    - ``sequence_mask``: w_i = exp(sum of d), or 0 outside the bounds, shape [B].

    A missing bound (None) does not act; the ``*_truncate`` modes need at least one.
    Token weights at masked-out positions are 0; a row without tokens has d = 0. The
    weights are constants (no gradient), float32 or float64 like the inputs.

    Metrics (0-dim tensors, no device sync): ``weight_mean``/``weight_min``/
    ``weight_max`` over the masked tokens (token modes) or over the rows that have
    tokens (sequence modes; TRL also counts empty rows, as weight 1), 1.0 when there
    are none; ``clipped_fraction``, the share of those tokens or rows whose ratio lay
    outside the bounds (zeroed by the mask modes, truncated by the others);
    ``mismatch_kl``, the k3 estimate of KL(sampler || trainer), exp(d) - 1 - d
    averaged over masked tokens the engine scored; ``logp_diff_mean`` and
    ``logp_diff_max`` of |d| over the same tokens.

    A cheap elementwise pass and a row sum, in vectorised torch on any device: a
    Triton kernel would save nothing measurable here.
    """
    old_logp = check_tensor("old_logp", old_logp, ndim=2, dtypes=FLOAT_DTYPES)
    sampler_logp = check_tensor("sampler_logp", sampler_logp, ndim=2, dtypes=FLOAT_DTYPES)
    mask = check_tensor("mask", mask, ndim=2, dtypes=MASK_DTYPES)
    for name, value in (("sampler_logp", sampler_logp), ("mask", mask)):
        check_same_shape(name, value, "old_logp", old_logp)
        check_same_device(name, value, "old_logp", old_logp)
    check_mask_values(mask)
    if mode not in ROLLOUT_CORRECTION_MODES:
        raise ValueError(f"mode must be one of {ROLLOUT_CORRECTION_MODES}, got {mode!r}")
    clip_min = _check_bound("clip_min", clip_min)
    clip_max = _check_bound("clip_max", clip_max)
    if clip_max == 0:
        raise ValueError("clip_max must be > 0 or None (0 would zero every weight)")
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"clip_min ({clip_min}) must be < clip_max ({clip_max})")
    truncate = mode.endswith("_truncate")
    if truncate and clip_min is None and clip_max is None:
        raise ValueError(f"mode={mode!r} needs clip_min or clip_max (both are None)")

    dtype = torch.promote_types(
        torch.promote_types(old_logp.dtype, sampler_logp.dtype), torch.float32
    )
    selected = mask.bool()
    raw_diff = old_logp.detach().to(dtype) - sampler_logp.detach().to(dtype)
    scored = selected & ~raw_diff.isnan()
    diff = torch.where(scored, raw_diff, 0.0)

    sequence_level = mode.startswith("sequence_")
    ratio = (diff.sum(-1) if sequence_level else diff).exp()
    counted = selected.any(-1) if sequence_level else selected
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (ratio < low) | (ratio > high)
    weights = ratio.clamp(min=clip_min, max=clip_max) if truncate else ratio.masked_fill(outside, 0)
    if not sequence_level:
        weights = weights.masked_fill(~selected, 0)

    weight_mean, weight_min, weight_max = _counted_stats(weights, counted)
    n_scored = scored.sum().clamp(min=1)
    abs_diff = diff.abs()
    metrics = {
        "weight_mean": weight_mean,
        "weight_min": weight_min,
        "weight_max": weight_max,
        "clipped_fraction": (outside & counted).sum().to(dtype) / counted.sum().clamp(min=1),
        "mismatch_kl": (torch.expm1(diff) - diff).sum() / n_scored,
        "logp_diff_mean": abs_diff.sum() / n_scored,
        "logp_diff_max": abs_diff.amax() if abs_diff.numel() else abs_diff.new_zeros(()),
    }
    return weights, metrics
