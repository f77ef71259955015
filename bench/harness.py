"""Benchmark suite runner (``krpo-fast bench``) and the helpers the bench files share.

The suite is this folder's pytest-benchmark files; they import this module and
``eager.py`` as siblings (pytest and ``python bench/<file>.py`` both put the folder on
the import path), and ``krpo-fast bench`` loads it from a checkout's ``bench/``. Every op
is timed for every implementation that does the same work, side by side in one
process:

- ``paper``: the paper-faithful eager oracles in ``krpo_fast.reference``;
- ``eager``: the vectorised eager PyTorch in ``bench/eager.py``;
- ``compile``: ``torch.compile`` of that eager code;
- ``krpo-fast``: the public op (compiled Triton on CUDA; on CPU its vectorised torch
  path: the Triton interpreter is never timed, ``TRITON_INTERPRET=0`` is forced);
- ``liger``: Liger-Kernel's ``triton_grpo_loss`` / ``LigerFusedLinearGRPOLoss`` with
  their defaults set to ours (``triton_grpo_loss`` on CUDA only: on CPU its Triton
  kernel needs the interpreter; the fused-linear loss is torch and runs anywhere).

On CUDA, times are device-event medians (``triton.testing.do_bench``) over rotating
input sets, peak memory comes from the CUDA allocator and kernel launches are
counted with torch.profiler; each row carries its floor (bytes over the measured copy
bandwidth, or LM-head FLOPs over the measured bf16 matmul rate) and the achieved share
of it. On CPU, times are pytest-benchmark medians and there is no floor.

``run`` starts pytest on ``bench/`` in a subprocess (so the environment is set before
torch and Triton are imported), then writes into ``bench/results/<device>/``: the
pytest-benchmark JSON, a Markdown table (README.md) and PNG plots.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["IMPLS", "OPS", "main", "run", "run_case"]

OPS = (
    "advantages",
    "policy_loss",
    "krpo_loss",
    "selective_log_softmax",
    "loss_from_logits",
    "lm_head",
)
IMPLS = ("paper", "eager", "compile", "krpo-fast", "liger")
# Below this many bytes moved a GPU kernel is launch-bound (docs/design.md).
SHARE_OF_FLOOR_MIN_BYTES = 64 * 2**20
BENCH_DIR = Path(__file__).resolve().parent
ENV_QUICK, ENV_IMPLS, ENV_SKIPS = "KRPO_BENCH_QUICK", "KRPO_BENCH_IMPLS", "KRPO_BENCH_SKIPS"

# ------------------------------------------------------------------------------ the sweep


def quick() -> bool:
    """Whether the suite runs its smallest sizes only (``--quick``)."""
    return os.environ.get(ENV_QUICK) == "1"


def impls(*available: str) -> list[str]:
    """The implementations an op offers, filtered by the runner's ``impls`` argument."""
    wanted = os.environ.get(ENV_IMPLS)
    return [i for i in available if not wanted or i in wanted.split(",")]


def dtype_id(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (test ids)."""
    return str(dtype).removeprefix("torch.")


def dtypes() -> list[torch.dtype]:
    """float32 and bf16; float32 only with ``--quick``."""
    return [torch.float32] if quick() else [torch.float32, torch.bfloat16]


def sizes(op: str) -> list[tuple[int, ...]]:
    """The shapes swept for ``op``: the full sweep on CUDA, modest sizes on CPU (the run
    must finish in minutes on 2 cores), the smallest only with ``--quick``.

    advantages: (n_groups, G); policy_loss / krpo_loss: (B, T) token log-probs;
    selective_log_softmax / loss_from_logits: (B, T, V); lm_head: (B, T, H, V).
    """
    gpu = torch.cuda.is_available()
    table: dict[str, list[tuple[int, ...]]] = {
        "advantages": [(64, 8), (512, 16), (4096, 16)],
        "policy_loss": [(8, 1024), (256, 1024), (4096, 1024)] if gpu else [(8, 1024), (64, 1024)],
        "selective_log_softmax": (
            [(8, 1024, v) for v in (32_000, 128_256, 151_936)]
            + [(32, 1024, v) for v in (32_000, 128_256, 151_936)]
            if gpu
            else [(1, 128, 32_000), (1, 128, 151_936)]
        ),
        "lm_head": (
            [(b, 1024, 4096, 32_000) for b in (8, 32)]
            + [(b, 1024, 4096, 128_256) for b in (8, 32)]
            + [(b, 1024, 3584, 151_936) for b in (8, 32)]
            if gpu
            else [(1, 128, 128, 32_000), (1, 128, 128, 151_936)]
        ),
    }
    table["krpo_loss"] = table["policy_loss"]
    table["loss_from_logits"] = table["selective_log_softmax"]
    return table[op][:1] if quick() else table[op]


def shape_id(shape: Sequence[int]) -> str:
    """``(512, 16)`` -> ``"512x16"``."""
    return "x".join(str(s) for s in shape)


# ------------------------------------------------------------------------------ devices


def device() -> torch.device:
    """CUDA when there is a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """A folder name for the results: the GPU's name slugified, or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


@cache
def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, one wrapper per function so its graphs are reused.

    The sweep needs a graph per shape, dtype and grad mode: the recompile limit is
    raised, and hitting it fails instead of silently timing eager code. On CUDA every
    shape gets its own static graph (the fastest kernels); on CPU shapes go dynamic
    after the first recompile (static graphs for every size take minutes to build)."""
    import torch._dynamo

    config = torch._dynamo.config
    # Older torch names the limits cache_size_limit; newer keeps those as aliases.
    for name, value in (
        ("recompile_limit", 1024),
        ("cache_size_limit", 1024),
        ("accumulated_recompile_limit", 8192),
        ("accumulated_cache_size_limit", 8192),
        ("fail_on_recompile_limit_hit", True),
        ("fail_on_cache_limit_hit", True),
    ):
        if hasattr(config, name):
            setattr(config, name, value)
    return torch.compile(fn, dynamic=False if torch.cuda.is_available() else None)


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the benchmark device (inputs are made where they are used:
    gigabytes of logits drawn on the host and copied would dominate the run)."""
    return torch.Generator(device()).manual_seed(seed)


@cache
def gpu_rates() -> dict[str, float]:
    """Measured once per process: copy bandwidth (bytes/s, a 1 GiB device-to-device
    copy counts read + write), dense bf16 matmul rate (FLOP/s, 8192^3) and the time of
    one tiny kernel launch (s)."""
    from triton.testing import do_bench

    def median_s(fn: Callable[..., Any], *args: torch.Tensor) -> float:
        return do_bench(lambda: fn(*args), return_mode="median") * 1e-3

    copy_bytes, n = 2**30, 8192
    src = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    copy_s = median_s(torch.Tensor.copy_, torch.empty_like(src), src)
    mm_s = median_s(torch.mm, *torch.randn(2, n, n, device="cuda", dtype=torch.bfloat16))
    launch_s = median_s(torch.Tensor.add_, torch.zeros(1, device="cuda"), torch.ones(()))
    return {
        "bandwidth": 2 * copy_bytes / copy_s,
        "bf16_flops": 2 * n**3 / mm_s,
        "launch_s": launch_s,
    }


def _count_launches(fn: Callable[[], Any]) -> int:
    """CUDA kernels (and memcpy/memset) one call of ``fn`` puts on the device."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def rotation(set_bytes: int) -> int:
    """How many input sets to cycle through so that together they overflow the L2
    cache (at most 8; 1 on CPU, where pytest-benchmark times a fixed input)."""
    if not torch.cuda.is_available():
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(8, math.ceil(4 * l2 / max(set_bytes, 1))))


# ------------------------------------------------------------------------- one benchmark


def run_case(
    benchmark: Any,
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    *,
    op: str,
    impl: str,
    mode: str,
    shape: Sequence[int],
    dtype: torch.dtype | str,
    floor_bytes: int,
    floor_flops: float = 0.0,
) -> None:
    """Time ``fn(inputs[i])`` and record the row in ``benchmark.extra_info``.

    ``mode`` names the pass ("fwd", "fwd+bwd") or the variant; ``floor_bytes`` is what
    the op must move (each input read once, each output written once) and
    ``floor_flops`` the matmul work of the LM-head path (0 elsewhere). A CUDA
    out-of-memory error skips the row.
    """
    import pytest

    info = benchmark.extra_info
    info.update(
        op=op,
        impl=impl,
        mode=mode,
        shape=shape_id(shape),
        dtype=dtype_id(dtype) if isinstance(dtype, torch.dtype) else dtype,
        floor_bytes=int(floor_bytes),
        floor_flops=float(floor_flops),
    )
    t0 = time.perf_counter()
    try:
        fn(inputs[0])  # warm-up: compiles (torch.compile, Triton) and fills caches
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        info["first_call_s"] = time.perf_counter() - t0
        if not torch.cuda.is_available():
            benchmark(fn, inputs[0])
            if benchmark.stats is not None:  # None under --benchmark-disable
                info["time_s"] = benchmark.stats.stats.median
            return
        _run_cuda_case(benchmark, fn, inputs, info)
        return
    except torch.cuda.OutOfMemoryError:
        pass
    # Skipped outside the handler: the OOM traceback would keep the frames' tensors alive.
    torch.cuda.empty_cache()
    pytest.skip(f"CUDA out of memory at {shape_id(shape)} {info['dtype']}")


def _run_cuda_case(
    benchmark: Any, fn: Callable[[Any], Any], inputs: Sequence[Any], info: dict
) -> None:
    from triton.testing import do_bench

    calls = itertools.count()

    def rotating() -> None:
        fn(inputs[next(calls) % len(inputs)])

    info["time_s"] = do_bench(rotating, return_mode="median") * 1e-3
    info["rotation"] = len(inputs)
    info["launches"] = _count_launches(lambda: fn(inputs[0]))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn(inputs[0])
    torch.cuda.synchronize()
    info["peak_bytes"] = torch.cuda.max_memory_allocated() - start
    info.update(gpu_rates())

    def synced() -> None:
        fn(inputs[0])
        torch.cuda.synchronize()

    # The JSON's own stats (host clock, synchronised); the device-event median above
    # is the figure the report uses.
    benchmark.pedantic(synced, rounds=3, iterations=1)


# ------------------------------------------------------------------------------- report


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _floor(row: dict) -> tuple[float | None, str]:
    """(floor seconds, what the floor is) for a CUDA row; (None, "") on CPU."""
    if "bandwidth" not in row:
        return None, ""
    if row["floor_flops"]:
        return row["floor_flops"] / row["bf16_flops"], "bf16 FLOPs"
    if row["floor_bytes"] >= SHARE_OF_FLOOR_MIN_BYTES:
        return row["floor_bytes"] / row["bandwidth"], "bytes"
    return row["launch_s"], "1 launch"


def collect(out: Path) -> tuple[list[dict], dict[str, int], list[dict]]:
    """(rows, skip reason -> count, each run's metadata) over the ``benchmark*.json``
    files in ``out``, every test taken from the newest file that ran it, so runs of a
    few ops or implementations at a time (e.g. within a per-command time limit) add up.
    """
    latest: dict[str, tuple[dict | None, str | None]] = {}
    runs = []
    for path in sorted(out.glob("benchmark*.json"), key=lambda p: p.stat().st_mtime):
        data = json.loads(path.read_text())
        for entry in data["benchmarks"]:
            if "time_s" in entry["extra_info"]:
                latest[entry["fullname"]] = (entry["extra_info"], None)
        for skip in data.get("skipped", []):
            latest[skip["test"]] = (None, skip["reason"])
        if "run" in data:
            runs.append(data["run"])
    rows = [row for row, _ in latest.values() if row is not None]
    skips: dict[str, int] = {}
    for _, reason in latest.values():
        if reason is not None:
            skips[reason] = skips.get(reason, 0) + 1
    return rows, skips, runs


def _groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (OPS.index(row["op"]), row["mode"], row["floor_bytes"], row["shape"], row["dtype"])
        groups.setdefault(key, {})[row["impl"]] = row
    return dict(sorted(groups.items()))


def markdown_table(rows: list[dict]) -> str:
    """One line per (op, pass, shape, dtype): each implementation's median time, the
    krpo-fast speed-up against each peer, and (CUDA) the floor and share of it or
    the launches per call."""
    cuda = any("bandwidth" in r for r in rows)
    head = ["op", "pass", "shape", "dtype", *IMPLS]
    head += [f"vs {p}" for p in IMPLS if p != "krpo-fast"]
    if cuda:
        head += ["floor", "share of floor", "launches", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for (_, mode, _, shape, dtype), by_impl in _groups(rows).items():
        any_row = next(iter(by_impl.values()))
        cells = [any_row["op"], mode, shape, dtype]
        cells += [_fmt_time(by_impl[i]["time_s"]) if i in by_impl else "-" for i in IMPLS]
        ours = by_impl.get("krpo-fast")
        for peer in IMPLS:
            if peer == "krpo-fast":
                continue
            ok = ours is not None and peer in by_impl
            cells.append(f"{by_impl[peer]['time_s'] / ours['time_s']:.1f}x" if ok else "-")
        if cuda:
            floor_s, what = _floor(ours) if ours else (None, "")
            cells.append(f"{_fmt_time(floor_s)} ({what})" if floor_s else "-")
            cells.append(f"{100 * floor_s / ours['time_s']:.0f}%" if floor_s else "-")
            cells.append(str(ours.get("launches", "-")) if ours else "-")
            peak = ours.get("peak_bytes") if ours else None
            cells.append(f"{peak / 2**20:.1f}" if peak is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Per op: time against size (every implementation, both passes) and share of floor
    (CUDA) or the krpo-fast speed-up against each peer (CPU), as PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = any("bandwidth" in r for r in rows)
    paths = []
    for op in OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
        lines: dict[tuple, list[tuple[float, float]]] = {}
        ratio: dict[tuple, list[tuple[float, float]]] = {}
        for (_, mode, size, _, dtype), by_impl in _groups(op_rows).items():
            ours = by_impl.get("krpo-fast")
            for impl, row in by_impl.items():
                lines.setdefault((impl, mode, dtype), []).append((size, row["time_s"]))
                if ours is None:
                    continue
                if cuda and impl == "krpo-fast":
                    floor_s, _ = _floor(ours)
                    ratio.setdefault(("share of floor", mode, dtype), []).append(
                        (size, floor_s / ours["time_s"])
                    )
                elif not cuda and impl != "krpo-fast":
                    ratio.setdefault((f"vs {impl}", mode, dtype), []).append(
                        (size, row["time_s"] / ours["time_s"])
                    )
        # Colour: implementation (or peer); line style: pass or mode; marker: dtype.
        modes = sorted({r["mode"] for r in op_rows})
        for ax, series in ((ax_t, lines), (ax_r, ratio)):
            for (name, mode, dtype), points in sorted(series.items()):
                xs, ys = zip(*sorted(points), strict=True)
                impl = name.removeprefix("vs ")
                ax.plot(
                    xs,
                    ys,
                    ("-", "--", ":", "-.")[modes.index(mode) % 4],
                    color=f"C{IMPLS.index(impl)}" if impl in IMPLS else "C5",
                    marker="s" if dtype == "bfloat16" else "o",
                    label=f"{name} {mode} {dtype}",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("bytes the op must move (floor bytes)")
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=6)
        ax_t.set_ylabel("median time (s)")
        ax_r.set_ylabel("share of floor (krpo-fast)" if cuda else "krpo-fast speed-up (x)")
        fig.suptitle(f"{op} on {device_name()}")
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _header(cuda: bool, runs: list[dict], skips: dict[str, int]) -> str:
    lines = [f"# krpo-fast benchmarks: {device_name()}", ""]
    if cuda:
        lines += [
            f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}. Times are "
            "device-event medians (triton.testing.do_bench) over rotating inputs; launches "
            "counted with torch.profiler; peak memory from torch.cuda.max_memory_allocated "
            "(above the level before the call). Floors: bytes each input read once and "
            "each output written once over the measured copy bandwidth (share of floor "
            f"at >= {SHARE_OF_FLOOR_MIN_BYTES >> 20} MiB moved), LM-head FLOPs over the "
            "measured bf16 matmul rate, and below 64 MiB one kernel launch.",
        ]
    else:
        lines += [
            "**CPU-only machine: these are the CPU paths.** krpo-fast runs its vectorised "
            "torch code (TRITON_INTERPRET=0 is forced: Triton interpreter timings are "
            "never reported), against the paper's eager loops, the vectorised eager "
            "torch (bench/eager.py) and torch.compile of it. Liger-Kernel's triton_grpo_loss "
            "is skipped (its Triton kernel runs on CPU only in the interpreter); its "
            "LigerFusedLinearGRPOLoss is plain torch and is timed. Floors, launches and "
            "peak memory are GPU-only. CPU timings say nothing about a GPU; read the "
            "ratios, measured side by side in one process.",
            "",
            f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(shared), 1 thread; torch {torch.__version__}. Times are pytest-benchmark "
            "medians.",
        ]
    lines += ["", "Runs (each row comes from the newest run that measured it):", ""]
    lines += [
        f"- `{r['command']}`; load average (1, 5, 15 min) before {r['load_before']}, "
        f"after {r['load_after']}"
        for r in runs
    ]
    lines += [
        "",
        "Columns: median time per implementation; `vs X` = X's time / krpo-fast's time.",
        "",
    ]
    if skips:
        lines += ["Skipped rows:", ""]
        lines += [f"- {reason} ({n} rows)" for reason, n in sorted(skips.items())]
        lines.append("")
    return "\n".join(lines) + "\n"


def run(
    ops: Sequence[str] | None = None,
    quick: bool = False,
    out: Path | str | None = None,
    impls: Sequence[str] | None = None,
    pytest_args: Sequence[str] = (),
) -> Path:
    """Run the suite and write ``benchmark.json``, ``README.md`` and ``<op>.png`` into
    ``out`` (default ``bench/results/<device>/``). Returns the Markdown file's path.

    Args:
        ops: subset of :data:`OPS` (default all).
        quick: smallest sizes only, float32 only.
        out: results folder.
        impls: subset of :data:`IMPLS` (default all).
        pytest_args: extra pytest arguments (e.g. pytest-benchmark timing options).
    """
    ops = list(ops or OPS)
    unknown = sorted(set(ops) - set(OPS)) + sorted(set(impls or ()) - set(IMPLS))
    if unknown:
        raise ValueError(f"unknown op or implementation {unknown}; ops: {OPS}, impls: {IMPLS}")
    out = Path(out) if out is not None else BENCH_DIR / "results" / device_name()
    out.mkdir(parents=True, exist_ok=True)
    subset_ops = [o for o in OPS if o in ops] if set(ops) != set(OPS) else []
    subset_impls = [i for i in IMPLS if i in impls] if impls and set(impls) != set(IMPLS) else []
    parts = subset_ops + subset_impls + (["quick"] if quick else [])
    if not parts:  # the full suite starts the folder afresh
        for old in out.glob("benchmark*.json"):
            old.unlink()
    json_path = out / ("-".join(["benchmark", *parts]) + ".json")
    skips_path = out / "skipped.jsonl"
    skips_path.unlink(missing_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    env.update({ENV_QUICK: "1" if quick else "0", ENV_SKIPS: str(skips_path)})
    env.pop(ENV_IMPLS, None)
    if impls:
        env[ENV_IMPLS] = ",".join(impls)
    cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR), "-q", "-rs", "-p", "no:cacheprovider"]
    cmd += ["-k", " or ".join(f"test_{op}" for op in ops), f"--benchmark-json={json_path}"]
    cmd += ["--benchmark-columns=median,rounds", "--benchmark-sort=fullname", *pytest_args]
    load_before = _loadavg()
    status = subprocess.run(cmd, env=env, cwd=BENCH_DIR.parent).returncode
    if status != 0 or not json_path.exists():
        raise RuntimeError(f"benchmark run failed (pytest exit status {status}): {' '.join(cmd)}")
    data = json.loads(json_path.read_text())
    # pytest-benchmark's JSON keeps every round's time (tens of MB for the full
    # sweep); the statistics are what the results need.
    for entry in data["benchmarks"]:
        entry["stats"].pop("data", None)
    lines = skips_path.read_text().splitlines() if skips_path.exists() else []
    data["skipped"] = [json.loads(line) for line in lines]
    skips_path.unlink(missing_ok=True)
    command = "OMP_NUM_THREADS=1 krpo-fast bench"
    command += f" --ops {' '.join(subset_ops)}" if subset_ops else ""
    command += f" --impls {' '.join(subset_impls)}" if subset_impls else ""
    command += " --quick" if quick else ""
    data["run"] = {"command": command, "load_before": load_before, "load_after": _loadavg()}
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    rows, skips, runs = collect(out)
    table = markdown_table(rows)
    cuda = torch.cuda.is_available()
    readme = out / "README.md"
    try:
        images = plot(rows, out)
    except ImportError:  # matplotlib is optional (the [bench] extra); tables still come
        print("matplotlib is not installed: no plots", file=sys.stderr)
        images = []
    plots = "".join(f"![{p.stem}]({p.name})\n" for p in images)
    readme.write_text(_header(cuda, runs, skips) + table + "\n" + plots)
    print(table)
    print(f"results: {readme}, {json_path}, {len(images)} plots")
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    """``krpo-fast bench [--ops ...] [--quick] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="krpo-fast bench",
        description="Time every op against the paper's eager code, eager torch, "
        "torch.compile and Liger-Kernel; write JSON, a Markdown table and plots into "
        "bench/results/<device>/. On a CPU-only machine: the CPU paths only.",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=OPS,
        default=list(OPS),
        metavar="OP",
        help=f"ops to run (default all): {', '.join(OPS)}",
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        metavar="IMPL",
        help=f"implementations (default all): {', '.join(IMPLS)}",
    )
    parser.add_argument("--quick", action="store_true", help="smallest sizes, float32 only")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/<device>")
    args = parser.parse_args(argv)
    missing = [
        name for name in ("pytest", "pytest_benchmark") if not importlib.util.find_spec(name)
    ]
    if missing:
        names = " and ".join(name.replace("_", "-") for name in missing)
        print(f"error: krpo-fast bench needs {names}: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    try:
        run(args.ops, args.quick, args.out, args.impls)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
