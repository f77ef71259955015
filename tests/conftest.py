"""Test set-up: run Triton kernels in the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any module with ``@triton.jit`` is imported,
so it is set here, before the first project import. On a GPU machine the kernels
run compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One thread: the CI machines have 2 shared cores and contention makes runs erratic.
torch.set_num_threads(1)
