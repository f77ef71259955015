"""GRPO-vs-KRPO study (``krpo-fast study``): does the Kalman baseline help?

Trains the bundled tiny model with each advantage mode, over several seeds, on two
difficulty levels of the arithmetic task, with clean and with noisy rewards; every
training is a ``krpo-fast train`` subprocess (one torch thread each, ``--workers`` at a
time). A run whose ``summary.json`` exists (made with the same flags and model) is
skipped, so a killed study continues where it stopped. The report (Markdown, JSON and
PNG plots) is written into ``--output`` together with each run's ``metrics.jsonl``,
``summary.json`` and flags, so ``--runs_dir <output>/runs`` rebuilds it from that data
alone.

Metrics per run (all from the trainer's ``metrics.jsonl`` and ``summary.json``):

- ``final_accuracy``: held-out greedy exact-match accuracy after the last step;
  ``accuracy_gain``: that minus the accuracy before training (step 0).
- ``steps_to_threshold``: first evaluated step whose held-out accuracy reaches
  ``accuracy_before + threshold_gain``; a run that never does is censored at
  ``max_steps``.
- ``final_reward``: mean clean (noise-free) training reward over the last 10% of steps.
- ``adv_var``: mean over steps of the variance of the advantages across the batch.
- ``grad_noise``: mean over steps of ``grad_var`` (trace of the covariance of the
  micro-batch policy-gradient estimates within a step) divided by the mean over steps
  of ``grad_mean_sq`` (squared norm of their mean): scale-free, unlike ``adv_var``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from krpo_fast.tiny_model import CONFIG_NAME, bundled_model_path

__all__ = ["CONDITIONS", "main", "mean_ci", "run_metrics"]

MODES = ("kalman", "grpo", "dr_grpo", "batch_std")
METHOD_UNDER_TEST = "kalman"  # the method under test; every other mode is compared with it
# Difficulty levels: the bundled model's task (trainer defaults) and two-digit terms only.
DIFFICULTIES = {"easy": [], "hard": ["--num_digits_min", "2"]}
CONDITIONS = tuple(f"{d}-{n}" for d in DIFFICULTIES for n in ("clean", "noisy"))
# Budget knobs per preset; everything else is the trainer's default.
PRESETS = {
    "full": {
        "seeds": 5,
        "max_steps": 50,
        "prompts_per_step": 8,
        "eval_size": 200,
        "eval_steps": 10,
        "max_new_tokens": 48,
    },
    "quick": {
        "seeds": 2,
        "max_steps": 8,
        "prompts_per_step": 4,
        "eval_size": 40,
        "eval_steps": 4,
        "max_new_tokens": 48,
    },
}
METRICS = {
    "final_accuracy": "final held-out accuracy",
    "accuracy_gain": "accuracy gain (final - before)",
    "steps_to_threshold": "steps to threshold",
    "final_reward": "final clean reward (last 10% of steps)",
    "adv_var": "Var(A) across the batch (mean over steps)",
    "grad_noise": "gradient noise ratio grad_var / grad_mean_sq",
}
MODE_COLORS = {"kalman": "C3", "grpo": "C0", "dr_grpo": "C2", "batch_std": "C4"}


@dataclass
class Run:
    """One training of the grid."""

    condition: str
    mode: str
    seed: int
    flags: list[str]
    out: Path

    @property
    def key(self) -> str:
        return f"{self.condition}/{self.mode}/seed{self.seed}"


@dataclass
class Settings:
    """The study's grid and budget, from the command line."""

    modes: list[str]
    conditions: list[str]
    seeds: int
    max_steps: int
    prompts_per_step: int
    eval_size: int
    eval_steps: int
    max_new_tokens: int
    reward_noise: float
    reward_flip_rate: float
    threshold_gain: float
    generation_backend: str
    workers: int
    output: Path
    runs_dir: Path
    preset: str
    command: str
    model_sha256: str = field(default="")


# ------------------------------------------------------------------------------ statistics


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t confidence interval of the mean (NaN bounds if n < 2)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if x.size else math.nan
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def run_metrics(
    rows: list[dict[str, Any]], summary: dict[str, Any], max_steps: int, threshold_gain: float
) -> dict[str, Any]:
    """The study's metrics of one run from its metrics rows and summary (module docstring)."""
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    curve = [(0, before)] + [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    reached = [step for step, accuracy in curve[1:] if accuracy >= before + threshold_gain - 1e-9]
    clean = [r.get("reward_clean_mean", r["reward_mean"]) for r in rows]
    tail = max(1, math.ceil(0.1 * len(clean)))  # the last 10% of steps
    spread = [(r["grad_var"], r["grad_mean_sq"]) for r in rows if r.get("grad_var") is not None]
    mean_sq = sum(m for _, m in spread)
    return {
        "accuracy_before": before,
        "final_accuracy": after,
        "accuracy_gain": after - before,
        "steps_to_threshold": reached[0] if reached else max_steps,
        "censored": not reached,
        "final_reward": sum(clean[-tail:]) / tail,
        "adv_var": sum(r["adv_var"] for r in rows) / len(rows),
        "grad_noise": sum(v for v, _ in spread) / mean_sq if mean_sq > 0 else math.nan,
        "accuracy_curve": curve,
        "reward_curve": clean,
        "wall_time_s": summary["wall_time_s"],
    }


def _relative_pct(diff: tuple[float, float, float], base: float) -> tuple[float, float, float]:
    scale = 100 / base if base else math.nan
    return diff[0] * scale, diff[1] * scale, diff[2] * scale


def _format_number(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) < 1e-12:
        value = 0.0  # float round-off of an exact zero
    if abs(value) >= 1e5 or 0 < abs(value) < 10**-digits:
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}f}"


def _format_ci(ci: tuple[float, float, float], digits: int = 3, unit: str = "") -> str:
    mean, lo, hi = ci
    low, high = _format_number(lo, digits), _format_number(hi, digits)
    return f"{_format_number(mean, digits)}{unit} [{low}, {high}]"


def _verdict(ci: tuple[float, float, float], paper_sign: int) -> str:
    """Whether a paired difference's CI agrees in sign with the paper's claim."""
    _, lo, hi = ci
    if math.isnan(lo):
        return "inconclusive (too few pairs)"
    if lo > 0 or hi < 0:
        return "supports" if (lo > 0) == (paper_sign > 0) else "**contradicts**"
    return "inconclusive (95% CI includes 0)"


# ------------------------------------------------------------------------------ the grid


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_grid(settings: Settings) -> list[Run]:
    """Every run, seeds outermost so that a stopped study holds whole seeds."""
    runs = []
    for seed in range(settings.seeds):
        for condition in settings.conditions:
            difficulty, noise = condition.split("-")
            for mode in settings.modes:
                flags = [
                    "--adv_mode", mode,
                    "--seed", str(seed),
                    "--max_steps", str(settings.max_steps),
                    "--prompts_per_step", str(settings.prompts_per_step),
                    "--eval_size", str(settings.eval_size),
                    "--eval_steps", str(settings.eval_steps),
                    "--max_new_tokens", str(settings.max_new_tokens),
                    "--generation_backend", settings.generation_backend,
                    "--log_grad_variance",
                    "--save_steps", "0",
                    "--save_total_limit", "1",
                    "--torch_threads", "1",
                    *DIFFICULTIES[difficulty],
                ]  # fmt: skip
                if noise == "noisy":
                    flags += ["--reward_noise", str(settings.reward_noise)]
                    flags += ["--reward_flip_rate", str(settings.reward_flip_rate)]
                out = settings.runs_dir / condition / mode / f"seed{seed}"
                runs.append(Run(condition, mode, seed, flags, out))
    return runs


def _train_run(run: Run, model_sha256: str) -> tuple[int, float]:
    """Train one run in a subprocess; (exit status, seconds). Checkpoints are deleted."""
    if run.out.exists():
        shutil.rmtree(run.out)  # a killed run starts over
    run.out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "krpo_fast.cli", "train", *run.flags, "--output_dir", str(run.out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    t0 = time.perf_counter()
    with (run.out / "train.log").open("w") as log:
        exit_status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    for checkpoint in run.out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    if exit_status == 0:
        record = {"flags": run.flags, "model_sha256": model_sha256}
        (run.out / "study_run.json").write_text(json.dumps(record, indent=2) + "\n")
    return exit_status, time.perf_counter() - t0


def _is_done(run: Run, model_sha256: str) -> bool:
    """Whether the run finished earlier with the same flags and model (ValueError if not)."""
    if not (run.out / "summary.json").is_file() or not (run.out / "study_run.json").is_file():
        return False
    record = json.loads((run.out / "study_run.json").read_text())
    if record != {"flags": run.flags, "model_sha256": model_sha256}:
        raise ValueError(
            f"--runs_dir: {run.out} was trained with other flags or another model; "
            "remove it or pick another --runs_dir"
        )
    return True


def run_grid(runs: list[Run], settings: Settings) -> list[str]:
    """Train the runs not done yet, ``settings.workers`` at a time; return the failed runs' keys."""
    todo = [r for r in runs if not _is_done(r, settings.model_sha256)]
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} done already, {len(todo)} to train")
    lock, failed, finished = threading.Lock(), [], []

    def train_and_report(run: Run) -> None:
        exit_status, seconds = _train_run(run, settings.model_sha256)
        with lock:
            finished.append(run.key)
            status = (
                "ok"
                if exit_status == 0
                else f"FAILED (exit {exit_status}, see {run.out / 'train.log'})"
            )
            print(
                f"[{len(finished)}/{len(todo)}] {run.key}: {status} in {seconds:.0f} s", flush=True
            )
            if exit_status != 0:
                failed.append(run.key)

    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        list(pool.map(train_and_report, todo))
    return failed


# ------------------------------------------------------------------------------ the report


def _collect_run_metrics(runs: list[Run], settings: Settings) -> list[dict[str, Any]]:
    """Copy each run's small files into ``<output>/runs`` and compute its metrics there."""
    results = []
    for run in runs:
        dest = settings.output / "runs" / run.condition / run.mode / f"seed{run.seed}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "summary.json", "study_run.json"):
            if (run.out / name).resolve() != (dest / name).resolve():
                shutil.copyfile(run.out / name, dest / name)
        rows = [json.loads(line) for line in (dest / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((dest / "summary.json").read_text())
        metrics = run_metrics(rows, summary, settings.max_steps, settings.threshold_gain)
        results.append({"condition": run.condition, "mode": run.mode, "seed": run.seed, **metrics})
    return results


def _metric_by_run(
    results: list[dict[str, Any]], condition: str | None, mode: str, metric: str
) -> dict:
    """{(condition, seed): value} of one mode's runs (all conditions when None)."""
    return {
        (r["condition"], r["seed"]): r[metric]
        for r in results
        if r["mode"] == mode and condition in (None, r["condition"])
    }


def summary_table(results: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """Per condition and mode: mean and 95% CI of every metric, and censored counts."""
    table = []
    for condition in settings.conditions:
        for mode in settings.modes:
            runs = [r for r in results if r["condition"] == condition and r["mode"] == mode]
            row = {"condition": condition, "mode": mode, "n": len(runs)}
            for metric in METRICS:
                row[metric] = mean_ci([r[metric] for r in runs])
            row["censored"] = sum(r["censored"] for r in runs)
            table.append(row)
    return table


def paired_table(results: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """KRPO minus each other mode, paired by condition and seed, per condition and pooled."""
    rows: list[dict[str, Any]] = []
    if METHOD_UNDER_TEST not in settings.modes:
        return rows
    for other in [m for m in settings.modes if m != METHOD_UNDER_TEST]:
        for condition in [*settings.conditions, None]:
            for metric in METRICS:
                tested = _metric_by_run(results, condition, METHOD_UNDER_TEST, metric)
                compared = _metric_by_run(results, condition, other, metric)
                pairs = sorted(set(tested) & set(compared))
                diff = mean_ci([tested[k] - compared[k] for k in pairs])
                compared_mean = float(np.mean([compared[k] for k in pairs]))
                if metric == "accuracy_gain":
                    compared_mean = math.nan  # near 0 before any learning: a % says nothing
                rows.append(
                    {
                        "comparison": f"{METHOD_UNDER_TEST} - {other}",
                        "condition": condition or "all",
                        "metric": metric,
                        "n": len(pairs),
                        "diff": diff,
                        "relative_pct": _relative_pct(diff, compared_mean),
                    }
                )
        # Does KRPO's edge grow with noise? (noisy - clean) of the paired accuracy difference.
        noise_effects = []
        for difficulty in DIFFICULTIES:
            noisy, clean = f"{difficulty}-noisy", f"{difficulty}-clean"
            if noisy not in settings.conditions or clean not in settings.conditions:
                continue
            # Per condition and seed: final accuracy of the tested mode minus the other's.
            edge = {}
            for condition in (noisy, clean):
                tested = _metric_by_run(results, condition, METHOD_UNDER_TEST, "final_accuracy")
                compared = _metric_by_run(results, condition, other, "final_accuracy")
                edge[condition] = {key[1]: tested[key] - compared[key] for key in tested}
            seeds = sorted(set(edge[noisy]) & set(edge[clean]))
            noise_effects += [edge[noisy][seed] - edge[clean][seed] for seed in seeds]
        if noise_effects:
            rows.append(
                {
                    "comparison": f"({METHOD_UNDER_TEST} - {other}) noisy - clean",
                    "condition": "all",
                    "metric": "final_accuracy",
                    "n": len(noise_effects),
                    "diff": mean_ci(noise_effects),
                    "relative_pct": (math.nan,) * 3,
                }
            )
    return rows


def _write_plots(results: list[dict[str, Any]], settings: Settings) -> list[str]:
    """accuracy.png, reward.png and variance.png in the output folder; their names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ncols = min(2, len(settings.conditions))
    nrows = math.ceil(len(settings.conditions) / ncols)
    names = []
    for name, key, ylabel in (
        ("accuracy.png", "accuracy_curve", "held-out greedy accuracy"),
        ("reward.png", "reward_curve", "clean training reward (running mean)"),
    ):
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False)
        for ax, condition in zip(axes.flat, settings.conditions, strict=False):
            for mode in settings.modes:
                runs = [r for r in results if r["condition"] == condition and r["mode"] == mode]
                if key == "accuracy_curve":
                    steps = [st for st, _ in runs[0][key]]
                    curves = np.array([[a for _, a in r[key]] for r in runs])
                else:
                    window = max(1, settings.max_steps // 10)
                    kernel = np.ones(window) / window
                    curves = np.array([np.convolve(r[key], kernel, "valid") for r in runs])
                    steps = list(range(window, window + curves.shape[1]))
                cis = [mean_ci(curves[:, j]) for j in range(curves.shape[1])]
                color = MODE_COLORS[mode]
                ax.plot(steps, [c[0] for c in cis], color=color, label=mode, linewidth=1.8)
                if len(runs) > 1:
                    lo, hi = [c[1] for c in cis], [c[2] for c in cis]
                    if key == "accuracy_curve":  # an accuracy's interval stops at 0 and 1
                        lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
            ax.set_title(condition)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"mean over {settings.seeds} seeds, 95% t-interval band", fontsize=10)
        fig.tight_layout()
        fig.savefig(settings.output / name, dpi=90)
        plt.close(fig)
        names.append(name)

    table = summary_table(results, settings)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(settings.modes)
    for ax, metric in zip(axes, ("adv_var", "grad_noise"), strict=True):
        for i, mode in enumerate(settings.modes):
            rows = [r for r in table if r["mode"] == mode]
            means = [r[metric][0] for r in rows]
            err = [
                [m - r[metric][1] for m, r in zip(means, rows, strict=True)],
                [r[metric][2] - m for m, r in zip(means, rows, strict=True)],
            ]
            x = np.arange(len(rows)) + (i - (len(settings.modes) - 1) / 2) * width
            ax.bar(x, means, width, color=MODE_COLORS[mode], label=mode)
            if settings.seeds > 1:
                ax.errorbar(x, means, yerr=np.nan_to_num(err), fmt="none", ecolor="k", lw=0.8)
        ax.set_xticks(np.arange(len(settings.conditions)), settings.conditions)
        ax.set_yscale("log")
        ax.set_title(METRICS[metric], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(settings.output / "variance.png", dpi=90)
    plt.close(fig)
    return [*names, "variance.png"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _model_card() -> dict[str, Any]:
    path = bundled_model_path()
    card = json.loads((path / CONFIG_NAME).read_text()) if (path / CONFIG_NAME).is_file() else {}
    return {"recipe": card.get("recipe"), "results": card.get("results")}


def trainer_settings(flags: list[str]) -> Any:
    """The ``TrainConfig`` that ``krpo-fast train`` resolves from a run's flags (the
    trainer's defaults filled in): what the run actually used."""
    from krpo_fast.config import TrainConfig, parse_config

    return parse_config(TrainConfig, [*flags, "--output_dir", "-"], "krpo-fast train", "")


def write_report(
    results: list[dict[str, Any]], settings: Settings, invocations: list[dict[str, Any]]
) -> None:
    """README.md, study.json and the plots in ``settings.output``."""
    table, paired = summary_table(results, settings), paired_table(results, settings)
    plots = _write_plots(results, settings)
    model = _model_card()
    run_times = [r["wall_time_s"] for r in results]
    example = build_grid(settings)[-1]
    # Every run shares these; only the mode, seed, difficulty and noise flags differ.
    trainer = trainer_settings(example.flags)
    sequences_per_step = trainer.prompts_per_step * trainer.group_size
    micro_batch_size = trainer.micro_batch_size or sequences_per_step
    (settings.output / "study.json").write_text(
        json.dumps(
            {
                "command": settings.command,
                "settings": {
                    name: str(value) if isinstance(value, Path) else value
                    for name, value in vars(settings).items()
                },
                "group_size": trainer.group_size,
                "micro_batch_size": micro_batch_size,
                "model": {"path": str(bundled_model_path()), **model},
                "summary": table,
                "paired": paired,
                "runs": [
                    {k: v for k, v in r.items() if k not in ("accuracy_curve", "reward_curve")}
                    for r in results
                ],
            },
            indent=1,
        )
        + "\n"
    )
    lines = [
        "# GRPO vs KRPO on the bundled arithmetic task",
        "",
        "Generated by `krpo-fast study` (krpo_fast/study.py); every number below comes "
        "from the per-run files in `runs/` (`study.json` holds the same tables).",
        "",
        "## Setup",
        "",
        f"- Command: `{settings.command}`",
        "- Rebuild this report from `runs/` alone: "
        f"`{settings.command} --runs_dir {settings.output}/runs`",
        f"- Seeds: {', '.join(map(str, range(settings.seeds)))} (the same seeds for every mode: "
        "paired comparisons)",
        f"- Modes: {', '.join(settings.modes)}; conditions: {', '.join(settings.conditions)}",
        f"- Model: bundled `krpo_fast/assets/tiny_llama`, model.safetensors sha256 "
        f"`{settings.model_sha256}`; its recipe `{json.dumps(model['recipe'])}`; "
        f"its results `{json.dumps(model['results'])}`",
        "- Difficulty: `easy` = the bundled model's task (2 terms of 1-2 digits, `+-`); "
        "`hard` = two-digit terms only (`--num_digits_min 2`)",
        f"- Reward noise (`noisy` conditions, training rewards only, after the graded reward "
        f"function): label flips r -> 1 - r with probability {settings.reward_flip_rate}, then "
        f"Gaussian noise of std {settings.reward_noise}",
        f"- Budget per run: {settings.max_steps} steps x {trainer.prompts_per_step} prompts x "
        f"{trainer.group_size} completions (group size), held-out accuracy on "
        f"{settings.eval_size} prompts every {settings.eval_steps} steps, max "
        f"{settings.max_new_tokens} new tokens; every other setting is the trainer's default",
        f"- One run's flags: `krpo-fast train {' '.join(example.flags)} --output_dir DIR`",
        f"- Machine: {_cpu_name()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {settings.workers} runs at a time, "
        "1 torch thread each",
        f"- Training wall time: {sum(i['wall_s'] for i in invocations):.0f} s over "
        f"{len(invocations)} invocation(s) that trained runs (`runs/invocations.jsonl`: runs "
        "trained, seconds, 1-minute load average at start and end: "
        + "; ".join(
            f"{i['trained']} runs, {i['wall_s']:.0f} s, load {i['load_average'][0]:.1f} -> "
            f"{i['load_average'][1]:.1f}"
            for i in invocations
        )
        + f"); one run took "
        f"{_format_ci(mean_ci(run_times), 0)} s (mean [95% CI] of its trainer wall time, "
        f"{len(run_times)} runs)",
        "",
        "## Metrics",
        "",
        "- **final held-out accuracy**: greedy exact-match accuracy on the seed's held-out "
        "split after the last step; **accuracy gain** = that minus the accuracy before "
        "training (identical across modes for a seed and condition).",
        f"- **steps to threshold**: first evaluated step (every {settings.eval_steps}) whose "
        "held-out accuracy is at least the run's accuracy before training + "
        f"{settings.threshold_gain}; a run that never reaches it counts as "
        f"{settings.max_steps} (censored: a lower bound; the table gives how many).",
        "- **final clean reward**: mean graded reward before noise over the last 10% of steps.",
        "- **Var(A)**: per step, the unbiased variance of the advantages over the batch's "
        "sequences, averaged over steps. Not scale-free: Kalman advantages divide by the "
        "filter's sqrt(P) instead of the group std and are about 10x larger than GRPO's.",
        "- **gradient noise ratio**: per optimizer step the trainer splits the batch into "
        f"micro-batches of {micro_batch_size} sequences and measures `grad_var`, the trace of "
        "the covariance of the micro-batch policy-gradient estimates, and `grad_mean_sq`, the "
        "squared norm of their mean; the ratio is mean over steps of `grad_var` / mean over "
        "steps of `grad_mean_sq`. It does not change when the advantages are rescaled, so "
        "it compares estimators fairly: the variance of the per-token policy-gradient "
        "estimate relative to its signal.",
        "- Confidence intervals: 95% Student-t intervals over seeds (`scipy.stats.t`). Paired "
        "differences are taken per (condition, seed); relative % = mean difference / the "
        "other mode's mean x 100 (the denominator's own uncertainty is ignored).",
        "",
        "## Results per condition and mode (mean [95% CI])",
        "",
        "| condition | mode | n | " + " | ".join(METRICS.values()) + " |",
        "|" + "---|" * (3 + len(METRICS)),
    ]
    for row in table:
        cells = [
            _format_ci(row[m], 1) + f" ({row['censored']} censored)"
            if m == "steps_to_threshold"
            else _format_ci(row[m])
            for m in METRICS
        ]
        lines.append(
            f"| {row['condition']} | {row['mode']} | {row['n']} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Paired differences (mean [95% CI], and relative %)",
        "",
        "| comparison | condition | metric | pairs | difference | relative % |",
        "|---|---|---|---|---|---|",
    ]
    for row in paired:
        rel = "" if math.isnan(row["relative_pct"][0]) else _format_ci(row["relative_pct"], 1, "%")
        lines.append(
            f"| {row['comparison']} | {row['condition']} | {METRICS[row['metric']]} | "
            f"{row['n']} | {_format_ci(row['diff'])} | {rel} |"
        )
    lines += ["", *_claims_section(paired), "", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in plots]
    (settings.output / "README.md").write_text("\n".join(lines) + "\n")


def _claims_section(paired: list[dict[str, Any]]) -> list[str]:
    """The paper's claims next to the pooled KRPO - GRPO rows of the paired table."""
    pooled = {(r["comparison"], r["metric"]): r for r in paired if r["condition"] == "all"}
    lines = [
        "## Paper claims vs this study",
        "",
        "KRPO minus GRPO, pooled over all conditions and seeds (the `all` rows above). The "
        "verdict reads the sign of the 95% CI of the paired difference: it supports the "
        "claim when the whole interval lies on the paper's side of 0, contradicts it when "
        "it lies on the other side, and is inconclusive when it includes 0. Steps to threshold "
        "counts a run that never reaches the threshold as the step budget (censored runs: "
        "see the results table), so its difference is one between lower bounds.",
        "",
        "| claim (paper) | metric here | KRPO - GRPO | relative % | verdict |",
        "|---|---|---|---|---|",
    ]
    claims = [
        ("advantage variance -32%", "adv_var", -1),
        ("advantage variance -32%", "grad_noise", -1),
        ("reasoning accuracy +4.7%", "final_accuracy", 1),
        ("21% faster convergence", "steps_to_threshold", -1),
    ]
    for claim, metric, sign in claims:
        row = pooled.get(("kalman - grpo", metric))
        if row is None:
            continue
        rel = "" if math.isnan(row["relative_pct"][0]) else _format_ci(row["relative_pct"], 1, "%")
        lines.append(
            f"| {claim} | {METRICS[metric]} | {_format_ci(row['diff'])} | {rel} | "
            f"{_verdict(row['diff'], sign)} |"
        )
    row = pooled.get(("(kalman - grpo) noisy - clean", "final_accuracy"))
    if row is not None:
        lines.append(
            f"| helps most with noisy rewards | (KRPO - GRPO final accuracy) noisy minus clean "
            f"| {_format_ci(row['diff'])} | | {_verdict(row['diff'], 1)} |"
        )
    return lines


# ------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="krpo-fast study",
        description="GRPO-vs-KRPO study: train the bundled model with each advantage mode "
        "over seeds, two task difficulties, clean and noisy rewards; write a Markdown report "
        "with plots, tables and the paper's claims checked into --output.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test budget (2 seeds, 8 steps)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="report folder (default bench/results/study, bench/results/study/quick with --quick)",
    )
    parser.add_argument(
        "--runs_dir",
        type=Path,
        default=None,
        help="training runs (default runs/study, runs/study-quick with --quick)",
    )
    parser.add_argument("--workers", type=int, default=2, help="trainings at a time (default 2)")
    parser.add_argument(
        "--modes",
        default="kalman,grpo,dr_grpo",
        help="comma-separated "
        f"advantage modes from {', '.join(MODES)} (default kalman,grpo,dr_grpo)",
    )
    parser.add_argument(
        "--conditions",
        default=",".join(CONDITIONS),
        help=f"comma-separated, from {', '.join(CONDITIONS)} (default all)",
    )
    parser.add_argument(
        "--reward_noise",
        type=float,
        default=0.3,
        help="Gaussian reward-noise std in the noisy conditions (default 0.3)",
    )
    parser.add_argument(
        "--reward_flip_rate",
        type=float,
        default=0.1,
        help="label-flip rate in the noisy conditions (default 0.1)",
    )
    parser.add_argument(
        "--threshold_gain",
        type=float,
        default=0.05,
        help="steps to threshold: accuracy before training + this (default 0.05)",
    )
    parser.add_argument(
        "--generation_backend",
        choices=("hf", "vllm", "auto"),
        default="hf",
        help="the trainer's generation backend (default hf: no engine start-up)",
    )
    for knob in PRESETS["full"]:
        parser.add_argument(
            f"--{knob}",
            type=int,
            default=None,
            help=f"default {PRESETS['full'][knob]} ({PRESETS['quick'][knob]} with --quick)",
        )
    return parser


def parse_settings(argv: list[str]) -> Settings:
    """Settings from the command line (ValueError naming the bad flag)."""
    args = _parser().parse_args(argv)
    preset = "quick" if args.quick else "full"
    budget = {
        knob: default if getattr(args, knob) is None else getattr(args, knob)
        for knob, default in PRESETS[preset].items()
    }
    modes = [m for m in args.modes.split(",") if m]
    conditions = [c for c in args.conditions.split(",") if c]
    for flag, chosen, allowed in (("modes", modes, MODES), ("conditions", conditions, CONDITIONS)):
        bad = [c for c in chosen if c not in allowed]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"--{flag}: got {','.join(chosen) or 'nothing'}; give distinct values from "
                f"{', '.join(allowed)}"
            )
    if budget["seeds"] < 2:
        raise ValueError(f"--seeds must be >= 2 (confidence intervals), got {budget['seeds']}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    for knob in ("max_steps", "prompts_per_step", "eval_size", "eval_steps", "max_new_tokens"):
        if budget[knob] < 1:
            raise ValueError(f"--{knob} must be >= 1, got {budget[knob]}")
    if args.reward_noise < 0 or not 0 <= args.reward_flip_rate <= 1:
        raise ValueError("--reward_noise must be >= 0 and --reward_flip_rate in [0, 1]")
    default_out = "bench/results/study" + ("/quick" if args.quick else "")
    default_runs = "runs/study" + ("-quick" if args.quick else "")
    return Settings(
        modes=modes,
        conditions=conditions,
        **budget,
        reward_noise=args.reward_noise,
        reward_flip_rate=args.reward_flip_rate,
        threshold_gain=args.threshold_gain,
        generation_backend=args.generation_backend,
        workers=args.workers,
        output=args.output or Path(default_out),
        runs_dir=args.runs_dir or Path(default_runs),
        preset=preset,
        command=" ".join(["krpo-fast", "study", *argv]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``krpo-fast study [--quick] [flags]``: train the grid, then write the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_settings(argv)
        settings.model_sha256 = _file_sha256(bundled_model_path() / "model.safetensors")
        started, load_start = time.perf_counter(), os.getloadavg()[0]
        runs = build_grid(settings)
        trained = sum(not _is_done(r, settings.model_sha256) for r in runs)
        failed = run_grid(runs, settings)
        log = settings.runs_dir / "invocations.jsonl"
        if trained:  # how long the training took, over every invocation that trained
            entry = {
                "command": settings.command,
                "trained": trained,
                "failed": len(failed),
                "wall_s": round(time.perf_counter() - started, 1),
                "load_average": [load_start, os.getloadavg()[0]],
            }
            with log.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if failed:
            raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        (settings.output / "runs").mkdir(parents=True, exist_ok=True)
        if log.is_file() and log.resolve() != (settings.output / "runs" / log.name).resolve():
            shutil.copyfile(log, settings.output / "runs" / log.name)
        results = _collect_run_metrics(runs, settings)
        copied = settings.output / "runs" / log.name
        lines = copied.read_text().splitlines() if copied.is_file() else []
        invocations = [json.loads(line) for line in lines]
        write_report(results, settings, invocations)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    print(f"study report: {settings.output / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
