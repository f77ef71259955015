"""Packed (padding-free) forwards must equal separate per-sequence forwards."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from krpo_fast.policy import completion_logprobs, pack


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_packed_logprobs_match_separate_forwards():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    lengths = [(5, 3), (2, 7), (9, 1), (4, 4)]
    prompts = [torch.randint(0, 50, (p,), generator=g).tolist() for p, _ in lengths]
    completions = [torch.randint(0, 50, (c,), generator=g).tolist() for _, c in lengths]
    batch = pack(prompts, completions, torch.device("cpu"))
    with torch.no_grad():
        packed = completion_logprobs(model, batch, temperature=0.7)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1] / 0.7
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(packed[i, : len(c)], want, atol=1e-5, rtol=1e-5)
            assert torch.all(packed[i, len(c) :] == 0)
    assert batch.mask.sum().item() == sum(c for _, c in lengths)


def test_packing_layout():
    batch = pack([[1, 2], [3]], [[4, 5, 6], [7]], torch.device("cpu"))
    assert batch.input_ids.tolist() == [[1, 2, 4, 5, 6, 3, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert batch.logit_index.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert batch.targets.tolist() == [[4, 5, 6], [7, 0, 0]]
