"""Shared-prefix forwards: each group's prompt goes through the model once, exactly.

A group's completions share one prompt. Packed as ``[prompt, c_1, ..., c_G]`` in one
row, with position ids ``0..p-1`` for the prompt and ``p..p+|c_k|-1`` for every
completion, and attention where the prompt is causal on itself and completion k sees
the whole prompt plus itself causally (nothing crosses completions or groups), every
output equals that of the separate sequence ``[prompt, c_k]``. Completion token 0 is
predicted by the prompt's last position, which the G completions share.

The attention is a function registered through transformers' ``AttentionInterface``,
so any decoder that dispatches attention through it (Llama, Qwen2/3, Mistral, ...)
takes the layout as the keyword argument ``krpo_shared_prefix``:

- CPU: two SDPA calls, the prompts causal on themselves, then every completion's
  queries over ``[its prompt's keys ; its own keys]``, batched over completions;
- CUDA: flash-attn's varlen kernel when installed and the inputs are half precision
  (same split; causal masks align bottom-right), otherwise FlexAttention with a block
  mask over the packed row.

Calls without the keyword run the model's original attention unchanged.
See ``docs/shared_prefix.md``.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

# Keyword argument that carries the layout from the model call to the attention function.
ATTENTION_KWARG = "krpo_shared_prefix"
_IMPLEMENTATION_PREFIX = "krpo_shared_prefix_over_"
# Set while a shared-prefix forward builds its masks: the split needs none, and the
# packed-row mask transformers would build is [N, N].
_NO_MASK = contextvars.ContextVar("krpo_shared_prefix_no_mask", default=False)


@dataclass(eq=False)
class SharedPrefixLayout:
    """Where each group's prompt and completions sit in the packed row.

    Rows are padded per batch: prompts to ``max_prompt``, completions to
    ``max_completion``; index padding points at a real token of the same segment and
    is masked or discarded.
    """

    prompt_index: torch.Tensor  # [n_groups, max_prompt] row positions of each prompt's tokens
    prompt_lengths: torch.Tensor  # [n_groups]
    completion_index: torch.Tensor  # [n_completions, max_completion] row positions
    completion_lengths: torch.Tensor  # [n_completions]
    completion_group: torch.Tensor  # [n_completions] the group each completion belongs to
    n_tokens: int

    @property
    def device(self) -> torch.device:
        return self.prompt_index.device

    @cached_property
    def longest_sequence(self) -> int:
        """Longest prompt + completion of the batch."""
        lengths = self.prompt_lengths[self.completion_group] + self.completion_lengths
        return int(lengths.max())

    @cached_property
    def key_index(self) -> torch.Tensor:
        """[n_completions, max_prompt + max_completion]: the keys each completion sees."""
        return torch.cat([self.prompt_index[self.completion_group], self.completion_index], 1)

    @cached_property
    def completion_mask(self) -> torch.Tensor:
        """[n_completions, 1, max_completion, max_prompt + max_completion] bool mask."""
        n, width = self.completion_index.shape
        max_prompt = self.prompt_index.shape[1]
        prompt_slots = torch.arange(max_prompt, device=self.device)
        sees_prompt = prompt_slots < self.prompt_lengths[self.completion_group][:, None]
        own = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        mask = torch.cat(
            [sees_prompt[:, None, :].expand(n, width, max_prompt), own.expand(n, width, width)],
            -1,
        )
        return mask[:, None]

    @cached_property
    def output_index(self) -> torch.Tensor:
        """[n_tokens]: each row position's place in ``cat(prompt_out, completion_out)``.

        The two outputs are flattened from [n_groups, max_prompt] and
        [n_completions, max_completion] slots.
        """
        index = torch.empty(self.n_tokens, dtype=torch.long, device=self.device)
        prompt_slots = torch.arange(self.prompt_index.numel(), device=self.device)
        real = _valid(self.prompt_index.shape, self.prompt_lengths)
        index[self.prompt_index[real]] = prompt_slots.view_as(self.prompt_index)[real]
        completion_slots = torch.arange(self.completion_index.numel(), device=self.device)
        real = _valid(self.completion_index.shape, self.completion_lengths)
        offset = self.prompt_index.numel()
        index[self.completion_index[real]] = (
            offset + completion_slots.view_as(self.completion_index)[real]
        )
        return index

    @cached_property
    def token_group(self) -> torch.Tensor:
        """[n_tokens] group id of each row position (FlexAttention's mask)."""
        group = torch.empty(self.n_tokens, dtype=torch.long, device=self.device)
        groups = torch.arange(len(self.prompt_lengths), device=self.device)
        real = _valid(self.prompt_index.shape, self.prompt_lengths)
        group[self.prompt_index[real]] = groups[:, None].expand_as(self.prompt_index)[real]
        real = _valid(self.completion_index.shape, self.completion_lengths)
        group[self.completion_index[real]] = self.completion_group[:, None].expand_as(
            self.completion_index
        )[real]
        return group

    @cached_property
    def token_segment(self) -> torch.Tensor:
        """[n_tokens]: 0 for prompt tokens, 1 + the completion's number otherwise."""
        segment = torch.zeros(self.n_tokens, dtype=torch.long, device=self.device)
        numbers = torch.arange(1, len(self.completion_lengths) + 1, device=self.device)
        real = _valid(self.completion_index.shape, self.completion_lengths)
        segment[self.completion_index[real]] = numbers[:, None].expand_as(self.completion_index)[
            real
        ]
        return segment

    @cached_property
    def block_mask(self) -> Any:
        """FlexAttention block mask of the layout over the packed row."""
        from torch.nn.attention.flex_attention import create_block_mask

        group, segment = self.token_group, self.token_segment

        def visible(batch, head, q_pos, kv_pos):
            same_group = group[q_pos] == group[kv_pos]
            own_or_prompt = (segment[kv_pos] == 0) | (segment[kv_pos] == segment[q_pos])
            return same_group & own_or_prompt & (kv_pos <= q_pos)

        n = self.n_tokens
        return create_block_mask(visible, None, None, n, n, device=str(self.device))

    @cached_property
    def varlen(self) -> dict[str, Any]:
        """Gathers and cumulative lengths for varlen kernels (flash-attn's signature)."""

        def cumulative(lengths: torch.Tensor) -> torch.Tensor:
            return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)

        prompt_real = _valid(self.prompt_index.shape, self.prompt_lengths)
        completion_real = _valid(self.completion_index.shape, self.completion_lengths)
        key_real = torch.cat([prompt_real[self.completion_group], completion_real], 1)
        prompt_tokens = self.prompt_index[prompt_real]
        completion_tokens = self.completion_index[completion_real]
        lengths = self.prompt_lengths[self.completion_group] + self.completion_lengths
        return {
            "prompt_tokens": prompt_tokens,
            "cu_prompt": cumulative(self.prompt_lengths),
            "max_prompt": int(self.prompt_lengths.max()),
            "query_tokens": completion_tokens,
            "cu_query": cumulative(self.completion_lengths),
            "max_query": int(self.completion_lengths.max()),
            "key_tokens": self.key_index[key_real],
            "cu_key": cumulative(lengths),
            "max_key": int(lengths.max()),
            "inverse": torch.argsort(torch.cat([prompt_tokens, completion_tokens])),
        }


def _valid(shape: torch.Size, lengths: torch.Tensor) -> torch.Tensor:
    """[n, width] bool: slot j of row i is a real token (j < lengths[i])."""
    return torch.arange(shape[1], device=lengths.device) < lengths[:, None]


@dataclass
class SharedPrefixPacking:
    """A batch of (prompt, completion) rows packed with one copy of each distinct prompt."""

    input_ids: list[int]
    position_ids: list[int]
    logit_positions: list[list[int]]  # per row: the position whose output predicts token t
    layout: SharedPrefixLayout


def pack_rows(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
) -> SharedPrefixPacking:
    """Pack rows so that rows with identical prompt token ids share one prompt copy.

    Any order and any subset of a group's rows works: rows are grouped by their prompt
    ids, groups in order of first appearance, completions in row order. Empty
    completions get no slot (their rows predict nothing).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"prompt_ids has {len(prompt_ids)} rows but completion_ids has {len(completion_ids)}"
        )
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if len(completion):
            groups.setdefault(tuple(prompt), []).append(row)
    if not groups:
        raise ValueError("completion_ids: no completion has any token")

    input_ids: list[int] = []
    position_ids: list[int] = []
    logit_positions: list[list[int]] = [[] for _ in prompt_ids]
    prompt_starts, prompt_lengths = [], []
    completion_starts, completion_lengths, completion_group = [], [], []
    for group, (prompt, rows) in enumerate(groups.items()):
        start, p = len(input_ids), len(prompt)
        prompt_starts.append(start)
        prompt_lengths.append(p)
        input_ids.extend(prompt)
        position_ids.extend(range(p))
        for row in rows:
            completion = list(completion_ids[row])
            c_start = len(input_ids)
            completion_starts.append(c_start)
            completion_lengths.append(len(completion))
            completion_group.append(group)
            input_ids.extend(completion)
            position_ids.extend(range(p, p + len(completion)))
            # Token 0 is predicted by the prompt's last position, token t by token t - 1.
            logit_positions[row] = [start + p - 1] + list(
                range(c_start, c_start + len(completion) - 1)
            )

    def slots(starts: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths_t = torch.tensor(lengths)
        width = torch.arange(int(lengths_t.max()))
        # Padding repeats the segment's last token: a real position, masked or discarded.
        offsets = torch.minimum(width[None, :], lengths_t[:, None] - 1)
        return (torch.tensor(starts)[:, None] + offsets).to(device), lengths_t.to(device)

    prompt_index, prompt_lengths_t = slots(prompt_starts, prompt_lengths)
    completion_index, completion_lengths_t = slots(completion_starts, completion_lengths)
    layout = SharedPrefixLayout(
        prompt_index=prompt_index,
        prompt_lengths=prompt_lengths_t,
        completion_index=completion_index,
        completion_lengths=completion_lengths_t,
        completion_group=torch.tensor(completion_group, device=device),
        n_tokens=len(input_ids),
    )
    return SharedPrefixPacking(input_ids, position_ids, logit_positions, layout)


# ----------------------------------------------------------------------------- attention


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[H, N, D] x, [n, L] row positions -> [n, H, L, D]."""
    return x[:, index.flatten()].unflatten(1, index.shape).transpose(0, 1)


def sdpa_split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SharedPrefixLayout,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The two-part split through SDPA: [1, H, N, D] inputs -> [1, N, H, D] output.

    Prompts are batched [n_groups, H, max_prompt, D] under a causal mask (padding sits
    after every real query, so causality hides it); completions are batched
    [n_completions, H, max_completion, D] over their gathered prompt and own keys.
    """
    q, k, v = query[0], key[0], value[0]
    gqa = q.shape[0] != k.shape[0]
    options = {"scale": scaling, "dropout_p": dropout, "enable_gqa": gqa}
    prompts = layout.prompt_index
    prompt_out = F.scaled_dot_product_attention(
        _gather(q, prompts), _gather(k, prompts), _gather(v, prompts), is_causal=True, **options
    )
    keys = layout.key_index
    completion_out = F.scaled_dot_product_attention(
        _gather(q, layout.completion_index),
        _gather(k, keys),
        _gather(v, keys),
        attn_mask=layout.completion_mask,
        **options,
    )
    flat = torch.cat(
        [prompt_out.transpose(1, 2).flatten(0, 1), completion_out.transpose(1, 2).flatten(0, 1)]
    )
    return flat[layout.output_index][None]


VarlenFunction = Callable[..., torch.Tensor]


def varlen_split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SharedPrefixLayout,
    varlen_fn: VarlenFunction,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The split through a padding-free varlen kernel with flash-attn's signature.

    ``varlen_fn(q[Tq,H,D], k[Tk,Hkv,D], v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, dropout_p=, softmax_scale=, causal=True)``; with more keys than
    queries the causal mask must align bottom-right (flash-attn >= 2.1), so query j of
    a completion sees its prompt and its own tokens 0..j.
    """
    meta = layout.varlen
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, H, D]
    options = {"dropout_p": dropout, "softmax_scale": scaling, "causal": True}
    prompts = meta["prompt_tokens"]
    prompt_out = varlen_fn(
        q[prompts],
        k[prompts],
        v[prompts],
        meta["cu_prompt"],
        meta["cu_prompt"],
        meta["max_prompt"],
        meta["max_prompt"],
        **options,
    )
    keys = meta["key_tokens"]
    completion_out = varlen_fn(
        q[meta["query_tokens"]],
        k[keys],
        v[keys],
        meta["cu_query"],
        meta["cu_key"],
        meta["max_query"],
        meta["max_key"],
        **options,
    )
    return torch.cat([prompt_out, completion_out])[meta["inverse"]][None]


def flex_split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SharedPrefixLayout,
    scaling: float | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """FlexAttention over the packed row under the layout's block mask -> [1, N, H, D].

    ``compiled=False`` runs the eager forward (CPU checks; its backward is CUDA-only).
    """
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if compiled else flex_attention
    gqa = query.shape[1] != key.shape[1]
    out = fn(query, key, value, block_mask=layout.block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flash_varlen() -> VarlenFunction | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def shared_prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SharedPrefixLayout,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Dispatch the split by device: [1, H, N, D] q/k/v -> [1, N, H, D]."""
    if query.shape[0] != 1:
        raise ValueError(f"shared-prefix attention takes one packed row, got {query.shape[0]}")
    if sliding_window is not None and layout.longest_sequence > sliding_window:
        raise NotImplementedError(
            f"sliding-window attention ({sliding_window}) shorter than a sequence"
            f" ({layout.longest_sequence})"
        )
    if query.device.type == "cuda":
        varlen_fn = _flash_varlen() if query.dtype in (torch.float16, torch.bfloat16) else None
        if varlen_fn is not None:
            return varlen_split_attention(query, key, value, layout, varlen_fn, scaling, dropout)
        if dropout:
            raise NotImplementedError("FlexAttention has no attention dropout")
        return flex_split_attention(query, key, value, layout, scaling)
    return sdpa_split_attention(query, key, value, layout, scaling, dropout)


def _attention_over(base: str) -> Callable:
    """The registered function: the split with a layout, the ``base`` attention without."""
    from transformers import AttentionInterface

    base_fn = AttentionInterface._global_mapping[base]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layout = kwargs.get(ATTENTION_KWARG)
        if layout is not None:
            window = kwargs.get("sliding_window")
            out = shared_prefix_attention(query, key, value, layout, scaling, dropout, window)
            return out, None
        # Some implementations (flash-attn) read their own name from the config.
        config = module.config
        name = config._attn_implementation
        config._attn_implementation = base
        try:
            return base_fn(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        finally:
            config._attn_implementation = name

    return attention


def enable_shared_prefix_attention(model: torch.nn.Module) -> None:
    """Route ``model``'s attention through the shared-prefix function, in place.

    Idempotent. Forwards without the ``krpo_shared_prefix`` keyword (generation, plain
    calls) keep the original implementation's behaviour and mask. The switch persists
    (rather than lasting one call) because gradient checkpointing re-runs the layers
    during backward, after the call has returned.
    """
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    current = getattr(model.config, "_attn_implementation", None) or ""
    if current.startswith(_IMPLEMENTATION_PREFIX):
        return  # already switched (every config is switched at once)
    configs = {
        id(m.config): m.config
        for m in model.modules()
        if isinstance(m, PreTrainedModel) and hasattr(m.config, "_attn_implementation")
    }
    for config in configs.values():
        base = config._attn_implementation
        if base is None or base.startswith(_IMPLEMENTATION_PREFIX):
            continue
        name = _IMPLEMENTATION_PREFIX + base
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _attention_over(base))
            if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
                ALL_MASK_ATTENTION_FUNCTIONS.register(
                    name, _mask_over(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])
                )
        config._attn_implementation = name


def _mask_over(base_mask: Callable) -> Callable:
    """The base mask function, skipped (no mask) inside :func:`shared_prefix_forward`."""

    def mask(*args, **kwargs):
        return None if _NO_MASK.get() else base_mask(*args, **kwargs)

    return mask


def shared_prefix_forward(
    decoder: torch.nn.Module, layout: SharedPrefixLayout, **inputs: Any
) -> Any:
    """``decoder(**inputs)`` (a Hugging Face base model over one packed row) with the
    shared-prefix attention; switches the decoder's attention on first use."""
    enable_shared_prefix_attention(decoder)
    token = _NO_MASK.set(True)
    try:
        return decoder(**inputs, use_cache=False, **{ATTENTION_KWARG: layout})
    finally:
        _NO_MASK.reset(token)


# ----------------------------------------------------------------------------- public op


def plan_micro_batches(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    max_tokens: int | None,
    shared_prefix: bool = True,
) -> list[list[int]]:
    """Row indices of each micro-batch holding at most ``max_tokens`` packed tokens.

    Whole groups (rows with identical prompts) stay together when they fit; a larger
    group is split by completions, its prompt counted in every part. A single row
    longer than ``max_tokens`` gets a micro-batch of its own.
    """
    rows = range(len(prompt_ids))
    if max_tokens is None:
        return [list(rows)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in rows:
        groups.setdefault(tuple(prompt_ids[row]), []).append(row)
    batches: list[list[int]] = [[]]
    used = 0
    for prompt, members in groups.items():
        prompt_cost = len(prompt) if shared_prefix else 0
        costs = [len(completion_ids[r]) + len(prompt) - prompt_cost for r in members]
        whole = prompt_cost + sum(costs)
        if used + whole > max_tokens and whole <= max_tokens:
            batches.append([])  # the group fits in a micro-batch of its own
            used = 0
        prompt_counted = False  # in the current micro-batch
        for row, cost in zip(members, costs, strict=True):
            extra = cost if prompt_counted else cost + prompt_cost
            if used + extra > max_tokens and batches[-1]:
                batches.append([])  # split the group: the next part pays for its prompt too
                used, extra = 0, cost + prompt_cost
            batches[-1].append(row)
            used += extra
            prompt_counted = True
    return [b for b in batches if b]


def sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    shared_prefix: bool = True,
    temperature: float = 1.0,
    micro_batch_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given its prompt, differentiable.

    Args:
        model: a Hugging Face causal LM (decoder reachable by ``get_decoder()``, LM head
            by ``get_output_embeddings()``). With ``shared_prefix`` its attention is
            switched in place once (:func:`enable_shared_prefix_attention`).
        prompt_ids: one prompt (list of token ids) per completion, rows in any order;
            rows with identical prompt ids share one forward of that prompt.
        completion_ids: the completions, one list of token ids per row.
        shared_prefix: forward each distinct prompt once; False packs every
            ``prompt + completion`` separately (same values, more work).
        temperature: log-probs of ``softmax(logits / temperature)``.
        micro_batch_tokens: cap on packed tokens per forward (whole groups when they
            fit); bounds the activations of ``no_grad`` passes; under autograd all
            micro-batches' activations stay alive until backward.

    Returns:
        (logp, mask): float32 [B, T_max] log-probs, 0 at padding, and the bool mask of
        real completion tokens.
    """
    from krpo_fast.policy import completion_logprobs, pack

    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"prompt_ids has {len(prompt_ids)} rows but completion_ids has {len(completion_ids)}"
        )
    if micro_batch_tokens is not None and micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be positive, got {micro_batch_tokens}")
    device = next(model.parameters()).device
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.long)
    width = int(lengths.max()) if len(lengths) else 0
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(device)
    logp = torch.zeros(len(completion_ids), width, device=device)
    for rows in plan_micro_batches(prompt_ids, completion_ids, micro_batch_tokens, shared_prefix):
        rows = [r for r in rows if len(completion_ids[r])]
        if not rows:
            continue
        batch = pack(
            [prompt_ids[r] for r in rows],
            [completion_ids[r] for r in rows],
            device,
            shared_prefix=shared_prefix,
        )
        part = completion_logprobs(model, batch, temperature)
        part = F.pad(part, (0, width - part.shape[1]))
        logp = logp.index_copy(0, torch.tensor(rows, device=device), part)
    return logp, mask
