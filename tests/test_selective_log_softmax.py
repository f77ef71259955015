"""selective_log_softmax against log_softmax + gather (float64 autograd as the oracle).

Every test runs both CPU paths: the Triton kernel (in the interpreter) and the
vectorised torch fallback.
"""

import pytest
import torch
from helpers import device_for
from hypothesis import given, settings
from hypothesis import strategies as st

import krpo_fast.logits_ops as logits_ops
from krpo_fast.kernels.selective_log_softmax import (
    selective_log_softmax_bwd,
    selective_log_softmax_fwd,
)
from krpo_fast.logits_ops import selective_log_softmax
from krpo_fast.reference import token_logprobs_reference

LARGE_V = 151_936


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(logits_ops, "use_triton", lambda tensor: False)
    return request.param


def oracle(logits, token_ids, temperature, g_logp, g_entropy=None):
    """float64 logp, entropy and d(sum g_logp logp + g_entropy entropy)/d logits."""
    z = logits.detach().double().requires_grad_()
    logp = token_logprobs_reference(z, token_ids, temperature)
    log_probs = torch.log_softmax(z / temperature, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    objective = (logp * g_logp.double()).sum()
    if g_entropy is not None:
        objective = objective + (entropy * g_entropy.double()).sum()
    objective.backward()
    return logp.detach(), entropy.detach(), z.grad


def assert_grad_close(grad, expected, rel):
    scale = expected.abs().max().item()
    err = (grad.double() - expected).abs().max().item()
    assert err <= rel * scale + 1e-12, f"gradient error {err} vs scale {scale}"


def run(logits, token_ids, temperature=1.0, with_entropy=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g_logp = torch.randn(token_ids.shape, generator=gen)
    g_entropy = torch.randn(token_ids.shape, generator=gen) if with_entropy else None
    z = logits.detach().clone().requires_grad_()
    out = selective_log_softmax(z, token_ids, temperature=temperature, return_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    objective = (logp * g_logp).sum()
    if with_entropy:
        objective = objective + (entropy * g_entropy).sum()
    objective.backward()
    return logp, entropy, z.grad, oracle(logits, token_ids, temperature, g_logp, g_entropy)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.sampled_from([(1,), (5,), (2, 3), (3, 1)]),
    vocab=st.integers(1, 300),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    with_entropy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_float32_matches_oracle(lead, vocab, temperature, with_entropy, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, vocab, generator=gen) * 4
    ids = torch.randint(0, vocab, lead, generator=gen)
    logp, entropy, grad, (ref_logp, ref_entropy, ref_grad) = run(
        logits, ids, temperature, with_entropy, seed
    )
    assert logp.dtype == torch.float32 and logp.shape == ids.shape
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-6)
    if with_entropy:
        torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-6)
    assert grad.dtype == torch.float32
    assert_grad_close(grad, ref_grad, 1e-4)


def test_torch_path_matches(path):
    logits = torch.randn(3, 4, 1000) * 3
    ids = torch.randint(0, 1000, (3, 4))
    logp, entropy, grad, (ref_logp, ref_entropy, ref_grad) = run(logits, ids, 0.8, True)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(path, dtype):
    logits = (torch.randn(2, 3, 777) * 5).to(dtype)
    ids = torch.randint(0, 777, (2, 3))
    logp, entropy, grad, (ref_logp, ref_entropy, ref_grad) = run(logits, ids, 0.9, True)
    # The inputs are exact in float64, and the math is float32 inside.
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    assert_grad_close(grad, ref_grad, 1e-2)


def test_vocab_of_one(path):
    logits = torch.randn(4, 1, requires_grad=True)
    logp, entropy = selective_log_softmax(
        logits, torch.zeros(4, dtype=torch.long), return_entropy=True
    )
    assert torch.equal(logp, torch.zeros(4)) and torch.equal(entropy, torch.zeros(4))
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(logits.grad, torch.zeros(4, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab(path, dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, LARGE_V, generator=gen) * 3).to(dtype)
    ids = torch.tensor([0, LARGE_V - 1])
    logp, _, grad, (ref_logp, _, ref_grad) = run(logits, ids, 1.3)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    assert_grad_close(grad, ref_grad, 1e-4 if dtype == torch.float32 else 1e-2)


def test_extreme_float32(path):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 513, generator=gen)
    logits[:, ::7] = 1e4
    logits[:, 3::11] = -1e4
    ids = torch.tensor([0, 3, 5, 512])  # a top logit, a bottom one, ordinary ones
    for temperature in (1.0, 0.5):
        logp, entropy, grad, (ref_logp, ref_entropy, ref_grad) = run(logits, ids, temperature, True)
        assert torch.isfinite(logp).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
        assert_grad_close(grad, ref_grad, 1e-4)


def test_extreme_bfloat16(path):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 300, generator=gen) * 3e4).to(torch.bfloat16)
    ids = torch.tensor([int(logits[0].float().argmax()), 7, 299])
    logp, _, grad, (ref_logp, _, ref_grad) = run(logits, ids, 0.7)
    assert torch.isfinite(logp).all() and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    assert_grad_close(grad, ref_grad, 1e-2)


def test_strided_view_and_inplace_backward(path):
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(2, 5, 130, generator=gen)
    ids = torch.randint(0, 130, (2, 4), generator=gen)
    g = torch.randn(2, 4, generator=gen)
    _, _, ref_grad = oracle(full[:, :-1], ids, 0.9, g)

    leaf = full.clone().requires_grad_()
    sliced = leaf[:, :-1]  # not viewable as [N, V]: no copy is made
    (selective_log_softmax(sliced, ids, temperature=0.9) * g).sum().backward()
    assert_grad_close(leaf.grad[:, :-1], ref_grad, 1e-4)
    assert torch.equal(leaf.grad[:, -1], torch.zeros(2, 130))

    logits = full.clone()[:, :-1].requires_grad_()
    before = logits.detach().clone()
    logp = selective_log_softmax(logits, ids, temperature=0.9, inplace_backward=True)
    torch.testing.assert_close(logits.detach(), before)
    (logp * g).sum().backward()
    assert_grad_close(logits.grad, ref_grad, 1e-4)
    # The gradient was written over the logits' storage.
    assert torch.equal(logits.detach(), logits.grad)


def test_backward_kernel_writes_every_element():
    # The kernels themselves, on the kernel backend's device (CUDA when there is one).
    device = device_for("kernel")
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 2, 1000, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 1000, (6,), generator=gen)
    g_logp, g_entropy = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    on_device = [t.to(device) for t in (logits, ids, g_logp, g_entropy)]
    logits_d, ids_d, g_logp_d, g_entropy_d = on_device
    logp, row_max, log_sum, entropy = (
        torch.full((6,), float("nan"), device=device) for _ in range(4)
    )
    selective_log_softmax_fwd(logits_d, ids_d, logp, row_max, log_sum, entropy, 1.1, True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    grad = torch.full_like(logits_d, float("nan"))
    selective_log_softmax_bwd(
        logits_d, grad, ids_d, row_max, log_sum, entropy, g_logp_d, g_entropy_d, 1.1
    )
    assert not grad.isnan().any()
    _, _, ref_grad = oracle(logits.view(6, 1000), ids, 1.1, g_logp, g_entropy)
    assert_grad_close(grad.cpu().view(6, 1000), ref_grad, 1e-2)


def test_no_grad_and_empty():
    logits = torch.randn(0, 10)
    assert selective_log_softmax(logits, torch.zeros(0, dtype=torch.long)).shape == (0,)
    with torch.no_grad():
        logp = selective_log_softmax(torch.randn(2, 10), torch.tensor([1, 2]))
    assert logp.shape == (2,)


@pytest.mark.parametrize(
    "logits, ids, temperature, error, match",
    [
        (torch.randn(2, 5), torch.tensor([0, 5]), 1.0, ValueError, "token_ids must be in"),
        (torch.randn(2, 5), torch.tensor([-1, 0]), 1.0, ValueError, "token_ids must be in"),
        (torch.randn(2, 5), torch.tensor([0.0, 1.0]), 1.0, TypeError, "token_ids"),
        (torch.randn(2, 5), torch.tensor([0, 1, 2]), 1.0, ValueError, "token_ids must have shape"),
        (torch.randint(0, 3, (2, 5)), torch.tensor([0, 1]), 1.0, TypeError, "logits"),
        (torch.randn(5), torch.tensor(0), 1.0, ValueError, "logits"),
        (torch.randn(2, 5), torch.tensor([0, 1]), 0.0, ValueError, "temperature"),
        (torch.randn(2, 5), torch.tensor([0, 1]), float("inf"), ValueError, "temperature"),
        (torch.randn(2, 5), torch.tensor([0, 1]), float("nan"), ValueError, "temperature"),
        (torch.randn(2, 0), torch.tensor([0, 1]), 1.0, ValueError, "vocabulary"),
    ],
)
def test_validation(logits, ids, temperature, error, match):
    with pytest.raises(error, match=match):
        selective_log_softmax(logits, ids, temperature=temperature)
