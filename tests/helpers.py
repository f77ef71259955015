"""Shared test helpers: backends, poisoned allocations and oracle comparisons."""

import contextlib
import os
from collections.abc import Iterator

import torch

# "kernel": the Triton kernel (compiled on CUDA, the interpreter on CPU);
# "torch": the vectorised PyTorch path on CPU.
BACKENDS = ("kernel", "torch")


def device_for(backend: str) -> torch.device:
    if backend == "kernel" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def on_backend(backend: str) -> Iterator[torch.device]:
    """Route CPU tensors to the kernel (interpreter) or to the torch path."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if backend == "kernel" else "0"
    try:
        yield device_for(backend)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Make torch.empty return NaN-filled float tensors (and -1 ints), so any output
    element a kernel forgets to write shows up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        elif out.dtype != torch.bool:
            out.fill_(-1)
        return out

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = real_empty


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, scale: float | None = None
) -> None:
    """Elementwise |a - e| <= rtol * (|e| + scale): relative to each value and to the
    magnitude of the terms that made it (default max|e|; values near zero are
    differences of large numbers). NaN never passes."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in the output"
    if scale is None:
        scale = expected.abs().max().clamp(min=1e-30) if expected.numel() else 1.0
    err = (actual - expected).abs()
    bound = rtol * (expected.abs() + scale)
    assert (err <= bound).all(), (
        f"max error {err.max().item():.3g} exceeds {rtol} (scale {float(scale):.3g})"
    )
