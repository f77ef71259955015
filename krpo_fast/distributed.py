"""Data parallelism under ``torchrun``: DDP by default, FSDP2 (``fully_shard``) with ``--fsdp``.

Each rank generates and scores its own share of the step's prompts, so a group never
spans ranks and the group-wise advantages need no communication. Gradients are
averaged by DDP (or reduce-scattered by FSDP2) and every micro-batch loss is weighted by
its share of the rank's sequences, so one step's gradient equals a single process's over
the same global batch. Without ``torchrun`` (no ``WORLD_SIZE`` above 1) every helper
here is a no-op on one rank, even where a process group exists: an in-process vLLM
engine creates its own one-rank group.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

_owned = False  # whether setup() joined a torchrun group (vLLM may have made its own)


def _active() -> bool:
    return _owned and dist.is_initialized()


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes; (rank, world size, this rank's device).

    NCCL on CUDA (one GPU per local rank), gloo on CPU.
    """
    global _owned
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _owned = True
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the group; with an in-process vLLM engine its exit hook does it instead (it
    destroys its own groups, which fails once the default group is gone)."""
    global _owned
    if _active() and "vllm" not in sys.modules:
        # Collect the wrapped modules first (their reference cycles hold the group): without
        # this, 2-rank FSDP2 runs on gloo aborted at exit about 1 time in 10; 0 in 15 with it.
        gc.collect()
        dist.destroy_process_group()
    _owned = False


def wrap(module: torch.nn.Module, fsdp: bool, device: torch.device) -> torch.nn.Module:
    """``module`` as DDP (or FSDP2: one shard group per decoder layer, then the rest)
    when running under torchrun; unchanged on one rank."""
    if not _active():
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(module):
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM inside ``module`` (``_no_split_modules``)."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    return [m for m in module.modules() if type(m).__name__ in names]


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce while accumulating micro-batches (DDP and FSDP2)."""
    if not enabled or not _active():
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) of ``values`` over ranks, in place; unchanged on one rank."""
    if _active():
        dist.all_reduce(values, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object); unchanged on one rank."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally sized ``values`` along dim 0, in rank order."""
    if not _active():
        return values
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of ``model``, the HF model itself rather than its wrapper
    (every rank must call it). FSDP2 parameters are gathered to full tensors; DDP's and a
    single process's are already whole.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """The optimizer state of ``model`` (the HF model) in the single-process layout,
    loadable at any world size."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True)
    )


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Any
) -> None:
    """Load a :func:`full_optimizer_state` into this rank's (possibly sharded) optimizer."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
