"""The command line: help, config parsing (flags and YAML), one-line errors on bad input."""

import json
import re

import pytest

from krpo_fast.cli import main
from krpo_fast.config import TrainConfig, parse_config


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


def _one_line_error(capsys, argv):
    assert main(argv) == 2
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
    )
    assert "returned 1 values for 4 completions" in err
    err = _one_line_error(capsys, ["train", "--reward", "no_such_module:f"])
    assert "cannot import" in err


def test_eval_command(capsys):
    args = ["eval", "--eval_size", "4", "--max_new_tokens", "8", "--generation_backend", "hf"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1
