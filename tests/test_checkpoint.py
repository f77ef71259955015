"""Atomic checkpoints: layout, pruning, resume resolution, RNG round trip."""

import errno
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from krpo_fast.checkpoint import (
    STATE_FILE,
    check_weights,
    find_resumable,
    list_checkpoints,
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
)


def _parts():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[0, 1, 2]])).logits.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, tok, opt, sched


def test_save_prune_and_resume(tmp_path):
    model, tok, opt, sched = _parts()
    (tmp_path / "checkpoint-9.tmp").mkdir()  # a half-written one from a killed run
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, tok, opt, sched, {"accuracy_before": 0.1}, [], 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoint-3.tmp").exists()
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-3"
    assert resolve_resume("", tmp_path) is None

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    save_checkpoint(tmp_path, 3, model, tok, opt, sched, {}, [], 0)  # re-save replaces
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    state = load_trainer_state(tmp_path / "checkpoint-3", opt2, sched2)
    assert state["step"] == 3
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], exp_avg)


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)
    # A checkpoint of another run directory is not this run's to continue.
    model, tok, opt, sched = _parts()
    other = tmp_path / "other"
    save_checkpoint(other, 1, model, tok, opt, sched, {}, [], 0)
    with pytest.raises(ValueError, match="not a checkpoint of --output_dir"):
        resolve_resume(str(other / "checkpoint-1"), tmp_path)


def test_damaged_checkpoints_are_skipped_newest_first(tmp_path):
    model, tok, opt, sched = _parts()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, tok, opt, sched, {}, [], 0)
    weights = tmp_path / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    (tmp_path / "checkpoint-2" / STATE_FILE).write_bytes(b"garbage")
    path, state, skipped = find_resumable("latest", tmp_path)
    assert path.name == "checkpoint-1" and state["step"] == 1
    assert [(p.name, why.split(" ")[0]) for p, why in skipped] == [
        ("checkpoint-3", "model.safetensors"),
        ("checkpoint-2", STATE_FILE),
    ]
    assert "truncated" in skipped[0][1]
    # A named checkpoint is not replaced by another one.
    with pytest.raises(ValueError, match="checkpoint-3: model.safetensors is truncated"):
        find_resumable(str(tmp_path / "checkpoint-3"), tmp_path)
    check_weights(tmp_path / "checkpoint-1")


def test_full_disk_is_an_oserror_and_frees_the_partial_checkpoint(tmp_path, monkeypatch):
    import krpo_fast.checkpoint as checkpoint

    model, tok, opt, sched = _parts()

    def torch_save_on_full_disk(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_on_full_disk)
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(9, 9, 0)
    )
    with pytest.raises(OSError, match="No space left on device") as info:
        save_checkpoint(tmp_path, 1, model, tok, opt, sched, {}, [], 0)
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("checkpoint-1.tmp")
    assert list(tmp_path.iterdir()) == []
    # With room to spare, the same failure is not called a full disk.
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(9, 9, 1 << 40)
    )
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(tmp_path, 1, model, tok, opt, sched, {}, [], 0)
