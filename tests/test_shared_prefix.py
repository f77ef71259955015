"""Shared-prefix forwards must equal per-sequence forwards: log-probs and every gradient."""

import functools
import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import krpo_fast
from krpo_fast.policy import PolicyLoss, completion_logprobs, pack
from krpo_fast.shared_prefix import (
    flex_split_attention,
    pack_rows,
    plan_micro_batches,
    sdpa_split_attention,
    sequence_logprobs,
    varlen_split_attention,
)
from krpo_fast.tiny_model import bundled_model_path

EOS = 2
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=128,
)


def _random_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True))
    else:
        model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None))
    model.config._attn_implementation = "sdpa"
    return model


def _model(kind: str) -> torch.nn.Module:
    if kind == "bundled":
        return AutoModelForCausalLM.from_pretrained(
            str(bundled_model_path()), attn_implementation="sdpa"
        )
    return _random_model(kind)


def _rows(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Groups with prompts of different lengths, G from 1 to 4, one-token and EOS-ended
    completions, rows shuffled so that no group is contiguous."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for prompt_len, group in [(7, 3), (2, 1), (12, 4), (1, 2)]:
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        for k in range(group):
            length = 1 if k == 0 else rng.randint(2, 9)
            completion = [rng.randrange(3, vocab) for _ in range(length)]
            if k == 1:
                completion[-1] = EOS
            prompts.append(prompt)
            completions.append(completion)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [completions[i] for i in order]


def _grads_after(model, logp: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (logp * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, grad in want.items():
        scale = grad.abs().max().clamp_min(1e-12)
        error = (got[name] - grad).abs().max() / scale
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


def _hf_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
    logits = logits[len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("kind", ["bundled", "qwen2", "llama", "mistral"])
def test_logprobs_and_gradients_match_per_sequence(kind):
    model = _model(kind)
    prompts, completions = _rows(model.config.vocab_size)
    want, want_mask = sequence_logprobs(model, prompts, completions, shared_prefix=False)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    want_grads = _grads_after(model, want, weights)

    got, mask = krpo_fast.sequence_logprobs(model, prompts, completions, temperature=1.0)
    assert got.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(mask, want_mask)
    assert mask.sum().item() == sum(map(len, completions))
    assert torch.all(got[~mask] == 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_grads_close(_grads_after(model, got, weights), want_grads)


def test_matches_plain_hf_forward_values_and_gradients():
    model = _model("bundled")
    prompts, completions = _rows(model.config.vocab_size, seed=3)
    got, mask = sequence_logprobs(model, prompts, completions, temperature=0.7)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(2)) * mask
    got_grads = _grads_after(model, got, weights)

    model.zero_grad(set_to_none=True)
    total = 0.0
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1] / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(got[i, : len(c)], want, rtol=1e-5, atol=1e-5)
        total = total + (want * weights[i, : len(c)]).sum()
    total.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    _assert_grads_close(got_grads, want_grads)


def test_packing_layout_groups_identical_prompts_in_any_order():
    packing = pack_rows([[1, 2], [3], [1, 2]], [[4, 5, 6], [7], [8, 9]])
    # group [1, 2] first (first seen), its completions in row order, then group [3]
    assert packing.input_ids == [1, 2, 4, 5, 6, 8, 9, 3, 7]
    assert packing.position_ids == [0, 1, 2, 3, 4, 2, 3, 0, 1]
    # completion token 0 is predicted by the prompt's last position, shared
    assert packing.logit_positions == [[1, 2, 3], [7], [1, 5]]
    assert packing.layout.n_tokens == 9
    batch = pack([[1, 2], [3], [1, 2]], [[4, 5, 6], [7], [8, 9]], "cpu", shared_prefix=True)
    assert batch.logit_index.tolist() == [[1, 2, 3], [7, 0, 0], [1, 5, 0]]
    assert batch.targets.tolist() == [[4, 5, 6], [7, 0, 0], [8, 9, 0]]
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.n_tokens == 9
    assert (
        batch.sequence_tokens
        == pack([[1, 2], [3], [1, 2]], [[4, 5, 6], [7], [8, 9]], "cpu").n_tokens
        == 11
    )


def test_empty_completion_rows_are_zero():
    model = _model("llama")
    prompts, completions = [[5, 6], [5, 6], [7]], [[8, 9], [], [10]]
    got, mask = sequence_logprobs(model, prompts, completions)
    want, _ = sequence_logprobs(model, [[5, 6], [7]], [[8, 9], [10]], shared_prefix=False)
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.all(got[1] == 0)
    torch.testing.assert_close(got[[0, 2]], want, rtol=1e-5, atol=1e-5)


def test_micro_batches_keep_groups_whole_or_split_by_completions():
    prompts = [[1] * 4] * 3 + [[2] * 2] * 2
    completions = [[3] * 2] * 5
    # group 1 costs 4 + 3 * 2 = 10 tokens, group 2 costs 2 + 2 * 2 = 6
    assert plan_micro_batches(prompts, completions, 16) == [[0, 1, 2, 3, 4]]
    assert plan_micro_batches(prompts, completions, 10) == [[0, 1, 2], [3, 4]]
    # a group larger than the cap is split, its prompt paid in each part
    assert plan_micro_batches(prompts, completions, 8) == [[0, 1], [2], [3, 4]]
    # per sequence every row pays its prompt: 6 and 4 tokens
    assert plan_micro_batches(prompts, completions, 8, shared_prefix=False) == [
        [0],
        [1],
        [2],
        [3, 4],
    ]
    assert plan_micro_batches(prompts, completions, None) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("cap", [1, 9, 20, 37, 1000])
def test_micro_batches_cover_every_row_once_within_the_cap(cap):
    prompts, completions = _rows(64, seed=cap)
    batches = plan_micro_batches(prompts, completions, cap)
    assert sorted(r for b in batches for r in b) == list(range(len(prompts)))
    for rows in batches:
        packed = pack_rows([prompts[r] for r in rows], [completions[r] for r in rows])
        assert packed.layout.n_tokens <= cap or len(rows) == 1


@pytest.mark.parametrize("shared", [True, False])
def test_micro_batch_tokens_give_the_same_logprobs_and_gradients(shared):
    model = _model("qwen2")
    prompts, completions = _rows(model.config.vocab_size, seed=5)
    whole, _ = sequence_logprobs(model, prompts, completions, shared_prefix=shared)
    weights = torch.randn(whole.shape, generator=torch.Generator().manual_seed(4))
    want = _grads_after(model, whole, weights)
    parts, _ = sequence_logprobs(
        model, prompts, completions, shared_prefix=shared, micro_batch_tokens=20
    )
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    _assert_grads_close(_grads_after(model, parts, weights), want)


def test_gradient_checkpointing_recomputes_the_shared_layout():
    model = _model("llama")
    prompts, completions = _rows(model.config.vocab_size, seed=6)
    want, _ = sequence_logprobs(model, prompts, completions, shared_prefix=False)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
    want_grads = _grads_after(model, want, weights)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    got, _ = sequence_logprobs(model, prompts, completions)
    _assert_grads_close(_grads_after(model, got, weights), want_grads)


def test_plain_forwards_and_generation_unchanged_after_switching_attention():
    model = _model("qwen2")
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(8))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # left padding
    before = model(input_ids=ids, attention_mask=attention_mask).logits
    greedy_before = model.generate(
        input_ids=ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False
    )
    sequence_logprobs(model, [[3, 4]], [[5]])
    assert model.config._attn_implementation != "sdpa"
    after = model(input_ids=ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    generated = model.generate(
        input_ids=ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False
    )
    assert torch.equal(generated, greedy_before)


def _random_qkv(layout, heads=4, kv_heads=2, dim=8, seed=9):
    g = torch.Generator().manual_seed(seed)
    n = layout.n_tokens
    q = torch.randn(1, heads, n, dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, n, dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, n, dim, generator=g, requires_grad=True)
    return q, k, v


def _dense_attention(q, k, v, prompts, completions, scaling):
    """The layout's rule written out as a dense [N, N] mask: same group, causal, and the
    key is a prompt token or in the query's own completion."""
    groups: dict[tuple[int, ...], list[list[int]]] = {}
    for p, c in zip(prompts, completions, strict=True):
        groups.setdefault(tuple(p), []).append(c)
    group_of, segment_of, segment = [], [], 0
    for g, (prompt, members) in enumerate(groups.items()):
        group_of += [g] * len(prompt)
        segment_of += [0] * len(prompt)
        for c in members:
            segment += 1
            group_of += [g] * len(c)
            segment_of += [segment] * len(c)
    group_of, segment_of = torch.tensor(group_of), torch.tensor(segment_of)
    pos = torch.arange(len(group_of))
    mask = (
        (group_of[:, None] == group_of[None])
        & (pos[None] <= pos[:, None])
        & ((segment_of[None] == 0) | (segment_of[None] == segment_of[:, None]))
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def _reference_varlen(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """flash-attn's varlen contract on CPU: causal aligned bottom-right."""
    assert causal and dropout_p == 0.0
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ks, vs = (x[cu_k[i] : cu_k[i + 1]].transpose(0, 1) for x in (k, v))
        lq, lk = qs.shape[1], ks.shape[1]
        assert lq <= max_q and lk <= max_k
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        out = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=softmax_scale, enable_gqa=True
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def test_sdpa_split_flex_and_varlen_match_a_dense_mask():
    prompts, completions = _rows(64, seed=10)
    layout = pack_rows(prompts, completions).layout
    q, k, v = _random_qkv(layout)
    want = _dense_attention(q, k, v, prompts, completions, 0.3)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(11))
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)

    split = sdpa_split_attention(q, k, v, layout, scaling=0.3)
    torch.testing.assert_close(split, want, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad(split, (q, k, v), grad_out)
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    varlen = varlen_split_attention(q, k, v, layout, _reference_varlen, scaling=0.3)
    torch.testing.assert_close(varlen, want, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad(varlen, (q, k, v), grad_out)
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # FlexAttention's forward runs on CPU (its backward is CUDA-only)
    with torch.no_grad():
        flex = flex_split_attention(q.detach(), k.detach(), v.detach(), layout, 0.3, compiled=False)
    torch.testing.assert_close(flex, want.detach(), rtol=1e-5, atol=1e-5)


def test_policy_loss_takes_a_shared_prefix_batch():
    model = _model("bundled")
    prompts, completions = _rows(model.config.vocab_size, seed=12)
    advantages = torch.randn(len(prompts), generator=torch.Generator().manual_seed(13))
    loss_fn = PolicyLoss(
        model,
        temperature=0.7,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.04,
        loss_agg="seq-mean-token-mean",
        max_len=16,
    )
    results = {}
    for shared in (False, True):
        batch = pack(prompts, completions, torch.device("cpu"), shared_prefix=shared)
        with torch.no_grad():
            ref = completion_logprobs(model, batch, 0.7) + 0.01 * batch.mask
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(batch, advantages, ref, ref)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[shared] = (loss.detach(), grads)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    _assert_grads_close(results[True][1], results[False][1])


def test_bad_inputs_raise():
    model = _model("llama")
    with pytest.raises(ValueError, match="rows"):
        sequence_logprobs(model, [[1]], [[2], [3]])
    with pytest.raises(ValueError, match="prompt"):
        sequence_logprobs(model, [[]], [[2]])
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        sequence_logprobs(model, [[1]], [[2]], micro_batch_tokens=0)


def test_trainer_steps_match_with_and_without_shared_prefix(tmp_path, monkeypatch):
    """Three trainer steps (old and reference log-probs on, groups split across
    micro-batches) give the same metrics with the shared prefix forced on or off."""
    from krpo_fast import trainer
    from krpo_fast.cli import main

    args = [
        "--model", str(bundled_model_path()), "--prompts_per_step", "2", "--group_size", "4",
        "--max_new_tokens", "12", "--eval_size", "4", "--train_size", "20",
        "--learning_rate", "1e-3", "--max_steps", "3", "--generation_backend", "hf",
        "--micro_batch_size", "3", "--epochs_per_step", "2", "--beta", "0.04",
    ]  # fmt: skip
    runs, packed = {}, []

    def forced_pack(*args, shared, **kwargs):
        batch = pack(*args, **{**kwargs, "shared_prefix": shared})
        packed.append(batch.shared_prefix is not None)
        return batch

    for shared in (False, True):
        monkeypatch.setattr(trainer, "pack", functools.partial(forced_pack, shared=shared))
        out = tmp_path / str(shared)
        assert main(["train", *args, "--output_dir", str(out)]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[shared] = rows
    assert len(runs[True]) == len(runs[False]) == 3
    assert packed.count(True) == packed.count(False) > 0
    assert {"loss", "kl", "reward_mean"} <= runs[True][0].keys()
    for got, want in zip(runs[True], runs[False], strict=True):
        for key, value in want.items():
            if key.endswith("_per_s") or key.endswith("_time") or not isinstance(value, float):
                continue
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_sliding_window_shorter_than_a_sequence_is_refused():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=6))
    model.config._attn_implementation = "sdpa"
    sequence_logprobs(model, [[3, 4]], [[5, 6]])  # 4 tokens: inside the window
    with pytest.raises(NotImplementedError, match="sliding-window"):
        sequence_logprobs(model, [[3, 4, 5, 6]], [[7, 8, 9]])


def test_trl_trainer_shared_prefix_gives_trl_logprobs_loss_and_gradients(tmp_path):
    """KRPOConfig(shared_prefix=True): TRL's own per-token log-probs (its fused LM head)
    on the real tokens, and the same loss and gradients, on a left/right-padded batch."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    from krpo_fast.integrations.trl import KRPOConfig, KRPOGRPOTrainer

    path = bundled_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = KRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, temperature=0.7, beta=0.04, report_to="none", use_cpu=True,
        bf16=False, seed=0, save_strategy="no", shared_prefix=True, loss_type="grpo",
    )  # fmt: skip
    trainer = KRPOGRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["Q:1+2=\nA:"] * 4}),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(14)
    prompt_ids = torch.randint(3, 100, (6, 7), generator=g)
    prompt_ids[[3, 5]] = prompt_ids[0].clone()  # one group of three rows, not contiguous
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :4] = prompt_mask[2, :2] = 0  # left padding
    prompt_ids = prompt_ids * prompt_mask
    completion_ids = torch.randint(3, 100, (6, 8), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate([8, 1, 5, 3, 8, 6]):
        completion_mask[row, length:] = 0  # right padding after EOS
    completion_ids[completion_mask == 0] = 0
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    mask = completion_mask.bool()

    results = {}
    for shared in (False, True):
        trainer._krpo_shared_prefix = shared
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, 8
            )
        inputs = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": torch.linspace(-1, 1, 6),
            "old_per_token_logps": logps + 0.05 * mask,
            "ref_per_token_logps": logps - 0.05 * mask,
        }
        model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[shared] = (logps, loss.detach(), grads)
    torch.testing.assert_close(
        results[True][0][mask], results[False][0][mask], rtol=1e-5, atol=1e-5
    )
    assert torch.all(results[True][0][~mask] == 0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    _assert_grads_close(results[True][2], results[False][2])


def test_hf_generation_prefills_each_prompt_once():
    """HFGenerator computes each prompt's cache once and repeats it G ways: the first
    forward sees P prompts, not P * G, and the samples equal generate's own expansion."""
    from transformers import AutoTokenizer

    from krpo_fast.rollout import HFGenerator, preserved_rng

    path = bundled_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.encode(f"Q:{a}+{a + 5}=\nA:") for a in (3, 17, 42)]
    prompts[1] = prompts[1][2:]  # different lengths: left padding
    generator = HFGenerator(model, tokenizer)
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape))
    )
    got = generator.generate(prompts, 4, 0.7, 1.0, 12, seed=5)
    hook.remove()
    width = max(map(len, prompts))
    assert shapes[0] == (3, width - 1) and shapes[1] == (12, 1)

    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    with torch.no_grad(), preserved_rng():
        torch.manual_seed(5)
        out = model.generate(
            input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=12,
            num_return_sequences=4, do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
            pad_token_id=generator.pad_id, eos_token_id=generator.eos_id,
        )  # fmt: skip
    want = []
    for row in out[:, width:].tolist():
        want.append(row[: row.index(generator.eos_id) + 1] if generator.eos_id in row else row)
    assert got == want
