"""One KRPO gradient step on a fixed global batch, single-process or one rank of many.

``torchrun --nproc_per_node N tests/distributed_grads.py OUT {ddp,fsdp}`` runs each rank
on its share of the prompts through the trainer's own accumulation code
(``backward_micro_batches``) and rank 0 saves the full gradients to ``OUT``;
``tests/test_distributed.py`` compares them with :func:`step_gradients` in one process.
"""

from __future__ import annotations

import sys

import torch

from krpo_fast import distributed
from krpo_fast.ops import group_advantages
from krpo_fast.policy import PolicyLoss, load_policy, pack
from krpo_fast.tiny_model import bundled_model_path
from krpo_fast.trainer import backward_micro_batches

PROMPTS, GROUP, MICRO = 4, 4, 4


def global_batch() -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """Prompt and completion ids (one per sequence, varied lengths) and graded-like rewards."""
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(5, 100, (int(torch.randint(6, 12, (1,), generator=gen)),), generator=gen)
        for _ in range(PROMPTS)
    ]
    seqs_prompts = [p.tolist() for p in prompts for _ in range(GROUP)]
    completions = [
        torch.randint(5, 100, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
        for _ in range(PROMPTS * GROUP)
    ]
    rewards = torch.rand(PROMPTS * GROUP, generator=gen)
    return seqs_prompts, [c.tolist() for c in completions], rewards


def step_gradients(rank: int, world: int, fsdp: bool) -> dict[str, torch.Tensor]:
    """Full gradients of one accumulation group over this rank's share of the batch."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    policy = load_policy(bundled_model_path(), device, trainable=True)
    settings = dict(temperature=0.7, eps_low=0.2, eps_high=0.28, beta=0.04)
    model = distributed.wrap(
        PolicyLoss(policy, **settings, loss_agg="seq-mean-token-mean", max_len=8), fsdp, device
    )
    prompts, completions, rewards = global_batch()
    share = len(prompts) // world
    mine = slice(rank * share, (rank + 1) * share)
    prompts, completions, rewards = prompts[mine], completions[mine], rewards[mine]
    advantages = group_advantages(rewards, group_size=GROUP, mode="kalman")
    chunks = [range(s, min(s + MICRO, share)) for s in range(0, share, MICRO)]
    batches = [pack([prompts[i] for i in c], [completions[i] for i in c], device) for c in chunks]
    with torch.no_grad():
        # Old log-probs through the wrapped module too; the reference is a shifted copy so
        # that the ratio and the KL term both carry gradient.
        old = [model(b) + 0.05 * b.mask for b in batches]
    ref = [o - 0.1 * b.mask for o, b in zip(old, batches, strict=True)]
    backward_micro_batches(model, batches, [advantages[c.start : c.stop] for c in chunks], old, ref)
    grads = {}
    for name, p in policy.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    rank, world, _ = distributed.setup(torch.device("cpu"))
    grads = step_gradients(rank, world, mode == "fsdp")
    if rank == 0:
        torch.save({"world": world, "grads": grads}, out)
    distributed.barrier()  # no rank tears the group down while another still uses it
    distributed.shutdown()
