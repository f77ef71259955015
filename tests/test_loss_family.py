"""The loss family (docs/loss_family.md) in the fused ops against the float64 oracle
``reference_losses.policy_loss_family_reference``: every option, through the kernels
(the interpreter on CPU) and the CPU torch path, values, metrics and gradients."""

import math

import pytest
import torch
from helpers import BACKENDS, assert_close_scaled, on_backend, poisoned_allocations

import krpo_fast.kernels.policy_loss as policy_loss_kernels
from krpo_fast import (
    group_advantages,
    krpo_loss,
    krpo_loss_from_hidden,
    krpo_loss_from_logits,
    ops,
    policy_loss,
    policy_loss_from_hidden,
    policy_loss_from_logits,
)
from krpo_fast.ops import LOSS_AGGREGATIONS
from krpo_fast.reference_losses import policy_loss_family_reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# Every option of the family, alone and in the combinations that interact (the
# sequence ratio with each surrogate, the bias-corrected KL with sequence ratios).
CASES = {
    "paper": {},
    "sequence": dict(ratio_level="sequence"),
    "cispo": dict(loss_type="cispo", eps_high=1.2),
    "cispo-sequence": dict(loss_type="cispo", eps_high=1.1, ratio_level="sequence"),
    "sapo": dict(loss_type="sapo", tau_pos=0.9, tau_neg=1.3),
    "sapo-sequence": dict(loss_type="sapo", ratio_level="sequence"),
    "delta": dict(delta=1.25),
    "dual-clip": dict(dual_clip=1.4),
    "delta-dual-sequence": dict(delta=1.3, dual_clip=1.2, ratio_level="sequence"),
    "k1": dict(kl_estimator="k1"),
    "k2": dict(kl_estimator="k2"),
    "low-var-kl": dict(kl_estimator="low_var_kl"),
    "bias-kl": dict(bias_correction_kl=True),
    "bias-kl-sequence": dict(bias_correction_kl=True, ratio_level="sequence"),
    "bias-k2-sequence-sapo": dict(
        bias_correction_kl=True, ratio_level="sequence", kl_estimator="k2", loss_type="sapo"
    ),
}
WEIGHTS = (None, "row", "token")
METRICS = (
    "kl",
    "clip_fraction",
    "clip_fraction_low",
    "clip_fraction_high",
    "dual_clip_fraction",
    "ratio_mean",
)


def make_batch(n_rows, n_cols, dtype, gen, weights=None, kl_spread=1.5):
    """Log-probs, sampler and reference log-probs spread enough to hit every clip, cap
    and clamp; the first row is masked out entirely; masked-out tokens hold NaN, -inf."""
    logp = -torch.rand(n_rows, n_cols, generator=gen) * 4
    old = logp + 0.35 * torch.randn(n_rows, n_cols, generator=gen)
    ref = logp + kl_spread * torch.randn(n_rows, n_cols, generator=gen)
    mask = torch.rand(n_rows, n_cols, generator=gen) > 0.25
    mask[0] = False
    logp, old, ref = (t.to(dtype) for t in (logp, old, ref))
    logp[~mask] = float("nan")
    old[~mask] = float("-inf")
    ref[~mask] = float("nan")
    adv = torch.randn(n_rows, generator=gen) * 2
    if weights == "row":
        weights = torch.rand(n_rows, generator=gen) * 2
    elif weights == "token":
        weights = torch.rand(n_rows, n_cols, generator=gen) * 2
    return logp, old, ref, adv, mask, weights


def oracle(logp, old, ref, adv, mask, **kwargs):
    """(loss, metrics, d loss / d logp, gradient scale) in float64 through autograd; the
    scale adds the largest policy and KL parts, which may cancel in the sum."""
    results = {}
    beta = kwargs.get("beta", 0.01)
    for part_beta in {beta, 0.0}:
        leaf = logp.detach().double().requires_grad_()
        loss, metrics = policy_loss_family_reference(
            leaf,
            None if old is None else old.double(),
            None if ref is None else ref.double(),
            adv.double(),
            mask,
            **{**kwargs, "beta": part_beta},
        )
        (grad,) = torch.autograd.grad(loss, leaf)
        results[part_beta] = (loss.detach(), metrics, torch.where(mask, grad, 0.0))
    loss, metrics, grad = results[beta]
    policy_grad = results[0.0][2]
    scale = float(policy_grad.abs().max() + (grad - policy_grad).abs().max())
    return loss, metrics, grad, scale


def run(fn, logp, *args, **kwargs):
    leaf = logp.detach().clone().requires_grad_()
    loss, metrics = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), metrics, grad


def loss_scale(logp, adv, mask, metrics, kwargs):
    """The size of the terms the loss sums: |A| (times |logp| for cispo's term) and the
    KL, which float32 rounding follows rather than the possibly cancelled sum."""
    finite_logp = float(torch.where(mask, logp.double(), 0.0).abs().max())
    policy = float(adv.abs().max()) * (1.0 + finite_logp) * 4.0
    return policy + float(metrics["kl"]) * 4.0 + 1e-6


def compare(actual, expected, rtol, logp, adv, mask, kwargs):
    loss, metrics, grad = actual
    loss_ref, metrics_ref, grad_ref, grad_scale = expected
    scale = loss_scale(logp, adv, mask, metrics_ref, kwargs)
    assert_close_scaled(loss.reshape(1), loss_ref.reshape(1), rtol, scale=scale)
    assert_close_scaled(torch.where(mask, grad.cpu().double(), 0.0), grad_ref, rtol, grad_scale)
    assert torch.equal(grad.cpu()[~mask], torch.zeros_like(grad.cpu()[~mask]))
    for key in metrics if len(metrics) > 2 else ("kl", "clip_fraction"):
        if key == "advantages":
            continue
        assert_close_scaled(
            metrics[key].reshape(1).cpu(), metrics_ref[key].reshape(1), 1e-5, scale=1.0
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("case", list(CASES))
def test_policy_loss_family_matches_oracle(backend, dtype, weights, case):
    index = list(CASES).index(case)
    gen = torch.Generator().manual_seed(1000 * index + 10 * WEIGHTS.index(weights) + 1)
    logp, old, ref, adv, mask, token_weights = make_batch(6, 23, dtype, gen, weights)
    kwargs = dict(
        CASES[case],
        beta=0.05,
        loss_agg=LOSS_AGGREGATIONS[index % len(LOSS_AGGREGATIONS)],
        max_len=30,
    )
    with on_backend(backend) as device, poisoned_allocations():
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        actual = run(
            policy_loss,
            to(logp),
            to(old),
            to(ref),
            to(adv),
            to(mask),
            token_weights=to(token_weights),
            **kwargs,
        )
    if case != "paper" or weights is not None:
        assert set(METRICS) <= set(actual[1])
    expected = oracle(logp, old, ref, adv, mask, token_weights=token_weights, **kwargs)
    compare(actual, expected, TOLERANCE[dtype], logp, adv, mask, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["sequence", "cispo-sequence", "sapo", "delta-dual-sequence"])
def test_on_policy_and_no_kl(backend, case):
    """old_logp None (ratio 1, gradient through logp) and beta 0 (ref never read)."""
    gen = torch.Generator().manual_seed(77)
    logp, _, _, adv, mask, weights = make_batch(5, 17, torch.float32, gen, "token")
    kwargs = dict(CASES[case], beta=0.0, loss_agg="token-mean")
    with on_backend(backend) as device:
        actual = run(
            policy_loss,
            logp.to(device),
            None,
            None,
            adv.to(device),
            mask.to(device),
            token_weights=weights.to(device),
            **kwargs,
        )
    expected = oracle(logp, None, None, adv, mask, token_weights=weights, **kwargs)
    compare(actual, expected, 1e-5, logp, adv, mask, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["sequence", "cispo", "bias-k2-sequence-sapo", "dual-clip"])
def test_krpo_loss_family_is_policy_loss_of_its_advantages(backend, case):
    gen = torch.Generator().manual_seed(5)
    logp, old, ref, _, mask, weights = make_batch(8, 11, torch.float32, gen, "row")
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.0])
    kwargs = dict(CASES[case], beta=0.02, loss_agg="seq-mean-token-mean")
    with on_backend(backend) as device:
        to = lambda t: t.to(device)  # noqa: E731
        loss, metrics, grad = run(
            krpo_loss,
            to(logp),
            to(old),
            to(ref),
            to(rewards),
            to(mask),
            group_size=4,
            token_weights=to(weights),
            **kwargs,
        )
        adv = group_advantages(to(rewards), group_size=4).cpu()
    assert_close_scaled(metrics["advantages"].cpu(), adv, 1e-6)
    expected = oracle(logp, old, ref, adv, mask, token_weights=weights, **kwargs)
    compare((loss, metrics, grad), expected, 1e-5, logp, adv, mask, kwargs)


@pytest.mark.parametrize("case", ["sequence", "cispo", "bias-k2-sequence-sapo"])
def test_compiled_cpu_path_of_large_batches(case):
    """From COMPILE_MIN_TOKENS tokens the CPU path runs through torch.compile."""
    gen = torch.Generator().manual_seed(21)
    logp, old, ref, adv, mask, weights = make_batch(4, 1100, torch.float32, gen, "token")
    assert logp.numel() >= ops.COMPILE_MIN_TOKENS
    kwargs = dict(CASES[case], beta=0.05, loss_agg="seq-mean-token-mean")
    with on_backend("torch"):
        actual = run(policy_loss, logp, old, ref, adv, mask, token_weights=weights, **kwargs)
    assert ops._compiled_family_rows.compiled is not None
    assert not ops._compiled_family_rows.failed
    expected = oracle(logp, old, ref, adv, mask, token_weights=weights, **kwargs)
    compare(actual, expected, 1e-5, logp, adv, mask, kwargs)


def test_default_call_runs_the_paper_kernel(monkeypatch):
    """The defaults launch the kernel variant without the family's code (FAMILY off),
    and spelling the defaults out changes nothing, bit for bit."""
    launched = []
    real = policy_loss_kernels.policy_loss_triton

    def spy(*args):
        launched.append(args[10])
        return real(*args)

    monkeypatch.setattr(policy_loss_kernels, "policy_loss_triton", spy)
    gen = torch.Generator().manual_seed(3)
    logp, old, ref, adv, mask, _ = make_batch(4, 9, torch.float32, gen)
    with on_backend("kernel") as device:
        to = lambda t: t.to(device)  # noqa: E731
        plain = run(policy_loss, to(logp), to(old), to(ref), to(adv), to(mask))
        spelled = run(
            policy_loss,
            to(logp),
            to(old),
            to(ref),
            to(adv),
            to(mask),
            ratio_level="token",
            loss_type="clip",
            delta=None,
            dual_clip=None,
            kl_estimator="k3",
            bias_correction_kl=False,
            token_weights=None,
        )
        run(policy_loss, to(logp), to(old), to(ref), to(adv), to(mask), kl_estimator="k1")
    assert launched[:2] == [None, None] and launched[2] is not None
    assert torch.equal(plain[0], spelled[0]) and torch.equal(plain[2], spelled[2])
    assert sorted(plain[1]) == ["clip_fraction", "kl"]


# ----------------------------------------------------------------- from logits / hidden


def logits_batch(n_rows, n_cols, vocab, gen, dtype=torch.float32):
    hidden = torch.randn(n_rows, n_cols, 8, generator=gen)
    weight = torch.randn(vocab, 8, generator=gen) * 0.7
    logits = hidden @ weight.T
    ids = torch.randint(0, vocab, (n_rows, n_cols), generator=gen)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
    old = (logp + 0.35 * torch.randn(n_rows, n_cols, generator=gen, dtype=torch.float64)).float()
    ref = (logp + 1.5 * torch.randn(n_rows, n_cols, generator=gen, dtype=torch.float64)).float()
    mask = torch.rand(n_rows, n_cols, generator=gen) > 0.3
    mask[0, :2] = False
    adv = torch.randn(n_rows, generator=gen) * 2
    weights = torch.rand(n_rows, n_cols, generator=gen) * 2
    return hidden.to(dtype), weight.to(dtype), ids, old, ref, mask, adv, weights


def eager_logits_oracle(logits, ids, old, ref, adv, mask, weights, entropy_coef, **kwargs):
    """The family loss of log_softmax(logits) minus entropy_coef * mean entropy over
    masked tokens, float64 autograd: (loss, metrics with "entropy", d loss / d logits)."""
    leaf = logits.detach().double().requires_grad_()
    log_probs = torch.log_softmax(leaf, -1)
    logp = log_probs.gather(-1, ids[..., None])[..., 0]
    loss, metrics = policy_loss_family_reference(
        logp, old.double(), ref.double(), adv.double(), mask, token_weights=weights, **kwargs
    )
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    entropy_mean = torch.where(mask, entropy, 0.0).sum() / mask.sum()
    loss = loss - entropy_coef * entropy_mean
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), {**metrics, "entropy": entropy_mean.detach()}, grad


LOGITS_CASES = ["paper", "sequence", "cispo", "sapo-sequence", "delta-dual-sequence", "low-var-kl"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.3])
@pytest.mark.parametrize("case", LOGITS_CASES + ["bias-kl"])
def test_loss_from_logits_family_and_entropy(backend, dtype, entropy_coef, case):
    gen = torch.Generator().manual_seed(
        300 + LOGITS_CASES.index(case) if case in LOGITS_CASES else 9
    )
    hidden, weight, ids, old, ref, mask, adv, weights = logits_batch(3, 4, 37, gen)
    logits = (hidden @ weight.T).to(dtype)
    logits[~mask] = float("nan")  # masked-out rows never reach the loss or gradient
    kwargs = dict(CASES[case], beta=0.04, loss_agg="token-mean")
    with on_backend(backend) as device, poisoned_allocations():
        leaf = logits.to(device).requires_grad_()
        loss, metrics = policy_loss_from_logits(
            leaf,
            ids.to(device),
            old.to(device),
            ref.to(device),
            adv.to(device),
            mask.to(device),
            token_weights=weights.to(device),
            entropy_coef=entropy_coef,
            return_entropy=True,
            **kwargs,
        )
        (grad,) = torch.autograd.grad(loss, leaf)
    clean = torch.where(mask[..., None], logits.double(), 0.0)
    loss_ref, metrics_ref, grad_ref = eager_logits_oracle(
        clean, ids, old, ref, adv, mask, weights, entropy_coef, **kwargs
    )
    rtol = TOLERANCE[dtype]
    assert_close_scaled(loss.reshape(1).cpu(), loss_ref.reshape(1), rtol, scale=10.0)
    grad = grad.cpu().double()
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert_close_scaled(grad, torch.where(mask[..., None], grad_ref, 0.0), rtol)
    for key in (*METRICS, "entropy"):
        assert_close_scaled(
            metrics[key].reshape(1).cpu(), metrics_ref[key].reshape(1), 1e-5, scale=1.0
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["sequence", "sapo", "bias-kl-sequence"])
def test_loss_from_hidden_family_and_entropy(backend, case):
    """Chunks smaller than the batch: the sequence ratio spans chunks."""
    gen = torch.Generator().manual_seed(41)
    hidden, weight, ids, old, ref, mask, adv, weights = logits_batch(3, 5, 29, gen)
    rewards = torch.tensor([0.0, 1.0, 0.5])
    kwargs = dict(CASES[case], beta=0.04, loss_agg="seq-mean-token-mean")
    with on_backend(backend) as device:
        h = hidden.to(device).requires_grad_()
        w = weight.to(device).requires_grad_()
        loss, metrics = krpo_loss_from_hidden(
            h,
            w,
            ids.to(device),
            old.to(device),
            ref.to(device),
            rewards.to(device),
            mask.to(device),
            group_size=3,
            token_weights=weights[:, 0].to(device),
            entropy_coef=0.2,
            chunk_size=4,
            **kwargs,
        )
        grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    adv = metrics["advantages"].cpu()
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    leaf_logits = h64 @ w64.T
    loss_ref, metrics_ref, grad_logits = eager_logits_oracle(
        leaf_logits, ids, old, ref, adv, mask, weights[:, 0], 0.2, **kwargs
    )
    grad_h_ref = grad_logits @ w64.detach()
    grad_w_ref = grad_logits.reshape(-1, 29).T @ h64.detach().reshape(-1, 8)
    assert_close_scaled(loss.reshape(1).cpu(), loss_ref.reshape(1), 1e-5, scale=10.0)
    assert_close_scaled(grad_h.cpu(), grad_h_ref, 1e-5)
    assert_close_scaled(grad_w.cpu(), grad_w_ref, 1e-5)
    for key in (*METRICS, "entropy"):
        assert_close_scaled(
            metrics[key].reshape(1).cpu(), metrics_ref[key].reshape(1), 1e-5, scale=1.0
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["sequence", "sapo"])
def test_inplace_backward_gives_the_same_gradient(backend, case):
    gen = torch.Generator().manual_seed(17)
    hidden, weight, ids, old, ref, mask, adv, weights = logits_batch(2, 5, 31, gen)
    logits = hidden @ weight.T
    grads = []
    with on_backend(backend) as device:
        for inplace in (False, True):
            leaf = logits.clone().to(device).requires_grad_()
            loss, _ = policy_loss_from_logits(
                leaf * 1.0 if inplace else leaf,
                ids.to(device),
                old.to(device),
                ref.to(device),
                adv.to(device),
                mask.to(device),
                token_weights=weights.to(device),
                entropy_coef=0.1,
                inplace_backward=inplace,
                **CASES[case],
            )
            grads.append(torch.autograd.grad(loss, leaf)[0].cpu())
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siblings_agree(backend):
    """krpo_loss_from_logits = policy_loss_from_hidden's chunks = policy_loss on the
    log-probs, for one family member with weights and the entropy bonus."""
    gen = torch.Generator().manual_seed(12)
    hidden, weight, ids, old, ref, mask, _, weights = logits_batch(4, 3, 23, gen)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    kwargs = dict(loss_type="sapo", kl_estimator="k2", token_weights=weights, entropy_coef=0.1)
    with on_backend(backend):
        by_logits, m_logits = krpo_loss_from_logits(
            hidden @ weight.T, ids, old, ref, rewards, mask, group_size=2, **kwargs
        )
        adv = m_logits["advantages"]
        by_hidden, m_hidden = policy_loss_from_hidden(
            hidden, weight, ids, old, ref, adv, mask, chunk_size=5, **kwargs
        )
    assert math.isclose(by_logits.item(), by_hidden.item(), rel_tol=1e-5, abs_tol=1e-6)
    for key in (*METRICS, "entropy"):
        assert math.isclose(m_logits[key].item(), m_hidden[key].item(), abs_tol=1e-6), key


# ----------------------------------------------------------------------------- validation

BAD_OPTIONS = [
    (dict(ratio_level="row"), ValueError, "ratio_level"),
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    (dict(bias_correction_kl=1), TypeError, "bias_correction_kl"),
    (dict(tau_pos=0.0), ValueError, "tau_pos"),
    (dict(tau_neg=float("nan")), ValueError, "tau_neg"),
    (dict(dual_clip=1.0), ValueError, "dual_clip must be > 1"),
    (dict(delta=1.1), ValueError, r"delta must be > 1 \+ eps_high"),
    (dict(delta=float("inf")), ValueError, "delta"),
    (dict(loss_type="cispo", delta=4.0), ValueError, "delta and dual_clip"),
    (dict(loss_type="sapo", dual_clip=3.0), ValueError, "delta and dual_clip"),
    (dict(loss_type="cispo", eps_high=0.0), ValueError, "eps_high"),
    (dict(token_weights=torch.ones(3, 5)), ValueError, "token_weights must have shape"),
    (dict(token_weights=torch.ones(4, 5, dtype=torch.int64)), TypeError, "token_weights"),
    (dict(token_weights=torch.ones(4, 1, 5)), ValueError, "token_weights"),
    (dict(token_weights=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "token_weights"),
    (dict(token_weights=[1.0, 1.0, 1.0, 1.0]), TypeError, "token_weights"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_bad_options_are_rejected_by_name(options, error, message):
    logp = -torch.rand(4, 5)
    with pytest.raises(error, match=message):
        policy_loss(logp, logp, logp, torch.randn(4), torch.ones(4, 5, dtype=torch.bool), **options)
    logits, ids = torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))
    with pytest.raises(error, match=message):
        policy_loss_from_logits(
            logits, ids, logp, logp, torch.randn(4), torch.ones(4, 5, dtype=torch.bool), **options
        )


def test_bad_entropy_options_are_rejected_by_name():
    logits, ids, logp = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3)), -torch.rand(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="entropy_coef"):
        policy_loss_from_logits(
            logits, ids, logp, logp, torch.randn(2), mask, entropy_coef=math.inf
        )
    with pytest.raises(TypeError, match="return_entropy"):
        policy_loss_from_logits(logits, ids, logp, logp, torch.randn(2), mask, return_entropy=1)
