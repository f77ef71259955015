"""The float64 oracle of the extended loss family against TRL's and verl's own code.

TRL: a real ``GRPOTrainer`` built from a ``GRPOConfig`` per option, whose
``_compute_loss`` runs unchanged; only its model forward is replaced by a leaf
tensor of log-probs (and chosen entropies), so loss and gradient compare directly.
verl: its policy losses fetched through ``get_policy_loss_fn`` and its ``kl_penalty``.
"""

import importlib

import pytest
import torch

from krpo_fast.reference import policy_loss_reference
from krpo_fast.reference_losses import (
    high_entropy_weights_reference,
    kl_estimate_reference,
    off_policy_weights_reference,
    policy_loss_family_reference,
)
from krpo_fast.rollout_correction import rollout_correction


def _import_or_none(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


trl = _import_or_none("trl")
core_algos = _import_or_none("verl.trainer.ppo.core_algos")
requires_trl = pytest.mark.skipif(
    trl is None, reason="trl is not installed (pip install 'trl==1.16.*')"
)
requires_verl = pytest.mark.skipif(
    core_algos is None, reason="verl is not installed (see the README's verl section)"
)
F64 = torch.float64
B, T = 7, 6


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    """Ragged rows (one empty), ratios spread enough for every clip to act, both
    signs of advantages, sampler log-probs with a NaN, float32-exact entropies."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 4, 0, 5, 3, 6])
    mask = torch.arange(T) < lengths.unsqueeze(1)
    old = -torch.rand(B, T, generator=gen, dtype=F64) * 2 - 0.05
    logp = old + torch.randn(B, T, generator=gen, dtype=F64) * 0.35
    ref = old + torch.randn(B, T, generator=gen, dtype=F64) * 0.3
    sampler = old + torch.randn(B, T, generator=gen, dtype=F64) * 0.15
    sampler[2, 1] = float("nan")
    advantages = torch.randn(B, generator=gen, dtype=F64)
    advantages[1] = -advantages[1].abs()  # a short row with A < 0 for the off-policy mask
    entropies = (torch.rand(B, T, generator=gen) * 3).to(F64)
    return {
        "logp": logp,
        "old": old,
        "ref": ref,
        "sampler": sampler,
        "advantages": advantages,
        "mask": mask,
        "entropies": entropies,
    }


def test_default_options_are_the_paper_loss():
    data = _inputs(0)
    for agg in (
        "seq-mean-token-mean",
        "token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    ):
        args = (data["logp"], data["old"], data["ref"], data["advantages"], data["mask"])
        leaf, paper_leaf = (data["logp"].clone().requires_grad_(True) for _ in range(2))
        loss, metrics = policy_loss_family_reference(
            leaf, *args[1:], eps_low=0.15, eps_high=0.25, beta=0.03, loss_agg=agg, max_len=T
        )
        paper, paper_metrics = policy_loss_reference(
            paper_leaf, *args[1:], eps_low=0.15, eps_high=0.25, beta=0.03, loss_agg=agg, max_len=T
        )
        loss.backward()
        paper.backward()
        torch.testing.assert_close(loss, paper, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(leaf.grad, paper_leaf.grad, rtol=1e-12, atol=1e-14)
        for key in ("kl", "clip_fraction"):
            torch.testing.assert_close(metrics[key], paper_metrics[key])
        assert 0 < metrics["clip_fraction"] < 1


def test_options_that_do_not_apply_are_rejected():
    data = _inputs(0)
    args = (data["logp"], data["old"], data["ref"], data["advantages"], data["mask"])
    for options, match in (
        ({"loss_type": "cispo", "delta": 2.0}, "delta and dual_clip"),
        ({"loss_type": "sapo", "dual_clip": 3.0}, "delta and dual_clip"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"ratio_level": "row"}, "ratio_level"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
    ):
        with pytest.raises(ValueError, match=match):
            policy_loss_family_reference(*args, **options)


def test_masked_out_tokens_may_hold_nan_and_inf():
    data = _inputs(1)
    poisoned = {k: v.clone() for k, v in data.items()}
    for key in ("logp", "old", "ref"):
        poisoned[key][~data["mask"]] = float("nan")
    poisoned["logp"][0, ~data["mask"][0]] = -float("inf")
    results = []
    for d in (data, poisoned):
        leaf = d["logp"].clone().requires_grad_(True)
        loss, _ = policy_loss_family_reference(
            leaf, d["old"], d["ref"], d["advantages"], d["mask"], ratio_level="sequence"
        )
        loss.backward()
        results.append((loss, leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


# ---------------------------------------------------------------------------- TRL

# TRL loss_type -> (loss_type, loss_agg) of the oracle.
TRL_LOSS_TYPES = {
    "grpo": ("clip", "seq-mean-token-mean"),
    "bnpo": ("clip", "token-mean"),
    "dr_grpo": ("clip", "seq-mean-token-sum-norm"),
    "dapo": ("clip", "token-mean"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
}
MAX_COMPLETION = 9


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from krpo_fast.tiny_model import bundled_model_path

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _trl_trainer(model_and_tokenizer, tmp_path, **config):
    from datasets import Dataset

    model, tokenizer = model_and_tokenizer
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=B,
        num_generations=B,
        max_completion_length=MAX_COMPLETION,
        report_to="none",
        use_cpu=True,
        bf16=False,
        **config,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["Q:1+1=\nA:"] * B}),
        processing_class=tokenizer,
    )
    # Set by TRL's training loop only: a training step without accumulation.
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _trl_loss(trainer, data, logp, importance_sampling_ratio=None):
    """TRL's own _compute_loss with its model forward replaced by ``logp``."""
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (
        logp,
        data["entropies"],
        None,
    )
    mask = data["mask"].long()
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
    if importance_sampling_ratio is not None:
        # TRL sets use_vllm from a vLLM engine; the loss only reads the flag and the ratio.
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
        inputs["importance_sampling_ratio"] = importance_sampling_ratio
    return trainer._compute_loss(trainer.model, inputs)


@requires_trl
def test_token_weight_builders_match_trl(tiny_model_and_tokenizer, tmp_path):
    trainer = _trl_trainer(tiny_model_and_tokenizer, tmp_path)
    data = _inputs(3)
    mask = data["mask"].long()
    for quantile in (0.2, 0.5, 0.9):
        theirs = trainer.get_high_entropy_mask(data["entropies"], mask, 1 - quantile)
        ours = high_entropy_weights_reference(data["entropies"], data["mask"], quantile)
        assert torch.equal(ours, theirs.to(F64))
        assert 0 < ours.sum() < data["mask"].sum()
    for threshold in (0.0, 0.02, 0.1):
        theirs = trl.GRPOTrainer.get_off_policy_mask(
            data["advantages"].unsqueeze(-1), data["logp"], data["sampler"], mask, threshold
        )
        ours = off_policy_weights_reference(
            data["advantages"], data["logp"], data["sampler"], data["mask"], threshold
        )
        assert torch.equal(ours, theirs.squeeze(-1).to(F64))


def test_row_weights_equal_broadcast_token_weights():
    data = _inputs(4)
    rows = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.25, 1.5], dtype=F64)
    results = []
    for weights in (rows, rows.unsqueeze(-1).expand(B, T)):
        leaf = data["logp"].clone().requires_grad_(True)
        loss, _ = policy_loss_family_reference(
            leaf, data["old"], data["ref"], data["advantages"], data["mask"], token_weights=weights
        )
        loss.backward()
        results.append((loss, leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=0)
    # The weights scale the policy term only: a zero-weight row keeps its KL gradient.
    kl_only = data["logp"].clone().requires_grad_(True)
    policy_loss_family_reference(
        kl_only, data["old"], data["ref"], torch.zeros(B, dtype=F64), data["mask"]
    )[0].backward()
    torch.testing.assert_close(results[0][1][1], kl_only.grad[1], rtol=1e-12, atol=0)


TRL_CASES = [
    pytest.param({"loss_type": "grpo"}, {}, id="grpo"),
    pytest.param({"loss_type": "bnpo", "beta": 0.04}, {}, id="bnpo-kl"),
    pytest.param({"loss_type": "dr_grpo", "beta": 0.04}, {}, id="dr_grpo-kl"),
    pytest.param({"loss_type": "dapo", "epsilon_high": 0.28}, {}, id="dapo"),
    pytest.param({"loss_type": "grpo", "delta": 1.3}, {}, id="delta"),
    pytest.param({"loss_type": "grpo", "delta": 1.3, "beta": 0.04}, {}, id="delta-kl"),
    pytest.param({"loss_type": "cispo", "epsilon_high": 1.15}, {}, id="cispo"),
    pytest.param({"loss_type": "cispo", "epsilon_high": 1.15, "beta": 0.04}, {}, id="cispo-kl"),
    pytest.param({"loss_type": "sapo"}, {}, id="sapo"),
    pytest.param(
        {
            "loss_type": "sapo",
            "beta": 0.04,
            "sapo_temperature_pos": 0.7,
            "sapo_temperature_neg": 1.4,
        },
        {},
        id="sapo-kl-taus",
    ),
    pytest.param({"loss_type": "grpo", "importance_sampling_level": "sequence"}, {}, id="gspo"),
    pytest.param(
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.04},
        {},
        id="gspo-kl",
    ),
    pytest.param(
        {"loss_type": "sapo", "importance_sampling_level": "sequence"}, {}, id="sapo-sequence"
    ),
    pytest.param({"loss_type": "grpo", "top_entropy_quantile": 0.4}, {}, id="top-entropy"),
    pytest.param(
        {"loss_type": "grpo", "top_entropy_quantile": 0.4, "beta": 0.04}, {}, id="top-entropy-kl"
    ),
    pytest.param({"loss_type": "grpo", "off_policy_mask_threshold": 0.02}, {}, id="off-policy"),
    pytest.param(
        {"loss_type": "dapo", "off_policy_mask_threshold": 0.02, "beta": 0.04},
        {},
        id="off-policy-kl",
    ),
    pytest.param({"loss_type": "grpo"}, {"rollout_mode": "token_truncate"}, id="vllm-is-token"),
    pytest.param(
        {"loss_type": "grpo", "beta": 0.04},
        {"rollout_mode": "sequence_mask", "clip_min": 0.5, "clip_max": 2.0},
        id="vllm-is-sequence-kl",
    ),
]


@requires_trl
@pytest.mark.parametrize("bias_correction_kl", [False, True])
@pytest.mark.parametrize(("config", "extra"), TRL_CASES)
def test_matches_trl_compute_loss(
    tiny_model_and_tokenizer, tmp_path, config, extra, bias_correction_kl
):
    beta = config.get("beta", 0.0)
    if bias_correction_kl and beta == 0.0:
        pytest.skip("the bias correction only changes the KL term")
    trainer = _trl_trainer(
        tiny_model_and_tokenizer, tmp_path, use_bias_correction_kl=bias_correction_kl, **config
    )
    data = _inputs(2)
    loss_type, loss_agg = TRL_LOSS_TYPES[config["loss_type"]]

    weights = torch.ones(B, T, dtype=F64)
    if "top_entropy_quantile" in config:
        weights = weights * high_entropy_weights_reference(
            data["entropies"], data["mask"], config["top_entropy_quantile"]
        )
    if "off_policy_mask_threshold" in config:
        row = off_policy_weights_reference(
            data["advantages"],
            data["logp"],
            data["sampler"],
            data["mask"],
            config["off_policy_mask_threshold"],
        )
        assert 0 < row.sum() < B, "the off-policy mask should drop some rows but not all"
        weights = weights * row.unsqueeze(-1)
    trl_ratio = None
    if "rollout_mode" in extra:
        is_weights, _ = rollout_correction(
            data["old"],
            data["sampler"],
            data["mask"],
            mode=extra["rollout_mode"],
            clip_min=extra.get("clip_min"),
            clip_max=extra.get("clip_max", 3.0),
        )
        assert not torch.all(is_weights[is_weights != 0] == 1)
        trl_ratio = is_weights.unsqueeze(-1) if is_weights.dim() == 1 else is_weights
        weights = weights * trl_ratio

    trl_leaf = data["logp"].clone().requires_grad_(True)
    trl_loss = _trl_loss(trainer, data, trl_leaf, trl_ratio)
    trl_loss.backward()

    leaf = data["logp"].clone().requires_grad_(True)
    loss, metrics = policy_loss_family_reference(
        leaf,
        data["old"],
        data["ref"],
        data["advantages"],
        data["mask"],
        eps_low=trainer.epsilon_low,
        eps_high=trainer.epsilon_high,
        beta=beta,
        loss_agg=loss_agg,
        max_len=MAX_COMPLETION,
        ratio_level=config.get("importance_sampling_level", "token"),
        loss_type=loss_type,
        delta=config.get("delta"),
        bias_correction_kl=bias_correction_kl,
        tau_pos=trainer.args.sapo_temperature_pos,
        tau_neg=trainer.args.sapo_temperature_neg,
        token_weights=None if torch.all(weights == 1) else weights,
    )
    loss.backward()

    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(leaf.grad, trl_leaf.grad, rtol=1e-6, atol=1e-9)
    assert trl_leaf.grad.abs().sum() > 0

    logged = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    if beta != 0.0 and not bias_correction_kl:
        assert metrics["kl"].item() == pytest.approx(logged["kl"], rel=1e-6)
    if loss_type == "clip" and config.get("importance_sampling_level", "token") == "token":
        for ours, theirs in (("clip_fraction_low", "low"), ("clip_fraction_high", "high")):
            assert metrics[ours].item() == pytest.approx(logged[f"clip_ratio/{theirs}_mean"])
        assert metrics["clip_fraction"].item() == pytest.approx(logged["clip_ratio/region_mean"])
    if loss_type == "cispo":
        assert metrics["clip_fraction_high"].item() == pytest.approx(logged["cispo_clip_ratio"])
        assert metrics["clip_fraction_high"] > 0


# ---------------------------------------------------------------------------- verl

VERL_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _verl_config(**overrides):
    from verl.workers.config.actor import FSDPActorConfig

    settings = {
        "strategy": "fsdp",
        "rollout_n": 1,
        "ppo_micro_batch_size_per_gpu": 1,
        "clip_ratio_low": 0.15,
        "clip_ratio_high": 0.25,
    }
    return FSDPActorConfig(**{**settings, **overrides})


def _verl_inputs(seed):
    """verl counts only non-empty rows in its sequence means: every row has tokens."""
    data = _inputs(seed)
    data["mask"][3, :2] = True
    # Ratios from 0.2 to 5: verl's dual clip (ratio > 3 with A < 0) acts on some tokens.
    gen = torch.Generator().manual_seed(seed)
    data["logp"] = data["old"] + (torch.rand(B, T, generator=gen, dtype=F64) * 3.2 - 1.6)
    return data


def _verl_loss(name, data, agg, config, token_weights=None):
    leaf = data["logp"].clone().requires_grad_(True)
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=data["old"],
        log_prob=leaf,
        advantages=data["advantages"].unsqueeze(-1).expand(B, T),
        response_mask=data["mask"].to(F64),
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=token_weights,
    )
    loss.backward()
    return loss, leaf.grad, metrics


def _oracle(data, agg, **options):
    leaf = data["logp"].clone().requires_grad_(True)
    loss, metrics = policy_loss_family_reference(
        leaf,
        data["old"],
        None,
        data["advantages"],
        data["mask"],
        eps_low=0.15,
        eps_high=0.25,
        beta=0.0,
        loss_agg=agg,
        max_len=T,
        **options,
    )
    loss.backward()
    return loss, leaf.grad, metrics


@requires_verl
@pytest.mark.parametrize("agg", VERL_AGGS)
@pytest.mark.parametrize("with_weights", [False, True])
def test_dual_clip_matches_verl_vanilla(agg, with_weights):
    data = _verl_inputs(3)
    weights = None
    if with_weights:
        weights, _ = rollout_correction(
            data["old"], data["sampler"], data["mask"], mode="token_truncate", clip_max=1.1
        )
    config = _verl_config(clip_ratio_c=2.5)
    loss, grad, metrics = _oracle(data, agg, dual_clip=2.5, token_weights=weights)
    verl_loss, verl_grad, verl_metrics = _verl_loss("vanilla", data, agg, config, weights)
    torch.testing.assert_close(loss, verl_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-6, atol=1e-9)
    assert metrics["dual_clip_fraction"].item() == pytest.approx(
        verl_metrics["actor/pg_clipfrac_lower"]
    )
    assert metrics["dual_clip_fraction"] > 0
    # Without the dual clip the losses differ: the inputs exercise it.
    assert not torch.allclose(_oracle(data, agg)[0], verl_loss)


@requires_verl
@pytest.mark.parametrize("agg", VERL_AGGS)
def test_sequence_ratio_matches_verl_gspo(agg):
    data = _inputs(4)
    data["mask"][3, :3] = True
    loss, grad, _ = _oracle(data, agg, ratio_level="sequence")
    verl_loss, verl_grad, _ = _verl_loss("gspo", data, agg, _verl_config())
    torch.testing.assert_close(loss, verl_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-6, atol=1e-9)


@requires_verl
def test_sapo_matches_verl_sapo():
    data = _inputs(5)
    data["mask"][3, :3] = True
    config = _verl_config(tau_pos=0.8, tau_neg=1.3)
    loss, grad, _ = _oracle(data, "seq-mean-token-mean", loss_type="sapo", tau_pos=0.8, tau_neg=1.3)
    verl_loss, verl_grad, _ = _verl_loss("sapo", data, "seq-mean-token-mean", config)
    torch.testing.assert_close(loss, verl_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-6, atol=1e-9)


@requires_verl
@pytest.mark.parametrize(
    ("ours", "verls"),
    [("k1", ["k1", "kl"]), ("k2", ["k2", "mse"]), ("low_var_kl", ["low_var_kl", "k3"])],
)
def test_kl_estimators_match_verl(ours, verls):
    gen = torch.Generator().manual_seed(6)
    logp = -torch.rand(64, generator=gen, dtype=F64) * 4
    ref = logp + torch.randn(64, generator=gen, dtype=F64) * 3
    ref[:4] = logp[:4] + torch.tensor([25.0, -25.0, 3.0, -12.0], dtype=F64)  # clamps act
    for name in verls:
        expected = core_algos.kl_penalty(logp, ref, name)
        torch.testing.assert_close(kl_estimate_reference(logp, ref, ours), expected)
    # verl's "k3" is clamped; ours is the plain estimator, equal where the clamps do not act.
    small = slice(4, None)
    torch.testing.assert_close(
        kl_estimate_reference(logp[small], ref[small], "k3")[(ref - logp)[small].abs() < 2],
        core_algos.kl_penalty(logp, ref, "k3")[small][(ref - logp)[small].abs() < 2],
    )
