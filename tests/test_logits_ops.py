"""The fused KRPO loss from logits and from hidden states, against the eager oracle
(log_softmax + gather + policy_loss_reference, float64 autograd for gradients).

Every test runs both CPU paths: the Triton kernel (in the interpreter) and the
vectorised torch fallback.
"""

import pytest
import torch
from helpers import device_for
from hypothesis import given, settings
from hypothesis import strategies as st

import krpo_fast.logits_ops as logits_ops
from krpo_fast.kernels.logits_loss import logits_loss_fwd
from krpo_fast.logits_ops import (
    krpo_loss_from_hidden,
    krpo_loss_from_logits,
    policy_loss_from_hidden,
    policy_loss_from_logits,
)
from krpo_fast.ops import LOSS_AGGREGATIONS, krpo_loss
from krpo_fast.reference import (
    group_advantages_reference,
    policy_loss_reference,
    token_logprobs_reference,
)

LOSS_AGGS = list(LOSS_AGGREGATIONS)
MAX_LEN = 9


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(logits_ops, "use_triton", lambda tensor: False)
    return request.param


def make_batch(B, T, V, seed=0, scale=3.0, dtype=torch.float32, temperature=1.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * scale).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=gen)
    logp = token_logprobs_reference(logits, ids, temperature)
    # old/ref near logp so that some ratios are clipped and some are not.
    old = logp + 0.3 * torch.randn(B, T, generator=gen)
    ref = logp + 0.3 * torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.25
    mask[0, 0] = True
    if B > 1:
        mask[-1] = False  # a sequence with no tokens: contributes 0, still counted
    rewards = torch.rand(B, generator=gen)
    return logits, ids, old, ref, mask, rewards


def oracle(logits, ids, old, ref, advantages, mask, temperature=1.0, **kwargs):
    """Loss, metrics and d loss / d logits in float64 through the eager reference."""
    z = logits.detach().double().requires_grad_()
    logp = token_logprobs_reference(z, ids, temperature)
    loss, metrics = policy_loss_reference(
        logp,
        None if old is None else old.double(),
        None if ref is None else ref.double(),
        advantages.double(),
        mask,
        **kwargs,
    )
    loss.backward()
    return loss.detach(), metrics, z.grad


def assert_grad_close(grad, expected, rel):
    scale = expected.abs().max().item()
    err = (grad.double() - expected).abs().max().item()
    assert err <= rel * scale + 1e-12, f"gradient error {err} vs scale {scale}"


def fused(logits, ids, old, ref, advantages, mask, **kwargs):
    z = logits.detach().clone().requires_grad_()
    loss, metrics = policy_loss_from_logits(z, ids, old, ref, advantages, mask, **kwargs)
    loss.backward()
    return loss.detach(), metrics, z.grad


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 5),
    V=st.integers(1, 200),
    loss_agg=st.sampled_from(LOSS_AGGS),
    beta=st.sampled_from([0.0, 0.04]),
    with_old=st.booleans(),
    temperature=st.sampled_from([1.0, 0.7]),
    seed=st.integers(0, 2**16),
)
def test_matches_oracle(B, T, V, loss_agg, beta, with_old, temperature, seed):
    logits, ids, old, ref, mask, rewards = make_batch(B, T, V, seed, temperature=temperature)
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(seed)) * 3
    old = old if with_old else None
    kwargs = dict(beta=beta, loss_agg=loss_agg, max_len=MAX_LEN)
    loss, metrics, grad = fused(
        logits, ids, old, ref, advantages, mask, temperature=temperature, **kwargs
    )
    ref_loss, ref_metrics, ref_grad = oracle(
        logits, ids, old, ref, advantages, mask, temperature, **kwargs
    )
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for key in ("kl", "clip_fraction"):
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key], rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, 1e-4)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_torch_path_and_aggregations(path, loss_agg):
    logits, ids, old, ref, mask, _ = make_batch(3, 6, 300, seed=1)
    advantages = torch.tensor([2.0, -1.5, 0.7])
    kwargs = dict(beta=0.05, loss_agg=loss_agg, max_len=MAX_LEN)
    loss, metrics, grad = fused(logits, ids, old, ref, advantages, mask, temperature=0.8, **kwargs)
    ref_loss, ref_metrics, ref_grad = oracle(logits, ids, old, ref, advantages, mask, 0.8, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert 0 < ref_metrics["clip_fraction"] < 1  # both branches of the clip are exercised
    for key in ("kl", "clip_fraction"):
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key], rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, 1e-4)


def test_krpo_loss_from_logits_matches_core_op(path):
    logits, ids, old, ref, mask, rewards = make_batch(4, 5, 64, seed=2)
    z = logits.clone().requires_grad_()
    loss, metrics = krpo_loss_from_logits(z, ids, old, ref, rewards, mask, group_size=2)
    loss.backward()
    assert set(metrics) == {"kl", "clip_fraction", "advantages"}
    advantages = group_advantages_reference(rewards, 2)
    torch.testing.assert_close(metrics["advantages"], advantages, rtol=1e-5, atol=1e-6)
    ref_loss, ref_metrics, ref_grad = oracle(logits, ids, old, ref, advantages, mask)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert_grad_close(z.grad, ref_grad, 1e-4)
    # The core op on token log-probs agrees, gradient through log_softmax included.
    z2 = logits.clone().requires_grad_()
    core_loss, core_metrics = krpo_loss(
        token_logprobs_reference(z2, ids), old, ref, rewards, mask, group_size=2
    )
    core_loss.backward()
    torch.testing.assert_close(loss, core_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kl"], core_metrics["kl"], rtol=1e-5, atol=1e-6)
    assert_grad_close(z.grad, z2.grad.double(), 1e-4)


def test_ragged_groups_and_grpo_mode(path):
    logits, ids, old, ref, mask, rewards = make_batch(5, 3, 50, seed=3)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    loss, metrics = krpo_loss_from_logits(
        logits, ids, old, ref, rewards, mask, group_offsets=offsets, adv_mode="grpo"
    )
    advantages = group_advantages_reference(rewards, group_offsets=offsets, mode="grpo")
    torch.testing.assert_close(metrics["advantages"], advantages, rtol=1e-5, atol=1e-6)
    ref_loss, _, _ = oracle(logits, ids, old, ref, advantages, mask)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(path, dtype):
    logits, ids, old, ref, mask, _ = make_batch(2, 4, 500, seed=4, dtype=dtype)
    advantages = torch.tensor([1.0, -2.0])
    loss, metrics, grad = fused(logits, ids, old, ref, advantages, mask, temperature=0.9)
    ref_loss, ref_metrics, ref_grad = oracle(logits, ids, old, ref, advantages, mask, 0.9)
    assert grad.dtype == dtype
    # Exact inputs, float32 math: only the gradient's storage is low precision.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kl"].double(), ref_metrics["kl"], rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab(path, dtype):
    logits, ids, old, ref, mask, _ = make_batch(1, 2, 151_936, seed=5, dtype=dtype)
    mask[:] = True
    advantages = torch.tensor([1.5])
    loss, _, grad = fused(logits, ids, old, ref, advantages, mask, temperature=1.1)
    ref_loss, _, ref_grad = oracle(logits, ids, old, ref, advantages, mask, 1.1)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, 1e-4 if dtype == torch.float32 else 1e-2)


def test_extreme_logits(path):
    logits, ids, old, ref, mask, _ = make_batch(2, 3, 257, seed=6)
    logits[..., ::5] = 1e4
    logits[..., 1::7] = -1e4
    ids[0, :] = torch.tensor([0, 1, 2])  # a top logit, a bottom one (logp ~ -2e4), another
    advantages = torch.tensor([1.0, -1.0])
    for temperature in (1.0, 0.5):
        logp = token_logprobs_reference(logits, ids, temperature)
        old, ref = logp + 0.1, logp - 0.1
        loss, _, grad = fused(logits, ids, old, ref, advantages, mask, temperature=temperature)
        ref_loss, _, ref_grad = oracle(logits, ids, old, ref, advantages, mask, temperature)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        assert_grad_close(grad, ref_grad, 1e-4)

    big = (torch.randn(2, 3, 300, generator=torch.Generator().manual_seed(7)) * 3e4).bfloat16()
    logp = token_logprobs_reference(big, ids.clamp(max=299))
    loss, _, grad = fused(big, ids.clamp(max=299), logp, logp, advantages, mask)
    ref_loss, _, ref_grad = oracle(big, ids.clamp(max=299), logp, logp, advantages, mask)
    assert torch.isfinite(grad.float()).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, 1e-2)


def test_strided_flat_and_inplace(path):
    logits, ids, old, ref, mask, _ = make_batch(3, 5, 70, seed=8)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    _, _, ref_grad = oracle(
        logits[:, :-1], ids[:, :-1], old[:, :-1], ref[:, :-1], advantages, mask[:, :-1]
    )
    leaf = logits.clone().requires_grad_()
    loss, _ = policy_loss_from_logits(
        leaf[:, :-1], ids[:, :-1], old[:, :-1], ref[:, :-1], advantages, mask[:, :-1]
    )
    loss.backward()
    assert_grad_close(leaf.grad[:, :-1], ref_grad, 1e-4)
    assert torch.equal(leaf.grad[:, -1], torch.zeros(3, 70))

    flat = logits.reshape(15, 70).clone().requires_grad_()
    flat_loss, _ = policy_loss_from_logits(flat, ids, old, ref, advantages, mask)
    flat_loss.backward()
    _, _, full_grad = oracle(logits, ids, old, ref, advantages, mask)
    assert_grad_close(flat.grad.view(3, 5, 70), full_grad, 1e-4)

    inplace = logits.clone().requires_grad_()
    loss, _ = policy_loss_from_logits(
        inplace, ids, old, ref, advantages, mask, inplace_backward=True
    )
    loss.backward()
    assert_grad_close(inplace.grad, full_grad, 1e-4)
    assert torch.equal(inplace.detach(), inplace.grad)


def test_grad_output_scaling_and_no_grad(path):
    logits, ids, old, ref, mask, _ = make_batch(2, 3, 40, seed=9)
    advantages = torch.tensor([1.0, -1.0])
    _, _, ref_grad = oracle(logits, ids, old, ref, advantages, mask)
    z = logits.clone().requires_grad_()
    loss, _ = policy_loss_from_logits(z, ids, old, ref, advantages, mask)
    (-2.5 * loss).backward()
    assert_grad_close(z.grad, -2.5 * ref_grad, 1e-4)
    with torch.no_grad():
        loss_ng, _ = policy_loss_from_logits(z, ids, old, ref, advantages, mask)
    torch.testing.assert_close(loss_ng, loss.detach())


def test_kernel_writes_every_gradient_element():
    """Poisoned buffers: masked rows get zeros, nothing is left unwritten. The kernel
    itself, on the kernel backend's device (CUDA when there is one)."""
    batch = make_batch(3, 4, 1000, seed=10, dtype=torch.bfloat16)
    logits, ids, old, ref, mask, _ = (t.to(device_for("kernel")) for t in batch)
    advantages = torch.tensor([1.0, -1.0, 0.5], device=logits.device)
    setup = logits_ops._LossSetup(ids, old, ref, advantages, mask, 0.04, "token-mean", None)
    setup.loss_rows.fill_(float("nan"))
    setup.clip_rows.fill_(float("nan"))
    setup.kl_rows.fill_(float("nan"))
    grad = torch.full_like(logits, float("nan"))
    logits_loss_fwd(
        logits,
        grad,
        setup.ids,
        setup.old,
        setup.ref,
        setup.mask,
        setup.advantages,
        setup.seq_weight,
        setup.loss_rows,
        setup.kl_rows,
        setup.clip_rows,
        0,
        4,
        1.0,
        0.2,
        0.2,
        0.04,
    )
    for out in (grad, setup.loss_rows, setup.kl_rows, setup.clip_rows):
        assert not out.isnan().any()
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    logits, ids, old, ref, mask, grad = (t.cpu() for t in (logits, ids, old, ref, mask, grad))
    _, _, ref_grad = oracle(
        logits, ids, old, ref, advantages.cpu(), mask, loss_agg="token-mean", beta=0.04
    )
    assert_grad_close(grad, ref_grad, 1e-2)


def test_padding_garbage_is_ignored(path):
    logits, ids, old, ref, mask, _ = make_batch(2, 4, 30, seed=11)
    advantages = torch.tensor([1.0, -1.0])
    clean_loss, clean_metrics, clean_grad = fused(logits, ids, old, ref, advantages, mask)
    old, ref = old.clone(), ref.clone()
    old[~mask] = float("-inf")
    ref[~mask] = float("inf")
    loss, metrics, grad = fused(logits, ids, old, ref, advantages, mask)
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad)
    assert torch.equal(metrics["kl"], clean_metrics["kl"])


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_hidden_matches_unchunked(path, chunk_size):
    gen = torch.Generator().manual_seed(12)
    B, T, H, V = 3, 4, 16, 333
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / 4
    _, ids, old, ref, mask, rewards = make_batch(B, T, V, seed=12)
    kwargs = dict(group_size=3, temperature=0.9, beta=0.04)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = krpo_loss_from_hidden(
        h1, w1, ids, old, ref, rewards, mask, chunk_size=chunk_size, **kwargs
    )
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss2, metrics2 = krpo_loss_from_logits(h2 @ w2.T, ids, old, ref, rewards, mask, **kwargs)
    loss2.backward()
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    for key in metrics:
        torch.testing.assert_close(metrics[key], metrics2[key], rtol=1e-5, atol=1e-6)
    assert_grad_close(h1.grad, h2.grad.double(), 1e-5)
    assert_grad_close(w1.grad, w2.grad.double(), 1e-5)


def test_hidden_flat_frozen_head_and_bf16(path):
    gen = torch.Generator().manual_seed(13)
    B, T, H, V = 2, 3, 8, 100
    hidden = torch.randn(B * T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    _, ids, old, ref, mask, _ = make_batch(B, T, V, seed=13)
    advantages = torch.tensor([0.5, -1.0])

    h1 = hidden.clone().requires_grad_()
    loss, _ = policy_loss_from_hidden(h1, weight, ids, old, ref, advantages, mask, chunk_size=4)
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    logp = token_logprobs_reference(h2 @ weight.T, ids.reshape(-1)).view(B, T)
    eager, _ = policy_loss_reference(logp, old, ref, advantages, mask)
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-5, atol=1e-6)
    assert_grad_close(h1.grad, h2.grad.double(), 1e-4)

    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss_b, _ = policy_loss_from_hidden(hb, wb, ids, old, ref, advantages, mask, chunk_size=4)
    loss_b.backward()
    assert hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    hd, wd = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    logp_d = token_logprobs_reference(hd @ wd.T, ids.reshape(-1)).view(B, T)
    eager_d, _ = policy_loss_reference(
        logp_d, old.double(), ref.double(), advantages.double(), mask
    )
    eager_d.backward()
    # The bf16 matmul rounds the logits: compare with the loss scale's 1e-2.
    torch.testing.assert_close(loss_b.double(), eager_d.detach(), rtol=1e-2, atol=1e-2)
    assert_grad_close(hb.grad, hd.grad, 3e-2)
    assert_grad_close(wb.grad, wd.grad, 3e-2)


ARGS_OK = dict(beta=0.04)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(ids=torch.tensor([[0, 50], [1, 2]])), ValueError, "token_ids must be in"),
        (dict(ids=torch.tensor([[0, -1], [1, 2]])), ValueError, "token_ids must be in"),
        (dict(ids=torch.zeros(2, 2)), TypeError, "token_ids"),
        (dict(ids=torch.zeros(4, dtype=torch.long)), ValueError, "token_ids"),
        (dict(logits=torch.randn(2, 3, 50)), ValueError, "logits"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(ref=None), ValueError, "ref_logp is required"),
        (dict(old=torch.zeros(2, 3)), ValueError, "old_logp"),
        (dict(mask=torch.ones(2)), ValueError, "mask"),
        (dict(advantages=torch.zeros(3)), ValueError, "advantages"),
        (dict(loss_agg="mean"), ValueError, "loss_agg"),
        (dict(loss_agg="seq-mean-token-sum-norm"), ValueError, "max_len"),
        (dict(eps_low=-0.1), ValueError, "eps_low"),
        (dict(beta=float("nan")), ValueError, "beta"),
    ],
)
def test_validation(change, error, match):
    args = dict(
        logits=torch.randn(2, 2, 50),
        ids=torch.zeros(2, 2, dtype=torch.long),
        old=torch.zeros(2, 2),
        ref=torch.zeros(2, 2),
        advantages=torch.zeros(2),
        mask=torch.ones(2, 2),
        temperature=1.0,
        loss_agg="seq-mean-token-mean",
        eps_low=0.2,
        beta=0.04,
    )
    args.update(change)
    with pytest.raises(error, match=match):
        policy_loss_from_logits(
            args["logits"],
            args["ids"],
            args["old"],
            args["ref"],
            args["advantages"],
            args["mask"],
            temperature=args["temperature"],
            loss_agg=args["loss_agg"],
            eps_low=args["eps_low"],
            beta=args["beta"],
        )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(weight=torch.randn(50, 7)), ValueError, "lm_head_weight"),
        (dict(weight=torch.randn(50, 8).double()), TypeError, "lm_head_weight"),
        (dict(hidden=torch.randn(5, 8)), ValueError, "hidden"),
        (dict(ids=torch.tensor([[0, 50], [1, 2]])), ValueError, "token_ids must be in"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(rewards=torch.zeros(3)), ValueError, "rewards"),
    ],
)
def test_hidden_validation(change, error, match):
    args = dict(
        hidden=torch.randn(2, 2, 8),
        weight=torch.randn(50, 8),
        ids=torch.zeros(2, 2, dtype=torch.long),
        rewards=torch.zeros(2),
        chunk_size=2,
    )
    args.update(change)
    with pytest.raises(error, match=match):
        krpo_loss_from_hidden(
            args["hidden"],
            args["weight"],
            args["ids"],
            None,
            torch.zeros(2, 2),
            args["rewards"],
            torch.ones(2, 2),
            group_size=2,
            chunk_size=args["chunk_size"],
        )


@pytest.mark.parametrize("fill", [float("nan"), float("-inf")])
def test_non_finite_logits_at_masked_out_tokens_never_reach_a_gradient(path, fill):
    logits, ids, old, ref, mask, rewards = make_batch(4, 5, 30, seed=12)
    kwargs = dict(group_size=2, beta=0.04)
    leaf = logits.clone().requires_grad_()
    clean, _ = krpo_loss_from_logits(leaf, ids, old, ref, rewards, mask, **kwargs)
    clean.backward()
    dirty = logits.clone()
    dirty[~mask] = fill
    dirty.requires_grad_()
    loss, _ = krpo_loss_from_logits(dirty, ids, old, ref, rewards, mask, **kwargs)
    loss.backward()
    assert torch.equal(loss, clean)
    assert torch.isfinite(dirty.grad).all()
    assert torch.equal(dirty.grad, leaf.grad)


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_non_finite_hidden_at_masked_out_tokens_never_reach_a_gradient(path, fill):
    """Including the LM-head weight's gradient, which sums dz.T @ hidden over tokens."""
    gen = torch.Generator().manual_seed(13)
    _, ids, old, ref, mask, rewards = make_batch(4, 5, 30, seed=13)
    hidden = torch.randn(4, 5, 8, generator=gen)
    weight = torch.randn(30, 8, generator=gen)
    kwargs = dict(group_size=2, beta=0.04, chunk_size=7)
    grads = []
    for h in (hidden, hidden.masked_fill(~mask[..., None], fill)):
        h, w = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = krpo_loss_from_hidden(h, w, ids, old, ref, rewards, mask, **kwargs)
        loss.backward()
        grads.append((loss, h.grad, w.grad))
    (clean_loss, clean_h, clean_w), (loss, grad_h, grad_w) = grads
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert torch.equal(loss, clean_loss)
    torch.testing.assert_close(grad_h, clean_h, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_w, clean_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "dtype",
    [torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64],
)
def test_every_integer_dtype_of_token_ids_is_accepted_or_rejected(path, dtype):
    logits, ids, old, ref, mask, rewards = make_batch(2, 3, 50, seed=14)
    expected, _ = krpo_loss_from_logits(logits, ids, old, ref, rewards, mask, group_size=2)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        with pytest.raises(TypeError, match="token_ids"):
            krpo_loss_from_logits(logits, ids.to(dtype), old, ref, rewards, mask, group_size=2)
        return
    loss, _ = krpo_loss_from_logits(logits, ids.to(dtype), old, ref, rewards, mask, group_size=2)
    assert torch.equal(loss, expected)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(50, 4)
    expected, _ = policy_loss_from_hidden(hidden, weight, ids, old, ref, rewards, mask)
    loss, _ = policy_loss_from_hidden(hidden, weight, ids.to(dtype), old, ref, rewards, mask)
    assert torch.equal(loss, expected)
    logp = logits_ops.selective_log_softmax(logits, ids.to(dtype))
    assert torch.equal(logp, logits_ops.selective_log_softmax(logits, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_are_left_untouched_without_inplace_backward(path, dtype, temperature):
    logits, ids, old, ref, mask, rewards = make_batch(2, 3, 40, seed=15, dtype=dtype)
    before = logits.clone()
    leaf = logits.requires_grad_()
    loss, _ = krpo_loss_from_logits(
        leaf, ids, old, ref, rewards, mask, group_size=2, temperature=temperature
    )
    loss.backward()
    logp = logits_ops.selective_log_softmax(leaf, ids, temperature=temperature)
    logp.sum().backward()
    assert torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_on_policy_matches_oracle(path, beta):
    """old_logp None (ratio 1) and beta 0 (ref never read), from logits and from hidden."""
    gen = torch.Generator().manual_seed(17)
    _, ids, _, ref, mask, _ = make_batch(3, 4, 30, seed=17)
    hidden, weight = torch.randn(3, 4, 8, generator=gen), torch.randn(30, 8, generator=gen)
    logits = hidden @ weight.T
    advantages = torch.tensor([1.5, -0.5, 0.25])
    ref = ref if beta else None
    expected = oracle(logits, ids, None, ref, advantages, mask, beta=beta)
    loss, metrics, grad = fused(logits, ids, None, ref, advantages, mask, beta=beta)
    torch.testing.assert_close(loss.double(), expected[0], rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, expected[2], 1e-4)
    assert metrics["clip_fraction"].item() == 0.0
    h = hidden.clone().requires_grad_()
    loss, _ = policy_loss_from_hidden(h, weight, ids, None, ref, advantages, mask, beta=beta)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected[0], rtol=1e-5, atol=1e-6)
    assert_grad_close(h.grad, (expected[2] @ weight.double()), 1e-4)
