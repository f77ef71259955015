"""End-to-end training throughput on CPU: krpo-fast's trainer vs TRL's GRPOTrainer.

What is measured, side by side in one process (variants alternate, round after round):

- ``krpo-fast``: ``krpo_fast.trainer.train`` with the fused ops (HF generate backend).
- ``krpo-fast eager (paper ref)``: the same trainer with ``group_advantages`` and
  ``policy_loss_from_hidden`` swapped for the paper-style references
  (``group_advantages_reference``; full logits ``hidden @ W.T`` ->
  ``token_logprobs_reference`` -> ``policy_loss_reference``).
- ``krpo-fast eager (vectorised)``: the same with ``bench/eager.py``'s batched torch
  (``group_advantages_eager``; full logits -> ``selective_log_softmax_eager`` ->
  ``policy_loss_eager``).
- ``TRL GRPOTrainer``: plain ``trl.GRPOTrainer`` (HF generate, ``use_vllm=False``) on the
  same model, the same questions in the same order with the same system prompt, G, P,
  completion length, temperature, AdamW learning rate, beta 0, one iteration, one
  optimizer step per generation round.

Per optimizer step: generation time, no-grad log-prob pass time (old/ref log-probs; with
beta 0 and one epoch neither trainer runs one, so it is ~0), the rest of the step
(rewards, advantages, forward/backward, optimizer: "train"), and completion tokens per
second of step time. Medians over the steps after a warm-up step of each run.

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
from eager import group_advantages_eager, policy_loss_eager, selective_log_softmax_eager

import krpo_fast.policy as krpo_policy
import krpo_fast.trainer as krpo_trainer
from krpo_fast import defaults
from krpo_fast.config import TrainConfig
from krpo_fast.data import format_prompt, make_arithmetic_splits
from krpo_fast.reference import (
    group_advantages_reference,
    policy_loss_reference,
    token_logprobs_reference,
)
from krpo_fast.rewards import graded_reward
from krpo_fast.tiny_model import bundled_model_path, load_model_defaults

RESULTS = Path(__file__).parent / "results" / "cpu" / "trainer_throughput.md"
COMMAND = "OMP_NUM_THREADS=1 python bench/bench_trainer_throughput.py"
TRAIN_SIZE = 5000  # TrainConfig's default; the same split for both trainers
EVAL_SIZE = 8  # krpo-fast's before/after accuracy: small, and outside the timed steps

Step = dict[str, float]


# --------------------------------------------------------------------------- eager ops
def _loss_paper(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = defaults.TEMPERATURE,
    eps_low: float = defaults.EPS_LOW,
    eps_high: float = defaults.EPS_HIGH,
    beta: float = defaults.BETA,
    loss_agg: str = defaults.LOSS_AGG,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full logits, then the paper-style log-probs and loss (the trainer's signature)."""
    logits = hidden @ weight.T
    logp = token_logprobs_reference(logits, targets, temperature=temperature)
    return policy_loss_reference(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        loss_agg=loss_agg,
        max_len=max_len,
    )


def _loss_vectorised(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = defaults.TEMPERATURE,
    eps_low: float = defaults.EPS_LOW,
    eps_high: float = defaults.EPS_HIGH,
    beta: float = defaults.BETA,
    loss_agg: str = defaults.LOSS_AGG,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full logits, then ``bench/eager.py`` (seq-mean-token-mean only)."""
    assert loss_agg == defaults.LOSS_AGG, loss_agg
    logp = selective_log_softmax_eager(hidden @ weight.T, targets, temperature=temperature)
    old = logp.detach() if old_logp is None else old_logp
    ref = logp.detach() if ref_logp is None else ref_logp
    loss = policy_loss_eager(
        logp, old, ref, advantages, mask, eps_low=eps_low, eps_high=eps_high, beta=beta
    )
    zero = torch.zeros((), device=loss.device)
    return loss, {"kl": zero, "clip_fraction": zero}


OPS: dict[str, tuple[Callable[..., Any], Callable[..., Any]] | None] = {
    "fused": None,
    "eager-paper": (group_advantages_reference, _loss_paper),
    "eager-vectorised": (group_advantages_eager, _loss_vectorised),
}


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


# --------------------------------------------------------------------------- krpo-fast
def run_krpo(
    args: argparse.Namespace, ops: str, workdir: Path, micro_batch_size: int = 4
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
        generation_backend="hf",
        device="cpu",
        train_size=TRAIN_SIZE,
        eval_size=EVAL_SIZE,
        save_steps=0,
        seed=args.seed,
        micro_batch_size=micro_batch_size,
    )
    logprob_s: list[float] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _patched(
                krpo_policy,
                "completion_logprobs",
                _timed(krpo_policy.completion_logprobs, logprob_s, nograd_only=True),
            )
        )
        swap = OPS[ops]
        calls: list[float] = []
        if swap is not None:
            adv, loss = (_timed(fn, calls) for fn in swap)
            stack.enter_context(_patched(krpo_trainer, "group_advantages", adv))
            stack.enter_context(_patched(krpo_policy, "policy_loss_from_hidden", loss))
        krpo_trainer.train(cfg)
    # The swap took: one advantage call per step, one loss call per micro-batch.
    assert swap is None or len(calls) >= 2 * args.steps, len(calls)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for row in rows:
        B = args.prompts * args.group
        tokens = row["completion_len"] * B
        gen = tokens / row["gen_tokens_per_s"]
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


def run_trl(args: argparse.Namespace, workdir: Path) -> list[Step]:
    """``args.steps`` TRL GRPOTrainer steps, timed by a callback and method wrappers."""
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
    trainer._generate = _timed(trainer._generate, gen_s)
    trainer._get_per_token_logps_and_entropies = _timed(
        trainer._get_per_token_logps_and_entropies, logprob_s, nograd_only=True
    )
    steps: list[Step] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            gen_s.clear()
            logprob_s.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            total = time.perf_counter() - self.t0
            steps.append({"gen": sum(gen_s), "logprob": sum(logprob_s), "step": total})

    trainer.add_callback(Timer())
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "loss" in h]
    assert len(lengths) == len(steps), (len(lengths), len(steps))
    for s, mean_len in zip(steps, lengths, strict=True):
        s["tokens"] = mean_len * args.prompts * args.group
        s["train"] = s["step"] - s["gen"] - s["logprob"]
    return steps


# --------------------------------------------------------------------------- report
VARIANTS: dict[str, Callable[[argparse.Namespace, Path], list[Step]]] = {
    "krpo-fast (fused ops)": lambda a, d: run_krpo(a, "fused", d),
    "krpo-fast (fused ops), micro_batch_size 16": lambda a, d: run_krpo(a, "fused", d, 16),
    "krpo-fast, eager ops (paper reference)": lambda a, d: run_krpo(a, "eager-paper", d),
    "krpo-fast, eager ops (vectorised)": lambda a, d: run_krpo(a, "eager-vectorised", d),
    "TRL GRPOTrainer": run_trl,
}


def summarise(steps: list[Step]) -> dict[str, float]:
    med = {k: statistics.median(s[k] for s in steps) for k in ("gen", "logprob", "train", "step")}
    med["tokens"] = statistics.median(s["tokens"] for s in steps)
    med["tok_s"] = statistics.median(s["tokens"] / s["step"] for s in steps)
    med["gen_tok_s"] = statistics.median(s["tokens"] / s["gen"] for s in steps)
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
        f"Command: `{COMMAND}` (script: `bench/bench_trainer_throughput.py`).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, shared with "
        "another training job (noisy); torch threads 1, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}. "
        f"`/proc/loadavg` before: `{load[0]}`, after: `{load[1]}`. Wall time {wall:.0f} s.",
        "",
        f"Versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}.",
        "",
        f"Settings: bundled char-level Llama (0.65M params), arithmetic prompts with its "
        f"system prompt, P={args.prompts} prompts x G={args.group} completions per step, "
        f"max_new_tokens={args.max_new_tokens}, temperature {args.temperature}, top_p 1, "
        f"AdamW lr {args.lr} constant, grad clip 1.0, beta 0, one update per generation "
        "round, HF `generate` for both (TRL `use_vllm=False`), fp32, seed "
        f"{args.seed}. The variants alternate in one process over {args.rounds} round(s) of "
        f"{args.steps} steps each; the first step of every run is a warm-up and dropped, "
        "so each row is the median of "
        f"{args.rounds * (args.steps - args.warmup)} steps. TRL gets the same questions in "
        "the same order (`shuffle_dataset=False`). krpo-fast uses its defaults otherwise: "
        "Kalman advantages, packed micro-batches of 4 sequences (one extra row: 16); TRL: "
        "`loss_type='grpo'`, group-std advantages, one padded batch of P*G.",
        "",
        "Columns (per optimizer step, medians): generation = sampling the P*G completions; "
        "log-prob = no-grad old/ref log-prob passes: with beta 0 and one epoch neither "
        "trainer runs one (both measured, ~0); train = the rest of the step (rewards, "
        "advantages, forward/backward, optimizer); tokens/s = completion tokens (EOS "
        "included) generated per second of step time.",
        "",
        "| trainer | tokens/step | generation s | log-prob s | train s | step s "
        "| gen tokens/s | tokens/s | vs TRL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    trl_rate = results.get("TRL GRPOTrainer", {}).get("tok_s")
    for name, r in results.items():
        ratio = f"{r['tok_s'] / trl_rate:.2f}x" if trl_rate else "n/a"
        lines.append(
            f"| {name} | {r['tokens']:.0f} | {r['gen']:.3f} | {r['logprob']:.3f} | "
            f"{r['train']:.3f} | {r['step']:.3f} | {r['gen_tok_s']:.0f} | "
            f"{r['tok_s']:.0f} | {ratio} |"
        )
    fused = results.get("krpo-fast (fused ops)")
    lines += ["", "Ratios (tokens/s, medians):", ""]
    if fused and trl_rate:
        lines.append(
            f"- krpo-fast / TRL GRPOTrainer: **{fused['tok_s'] / trl_rate:.2f}x** "
            "(issue 9 goal: >= 2x)."
        )
        t = results["TRL GRPOTrainer"]
        lines.append(
            f"- train time, TRL / krpo-fast: {t['train'] / fused['train']:.2f}x; "
            f"generation time, TRL / krpo-fast: {t['gen'] / fused['gen']:.2f}x."
        )
    for name in ("krpo-fast, eager ops (paper reference)", "krpo-fast, eager ops (vectorised)"):
        if fused and name in results:
            e = results[name]
            lines.append(
                f"- fused / {name.split(', ', 1)[1]}: tokens/s {fused['tok_s'] / e['tok_s']:.2f}x, "
                f"train time {e['train'] / fused['train']:.2f}x."
            )
    lines += [
        "",
        "Notes:",
        "",
        "- Generation is HF `generate` on the same fp32 model and the same questions in "
        "every row (TRL calls it through its own wrapper), so its times are expected to "
        "differ mostly by noise.",
        "- The bundled model has a 101-token vocabulary and hidden size 128: the logits of a "
        "step are about 2.7k x 101 floats, so the LM head, log-softmax, loss and advantages "
        "are a negligible share of the step on CPU, and swapping the fused ops for eager "
        "ones changes nothing measurable. The train time is the transformer "
        "forward/backward and the optimizer. The fused ops' gains are a GPU and "
        "large-vocabulary matter (the GPU part of the issue is measured separately).",
        "- Packing more sequences per micro-batch is slower on CPU (the micro_batch_size 16 "
        "row): the packed attention costs grow with the square of the packed length.",
        "- TRL's train column also holds its reward scoring and its tokenising and padding "
        "around `_generate`; krpo-fast's holds its rewards and advantages too.",
        "- Not measured here: krpo-fast's default CPU backend is vLLM (`--generation_backend "
        "auto`); it is left out because the comparison fixes the same backend for both "
        "trainers. `bench/results/cpu/generation_backend.md` measured vLLM generation "
        "about 1.4x faster than HF on this machine, which would shorten only the "
        "generation column.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped per run")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = Path("/proc/loadavg").read_text().strip()
    started = time.perf_counter()
    steps: dict[str, list[Step]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
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
