"""The policy loss over token log-probs and the fused KRPO loss (rewards in, loss out):
paper eager, vectorised eager, torch.compile and krpo-fast; forward (no grad) and
forward + backward (the gradient of the log-probs)."""

import pytest
import torch
from eager import krpo_loss_eager, policy_loss_eager
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

from krpo_fast import krpo_loss, policy_loss
from krpo_fast.reference import group_advantages_reference, policy_loss_reference

GROUP_SIZE = 8
PASSES = ("fwd", "fwd+bwd")


def _paper_krpo(logp, old, ref, rewards, mask):
    advantages = group_advantages_reference(rewards, group_size=GROUP_SIZE)
    return policy_loss_reference(logp, old, ref, advantages, mask)[0]


POLICY = {
    "paper": lambda lp, old, ref, adv, m: policy_loss_reference(lp, old, ref, adv, m)[0],
    "eager": policy_loss_eager,
    "compile": lambda *a: compiled(policy_loss_eager)(*a),
    "krpo-fast": lambda lp, old, ref, adv, m: policy_loss(lp, old, ref, adv, m)[0],
}
KRPO = {
    "paper": _paper_krpo,
    "eager": lambda lp, old, ref, r, m: krpo_loss_eager(lp, old, ref, r, m, group_size=GROUP_SIZE),
    "compile": lambda lp, old, ref, r, m: compiled(krpo_loss_eager)(
        lp, old, ref, r, m, group_size=GROUP_SIZE
    ),
    "krpo-fast": lambda lp, old, ref, r, m: krpo_loss(lp, old, ref, r, m, group_size=GROUP_SIZE)[0],
}


def _inputs(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> tuple:
    """(logp leaf, old, ref, advantages, rewards, mask) with realistic log-probs."""
    B, T = shape
    gen, dev = generator(seed), device()
    logp = -torch.rand(B, T, generator=gen, device=dev) * 3
    old = logp + 0.05 * torch.randn(B, T, generator=gen, device=dev)
    ref = logp + 0.05 * torch.randn(B, T, generator=gen, device=dev)
    advantages = torch.randn(B, generator=gen, device=dev)
    rewards = (torch.rand(B, generator=gen, device=dev) > 0.5).float()
    mask = torch.rand(B, T, generator=gen, device=dev) > 0.1
    return logp.to(dtype).requires_grad_(), old.to(dtype), ref.to(dtype), advantages, rewards, mask


def _bench(benchmark, op, table, impl, mode, shape, dtype, per_seq) -> None:
    B, T = shape
    elem = torch.finfo(dtype).bits // 8
    # logp, old, ref and the bool mask read once; per-sequence inputs; the gradient
    # written once when differentiating.
    floor = B * T * (3 * elem + 1) + 4 * B * per_seq + (B * T * elem if mode == "fwd+bwd" else 0)
    inputs = [_inputs(shape, dtype, seed) for seed in range(rotation(floor))]
    fn = table[impl]
    pick = (
        (lambda x: (*x[:3], x[3], x[5]))
        if op == "policy_loss"
        else (lambda x: (*x[:3], x[4], x[5]))
    )

    def call(x):
        if mode == "fwd":
            with torch.no_grad():
                return fn(*pick(x))
        return torch.autograd.grad(fn(*pick(x)), x[0])

    run_case(
        benchmark,
        call,
        inputs,
        op=op,
        impl=impl,
        mode=mode,
        shape=shape,
        dtype=dtype,
        floor_bytes=floor,
    )


@pytest.mark.parametrize("shape", sizes("policy_loss"), ids=shape_id)
@pytest.mark.parametrize("dtype", dtypes(), ids=dtype_id)
@pytest.mark.parametrize("mode", PASSES)
@pytest.mark.parametrize("impl", impls(*POLICY))
def test_policy_loss(benchmark, impl, mode, dtype, shape) -> None:
    """Clipped surrogate + k3 KL, seq-mean-token-mean, over [B, T] log-probs."""
    _bench(benchmark, "policy_loss", POLICY, impl, mode, shape, dtype, per_seq=1)


@pytest.mark.parametrize("shape", sizes("krpo_loss"), ids=shape_id)
@pytest.mark.parametrize("dtype", dtypes(), ids=dtype_id)
@pytest.mark.parametrize("mode", PASSES)
@pytest.mark.parametrize("impl", impls(*KRPO))
def test_krpo_loss(benchmark, impl, mode, dtype, shape) -> None:
    """Kalman advantages from 0/1 rewards (groups of 8) fused with the policy loss."""
    _bench(benchmark, "krpo_loss", KRPO, impl, mode, shape, dtype, per_seq=1)
