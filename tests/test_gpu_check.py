"""bench/gpu_check.py: its CPU smoke mode runs every section end to end, and its
guards record a failing or overrunning section and go on, so the one-command GPU check
is not found broken on the day a GPU is available."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPT = BENCH / "gpu_check.py"
SECTIONS = [
    "device",
    "kernel_tests",
    "kernel_parity",
    "group_advantages",
    "policy_loss",
    "loss_from_logits",
    "loss_from_hidden",
    "shared_prefix",
    "trainer",
]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU smoke mode, on any machine
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_smoke_mode_runs_every_section_and_writes_the_report(tmp_path):
    done = run_script("--smoke", "--output", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("README.md", "results.json", "kernel_tests.log", "trainer.log"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "results.json").read_text())
    statuses = {s["section"]: s["status"] for s in data["sections"]}
    assert list(statuses) == SECTIONS
    # Nothing may crash, fail or time out on CPU; "unavailable" is an optional peer.
    broken = {s["section"]: s.get("traceback", s["note"]) for s in data["sections"]}
    broken = {k: v for k, v in broken.items() if statuses[k] not in ("ok", "unavailable")}
    assert not broken, broken
    readme = (tmp_path / "README.md").read_text()
    assert "**Smoke run** on CPU" in readme
    for section in data["sections"]:
        assert f"| {section['section']} | {section['title']} | {section['status']} |" in readme

    assert data["kernel_tests"]["counts"].get("PASSED", 0) >= 1
    assert data["kernel_tests"]["failures"] == []
    assert data["kernel_parity"] and all(p["ok"] for p in data["kernel_parity"])
    rows = [r["row"] for r in data["rows"]]
    expected = 5 if statuses["shared_prefix"] == "ok" else 4
    assert len(rows) == expected, rows
    for row in data["rows"]:
        assert row["impls"]["krpo-fast"]["time_s"] > 0
        assert row["goal_met"] is None  # a smoke run judges no goal
        assert f"| {row['row']} |" in readme
    runs = data["trainer"]
    assert runs and all(run["steps"] == 2 and run["tokens_per_s"] > 0 for run in runs)
    assert all(run["logprob_tokens_per_s"] > 0 for run in runs)


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # its sibling imports: harness, eager
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # it sets it; restored after
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up
    spec.loader.exec_module(module)
    return module


def test_a_failing_or_overrunning_section_is_recorded_and_the_check_goes_on(
    gpu_check, monkeypatch, tmp_path
):
    def planted_error(check):
        raise ValueError("planted failure")

    def overrun(check):
        time.sleep(30)
        return "never reached"

    for name, fn, limit in (
        ("planted", planted_error, 60),
        ("overrun", overrun, 0.5),
        ("fine", lambda check: "done", 60),
    ):
        monkeypatch.setitem(gpu_check.SECTIONS, name, fn)
        monkeypatch.setitem(gpu_check.SECTION_LIMITS, name, limit)
        monkeypatch.setitem(gpu_check.SECTION_TITLES, name, name)
    args = argparse.Namespace(smoke=True, output=tmp_path, budget_s=60.0, trainer_steps=0)
    check = gpu_check.Check(args, tmp_path / "work")
    started = time.monotonic()
    for name in ("planted", "overrun", "fine"):
        gpu_check.run_section(check, name)
    assert time.monotonic() - started < 10
    by_name = {s["section"]: s for s in check.sections}
    assert by_name["planted"]["status"] == "error"
    assert "ValueError: planted failure" in by_name["planted"]["note"]
    assert "planted_error" in by_name["planted"]["traceback"]
    assert by_name["overrun"]["status"] == "timeout"
    assert by_name["fine"]["status"] == "ok" and by_name["fine"]["note"] == "done"

    gpu_check.write_report(check, {"device": "test", "command": "x", "date": "d", "versions": {}})
    readme = (tmp_path / "README.md").read_text()
    assert "## Errors" in readme and "planted failure" in readme


def test_without_a_gpu_only_the_smoke_mode_runs(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "CUDA", False)
    assert gpu_check.main(["--output", str(tmp_path)]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_the_global_budget_skips_what_remains(gpu_check, tmp_path):
    args = argparse.Namespace(smoke=True, output=tmp_path, budget_s=1.0, trainer_steps=0)
    check = gpu_check.Check(args, tmp_path / "work")
    gpu_check.run_section(check, "trainer")
    (record,) = check.sections
    assert record["status"] == "skipped"
    assert "time budget spent" in record["note"]
    assert check.trainer_runs == []
