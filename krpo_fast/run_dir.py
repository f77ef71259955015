"""The run directory: one run per directory, a lock held for the run's life, atomic writes.

A run directory holds ``metrics.jsonl``, ``summary.json``, the plots, ``checkpoint-<step>/``
folders and, while a run is alive, ``run.lock`` (its pid and host). A fresh run refuses a
directory that holds another run's files unless told to overwrite it; ``--resume``
continues the run the directory holds. Every file the trainer rewrites goes through
:func:`atomic_write_text` (temporary file, fsync, rename), so a kill at any moment
leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# What a run writes besides its checkpoints; other files in the directory are left alone.
RUN_FILES = (METRICS_FILE, SUMMARY_FILE, "reward.png", "accuracy.png", ".vllm_cache")


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Put ``path`` into OSErrors that lack a file name (a failed write has none)."""
    try:
        yield
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step: a kill leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with naming(path), tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line (a kill mid-write leaves a torn last line, which readers drop)."""
    with naming(path), path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def run_files(directory: str | Path) -> list[Path]:
    """The files and checkpoint folders of a run in ``directory`` (empty: no run there)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [directory / name for name in RUN_FILES if (directory / name).exists()]
    # Also half-written (.tmp) and replaced (.old) checkpoints of a killed run.
    found += sorted(directory.glob("checkpoint-*"))
    return found


def clear_run(directory: str | Path) -> None:
    """Delete the run files of ``directory`` (the caller holds its lock)."""
    for path in run_files(directory):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` or process death.

    The lock is an ``flock`` on ``run.lock``: the kernel drops it when the holder dies,
    so the lock of a killed run is simply taken over. The file names the holder (pid,
    host) for the error message of a second process.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.fd: int | None = None
        self.previous_holder: dict[str, object] | None = None
        self.created_directory = False

    def acquire(self) -> None:
        """Take the lock or raise ValueError naming the holder; creates the directory."""
        self.created_directory = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
                raise ValueError(
                    f"--output_dir {self.path.parent}: another run is using it ({who}); "
                    "wait for it to end or pick another --output_dir"
                ) from None
            # The holder may have released and deleted the file between our open and our
            # lock: then we locked a file nobody else will look at, so try again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous_holder = _read_holder(fd) or None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock; a directory this lock created is removed again if still empty
        (a run that failed its checks leaves nothing behind)."""
        if self.fd is None:
            return
        # Delete while still holding it, so nobody locks a file about to disappear.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if self.created_directory and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def _read_holder(fd: int) -> dict[str, object]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}
