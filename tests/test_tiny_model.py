"""Tests for the bundled tiny model, its character-level tokenizer and the script that
builds it (scripts/build_tiny_model.py, loaded by path: it is not part of the package)."""

import importlib.util
import string
import sys
from pathlib import Path

import pytest
import torch

from krpo_fast.data import format_prompt
from krpo_fast.rewards import graded_reward
from krpo_fast.tiny_model import bundled_model_path, load_model_defaults

BUILDER_PATH = Path(__file__).resolve().parent.parent / "scripts" / "build_tiny_model.py"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_tiny_model", BUILDER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


builder = _load_builder()
TINY_SYSTEM_PROMPT = builder.TINY_SYSTEM_PROMPT
Recipe, build_tokenizer = builder.Recipe, builder.build_tokenizer
completion_text, final_answer = builder.completion_text, builder.final_answer
question_operator = builder.question_operator


@pytest.fixture(scope="module")
def bundled():
    """Tokenizer and model loaded from the package folder with the Hub offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
        model = AutoModelForCausalLM.from_pretrained(bundled_model_path())
    return tokenizer, model.eval()


ASCII_TEXT = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")


@pytest.mark.parametrize("saved", [False, True])
def test_tokenizer_round_trips_ascii(saved, bundled):
    tokenizer = bundled[0] if saved else build_tokenizer()
    for text in [ASCII_TEXT, "a  b\n\n\tc .,!? 's", "<think> 1 + 2 </think>\n<answer> 3 </answer>"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids) == text


def test_tokenizer_maps_non_ascii_to_unk():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("é1€\r", add_special_tokens=False)
    unk = tokenizer.unk_token_id
    assert ids == [unk, tokenizer.convert_tokens_to_ids("1"), unk, unk]
    assert len(tokenizer) == 4 + 97


def test_chat_template_renders_prompt():
    tokenizer = build_tokenizer()
    prompt = format_prompt(tokenizer, "12+7", TINY_SYSTEM_PROMPT)
    assert prompt == f"{tokenizer.bos_token}{TINY_SYSTEM_PROMPT}\nQ:12+7\nA:"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_bundled_folder_is_small_and_describes_itself():
    path = bundled_model_path()
    assert (path / "tokenizer.json").is_file()
    assert (path / "model.safetensors").stat().st_size < 10 * 2**20
    defaults = load_model_defaults(path)
    assert defaults["system_prompt"] == TINY_SYSTEM_PROMPT
    assert defaults["recipe"]["task"]["operators"]
    assert load_model_defaults(path / "missing") == {}


def test_bundled_model_completes_with_well_formed_tags(bundled):
    tokenizer, model = bundled
    assert model.config.vocab_size == len(tokenizer)
    prompt = format_prompt(tokenizer, "3+4", TINY_SYSTEM_PROMPT)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=64)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert tokenizer.eos_token_id in new
    completion = tokenizer.decode(new, skip_special_tokens=True)
    assert completion.startswith("<think>")
    assert graded_reward([prompt], [completion], ["7"])[0] > 0  # has an <answer> tag


def test_completion_formats_and_answer_anywhere():
    row = {"question": "12-30", "answer": "-18"}
    tagged, bare = completion_text(row), completion_text(row, tagged=False)
    assert tagged == "<think>12-30=-18</think><answer>-18</answer>"
    assert bare == "<think>12-30=-18</think>-18"
    assert graded_reward([], [tagged, bare], ["-18"] * 2) == [1.0, 0.0]  # no tag, no reward
    assert final_answer(tagged) == final_answer(bare) == "-18"
    assert final_answer("<think>1+2=3") is None
    assert question_operator("12-30") == "-" and question_operator("7+8") == "+"


def test_bundled_recipe_mixes_formats_by_operator():
    defaults = load_model_defaults(bundled_model_path())
    mix = defaults["completion_format"]["tagged_fraction_by_operator"]
    assert mix == defaults["recipe"]["tagged_fraction"] == Recipe().tagged_fraction
    assert mix["-"] < 0.5 < mix["+"]  # greedy tags "+" questions, not "-" ones


def test_builder_trains_saves_and_evaluates_a_loadable_model(tmp_path):
    """Two SFT steps at a tiny batch: the folder loads offline, records its recipe and
    results, and the greedy metrics come from the trainer's generation loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = Recipe(batch_size=4, max_steps=2, warmup_steps=1, eval_every=1, n_eval=4)
    results = builder.pretrain(recipe, tmp_path, command="test")
    assert results["steps"] == 2 and results["n_eval"] == 4
    for key in ("greedy_accuracy", "greedy_anywhere_accuracy", "pass@8_t1", "pass@8_t0.7"):
        assert 0.0 <= results[key] <= 1.0, key
    defaults = load_model_defaults(tmp_path)
    assert defaults["system_prompt"] == TINY_SYSTEM_PROMPT
    assert defaults["results"] == results and defaults["recipe"]["max_steps"] == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(tmp_path)
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tokenizer) == len(build_tokenizer())


def test_builder_metrics_on_the_bundled_model(bundled):
    """The bundled model's recorded greedy metrics, reproduced on its own held-out rows:
    tagged accuracy below answer-anywhere accuracy, as its format mix intends."""
    from krpo_fast.data import make_arithmetic_splits

    tokenizer, model = bundled
    recorded = load_model_defaults(bundled_model_path())["results"]
    _, rows = make_arithmetic_splits(0, recorded["n_eval"], 0)
    greedy = builder.evaluate(model, tokenizer, rows, TINY_SYSTEM_PROMPT)
    assert greedy["accuracy"] == recorded["greedy_accuracy"]
    assert greedy["well_formed"] == recorded["greedy_well_formed"]
    assert greedy["anywhere_accuracy"] == recorded["greedy_anywhere_accuracy"]
