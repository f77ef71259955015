"""Atomic checkpoints: an HF-format model folder plus the trainer's state.

``checkpoint-<step>/`` holds the model (safetensors), the tokenizer, the model's
``krpo_fast.json`` when it has one, and ``trainer_state.pt`` (optimizer, scheduler,
RNG states, step and run bookkeeping). It is written as ``checkpoint-<step>.tmp``
and renamed into place, so a run killed mid-save never leaves a half checkpoint
that ``--resume`` would pick.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
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
    if final.exists():  # re-saving a step (a resumed run): move the old one aside first
        old = output_dir / f"checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep:
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (``.tmp`` folders ignored)."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint that ``--resume`` names: 'latest' in ``output_dir``, or a path."""
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
    return path


def load_trainer_state(
    path: Path, optimizer: torch.optim.Optimizer | None, scheduler: Any
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states from ``path``; return the whole state.

    With ``optimizer=None`` the caller loads ``state["optimizer"]`` itself (sharded runs).
    """
    # Our own file, written by save_checkpoint: it holds numpy RNG arrays, hence not
    # weights_only.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
