"""The benchmark runner end to end at its tiniest settings, and the eager peers
(krpo_fast.eager) against the paper oracles they are timed beside."""

import pytest
import torch

from krpo_fast import bench
from krpo_fast.eager import (
    group_advantages_eager,
    krpo_loss_eager,
    policy_loss_from_hidden_eager,
    selective_log_softmax_eager,
)
from krpo_fast.reference import (
    group_advantages_reference,
    policy_loss_reference,
    token_logprobs_reference,
)


def test_bench_runs_end_to_end(tmp_path):
    readme = bench.run(
        ops=["advantages", "policy_loss"],
        quick=True,
        out=tmp_path,
        impls=["paper", "eager", "krpo-fast"],
        pytest_args=["--benchmark-max-time=0.001", "--benchmark-min-rounds=1"],
    )
    assert readme == tmp_path / "README.md"
    text = readme.read_text()
    assert "CPU-only machine: these are the CPU paths" in text
    assert "| advantages | kalman | 64x8 | float32 |" in text
    assert "| policy_loss | fwd+bwd | 8x1024 | float32 |" in text
    rows = bench.load_rows(tmp_path / "benchmark-advantages-policy_loss.json")
    # 4 modes x 3 impls, and 2 passes x 3 impls
    assert len(rows) == 12 + 6
    assert {r["impl"] for r in rows} == {"paper", "eager", "krpo-fast"}
    assert all(r["time_s"] > 0 for r in rows)
    assert (tmp_path / "advantages.png").stat().st_size > 0
    assert (tmp_path / "policy_loss.png").stat().st_size > 0
    assert not list(tmp_path.glob("skipped*"))


def test_bench_rejects_unknown_op(tmp_path):
    with pytest.raises(ValueError, match="unknown op"):
        bench.run(ops=["nope"], out=tmp_path)


@pytest.mark.parametrize("mode", ["kalman", "grpo", "dr_grpo", "batch_std"])
def test_eager_advantages_match_paper(mode):
    rewards = torch.rand(12 * 16, generator=torch.Generator().manual_seed(1))
    expected = group_advantages_reference(rewards, 16, mode=mode, compute_dtype=torch.float64)
    torch.testing.assert_close(group_advantages_eager(rewards, 16, mode), expected)


def _loss_inputs(B, T, gen):
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + 0.1 * torch.randn(B, T, generator=gen)
    ref = logp + 0.1 * torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[1] = False  # an all-masked sequence contributes 0
    return logp, old, ref, mask


def test_eager_krpo_loss_matches_paper():
    gen = torch.Generator().manual_seed(2)
    logp, old, ref, mask = _loss_inputs(8, 9, gen)
    rewards = (torch.rand(8, generator=gen) > 0.5).float()
    adv = group_advantages_reference(rewards, 4)
    leaf = logp.clone().requires_grad_()
    expected, _ = policy_loss_reference(leaf, old, ref, adv, mask)
    got = krpo_loss_eager(logp.requires_grad_(), old, ref, rewards, mask, 4)
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got, logp)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    torch.testing.assert_close(grad, expected_grad)


def test_eager_logits_paths_match_paper():
    gen = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 5, 8, 50
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    logits = hidden @ weight.T
    torch.testing.assert_close(
        selective_log_softmax_eager(logits, ids, 0.7), token_logprobs_reference(logits, ids, 0.7)
    )
    _, old, ref, mask = _loss_inputs(B, T, gen)
    adv = torch.randn(B, generator=gen)
    expected, _ = policy_loss_reference(token_logprobs_reference(logits, ids), old, ref, adv, mask)
    got = policy_loss_from_hidden_eager(hidden, weight, ids, old, ref, adv, mask)
    torch.testing.assert_close(got, expected)
