"""CPU: the vectorised group-advantage path against the paper's per-element loop.

Run: ``OMP_NUM_THREADS=1 python bench/bench_advantages_cpu.py [--groups 512 --group-size 16]``.
Both run side by side in one process on the same rewards; the ratio of medians is
what to read (absolute CPU times say nothing about a GPU). Writes a Markdown table
to bench/results/cpu/advantages.md.
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["TRITON_INTERPRET"] = "0"  # time the vectorised torch path, not the interpreter

import torch  # noqa: E402

from krpo_fast import group_advantages  # noqa: E402
from krpo_fast.reference import group_advantages_reference  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (builds and caches the Kalman coefficients)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/cpu/advantages.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(args.groups * args.group_size, generator=gen) > 0.5).float()

    rows = []
    for mode in ("kalman", "grpo", "dr_grpo", "batch_std"):
        paper = median_seconds(
            lambda m=mode: group_advantages_reference(rewards, args.group_size, mode=m),
            max(1, args.repeats // 2),
        )
        fast = median_seconds(
            lambda m=mode: group_advantages(rewards, args.group_size, mode=m), args.repeats * 20
        )
        rows.append((mode, paper, fast))

    header = (
        f"# Group advantages on CPU: vectorised torch vs the paper's loop\n\n"
        f"{args.groups} groups x {args.group_size}, float32 0/1 rewards, 1 thread, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}.\n"
        f"Command: `OMP_NUM_THREADS=1 python bench/bench_advantages_cpu.py "
        f"--groups {args.groups} --group-size {args.group_size}`\n\n"
        "| mode | paper loop (ms) | krpo-fast CPU path (ms) | speed-up |\n"
        "|---|---:|---:|---:|\n"
    )
    table = "".join(
        f"| {mode} | {paper * 1e3:.2f} | {fast * 1e3:.3f} | {paper / fast:.0f}x |\n"
        for mode, paper, fast in rows
    )
    print(header + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + table)


if __name__ == "__main__":
    main()
