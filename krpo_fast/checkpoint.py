"""Atomic checkpoints: an HF-format model folder plus the trainer's state.

``checkpoint-<step>/`` holds the model (safetensors), the tokenizer, the model's
``krpo_fast.json`` when it has one, and ``trainer_state.pt`` (optimizer, scheduler,
RNG states, step and run bookkeeping). It is written as ``checkpoint-<step>.tmp``
and renamed into place, so a run killed mid-save never leaves a half checkpoint
that ``--resume`` would pick. ``--resume`` takes the newest checkpoint that loads
completely (:func:`find_resumable`), naming each newer one it skips and why.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from krpo_fast.run_dir import fsync_directory

STATE_FILE = "trainer_state.pt"
STATE_KEYS = ("step", "optimizer", "scheduler", "rng")
_FULL = 64 << 20  # free bytes under which a failed checkpoint write is a full disk
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    copy_files: list[Path],
    keep: int,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: Any = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and delete all but the newest ``keep`` (0: all).

    ``model_state`` and ``optimizer_state`` replace ``model.state_dict()`` and
    ``optimizer.state_dict()`` (the gathered full states of a sharded FSDP2 run).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(
            tmp, step, model, tokenizer, optimizer, scheduler, extra, copy_files, model_state,
            optimizer_state,
        )  # fmt: skip
    except BaseException as e:
        free = shutil.disk_usage(output_dir).free
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk gets its space back
        # torch and safetensors report a full disk in their own words ("unexpected pos",
        # "I/O error"): name it as the OSError it is.
        if isinstance(e, Exception) and not isinstance(e, OSError) and free < _FULL:
            raise OSError(
                errno.ENOSPC, f"No space left on device ({free >> 20} MiB free)", str(tmp)
            ) from e
        raise
    if final.exists():  # re-saving a step (a resumed run): move the old one aside first
        old = output_dir / f"checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_directory(output_dir)
    if keep:
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    return final


def _write_checkpoint(
    tmp: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    copy_files: list[Path],
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: Any,
) -> None:
    """The files of a checkpoint, synced to disk, in the folder ``tmp``."""
    model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for path in copy_files:
        shutil.copy2(path, tmp / path.name)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        **extra,
    }
    torch.save(state, tmp / STATE_FILE)
    for path in tmp.iterdir():  # on disk before the rename publishes them
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    fsync_directory(tmp)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (``.tmp`` folders ignored)."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint that ``--resume`` names: 'latest' in ``output_dir``, or a path.

    The path must be a checkpoint of ``output_dir``: a resumed run continues the run its
    directory holds, never another one.
    """
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint (no {STATE_FILE})")
    if path.resolve().parent != Path(output_dir).resolve():
        raise ValueError(
            f"--resume {resume}: not a checkpoint of --output_dir {output_dir} (resume "
            "continues the run its directory holds; to start a new run from these weights "
            f"use --model {resume})"
        )
    return path


def find_resumable(
    resume: str, output_dir: str | Path
) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    """The checkpoint to resume from, its trainer state, and the newer ones skipped (why).

    With ``resume='latest'`` the newest checkpoint that loads completely wins; a named
    checkpoint must load or this raises ValueError.
    """
    first = resolve_resume(resume, output_dir)
    assert first is not None
    candidates = list_checkpoints(output_dir)[::-1] if resume == "latest" else [first]
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            return path, read_checkpoint(path), skipped
        except ValueError as e:
            skipped.append((path, str(e)))
    if resume != "latest":
        raise ValueError(f"--resume {resume}: {skipped[0][1]}")
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise ValueError(f"--resume: no checkpoint in {output_dir} loads completely ({reasons})")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path`` after checking that its weights are whole.

    Raises ValueError saying which file is damaged and how.
    """
    check_weights(path)
    try:
        # Our own file, written by save_checkpoint: it holds numpy RNG arrays, hence not
        # weights_only.
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # any unpickling failure means the same: a damaged file
        raise ValueError(f"{STATE_FILE} does not load ({type(e).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        raise ValueError(f"{STATE_FILE} lacks {', '.join(missing)}")
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= optimizer.keys():
        raise ValueError(f"{STATE_FILE} holds no optimizer state")
    return state


def check_weights(path: Path) -> None:
    """ValueError unless every safetensors file of the checkpoint is complete.

    Reads only the headers: a file is complete when its size is exactly the header's
    length plus the end of its last tensor.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError(f"{index.name} is damaged") from None
    else:
        names = ["model.safetensors"]
    for name in names:
        file = path / name
        if not file.is_file():
            raise ValueError(f"{name} is missing")
        size = file.stat().st_size
        try:
            with file.open("rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > size:
                    raise ValueError
                header = json.loads(fh.read(header_len))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError(f"{name} is damaged (unreadable header)") from None
        if size != 8 + header_len + end:
            raise ValueError(f"{name} is truncated ({size} of {8 + header_len + end} bytes)")


def restore_trainer_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer | None, scheduler: Any
) -> None:
    """Restore optimizer (unless None: sharded runs load it themselves), scheduler, RNGs."""
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def load_trainer_state(
    path: Path, optimizer: torch.optim.Optimizer | None, scheduler: Any
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states from ``path``; return the whole state.

    With ``optimizer=None`` the caller loads ``state["optimizer"]`` itself (sharded runs).
    """
    state = read_checkpoint(path)
    restore_trainer_state(state, optimizer, scheduler)
    return state
