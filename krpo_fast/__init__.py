"""krpo-fast: fused Triton kernels and a minimal trainer for KRPO (Kalman-filter GRPO).

The public ops follow one dispatch rule: CUDA tensors run compiled Triton kernels,
CPU tensors run vectorised PyTorch (or the kernels in Triton's interpreter when
``TRITON_INTERPRET=1``).
"""

from krpo_fast.ops import group_advantages, kalman_advantages, krpo_loss, policy_loss
from krpo_fast.rollout_correction import rollout_correction
from krpo_fast.shared_prefix import sequence_logprobs

__version__ = "0.1.0"

__all__ = [
    "group_advantages",
    "kalman_advantages",
    "krpo_loss",
    "policy_loss",
    "rollout_correction",
    "sequence_logprobs",
]
