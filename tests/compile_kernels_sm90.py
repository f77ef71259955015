"""Compile every Triton kernel variant the public ops launch, for Hopper (sm_90), on a
machine without a GPU.

Run by tests/test_kernels_compile.py in a subprocess, because the test session
runs kernels in the interpreter and this needs the real JIT. Each kernel launch is
intercepted, its argument types become a signature, and ``triton.compile`` builds
it for ``GPUTarget("cuda", 90, 32)`` down to a cubin with Triton's bundled ptxas.
Prints one line per compiled variant and exits non-zero on the first failure.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import krpo_fast.logits_ops as logits_ops  # noqa: E402
import krpo_fast.ops as ops  # noqa: E402
from krpo_fast.kernels import (  # noqa: E402
    group_advantages,
    krpo_loss,
    logits_loss,
    policy_loss,
    selective_log_softmax,
)

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
}
seen: dict[tuple, str] = {}


def signature(fn: triton.JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    types, constexprs = {}, {}
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            types[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            types[name] = "i1"
        elif isinstance(value, int):
            types[name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            types[name] = "fp32"
    for name in fn.arg_names[len(args) :]:
        types[name] = "constexpr"
        constexprs[name] = kwargs[name]
    return types, constexprs


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args)`` compiles instead of launching."""

    def __init__(self, fn: triton.JITFunction):
        self.fn = fn

    def __getitem__(self, grid):
        def compile_variant(*args, **kwargs):
            types, constexprs = signature(self.fn, args, kwargs)
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            key = (
                self.fn.__name__,
                tuple(types.items()),
                tuple(constexprs.items()),
                tuple(options.items()),
            )
            if key in seen:
                return
            compiled = triton.compile(
                ASTSource(self.fn, types, constexprs=constexprs), target=TARGET, options=options
            )
            seen[key] = self.fn.__name__
            cubin = compiled.asm["cubin"]
            print(f"ok {self.fn.__name__} {constexprs} {options} cubin={len(cubin)} bytes")

        return compile_variant


def install_recorders() -> None:
    for module in (group_advantages, policy_loss, krpo_loss, selective_log_softmax, logits_loss):
        for name in dir(module):
            if name.endswith("_kernel") and isinstance(getattr(module, name), triton.JITFunction):
                setattr(module, name, Recorder(getattr(module, name)))
    # Route CPU tensors to the kernels, as CUDA tensors would be.
    ops.use_triton = lambda tensor: True
    logits_ops.use_triton = lambda tensor: True


def launch_everything() -> None:
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        rewards = torch.rand(8, generator=gen).to(dtype)
        for mode in ops.ADVANTAGE_MODES:
            ops.group_advantages(rewards, group_size=4, mode=mode)
            ops.group_advantages(rewards, group_offsets=offsets, mode=mode)
        logp = -torch.rand(8, 40, generator=gen).to(dtype)
        for mask in (torch.ones(8, 40, dtype=torch.bool), torch.ones(8, 40)):
            for loss_agg in ("seq-mean-token-mean", "token-mean"):
                for old, ref, beta in ((logp, logp, 0.04), (None, None, 0.0)):
                    ops.policy_loss(
                        logp, old, ref, rewards.float(), mask, beta=beta, loss_agg=loss_agg
                    )
                    for mode in ops.ADVANTAGE_MODES:
                        ops.krpo_loss(
                            logp,
                            old,
                            ref,
                            rewards,
                            mask,
                            group_size=4,
                            adv_mode=mode,
                            beta=beta,
                            loss_agg=loss_agg,
                        )
                        ops.krpo_loss(
                            logp,
                            old,
                            ref,
                            rewards,
                            mask,
                            group_offsets=offsets,
                            adv_mode=mode,
                            beta=beta,
                            loss_agg=loss_agg,
                        )
        for vocab in (1, 1000, 151_936):
            logits = torch.randn(2, 3, vocab, generator=gen).to(dtype)
            ids = torch.randint(0, vocab, (2, 3), generator=gen)
            logits_ops.selective_log_softmax(logits, ids, return_entropy=True)
            logits.requires_grad_()
            for old, ref, beta in ((None, None, 0.0), (-torch.rand(2, 3), -torch.rand(2, 3), 0.04)):
                loss, _ = logits_ops.krpo_loss_from_logits(
                    logits,
                    ids,
                    old,
                    ref,
                    torch.rand(2),
                    torch.ones(2, 3, dtype=torch.bool),
                    group_size=2,
                    beta=beta,
                )
            logp_sls = logits_ops.selective_log_softmax(logits, ids)
            logp_sls.sum().backward()


if __name__ == "__main__":
    install_recorders()
    launch_everything()
    print(f"compiled {len(seen)} kernel variants for sm_90")
    sys.exit(0 if seen else 1)
