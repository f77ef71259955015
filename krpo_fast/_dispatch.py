"""Where an op runs: compiled Triton, the Triton interpreter, or vectorised torch.

The rule (docs/design.md): CUDA tensors use the compiled Triton kernel; CPU tensors use
a vectorised PyTorch implementation, unless ``TRITON_INTERPRET=1`` is set, in which
case the Triton kernel runs in Triton's interpreter (that is how the test suite
checks every kernel on CPU-only machines).
"""

import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the interpreter (set before importing triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` should launch its Triton kernel."""
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled())
