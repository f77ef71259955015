"""Reward functions: the paper's graded answer reward, exact match, and user functions.

Every reward function has the signature ``(prompts, completions, answers) -> list[float]``
with one float per completion.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _answer_tag(completion: str) -> str | None:
    """Content of the first ``<answer>...</answer>`` tag, stripped of surrounding whitespace.

    Stripping is a deliberate departure from the paper's code, which compares the raw
    tag content: ``<answer> 33 </answer>`` (the spacing the paper's own system prompt
    shows) then counts as exact instead of "contains".
    """
    match = _ANSWER_RE.search(completion)
    return None if match is None else match.group(1).strip()


def graded_reward(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """The paper's graded reward for each completion.

    0.0 without an ``<answer>`` tag, 1.0 when the (stripped) tag content equals the
    answer, 0.5 when it contains the answer, 0.01 otherwise.
    """
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        content = _answer_tag(completion)
        if content is None:
            rewards.append(0.0)
        elif content == answer:
            rewards.append(1.0)
        elif answer in content:
            rewards.append(0.5)
        else:
            rewards.append(0.01)
    return rewards


def exact_match_reward(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """1.0 when the (stripped) ``<answer>`` tag content equals the answer, else 0.0."""
    return [
        1.0 if _answer_tag(completion) == answer else 0.0
        for completion, answer in zip(completions, answers, strict=True)
    ]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "graded": graded_reward,
    "exact_match": exact_match_reward,
}


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve a reward function from a builtin name or a ``module:function`` path.

    Raises:
        ValueError: for an unknown builtin, a module that fails to import, a missing
            attribute, an attribute that is not callable, or one that cannot be called
            as ``fn(prompts, completions, answers)``.
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown reward {spec!r}: use one of {sorted(BUILTIN_REWARDS)} or 'module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time error is the user's module's, report it as such
        raise ValueError(f"reward {spec!r}: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is not callable")
    try:
        inspect.signature(fn).bind([], [], [])
    except TypeError as e:
        raise ValueError(
            f"reward {spec!r} cannot be called as (prompts, completions, answers): {e}"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): trust the call
        pass
    return fn


def compute_rewards(
    fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """Call ``fn`` and check it returned one finite number per completion.

    Raises:
        ValueError: naming the function, when it raises, or returns something other than
            a sequence (a dict, a set, a string), a wrong length, a non-number, or a NaN/inf.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        result = fn(prompts, completions, answers)
    except Exception as e:  # the user's code: whatever it raises, report it as its failure
        raise ValueError(f"reward {name} raised {type(e).__name__}: {e}") from e
    # A dict or set would iterate over its keys, a string over its characters.
    if isinstance(result, (Mapping, set, frozenset, str, bytes)):
        raise ValueError(f"reward {name} returned {type(result).__name__}, not a list")
    try:
        values = list(result)
    except TypeError:
        raise ValueError(f"reward {name} returned {type(result).__name__}, not a list") from None
    if len(values) != len(completions):
        raise ValueError(
            f"reward {name} returned {len(values)} values for {len(completions)} completions"
        )
    rewards = []
    for i, value in enumerate(values):
        # Strings would pass float() ("0.5"), but returning one is a bug in the function.
        # bool passes on purpose: True/False rewards are a common shorthand.
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"reward {name} returned a non-number at index {i}: {value!r}"
            ) from None
        if not math.isfinite(value):
            raise ValueError(f"reward {name} returned a non-finite value at index {i}: {value}")
        rewards.append(value)
    return rewards


def add_reward_noise(
    rewards: torch.Tensor, std: float, flip_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Corrupt rewards the way a noisy grader would: label flips, then Gaussian noise.

    With probability ``flip_rate`` a reward ``r`` becomes ``1 - r`` (a correct answer
    scores as wrong and the reverse; this assumes rewards in [0, 1], as the builtin ones
    are), then every reward gets ``N(0, std**2)`` added. ``generator`` makes the noise
    reproducible (the trainer seeds it from the run seed and the step).

    Raises:
        ValueError: when flips are asked for and a reward lies outside [0, 1].
    """
    if flip_rate > 0:
        if bool(((rewards < 0) | (rewards > 1)).any()):
            raise ValueError(
                "--reward_flip_rate needs rewards in [0, 1] (r -> 1 - r); "
                f"the reward function returned values in [{rewards.min():g}, {rewards.max():g}]"
            )
        flips = torch.rand(rewards.shape, generator=generator) < flip_rate
        rewards = torch.where(flips, 1.0 - rewards, rewards)
    if std > 0:
        rewards = rewards + std * torch.randn(rewards.shape, generator=generator)
    return rewards
