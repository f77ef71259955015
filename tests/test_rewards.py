"""Tests for the reward functions, their loader and the result checks."""

import math
import sys

import pytest
import torch

from krpo_fast.rewards import (
    add_reward_noise,
    compute_rewards,
    exact_match_reward,
    graded_reward,
    load_reward_fn,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>2+2=4</think>4", 0.0),  # no answer tag
        ("<answer>4", 0.0),  # unclosed tag
        ("<think>x</think><answer>4</answer>", 1.0),
        ("<answer> 4\n</answer>", 1.0),  # surrounding whitespace is stripped
        ("<answer>\n4\n</answer> <answer>5</answer>", 1.0),  # first tag, across lines
        ("<answer>x = 4</answer>", 0.5),  # contains the answer
        ("<answer>44</answer>", 0.5),
        ("<answer>5</answer>", 0.01),
        ("<answer></answer>", 0.01),
    ],
)
def test_graded_reward_branches(completion, expected):
    assert graded_reward(["p"], [completion], ["4"]) == [expected]


def test_exact_match_reward():
    completions = ["<answer>4</answer>", "<answer>44</answer>", "4", "<answer> 4 </answer>"]
    assert exact_match_reward([""] * 4, completions, ["4"] * 4) == [1.0, 0.0, 0.0, 1.0]


def test_load_reward_fn_builtins_and_module(tmp_path, monkeypatch):
    assert load_reward_fn("graded") is graded_reward
    assert load_reward_fn("exact_match") is exact_match_reward
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, answers):\n"
        "    return [float(len(c)) for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("my_rewards:length")
    assert fn(["p"], ["abc"], ["a"]) == [3.0]
    with pytest.raises(ValueError, match="not callable"):
        load_reward_fn("my_rewards:NOT_CALLABLE")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        load_reward_fn("my_rewards:missing")
    with pytest.raises(ValueError, match="cannot import 'broken_rewards'.*boom"):
        load_reward_fn("broken_rewards:f")
    sys.modules.pop("my_rewards", None)  # keep the temporary module out of later tests


@pytest.mark.parametrize("spec", ["nope", "no_such_module_xyz:f", ":f", "mod:"])
def test_load_reward_fn_errors(spec):
    with pytest.raises(ValueError, match="reward"):
        load_reward_fn(spec)


def test_compute_rewards_checks_results():
    args = (["p", "q"], ["a", "b"], ["a", "c"])
    assert compute_rewards(exact_match_reward, *args) == [0.0, 0.0]
    assert compute_rewards(lambda p, c, a: (True, 2), *args) == [1.0, 2.0]

    def short(prompts, completions, answers):
        return [1.0]

    def nan(prompts, completions, answers):
        return [1.0, math.nan]

    def text(prompts, completions, answers):
        return [1.0, "0.5"]

    def scalar(prompts, completions, answers):
        return 1.0

    with pytest.raises(ValueError, match="short returned 1 values for 2"):
        compute_rewards(short, *args)
    with pytest.raises(ValueError, match="nan.*non-finite.*index 1"):
        compute_rewards(nan, *args)
    with pytest.raises(ValueError, match="text.*non-number at index 1"):
        compute_rewards(text, *args)
    with pytest.raises(ValueError, match="scalar returned float"):
        compute_rewards(scalar, *args)
    # A dict or set iterates over its keys, a string over its characters: never rewards.
    for result in ({0.0: "x", 1.0: "y"}, {0.0, 1.0}, "10"):
        with pytest.raises(ValueError, match="not a list"):
            compute_rewards(lambda p, c, a, r=result: r, *args)
    assert compute_rewards(lambda p, c, a: torch.tensor([0.5, 1.0]), *args) == [0.5, 1.0]

    def raises(prompts, completions, answers):
        raise KeyError("grade")

    with pytest.raises(ValueError, match="raises raised KeyError: 'grade'"):
        compute_rewards(raises, *args)


def test_load_reward_fn_checks_the_signature(tmp_path, monkeypatch):
    (tmp_path / "sig_rewards.py").write_text(
        "def one(completions):\n    return []\n"
        "def flexible(*args, **kwargs):\n    return []\n"
        "def extra(prompts, completions, answers, scale=1.0):\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="cannot be called as"):
        load_reward_fn("sig_rewards:one")
    assert load_reward_fn("sig_rewards:flexible")
    assert load_reward_fn("sig_rewards:extra")
    sys.modules.pop("sig_rewards", None)


def test_reward_noise_flips_and_gaussian():
    rewards = torch.tensor([0.0, 0.01, 0.5, 1.0] * 2500)
    gen = torch.Generator().manual_seed(0)
    flipped = add_reward_noise(rewards, 0.0, 1.0, gen)
    assert torch.equal(flipped, 1.0 - rewards)
    assert torch.equal(add_reward_noise(rewards, 0.0, 0.0, gen), rewards)
    partly = add_reward_noise(rewards, 0.0, 0.25, gen)
    changed = (partly != rewards) & (rewards != 0.5)
    assert 0.2 < changed.float().sum() / (rewards != 0.5).sum() < 0.3
    noisy = add_reward_noise(rewards, 0.3, 0.0, gen) - rewards
    assert abs(noisy.mean()) < 0.02 and 0.28 < noisy.std() < 0.32
    again = add_reward_noise(rewards, 0.3, 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(again, add_reward_noise(rewards, 0.3, 0.1, torch.Generator().manual_seed(5)))


def test_reward_flips_need_unit_range():
    with pytest.raises(ValueError, match="reward_flip_rate needs rewards in \\[0, 1\\]"):
        add_reward_noise(torch.tensor([0.0, 2.0]), 0.0, 0.5, torch.Generator())
    # Gaussian noise alone accepts any range.
    add_reward_noise(torch.tensor([-3.0, 2.0]), 0.1, 0.0, torch.Generator())
