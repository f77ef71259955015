"""Training data: a seeded arithmetic task generator, a JSONL loader, prompt formatting.

Rows are plain dicts with at least ``question`` and ``answer`` (both strings); the
trainer formats ``question`` into a prompt and hands ``answer`` to the reward.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAPER_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it.\nThe assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think>\n<answer> answer here </answer>\n"
)


@dataclass(frozen=True)
class ArithmeticTask:
    """Random integer expressions such as ``12+7*3``, in the style of the paper's MathTasks.

    Each expression has between ``num_terms_min`` and ``num_terms_max`` terms; each term
    first draws a digit count in ``[num_digits_min, num_digits_max]``, then a value with
    exactly that many digits (one-digit terms include 0). Operators are drawn uniformly
    from ``operators``. Answers are Python-evaluated with standard precedence, so they are
    integers whenever the operators are among ``+-*``.
    """

    num_terms_min: int = 2
    num_terms_max: int = 2
    num_digits_min: int = 1
    num_digits_max: int = 2
    operators: str = "+-"

    def __post_init__(self) -> None:
        if not 2 <= self.num_terms_min <= self.num_terms_max:
            raise ValueError("need 2 <= num_terms_min <= num_terms_max")
        if not 1 <= self.num_digits_min <= self.num_digits_max:
            raise ValueError("need 1 <= num_digits_min <= num_digits_max")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(
                f"operators must be a non-empty subset of '+-*', got {self.operators!r}"
            )

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """Draw one row ``{"question", "answer", "num_terms", "num_digits"}`` from ``rng``."""
        num_terms = rng.randint(self.num_terms_min, self.num_terms_max)
        parts: list[str] = []
        max_digits = 0
        for i in range(num_terms):
            digits = rng.randint(self.num_digits_min, self.num_digits_max)
            max_digits = max(max_digits, digits)
            low = 0 if digits == 1 else 10 ** (digits - 1)
            if i:
                parts.append(rng.choice(self.operators))
            parts.append(str(rng.randint(low, 10**digits - 1)))
        question = "".join(parts)
        # eval is safe here: the string is built from digits and operators only.
        answer = eval(question, {"__builtins__": {}}, {})  # noqa: S307
        return {
            "question": question,
            "answer": str(answer),
            "num_terms": num_terms,
            "num_digits": max_digits,
        }


DEFAULT_TASK = ArithmeticTask()
"""The bundled tiny model's task: two terms of one or two digits, ``+`` and ``-``."""


def is_test_question(question: str, test_fraction: float = 0.2) -> bool:
    """Whether ``question`` belongs to the test split: a hash of its text, no seed involved.

    The split is the same for every seed, so a model SFT-trained on train questions (the
    bundled one is) never saw any test question, whatever seed later runs use.
    """
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def make_arithmetic_splits(
    n_train: int,
    n_test: int,
    seed: int = 0,
    task: ArithmeticTask = DEFAULT_TASK,
    test_fraction: float = 0.2,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate disjoint train and test rows for ``task``, deterministically from ``seed``.

    A question belongs to the test split when a hash of its text falls under
    ``test_fraction`` (:func:`is_test_question`), so the same question can never appear
    in both splits, whatever the seeds, ``n_train`` or ``n_test``. Test questions are
    unique; train questions may repeat (small tasks have few distinct questions).

    Raises:
        ValueError: when the task has too few distinct test questions for ``n_test``.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be non-negative")
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    seen_test: set[str] = set()
    misses = 0
    while len(train) < n_train or len(test) < n_test:
        row = task.sample(rng)
        if is_test_question(row["question"], test_fraction):
            if len(test) < n_test and row["question"] not in seen_test:
                seen_test.add(row["question"])
                test.append(row)
                misses = 0
                continue
        elif len(train) < n_train:
            train.append(row)
            misses = 0
            continue
        misses += 1
        if misses > 100_000:
            raise ValueError(f"{task} has too few distinct test questions for n_test={n_test}")
    return train, test


SOURCE_KEY = "_source"
"""Row key that :func:`load_jsonl` fills with where the row came from (``file:line``)."""


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Load question/answer rows from a JSONL file (one JSON object per line).

    Every non-blank line must be an object with string (or number) ``question`` and
    ``answer`` fields; numbers become their text as written in the file (``1e20`` stays
    ``"1e20"``), other fields are kept, and ``row[SOURCE_KEY]`` says ``file:line``.

    Raises:
        ValueError: one line naming the file and line number for bad JSON, a missing key,
            a wrong type, text that is not UTF-8, or a file with no rows.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("question", "answer"):
                if key not in row:
                    raise ValueError(f"{where}: missing key {key!r}")
                value = row[key]
                # bool is an int subclass but "True" is never a meant answer.
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    # The number's text in the file: str(1e20) would be "1e+20".
                    row[key] = json.loads(line, parse_int=str, parse_float=str)[key]
                elif not isinstance(value, str):
                    raise ValueError(
                        f"{where}: {key!r} must be a string or number, got {type(value).__name__}"
                    )
            row[SOURCE_KEY] = where
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows (empty file)")
    return rows


def format_prompt(tokenizer: Any, question: str, system_prompt: str = PAPER_SYSTEM_PROMPT) -> str:
    """Render ``question`` as a generation prompt, through the chat template when there is one.

    Without a chat template the fallback is plain text with the same content, ending
    where the assistant's reply starts.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": question},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\nUser: {question}\nAssistant:"
