"""Build the bundled tiny model: a character-level Llama SFT-pretrained on the arithmetic task.

``OMP_NUM_THREADS=1 python scripts/build_tiny_model.py --output krpo_fast/assets/tiny_llama``
rebuilds it from a fixed seed: it builds the tokenizer and a small ``LlamaForCausalLM``
and trains it with supervised fine-tuning on :data:`krpo_fast.data.DEFAULT_TASK` (loss on
completion tokens only), until a held-out greedy accuracy target or ``max_steps``.

The SFT targets mix two completion formats on purpose, chosen per row by a seeded draw
whose odds depend on the question's operator (``Recipe.tagged_fraction``): the tagged
``<think>12+7=19</think><answer>19</answer>`` and the untagged
``<think>12+7=19</think>19``, which the graded reward scores 0 and exact match counts as
wrong. The bundled model saw 90% tagged rows for ``+`` questions and 30% for ``-`` ones,
so greedy decoding tags ``+`` answers and leaves ``-`` answers bare, while sampling still
tags ``-`` answers now and then: RL can raise the tagged accuracy by learning the format
on ``-`` questions, besides any arithmetic it learns. :func:`evaluate` reports the tagged
accuracy, the well-formed rate and the answer-anywhere accuracy (tag or bare answer) to
tell the two apart; it generates with the trainer's own HF generation loop
(``krpo_fast.rollout``).

The folder it writes loads offline with ``AutoTokenizer`` and ``AutoModelForCausalLM``
(``krpo_fast.tiny_model`` locates and reads it); its ``krpo_fast.json`` holds the system
prompt the model was trained with (the trainer's default for it), the completion formats
and mix, and the training recipe and results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch

from krpo_fast.data import (
    DEFAULT_TASK,
    ArithmeticTask,
    format_prompt,
    is_test_question,
    make_arithmetic_splits,
)
from krpo_fast.rewards import _answer_tag, exact_match_reward, graded_reward
from krpo_fast.rollout import HFGenerator, greedy_completions
from krpo_fast.tiny_model import CONFIG_NAME, bundled_model_path

# Short on purpose: a character-level model pays one token per character, and the paper's
# ~370-character prompt would make every RL step several times slower.
TINY_SYSTEM_PROMPT = "Think in <think> </think>, then answer in <answer> </answer>."

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
MAX_NEW_TOKENS = 48  # an answer to the bundled task fits in well under 48 characters
EVAL_BATCH_SIZE = 256  # sequences per generate call

# One line per message; the template emits BOS itself (the tokenizer adds no special tokens),
# and ends assistant turns with EOS so generation learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Q:' + message['content'] + '\n' }}"
    "{% else %}{{ 'A:' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)


def build_tokenizer() -> Any:
    """A character-level fast tokenizer over printable ASCII plus newline and tab.

    Every other character becomes ``<|unk|>``. Decoding concatenates characters (no
    spaces between tokens), and tokenization-space clean-up is off, so decode(encode(s))
    gives back any ASCII string ``s``.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))  # printable ASCII, \n, \t
    vocab = {token: i for i, token in enumerate(specials + chars)}
    # BPE without merges splits text into characters and maps unknown ones to UNK.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # generation pads on the left
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: Any, seed: int) -> Any:
    """A freshly initialised small ``LlamaForCausalLM`` (about 0.6M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


TAGGED_FORMAT = "<think>{question}={answer}</think><answer>{answer}</answer>"
UNTAGGED_FORMAT = "<think>{question}={answer}</think>{answer}"
_OPERATOR_NAMES = {"+": "plus", "-": "minus", "*": "times"}


def completion_text(row: dict[str, Any], tagged: bool = True) -> str:
    """The SFT target for a row: the expression worked out in the think, then the answer,
    inside ``<answer>`` tags (``tagged``) or written bare after the think."""
    template = TAGGED_FORMAT if tagged else UNTAGGED_FORMAT
    return template.format(question=row["question"], answer=row["answer"])


def question_operator(question: str) -> str:
    """The first operator of an arithmetic question (a leading minus sign is not one)."""
    for ch in question[1:]:
        if ch in _OPERATOR_NAMES:
            return ch
    raise ValueError(f"no operator in {question!r}")


def final_answer(completion: str) -> str | None:
    """The answer a completion gives, read from anywhere: the ``<answer>`` tag's content
    when there is one, else the bare text after the last ``</think>`` (None without it)."""
    tag = _answer_tag(completion)
    if tag is not None:
        return tag
    head, sep, tail = completion.rpartition("</think>")
    return tail.strip() if sep else None


def _sft_batch(
    tokenizer: Any, rows: list[dict[str, Any]], system_prompt: str, tagged: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside the completion)."""
    sequences, n_prompt = [], []
    for row, row_tagged in zip(rows, tagged, strict=True):
        prompt = tokenizer.encode(format_prompt(tokenizer, row["question"], system_prompt))
        completion = tokenizer.encode(completion_text(row, row_tagged))
        completion.append(tokenizer.eos_token_id)
        sequences.append(prompt + completion)
        n_prompt.append(len(prompt))
    length = max(map(len, sequences))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    for i, (seq, n) in enumerate(zip(sequences, n_prompt, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, n : len(seq)] = ids[i, n : len(seq)]
    return ids, mask, labels


def sampled_completions(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    num_samples: int,
    temperature: float,
    seed: int,
) -> list[list[str]]:
    """``num_samples`` decoded completions per prompt, sampled at ``temperature`` (> 0);
    each generate call is seeded with ``seed`` plus its first prompt's index."""
    generator = HFGenerator(model, tokenizer)
    prompts_per_call = max(1, EVAL_BATCH_SIZE // num_samples)
    samples: list[list[str]] = []
    for start in range(0, len(prompt_ids), prompts_per_call):
        batch = prompt_ids[start : start + prompts_per_call]
        ids = generator.generate(batch, num_samples, temperature, 1.0, MAX_NEW_TOKENS, seed + start)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        samples += [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]
    return samples


def evaluate(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    system_prompt: str,
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy (first sample), pass@num_samples, the well-formed-tags rate and the
    answer-anywhere accuracy (first sample) on ``rows``; greedy when ``temperature`` is 0
    (one completion per prompt, as the trainer's held-out accuracy).

    A completion is correct when its stripped ``<answer>`` content equals the answer (the
    trainer's exact match), well formed when it has an ``<answer>...</answer>`` tag (a
    non-zero graded reward), and correct anywhere when :func:`final_answer` (tag or bare
    text after the think) equals it.
    """
    prompt_ids = [
        tokenizer.encode(
            format_prompt(tokenizer, r["question"], system_prompt), add_special_tokens=False
        )
        for r in rows
    ]
    if temperature > 0:
        samples = sampled_completions(model, tokenizer, prompt_ids, num_samples, temperature, seed)
    else:
        generator = HFGenerator(model, tokenizer)
        texts = greedy_completions(
            generator, tokenizer, prompt_ids, MAX_NEW_TOKENS, EVAL_BATCH_SIZE
        )
        samples = [[text] for text in texts]
    first, anywhere, any_correct, formed, total = 0.0, 0.0, 0.0, 0.0, 0
    for row, completions in zip(rows, samples, strict=True):
        answers = [row["answer"]] * len(completions)
        correct = exact_match_reward([], completions, answers)
        first += correct[0]
        anywhere += final_answer(completions[0]) == row["answer"]
        any_correct += max(correct)
        formed += sum(r > 0 for r in graded_reward([], completions, answers))
        total += len(completions)
    n = len(rows)
    return {
        "accuracy": first / n,
        f"pass@{num_samples}": any_correct / n,
        "well_formed": formed / total,
        "anywhere_accuracy": anywhere / n,
    }


@dataclasses.dataclass
class Recipe:
    """SFT settings; the defaults are the ones the bundled model was built with."""

    seed: int = 0
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 20
    max_steps: int = 1900
    eval_every: int = 100
    n_eval: int = 200
    # Stop early once this greedy metric ("accuracy": tagged and exact, or
    # "anywhere_accuracy", see evaluate) reaches the target; the bundled build never did.
    target_accuracy: float = 0.65
    target_metric: str = "anywhere_accuracy"
    # Share of SFT rows in the tagged format, per operator of the question; the rest
    # end with the bare answer after the think (UNTAGGED_FORMAT).
    tagged_fraction: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"+": 0.9, "-": 0.3, "*": 1.0}
    )
    task: ArithmeticTask = DEFAULT_TASK
    system_prompt: str = TINY_SYSTEM_PROMPT


def pretrain(recipe: Recipe, output: Path, command: str = "") -> dict[str, Any]:
    """Build, SFT-train and save the tiny model into ``output``; returns the results."""
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, recipe.seed)
    _, test_rows = make_arithmetic_splits(0, recipe.n_eval, recipe.seed, recipe.task)
    rng = random.Random(recipe.seed)
    # Formats come from their own stream, so the questions do not depend on the mix.
    style_rng = random.Random(f"style-{recipe.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    # Linear warm-up, then linear decay to a tenth: a constant rate left loss spikes late on.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(
            (s + 1) / recipe.warmup_steps,
            1.0 - 0.9 * (s - recipe.warmup_steps) / max(1, recipe.max_steps - recipe.warmup_steps),
        ),
    )
    model.train()
    step, greedy = 0, {}
    while step < recipe.max_steps:
        rows: list[dict[str, Any]] = []
        while len(rows) < recipe.batch_size:
            row = recipe.task.sample(rng)
            if not is_test_question(row["question"]):
                rows.append(row)
        tagged = [
            style_rng.random() < recipe.tagged_fraction[question_operator(r["question"])]
            for r in rows
        ]
        ids, mask, labels = _sft_batch(tokenizer, rows, recipe.system_prompt, tagged)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % recipe.eval_every == 0:
            greedy = evaluate(model, tokenizer, test_rows, recipe.system_prompt)
            elapsed = time.perf_counter() - started
            print(
                f"step {step} loss {loss.item():.4f} greedy accuracy {greedy['accuracy']:.3f} "
                f"well-formed {greedy['well_formed']:.3f} "
                f"anywhere {greedy['anywhere_accuracy']:.3f} ({elapsed:.0f} s)",
                flush=True,
            )
            if greedy[recipe.target_metric] >= recipe.target_accuracy:
                break
    sampled = evaluate(model, tokenizer, test_rows, recipe.system_prompt, 8, 1.0, recipe.seed)
    sampled_t07 = evaluate(model, tokenizer, test_rows, recipe.system_prompt, 8, 0.7, recipe.seed)
    results = {
        "steps": step,
        "greedy_accuracy": greedy.get("accuracy"),
        "greedy_well_formed": greedy.get("well_formed"),
        "greedy_anywhere_accuracy": greedy.get("anywhere_accuracy"),
        "sampled_accuracy_t1": sampled["accuracy"],
        "pass@8_t1": sampled["pass@8"],
        "sampled_well_formed_t1": sampled["well_formed"],
        "sampled_anywhere_accuracy_t1": sampled["anywhere_accuracy"],
        "pass@8_t0.7": sampled_t07["pass@8"],
        "sampled_well_formed_t0.7": sampled_t07["well_formed"],
        "n_eval": recipe.n_eval,
        "seconds": round(time.perf_counter() - started, 1),
    }
    save(model, tokenizer, output, recipe, results, command)
    return results


def save(
    model: Any,
    tokenizer: Any,
    output: Path,
    recipe: Recipe,
    results: dict[str, Any],
    command: str = "",
) -> None:
    """Write the model (safetensors), tokenizer, generation config and krpo_fast.json."""
    from transformers import GenerationConfig

    output.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    # transformers 5 writes its own class name; the 4.x name loads on both major versions.
    tokenizer_config = output / "tokenizer_config.json"
    config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    recipe_dict = dataclasses.asdict(recipe)
    del recipe_dict["system_prompt"]
    meta = {
        "system_prompt": recipe.system_prompt,
        "completion_format": {
            "tagged": TAGGED_FORMAT,
            "untagged": UNTAGGED_FORMAT,
            "tagged_fraction_by_operator": recipe.tagged_fraction,
        },
        "recipe": recipe_dict,
        "results": results,
        "command": command,
        "versions": {"torch": torch.__version__},
    }
    (output / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Command line: rebuild the bundled model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=bundled_model_path())
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--max-steps", type=int, default=Recipe.max_steps)
    parser.add_argument("--target-accuracy", type=float, default=Recipe.target_accuracy)
    parser.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--eval-every", type=int, default=Recipe.eval_every)
    parser.add_argument(
        "--target-metric", choices=["accuracy", "anywhere_accuracy"], default=Recipe.target_metric
    )
    default_mix = Recipe().tagged_fraction
    for op, name in _OPERATOR_NAMES.items():
        parser.add_argument(
            f"--tagged-{name}",
            type=float,
            default=default_mix[op],
            help=f"share of SFT rows whose first operator is {op!r} in the tagged format",
        )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "scripts/build_tiny_model.py", *sys.argv[1:]])
    print("command:", command, flush=True)
    # One thread: the machines are 2 shared cores, and two threads under contention crawl.
    torch.set_num_threads(1)
    recipe = Recipe(
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.max_steps,
        target_accuracy=args.target_accuracy,
        eval_every=args.eval_every,
        target_metric=args.target_metric,
        tagged_fraction={op: getattr(args, f"tagged_{n}") for op, n in _OPERATOR_NAMES.items()},
    )
    results = pretrain(recipe, args.output, command)
    print("result:", json.dumps(results))


if __name__ == "__main__":
    main()
