"""krpo-fast study: a micro study end to end, its statistics and its argument errors."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from krpo_fast.cli import main as cli_main
from krpo_fast.config import TrainConfig
from krpo_fast.study import mean_ci, run_metrics, trainer_settings

MICRO = [
    "--modes", "kalman,grpo",
    "--conditions", "hard-noisy",
    "--seeds", "2",
    "--max_steps", "2",
    "--prompts_per_step", "2",
    "--eval_size", "8",
    "--eval_steps", "1",
    "--max_new_tokens", "16",
]  # fmt: skip


def test_mean_ci_matches_scipy():
    data = [0.2, 0.35, 0.31, 0.28, 0.4]
    mean, lo, hi = mean_ci(data)
    ref_lo, ref_hi = stats.t.interval(0.95, len(data) - 1, np.mean(data), stats.sem(data))
    assert mean == pytest.approx(np.mean(data))
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi))
    assert math.isnan(mean_ci([1.0])[1])


def test_run_metrics_threshold_censoring_and_tail():
    rows = [
        {"step": s, "reward_mean": 0.9, "reward_clean_mean": s / 10, "adv_var": float(s)}
        for s in range(1, 11)
    ]
    rows[3]["eval_accuracy"], rows[9]["eval_accuracy"] = 0.31, 0.26
    summary = {"accuracy_before": 0.25, "accuracy_after": 0.26, "wall_time_s": 1.0}
    m = run_metrics(rows, summary, max_steps=10, threshold_gain=0.05)
    assert m["steps_to_threshold"] == 4 and not m["censored"]
    assert m["final_reward"] == pytest.approx(1.0)  # clean reward of the last step (10%)
    assert m["adv_var"] == pytest.approx(5.5)
    m = run_metrics(rows, summary, max_steps=10, threshold_gain=0.1)
    assert m["steps_to_threshold"] == 10 and m["censored"]


def test_micro_study_report_and_resume(tmp_path, capsys):
    out, runs = tmp_path / "report", tmp_path / "runs"
    argv = ["study", *MICRO, "--output", str(out), "--runs_dir", str(runs)]
    assert cli_main(argv) == 0
    assert "4 to train" in capsys.readouterr().out
    for name in ("README.md", "study.json", "accuracy.png", "reward.png", "variance.png"):
        assert (out / name).stat().st_size > 0
    assert not list(runs.rglob("checkpoint-*"))

    # The table's means are the means of the metrics computed from the copied run files.
    report = json.loads((out / "study.json").read_text())
    for row in report["summary"]:
        folder = out / "runs" / row["condition"] / row["mode"]
        finals, adv_vars, noise = [], [], []
        for seed in (0, 1):
            lines = (folder / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(line) for line in lines]
            summary = json.loads((folder / f"seed{seed}" / "summary.json").read_text())
            finals.append(summary["accuracy_after"])
            assert metrics[-1]["eval_accuracy"] == summary["accuracy_after"]
            adv_vars.append(np.mean([r["adv_var"] for r in metrics]))
            noise.append(
                sum(r["grad_var"] for r in metrics) / sum(r["grad_mean_sq"] for r in metrics)
            )
        assert row["final_accuracy"][0] == pytest.approx(np.mean(finals))
        assert row["adv_var"][0] == pytest.approx(np.mean(adv_vars))
        assert row["grad_noise"][0] == pytest.approx(np.mean(noise))
    text = (out / "README.md").read_text()
    assert "## Paper claims vs this study" in text and "kalman - grpo" in text
    # Group and micro-batch sizes are the runs' own (here the trainer's defaults).
    defaults = TrainConfig()
    assert report["group_size"] == defaults.group_size
    assert report["micro_batch_size"] == defaults.micro_batch_size
    assert f"2 prompts x {defaults.group_size} completions (group size)" in text
    assert f"micro-batches of {defaults.micro_batch_size} sequences" in text

    # A second invocation trains nothing; the report rebuilds from its own runs/ folder.
    assert cli_main(argv) == 0
    assert "4 done already, 0 to train" in capsys.readouterr().out
    rebuilt = tmp_path / "rebuilt"
    argv = ["study", *MICRO, "--output", str(rebuilt), "--runs_dir", str(out / "runs")]
    assert cli_main(argv) == 0
    assert json.loads((rebuilt / "study.json").read_text())["summary"] == report["summary"]


def test_trainer_settings_resolve_a_runs_flags_with_the_trainer_defaults():
    resolved = trainer_settings(["--group_size", "4", "--max_steps", "3"])
    assert (resolved.group_size, resolved.max_steps) == (4, 3)
    assert resolved.micro_batch_size == TrainConfig().micro_batch_size


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--modes", "kalman,ppo"], "--modes"),
        (["--seeds", "1"], "--seeds"),
        (["--workers", "0"], "--workers"),
        (["--conditions", "easy-loud"], "--conditions"),
        (["--max_steps", "0"], "--max_steps"),
    ],
)
def test_bad_arguments(args, flag, capsys, tmp_path):
    assert cli_main(["study", *args, "--runs_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and flag in err
    assert not any(tmp_path.iterdir())
