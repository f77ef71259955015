"""The benchmark runner end to end at its tiniest settings, the eager peers
(bench/eager.py) against the paper oracles they are timed beside, and ``krpo-fast
bench`` with and without a checkout's bench/ folder."""

import sys
from pathlib import Path

import pytest
import torch

from krpo_fast import cli
from krpo_fast.reference import (
    group_advantages_reference,
    policy_loss_reference,
    token_logprobs_reference,
)

# The harness and the eager peers are bench/ modules, not part of the package.
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH_DIR))
import harness as bench  # noqa: E402
from eager import (  # noqa: E402
    group_advantages_eager,
    krpo_loss_eager,
    policy_loss_from_hidden_eager,
    selective_log_softmax_eager,
)


def test_bench_runs_end_to_end(tmp_path):
    readme = bench.run(
        ops=["advantages", "policy_loss"],
        quick=True,
        out=tmp_path,
        impls=["paper", "eager", "krpo-fast"],
        pytest_args=["--benchmark-max-time=0.001", "--benchmark-min-rounds=1"],
    )
    assert readme == tmp_path / "README.md"
    text = readme.read_text()
    assert "CPU-only machine: these are the CPU paths" in text
    assert "| advantages | kalman | 64x8 | float32 |" in text
    assert "| policy_loss | fwd+bwd | 8x1024 | float32 |" in text
    rows, skips, runs = bench.collect(tmp_path)
    assert not skips
    assert runs[0]["command"] == (
        "OMP_NUM_THREADS=1 krpo-fast bench --ops advantages policy_loss "
        "--impls paper eager krpo-fast --quick"
    )
    # 4 modes x 3 impls, and 2 passes x 3 impls
    assert len(rows) == 12 + 6
    assert {r["impl"] for r in rows} == {"paper", "eager", "krpo-fast"}
    assert all(r["time_s"] > 0 for r in rows)
    assert (tmp_path / "advantages.png").stat().st_size > 0
    assert (tmp_path / "policy_loss.png").stat().st_size > 0
    assert [p.name for p in tmp_path.glob("*.json")] == [
        "benchmark-advantages-policy_loss-paper-eager-krpo-fast-quick.json"
    ]
    # A later partial run replaces the rows it measured and keeps the others.
    bench.run(["advantages"], True, tmp_path, ["eager"], ["--benchmark-max-time=0.001"])
    merged, _, runs = bench.collect(tmp_path)
    assert len(merged) == len(rows) and len(runs) == 2
    eager_kalman = [r for r in merged if r["impl"] == "eager" and r["mode"] == "kalman"]
    assert eager_kalman[0]["time_s"] != next(
        r["time_s"] for r in rows if r["impl"] == "eager" and r["mode"] == "kalman"
    )


def test_bench_rejects_unknown_op(tmp_path):
    with pytest.raises(ValueError, match="unknown op"):
        bench.run(ops=["nope"], out=tmp_path)


def test_cli_bench_finds_the_checkout_harness(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "bench/results/<device>" in capsys.readouterr().out


def test_cli_bench_without_bench_folder_says_what_is_missing(tmp_path, monkeypatch, capsys):
    # An installed wheel: the package sits in site-packages with no bench/ beside it.
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "krpo_fast" / "cli.py"))
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "needs the bench/ folder of a krpo-fast checkout" in err
    assert str(tmp_path / "bench") in err


def test_cli_bench_without_pytest_benchmark_says_what_to_install(monkeypatch, capsys):
    # A checkout installed with `pip install -e .` alone: the harness is there, its
    # test runner is not.
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "pytest_benchmark" else real(name, *args),
    )
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err == "error: krpo-fast bench needs pytest-benchmark: pip install -e '.[bench]'\n"


@pytest.mark.parametrize("mode", ["kalman", "grpo", "dr_grpo", "batch_std"])
def test_eager_advantages_match_paper(mode):
    rewards = torch.rand(12 * 16, generator=torch.Generator().manual_seed(1))
    expected = group_advantages_reference(
        rewards, group_size=16, mode=mode, compute_dtype=torch.float64
    )
    got = group_advantages_eager(rewards, group_size=16, mode=mode)
    torch.testing.assert_close(got, expected)


def _loss_inputs(B, T, gen):
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + 0.1 * torch.randn(B, T, generator=gen)
    ref = logp + 0.1 * torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[1] = False  # an all-masked sequence contributes 0
    return logp, old, ref, mask


def test_eager_krpo_loss_matches_paper():
    gen = torch.Generator().manual_seed(2)
    logp, old, ref, mask = _loss_inputs(8, 9, gen)
    rewards = (torch.rand(8, generator=gen) > 0.5).float()
    adv = group_advantages_reference(rewards, group_size=4)
    leaf = logp.clone().requires_grad_()
    expected, _ = policy_loss_reference(leaf, old, ref, adv, mask)
    got = krpo_loss_eager(logp.requires_grad_(), old, ref, rewards, mask, group_size=4)
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got, logp)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    torch.testing.assert_close(grad, expected_grad)


def test_eager_logits_paths_match_paper():
    gen = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 5, 8, 50
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    logits = hidden @ weight.T
    torch.testing.assert_close(
        selective_log_softmax_eager(logits, ids, temperature=0.7),
        token_logprobs_reference(logits, ids, temperature=0.7),
    )
    _, old, ref, mask = _loss_inputs(B, T, gen)
    adv = torch.randn(B, generator=gen)
    expected, _ = policy_loss_reference(token_logprobs_reference(logits, ids), old, ref, adv, mask)
    got = policy_loss_from_hidden_eager(hidden, weight, ids, old, ref, adv, mask)
    torch.testing.assert_close(got, expected)


def _gpu_row(impl, seconds, floor_bytes, **extra):
    rates = {"bandwidth": 3e12, "bf16_flops": 8e14, "launch_s": 4e-6}
    return dict(
        op="policy_loss",
        impl=impl,
        mode="fwd",
        shape="4096x1024",
        dtype="float32",
        floor_bytes=floor_bytes,
        floor_flops=0.0,
        time_s=seconds,
        launches=1,
        peak_bytes=2**20,
        **rates,
        **extra,
    )


def test_gpu_report_share_of_floor_and_launch_floor():
    # 300 MB at 3 TB/s: a 100 us floor; krpo-fast at 200 us reaches 50% of it.
    big = [_gpu_row("eager", 1e-3, 300_000_000), _gpu_row("krpo-fast", 2e-4, 300_000_000)]
    table = bench.markdown_table(big)
    assert "| 5.0x |" in table and "100.0 us (bytes) | 50% | 1 | 1.0 |" in table
    # Below 64 MiB the floor is one launch (4 us): 20 us is 20% of it.
    small = [_gpu_row("krpo-fast", 2e-5, 1_000_000)]
    assert "4.0 us (1 launch) | 20% |" in bench.markdown_table(small)
    # The LM-head path: FLOPs over the bf16 rate whatever the bytes.
    flops = [dict(_gpu_row("krpo-fast", 2e-3, 1_000), floor_flops=8e11)]
    assert "1.00 ms (bf16 FLOPs) | 50% |" in bench.markdown_table(flops)
