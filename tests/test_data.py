"""Tests for the arithmetic generator, the JSONL loader and prompt formatting."""

import json

import pytest

from krpo_fast.data import (
    DEFAULT_TASK,
    PAPER_SYSTEM_PROMPT,
    SOURCE_KEY,
    ArithmeticTask,
    format_prompt,
    is_test_question,
    load_jsonl,
    make_arithmetic_splits,
)

TASK = ArithmeticTask(
    num_terms_min=2, num_terms_max=4, num_digits_min=1, num_digits_max=3, operators="+-*"
)


def test_splits_are_deterministic_per_seed():
    assert make_arithmetic_splits(50, 20, seed=3, task=TASK) == make_arithmetic_splits(
        50, 20, seed=3, task=TASK
    )
    assert make_arithmetic_splits(50, 20, seed=3, task=TASK) != make_arithmetic_splits(
        50, 20, seed=4, task=TASK
    )


def test_answers_are_correct_and_rows_match_the_task():
    train, test = make_arithmetic_splits(300, 100, seed=0, task=TASK)
    for row in train + test:
        assert row["answer"] == str(eval(row["question"]))
        assert set(row["question"]) <= set("0123456789+-*")
        assert 2 <= row["num_terms"] <= 4 and 1 <= row["num_digits"] <= 3
        operators = sum(row["question"].count(op) for op in "+-*")
        assert operators == row["num_terms"] - 1
    assert {op for row in train for op in row["question"] if op in "+-*"} == set("+-*")


def test_train_and_test_are_disjoint_and_test_is_unique():
    train, test = make_arithmetic_splits(3000, 300, seed=1)
    test_questions = [row["question"] for row in test]
    assert len(set(test_questions)) == len(test_questions) == 300
    assert not set(test_questions) & {row["question"] for row in train}
    # The split of a question depends on neither the sizes nor the seed.
    other_train, _ = make_arithmetic_splits(6000, 10, seed=2)
    assert not set(test_questions) & {row["question"] for row in other_train}
    assert all(is_test_question(q) for q in test_questions)


def test_default_task_and_bad_settings():
    assert DEFAULT_TASK.operators == "+-" and DEFAULT_TASK.num_terms_max == 2
    with pytest.raises(ValueError):
        ArithmeticTask(operators="/")
    with pytest.raises(ValueError):
        ArithmeticTask(num_terms_min=3, num_terms_max=2)
    with pytest.raises(ValueError, match="too few distinct"):
        make_arithmetic_splits(0, 500, task=ArithmeticTask(num_digits_max=1, operators="+"))


def write(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl_accepts_good_rows(tmp_path):
    lines = [
        json.dumps({"question": "2+2?", "answer": "4", "id": 7}),
        "",
        json.dumps({"question": "half of 3", "answer": 1.5}),
        json.dumps({"question": "10-3", "answer": 7}),
        '{"question": "big", "answer": 1e20}',
        '{"question": "exact", "answer": 2.50}',
    ]
    path = write(tmp_path, "\n".join(lines) + "\n")
    rows = load_jsonl(path)
    assert [r.pop(SOURCE_KEY) for r in rows] == [f"{path}:{n}" for n in (1, 3, 4, 5, 6)]
    assert rows == [
        {"question": "2+2?", "answer": "4", "id": 7},
        {"question": "half of 3", "answer": "1.5"},
        {"question": "10-3", "answer": "7"},
        {"question": "big", "answer": "1e20"},  # as written: str(1e20) is "1e+20"
        {"question": "exact", "answer": "2.50"},
    ]


def test_load_jsonl_rejects_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        '{"question": "1+1", "answer": "2"}\n{"question": "caf\u00e9", "answer": "1"}\n'.encode(
            "latin-1"
        )
    )
    with pytest.raises(ValueError, match="not UTF-8") as info:
        load_jsonl(path)
    assert f"{path}:2:" in str(info.value)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"answer": "4"}', "missing key 'question'"),
        ('{"question": "q"}', "missing key 'answer'"),
        ('{"question": ["q"], "answer": "4"}', "'question' must be a string"),
        ('{"question": "q", "answer": null}', "'answer' must be a string"),
        ('{"question": "q", "answer": true}', "'answer' must be a string"),
    ],
)
def test_load_jsonl_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "1+1", "answer": "2"})
    path = write(tmp_path, f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(ValueError, match=message) as info:
        load_jsonl(path)
    assert f"{path}:3:" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_jsonl_rejects_empty_file(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        load_jsonl(write(tmp_path, "\n  \n"))


class PlainTokenizer:
    chat_template = None


class ChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "|".join(f"{m['role']}={m['content']}" for m in messages) + "|assistant="


def test_format_prompt_uses_chat_template_or_falls_back():
    assert format_prompt(ChatTokenizer(), "1+1", "sys") == "system=sys|user=1+1|assistant="
    plain = format_prompt(PlainTokenizer(), "1+1")
    assert plain.startswith(PAPER_SYSTEM_PROMPT) and "1+1" in plain
    assert PAPER_SYSTEM_PROMPT.startswith("A conversation between User and Assistant.")
    assert "<think> reasoning process here </think>\n<answer> answer here </answer>\n" in (
        PAPER_SYSTEM_PROMPT
    )
