"""The CPU torch path of group_advantages on both sides of its small-batch switch
(matrix products up to ``_GEMM_MAX_REWARDS`` rewards, slicing and broadcasts above):
the properties the oracle tests do not pin down on each side."""

import pytest
import torch
from helpers import assert_close_scaled, on_backend

from krpo_fast import group_advantages
from krpo_fast.ops import _GEMM_MAX_REWARDS
from krpo_fast.reference import group_advantages_reference

# (n_groups, G): 512 rewards, and a batch past the switch.
SHAPES = ((64, 8), (2 * _GEMM_MAX_REWARDS // 16, 16))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["kalman", "grpo", "dr_grpo"])
def test_large_common_reward_level_does_not_cancel(shape, mode):
    n_groups, size = shape
    gen = torch.Generator().manual_seed(6)
    rewards = 1e6 + torch.randn(n_groups * size, generator=gen)
    with on_backend("torch"):
        out = group_advantages(rewards, group_size=size, mode=mode)
    expected = group_advantages_reference(rewards, size, None, mode, compute_dtype=torch.float64)
    assert_close_scaled(out, expected, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "batch_std"])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_groups_of_equal_rewards_give_exactly_zero(shape, mode, eps):
    """Every group equal, at levels from -3.1 to 1e6: the batch has spread, no group has."""
    n_groups, size = shape
    levels = torch.tensor([0.7, 1e6, -3.1, 0.0, 1.0])[torch.arange(n_groups) % 5]
    rewards = levels.repeat_interleave(size)
    with on_backend("torch"):
        out = group_advantages(rewards, group_size=size, mode=mode, eps=eps)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["kalman", "grpo", "dr_grpo", "batch_std"])
@pytest.mark.parametrize("position", [0, 16, 21])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rewards_are_rejected(shape, mode, position, bad):
    """NaN or inf first in a group or inside one (a lone inf makes its group's mean inf,
    not NaN)."""
    n_groups, size = shape
    rewards = torch.rand(n_groups * size, generator=torch.Generator().manual_seed(7)) > 0.5
    rewards = rewards.float()
    rewards[position] = bad
    with on_backend("torch"), pytest.raises(ValueError, match="rewards"):
        group_advantages(rewards, group_size=size, mode=mode)


def test_huge_finite_rewards_are_not_rejected():
    """Sums that overflow float32 come from finite rewards: they pass the check."""
    rewards = torch.tensor([3e38, -3e38, 1.0, 2.0] * (_GEMM_MAX_REWARDS // 2))
    with on_backend("torch"):
        for mode in ("kalman", "grpo", "dr_grpo", "batch_std"):
            group_advantages(rewards[:8], group_size=4, mode=mode)
            group_advantages(rewards, group_size=4, mode=mode)


@pytest.mark.parametrize("n_groups", [4, 2 * _GEMM_MAX_REWARDS // 3])
@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "batch_std"])
@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_a_reward_equal_to_its_group_mean_gets_exactly_zero(n_groups, mode, backend):
    """(0, 0.5, 1): the mean is 0.5 exactly, so the middle reward's advantage is exactly 0
    on every path, as in the float64 reference (a product with 1/3 leaves -3e-8, which
    flips the clip indicator of a loss at that row)."""
    rewards = torch.tensor([0.0, 0.5, 1.0]).repeat(n_groups)
    with on_backend(backend):
        out = group_advantages(rewards, group_size=3, mode=mode)
    assert torch.equal(out[1::3], torch.zeros(n_groups))
