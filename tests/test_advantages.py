"""group_advantages / kalman_advantages against the paper's per-element oracle."""

import pytest
import torch
from helpers import BACKENDS, assert_close_scaled, on_backend, poisoned_allocations
from hypothesis import given, settings
from hypothesis import strategies as st

from krpo_fast import group_advantages, kalman_advantages
from krpo_fast.ops import ADVANTAGE_MODES
from krpo_fast.reference import group_advantages_reference, kalman_advantages_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def random_rewards(n: int, kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if kind == "binary":
        rewards = (torch.rand(n, generator=gen) > 0.5).float()
    elif kind == "graded":  # the paper's reward levels
        levels = torch.tensor([0.0, 0.01, 0.5, 1.0])
        rewards = levels[torch.randint(0, 4, (n,), generator=gen)]
    else:
        rewards = torch.randn(n, generator=gen) * 3 + 1
    return rewards.to(dtype)


def oracle(rewards, group_size=None, group_offsets=None, mode="kalman", **kwargs):
    return group_advantages_reference(
        rewards.cpu(),
        group_size,
        None if group_offsets is None else group_offsets.cpu(),
        mode,
        compute_dtype=torch.float64,
        **kwargs,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    n_groups=st.integers(1, 40),
    group_size=st.integers(1, 20),
    mode=st.sampled_from(ADVANTAGE_MODES),
    kind=st.sampled_from(["binary", "graded", "normal"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_uniform_groups_match_oracle(backend, n_groups, group_size, mode, kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = random_rewards(n_groups * group_size, kind, dtype, gen)
    with on_backend(backend) as device, poisoned_allocations():
        out = group_advantages(rewards.to(device), group_size=group_size, mode=mode)
    assert out.dtype == torch.float32 and out.device.type == device.type
    # The math is float32 whatever the input dtype, so bf16 rewards meet the float32 bound.
    assert_close_scaled(out, oracle(rewards, group_size, mode=mode), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 24), min_size=1, max_size=30).filter(lambda x: sum(x) > 0),
    mode=st.sampled_from(ADVANTAGE_MODES),
    kind=st.sampled_from(["binary", "graded", "normal"]),
    offsets_dtype=st.sampled_from([torch.int32, torch.int64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_ragged_groups_match_oracle(backend, lengths, mode, kind, offsets_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=offsets_dtype)
    rewards = random_rewards(sum(lengths), kind, torch.float32, gen)
    with on_backend(backend) as device, poisoned_allocations():
        out = group_advantages(rewards.to(device), group_offsets=offsets.to(device), mode=mode)
    assert_close_scaled(out, oracle(rewards, group_offsets=offsets, mode=mode), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None)
@given(
    process_var=st.floats(1e-6, 1.0),
    meas_var=st.floats(1e-4, 10.0),
    init_mean=st.floats(-2.0, 2.0),
    init_var=st.floats(1e-3, 10.0),
    eps=st.sampled_from([0.0, 1e-8, 1e-4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kalman_parameters_match_oracle(
    backend, process_var, meas_var, init_mean, init_var, eps, seed
):
    rewards = random_rewards(6 * 12, "normal", torch.float32, torch.Generator().manual_seed(seed))
    params = dict(
        process_var=process_var, meas_var=meas_var, init_mean=init_mean, init_var=init_var, eps=eps
    )
    with on_backend(backend) as device:
        out = kalman_advantages(rewards.to(device), group_size=12, **params)
    expected = kalman_advantages_reference(rewards, 12, compute_dtype=torch.float64, **params)
    assert_close_scaled(out, expected, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_boundaries_and_large_batch(backend):
    """More groups than one program holds, and a batch over the batch-std block."""
    rewards = random_rewards(300 * 16, "graded", torch.float32, torch.Generator().manual_seed(1))
    for mode in ADVANTAGE_MODES:
        with on_backend(backend) as device:
            out = group_advantages(rewards.to(device), group_size=16, mode=mode)
        assert_close_scaled(out, oracle(rewards, 16, mode=mode), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_of_one(backend):
    rewards = torch.tensor([0.3, 1.0, -2.0])
    with on_backend(backend) as device:
        grpo = group_advantages(rewards.to(device), group_size=1, mode="grpo")
        kalman = group_advantages(rewards.to(device), group_size=1)
    assert torch.equal(grpo.cpu(), torch.zeros(3)), "a group of one has no spread: 0, not NaN"
    # One Kalman step from x0 = 0, P0 = 1: K = P-/(P- + R), x = K r, P = (1 - K) P-.
    p_pred = 1.0 + 1e-5
    gain = p_pred / (p_pred + 1e-2)
    expected = (rewards - gain * rewards) / (((1 - gain) * p_pred) ** 0.5 + 1e-8)
    assert_close_scaled(kalman, expected, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_rewards(backend):
    rewards = torch.full((4 * 8,), 0.7)
    with on_backend(backend) as device:
        for mode in ("grpo", "dr_grpo", "batch_std"):
            out = group_advantages(rewards.to(device), group_size=8, mode=mode)
            assert torch.equal(out.cpu(), torch.zeros(32)), mode
        out = group_advantages(rewards.to(device), group_size=8)
    # Kalman: x starts at 0, so the first rewards still look above the estimate.
    assert_close_scaled(out, oracle(rewards, 8), rtol=1e-5)
    assert (out > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_are_independent_and_filter_restarts(backend):
    gen = torch.Generator().manual_seed(3)
    group = random_rewards(8, "graded", torch.float32, gen)
    other = random_rewards(8, "graded", torch.float32, gen)
    with on_backend(backend) as device:
        alone = group_advantages(group.to(device), group_size=8)
        first = group_advantages(torch.cat([group, other]).to(device), group_size=8)[:8]
        second = group_advantages(torch.cat([other, group]).to(device), group_size=8)[8:]
    if backend == "kernel":  # one lane per group: bit for bit
        assert torch.equal(alone, first) and torch.equal(alone, second)
    else:  # one matrix product for all groups: BLAS may round a row differently per batch
        assert_close_scaled(first, alone, rtol=1e-6)
        assert_close_scaled(second, alone, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_rewards(backend):
    rewards = random_rewards(96, "normal", torch.float32, torch.Generator().manual_seed(4))
    strided = rewards[::2]
    assert not strided.is_contiguous()
    with on_backend(backend) as device:
        out = group_advantages(
            strided.to(device) if device.type == "cpu" else strided.cuda(), group_size=6
        )
    assert_close_scaled(out, oracle(strided.contiguous(), 6), rtol=1e-5)


def test_design_magnitudes_for_binary_rewards():
    """docs/design.md: with 0/1 rewards and G = 16, |A| reaches about 36 and the first
    sample gets about 0.1 r_1 (here with the paper's defaults)."""
    rewards = torch.tensor([0.0] * 15 + [1.0])
    out = kalman_advantages(rewards, group_size=16)
    assert 30 < out.abs().max().item() < 40
    first = kalman_advantages(torch.tensor([1.0]), group_size=1)
    assert 0.05 < first.item() < 0.15


def test_output_is_not_differentiable_and_keeps_device():
    rewards = torch.rand(8, requires_grad=True)
    out = group_advantages(rewards, group_size=4)
    assert not out.requires_grad
    assert out.device == rewards.device


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_rewards_give_zero_with_eps_zero(backend):
    """No spread and eps = 0: 0, not 0 / 0, in every GRPO mode and in the fused loss."""
    from krpo_fast import krpo_loss

    rewards = torch.tensor([1.0] * 4 + [0.3, 0.3, 0.3, 0.3])
    logp = -torch.rand(8, 5)
    with on_backend(backend) as device:
        for mode in ("grpo", "dr_grpo", "batch_std"):
            out = group_advantages(torch.ones(8).to(device), group_size=4, mode=mode, eps=0.0)
            assert torch.equal(out.cpu(), torch.zeros(8)), mode
            out = group_advantages(rewards.to(device), group_size=4, mode=mode, eps=0.0)
            if mode != "batch_std":  # the batch has spread: only per-group spreads are 0
                assert torch.equal(out.cpu(), torch.zeros(8)), mode
            _, metrics = krpo_loss(
                logp.to(device),
                None,
                None,
                torch.ones(8).to(device),
                torch.ones(8, 5, dtype=torch.bool).to(device),
                group_size=4,
                adv_mode=mode,
                eps=0.0,
                beta=0.0,
            )
            assert torch.equal(metrics["advantages"].cpu(), torch.zeros(8)), mode


def test_large_common_reward_level_does_not_cancel():
    """Rewards around 1000: the torch path works on deviations from each group's first
    reward, so float32 keeps the advantages as accurate as around 0."""
    rewards = 1000.0 + torch.randn(64 * 16, generator=torch.Generator().manual_seed(5))
    with on_backend("torch"):
        out = group_advantages(rewards, group_size=16)
    assert_close_scaled(out, oracle(rewards, 16), rtol=1e-5)
