"""Group advantages (Kalman, GRPO, Dr. GRPO, batch-std): paper loop, vectorised eager,
torch.compile and krpo-fast, forward only (advantages are not differentiated)."""

import pytest
import torch
from eager import group_advantages_eager
from harness import compiled, device, generator, impls, rotation, run_case, shape_id, sizes

from krpo_fast import group_advantages
from krpo_fast.ops import ADVANTAGE_MODES
from krpo_fast.reference import group_advantages_reference

IMPLEMENTATIONS = {
    "paper": lambda r, g, m: group_advantages_reference(r, group_size=g, mode=m),
    "eager": lambda r, g, m: group_advantages_eager(r, group_size=g, mode=m),
    "compile": lambda r, g, m: compiled(group_advantages_eager)(r, group_size=g, mode=m),
    "krpo-fast": lambda r, g, m: group_advantages(r, group_size=g, mode=m),
}


@pytest.mark.parametrize("shape", sizes("advantages"), ids=shape_id)
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("impl", impls(*IMPLEMENTATIONS))
def test_advantages(benchmark, impl: str, mode: str, shape: tuple[int, int]) -> None:
    """0/1 rewards of n_groups x G samples in rollout order."""
    n_groups, group_size = shape
    n = n_groups * group_size
    gen = generator(0)
    inputs = [
        (torch.rand(n, generator=gen, device=device()) > 0.5).float()
        for _ in range(rotation(8 * n))
    ]
    fn = IMPLEMENTATIONS[impl]
    run_case(
        benchmark,
        lambda r: fn(r, group_size, mode),
        inputs,
        op="advantages",
        impl=impl,
        mode=mode,
        shape=shape,
        dtype=torch.float32,
        floor_bytes=8 * n,  # float32 rewards in, float32 advantages out
    )
