"""policy_loss and krpo_loss against the paper's GRPOLoss oracle, values and gradients."""

import pytest
import torch
from helpers import BACKENDS, assert_close_scaled, on_backend, poisoned_allocations
from hypothesis import given, settings
from hypothesis import strategies as st

from krpo_fast import group_advantages, krpo_loss, ops, policy_loss
from krpo_fast.ops import ADVANTAGE_MODES, LOSS_AGGREGATIONS
from krpo_fast.reference import group_advantages_reference, policy_loss_reference

# bf16 log-probs: the gradient is stored in bf16 (1e-2); the loss is reduced in float32.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_batch(n_rows, n_cols, dtype, gen, zero_rows=0, spread=0.4):
    """Log-probs near a policy that moved a little from the sampler and the reference."""
    logp = (-torch.rand(n_rows, n_cols, generator=gen) * 4).to(dtype)
    old = (logp.float() + spread * torch.randn(n_rows, n_cols, generator=gen)).to(dtype)
    ref = (logp.float() + spread * torch.randn(n_rows, n_cols, generator=gen)).to(dtype)
    mask = torch.rand(n_rows, n_cols, generator=gen) > 0.25
    mask[:zero_rows] = False
    return logp, old, ref, mask


def oracle_loss_and_grad(logp, old, ref, adv, mask, **kwargs):
    """Loss, metrics and d loss / d logp through autograd on the oracle, in float64.

    Also returns the gradient's scale: the largest surrogate part plus the largest KL
    part, since the two can cancel and float32 rounding follows the parts, not the sum.
    """
    grads = {}
    for part_beta in {kwargs.get("beta", 0.01), 0.0}:
        leaf = logp.detach().double().cpu().requires_grad_()
        loss, metrics = policy_loss_reference(
            leaf,
            None if old is None else old.double().cpu(),
            None if ref is None else ref.double().cpu(),
            adv.double().cpu(),
            mask.cpu(),
            **{**kwargs, "beta": part_beta},
        )
        loss.backward()
        grads[part_beta] = (loss.detach(), metrics, leaf.grad)
    full = grads[kwargs.get("beta", 0.01)]
    surrogate_grad = grads[0.0][2]
    scale = float(surrogate_grad.abs().max() + (full[2] - surrogate_grad).abs().max())
    return (*full, scale)


def run_fused(fn, logp, *args, **kwargs):
    leaf = logp.detach().clone().requires_grad_()
    loss, metrics = fn(leaf, *args, **kwargs)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


def compare(actual, expected, rtol, adv=None):
    loss, metrics, grad = actual
    loss_ref, metrics_ref, grad_ref, grad_scale = expected
    # The loss is a sum of terms of either sign: its rounding scales with their size
    # (|A| and the KL), not with the possibly cancelled result.
    terms = float(loss_ref.abs()) + float(metrics_ref["kl"])
    if adv is not None:
        terms += float(adv.abs().max())
    assert_close_scaled(loss.reshape(1), loss_ref.reshape(1), rtol, scale=terms)
    assert_close_scaled(grad, grad_ref, rtol, scale=max(grad_scale, 1e-30))
    for key in ("kl", "clip_fraction"):
        assert_close_scaled(metrics[key].reshape(1), metrics_ref[key].reshape(1), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    n_rows=st.integers(1, 9),
    n_cols=st.integers(1, 70),
    dtype=st.sampled_from(list(TOLERANCE)),
    loss_agg=st.sampled_from(LOSS_AGGREGATIONS),
    with_old=st.booleans(),
    beta=st.sampled_from([0.0, 0.01, 0.5]),
    eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.4)]),
    zero_rows=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_policy_loss_matches_oracle(
    backend, n_rows, n_cols, dtype, loss_agg, with_old, beta, eps, zero_rows, seed
):
    gen = torch.Generator().manual_seed(seed)
    logp, old, ref, mask = make_batch(n_rows, n_cols, dtype, gen, zero_rows)
    adv = torch.randn(n_rows, generator=gen) * 3
    old = old if with_old else None
    kwargs = dict(eps_low=eps[0], eps_high=eps[1], beta=beta, loss_agg=loss_agg, max_len=80)
    with on_backend(backend) as device, poisoned_allocations():
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        actual = run_fused(policy_loss, to(logp), to(old), to(ref), to(adv), to(mask), **kwargs)
    expected = oracle_loss_and_grad(logp, old, ref, adv, mask, **kwargs)
    compare(actual, expected, TOLERANCE[dtype], adv)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    ragged=st.booleans(),
    n_cols=st.integers(1, 40),
    adv_mode=st.sampled_from(ADVANTAGE_MODES),
    loss_agg=st.sampled_from(LOSS_AGGREGATIONS),
    dtype=st.sampled_from(list(TOLERANCE)),
    beta=st.sampled_from([0.0, 0.04]),
    seed=st.integers(0, 2**31 - 1),
)
def test_krpo_loss_matches_oracle(
    backend, lengths, ragged, n_cols, adv_mode, loss_agg, dtype, beta, seed
):
    gen = torch.Generator().manual_seed(seed)
    if not ragged:
        lengths = [lengths[0]] * len(lengths)
    n_rows = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    layout = dict(group_offsets=offsets) if ragged else dict(group_size=lengths[0])
    levels = torch.tensor([0.0, 0.01, 0.5, 1.0])
    rewards = levels[torch.randint(0, 4, (n_rows,), generator=gen)]
    logp, old, ref, mask = make_batch(n_rows, n_cols, dtype, gen)
    kwargs = dict(beta=beta, loss_agg=loss_agg, max_len=64)
    with on_backend(backend) as device, poisoned_allocations():
        layout_dev = {k: v.to(device) if torch.is_tensor(v) else v for k, v in layout.items()}
        actual = run_fused(
            krpo_loss,
            logp.to(device),
            old.to(device),
            ref.to(device),
            rewards.to(device),
            mask.to(device),
            adv_mode=adv_mode,
            **layout_dev,
            **kwargs,
        )
    adv = group_advantages_reference(
        rewards,
        layout.get("group_size"),
        layout.get("group_offsets"),
        adv_mode,
        compute_dtype=torch.float64,
    )
    assert_close_scaled(actual[1]["advantages"], adv, 1e-5)
    expected = oracle_loss_and_grad(logp, old, ref, adv, mask, **kwargs)
    compare(actual, expected, TOLERANCE[dtype], adv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_span_several_chunks(backend):
    """T above the kernel's 2048-token chunk, and a batch whose rows cross it."""
    gen = torch.Generator().manual_seed(7)
    logp, old, ref, mask = make_batch(3, 2500, torch.float32, gen)
    rewards = torch.tensor([0.0, 1.0, 0.5])
    with on_backend(backend) as device:
        actual = run_fused(
            krpo_loss,
            logp.to(device),
            old.to(device),
            ref.to(device),
            rewards.to(device),
            mask.to(device),
            group_size=3,
        )
    adv = group_advantages_reference(rewards, 3, compute_dtype=torch.float64)
    compare(actual, oracle_loss_and_grad(logp, old, ref, adv, mask), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_mask_gives_zero_not_nan(backend):
    gen = torch.Generator().manual_seed(8)
    logp, old, ref, mask = make_batch(4, 9, torch.float32, gen)
    mask[:] = False
    for loss_agg in LOSS_AGGREGATIONS:
        with on_backend(backend) as device:
            loss, metrics, grad = run_fused(
                policy_loss,
                logp.to(device),
                old.to(device),
                ref.to(device),
                torch.randn(4).to(device),
                mask.to(device),
                loss_agg=loss_agg,
                max_len=9,
            )
        assert loss.item() == 0.0 and metrics["kl"].item() == 0.0
        assert metrics["clip_fraction"].item() == 0.0
        assert torch.equal(grad.cpu(), torch.zeros(4, 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_values_never_leak(backend):
    """-inf or NaN log-probs at masked-out tokens must not reach the loss or gradient."""
    gen = torch.Generator().manual_seed(9)
    logp, old, ref, mask = make_batch(3, 12, torch.float32, gen)
    mask[:, 8:] = False
    dirty = [t.clone() for t in (logp, old, ref)]
    for t, fill in zip(dirty, (float("-inf"), float("nan"), float("inf")), strict=True):
        t[:, 8:] = fill
    adv = torch.randn(3, generator=gen)
    with on_backend(backend) as device:
        actual = run_fused(
            policy_loss, *(t.to(device) for t in dirty), adv.to(device), mask.to(device)
        )
    compare(actual, oracle_loss_and_grad(logp, old, ref, adv, mask), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_and_no_kl_skip_inputs(backend):
    """old_logp=None means ratio 1; beta=0 never reads ref_logp (NaN there is harmless)."""
    gen = torch.Generator().manual_seed(10)
    logp, _, ref, mask = make_batch(4, 16, torch.float32, gen)
    adv = torch.randn(4, generator=gen)
    with on_backend(backend) as device:
        on_policy = run_fused(
            policy_loss, logp.to(device), None, None, adv.to(device), mask.to(device), beta=0.0
        )
        nan_ref = run_fused(
            policy_loss,
            logp.to(device),
            None,
            torch.full_like(ref, float("nan")).to(device),
            adv.to(device),
            mask.to(device),
            beta=0.0,
        )
    expected = oracle_loss_and_grad(logp, None, None, adv, mask, beta=0.0)
    compare(on_policy, expected, 1e-5)
    compare(nan_ref, expected, 1e-5)
    # On-policy, seq-mean-token-mean: loss = -mean(A) over rows with tokens; never clipped.
    assert on_policy[1]["clip_fraction"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(11)
    logp, old, ref, mask = make_batch(6, 20, torch.float32, gen)
    adv = torch.randn(12, generator=gen)[::2]
    with on_backend(backend) as device:
        views = [t.to(device).t().contiguous().t() for t in (logp, old, ref, mask)]
        assert not views[0].is_contiguous()
        actual = run_fused(policy_loss, views[0], views[1], views[2], adv.to(device), views[3])
    compare(actual, oracle_loss_and_grad(logp, old, ref, adv, mask), 1e-5)


def test_backward_scales_with_the_upstream_gradient():
    gen = torch.Generator().manual_seed(12)
    logp, old, ref, mask = make_batch(3, 10, torch.float32, gen)
    adv = torch.randn(3, generator=gen)
    grads = []
    for upstream in (1.0, -3.5):
        leaf = logp.clone().requires_grad_()
        loss, _ = policy_loss(leaf, old, ref, adv, mask, loss_agg="token-mean")
        (upstream * loss).backward()
        grads.append(leaf.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[1], -3.5 * grads[0], rtol=1e-6)


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_gradcheck_float64_torch_path(loss_agg, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(13)
    logp, old, ref, mask = (
        t.double() if t.is_floating_point() else t
        for t in make_batch(3, 5, torch.float32, gen, spread=0.1)
    )
    adv = torch.randn(3, generator=gen, dtype=torch.float64)
    leaf = logp.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: policy_loss(x, old, ref, adv, mask, loss_agg=loss_agg, max_len=7)[0], (leaf,)
    )
    rewards = torch.rand(3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: krpo_loss(x, old, ref, rewards, mask, group_size=3, loss_agg=loss_agg, max_len=7)[
            0
        ],
        (leaf,),
    )


def test_krpo_loss_equals_policy_loss_of_group_advantages():
    gen = torch.Generator().manual_seed(14)
    logp, old, ref, mask = make_batch(8, 12, torch.float32, gen)
    rewards = torch.rand(8, generator=gen)
    fused, fused_metrics = krpo_loss(logp, old, ref, rewards, mask, group_size=4)
    adv = group_advantages(rewards, group_size=4)
    split, _ = policy_loss(logp, old, ref, adv, mask)
    assert torch.allclose(fused, split, rtol=1e-6)
    assert torch.allclose(fused_metrics["advantages"], adv, rtol=1e-6)


@pytest.mark.parametrize(
    "dtype, with_old, beta, loss_agg",
    [
        (torch.float32, True, 0.04, "seq-mean-token-mean"),
        (torch.float32, False, 0.0, "token-mean"),
        (torch.bfloat16, True, 0.5, "seq-mean-token-sum-norm"),
    ],
)
def test_compiled_cpu_path_matches_oracle(monkeypatch, dtype, with_old, beta, loss_agg):
    """Large CPU batches run the torch path through torch.compile: same oracle, same bounds."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(ops, "COMPILE_MIN_TOKENS", 0)
    calls = []
    real = ops._compiled_loss_rows
    monkeypatch.setattr(ops, "_compiled_loss_rows", lambda *args: calls.append(1) or real(*args))
    gen = torch.Generator().manual_seed(15)
    logp, old, ref, mask = make_batch(5, 33, dtype, gen, zero_rows=1)
    old = old if with_old else None
    adv = torch.randn(5, generator=gen) * 3
    kwargs = dict(beta=beta, loss_agg=loss_agg, max_len=40)
    actual = run_fused(policy_loss, logp, old, ref, adv, mask, **kwargs)
    assert calls and not real.failed, "the compiled path did not run"
    compare(
        actual, oracle_loss_and_grad(logp, old, ref, adv, mask, **kwargs), TOLERANCE[dtype], adv
    )


def test_compile_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(ops, "COMPILE_MIN_TOKENS", 0)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    compiled = ops._CompiledOnce(ops._loss_rows_torch, "policy loss")
    compiled.compiled = broken
    monkeypatch.setattr(ops, "_compiled_loss_rows", compiled)
    gen = torch.Generator().manual_seed(16)
    logp, old, ref, mask = make_batch(4, 9, torch.float32, gen)
    adv = torch.randn(4, generator=gen)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        actual = run_fused(policy_loss, logp, old, ref, adv, mask)
    compare(actual, oracle_loss_and_grad(logp, old, ref, adv, mask), 1e-5)
    assert compiled.failed  # not tried again


@pytest.mark.parametrize(
    "adv_mode, dtype, loss_agg",
    [
        ("kalman", torch.float32, "seq-mean-token-mean"),
        ("grpo", torch.float32, "token-mean"),
        ("batch_std", torch.bfloat16, "seq-mean-token-sum-norm"),
    ],
)
def test_compiled_cpu_krpo_loss_matches_oracle(monkeypatch, adv_mode, dtype, loss_agg):
    """Large CPU batches of uniform groups compute krpo_loss, advantages included, in one
    compiled graph: same oracle, same bounds, and equal-reward groups still get exactly 0."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(ops, "COMPILE_MIN_TOKENS", 0)
    calls = []
    real = torch.compile

    def spy(fn, **kwargs):
        calls.append(fn.__name__)
        return real(fn, **kwargs)

    monkeypatch.setattr(ops, "_compiled_krpo_rows", ops._CompiledOnce(ops._krpo_rows_torch, "KRPO"))
    monkeypatch.setattr(ops.torch, "compile", spy)
    gen = torch.Generator().manual_seed(17)
    logp, old, ref, mask = make_batch(12, 21, dtype, gen, zero_rows=1)
    levels = torch.tensor([0.0, 0.01, 0.5, 1.0])
    rewards = levels[torch.randint(0, 4, (12,), generator=gen)]
    rewards[:4] = 0.01  # one group of equal rewards
    kwargs = dict(beta=0.04, loss_agg=loss_agg, max_len=32)
    actual = run_fused(
        krpo_loss, logp, old, ref, rewards, mask, group_size=4, adv_mode=adv_mode, **kwargs
    )
    assert "_krpo_rows_torch" in calls, "the compiled krpo_loss path did not run"
    adv = group_advantages_reference(rewards, 4, None, adv_mode, compute_dtype=torch.float64)
    assert_close_scaled(actual[1]["advantages"], adv, 1e-5)
    if adv_mode != "kalman":
        assert (actual[1]["advantages"][:4] == 0).all()
    compare(
        actual, oracle_loss_and_grad(logp, old, ref, adv, mask, **kwargs), TOLERANCE[dtype], adv
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_compiled_cpu_krpo_loss_rejects_non_finite_rewards(monkeypatch, bad):
    """The compiled krpo_loss reads the rewards' NaN/inf check from a sum in its graph:
    a bad reward still raises naming ``rewards``, whichever group it sits in, while
    finite rewards whose sum overflows pass."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(ops, "COMPILE_MIN_TOKENS", 0)
    compiled = ops._CompiledOnce(ops._krpo_rows_torch, "KRPO")
    monkeypatch.setattr(ops, "_compiled_krpo_rows", compiled)
    gen = torch.Generator().manual_seed(5)
    logp, old, ref, mask = make_batch(8, 16, torch.float32, gen)
    for position in (0, 5):
        rewards = torch.rand(8, generator=gen)
        rewards[position] = bad
        with pytest.raises(ValueError, match="rewards must be finite"):
            krpo_loss(logp, old, ref, rewards, mask, group_size=4)
    assert compiled.compiled is not None, "the compiled krpo_loss path did not run"
    huge = torch.full((8,), 3e38)
    loss, metrics = krpo_loss(logp, old, ref, huge, mask, group_size=4, adv_mode="grpo")
    assert torch.isfinite(loss) and (metrics["advantages"] == 0).all()
