"""krpo_fast.rollout_correction: hand-computed cases, edge cases, input checks, and
TRL 1.16's own importance-sampling correction on the same log-probs."""

import importlib
import math

import pytest
import torch

from krpo_fast import rollout_correction
from krpo_fast.rollout_correction import ROLLOUT_CORRECTION_MODES

NAN = float("nan")


def _batch(seed: int, rows: int = 6, length: int = 5, spread: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=gen) * 2
    sampler = old + torch.randn(rows, length, generator=gen) * spread
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    mask = torch.arange(length) < lengths.unsqueeze(1)
    return old, sampler, mask


def test_hand_computed_weights_every_mode():
    old = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, 0.0]])
    sampler = torch.tensor([[-0.5, -1.0, -1.0], [-0.5, NAN, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # d = old - sampler over masked tokens, NaN as 0: [[0.5, 0, -1], [0, 0, (masked)]]
    e = math.exp
    expected = {
        "token_truncate": [[min(e(0.5), 1.5), 1.0, max(e(-1), 0.5)], [1.0, 1.0, 0.0]],
        "token_mask": [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]],
        "sequence_truncate": [max(e(-0.5), 0.5), 1.0],
        "sequence_mask": [e(-0.5), 1.0],
    }
    for mode, want in expected.items():
        weights, metrics = rollout_correction(
            old, sampler, mask, mode=mode, clip_min=0.5, clip_max=1.5
        )
        torch.testing.assert_close(weights, torch.tensor(want))
        # k3 of d over the 4 scored masked tokens (the NaN one is not scored).
        kl = (e(0.5) - 1 - 0.5) + (e(-1) - 1 + 1)
        assert metrics["mismatch_kl"].item() == pytest.approx(kl / 4)
        assert metrics["logp_diff_mean"].item() == pytest.approx(1.5 / 4)
        assert metrics["logp_diff_max"].item() == pytest.approx(1.0)
    _, token_metrics = rollout_correction(
        old, sampler, mask, mode="token_mask", clip_min=0.5, clip_max=1.5
    )
    assert token_metrics["clipped_fraction"].item() == pytest.approx(2 / 5)
    assert token_metrics["weight_mean"].item() == pytest.approx(3 / 5)
    assert token_metrics["weight_min"].item() == 0.0
    assert token_metrics["weight_max"].item() == 1.0


def test_nan_sampler_logprobs_count_as_no_mismatch():
    old, sampler, mask = _batch(1)
    holes = sampler.clone()
    holes[0, 0] = NAN
    for mode in ROLLOUT_CORRECTION_MODES:
        weights, metrics = rollout_correction(
            old, holes, mask, mode=mode, clip_max=None, clip_min=0.0
        )
        assert torch.isfinite(weights).all() and all(torch.isfinite(v) for v in metrics.values())
        filled = sampler.clone()
        filled[0, 0] = old[0, 0]  # exactly no mismatch at that token
        expected, _ = rollout_correction(old, filled, mask, mode=mode, clip_max=None, clip_min=0.0)
        torch.testing.assert_close(weights, expected)


def test_masked_out_tokens_and_empty_rows_do_not_count():
    old, sampler, mask = _batch(2)
    mask[3] = False
    garbage_old, garbage_sampler = old.clone(), sampler.clone()
    garbage_old[~mask] = NAN
    garbage_sampler[~mask] = -50.0
    for mode in ROLLOUT_CORRECTION_MODES:
        clean = rollout_correction(old, sampler, mask, mode=mode, clip_min=0.8, clip_max=1.2)
        dirty = rollout_correction(
            garbage_old, garbage_sampler, mask, mode=mode, clip_min=0.8, clip_max=1.2
        )
        torch.testing.assert_close(clean[0], dirty[0])
        for key in clean[1]:
            torch.testing.assert_close(clean[1][key], dirty[1][key])
        if mode.startswith("token"):
            assert (clean[0][~mask] == 0).all()
        else:
            assert clean[0][3] == 1.0  # an empty row: no mismatch
            kept = [0, 1, 2, 4, 5]
            torch.testing.assert_close(clean[1]["weight_mean"], clean[0][kept].mean())


def test_clip_bounds():
    old, sampler, mask = _batch(3, rows=64, spread=0.8)
    for mode in ("token_truncate", "sequence_truncate"):
        weights, metrics = rollout_correction(
            old, sampler, mask, mode=mode, clip_min=0.7, clip_max=1.6
        )
        counted = weights[mask] if mode.startswith("token") else weights
        assert counted.min() == pytest.approx(0.7) and counted.max() == pytest.approx(1.6)
        assert 0 < metrics["clipped_fraction"] < 1
        only_max, _ = rollout_correction(old, sampler, mask, mode=mode, clip_max=1.6)
        assert only_max.max() == pytest.approx(1.6) and only_max[only_max > 0].min() < 0.7
        only_min, _ = rollout_correction(old, sampler, mask, mode=mode, clip_min=0.7, clip_max=None)
        assert only_min.max() > 1.6
    for mode in ("token_mask", "sequence_mask"):
        weights, metrics = rollout_correction(
            old, sampler, mask, mode=mode, clip_min=0.7, clip_max=1.6
        )
        raw, _ = rollout_correction(old, sampler, mask, mode=mode, clip_min=None, clip_max=None)
        counted = mask if mode.startswith("token") else torch.ones_like(raw, dtype=torch.bool)
        outside = counted & ((raw < 0.7) | (raw > 1.6))
        assert outside.any() and (counted & ~outside).any()
        assert (weights[outside] == 0).all()
        torch.testing.assert_close(weights[counted & ~outside], raw[counted & ~outside])
        assert metrics["clipped_fraction"].item() == pytest.approx(
            (outside.sum() / counted.sum()).item()
        )


def test_bounds_that_exclude_one_count_only_tokens_and_rows_with_data():
    old, sampler, mask = _batch(8, rows=12)
    mask[5] = False
    for mode in ("token_mask", "sequence_mask"):
        weights, metrics = rollout_correction(
            old, sampler, mask, mode=mode, clip_min=1.05, clip_max=9.0
        )
        counted = weights[mask] if mode.startswith("token") else weights[mask.any(-1)]
        assert 0 < metrics["clipped_fraction"] < 1
        torch.testing.assert_close(metrics["clipped_fraction"], (counted == 0).float().mean())
        torch.testing.assert_close(metrics["weight_min"], torch.tensor(0.0))


def test_overflowing_sequence_ratios_stay_finite():
    old = torch.zeros(2, 300)
    sampler = torch.full((2, 300), -1.0)
    sampler[1] = 1.0  # sums of +-300: exp overflows / underflows float32
    mask = torch.ones(2, 300, dtype=torch.bool)
    truncated, _ = rollout_correction(old, sampler, mask, mode="sequence_truncate", clip_max=3.0)
    masked, metrics = rollout_correction(old, sampler, mask, mode="sequence_mask", clip_max=3.0)
    torch.testing.assert_close(truncated, torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(masked, torch.tensor([0.0, 0.0]))
    assert metrics["clipped_fraction"] == 0.5


def test_all_masked_batch_and_empty_batch():
    old, sampler, mask = _batch(4)
    for m in (torch.zeros_like(mask), mask[:0]):
        o, s = old[: m.shape[0]], sampler[: m.shape[0]]
        for mode in ROLLOUT_CORRECTION_MODES:
            weights, metrics = rollout_correction(o, s, m, mode=mode)
            assert weights.shape == (m.shape if mode.startswith("token") else m.shape[:1])
            for key in ("weight_mean", "weight_min", "weight_max"):
                assert metrics[key] == 1.0
            for key in ("clipped_fraction", "mismatch_kl", "logp_diff_mean", "logp_diff_max"):
                assert metrics[key] == 0.0


def test_dtypes_and_constants():
    old, sampler, mask = _batch(5, length=40)
    old64, sampler64 = old.double().requires_grad_(True), sampler.double()
    weights, metrics = rollout_correction(old64, sampler64, mask.float(), mode="token_truncate")
    assert weights.dtype == torch.float64 and not weights.requires_grad
    assert metrics["mismatch_kl"].dtype == torch.float64
    # bf16 log-probs: the sequence sum is taken in float32.
    bf_old, bf_sampler = old.bfloat16(), sampler.bfloat16()
    weights, _ = rollout_correction(bf_old, bf_sampler, mask, clip_max=None, clip_min=0.0)
    expected = torch.where(mask, bf_old.float() - bf_sampler.float(), 0.0).sum(-1).exp()
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected)


def test_bad_input_names_the_argument():
    old, sampler, mask = _batch(6)
    cases = [
        ((old.long(), sampler, mask), {}, TypeError, "old_logp"),
        ((old, sampler[:, :2], mask), {}, ValueError, "sampler_logp"),
        ((old, sampler, mask[0]), {}, ValueError, "mask"),
        ((old, sampler, mask.float() * 2), {}, ValueError, "mask"),
        ((old, sampler.tolist(), mask), {}, TypeError, "sampler_logp"),
        ((old, sampler, mask), {"mode": "token"}, ValueError, "mode"),
        ((old, sampler, mask), {"clip_min": -0.1}, ValueError, "clip_min"),
        ((old, sampler, mask), {"clip_max": float("inf")}, ValueError, "clip_max"),
        ((old, sampler, mask), {"clip_max": True}, TypeError, "clip_max"),
        ((old, sampler, mask), {"clip_max": 0}, ValueError, "clip_max"),
        ((old, sampler, mask), {"clip_min": 2.0, "clip_max": 2.0}, ValueError, "clip_min"),
        (
            (old, sampler, mask),
            {"mode": "token_truncate", "clip_max": None},
            ValueError,
            "clip_min or clip_max",
        ),
    ]
    for args, kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            rollout_correction(*args, **kwargs)
    with pytest.raises(ValueError, match="meta"):
        rollout_correction(old, sampler.to("meta"), mask)


# ---------------------------------------------------------------------------- TRL

try:
    trl = importlib.import_module("trl")
except ImportError:
    trl = None

ROWS = 6


def _trl_scored_batch(tmp_path, mode, clip_min, clip_max, seed):
    """TRL's _generate_and_score_completions on a fixed rollout: the engine's
    completions and log-probs come from a rollout_func, the trainer's old log-probs
    from a replaced forward; everything between is TRL's code."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from krpo_fast.tiny_model import bundled_model_path

    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 7, 1, 4, 7]
    length = max(lengths)
    old = -torch.rand(ROWS, length, generator=gen, dtype=torch.float64) * 2
    sampler = old + torch.randn(ROWS, length, generator=gen, dtype=torch.float64) * 0.25
    sampler_lists = [sampler[i, : lengths[i]].tolist() for i in range(ROWS)]
    sampler_lists[2][3] = None  # a token vLLM could not score
    sampler[2, 3] = NAN

    def rollout(prompts, trainer):
        return {
            "prompt_ids": [[5, 6, 7]] * len(prompts),
            "completion_ids": [[9] * n for n in lengths],
            "logprobs": sampler_lists,
        }

    path = bundled_model_path()
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=ROWS,
        num_generations=ROWS,
        max_completion_length=length,
        report_to="none",
        use_cpu=True,
        bf16=False,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
    )
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["Q:1+1=\nA:"] * ROWS}),
        processing_class=AutoTokenizer.from_pretrained(path),
        rollout_func=rollout,
    )
    # TRL sets these when it builds a vLLM engine; the correction only reads them.
    trainer.use_vllm = True
    trainer._last_loaded_step = trainer.state.global_step
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (old, None, None)
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": "Q:1+1=\nA:"}] * ROWS)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    return old, sampler, output, logged


@pytest.mark.skipif(trl is None, reason="trl is not installed (pip install 'trl==1.16.*')")
@pytest.mark.parametrize(
    ("mode", "clip_min", "clip_max"),
    [
        ("token_truncate", None, 1.1),
        ("token_truncate", 0.9, 1.1),
        ("token_mask", 0.85, 1.15),
        ("sequence_truncate", 0.8, 1.2),
        ("sequence_mask", None, 1.3),
        ("sequence_mask", 0.7, 1.3),
    ],
)
def test_matches_trl_importance_sampling_correction(tmp_path, mode, clip_min, clip_max):
    old, sampler, output, logged = _trl_scored_batch(tmp_path, mode, clip_min, clip_max, seed=7)
    mask = output["completion_mask"].bool()
    # TRL holds the engine's log-probs in float32.
    torch.testing.assert_close(
        output["sampling_per_token_logps"][mask], sampler[mask].float(), equal_nan=True
    )

    weights, metrics = rollout_correction(
        old,
        output["sampling_per_token_logps"],
        mask,
        mode=mode,
        clip_min=clip_min,
        clip_max=clip_max,
    )
    theirs = output["importance_sampling_ratio"]
    if mode.startswith("token"):
        torch.testing.assert_close(weights[mask], theirs[mask])
    else:
        torch.testing.assert_close(weights, theirs.squeeze(-1))
    assert ((weights != 1) & (weights != 0)).any()
    assert 0 < metrics["clipped_fraction"] < 1  # the bounds act on some tokens or rows
    for ours, key in (
        ("weight_mean", "sampling/importance_sampling_ratio/mean"),
        ("weight_min", "sampling/importance_sampling_ratio/min"),
        ("weight_max", "sampling/importance_sampling_ratio/max"),
        ("logp_diff_mean", "sampling/sampling_logp_difference/mean"),
        ("logp_diff_max", "sampling/sampling_logp_difference/max"),
    ):
        assert metrics[ours].item() == pytest.approx(logged[key], rel=1e-5), ours


# ---------------------------------------------------------------------------- verl

try:
    rollout_corr_helper = importlib.import_module("verl.trainer.ppo.rollout_corr_helper")
except ImportError:
    rollout_corr_helper = None


@pytest.mark.skipif(rollout_corr_helper is None, reason="verl is not installed")
@pytest.mark.parametrize(
    ("level", "threshold", "mode", "clip_min", "clip_max"),
    [
        ("token", 1.2, "token_truncate", None, 1.2),
        ("sequence", 1.5, "sequence_truncate", None, 1.5),
        ("token", "0.85_1.15", "token_mask", 0.85, 1.15),
        ("sequence", "0.6_1.4", "sequence_mask", 0.6, 1.4),
    ],
)
def test_matches_verl_rollout_is_weights(level, threshold, mode, clip_min, clip_max):
    """verl's rollout_is (truncation to an upper bound, or IcePop's "lower_upper" mask)
    is the same correction; verl returns [B, T] weights, zero on padding."""
    old, sampler, mask = _batch(9, rows=16, length=8)
    theirs, _ = rollout_corr_helper.compute_rollout_correction_weights(
        old - sampler, mask.float(), rollout_is=level, rollout_is_threshold=threshold
    )
    ours, metrics = rollout_correction(
        old, sampler, mask, mode=mode, clip_min=clip_min, clip_max=clip_max
    )
    if ours.dim() == 1:
        ours = ours.unsqueeze(-1) * mask
    torch.testing.assert_close(ours, theirs)
    assert 0 < metrics["clipped_fraction"] < 1
