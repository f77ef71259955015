"""krpo-fast: fused Triton kernels and a minimal trainer for KRPO (Kalman-filter GRPO).

The public ops follow one dispatch rule: CUDA tensors run compiled Triton kernels,
CPU tensors run vectorised PyTorch (or the kernels in Triton's interpreter when
``TRITON_INTERPRET=1``). Tensors are positional, every hyperparameter keyword-only.
"""

from krpo_fast.logits_ops import (
    krpo_loss_from_hidden,
    krpo_loss_from_logits,
    policy_loss_from_hidden,
    policy_loss_from_logits,
    selective_log_softmax,
)
from krpo_fast.ops import group_advantages, kalman_advantages, krpo_loss, policy_loss
from krpo_fast.rollout_correction import rollout_correction
from krpo_fast.shared_prefix import sequence_logprobs

__version__ = "0.1.0"

__all__ = [
    "group_advantages",
    "kalman_advantages",
    "krpo_loss",
    "krpo_loss_from_hidden",
    "krpo_loss_from_logits",
    "policy_loss",
    "policy_loss_from_hidden",
    "policy_loss_from_logits",
    "rollout_correction",
    "selective_log_softmax",
    "sequence_logprobs",
]
