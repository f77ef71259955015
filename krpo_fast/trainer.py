"""The KRPO training loop, in one function.

Per step: sample prompts -> G completions each (vLLM or HF generate) -> rewards ->
group advantages (Kalman by default) -> old/ref log-probs when needed -> mu epochs
of packed micro-batches through the fused LM-head loss -> AdamW -> push weights to
the engine. Everything random in a step derives from (seed, step), so a resumed
run repeats what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from krpo_fast import distributed
from krpo_fast.checkpoint import load_trainer_state, resolve_resume, save_checkpoint
from krpo_fast.config import EvalConfig, TrainConfig
from krpo_fast.data import (
    DEFAULT_TASK,
    PAPER_SYSTEM_PROMPT,
    ArithmeticTask,
    format_prompt,
    load_jsonl,
    make_arithmetic_splits,
)
from krpo_fast.ops import group_advantages
from krpo_fast.plots import plot_metrics
from krpo_fast.policy import PackedBatch, PolicyLoss, load_policy, pack
from krpo_fast.rewards import add_reward_noise, compute_rewards, exact_match_reward, load_reward_fn
from krpo_fast.rollout import (
    Generator,
    HFGenerator,
    VLLMGenerator,
    greedy_correct,
    resolve_backend,
)
from krpo_fast.tiny_model import CONFIG_NAME, bundled_model_path, load_model_defaults


def resolve_model(model: str) -> str:
    """A local model folder, or a Hugging Face id that resolves; else FileNotFoundError."""
    if not model:
        return str(bundled_model_path())
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: no config.json in this folder")
        return model
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model)
    except OSError:
        raise FileNotFoundError(
            f"--model {model}: no such folder, and not a Hugging Face model id"
        ) from None
    return model


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_rows(
    dataset: str,
    eval_dataset: str,
    train_size: int,
    eval_size: int,
    seed: int,
    task: ArithmeticTask = DEFAULT_TASK,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) from the generated task or JSONL files."""
    if dataset == "arithmetic":
        train, test = make_arithmetic_splits(train_size, eval_size, seed, task)
    else:
        if not Path(dataset).is_file():
            raise FileNotFoundError(f"--dataset {dataset}: no such file")
        rows = load_jsonl(dataset)
        if eval_dataset:
            train, test = rows, []
        else:
            if len(rows) <= eval_size:
                raise ValueError(
                    f"--dataset {dataset}: {len(rows)} rows leave none for training after "
                    f"{eval_size} held-out rows (lower --eval_size or pass --eval_dataset)"
                )
            train, test = rows[: len(rows) - eval_size], rows[len(rows) - eval_size :]
    if eval_dataset:
        if not Path(eval_dataset).is_file():
            raise FileNotFoundError(f"--eval_dataset {eval_dataset}: no such file")
        test = load_jsonl(eval_dataset)[:eval_size]
    return train, test


def encode_prompts(
    tokenizer: Any, questions: list[str], system_prompt: str
) -> tuple[list[str], list[list[int]]]:
    texts = [format_prompt(tokenizer, q, system_prompt) for q in questions]
    # A chat template writes its own special tokens (BOS included when it wants one).
    special = not getattr(tokenizer, "chat_template", None)
    return texts, [tokenizer.encode(t, add_special_tokens=special) for t in texts]


def make_generator(
    backend: str,
    model_path: str,
    policy: torch.nn.Module,
    tokenizer: Any,
    device: torch.device,
    cfg: TrainConfig | EvalConfig,
    cache_dir: str | None,
    sharded: bool = False,
) -> Generator:
    """The rollout engine; a sharded (FSDP2) policy generates through a full copy."""
    if backend == "vllm":
        engine = VLLMGenerator(
            model_path,
            device,
            cfg.vllm_kv_cache_bytes,
            cfg.seed,
            cache_dir,
            getattr(cfg, "vllm_tensor_parallel_size", 1),
        )
    elif sharded:
        engine = HFGenerator(load_policy(model_path, device, trainable=False), tokenizer, True)
    else:
        return HFGenerator(policy, tokenizer)
    engine.sync(distributed.full_model_state(policy))  # the policy may differ (resume)
    return engine


def setup(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def _sample_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**31 - 1)


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


class GradientSpread:
    """How much the micro-batch gradient estimates of one optimizer step disagree.

    Micro-batch k adds ``w_k * g_k`` to the accumulated gradient (``w_k``: its share of
    the step's sequences), so ``g_k`` is its own estimate of the step's policy gradient.
    Per step this gives ``var = sum_k |g_k - mean|^2 / (n - 1)`` (the trace of the
    covariance of one micro-batch's estimate) and ``mean_sq = |mean|^2``; their ratio is
    scale-free, so estimators whose advantages differ in scale compare fairly.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.reset()

    def reset(self) -> None:
        self.previous: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.total_sq, self.count = 0.0, 0

    def add(self, weight: float) -> None:
        """Record the micro-batch just back-propagated with loss weight ``weight``."""
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params]
        ).double()
        estimate = (flat if self.previous is None else flat - self.previous) / weight
        self.previous = flat
        self.total = estimate if self.total is None else self.total + estimate
        self.total_sq += float(estimate.square().sum())
        self.count += 1

    def finish(self) -> tuple[float, float] | None:
        """(var, mean_sq) of the step just ended (None under two micro-batches); resets."""
        n, total, total_sq = self.count, self.total, self.total_sq
        self.reset()
        if n < 2 or total is None:
            return None
        mean_sq = float((total / n).square().sum())
        return max(0.0, (total_sq - n * mean_sq) / (n - 1)), mean_sq


def backward_micro_batches(
    model: torch.nn.Module,
    batches: list[PackedBatch],
    advantages: list[torch.Tensor],
    old_logp: list[torch.Tensor | None],
    ref_logp: list[torch.Tensor | None],
    spread: GradientSpread | None = None,
) -> tuple[dict[str, list[float]], bool]:
    """Forward and backward of one accumulation group through ``model`` (a
    :class:`PolicyLoss`, maybe wrapped in DDP/FSDP2); gradients sync once, on the last.

    Each micro-batch loss is weighted by its share of the group's sequences, so the
    accumulated gradient is that of the group's mean loss. Returns the finite losses'
    metrics and whether every loss was finite.
    """
    n_seqs = sum(len(a) for a in advantages)
    stats: dict[str, list[float]] = {"loss": [], "kl": [], "clip_fraction": []}
    finite = True
    for k, batch in enumerate(batches):
        weight = len(advantages[k]) / n_seqs
        with distributed.no_grad_sync(model, k + 1 < len(batches)):
            loss, metrics = model(batch, advantages[k], old_logp[k], ref_logp[k])
            # A non-finite loss is back-propagated too: every rank must join the gradient
            # sync, and the NaN it spreads makes every rank skip the update together.
            (loss * weight).backward()
        if torch.isfinite(loss):
            stats["loss"].append(loss.item())
            stats["kl"].append(metrics["kl"].item())
            stats["clip_fraction"].append(metrics["clip_fraction"].item())
            if spread is not None:
                spread.add(weight)
        else:
            finite = False
    return stats, finite


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run KRPO training as configured; return the summary (also written to summary.json).

    Under ``torchrun`` each rank takes an equal share of every step's prompts; rank 0
    writes the metrics, plots, summary and checkpoints.
    """
    started = time.perf_counter()
    setup(cfg.torch_threads)
    rank, world, device = distributed.setup(resolve_device(cfg.device))
    try:
        summary = _train(cfg, rank, world, device, started)
        distributed.barrier()  # no rank tears the group down while another still uses it
        return summary
    finally:
        distributed.shutdown()


def _train(
    cfg: TrainConfig, rank: int, world: int, device: torch.device, started: float
) -> dict[str, Any]:
    main_rank = rank == 0
    if cfg.prompts_per_step % world:
        raise ValueError(
            f"--prompts_per_step {cfg.prompts_per_step} must be divisible by the number of "
            f"ranks ({world}): groups never span ranks"
        )
    if world > 1 and cfg.vllm_tensor_parallel_size > 1:
        raise ValueError("--vllm_tensor_parallel_size > 1 is for single-process runs")
    if cfg.fsdp and world == 1:
        print("notice: --fsdp has no effect on one rank (launch with torchrun)")
    model_path = resolve_model(cfg.model)
    out = Path(cfg.output_dir)
    resume_from = resolve_resume(cfg.resume, out)
    system_prompt = (
        cfg.system_prompt
        or load_model_defaults(model_path).get("system_prompt")
        or PAPER_SYSTEM_PROMPT
    )
    train_rows, eval_rows = load_rows(
        cfg.dataset, cfg.eval_dataset, cfg.train_size, cfg.eval_size, cfg.seed, cfg.task()
    )
    reward_fn = load_reward_fn(cfg.reward)
    backend = resolve_backend(cfg.generation_backend, device)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16
    )
    settings = dict(
        temperature=cfg.temperature,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        beta=cfg.beta,
        loss_agg=cfg.loss_agg,
        max_len=cfg.max_new_tokens,
        autocast=autocast,
    )
    policy = load_policy(resume_from or model_path, device, True, cfg.gradient_checkpointing)
    sharded = cfg.fsdp and world > 1
    model = distributed.wrap(PolicyLoss(policy, **settings), sharded, device)
    ref = None
    if cfg.beta > 0:
        frozen = PolicyLoss(load_policy(model_path, device, trainable=False), **settings)
        ref = distributed.wrap(frozen, True, device) if sharded else frozen
    # After wrapping: FSDP2 replaces the parameters with sharded ones.
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1))
    )
    generator = make_generator(
        backend, model_path, policy, tokenizer, device, cfg, str(out / ".vllm_cache"), sharded
    )
    # Seed after the engine exists: vLLM reseeds the global RNGs when it starts.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    run = {"step": 0, "accuracy_before": None, "elapsed": 0.0}
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        state = load_trainer_state(resume_from, None, scheduler)
        distributed.load_optimizer_state(policy, optimizer, state["optimizer"])
        run = {k: state[k] for k in run}
        if main_rank:
            # Rows logged after the checkpoint by the killed run are redone below.
            rows = _read_jsonl(metrics_path, torn_ok=True)
            kept = [r for r in rows if r["step"] <= run["step"]]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            print(f"resumed from {resume_from} at step {run['step']}")
    elif main_rank:
        metrics_path.write_text("")

    train_texts, train_ids = encode_prompts(
        tokenizer, [r["question"] for r in train_rows], system_prompt
    )
    # Each rank scores every world-th held-out row; the counts are summed.
    _, eval_ids = encode_prompts(
        tokenizer, [r["question"] for r in eval_rows[rank::world]], system_prompt
    )
    eval_answers = [r["answer"] for r in eval_rows[rank::world]]

    def held_out_accuracy() -> float:
        correct = greedy_correct(
            generator, tokenizer, eval_ids, eval_answers, cfg.max_new_tokens, cfg.eval_batch_size
        )
        total = distributed.all_reduce(torch.tensor([sum(correct)], dtype=torch.float64))
        return total.item() / len(eval_rows)

    if run["accuracy_before"] is None:
        run["accuracy_before"] = held_out_accuracy()
        if main_rank:
            print(f"held-out accuracy before training: {run['accuracy_before']:.3f}")

    G, P = cfg.group_size, cfg.prompts_per_step
    B = P * G
    local_prompts = P // world
    local_seqs = local_prompts * G
    micro = cfg.micro_batch_size or local_seqs
    chunks = _batches(local_seqs, micro)
    accum = cfg.gradient_accumulation_steps or len(chunks)
    groups = [list(range(s, min(s + accum, len(chunks)))) for s in range(0, len(chunks), accum)]
    copy_files = [p for p in [Path(model_path) / CONFIG_NAME] if p.is_file()]
    spread = GradientSpread(list(policy.parameters())) if cfg.log_grad_variance else None
    bar = tqdm(
        range(run["step"], cfg.max_steps),
        initial=run["step"],
        total=cfg.max_steps,
        desc="krpo",
        dynamic_ncols=True,
        disable=not main_rank,
    )
    last_eval = None
    for step in bar:
        t0 = time.perf_counter()
        # --- rollouts: every rank draws the same global prompts and keeps its share
        rng = np.random.default_rng([cfg.seed, step])
        picks = rng.choice(len(train_rows), size=P, replace=P > len(train_rows)).tolist()
        picks = picks[rank * local_prompts : (rank + 1) * local_prompts]
        prompt_ids = [train_ids[i] for i in picks]
        completion_ids = generator.generate(
            prompt_ids,
            G,
            cfg.temperature,
            cfg.top_p,
            cfg.max_new_tokens,
            _sample_seed(cfg.seed, step) + 7_777 * rank,
        )
        t_gen = time.perf_counter() - t0
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [train_texts[i] for i in picks for _ in range(G)]
        answers = [train_rows[i]["answer"] for i in picks for _ in range(G)]
        rewards = torch.tensor(compute_rewards(reward_fn, prompts, texts, answers))
        clean_rewards = rewards
        if cfg.reward_noise or cfg.reward_flip_rate:
            noise_rng = torch.Generator().manual_seed(_sample_seed(cfg.seed, step) + 17 + rank)
            rewards = add_reward_noise(rewards, cfg.reward_noise, cfg.reward_flip_rate, noise_rng)
        correct = torch.tensor(exact_match_reward(prompts, texts, answers))
        advantages = group_advantages(
            rewards.to(device),
            group_size=G,
            mode=cfg.adv_mode,
            process_var=cfg.process_var,
            meas_var=cfg.meas_var,
        )

        # --- updates
        t1 = time.perf_counter()
        seq_prompts = [p for p in prompt_ids for _ in range(G)]
        packed = [
            pack([seq_prompts[i] for i in c], [completion_ids[i] for i in c], device)
            for c in chunks
        ]
        adv = [advantages[c.start : c.stop] for c in chunks]
        with torch.no_grad():
            # On-policy with one epoch: the ratio is 1, the op takes old_logp=None.
            old = [model(p) if cfg.epochs_per_step > 1 else None for p in packed]
            ref_lp = [ref(p) if ref is not None else None for p in packed]
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "clip_fraction": []}
        norms, spreads, skipped = [], [], 0
        for _ in range(cfg.epochs_per_step):
            for group in groups:
                part, finite = backward_micro_batches(
                    model,
                    [packed[k] for k in group],
                    [adv[k] for k in group],
                    [old[k] for k in group],
                    [ref_lp[k] for k in group],
                    spread,
                )
                for key, values in part.items():
                    stats[key] += values
                if spread is not None and (result := spread.finish()) is not None:
                    spreads.append(result)
                norm = torch.nn.utils.clip_grad_norm_(
                    policy.parameters(), cfg.max_grad_norm or float("inf")
                )
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                # Every rank must agree: one with a non-finite loss vetoes the update.
                vetoed = distributed.all_reduce(torch.tensor([float(not finite)]), "max")
                if vetoed.item() or not torch.isfinite(norm):
                    skipped += 1  # a non-finite loss or gradient: drop this update
                else:
                    optimizer.step()
                    scheduler.step()
                    norms.append(norm.item())
                optimizer.zero_grad(set_to_none=True)
        generator.sync(distributed.full_model_state(policy))
        t_train = time.perf_counter() - t1

        # --- metrics over the global batch
        all_rewards = distributed.gather(rewards.float())
        all_advantages = distributed.gather(advantages.detach().float().cpu())
        lengths = torch.tensor([float(len(c)) for c in completion_ids])
        sums = distributed.all_reduce(
            torch.tensor(
                [
                    float(correct.sum()),
                    float(lengths.sum()),
                    float(clean_rewards.sum()),
                    float(cfg.epochs_per_step * sum(p.n_tokens for p in packed)),
                ],
                dtype=torch.float64,
            )
        )
        n_correct, gen_tokens, clean_sum, train_tokens = sums.tolist()
        slowest = distributed.all_reduce(torch.tensor([t_gen, t_train]), "max").tolist()
        row = {
            "step": step + 1,
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std().item() if B > 1 else 0.0,
            "accuracy": n_correct / B,
            "adv_mean": all_advantages.mean().item(),
            "adv_var": all_advantages.var().item() if B > 1 else 0.0,
            "kl": _global_mean(stats["kl"]),
            "clip_fraction": _global_mean(stats["clip_fraction"]),
            "loss": _global_mean(stats["loss"]),
            "grad_norm": _mean(norms),
            "lr": scheduler.get_last_lr()[0],
            "skipped_updates": skipped,
            "completion_len": gen_tokens / B,
            "gen_tokens_per_s": gen_tokens / slowest[0],
            "train_tokens_per_s": train_tokens / slowest[1],
            "step_time": time.perf_counter() - t0,
        }
        if cfg.reward_noise or cfg.reward_flip_rate:
            row["reward_clean_mean"] = clean_sum / B
        if spread is not None:
            row["grad_var"] = _global_mean([v for v, _ in spreads])
            row["grad_mean_sq"] = _global_mean([m for _, m in spreads])
        if step + 1 == cfg.max_steps or (cfg.eval_steps and (step + 1) % cfg.eval_steps == 0):
            row["eval_accuracy"] = last_eval = held_out_accuracy()
        if main_rank:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            if skipped:
                tqdm.write(f"step {step + 1}: skipped {skipped} update(s) with a non-finite loss")
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}")

        run["step"] = step + 1
        last = step + 1 == cfg.max_steps
        if last or (cfg.save_steps and run["step"] % cfg.save_steps == 0):
            run_now = {**run, "elapsed": run["elapsed"] + time.perf_counter() - started}
            # Gathering a sharded state needs every rank; writing it needs one.
            model_state = distributed.full_model_state(policy) if sharded else None
            optimizer_state = distributed.full_optimizer_state(policy, optimizer)
            if main_rank:
                save_checkpoint(
                    out,
                    run["step"],
                    policy,
                    tokenizer,
                    optimizer,
                    scheduler,
                    run_now,
                    copy_files,
                    cfg.save_total_limit,
                    model_state,
                    optimizer_state,
                )
            distributed.barrier()
    bar.close()

    if last_eval is None:  # resumed from the final checkpoint: nothing ran
        last_eval = held_out_accuracy()
    summary = {
        "accuracy_before": run["accuracy_before"],
        "accuracy_after": last_eval,
        "eval_size": len(eval_rows),
        "steps": run["step"],
        "wall_time_s": round(run["elapsed"] + time.perf_counter() - started, 1),
        "generation_backend": backend,
        "world_size": world,
        "model": model_path,
        "final_checkpoint": str(out / f"checkpoint-{run['step']}"),
    }
    if main_rank:
        rows = _read_jsonl(metrics_path)
        if rows:
            plot_metrics(rows, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Greedy held-out accuracy of a model (through vLLM when ``auto`` picks it)."""
    setup(cfg.torch_threads)
    device = resolve_device(cfg.device)
    model_path = resolve_model(cfg.model)
    system_prompt = (
        cfg.system_prompt
        or load_model_defaults(model_path).get("system_prompt")
        or PAPER_SYSTEM_PROMPT
    )
    if cfg.dataset == "arithmetic":
        _, rows = make_arithmetic_splits(0, cfg.eval_size, cfg.seed)
    elif not Path(cfg.dataset).is_file():
        raise FileNotFoundError(f"--dataset {cfg.dataset}: no such file")
    else:
        rows = load_jsonl(cfg.dataset)[: cfg.eval_size]
    backend = resolve_backend(cfg.generation_backend, device)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    policy = load_policy(model_path, device, trainable=False)
    generator = make_generator(backend, model_path, policy, tokenizer, device, cfg, None)
    _, ids = encode_prompts(tokenizer, [r["question"] for r in rows], system_prompt)
    correct = greedy_correct(
        generator,
        tokenizer,
        ids,
        [r["answer"] for r in rows],
        cfg.max_new_tokens,
        cfg.eval_batch_size,
    )
    return {
        "accuracy": sum(correct) / len(rows),
        "n": len(rows),
        "model": model_path,
        "generation_backend": backend,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _global_mean(values: list[float]) -> float | None:
    """Mean of every rank's ``values`` together (None when all are empty)."""
    total = distributed.all_reduce(torch.tensor([sum(values), len(values)], dtype=torch.float64))
    return total[0].item() / total[1].item() if total[1] else None


def _read_jsonl(path: Path, torn_ok: bool = False) -> list[dict[str, Any]]:
    """Rows of a metrics file; ``torn_ok`` drops a last line cut short by a kill."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if torn_ok and lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return [json.loads(line) for line in lines]
