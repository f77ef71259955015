"""Logits-level fused ops: token log-probs and the KRPO loss from logits or hidden states.

- :func:`selective_log_softmax`: log_softmax(logits / T) gathered at the tokens
  (optionally the entropy too) without a float32 copy of the logits.
- :func:`policy_loss_from_logits` / :func:`krpo_loss_from_logits`: the clipped
  surrogate + k3 KL loss (advantages given, or Kalman/GRPO advantages from
  rewards) in one read of the logits and one write of their gradient.
- :func:`policy_loss_from_hidden` / :func:`krpo_loss_from_hidden`: the same from
  the last hidden states and the LM-head weight, chunked over tokens so the full
  [N, V] logits never exist.

The loss ops compute the gradient in the forward pass (the loss is a scalar), so
their backward only scales it by the upstream gradient. Run backward once.

Dispatch (docs/design.md): CUDA -> compiled Triton; CPU -> vectorised torch over
blocks of rows (so no float32 copy of the whole logits), or the Triton kernel in
the interpreter when ``TRITON_INTERPRET=1``.
"""

from collections.abc import Iterator

import torch

from krpo_fast import defaults as d
from krpo_fast._dispatch import use_triton
from krpo_fast._validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_advantages,
    check_entropy_coef,
    check_loss_args,
    check_loss_family,
    check_positive,
    check_same_device,
    check_tensor,
    check_token_weights,
)
from krpo_fast.kernels.logits_loss import logits_loss_fwd
from krpo_fast.kernels.policy_loss import family_switches
from krpo_fast.kernels.selective_log_softmax import (
    selective_log_softmax_bwd,
    selective_log_softmax_fwd,
)
from krpo_fast.ops import (
    _fused_loss,
    family_token_terms_torch,
    group_advantages,
    token_terms_torch,
)

__all__ = [
    "krpo_loss_from_hidden",
    "krpo_loss_from_logits",
    "policy_loss_from_hidden",
    "policy_loss_from_logits",
    "selective_log_softmax",
]

# The CPU torch path works on blocks of about this many logits (a 16 MB float32
# temporary), so a huge bf16 batch is never upcast whole.
_TORCH_BLOCK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- validation


def _check_logits_and_ids(
    name: str, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float
) -> None:
    check_tensor(name, logits, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("token_ids", token_ids, dtypes=INT_DTYPES)
    check_same_device("token_ids", token_ids, name, logits)
    if tuple(token_ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"token_ids must have shape {tuple(logits.shape[:-1])} (the leading dims of "
            f"{name} {tuple(logits.shape)}), got {tuple(token_ids.shape)}"
        )
    check_positive("temperature", temperature)
    _check_ids_in_range(token_ids, logits.shape[-1])


def _as_index(token_ids: torch.Tensor) -> torch.Tensor:
    """Validated ids in a dtype that gather, scatter and the kernels index with."""
    if token_ids.dtype in (torch.int32, torch.int64):
        return token_ids
    return token_ids.to(torch.int32)


def _check_ids_in_range(token_ids: torch.Tensor, vocab_size: int) -> None:
    if vocab_size == 0:
        raise ValueError("the vocabulary (last dim of the logits / weight rows) is empty")
    if token_ids.numel() == 0:
        return
    # One sync on CUDA; an out-of-range id would otherwise read outside the row.
    lo, hi = (int(v) for v in torch.aminmax(token_ids.long()))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token_ids must be in [0, {vocab_size}), found {bad}")


def _check_loss_args(
    token_ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_agg: str,
    max_len: int | None,
    advantages: torch.Tensor,
) -> None:
    if token_ids.dim() != 2:
        raise ValueError(
            f"token_ids must be [B, T] for a sequence loss, got shape {tuple(token_ids.shape)}"
        )
    check_loss_args(
        "token_ids",
        token_ids,
        old_logp,
        ref_logp,
        mask,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
    )
    check_advantages(advantages, "token_ids", token_ids)


# ----------------------------------------------------------------------------- row layout


def _rows3d(x: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N, 1, V] view, [B, T, V] as is; the last dim made contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.unsqueeze(1) if x.dim() == 2 else x


def _row_blocks(
    x: torch.Tensor, grad: torch.Tensor | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Yield (first row, [rows, V] block of x, same block of grad) covering [B, T, V]
    views (x and an optional grad of the same shape) in row order."""
    B, T, V = x.shape
    rows = max(1, _TORCH_BLOCK_ELEMENTS // max(V, 1))
    try:
        flat = [x.view(B * T, V), None if grad is None else grad.view(B * T, V)]
    except RuntimeError:  # e.g. logits[:, :-1]: walk each sequence instead
        for b in range(B):
            for t0 in range(0, T, rows):
                grad_block = None if grad is None else grad[b, t0 : t0 + rows]
                yield b * T + t0, x[b, t0 : t0 + rows], grad_block
        return
    for r0 in range(0, B * T, rows):
        grad_block = None if flat[1] is None else flat[1][r0 : r0 + rows]
        yield r0, flat[0][r0 : r0 + rows], grad_block


def _scale_grad(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    """The backward of a loss whose gradient was stored in the forward pass."""
    if grad is None or torch.equal(grad_output, torch.ones_like(grad_output)):
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


# ---------------------------------------------------------------------- selective log-softmax


def _centred_rows(
    block: torch.Tensor, temperature: float, scratch: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 ``block / temperature`` centred on each row's max, the max [rows]): the
    only [rows, V] temporary, none when ``scratch`` says a float32 ``block`` may be
    overwritten. Centred as the kernel, logp = (x_y - M) - log S (see its docstring for
    why)."""
    if scratch and block.dtype == torch.float32:
        if temperature != 1.0:
            block.div_(temperature)
        row_max = block.amax(dim=-1, keepdim=True)
        return block.sub_(row_max), row_max.squeeze(1)
    if block.dtype == torch.float32 and temperature == 1.0:
        row_max = block.amax(dim=-1, keepdim=True)
        return block - row_max, row_max.squeeze(1)
    # A new float32 tensor either way (never the caller's logits), then in place.
    x = block / temperature if block.dtype == torch.float32 else block.float()
    if x.dtype != block.dtype and temperature != 1.0:
        x.div_(temperature)
    row_max = x.amax(dim=-1, keepdim=True)
    return x.sub_(row_max), row_max.squeeze(1)


def _sls_forward_torch(
    x3: torch.Tensor, ids: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x3.shape[0] * x3.shape[1]
    logp = torch.empty(n, dtype=torch.float32, device=x3.device)
    # (row max, log sum exp of the centred row); the backward only needs their sum.
    stats = torch.empty(2, n, dtype=torch.float32, device=x3.device)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    for r0, block, _ in _row_blocks(x3):
        r1 = r0 + block.shape[0]
        centred, row_max = _centred_rows(block, temperature)
        picked = centred.gather(1, ids[r0:r1, None]).squeeze(1)
        e = centred.exp() if with_entropy else centred.exp_()
        s = e.sum(-1)
        log_s = s.log()
        stats[0, r0:r1] = row_max
        stats[1, r0:r1] = log_s
        logp[r0:r1] = picked - log_s
        if with_entropy:
            entropy[r0:r1] = log_s - torch.where(e > 0, e * centred, 0.0).sum(-1) / s
    return logp, stats, entropy


def _softmax_times(
    block: torch.Tensor,
    row_max: torch.Tensor,
    scale: torch.Tensor,
    temperature: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """exp(block / temperature - row_max) * scale (row columns) in float32, in three
    passes, written into ``out`` when that is a float32 block (it may be ``block``).
    Callers fold 1 / S into ``scale``: the exponent stays centred, as in the forward."""
    target = {} if out is None or out.dtype != torch.float32 else {"out": out}
    if temperature == 1.0:
        dz = torch.sub(block, row_max, **target)
    else:
        dz = torch.add(-row_max, block, alpha=1.0 / temperature, **target)
    return dz.float().exp_().mul_(scale)


def _sls_backward_torch(
    x3: torch.Tensor,
    grad3: torch.Tensor,
    ids: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor,
    g_entropy: torch.Tensor | None,
    temperature: float,
) -> None:
    for r0, block, grad_block in _row_blocks(x3, grad3):
        r1 = r0 + block.shape[0]
        row_max, log_s = stats[0, r0:r1, None], stats[1, r0:r1, None]
        g = g_logp[r0:r1, None] / temperature
        if g_entropy is None:
            # dz = (onehot - p) g / T, written straight into the gradient when float32.
            dz = _softmax_times(block, row_max, -g * torch.exp(-log_s), temperature, grad_block)
            dz.scatter_add_(1, ids[r0:r1, None], g)
            if dz.data_ptr() != grad_block.data_ptr():
                grad_block.copy_(dz)
            continue
        log_p = block.float() / temperature - row_max - log_s
        p = log_p.exp()
        dz = -p * g
        dz.scatter_add_(1, ids[r0:r1, None], g)
        h = g_entropy[r0:r1, None] / temperature
        dz -= torch.where(p > 0, h * p * (log_p + entropy[r0:r1, None]), 0.0)
        grad_block.copy_(dz)


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, token_ids, temperature, with_entropy, inplace_backward):
        x3 = _rows3d(logits)
        ids = token_ids.reshape(-1).contiguous()
        if use_triton(logits):
            n = ids.numel()
            logp = torch.empty(n, dtype=torch.float32, device=logits.device)
            stats = torch.empty(2, n, dtype=torch.float32, device=logits.device)
            entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
            if n > 0:
                selective_log_softmax_fwd(
                    x3, ids, logp, stats[0], stats[1], entropy, temperature, with_entropy
                )
        else:
            logp, stats, entropy = _sls_forward_torch(x3, ids, temperature, with_entropy)
        ctx.save_for_backward(logits, ids, stats, entropy)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        logp = logp.view(token_ids.shape)
        entropy = entropy.view(token_ids.shape) if with_entropy else entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, ids, stats, entropy = ctx.saved_tensors
        if entropy.numel() == 0 or g_entropy is None:
            g_entropy = None
        else:
            g_entropy = g_entropy.reshape(-1).float().contiguous()
        if g_logp is None:
            g_logp = torch.zeros_like(stats[0])
        else:
            g_logp = g_logp.reshape(-1).float().contiguous()
        x3 = _rows3d(logits)
        if ctx.inplace_backward and x3.data_ptr() == logits.data_ptr():
            grad = logits
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad3 = _rows3d(grad)
        if use_triton(logits):
            if ids.numel() > 0:
                selective_log_softmax_bwd(
                    x3, grad3, ids, stats[0], stats[1], entropy, g_logp, g_entropy, ctx.temperature
                )
        else:
            _sls_backward_torch(x3, grad3, ids, stats, entropy, g_logp, g_entropy, ctx.temperature)
        return grad, None, None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = d.TEMPERATURE,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits / temperature).gather(-1, token_ids)`` in float32.

    Args:
        logits: [N, V] or [B, T, V], float32 / bf16 / fp16 / float64 (last dim
            contiguous, other strides free: ``logits[:, :-1]`` is not copied).
        token_ids: integer ids (int8 to int64, uint8) with the leading shape of
            ``logits``, in [0, V).
        temperature: > 0; the logits are divided by it.
        return_entropy: also return the per-token entropy of softmax(logits / T)
            (differentiable), computed in the same pass.
        inplace_backward: write the gradient over ``logits`` (saves one [N, V]
            buffer; ``logits`` is garbage after backward, so nothing else may
            need it, as in memory-saving trainers).

    Returns:
        logp (float32, shape of ``token_ids``), and the entropy when asked.
        Backward: dz = (onehot - softmax(z / T)) g / T (plus the entropy term),
        in the logits' dtype.
    """
    _check_logits_and_ids("logits", logits, token_ids, temperature)
    logp, entropy = _SelectiveLogSoftmax.apply(
        logits, _as_index(token_ids), float(temperature), return_entropy, inplace_backward
    )
    return (logp, entropy) if return_entropy else logp


# ----------------------------------------------------------------------------- fused loss rows


class _LossSetup:
    """Per-token and per-sequence inputs of the fused loss, flattened for the kernel."""

    def __init__(
        self,
        token_ids,
        old_logp,
        ref_logp,
        advantages,
        mask,
        beta,
        loss_agg,
        max_len,
        family=None,
        token_weights=None,
        entropy_coef=0.0,
        with_entropy=False,
        loss_family=None,
    ):
        """``family``: the kernels' switches of a token-ratio loss of the family (None:
        the paper's loss), ``loss_family`` its validated options (for the torch path);
        ``with_entropy``: the entropy metric (and ``entropy_coef``'s bonus) from the
        same pass."""
        B, T = token_ids.shape
        self.seq_len = T
        self.ids = token_ids.reshape(-1).contiguous()
        self.old = None if old_logp is None else old_logp.reshape(-1).float().contiguous()
        # beta = 0: ref is not read at all.
        self.ref = None if beta == 0.0 else ref_logp.reshape(-1).float().contiguous()
        self.mask = mask.reshape(-1).float().contiguous()
        self.advantages = advantages.float().contiguous()
        counts = self.mask.view(B, T).sum(-1)
        self.mask_total = counts.sum()
        if loss_agg == "seq-mean-token-mean":
            weight = torch.where(counts > 0, 1.0 / (B * counts.clamp(min=1e-30)), 0.0)
        elif loss_agg == "token-mean":
            weight = (1.0 / self.mask_total.clamp(min=1.0)).expand(B)
        elif loss_agg == "seq-mean-token-sum":
            weight = torch.full_like(counts, 1.0 / B)
        else:
            weight = torch.full_like(counts, 1.0 / (B * max_len))
        self.seq_weight = weight.contiguous()
        n = B * T
        self.loss_rows = torch.empty(n, dtype=torch.float32, device=token_ids.device)
        self.kl_rows = torch.zeros_like(self.loss_rows)
        self.clip_rows = torch.empty_like(self.loss_rows)
        self.family = family
        self.loss_family = loss_family
        self.weights = None
        if token_weights is not None:
            weights = token_weights[:, None] if token_weights.dim() == 1 else token_weights
            self.weights = weights.float().expand(B, T).reshape(-1).contiguous()
        self.entropy_coef = entropy_coef
        self.entropy_weight = None
        if with_entropy:
            self.entropy_weight = (-entropy_coef / self.mask_total.clamp(min=1.0)).reshape(1)
        # Rows of low-clipped, dual-clipped, mask * ratio, mask * entropy.
        self.extra_rows = None
        if family is not None or with_entropy:
            self.extra_rows = torch.zeros(4, n, dtype=torch.float32, device=token_ids.device)

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """The family's metrics beside loss, KL and clip fraction (after the kernel)."""
        if self.extra_rows is None:
            return {}
        total = self.mask_total.clamp(min=1.0)
        low, dual, ratio, entropy = self.extra_rows.sum(-1).unbind()
        metrics = {}
        if self.family is not None:
            metrics["clip_fraction_low"] = low / total
            metrics["clip_fraction_high"] = (self.clip_rows.sum() - low) / total
            metrics["dual_clip_fraction"] = dual / total
            metrics["ratio_mean"] = ratio / total
        if self.entropy_weight is not None:
            metrics["entropy"] = entropy / total
        return metrics

    def metrics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = self.mask_total.clamp(min=1.0)
        return self.loss_rows.sum(), self.kl_rows.sum() / total, self.clip_rows.sum() / total


def _loss_rows_torch(x2, grad2, row_start, setup, temperature, eps_low, eps_high, beta, scratch):
    """Torch twin of the fused kernel on a [rows, V] block (tokens row_start...);
    ``scratch``: the block may be overwritten (the gradient goes there, or nowhere)."""
    r1 = row_start + x2.shape[0]
    tok = slice(row_start, r1)
    seq = torch.arange(row_start, r1, device=x2.device) // setup.seq_len
    ids = setup.ids[tok, None]
    in_place = scratch and x2.dtype == torch.float32
    centred, row_max = _centred_rows(x2, temperature, in_place)
    picked = centred.gather(1, ids).squeeze(1)
    with_entropy = setup.entropy_weight is not None
    if with_entropy:
        # H = log S - sum e c / S (c = x - M, e = exp(c)): c is kept beside e. Clamped,
        # c = -inf gives e c = 0 instead of NaN (exp(-1e4) is 0 in float32 already).
        centred.clamp_(min=-1e4)
        exp_centred = centred.exp()
        total = exp_centred.sum(-1)
        entropy = total.log() - torch.linalg.vecdot(exp_centred, centred) / total
    else:
        total = centred.exp_().sum(-1)  # as the kernel: logp = (x_y - M) - log S
    logp = picked - total.log()
    adv = setup.advantages[seq]
    m = setup.mask[tok]
    w = m * setup.seq_weight[seq]
    active = m != 0
    old = None if setup.old is None else setup.old[tok]
    ref = None if setup.ref is None else setup.ref[tok]
    if setup.family is None:
        loss, dlogp, kl, clipped = token_terms_torch(logp, old, ref, adv, eps_low, eps_high, beta)
        if kl is not None:
            loss = loss + beta * kl
    else:
        weights = None if setup.weights is None else setup.weights[tok]
        loss, dlogp, kl, low, high, dual, ratio = family_token_terms_torch(
            logp, old, ref, adv, weights, eps_low, eps_high, beta, setup.loss_family
        )
        clipped = low | high
        setup.extra_rows[0, tok] = torch.where(active & low, m, 0.0)
        if dual is not None:
            setup.extra_rows[1, tok] = torch.where(active & dual, m, 0.0)
        setup.extra_rows[2, tok] = torch.where(active, m * ratio, 0.0)
    if setup.ref is not None:
        setup.kl_rows[tok] = torch.where(active, m * kl, 0.0).float()
    row_loss = torch.where(active, w * loss, 0.0).float()
    if with_entropy:
        entropy = torch.where(active, entropy, 0.0)
        setup.extra_rows[3, tok] = m * entropy
        row_loss += setup.entropy_weight * m * entropy
    setup.loss_rows[tok] = row_loss
    # clipped is None on-policy (old_logp None): nothing is clipped.
    setup.clip_rows[tok] = 0.0 if clipped is None else torch.where(active & clipped, m, 0.0)
    if grad2 is not None:
        g = (torch.where(active, w * dlogp, 0.0) / temperature).float()[:, None]
        if setup.entropy_coef != 0.0:
            # dz = (onehot - p) g - h p (c - log S + H), h = entropy weight * m / T:
            # e (a + b c) with a = (-g - h (H - log S)) / S, b = -h / S, then the one-hot.
            h = (setup.entropy_weight * m / temperature)[:, None]
            inv_total = 1.0 / total[:, None]
            a = (-g - h * (entropy[:, None] - total.log()[:, None])) * inv_total
            dz = centred.mul_(-h * inv_total).add_(a).mul_(exp_centred)
        elif with_entropy:
            dz = exp_centred.mul_(-g / total[:, None])
        elif in_place:
            # dz = (onehot - p) g: the block already holds exp(x - M) when worked in
            # place, else straight into the gradient when it is float32.
            dz = centred.mul_(-g / total[:, None])
        else:
            dz = _softmax_times(x2, row_max[:, None], -g / total[:, None], temperature, grad2)
        dz.scatter_add_(1, ids, g)
        # Rows of masked-out tokens may hold -inf or NaN logits: their gradient is 0,
        # not 0 * NaN (the CPU path, so finding them costs no device sync).
        masked_out = (~active).nonzero().squeeze(1)
        if masked_out.numel():
            dz.index_fill_(0, masked_out, 0.0)
        if dz.data_ptr() != grad2.data_ptr():
            grad2.copy_(dz)


def _loss_rows(x3, grad3, row_start, setup, temperature, eps_low, eps_high, beta, scratch=False):
    """Fused loss rows over a [B', T', V] view; dz into ``grad3`` (None: no gradient).
    ``scratch``: ``x3`` may be overwritten (it is ``grad3``, or a buffer of ours)."""
    if x3.shape[0] * x3.shape[1] == 0:
        return
    if use_triton(x3):
        n = x3.shape[0] * x3.shape[1]
        rows = slice(row_start, row_start + n)
        logits_loss_fwd(
            x3,
            x3 if grad3 is None else grad3,
            setup.ids,
            setup.old,
            setup.ref,
            setup.mask,
            setup.advantages,
            setup.seq_weight,
            setup.loss_rows[rows],
            setup.kl_rows[rows],
            setup.clip_rows[rows],
            row_start,
            setup.seq_len,
            temperature,
            eps_low,
            eps_high,
            beta,
            write_grad=grad3 is not None,
            family=setup.family,
            token_weights=setup.weights,
            extra_rows=None if setup.extra_rows is None else setup.extra_rows[:, rows],
            entropy_weight=setup.entropy_weight,
        )
        return
    for r0, block, grad_block in _row_blocks(x3, grad3):
        _loss_rows_torch(
            block, grad_block, row_start + r0, setup, temperature, eps_low, eps_high, beta, scratch
        )


# ------------------------------------------------------------- the loss family, composed
#
# Sequence-level ratios need every token's log-prob of a row before any token's
# gradient: one pass over the logits for the log-probs (and entropies), the family loss
# on the [B, T] log-probs (``krpo_fast.ops``), one pass writing dz. The logits are read
# twice and their gradient written once, as by the fused kernel.


class _FamilySetup:
    """Validated inputs of a family loss composed from log-probs."""

    def __init__(
        self,
        token_ids,
        old_logp,
        ref_logp,
        advantages,
        mask,
        token_weights,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        family,
        entropy_coef,
        with_entropy,
    ):
        self.shape = tuple(token_ids.shape)
        self.ids = token_ids.reshape(-1).contiguous()
        self.old = None if old_logp is None else old_logp.detach()
        self.ref = None if beta == 0.0 else ref_logp.detach()
        self.advantages = advantages
        self.mask = mask if mask.dtype == torch.bool else mask != 0
        self.token_weights = token_weights
        self.eps_low, self.eps_high, self.beta = float(eps_low), float(eps_high), float(beta)
        self.loss_agg, self.max_len, self.family = loss_agg, max_len, family
        self.entropy_coef = float(entropy_coef)
        self.with_entropy = with_entropy or entropy_coef != 0.0
        n = self.ids.numel()
        device = token_ids.device
        self.logp = torch.empty(n, dtype=torch.float32, device=device)
        self.stats = torch.empty(2, n, dtype=torch.float32, device=device)
        self.entropy = torch.empty(n if self.with_entropy else 0, device=device)

    def log_probs(self, x3: torch.Tensor, row_start: int, temperature: float) -> None:
        """Log-probs, softmax statistics (and entropies) of a [B', T', V] view's rows."""
        n = x3.shape[0] * x3.shape[1]
        if n == 0:
            return
        rows = slice(row_start, row_start + n)
        ids = self.ids[rows]
        if use_triton(x3):
            stats = self.stats[:, rows]
            selective_log_softmax_fwd(
                x3,
                ids,
                self.logp[rows],
                stats[0],
                stats[1],
                self.entropy[rows] if self.with_entropy else self.logp,
                temperature,
                self.with_entropy,
            )
            return
        logp, stats, entropy = _sls_forward_torch(x3, ids, temperature, self.with_entropy)
        self.logp[rows], self.stats[:, rows] = logp, stats
        if self.with_entropy:
            self.entropy[rows] = entropy

    def loss(self, need_grad: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and metrics from the log-probs; keeps d loss / d logp (and d loss /
        d entropy) per token for :meth:`write_grad`."""
        logp = self.logp.view(self.shape).detach().requires_grad_(need_grad)
        with torch.enable_grad():
            # The token kernel (or its torch path) on the log-probs: its gradient is
            # stored in the forward, autograd only scales it.
            loss, metrics = _fused_loss(
                logp,
                self.old,
                self.ref,
                self.mask,
                self.eps_low,
                self.eps_high,
                self.beta,
                self.loss_agg,
                self.max_len,
                self.advantages,
                self.family,
                self.token_weights,
            )
        self.g_logp = None
        if need_grad:
            (grad,) = torch.autograd.grad(loss, logp)
            self.g_logp = grad.reshape(-1).float().contiguous()
        loss = loss.detach()
        self.g_entropy = None
        if self.with_entropy:
            on = self.mask.reshape(-1)
            total = on.sum().clamp(min=1)
            entropy_mean = torch.where(on, self.entropy, 0.0).sum() / total
            metrics["entropy"] = entropy_mean
            if self.entropy_coef != 0.0:
                loss = loss - self.entropy_coef * entropy_mean
                self.g_entropy = (on * (-self.entropy_coef / total)).float().contiguous()
        self.metric_names = tuple(metrics)
        return loss.float(), {name: value.float() for name, value in metrics.items()}

    def write_grad(
        self, x3: torch.Tensor, grad3: torch.Tensor, row_start: int, temperature: float
    ) -> None:
        """dz of a [B', T', V] view's rows into ``grad3`` (which may be ``x3``)."""
        n = x3.shape[0] * x3.shape[1]
        if n == 0:
            return
        rows = slice(row_start, row_start + n)
        ids, stats = self.ids[rows], self.stats[:, rows]
        entropy = self.entropy[rows] if self.with_entropy else self.logp
        g_entropy = None if self.g_entropy is None else self.g_entropy[rows]
        if use_triton(x3):
            selective_log_softmax_bwd(
                x3,
                grad3,
                ids,
                stats[0],
                stats[1],
                entropy,
                self.g_logp[rows],
                g_entropy,
                temperature,
            )
        else:
            _sls_backward_torch(
                x3, grad3, ids, stats, entropy, self.g_logp[rows], g_entropy, temperature
            )
        # Masked-out rows may hold NaN or inf logits: their gradient is 0, not 0 * NaN
        # (written row by row: one sync on CUDA instead of a pass over every row).
        masked_out = (~self.mask.reshape(-1)[rows]).nonzero().squeeze(1)
        if masked_out.numel():
            t_view = grad3.shape[1]
            grad3[masked_out // t_view, masked_out % t_view] = 0.0


class _FamilyLossFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, setup, temperature, need_grad, inplace):
        x3 = _rows3d(logits)
        setup.log_probs(x3, 0, temperature)
        loss, metrics = setup.loss(need_grad)
        grad = None
        if need_grad:
            if inplace and x3.data_ptr() == logits.data_ptr():
                grad = logits
            else:
                grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            setup.write_grad(x3, _rows3d(grad), 0, temperature)
        ctx.grad = grad
        values = tuple(metrics.values())
        ctx.mark_non_differentiable(*values)
        return (loss, *values)

    @staticmethod
    def backward(ctx, grad_output, *_metrics):
        grad, ctx.grad = ctx.grad, None
        return _scale_grad(grad, grad_output), None, None, None, None


class _FamilyLossFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, setup, temperature, chunk_size, grad_hidden_needed, grad_weight_needed
    ):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        n = h2.shape[0]
        for r0 in range(0, n, chunk_size):
            logits = h2[r0 : r0 + chunk_size] @ weight.T
            setup.log_probs(logits.unsqueeze(1), r0, temperature)
            del logits
        need_dz = grad_hidden_needed or grad_weight_needed
        loss, metrics = setup.loss(need_dz)
        grad_hidden = torch.empty_like(h2) if grad_hidden_needed else None
        grad_weight = torch.zeros_like(weight) if grad_weight_needed else None
        if need_dz:
            on = setup.mask.reshape(-1)
            # The logits are recomputed per chunk: only one chunk of them ever exists.
            for r0 in range(0, n, chunk_size):
                h = h2[r0 : r0 + chunk_size]
                logits = h @ weight.T
                x3 = logits.unsqueeze(1)
                setup.write_grad(x3, x3, r0, temperature)
                if grad_hidden is not None:
                    torch.mm(logits, weight, out=grad_hidden[r0 : r0 + chunk_size])
                if grad_weight is not None:
                    active = on[r0 : r0 + chunk_size, None]
                    grad_weight.addmm_(logits.T, torch.where(active, h, 0.0))
                del logits, x3
        ctx.grads = (
            None if grad_hidden is None else grad_hidden.view(hidden.shape),
            grad_weight,
        )
        values = tuple(metrics.values())
        ctx.mark_non_differentiable(*values)
        return (loss, *values)

    @staticmethod
    def backward(ctx, grad_output, *_metrics):
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, (None, None)
        return (
            _scale_grad(grad_hidden, grad_output),
            _scale_grad(grad_weight, grad_output),
            *([None] * 5),
        )


def _metric_dict(setup: _FamilySetup, outputs: tuple[torch.Tensor, ...]) -> dict:
    """Metric names in the order ``_FamilySetup.loss`` returned them."""
    return dict(zip(setup.metric_names, outputs, strict=True))


# ----------------------------------------------------------------------------- loss from logits


class _LossFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, setup, temperature, eps_low, eps_high, beta, need_grad, inplace):
        x3 = _rows3d(logits)
        grad = None
        if need_grad:
            if inplace and x3.data_ptr() == logits.data_ptr():
                grad = logits
            else:
                grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _loss_rows(
            x3,
            None if grad is None else _rows3d(grad),
            0,
            setup,
            temperature,
            eps_low,
            eps_high,
            beta,
            scratch=grad is logits,
        )
        loss, kl, clip_fraction = setup.metrics()
        ctx.grad = grad
        ctx.mark_non_differentiable(kl, clip_fraction)
        return loss, kl, clip_fraction

    @staticmethod
    def backward(ctx, grad_output, _kl, _clip):
        grad, ctx.grad = ctx.grad, None
        return _scale_grad(grad, grad_output), None, None, None, None, None, None, None


def policy_loss_from_logits(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
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
    entropy_coef: float = d.ENTROPY_COEF,
    temperature: float = d.TEMPERATURE,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped-surrogate + k3-KL loss of ``policy_loss`` computed from logits.

    ``logp = log_softmax(logits / temperature)[token_ids]`` is never materialised:
    one kernel per token reads the logits once for the loss and writes
    d loss / d logits once (in the logits' dtype), so backward is a scale.

    Args:
        logits: [B, T, V] or [B * T, V] (any float dtype; last dim contiguous).
        token_ids: [B, T] integer ids in [0, V).
        old_logp, ref_logp: [B, T] log-probs (None: ratio 1 / no KL, needs beta 0).
        advantages: [B], one per sequence.
        mask: [B, T] bool, or numbers holding only 0 and 1; masked-out tokens never
            reach the loss or the gradient (their logits may be -inf or NaN).
        entropy_coef: subtract entropy_coef * (mean entropy of softmax(logits / T)
            over masked tokens) from the loss, with its gradient; the entropy comes
            from the same read of the logits as the log-probs.
        return_entropy: also return that mean entropy as the metric "entropy"
            (implied by a non-zero ``entropy_coef``).
        inplace_backward: store the gradient over ``logits`` (saves one buffer;
            ``logits`` holds the gradient afterwards).
        Others (the loss family: ratio_level, loss_type, tau_pos, tau_neg, delta,
        dual_clip, kl_estimator, bias_correction_kl, token_weights) as
        ``krpo_fast.ops.policy_loss``. Token ratios run in the fused kernel; sequence
        ratios need every log-prob of a row first, so they run as a log-softmax
        launch, the token kernel on the log-probs and a gradient launch (the same two
        reads of the logits; from hidden states the LM-head matmul is done twice).

    Returns:
        (loss, {"kl": mean KL estimate over masked tokens, "clip_fraction": share of
        masked tokens whose gradient the clip removes}); any family option adds
        "clip_fraction_low", "clip_fraction_high", "dual_clip_fraction", "ratio_mean",
        and the entropy "entropy".
    """
    _check_logits_and_ids_for_loss("logits", logits, token_ids, temperature)
    _check_loss_args(
        token_ids,
        old_logp,
        ref_logp,
        mask,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        advantages,
    )
    setup = _family_setup(
        token_ids,
        old_logp,
        ref_logp,
        advantages,
        mask,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        ratio_level,
        loss_type,
        tau_pos,
        tau_neg,
        delta,
        dual_clip,
        kl_estimator,
        bias_correction_kl,
        token_weights,
        entropy_coef,
        return_entropy,
    )
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    if isinstance(setup, _FamilySetup):
        outputs = _FamilyLossFromLogits.apply(
            logits, setup, float(temperature), need_grad, inplace_backward
        )
        return outputs[0], _metric_dict(setup, outputs[1:])
    if setup is None:
        setup = _LossSetup(
            _as_index(token_ids), old_logp, ref_logp, advantages, mask, beta, loss_agg, max_len
        )
    loss, kl, clip_fraction = _LossFromLogits.apply(
        logits,
        setup,
        float(temperature),
        float(eps_low),
        float(eps_high),
        float(beta),
        need_grad,
        inplace_backward,
    )
    return loss, {"kl": kl, "clip_fraction": clip_fraction, **setup.extra_metrics()}


def _family_setup(
    token_ids,
    old_logp,
    ref_logp,
    advantages,
    mask,
    eps_low,
    eps_high,
    beta,
    loss_agg,
    max_len,
    ratio_level,
    loss_type,
    tau_pos,
    tau_neg,
    delta,
    dual_clip,
    kl_estimator,
    bias_correction_kl,
    token_weights,
    entropy_coef,
    return_entropy,
) -> _LossSetup | _FamilySetup | None:
    """Check the loss-family options (the other arguments are checked already). Returns
    None for the paper's loss without entropy (the fused kernel's default variant), a
    ``_LossSetup`` for the fused kernel's (or its torch twin's) family variants with
    token ratios, else a ``_FamilySetup`` to compose the loss from log-probs."""
    family = check_loss_family(
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
    token_weights = check_token_weights(token_weights, "token_ids", token_ids)
    entropy_coef = check_entropy_coef(entropy_coef)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if (
        family.is_paper_loss
        and token_weights is None
        and entropy_coef == 0.0
        and not return_entropy
    ):
        return None
    if beta == 0.0:
        ref_logp = None
    if family.ratio_level == "token":
        return _LossSetup(
            _as_index(token_ids),
            old_logp,
            ref_logp,
            advantages,
            mask,
            beta,
            loss_agg,
            max_len,
            None if family.is_paper_loss and token_weights is None else family_switches(*family),
            token_weights,
            entropy_coef,
            return_entropy or entropy_coef != 0.0,
            family,
        )
    return _FamilySetup(
        _as_index(token_ids),
        old_logp,
        ref_logp,
        check_advantages(advantages, "token_ids", token_ids),
        mask,
        token_weights,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        family,
        entropy_coef,
        return_entropy,
    )


def _check_logits_and_ids_for_loss(
    name: str, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float
) -> None:
    check_tensor("token_ids", token_ids, ndim=2, dtypes=INT_DTYPES)
    check_tensor(name, logits, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    B, T = token_ids.shape
    want = (B, T) if logits.dim() == 3 else (B * T,)
    if tuple(logits.shape[:-1]) != want:
        raise ValueError(
            f"{name} must have leading shape {want} for token_ids of shape {(B, T)}, "
            f"got {tuple(logits.shape)}"
        )
    _check_logits_and_ids(name, logits, token_ids.reshape(want), temperature)


def _advantages(rewards: object, token_ids: object, **advantage_args: object) -> torch.Tensor:
    """Group advantages of ``rewards``, one per row of the [B, T] ``token_ids``."""
    check_tensor("token_ids", token_ids, ndim=2, dtypes=INT_DTYPES)
    check_tensor("rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES)
    check_same_device("rewards", rewards, "token_ids", token_ids)
    if rewards.shape[0] != token_ids.shape[0]:
        raise ValueError(
            f"rewards must have one value per sequence ({token_ids.shape[0]}), "
            f"got shape {tuple(rewards.shape)}"
        )
    return group_advantages(rewards, **advantage_args)


def krpo_loss_from_logits(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
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
    entropy_coef: float = d.ENTROPY_COEF,
    temperature: float = d.TEMPERATURE,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``krpo_loss`` starting from logits: group advantages from ``rewards``
    (``krpo_fast.ops.group_advantages``), then :func:`policy_loss_from_logits`.

    Returns (loss, {"kl", "clip_fraction", "advantages"}).
    """
    advantages = _advantages(
        rewards,
        token_ids,
        group_size=group_size,
        group_offsets=group_offsets,
        mode=adv_mode,
        process_var=process_var,
        meas_var=meas_var,
        init_mean=init_mean,
        init_var=init_var,
        eps=eps,
    )
    loss, metrics = policy_loss_from_logits(
        logits,
        token_ids,
        old_logp,
        ref_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        loss_agg=loss_agg,
        max_len=max_len,
        ratio_level=ratio_level,
        loss_type=loss_type,
        tau_pos=tau_pos,
        tau_neg=tau_neg,
        delta=delta,
        dual_clip=dual_clip,
        kl_estimator=kl_estimator,
        bias_correction_kl=bias_correction_kl,
        token_weights=token_weights,
        entropy_coef=entropy_coef,
        temperature=temperature,
        return_entropy=return_entropy,
        inplace_backward=inplace_backward,
    )
    metrics["advantages"] = advantages
    return loss, metrics


# ----------------------------------------------------------------------------- loss from hidden


class _LossFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        setup,
        temperature,
        eps_low,
        eps_high,
        beta,
        chunk_size,
        grad_hidden_needed,
        grad_weight_needed,
    ):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        n = h2.shape[0]
        need_dz = grad_hidden_needed or grad_weight_needed
        grad_hidden = torch.empty_like(h2) if grad_hidden_needed else None
        # Accumulated in the weight's dtype, as cuBLAS addmm does (fp32 inside a chunk).
        grad_weight = torch.zeros_like(weight) if grad_weight_needed else None
        for r0 in range(0, n, chunk_size):
            h = h2[r0 : r0 + chunk_size]
            logits = h @ weight.T  # [chunk, V]: the only per-chunk buffer; dz overwrites it
            x3 = logits.unsqueeze(1)
            _loss_rows(
                x3,
                x3 if need_dz else None,
                r0,
                setup,
                temperature,
                eps_low,
                eps_high,
                beta,
                scratch=True,
            )
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[r0 : r0 + chunk_size])
            if grad_weight is not None:
                # Hidden states of masked-out tokens may be non-finite: 0 * NaN would
                # reach the weight's gradient through dz.T @ h.
                active = setup.mask[r0 : r0 + chunk_size, None] != 0
                grad_weight.addmm_(logits.T, torch.where(active, h, 0.0))
            del logits, x3
        loss, kl, clip_fraction = setup.metrics()
        ctx.grads = (
            None if grad_hidden is None else grad_hidden.view(hidden.shape),
            grad_weight,
        )
        ctx.mark_non_differentiable(kl, clip_fraction)
        return loss, kl, clip_fraction

    @staticmethod
    def backward(ctx, grad_output, _kl, _clip):
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, (None, None)
        return (
            _scale_grad(grad_hidden, grad_output),
            _scale_grad(grad_weight, grad_output),
            *([None] * 8),
        )


def policy_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
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
    entropy_coef: float = d.ENTROPY_COEF,
    temperature: float = d.TEMPERATURE,
    chunk_size: int = d.CHUNK_SIZE,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`policy_loss_from_logits` with ``logits = hidden @ lm_head_weight.T``,
    never holding more than ``chunk_size`` rows of logits.

    Per chunk of tokens: the matmul (torch), the fused loss kernel writing dz over
    the chunk's logits, then grad_hidden[chunk] = dz @ W and grad_W += dz.T @ hidden.
    All gradients are computed in the forward pass; backward scales them. Peak
    extra memory is about chunk_size * V elements of the hidden dtype, plus the
    gradients of hidden and W. No bias (LM heads have none).

    Args:
        hidden: [B, T, H] or [B * T, H] last hidden states.
        lm_head_weight: [V, H], same dtype and device as ``hidden``.
        chunk_size: tokens per chunk (> 0).
        Others as :func:`policy_loss_from_logits`.
    """
    check_tensor("token_ids", token_ids, ndim=2, dtypes=INT_DTYPES)
    check_tensor("hidden", hidden, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("lm_head_weight", lm_head_weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_same_device("hidden", hidden, "token_ids", token_ids)
    check_same_device("lm_head_weight", lm_head_weight, "hidden", hidden)
    if lm_head_weight.dtype != hidden.dtype:
        raise TypeError(
            f"lm_head_weight dtype {lm_head_weight.dtype} must match hidden dtype {hidden.dtype}"
        )
    if lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, {hidden.shape[-1]}] for hidden of shape "
            f"{tuple(hidden.shape)}, got {tuple(lm_head_weight.shape)}"
        )
    B, T = token_ids.shape
    want = (B, T) if hidden.dim() == 3 else (B * T,)
    if tuple(hidden.shape[:-1]) != want:
        raise ValueError(
            f"hidden must have leading shape {want} for token_ids of shape {(B, T)}, "
            f"got {tuple(hidden.shape)}"
        )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be an int > 0, got {chunk_size!r}")
    check_positive("temperature", temperature)
    _check_ids_in_range(token_ids, lm_head_weight.shape[0])
    _check_loss_args(
        token_ids,
        old_logp,
        ref_logp,
        mask,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        advantages,
    )
    setup = _family_setup(
        token_ids,
        old_logp,
        ref_logp,
        advantages,
        mask,
        eps_low,
        eps_high,
        beta,
        loss_agg,
        max_len,
        ratio_level,
        loss_type,
        tau_pos,
        tau_neg,
        delta,
        dual_clip,
        kl_estimator,
        bias_correction_kl,
        token_weights,
        entropy_coef,
        return_entropy,
    )
    grad_on = torch.is_grad_enabled()
    if isinstance(setup, _FamilySetup):
        outputs = _FamilyLossFromHidden.apply(
            hidden,
            lm_head_weight,
            setup,
            float(temperature),
            chunk_size,
            grad_on and hidden.requires_grad,
            grad_on and lm_head_weight.requires_grad,
        )
        return outputs[0], _metric_dict(setup, outputs[1:])
    if setup is None:
        setup = _LossSetup(
            _as_index(token_ids), old_logp, ref_logp, advantages, mask, beta, loss_agg, max_len
        )
    loss, kl, clip_fraction = _LossFromHidden.apply(
        hidden,
        lm_head_weight,
        setup,
        float(temperature),
        float(eps_low),
        float(eps_high),
        float(beta),
        chunk_size,
        grad_on and hidden.requires_grad,
        grad_on and lm_head_weight.requires_grad,
    )
    return loss, {"kl": kl, "clip_fraction": clip_fraction, **setup.extra_metrics()}


def krpo_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
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
    entropy_coef: float = d.ENTROPY_COEF,
    temperature: float = d.TEMPERATURE,
    chunk_size: int = d.CHUNK_SIZE,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``krpo_loss`` from the last hidden states and the LM-head weight, chunked
    (:func:`policy_loss_from_hidden` after ``group_advantages``).

    Returns (loss, {"kl", "clip_fraction", "advantages"}).
    """
    advantages = _advantages(
        rewards,
        token_ids,
        group_size=group_size,
        group_offsets=group_offsets,
        mode=adv_mode,
        process_var=process_var,
        meas_var=meas_var,
        init_mean=init_mean,
        init_var=init_var,
        eps=eps,
    )
    loss, metrics = policy_loss_from_hidden(
        hidden,
        lm_head_weight,
        token_ids,
        old_logp,
        ref_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        loss_agg=loss_agg,
        max_len=max_len,
        ratio_level=ratio_level,
        loss_type=loss_type,
        tau_pos=tau_pos,
        tau_neg=tau_neg,
        delta=delta,
        dual_clip=dual_clip,
        kl_estimator=kl_estimator,
        bias_correction_kl=bias_correction_kl,
        token_weights=token_weights,
        entropy_coef=entropy_coef,
        temperature=temperature,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
    )
    metrics["advantages"] = advantages
    return loss, metrics
