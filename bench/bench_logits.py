"""The logits-level ops: selective log-softmax, the policy loss from logits and the
chunked LM-head path (hidden states + LM-head weight in, loss out).

Peers: paper eager (the oracles), vectorised eager, torch.compile, krpo-fast and, for
the losses, Liger-Kernel (``triton_grpo_loss`` on logits, ``LigerFusedLinearGRPOLoss``
on hidden states) with its defaults set to ours: temperature 1.0, eps_low = eps_high =
0.2, beta 0.01, loss_type "grpo" (= seq-mean-token-mean), in-place logits gradient
(krpo-fast's ``inplace_backward`` is on too). "fwd" runs under ``torch.no_grad``
(old / reference log-probs), "fwd+bwd" differentiates the logits (or hidden and W).
"""

import pytest
import torch
from eager import (
    policy_loss_from_hidden_eager,
    policy_loss_from_logits_eager,
    selective_log_softmax_eager,
)
from harness import (
    compiled,
    device,
    dtype_id,
    dtypes,
    generator,
    impls,
    rotation,
    run_case,
    shape_id,
    sizes,
)

from krpo_fast import defaults
from krpo_fast.logits_ops import (
    policy_loss_from_hidden,
    policy_loss_from_logits,
    selective_log_softmax,
)
from krpo_fast.reference import policy_loss_reference, token_logprobs_reference

PASSES = ("fwd", "fwd+bwd")
# krpo-fast's defaults, passed explicitly to every peer (Liger's own differ).
BETA, EPS, TEMPERATURE = defaults.BETA, defaults.EPS_LOW, defaults.TEMPERATURE


def _liger_reason() -> str | None:
    """Why the Liger rows cannot run here, or None."""
    if not torch.cuda.is_available():
        return "Liger-Kernel on CPU: its Triton kernels run only in the interpreter (not timed)"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _loss_inputs(B: int, T: int, gen: torch.Generator) -> tuple:
    """(token ids, old, ref, advantages, mask) on the device; log-probs of a near-uniform
    policy so the ratios stay near 1."""
    dev = device()
    ids = torch.randint(0, 32_000, (B, T), generator=gen, device=dev)
    base = torch.full((B, T), -10.0, device=dev)
    old = base + 0.05 * torch.randn(B, T, generator=gen, device=dev)
    ref = base + 0.05 * torch.randn(B, T, generator=gen, device=dev)
    advantages = torch.randn(B, generator=gen, device=dev)
    mask = torch.rand(B, T, generator=gen, device=dev) > 0.1
    return ids, old, ref, advantages, mask


def _call(mode: str, loss: callable, leaves: tuple) -> object:
    """Forward under no_grad, or forward + gradients of the leaves."""
    if mode == "fwd":
        with torch.no_grad():
            return loss()
    out = loss()
    return torch.autograd.grad(out, leaves, torch.ones_like(out))


# ------------------------------------------------------------------ selective log-softmax

SLS = {
    "paper": token_logprobs_reference,
    "eager": selective_log_softmax_eager,
    "compile": lambda z, ids: compiled(selective_log_softmax_eager)(z, ids),
    "krpo-fast": selective_log_softmax,
}


@pytest.mark.parametrize("shape", sizes("selective_log_softmax"), ids=shape_id)
@pytest.mark.parametrize("dtype", dtypes(), ids=dtype_id)
@pytest.mark.parametrize("mode", PASSES)
@pytest.mark.parametrize("impl", impls(*SLS))
def test_selective_log_softmax(benchmark, impl, mode, dtype, shape) -> None:
    """log_softmax(logits).gather(ids) over [B, T, V] logits."""
    B, T, V = shape
    n = B * T
    # Logits read once, ids read, float32 log-probs written; backward: the upstream
    # gradient read and the logits gradient written once.
    floor = n * V * _elem(dtype) + 12 * n
    floor += n * V * _elem(dtype) + 4 * n if mode == "fwd+bwd" else 0
    gen = generator(0)
    inputs = []
    for _ in range(rotation(floor)):
        logits = (
            (torch.randn(B, T, V, generator=gen, device=device()) * 2).to(dtype).requires_grad_()
        )
        inputs.append((logits, torch.randint(0, V, (B, T), generator=gen, device=device())))
    fn = SLS[impl]
    run_case(
        benchmark,
        lambda x: _call(mode, lambda: fn(x[0], x[1]), (x[0],)),
        inputs,
        op="selective_log_softmax",
        impl=impl,
        mode=mode,
        shape=shape,
        dtype=dtype,
        floor_bytes=floor,
    )


# ------------------------------------------------------------------------ loss from logits


def _paper_from_logits(z, ids, old, ref, adv, mask):
    logp = token_logprobs_reference(z, ids, temperature=TEMPERATURE)
    return policy_loss_reference(logp, old, ref, adv, mask, eps_low=EPS, eps_high=EPS, beta=BETA)[0]


def _liger_from_logits(full, ids, old, ref, adv, mask):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    loss, _ = triton_grpo_loss(
        full,
        old,
        ref,
        ids,
        adv,
        completion_mask=mask.int(),
        temperature=TEMPERATURE,
        beta=BETA,
        eps_low=EPS,
        eps_high=EPS,
        inplace=True,
        loss_type="grpo",
        reduce=True,
    )
    return loss


FROM_LOGITS = {
    "paper": _paper_from_logits,
    "eager": policy_loss_from_logits_eager,
    "compile": lambda *a: compiled(policy_loss_from_logits_eager)(*a),
    "krpo-fast": lambda *a: policy_loss_from_logits(*a, inplace_backward=True)[0],
    "liger": _liger_from_logits,
}


@pytest.mark.parametrize("shape", sizes("loss_from_logits"), ids=shape_id)
@pytest.mark.parametrize("dtype", dtypes(), ids=dtype_id)
@pytest.mark.parametrize("mode", PASSES)
@pytest.mark.parametrize("impl", impls(*FROM_LOGITS))
def test_loss_from_logits(benchmark, impl, mode, dtype, shape) -> None:
    """The model's [B, T + 1, V] logits (last position unused, as in trainers) in, the
    clipped policy loss with k3 KL out."""
    if impl == "liger" and _liger_reason():
        pytest.skip(_liger_reason())
    B, T, V = shape
    n = B * T
    # Logits read once; ids, old, ref and mask read; the logits gradient written once.
    floor = n * V * _elem(dtype) + 17 * n + 4 * B
    floor += n * V * _elem(dtype) if mode == "fwd+bwd" else 0
    gen = generator(0)
    inputs = []
    for _ in range(rotation(floor)):
        full = (torch.randn(B, T + 1, V, generator=gen, device=device()) * 2).to(dtype)
        inputs.append((full.requires_grad_(), *_loss_inputs(B, T, gen)))
    fn = FROM_LOGITS[impl]

    def loss(x):
        full, rest = x[0], x[1:]
        return fn(full, *rest) if impl == "liger" else fn(full[:, :-1], *rest)

    run_case(
        benchmark,
        lambda x: _call(mode, lambda: loss(x), (x[0],)),
        inputs,
        op="loss_from_logits",
        impl=impl,
        mode=mode,
        shape=shape,
        dtype=dtype,
        floor_bytes=floor,
    )


# ---------------------------------------------------------------------------- LM-head path


def _paper_from_hidden(h, w, ids, old, ref, adv, mask):
    return _paper_from_logits(h @ w.T, ids, old, ref, adv, mask)


@torch.compiler.disable
def _liger_from_hidden(h, w, ids, old, ref, adv, mask):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(
        beta=BETA,
        epsilon_low=EPS,
        epsilon_high=EPS,
        temperature=TEMPERATURE,
        loss_type="grpo",
        use_ref_model=True,
    )
    out = module(h, w, ids, mask.int(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
    return out[0]


FROM_HIDDEN = {
    "paper": _paper_from_hidden,
    "eager": policy_loss_from_hidden_eager,
    "compile": lambda *a: compiled(policy_loss_from_hidden_eager)(*a),
    "krpo-fast": lambda *a: policy_loss_from_hidden(*a)[0],
    "liger": _liger_from_hidden,
}


@pytest.mark.parametrize("shape", sizes("lm_head"), ids=shape_id)
@pytest.mark.parametrize("dtype", dtypes(), ids=dtype_id)
@pytest.mark.parametrize("mode", PASSES)
@pytest.mark.parametrize("impl", impls(*FROM_HIDDEN))
def test_lm_head(benchmark, impl, mode, dtype, shape) -> None:
    """Last hidden states [B, T, H] and the LM-head weight [V, H] in, the policy loss
    out (and the gradients of both). Floor: the matmul FLOPs (2 N H V forward, three
    times that with the backward) over the measured bf16 rate."""
    if impl == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError:
            pytest.skip("liger-kernel is not installed (pip install liger-kernel)")
    B, T, H, V = shape
    n, e = B * T, _elem(dtype)
    passes = 3 if mode == "fwd+bwd" else 1
    floor = passes * (n * H + V * H) * e + 17 * n + 4 * B
    gen = generator(0)
    inputs = []
    for _ in range(rotation(floor)):
        hidden = torch.randn(B, T, H, generator=gen, device=device()).to(dtype).requires_grad_()
        weight = (
            (torch.randn(V, H, generator=gen, device=device()) / H**0.5).to(dtype).requires_grad_()
        )
        inputs.append((hidden, weight, *_loss_inputs(B, T, gen)))
    fn = FROM_HIDDEN[impl]
    run_case(
        benchmark,
        lambda x: _call(mode, lambda: fn(*x), x[:2]),
        inputs,
        op="lm_head",
        impl=impl,
        mode=mode,
        shape=shape,
        dtype=dtype,
        floor_bytes=floor,
        floor_flops=passes * 2 * n * H * V,
    )
