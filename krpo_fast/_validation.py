"""Input checks shared by the public ops.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong
shape, device or value) with a message that names the offending argument, so that
nothing fails deep inside a kernel or silently returns garbage.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from krpo_fast import defaults as d
from krpo_fast.defaults import KL_ESTIMATORS, LOSS_AGGREGATIONS, LOSS_TYPES, RATIO_LEVELS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Token ids and offsets: every signed integer dtype and uint8 (torch's wider unsigned
# dtypes lack the indexing ops and are rejected here).
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
MASK_DTYPES = (torch.bool, *INT_DTYPES, *FLOAT_DTYPES)


def memoised_check(check: Callable) -> Callable:
    """``check`` of hashable settings, run once per distinct call (the same few floats
    and strings come on every step); unhashable arguments, which ``check`` rejects,
    take the uncached call. Checks that raise are not cached."""
    cached = functools.lru_cache(maxsize=64, typed=True)(check)

    @functools.wraps(check)
    def run(*args: object, **kwargs: object) -> object:
        try:
            return cached(*args, **kwargs)
        except TypeError:  # unhashable, or the check's own TypeError: raise it uncached
            return check(*args, **kwargs)

    return run


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of an allowed rank and dtype; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor (a shape without data): pass real values")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(
                f"{name} must have {want} dimension(s), got shape {tuple(value.shape)}"
            )
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {value.dtype}")
    return value


def check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, "
            f"got {tuple(value.shape)}"
        )


def check_same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(
            f"{name} is on {value.device} but {ref_name} is on {ref.device}; "
            "move them to the same device"
        )


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_finite_number(name: str, value: float, *, minimum: float | None = None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_all_finite(name: str, value: torch.Tensor) -> None:
    """Raise if ``value`` holds NaN or inf (one device sync: use on small tensors)."""
    # A finite sum means finite elements (a cheaper pass than isfinite).
    check_finite_total(name, value, value.sum().item())


def check_finite_total(name: str, value: torch.Tensor, total: float) -> None:
    """Raise if ``value`` holds NaN or inf, given ``total``: a number computed from
    ``value`` (its sum, or a sum of results) that is NaN or inf whenever ``value``
    holds one. A non-finite total of finite values (an overflow) only costs a full
    check."""
    if math.isfinite(total):
        return
    if not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite, found {value[tuple(bad)].item()} at {bad}")


def plain_loss_tensors(
    logp: object,
    old_logp: object,
    ref_logp: object,
    mask: object,
    per_row: object,
) -> bool:
    """Whether a loss's tensors are plainly valid: non-empty [B, T] float log-probs
    (``old_logp`` and ``ref_logp`` may be None), a bool [B, T] mask and a float [B]
    per-row tensor (advantages or rewards), all plain tensors on one device. Cheap
    attribute reads only, so the common call skips the one-by-one checks; any other
    input takes those, which name the argument at fault."""
    tensor = torch.Tensor
    if type(logp) is not tensor or type(mask) is not tensor or type(per_row) is not tensor:
        return False
    shape, device = logp.shape, logp.device
    if (
        len(shape) != 2
        or not shape.numel()
        or device.type == "meta"
        or logp.dtype not in FLOAT_DTYPES
        or mask.dtype is not torch.bool
        or mask.shape != shape
        or mask.device != device
        or per_row.dtype not in FLOAT_DTYPES
        or per_row.shape != shape[:1]
        or per_row.device != device
    ):
        return False
    for value in (old_logp, ref_logp):
        if value is not None and (
            type(value) is not tensor
            or value.dtype not in FLOAT_DTYPES
            or value.shape != shape
            or value.device != device
        ):
            return False
    return True


def check_loss_args(
    ref_name: str,
    ref: torch.Tensor,
    old_logp: object,
    ref_logp: object,
    mask: object,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_agg: str,
    max_len: int | None,
    *,
    plain: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Check the policy-loss arguments against the [B, T] tensor ``ref`` (named
    ``ref_name``); return (old_logp, ref_logp or None when beta == 0, mask). ``plain``:
    ``plain_loss_tensors`` vouched for the tensors, only the settings are left."""
    check_loss_settings(eps_low, eps_high, beta, loss_agg, max_len)
    if beta != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta != 0 (pass beta=0.0 to skip the KL term)")
    ref_logp = ref_logp if beta != 0.0 else None
    if plain:
        return old_logp, ref_logp, mask
    for name, value in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if value is not None:
            check_tensor(name, value, ndim=2, dtypes=FLOAT_DTYPES)
            check_same_shape(name, value, ref_name, ref)
            check_same_device(name, value, ref_name, ref)
    mask = check_tensor("mask", mask, ndim=2, dtypes=MASK_DTYPES)
    check_same_shape("mask", mask, ref_name, ref)
    check_same_device("mask", mask, ref_name, ref)
    check_mask_values(mask)
    return old_logp, ref_logp, mask


@memoised_check
def check_loss_settings(
    eps_low: float, eps_high: float, beta: float, loss_agg: str, max_len: int | None
) -> None:
    """The policy loss's scalar settings."""
    check_finite_number("eps_low", eps_low, minimum=0.0)
    check_finite_number("eps_high", eps_high, minimum=0.0)
    check_finite_number("beta", beta, minimum=0.0)
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
    if loss_agg == "seq-mean-token-sum-norm":
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(
                f"max_len must be a positive int with loss_agg={loss_agg!r}, got {max_len!r}"
            )


def check_mask_values(mask: torch.Tensor) -> None:
    """A mask selects tokens: bool, or numbers that are all 0 or 1 (one device sync;
    none for a bool mask). Weights, negative or NaN values are rejected."""
    if mask.dtype == torch.bool or mask.numel() == 0:
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        value = mask[bad.nonzero()[0].unbind()].item()
        raise ValueError(
            f"mask must be bool or hold only 0 and 1, found {value}; "
            "token weights are not supported"
        )


def check_advantages(
    advantages: object, ref_name: str, ref: torch.Tensor, *, plain: bool = False
) -> torch.Tensor:
    """One float advantage per row of ``ref``, on its device; returned detached, contiguous.
    ``plain``: ``plain_loss_tensors`` vouched for it already."""
    if not plain:
        advantages = check_tensor("advantages", advantages, ndim=1, dtypes=FLOAT_DTYPES)
        if advantages.shape[0] != ref.shape[0]:
            raise ValueError(
                f"advantages must have one entry per sequence ({ref.shape[0]}), "
                f"got {advantages.shape[0]}"
            )
        check_same_device("advantages", advantages, ref_name, ref)
    # Each call costs a dispatch even when there is nothing to do: only when needed.
    if advantages.requires_grad:
        advantages = advantages.detach()
    return advantages if advantages.is_contiguous() else advantages.contiguous()


class LossFamily(NamedTuple):
    """The validated options of the loss family (docs/loss_family.md); hashable, so it
    can key caches and kernel variants. ``delta`` / ``dual_clip`` None mean off."""

    ratio_level: str = d.RATIO_LEVEL
    loss_type: str = d.LOSS_TYPE
    tau_pos: float = d.TAU_POS
    tau_neg: float = d.TAU_NEG
    delta: float | None = None
    dual_clip: float | None = None
    kl_estimator: str = d.KL_ESTIMATOR
    bias_correction_kl: bool = False

    @property
    def is_paper_loss(self) -> bool:
        """True for the paper's loss: the defaults' fast paths apply (tau is unused)."""
        return (
            self.ratio_level == "token"
            and self.loss_type == "clip"
            and self.delta is None
            and self.dual_clip is None
            and self.kl_estimator == "k3"
            and not self.bias_correction_kl
        )


@memoised_check
def check_loss_family(
    *,
    eps_high: float,
    ratio_level: object,
    loss_type: object,
    tau_pos: object,
    tau_neg: object,
    delta: object,
    dual_clip: object,
    kl_estimator: object,
    bias_correction_kl: object,
) -> LossFamily:
    """Check the loss-family keywords (``eps_high`` already checked); return them."""
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not isinstance(bias_correction_kl, bool):
        raise TypeError(
            f"bias_correction_kl must be a bool, got {type(bias_correction_kl).__name__}"
        )
    tau_pos = check_positive("tau_pos", tau_pos)
    tau_neg = check_positive("tau_neg", tau_neg)
    if loss_type != "clip" and (delta is not None or dual_clip is not None):
        raise ValueError(
            f"delta and dual_clip bound the clip surrogate, not loss_type={loss_type!r}: "
            "pass delta=None and dual_clip=None"
        )
    if delta is not None:
        delta = check_finite_number("delta", delta)
        if not delta > 1.0 + eps_high:
            raise ValueError(
                f"delta must be > 1 + eps_high = {1.0 + eps_high} (it caps the unclipped "
                f"ratio above the clip range), got {delta}"
            )
    if dual_clip is not None:
        dual_clip = check_finite_number("dual_clip", dual_clip)
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c), got {dual_clip}")
    if loss_type == "cispo" and not eps_high > 0:
        raise ValueError(
            f"eps_high is the ratio cap of loss_type='cispo' (e.g. 5.0) and must be > 0, "
            f"got {eps_high}"
        )
    return LossFamily(
        ratio_level,
        loss_type,
        tau_pos,
        tau_neg,
        delta,
        dual_clip,
        kl_estimator,
        bias_correction_kl,
    )


def check_token_weights(
    token_weights: object, ref_name: str, ref: torch.Tensor
) -> torch.Tensor | None:
    """Constant multipliers of the policy term: None, [B] (one per row) or [B, T] like
    ``ref``; float, on ``ref``'s device, finite (one device sync). Returned detached."""
    if token_weights is None:
        return None
    weights = check_tensor("token_weights", token_weights, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    want = tuple(ref.shape[: weights.dim()])
    if tuple(weights.shape) != want:
        raise ValueError(
            f"token_weights must have shape {tuple(ref.shape[:1])} (one per sequence) or "
            f"{tuple(ref.shape)} (one per token, like {ref_name}), got {tuple(weights.shape)}"
        )
    check_same_device("token_weights", weights, ref_name, ref)
    weights = weights.detach()
    check_all_finite("token_weights", weights)
    return weights


def check_entropy_coef(entropy_coef: object) -> float:
    return check_finite_number("entropy_coef", entropy_coef)
