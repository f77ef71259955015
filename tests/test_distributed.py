"""torchrun data parallelism on CPU (gloo): gradients, and the trainer end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_grads import step_gradients

from krpo_fast.cli import main
from krpo_fast.tiny_model import bundled_model_path

TESTS = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}


def _torchrun(args, cwd, ok=True):
    result = subprocess.run(
        [*TORCHRUN, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_rank_gradients_equal_single_process(tmp_path, mode):
    out = tmp_path / "grads.pt"
    _torchrun([str(TESTS / "distributed_grads.py"), str(out), mode], tmp_path)
    saved = torch.load(out)
    assert saved["world"] == 2
    want = step_gradients(rank=0, world=1, fsdp=False)
    assert saved["grads"].keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 0
    for name, g in want.items():
        torch.testing.assert_close(saved["grads"][name], g, rtol=1e-4, atol=1e-6 * scale)


TINY = [
    "--model",
    str(bundled_model_path()),
    "--prompts_per_step",
    "4",
    "--group_size",
    "4",
    "--max_new_tokens",
    "40",
    "--eval_size",
    "6",
    "--train_size",
    "50",
    "--generation_backend",
    "hf",
    "--save_total_limit",
    "0",
]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_train_checkpoints_once_and_resumes_on_one_rank(tmp_path, fsdp):
    out = tmp_path / "run"
    args = [*TINY, "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out)]
    _torchrun(["-m", "krpo_fast.cli", "train", *args, *(["--fsdp"] if fsdp else [])], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer
    assert all(r["completion_len"] > 0 for r in rows)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    # The 2-rank checkpoint resumes in one process and trains on.
    shutil.rmtree(out / "checkpoint-2")
    resumed = [*args, "--max_steps", "3", "--resume"]
    assert main(["train", *resumed]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    state = torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["optimizer"]["state"]


def test_prompts_must_divide_over_ranks(tmp_path):
    args = [*TINY, "--prompts_per_step", "3", "--output_dir", str(tmp_path / "run")]
    result = _torchrun(["-m", "krpo_fast.cli", "train", *args], tmp_path, ok=False)
    assert "--prompts_per_step 3 must be divisible by the number of ranks (2)" in result.stderr
