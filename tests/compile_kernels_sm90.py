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


def family_variants(n_rows: int, n_cols: int) -> list[dict]:
    """Loss-family options that together take every switch of the token kernels."""
    row_weights = torch.rand(n_rows)
    token_weights = torch.rand(n_rows, n_cols)
    return [
        dict(ratio_level="sequence"),
        dict(ratio_level="sequence", bias_correction_kl=True, token_weights=token_weights),
        dict(loss_type="cispo", eps_high=5.0, token_weights=row_weights),
        dict(loss_type="sapo", ratio_level="sequence", kl_estimator="k2"),
        dict(delta=2.0, dual_clip=3.0, kl_estimator="k1", token_weights=token_weights),
        dict(kl_estimator="low_var_kl", bias_correction_kl=True),
        dict(token_weights=row_weights),
    ]


# Token-ratio members of the family and the entropy on the logits kernel ("weighted":
# with token_weights).
LOGITS_VARIANTS = [
    dict(return_entropy=True),
    dict(entropy_coef=0.01),
    dict(weighted=True, entropy_coef=0.01),
    dict(weighted=True, loss_type="cispo", eps_high=5.0, entropy_coef=0.01),
    dict(loss_type="sapo", kl_estimator="k2", bias_correction_kl=True),
    dict(weighted=True, delta=2.0, dual_clip=3.0, kl_estimator="low_var_kl", return_entropy=True),
    dict(kl_estimator="k1"),
    dict(weighted=True, ratio_level="sequence", entropy_coef=0.01),
]


def launch_family() -> None:
    """The loss family: token kernels (policy_loss, krpo_loss), the logits kernel's
    token-ratio variants, and sequence ratios from logits (log-softmax kernels around
    the token kernel)."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(8, 40, dtype=torch.bool)
    rewards = torch.rand(8, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        logp = -torch.rand(8, 40, generator=gen).to(dtype)
        for options in family_variants(8, 40):
            for old, ref, beta in ((logp, logp, 0.04), (None, None, 0.0)):
                ops.policy_loss(logp, old, ref, rewards, mask, beta=beta, **options)
                ops.krpo_loss(logp, old, ref, rewards, mask, group_size=4, beta=beta, **options)
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in (1000, 151_936):
            logits = torch.randn(2, 3, vocab, generator=gen).to(dtype).requires_grad_()
            ids = torch.randint(0, vocab, (2, 3), generator=gen)
            old, ref = -torch.rand(2, 3), -torch.rand(2, 3)
            weights = torch.rand(2, 3)
            for variant in LOGITS_VARIANTS:
                options = {k: v for k, v in variant.items() if k != "weighted"}
                if variant.get("weighted"):
                    options["token_weights"] = weights
                logits_ops.krpo_loss_from_logits(
                    logits,
                    ids,
                    old,
                    ref,
                    torch.rand(2),
                    torch.ones(2, 3, dtype=torch.bool),
                    group_size=2,
                    beta=0.04,
                    **options,
                )


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
    launch_family()
    print(f"compiled {len(seen)} kernel variants for sm_90")
    sys.exit(0 if seen else 1)
