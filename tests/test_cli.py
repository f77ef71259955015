"""The command line: help, config parsing (flags and YAML), one-line errors on bad input."""

import errno
import json
import os
import re
import shutil
import sys

import pytest
from safetensors.torch import load_file, save_file

from krpo_fast.cli import main
from krpo_fast.config import TrainConfig, parse_config
from krpo_fast.tiny_model import bundled_model_path


def _parse(argv):
    return parse_config(TrainConfig, argv, "krpo-fast train", "")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--output_dir",
        "--max_steps",
        "--generation_backend",
        "--resume",
        "--config",
        "--adv_mode",
        "--process_var",
        "--meas_var",
        "--beta",
    ):
        assert flag in text
    assert "{auto,vllm,hf}" in text


def test_flags_yaml_and_override(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("max_steps: 7\nlearning_rate: 1e-4\nbf16: false\nadv_mode: grpo\n")
    cfg = _parse(["--config", str(run), "--max_steps", "9", "--resume"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.bf16, cfg.adv_mode) == (9, 1e-4, False, "grpo")
    assert cfg.resume == "latest"
    assert _parse(["--resume", "runs/x/checkpoint-4", "--no_bf16"]).resume.endswith("-4")
    assert _parse(["--gradient_checkpointing"]).gradient_checkpointing is True


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_stepz: 3\n", "unknown key"),
        ("max_steps: many\n", "bad value"),
        ("adv_mode: ppo\n", "must be one of"),
        ("- 1\n", "mapping"),
    ],
)
def test_bad_yaml(tmp_path, text, message):
    run = tmp_path / "run.yaml"
    run.write_text(text)
    with pytest.raises(ValueError, match=message):
        _parse(["--config", str(run)])


def _one_line_error(capsys, argv, code=2):
    assert main(argv) == code
    # The error is the last line on stderr (progress bars may precede it).
    err = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]
    assert err.startswith("error: "), err
    return err


def test_unknown_flag_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no_such_flag", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bad_values(capsys, tmp_path):
    assert "--group_size" in _one_line_error(capsys, ["train", "--group_size", "0"])
    missing = str(tmp_path / "nope")
    err = _one_line_error(capsys, ["train", "--model", missing, "--output_dir", missing])
    assert missing in err
    err = _one_line_error(capsys, ["eval", "--model", missing])
    assert missing in err
    assert "--reward_flip_rate" in _one_line_error(capsys, ["train", "--reward_flip_rate", "2"])
    assert "--reward_noise" in _one_line_error(capsys, ["train", "--reward_noise", "-1"])
    err = _one_line_error(capsys, ["train", "--operators", "/"])
    assert "--operators" in err and "subset of '+-*'" in err


def test_malformed_dataset(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    err = _one_line_error(
        capsys, ["train", "--dataset", str(data), "--output_dir", str(tmp_path / "run")]
    )
    assert "data.jsonl:2" in err and "answer" in err


def test_broken_reward_function(capsys, tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text(
        "def reward(prompts, completions, answers):\n    return [1.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _one_line_error(
        capsys,
        [
            "train",
            "--reward",
            "bad_reward:reward",
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "1",
            "--prompts_per_step",
            "2",
            "--group_size",
            "2",
            "--max_new_tokens",
            "4",
            "--eval_size",
            "1",
            "--generation_backend",
            "hf",
        ],
        code=1,  # found in step 1: training had started
    )
    assert "step 1" in err and "returned 1 values for 4 completions" in err
    err = _one_line_error(capsys, ["train", "--reward", "no_such_module:f"])
    assert "cannot import" in err


def test_eval_command(capsys):
    args = ["eval", "--eval_size", "4", "--max_new_tokens", "8", "--generation_backend", "hf"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1


# --------------------------------------------------------------- one line for every failure

FAST = ["--eval_size", "4", "--prompts_per_step", "2", "--group_size", "2"]
FAST += ["--max_new_tokens", "8", "--generation_backend", "hf", "--max_steps", "1"]


@pytest.mark.parametrize(
    "flags, setting",
    [
        (["--eval_size", "0"], "--eval_size"),
        (["--learning_rate", "inf"], "--learning_rate"),
        (["--max_grad_norm", "nan"], "--max_grad_norm"),
        (["--reward_noise", "nan"], "--reward_noise"),
        (["--output_dir", ""], "--output_dir"),
        (["--eps_low", "-1"], "eps_low"),
        (["--max_new_tokens", "5000"], "--max_new_tokens"),
    ],
)
def test_bad_setting_is_one_line_before_anything(capsys, tmp_path, flags, setting):
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", *FAST, "--output_dir", str(out), *flags])
    assert setting in err
    assert not out.exists()


@pytest.mark.parametrize(
    "text, message",
    [("max_steps: null\n", "bad value None"), ("max_steps: 2.7\n", "bad value 2.7")],
)
def test_yaml_values_that_would_be_silently_wrong(capsys, tmp_path, text, message):
    run = tmp_path / "run.yaml"
    run.write_text(text)
    err = _one_line_error(capsys, ["train", "--config", str(run)])
    assert "max_steps" in err and message in err


def test_eval_bad_threads(capsys):
    assert "--torch_threads" in _one_line_error(capsys, ["eval", "--torch_threads", "-3"])


def _reward_module(tmp_path, monkeypatch, body):
    (tmp_path / "user_reward.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_reward", raising=False)


@pytest.mark.parametrize(
    "body, code, message",
    [
        ("def reward(p, c, a):\n    raise KeyError('score')\n", 1, "raised KeyError"),
        ("def reward(p, c, a):\n    return {x: 1.0 for x in c}\n", 1, "returned dict"),
        ("def reward(completions):\n    return [1.0]\n", 2, "cannot be called as"),
    ],
)
def test_bad_reward_function(capsys, tmp_path, monkeypatch, body, code, message):
    _reward_module(tmp_path, monkeypatch, body)
    argv = ["train", *FAST, "--reward", "user_reward:reward", "--output_dir", str(tmp_path / "r")]
    assert message in _one_line_error(capsys, argv, code)


def _model_copy(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(bundled_model_path(), model)
    return model


@pytest.mark.parametrize("damage", ["config.json", "weights", "nan weights"])
def test_damaged_model_is_one_line_in_train_and_eval(capsys, tmp_path, damage):
    model = _model_copy(tmp_path)
    if damage == "config.json":
        (model / "config.json").write_text("{not json")
    elif damage == "weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        state = load_file(model / "model.safetensors")
        state[next(iter(state))].fill_(float("nan"))
        save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", *FAST, "--model", str(model), "--output_dir", str(out)])
    assert str(model) in err
    assert not out.exists()
    err = _one_line_error(capsys, ["eval", *FAST[:2], "--model", str(model)])
    assert str(model) in err
    if damage == "nan weights":
        assert "NaN" in err


def test_output_dir_that_is_a_file_or_read_only(capsys, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert "a file, not a directory" in _one_line_error(
        capsys, ["train", *FAST, "--output_dir", str(file)]
    )
    if os.geteuid() == 0:
        return  # root writes anywhere
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    err = _one_line_error(capsys, ["train", *FAST, "--output_dir", str(read_only / "run")])
    assert "Permission denied" in err and str(read_only) in err


def test_full_disk_after_training_started(capsys, tmp_path, monkeypatch):
    import krpo_fast.checkpoint

    def full(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(krpo_fast.checkpoint.torch, "save", full)
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", *FAST, "--output_dir", str(out)], code=1)
    assert "No space left on device" in err and "trainer_state.pt" in err and "step 1" in err


def test_debug_prints_the_traceback(capsys, tmp_path):
    assert main(["train", *FAST, "--learning_rate", "inf", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_latin1_dataset_and_torn_metrics_name_the_file(capsys, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    err = _one_line_error(capsys, ["eval", "--dataset", str(data)])
    assert f"{data}:1" in err and "UTF-8" in err

    out = tmp_path / "run"
    assert main(["train", *FAST, "--output_dir", str(out)]) == 0
    metrics = out / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward_mean": 0\n{"step": 1}\n')  # damaged, not torn last
    argv = ["train", *FAST, "--max_steps", "2", "--output_dir", str(out), "--resume"]
    err = _one_line_error(capsys, argv)
    assert f"{metrics}:1" in err


def test_prompt_longer_than_the_limit(capsys, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"question": "1+1", "answer": "2"}, {"question": "9" * 10_000_000, "answer": "9"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = _one_line_error(capsys, ["eval", "--dataset", str(data), "--max_new_tokens", "8"])
    assert f"{data}:2" in err and "--truncate_prompts" in err
    err = _one_line_error(
        capsys,
        ["train", *FAST, "--dataset", str(data), "--eval_size", "1", "--max_prompt_length", "200",
         "--output_dir", str(tmp_path / "run")],
    )  # fmt: skip
    assert f"{data}:2" in err and "200 tokens" in err  # the held-out row
    argv = ["eval", "--dataset", str(data), "--max_new_tokens", "8", "--truncate_prompts"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "truncated 1 of 2 held-out prompts" in out
    assert json.loads(out.strip().splitlines()[-1])["n"] == 2
