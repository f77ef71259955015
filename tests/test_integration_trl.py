"""KRPOGRPOTrainer: real TRL GRPOTrainer steps on the bundled tiny model, on CPU.

The framework is not mocked: the only wrappers count and record the calls to
krpo-fast's ops that the integration module makes.
"""

import math

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install 'trl==1.16.*')")

from datasets import Dataset  # noqa: E402  (installed with trl)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import krpo_fast.integrations.trl as krpo_trl  # noqa: E402
from krpo_fast import group_advantages  # noqa: E402
from krpo_fast.tiny_model import bundled_model_path  # noqa: E402

GROUP = 4


def _digit_reward(completions: list[str], **kwargs: object) -> list[float]:
    """Share of digits among the completion's characters: varies within a group."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _record(calls: list, fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    return wrapper


def _make_trainer(tmp_path, **config):
    path = bundled_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = Dataset.from_dict({"prompt": [f"Q:{a}+{a + 3}=\nA:" for a in range(16)]})
    args = krpo_trl.KRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=GROUP,
        num_generations=GROUP,
        max_completion_length=8,
        max_steps=3,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        **config,
    )
    return krpo_trl.KRPOGRPOTrainer(
        model=model,
        reward_funcs=_digit_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


@pytest.mark.parametrize(
    ("loss_type", "beta", "num_iterations"), [("grpo", 0.01, 1), ("dapo", 0.0, 2)]
)
def test_trl_training_uses_fused_ops(tmp_path, monkeypatch, loss_type, beta, num_iterations):
    adv_calls, loss_calls = [], []
    monkeypatch.setattr(krpo_trl, "group_advantages", _record(adv_calls, group_advantages))
    monkeypatch.setattr(krpo_trl, "policy_loss", _record(loss_calls, krpo_trl.policy_loss))

    trainer = _make_trainer(
        tmp_path,
        loss_type=loss_type,
        beta=beta,
        num_iterations=num_iterations,
        process_var=1e-4,
        meas_var=5e-2,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()

    # One advantage call per generation batch, on the rewards TRL gathered, with our settings.
    assert len(adv_calls) == math.ceil(3 / num_iterations)
    for args, kwargs, out in adv_calls:
        rewards = args[0]
        assert kwargs["mode"] == "kalman" and kwargs["group_size"] == GROUP
        assert (kwargs["process_var"], kwargs["meas_var"]) == (1e-4, 5e-2)
        expected = group_advantages(rewards, group_size=GROUP, process_var=1e-4, meas_var=5e-2)
        torch.testing.assert_close(out, expected)
    # TRL's completion log (it keeps the last generation batch) holds ours, not its own.
    torch.testing.assert_close(torch.tensor(list(trainer._logs["advantages"])), adv_calls[-1][2])
    assert any(out.abs().max() > 0 for _, _, out in adv_calls), "rewards never varied"

    # The loss of every step is our fused loss, fed with the advantages computed above
    # (TRL shuffles rows, so compare as multisets).
    assert len(loss_calls) == 3
    for step, (args, kwargs, (loss, _)) in enumerate(loss_calls):
        used = args[3]
        computed = adv_calls[step // num_iterations][2]
        torch.testing.assert_close(used.sort().values, computed.sort().values)
        assert kwargs["beta"] == beta and kwargs["eps_low"] == kwargs["eps_high"] == 0.2
        assert kwargs["loss_agg"] == krpo_trl.LOSS_TYPE_TO_AGG[loss_type]
        assert (args[2] is not None) == (beta != 0.0)  # ref log-probs only with a KL term
        assert (args[1] is not None) == (num_iterations > 1)  # old log-probs when reused
        assert torch.isfinite(loss)

    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    if loss_type == "grpo":  # no rescaling: the logged loss is our op's loss
        for h, (_, _, (loss, _)) in zip(history, loss_calls, strict=True):
            assert h["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    assert sum("krpo/advantages/abs_max" in h for h in history) == len(adv_calls)
    assert all("clip_ratio/region_mean" in h for h in history)
    assert all(("kl" in h) == (beta != 0.0) for h in history)
    after = list(trainer.model.parameters())
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after, strict=True))


def test_trl_unsupported_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="loss_type='vespo': another per-token objective"):
        _make_trainer(tmp_path, loss_type="vespo")
    with pytest.raises(ValueError, match="use_adaptive_entropy: its controller"):
        _make_trainer(tmp_path, loss_type="grpo", use_adaptive_entropy=True)


# --- loss and gradients against TRL's own _compute_loss on the same batch

B, T, MAX_COMPLETION = 7, 6, 9


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """Ragged rows (one empty), ratios spread enough for every clip and mask to act,
    both signs of advantages, engine log-probs with a NaN."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 4, 0, 5, 3, 6])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    old = -torch.rand(B, T, generator=gen) * 2 - 0.05
    sampler = old + torch.randn(B, T, generator=gen) * 0.15
    sampler[2, 1] = float("nan")
    return {
        "logp": old + torch.randn(B, T, generator=gen) * 0.35,
        "old": old,
        "ref": old + torch.randn(B, T, generator=gen) * 0.3,
        "sampler": sampler,
        "advantages": torch.randn(B, generator=gen),
        "mask": mask,
        "entropy_scale": torch.rand(B, T, generator=gen) * 3,
    }


def _parity_trainer(cls, tmp_path, **config):
    from trl import GRPOConfig

    path = bundled_model_path()
    trainer = cls(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        reward_funcs=_digit_reward,
        args=GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=B,
            num_generations=B,
            max_completion_length=MAX_COMPLETION,
            report_to="none",
            use_cpu=True,
            bf16=False,
            **config,
        ),
        train_dataset=Dataset.from_dict({"prompt": ["Q:1+1=\nA:"] * B}),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    trainer.model.train()  # set by TRL's loop: a training step without accumulation
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _loss_and_grad(trainer, data, is_ratio):
    """``trainer._compute_loss`` with its model forward replaced by a leaf of log-probs
    (and entropies that depend on it, so the entropy bonus has a gradient too)."""
    leaf = data["logp"].clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (
        leaf,
        data["entropy_scale"] * torch.sigmoid(leaf),
        None,
    )
    mask = data["mask"]
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": data["advantages"],
        "old_per_token_logps": data["old"],
        "ref_per_token_logps": data["ref"],
        "sampling_per_token_logps": data["sampler"],
        "num_items_in_batch": mask.sum(),
    }
    if is_ratio is not None:  # TRL's vLLM correction: the loss reads the flag and the ratio
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        inputs["importance_sampling_ratio"] = is_ratio
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), leaf.grad


PARITY_CASES = {
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.15},
    "sapo": {"loss_type": "sapo", "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.4},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "gspo-dapo": {"loss_type": "dapo", "importance_sampling_level": "sequence"},
    "delta": {"loss_type": "grpo", "delta": 1.3},
    "top-entropy": {"loss_type": "bnpo", "top_entropy_quantile": 0.4},
    "off-policy": {"loss_type": "grpo", "off_policy_mask_threshold": 0.02},
    "entropy-bonus": {"loss_type": "grpo", "entropy_coef": 0.05},
    "entropy-bonus-masked": {
        "loss_type": "dr_grpo",
        "entropy_coef": 0.05,
        "top_entropy_quantile": 0.5,
    },
    "vllm-is-token": {"loss_type": "grpo", "vllm_importance_sampling_mode": "token_truncate"},
    "vllm-is-sequence": {"loss_type": "sapo", "vllm_importance_sampling_mode": "sequence_mask"},
}


@pytest.mark.parametrize("kl", ["none", "k3", "bias-corrected"])
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_fused_loss_matches_trl_compute_loss(tmp_path, case, kl):
    from trl import GRPOTrainer

    from krpo_fast import rollout_correction

    config = dict(PARITY_CASES[case])
    config["beta"] = 0.0 if kl == "none" else 0.04
    config["use_bias_correction_kl"] = kl == "bias-corrected"
    data = _batch(list(PARITY_CASES).index(case))
    is_ratio = None
    if "vllm_importance_sampling_mode" in config:
        weights, _ = rollout_correction(
            data["old"],
            data["sampler"],
            data["mask"],
            mode=config["vllm_importance_sampling_mode"],
            clip_min=0.8,
            clip_max=1.2,
        )
        assert 0 < (weights != 1).float().mean() < 1, "the correction should act on some rows"
        is_ratio = weights if weights.dim() == 2 else weights.unsqueeze(-1)

    theirs = _loss_and_grad(_parity_trainer(GRPOTrainer, tmp_path, **config), data, is_ratio)
    ours = _loss_and_grad(
        _parity_trainer(krpo_trl.KRPOGRPOTrainer, tmp_path, **config), data, is_ratio
    )
    assert theirs[1].abs().sum() > 0
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-6)


def test_trl_unscorable_completions_leave_the_filter(tmp_path):
    trainer = _make_trainer(tmp_path, loss_type="bnpo")
    rewards = torch.tensor([[1.0], [float("nan")], [0.0], [1.0], [0.5], [0.5], [0.0], [1.0]])
    adv = trainer.krpo_advantages(rewards, GROUP)
    kept = torch.tensor([0, 2, 3, 4, 5, 6, 7])
    expected = group_advantages(
        rewards[kept, 0], group_offsets=torch.tensor([0, 3, 7], dtype=torch.int32)
    )
    assert adv[1] == 0
    torch.testing.assert_close(adv[kept], expected)
