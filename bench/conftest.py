"""Benchmark set-up: time real code paths, one thread, and record skipped rows.

Runs before the bench files import torch, Triton or krpo_fast:
- ``TRITON_INTERPRET=0``: on CPU the ops take their vectorised torch path; interpreter
  timings must never be reported as kernel performance (tests/conftest.py turns the
  interpreter on; this suite turns it off).
- one thread: the CPU machines are 2 shared cores, and contention makes multi-threaded
  timings erratic (docs/design.md).
"""

import json
import os

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Append every skipped row's reason to the file the runner names (KRPO_BENCH_SKIPS),
    so the results say what was not measured and why."""
    path = os.environ.get("KRPO_BENCH_SKIPS")
    if not path or not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = report.longrepr[2].removeprefix("Skipped: ")
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "reason": reason}) + "\n")
