"""The policy: model loading, padding-free packed forwards, completion log-probs.

A micro-batch of (prompt, completion) sequences is packed into one row with
``position_ids`` restarting at 0 for every sequence and no attention mask. With
FlashAttention-2 transformers turns the restarts into varlen boundaries; with SDPA
(CPU) it detects them too, but only when ``attention_mask is None`` and
``use_cache=False`` (otherwise attention leaks across sequences).

``pack(..., shared_prefix=True)`` instead packs each distinct prompt once, followed by
its completions, and the forward runs the shared-prefix attention
(``krpo_fast.shared_prefix``); the log-probs are the same.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from krpo_fast.logits_ops import policy_loss_from_hidden, selective_log_softmax
from krpo_fast.shared_prefix import SharedPrefixLayout, pack_rows, shared_prefix_forward


def attn_implementation(device: torch.device) -> str:
    """FlashAttention-2 on a GPU when flash-attn is installed, SDPA otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_policy(
    path: str | Path,
    device: torch.device,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Load a causal LM in float32 (bf16 comes from autocast); frozen unless ``trainable``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation=attn_implementation(device)
    ).to(device)
    if gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(trainable)
    model.train(trainable)
    return model


@dataclass
class PackedBatch:
    """Sequences packed into one row, plus where each completion token's logit lives."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], restarting at 0 (or at the prompt's length) per segment
    logit_index: torch.Tensor  # [b, T] position in the row whose output predicts token t
    targets: torch.Tensor  # [b, T] completion token ids (0 at padding)
    mask: torch.Tensor  # [b, T] float, 1 at completion tokens
    n_tokens: int  # tokens in the row (what the forward processes)
    sequence_tokens: int  # sum of len(prompt) + len(completion): the work the rows stand for
    shared_prefix: SharedPrefixLayout | None = None  # set: prompts packed once per group


def pack(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    device: torch.device,
    shared_prefix: bool = False,
) -> PackedBatch:
    """Pack prompt+completion sequences padding-free; completions are right-padded to T.

    ``shared_prefix``: rows with identical prompt ids (any order, any subset of a group)
    share one copy of the prompt; the log-probs are the same, with less work.
    """
    width = max(map(len, completion_ids))
    b = len(completion_ids)
    logit_index = torch.zeros((b, width), dtype=torch.long)
    targets = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width))
    sequence_tokens = sum(map(len, prompt_ids)) + sum(map(len, completion_ids))
    if shared_prefix:
        packing = pack_rows(prompt_ids, completion_ids, device)
        for i, (c, positions) in enumerate(
            zip(completion_ids, packing.logit_positions, strict=True)
        ):
            logit_index[i, : len(c)] = torch.tensor(positions, dtype=torch.long)
            targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = 1.0
        return PackedBatch(
            input_ids=torch.tensor([packing.input_ids], device=device),
            position_ids=torch.tensor([packing.position_ids], device=device),
            logit_index=logit_index.to(device),
            targets=targets.to(device),
            mask=mask.to(device),
            n_tokens=packing.layout.n_tokens,
            sequence_tokens=sequence_tokens,
            shared_prefix=packing.layout,
        )
    ids, pos, start = [], [], 0
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        seq = p + c
        ids.extend(seq)
        pos.extend(range(len(seq)))
        # The output at position j predicts token j + 1: completion token t sits at
        # len(p) + t, so its logit is at start + len(p) + t - 1.
        logit_index[i, : len(c)] = torch.arange(len(c)) + start + len(p) - 1
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1.0
        start += len(seq)
    return PackedBatch(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([pos], device=device),
        logit_index=logit_index.to(device),
        targets=targets.to(device),
        mask=mask.to(device),
        n_tokens=start,
        sequence_tokens=sequence_tokens,
    )


def completion_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Last hidden states [b, T, H] at the positions that predict the completion tokens.

    Only these rows reach the LM head, so the prompt tokens cost no logits.
    """
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if batch.shared_prefix is not None:
        out = shared_prefix_forward(model.get_decoder(), batch.shared_prefix, **inputs)
    else:
        out = model.get_decoder()(**inputs, use_cache=False)
    return out.last_hidden_state[0][batch.logit_index]


def completion_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    temperature: float,
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """Float32 [b, T] log-probs of the completion tokens at ``temperature`` (0 at padding).

    The body runs under ``autocast``; the LM head does not, so that these log-probs match
    the training loss's (float32 LM head) and the on-policy ratio is exactly 1.
    """
    with autocast or contextlib.nullcontext():
        hidden = completion_hidden(model, batch)
    logits = hidden @ model.get_output_embeddings().weight.to(hidden.dtype).T
    return selective_log_softmax(logits, batch.targets, temperature=temperature) * batch.mask


class PolicyLoss(torch.nn.Module):
    """A causal LM plus the fused clipped-surrogate loss, as one module to wrap.

    DDP and FSDP2 hook ``forward``: computing the LM-head loss inside it means the
    (possibly tied) output embedding is unsharded while it is used and its gradient is
    synchronised with the others. Called without ``advantages`` it returns the
    completion log-probs instead (old/ref log-probs, under ``torch.no_grad``).

    ``loss_options`` are the loss family's keywords of ``policy_loss_from_hidden``
    (``loss_type``, ``ratio_level``, ``delta``, ``dual_clip``, ``kl_estimator``,
    ``entropy_coef``, ...), passed through unchanged.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        temperature: float,
        eps_low: float,
        eps_high: float,
        beta: float,
        loss_agg: str,
        max_len: int,
        autocast: contextlib.AbstractContextManager | None = None,
        **loss_options: Any,
    ) -> None:
        super().__init__()
        self.model = model
        self.temperature, self.eps_low, self.eps_high = temperature, eps_low, eps_high
        self.beta, self.loss_agg, self.max_len = beta, loss_agg, max_len
        self.autocast = autocast or contextlib.nullcontext()
        self.loss_options = loss_options

    def forward(
        self,
        batch: PackedBatch,
        advantages: torch.Tensor | None = None,
        old_logp: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> Any:
        """(loss, metrics) of ``policy_loss_from_hidden``; [b, T] log-probs without advantages.

        ``token_weights`` ([b, T] or [b]) multiply the policy term (rollout correction)."""
        if advantages is None:
            return completion_logprobs(self.model, batch, self.temperature, self.autocast)
        with self.autocast:
            hidden = completion_hidden(self.model, batch)
        weight = self.model.get_output_embeddings().weight
        return policy_loss_from_hidden(
            hidden,
            weight.to(hidden.dtype),
            batch.targets,
            old_logp,
            ref_logp,
            advantages,
            batch.mask,
            temperature=self.temperature,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            beta=self.beta,
            loss_agg=self.loss_agg,
            max_len=self.max_len,
            **self.loss_options,
            # Only when given: without them the call is the paper's loss.
            **({"token_weights": token_weights} if token_weights is not None else {}),
        )
