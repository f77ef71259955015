"""The KRPO training loop, in one function.

Per step: sample prompts -> G completions each (vLLM or HF generate) -> rewards
(overlong shaping; with ``--filter_groups``, equal-reward groups dropped and more
prompts sampled) -> group advantages (Kalman by default) -> old/ref log-probs when
needed, rollout-correction weights when the engine is not the policy -> mu epochs of
packed micro-batches through the fused LM-head loss -> AdamW -> push weights to the
engine. Everything random in a step derives from (seed, step), so a resumed
run repeats what the uninterrupted run would have done.

Every setting, the model, the data and the run directory are checked before the run
directory changes (:func:`start_run`); a failure after that is a
:class:`TrainingFailed` naming the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from krpo_fast import distributed
from krpo_fast.checkpoint import (
    find_resumable,
    list_checkpoints,
    restore_trainer_state,
    save_checkpoint,
)
from krpo_fast.config import RESUME_IGNORES, RESUME_KEEPS, EvalConfig, TrainConfig
from krpo_fast.data import (
    DEFAULT_TASK,
    PAPER_SYSTEM_PROMPT,
    SOURCE_KEY,
    ArithmeticTask,
    format_prompt,
    load_jsonl,
    make_arithmetic_splits,
)
from krpo_fast.logits_ops import policy_loss_from_hidden
from krpo_fast.ops import group_advantages
from krpo_fast.plots import plot_metrics
from krpo_fast.policy import PackedBatch, PolicyLoss, load_policy, pack
from krpo_fast.rewards import (
    RewardFn,
    add_reward_noise,
    compute_rewards,
    exact_match_reward,
    load_reward_fn,
)
from krpo_fast.rollout import (
    Generator,
    HFGenerator,
    VLLMGenerator,
    greedy_correct,
    resolve_backend,
)
from krpo_fast.rollout_correction import rollout_correction
from krpo_fast.run_dir import (
    METRICS_FILE,
    SUMMARY_FILE,
    RunLock,
    append_line,
    atomic_write_text,
    clear_run,
    run_files,
)
from krpo_fast.tiny_model import CONFIG_NAME, bundled_model_path, load_model_defaults

# Tokenizers never make a token of more characters than this: a question longer than
# this many characters per allowed token is over the limit without being tokenized.
MAX_CHARS_PER_TOKEN = 100


class TrainingFailed(Exception):
    """A failure once training has started (the run directory holds its checkpoints)."""

    def __init__(self, step: int, cause: BaseException) -> None:
        super().__init__(f"training stopped in step {step}: {cause}")
        self.step = step


def resolve_model(model: str) -> str:
    """A local model folder, or a Hugging Face id that resolves; else ValueError."""
    if not model:
        return str(bundled_model_path())
    if Path(model).is_dir() and not (Path(model) / "config.json").is_file():
        checkpoints = list_checkpoints(model)
        if checkpoints:
            raise FileNotFoundError(
                f"--model {model}: a run directory, not a model; pass one of its checkpoints "
                f"(the newest: {checkpoints[-1]})"
            )
        raise FileNotFoundError(f"--model {model}: no config.json in this folder")
    if not Path(model).is_dir() and Path(model).exists():
        raise ValueError(f"--model {model}: a file, not a model folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model)
    except OSError as e:
        if Path(model).is_dir():
            raise ValueError(
                f"--model {model}: config.json does not load ({_first_line(e)})"
            ) from None
        raise FileNotFoundError(
            f"--model {model}: no such folder, and not a Hugging Face model id"
        ) from None
    except ValueError as e:  # a readable config.json that transformers cannot use
        raise ValueError(f"--model {model}: config.json: {_first_line(e)}") from None
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
    """(train rows, held-out rows) from the generated task or JSONL files.

    ``dataset=""`` loads no training rows (evaluation of ``eval_dataset`` alone).
    """
    if dataset == "arithmetic":
        train, test = make_arithmetic_splits(train_size, eval_size, seed, task)
    elif not dataset:
        train, test = [], []
    else:
        rows = load_jsonl(_existing_file(dataset, "--dataset"))
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
        test = load_jsonl(_existing_file(eval_dataset, "--eval_dataset"))[:eval_size]
    return train, test


def _existing_file(path: str, flag: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    return path


def encode_prompts(
    tokenizer: Any, questions: list[str], system_prompt: str
) -> tuple[list[str], list[list[int]]]:
    texts = [format_prompt(tokenizer, q, system_prompt) for q in questions]
    # A chat template writes its own special tokens (BOS included when it wants one).
    special = not getattr(tokenizer, "chat_template", None)
    return texts, [tokenizer.encode(t, add_special_tokens=special) for t in texts]


@dataclass
class Prompts:
    """A split's rows with their prompts as text and as token ids."""

    rows: list[dict[str, Any]]
    texts: list[str]
    ids: list[list[int]]


@dataclass
class Inputs:
    """What training and evaluation resolve the same way from their settings."""

    model_path: str
    system_prompt: str
    tokenizer: Any
    train: Prompts
    held_out: Prompts


def resolve_inputs(cfg: TrainConfig | EvalConfig) -> Inputs:
    """The model folder, system prompt, tokenizer and length-checked prompts of ``cfg``.

    Training reads its train and held-out splits; evaluation reads ``cfg.dataset`` as
    the held-out split. ValueError names the setting or the file (and line) at fault.
    """
    model_path = resolve_model(cfg.model)
    try:
        defaults = load_model_defaults(model_path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--model {model_path}: {CONFIG_NAME} does not load ({e})") from None
    system_prompt = cfg.system_prompt or defaults.get("system_prompt") or PAPER_SYSTEM_PROMPT
    if isinstance(cfg, TrainConfig):
        train_rows, eval_rows = load_rows(
            cfg.dataset, cfg.eval_dataset, cfg.train_size, cfg.eval_size, cfg.seed, cfg.task()
        )
    elif cfg.dataset == "arithmetic":
        train_rows, eval_rows = load_rows("arithmetic", "", 0, cfg.eval_size, cfg.seed)
    else:
        held_out_file = _existing_file(cfg.dataset, "--dataset")
        train_rows, eval_rows = load_rows("", held_out_file, 0, cfg.eval_size, cfg.seed)

    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # any failure here is a damaged or missing tokenizer file
        raise ValueError(
            f"--model {model_path}: the tokenizer does not load ({_first_line(e)})"
        ) from None
    max_length = prompt_limit(AutoConfig.from_pretrained(model_path), cfg)

    def prompts(rows: list[dict[str, Any]], split: str) -> Prompts:
        texts, ids, truncated = [], [], 0
        for i, row in enumerate(rows):
            where = row.get(SOURCE_KEY, f"{split} row {i + 1}")
            question = row["question"]
            if len(question) > MAX_CHARS_PER_TOKEN * max_length:
                if not cfg.truncate_prompts:
                    raise _too_long(where, f"{len(question)} characters", max_length, cfg)
                # Bound the tokenizer's work (and memory) by the limit, not by the data.
                question = question[-MAX_CHARS_PER_TOKEN * max_length :]
            [text], [tokens] = encode_prompts(tokenizer, [question], system_prompt)
            if len(tokens) > max_length:
                if not cfg.truncate_prompts:
                    raise _too_long(where, f"{len(tokens)} tokens", max_length, cfg)
                tokens = tokens[-max_length:]
                text = tokenizer.decode(tokens)
                truncated += 1
            texts.append(text)
            ids.append(tokens)
        if truncated:
            print(f"notice: truncated {truncated} of {len(rows)} {split} prompts to {max_length}")
        return Prompts(rows, texts, ids)

    return Inputs(
        model_path,
        system_prompt,
        tokenizer,
        prompts(train_rows, "train"),
        prompts(eval_rows, "held-out"),
    )


def prompt_limit(model_config: Any, cfg: TrainConfig | EvalConfig) -> int:
    """The longest prompt in tokens: ``--max_prompt_length``, and what the model's context
    leaves after ``--max_new_tokens``."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context is None:
        return cfg.max_prompt_length or 2**31
    room = context - cfg.max_new_tokens
    if room <= 0:
        raise ValueError(
            f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {context} tokens"
        )
    return min(room, cfg.max_prompt_length or room)


def _too_long(where: str, size: str, max_length: int, cfg: TrainConfig | EvalConfig) -> ValueError:
    return ValueError(
        f"{where}: the prompt is {size}, over the limit of {max_length} tokens "
        "(--max_prompt_length, or the model's context minus --max_new_tokens); "
        "shorten it, or pass --truncate_prompts to keep its last tokens"
    )


def load_model(
    path: str | Path, device: torch.device, trainable: bool = True, checkpointing: bool = False
) -> torch.nn.Module:
    """:func:`load_policy` with one-line errors: damaged weights, or NaN/inf in them."""
    try:
        model = load_policy(path, device, trainable, checkpointing)
    except Exception as e:  # whatever the loaders raise, the weights at `path` are at fault
        raise ValueError(f"{path}: the model weights do not load ({_first_line(e)})") from None
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ValueError(f"{path}: the model weights hold NaN or inf (in {name})")
    return model


def check_loss_settings(cfg: TrainConfig) -> None:
    """Run the advantage and loss ops once on a dummy batch with the run's settings, so a
    value they reject fails now rather than at step 1."""
    try:
        group_advantages(
            torch.zeros(cfg.group_size),
            group_size=cfg.group_size,
            mode=cfg.adv_mode,
            process_var=cfg.process_var,
            meas_var=cfg.meas_var,
        )
        policy_loss_from_hidden(
            torch.zeros(1, 1, 2),
            torch.zeros(3, 2),
            torch.zeros(1, 1, dtype=torch.long),
            None,
            torch.zeros(1, 1) if cfg.beta > 0 else None,
            torch.zeros(1),
            torch.ones(1, 1),
            temperature=cfg.temperature,
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            beta=cfg.beta,
            loss_agg=cfg.loss_agg,
            max_len=cfg.max_new_tokens,
            **cfg.loss_options(),
        )
    except ValueError as e:
        raise ValueError(f"a setting the loss rejects: {e}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_line(error: BaseException) -> str:
    """One line for the user: the file and reason of an OSError, else the message."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{where}: {error.strerror}" if where else error.strerror
    if isinstance(error, TrainingFailed) and error.__cause__ is not None:
        return f"training stopped in step {error.step}: {error_line(error.__cause__)}"
    return _first_line(error)


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
    token_weights: list[torch.Tensor | None] | None = None,
) -> tuple[dict[str, list[float]], bool]:
    """Forward and backward of one accumulation group through ``model`` (a
    :class:`PolicyLoss`, maybe wrapped in DDP/FSDP2); gradients sync once, on the last.

    Each micro-batch loss is weighted by its share of the group's sequences, so the
    accumulated gradient is that of the group's mean loss. Returns the finite losses'
    metrics (the loss and every scalar metric of the op) and whether every loss was finite.
    """
    n_seqs = sum(len(a) for a in advantages)
    stats: dict[str, list[float]] = {"loss": [], "kl": [], "clip_fraction": []}
    finite = True
    for k, batch in enumerate(batches):
        weight = len(advantages[k]) / n_seqs
        weights = token_weights[k] if token_weights is not None else None
        with distributed.no_grad_sync(model, k + 1 < len(batches)):
            loss, metrics = model(batch, advantages[k], old_logp[k], ref_logp[k], weights)
            # A non-finite loss is back-propagated too: every rank must join the gradient
            # sync, and the NaN it spreads makes every rank skip the update together.
            (loss * weight).backward()
        if torch.isfinite(loss):
            stats["loss"].append(loss.item())
            for key, value in metrics.items():
                if value.numel() == 1:
                    stats.setdefault(key, []).append(value.item())
            if spread is not None:
                spread.add(weight)
        else:
            finite = False
    return stats, finite


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run KRPO training as configured; return the summary (also written to summary.json).

    Under ``torchrun`` each rank takes an equal share of every step's prompts; rank 0
    owns the run directory and writes the metrics, plots, summary and checkpoints.
    Raises ValueError/OSError before the run directory changes, :class:`TrainingFailed`
    after.
    """
    started = time.perf_counter()
    cfg.validate()
    setup(cfg.torch_threads)
    rank, world, device = distributed.setup(resolve_device(cfg.device))
    lock = RunLock(cfg.output_dir)
    try:
        run = start_run(cfg, rank, world, device, lock)
        try:
            summary = _train(run, started)
        except Exception as e:
            raise TrainingFailed(run.current_step, e) from e
        distributed.barrier()  # no rank tears the group down while another still uses it
        return summary
    finally:
        lock.release()
        distributed.shutdown()


@dataclass
class Run:
    """Everything the training loop uses, as :func:`start_run` set it up."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    inputs: Inputs
    reward_fn: RewardFn
    backend: str
    policy: torch.nn.Module  # the HF model
    model: torch.nn.Module  # PolicyLoss around it, maybe wrapped in DDP/FSDP2
    ref: torch.nn.Module | None  # the frozen reference (beta > 0)
    sharded: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: Generator
    progress: dict[str, Any]  # step, accuracy_before, elapsed: what a checkpoint carries
    current_step: int = 0  # the step being run (1-based), for error messages


def start_run(cfg: TrainConfig, rank: int, world: int, device: torch.device, lock: RunLock) -> Run:
    """Check everything, take the run directory, load the models, restore a checkpoint.

    Nothing in the run directory changes until every check has passed and every model
    has loaded: then a fresh run empties the metrics (``--overwrite_output_dir`` deletes
    the previous run's files first) and a resumed one drops the metrics rows logged after
    its checkpoint.
    """
    main_rank = rank == 0
    if cfg.prompts_per_step % world:
        raise ValueError(
            f"--prompts_per_step {cfg.prompts_per_step} must be divisible by the number of "
            f"ranks ({world}): groups never span ranks"
        )
    if world > 1 and cfg.vllm_tensor_parallel_size > 1:
        raise ValueError("--vllm_tensor_parallel_size > 1 is for single-process runs")
    if cfg.resume and cfg.overwrite_output_dir:
        raise ValueError("--resume continues the run, --overwrite_output_dir deletes it: pick one")
    if cfg.fsdp and world == 1 and main_rank:
        print("notice: --fsdp has no effect on one rank (launch with torchrun)")
    check_loss_settings(cfg)
    out = Path(cfg.output_dir)

    # Rank 0 owns the directory; the others learn its verdict and the checkpoint it chose.
    found, failure, error = None, None, None
    if main_rank:
        try:
            found = claim_run_directory(cfg, out, lock)
        except (ValueError, OSError) as e:
            failure, error = e, error_line(e)
    error, chosen = distributed.broadcast_object((error, found and str(found[0])))
    if failure is not None:
        raise failure
    if error is not None:
        raise ValueError(f"rank 0: {error}")
    state = None
    if chosen is not None:
        resume_from, state, skipped = found or find_resumable(chosen, out)
        cfg = settings_on_resume(cfg, state.get("config"), main_rank)

    inputs = resolve_inputs(cfg)
    reward_fn = load_reward_fn(cfg.reward)
    backend = resolve_backend(cfg.generation_backend, device)
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
        # The mean entropy comes from the same read of the logits: logged every step.
        return_entropy=True,
        **cfg.loss_options(),
    )
    start_weights = resume_from if state is not None else inputs.model_path
    policy = load_model(start_weights, device, True, cfg.gradient_checkpointing)
    sharded = cfg.fsdp and world > 1
    model = distributed.wrap(PolicyLoss(policy, **settings), sharded, device)
    ref = None
    if cfg.beta > 0:
        frozen = PolicyLoss(load_model(inputs.model_path, device, trainable=False), **settings)
        ref = distributed.wrap(frozen, True, device) if sharded else frozen
    # After wrapping: FSDP2 replaces the parameters with sharded ones.
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1))
    )

    # Every check passed: the run directory changes from here on.
    metrics_path = out / METRICS_FILE
    progress: dict[str, Any] = {"step": 0, "accuracy_before": None, "elapsed": 0.0}
    if main_rank and state is None:
        if cfg.overwrite_output_dir:
            clear_run(out)
        atomic_write_text(metrics_path, "")
    if state is not None:
        progress = {k: state[k] for k in progress}
        if main_rank:
            for path, why in skipped:
                # Renamed so that checkpoint rotation never counts it as a kept one.
                path.rename(path.with_name(path.name + ".unreadable"))
                print(f"notice: skipped {path.name} ({why}); renamed it {path.name}.unreadable")
            # Rows logged after the checkpoint by the killed run are redone.
            kept = [r for r in read_metrics(metrics_path) if r["step"] <= progress["step"]]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            print(f"resumed from {resume_from} at step {progress['step']}")

    generator = make_generator(
        backend,
        inputs.model_path,
        policy,
        inputs.tokenizer,
        device,
        cfg,
        str(out / ".vllm_cache"),
        sharded,
    )
    # Seed (or restore the RNGs) after the engine exists: vLLM reseeds them when it starts.
    if state is None:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    else:
        restore_trainer_state(state, None, scheduler)
        distributed.load_optimizer_state(policy, optimizer, state["optimizer"])
    return Run(
        cfg, rank, world, device, out, inputs, reward_fn, backend, policy, model, ref,
        sharded, optimizer, scheduler, generator, progress,
    )  # fmt: skip


def claim_run_directory(
    cfg: TrainConfig, out: Path, lock: RunLock
) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]] | None:
    """Lock ``out`` for this run and check that the run may use it. Returns what
    :func:`find_resumable` found for ``--resume``, None for a fresh run. Changes nothing
    but the lock."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out}: a file, not a directory")
    lock.acquire()
    holder = lock.previous_holder
    if holder:
        print(
            f"notice: took over the lock of a run that is gone (pid {holder.get('pid')} on "
            f"{holder.get('host')})"
        )
    if cfg.resume:
        return find_resumable(cfg.resume, out)
    found = run_files(out)
    if found and not cfg.overwrite_output_dir:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(
            f"--output_dir {out} holds another run ({names}): continue it with --resume, "
            "or start over with --overwrite_output_dir (deletes it)"
        )
    return None


def settings_on_resume(
    cfg: TrainConfig, saved: dict[str, Any] | None, announce: bool
) -> TrainConfig:
    """``cfg`` with the settings a resumed run keeps from its checkpoint (RESUME_KEEPS);
    one notice names every setting that differs, and which value the run uses."""
    if not saved:
        return cfg
    changed = [
        f.name
        for f in dataclasses.fields(cfg)
        if f.name not in RESUME_IGNORES
        and f.name in saved
        and saved[f.name] != getattr(cfg, f.name)
    ]
    kept = [n for n in changed if n in RESUME_KEEPS]
    taken = [n for n in changed if n not in RESUME_KEEPS]
    if announce and changed:
        parts = []
        if kept:
            values = ", ".join(f"{n}={saved[n]!r} (not {getattr(cfg, n)!r})" for n in kept)
            parts.append(f"keeps the run's {values}")
        if taken:
            values = ", ".join(f"{n}={getattr(cfg, n)!r} (was {saved[n]!r})" for n in taken)
            parts.append(f"takes the new {values}")
        print(f"notice: --resume {'; '.join(parts)}")
    return dataclasses.replace(cfg, **{n: saved[n] for n in kept})


@dataclass
class Rollouts:
    """One step's groups on this rank: prompts, completions, rewards, and how many
    sampling rounds and dropped groups it took to fill the batch."""

    picks: list[int]  # training rows, one per group
    completion_ids: list[list[int]]  # G per group, group after group
    sampler_logprobs: list[list[float]] | None  # the engine's (None: it is the policy)
    rewards: torch.Tensor  # what the advantages see: shaped, and noisy when asked
    clean_rewards: torch.Tensor  # before the reward noise
    correct: torch.Tensor  # exact-match correctness, 1.0 or 0.0
    overlong: int  # completions the overlong shaping penalised
    rounds: int
    groups_filtered: int  # equal-reward groups dropped
    groups_topped_up: int  # equal-reward groups kept because the rounds ran out


class _Group(NamedTuple):
    pick: int
    completions: list[list[int]]
    logprobs: list[list[float]] | None
    rewards: torch.Tensor
    clean_rewards: torch.Tensor
    correct: torch.Tensor


def overlong_shaping(
    lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float
) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_new_tokens - buffer`` tokens, then
    down linearly to ``-penalty`` at ``max_new_tokens``."""
    if buffer == 0:
        return torch.zeros_like(lengths)
    return -(lengths - (max_new_tokens - buffer)).clamp(min=0) / buffer * penalty


def sample_rollouts(run: Run, step: int) -> Rollouts:
    """Sample, score and (with ``--filter_groups``) filter this rank's groups of ``step``.

    Round 0 draws the step's prompts (every rank draws the same global prompts and keeps
    its share); each further round draws new ones, until the batch holds
    ``prompts_per_step`` groups whose rewards differ or ``--max_generation_rounds`` ran
    out, when dropped groups top it up. Everything derives from (seed, step, round).
    """
    cfg, generator, train = run.cfg, run.generator, run.inputs.train
    G, P = cfg.group_size, cfg.prompts_per_step
    want = P // run.world
    scored = cfg.rollout_correction != "none" and not generator.samples_from_policy
    kept: list[_Group] = []
    dropped: list[_Group] = []
    rounds = filtered = overlong = 0
    while len(kept) < want and rounds < (cfg.max_generation_rounds if cfg.filter_groups else 1):
        rng = np.random.default_rng([cfg.seed, step] + ([rounds] if rounds else []))
        picks = rng.choice(len(train.rows), size=P, replace=P > len(train.rows)).tolist()
        picks = picks[run.rank * want : (run.rank + 1) * want]
        round_seed = _sample_seed(cfg.seed, step) + 104_729 * rounds
        seed = round_seed + 7_777 * run.rank
        logprobs: list[list[float]] | None = [] if scored else None
        completions = generator.generate(
            [train.ids[i] for i in picks],
            G,
            cfg.temperature,
            cfg.top_p,
            cfg.max_new_tokens,
            seed,
            logprobs,
        )
        texts = run.inputs.tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompts = [train.texts[i] for i in picks for _ in range(G)]
        answers = [train.rows[i]["answer"] for i in picks for _ in range(G)]
        lengths = torch.tensor([float(len(c)) for c in completions])
        shaping = overlong_shaping(
            lengths, cfg.max_new_tokens, cfg.overlong_buffer_len, cfg.overlong_penalty
        )
        clean = torch.tensor(compute_rewards(run.reward_fn, prompts, texts, answers)) + shaping
        overlong += int((shaping < 0).sum())
        rewards = clean
        if cfg.reward_noise or cfg.reward_flip_rate:
            noise_rng = torch.Generator().manual_seed(round_seed + 17 + run.rank)
            rewards = add_reward_noise(clean, cfg.reward_noise, cfg.reward_flip_rate, noise_rng)
        correct = torch.tensor(exact_match_reward(prompts, texts, answers))
        for g, pick in enumerate(picks):
            rows = slice(g * G, (g + 1) * G)
            group = _Group(
                pick,
                completions[rows],
                logprobs[rows] if logprobs is not None else None,
                rewards[rows],
                clean[rows],
                correct[rows],
            )
            equal = bool(rewards[rows].max() == rewards[rows].min())
            (dropped if cfg.filter_groups and equal else kept).append(group)
            filtered += int(cfg.filter_groups and equal)
        rounds += 1
    topped_up = max(0, want - len(kept))
    kept = (kept + dropped[:topped_up])[:want]
    return Rollouts(
        picks=[g.pick for g in kept],
        completion_ids=[c for g in kept for c in g.completions],
        sampler_logprobs=[lp for g in kept for lp in g.logprobs] if scored else None,
        rewards=torch.cat([g.rewards for g in kept]),
        clean_rewards=torch.cat([g.clean_rewards for g in kept]),
        correct=torch.cat([g.correct for g in kept]),
        overlong=overlong,
        rounds=rounds,
        groups_filtered=filtered,
        groups_topped_up=topped_up,
    )


def correction_weights(
    cfg: TrainConfig,
    rollout_logp: list[torch.Tensor],
    sampler_logprobs: list[list[float]],
    chunks: list[range],
    packed: list[PackedBatch],
) -> tuple[list[torch.Tensor], dict[str, list[float]]]:
    """Per micro-batch, the ``--rollout_correction`` weights of the trainer's rollout-time
    log-probs against the engine's, and their metrics (one value per micro-batch)."""
    weights, metrics = [], {}
    for logp, rows, batch in zip(rollout_logp, chunks, packed, strict=True):
        sampler = torch.full_like(logp, math.nan)
        for i, row in enumerate(rows):
            values = sampler_logprobs[row]
            sampler[i, : len(values)] = torch.tensor(values, dtype=logp.dtype)
        w, m = rollout_correction(
            logp,
            sampler,
            batch.mask,
            mode=cfg.rollout_correction,
            clip_min=cfg.rollout_clip_min or None,
            clip_max=cfg.rollout_clip_max or None,
        )
        weights.append(w)
        for key in ("weight_mean", "weight_min", "weight_max", "clipped_fraction", "mismatch_kl"):
            metrics.setdefault(key, []).append(m[key].item())
    return weights, metrics


def _train(run: Run, started: float) -> dict[str, Any]:
    """The loop: rollouts, rewards, advantages, updates, metrics, checkpoints, per step."""
    cfg, rank, world, device = run.cfg, run.rank, run.world, run.device
    policy, model, ref, optimizer, scheduler = (
        run.policy, run.model, run.ref, run.optimizer, run.scheduler,
    )  # fmt: skip
    generator, tokenizer, progress = run.generator, run.inputs.tokenizer, run.progress
    main_rank = rank == 0
    run.current_step = progress["step"] + 1
    train, held_out = run.inputs.train, run.inputs.held_out
    metrics_path = run.out / METRICS_FILE
    # Each rank scores every world-th held-out row; the counts are summed.
    eval_ids = held_out.ids[rank::world]
    eval_answers = [r["answer"] for r in held_out.rows[rank::world]]

    def held_out_accuracy() -> float:
        correct = greedy_correct(
            generator, tokenizer, eval_ids, eval_answers, cfg.max_new_tokens, cfg.eval_batch_size
        )
        total = distributed.all_reduce(torch.tensor([sum(correct)], dtype=torch.float64))
        return total.item() / len(held_out.rows)

    if progress["accuracy_before"] is None:
        progress["accuracy_before"] = held_out_accuracy()
        if main_rank:
            print(f"held-out accuracy before training: {progress['accuracy_before']:.3f}")

    G, P = cfg.group_size, cfg.prompts_per_step
    local_prompts = P // world
    local_seqs = local_prompts * G
    micro = cfg.micro_batch_size or local_seqs
    chunks = _batches(local_seqs, micro)
    accum = cfg.gradient_accumulation_steps or len(chunks)
    groups = [list(range(s, min(s + accum, len(chunks)))) for s in range(0, len(chunks), accum)]
    copy_files = [p for p in [Path(run.inputs.model_path) / CONFIG_NAME] if p.is_file()]
    spread = GradientSpread(list(policy.parameters())) if cfg.log_grad_variance else None
    bar = tqdm(
        range(progress["step"], cfg.max_steps),
        initial=progress["step"],
        total=cfg.max_steps,
        desc="krpo",
        dynamic_ncols=True,
        disable=not main_rank,
    )
    last_eval = None
    for step in bar:
        run.current_step = step + 1
        t0 = time.perf_counter()
        # --- rollouts and rewards (more rounds when --filter_groups drops groups)
        rollouts = sample_rollouts(run, step)
        prompt_ids = [train.ids[i] for i in rollouts.picks]
        completion_ids, rewards = rollouts.completion_ids, rollouts.rewards
        t_gen = time.perf_counter() - t0
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
            pack(
                [seq_prompts[i] for i in c],
                [completion_ids[i] for i in c],
                device,
                shared_prefix=cfg.shared_prefix,
            )
            for c in chunks
        ]
        adv = [advantages[c.start : c.stop] for c in chunks]
        sampler = rollouts.sampler_logprobs
        with torch.no_grad():
            # The trainer's log-probs at rollout time: for mu > 1 epochs, and to compare
            # with the engine's. On-policy with one epoch the ratio is 1: old_logp=None.
            rollout_logp = [
                model(p) if cfg.epochs_per_step > 1 or sampler is not None else None for p in packed
            ]
            old = rollout_logp if cfg.epochs_per_step > 1 else [None] * len(packed)
            ref_lp = [ref(p) if ref is not None else None for p in packed]
        token_weights, correction = None, None
        if sampler is not None:
            token_weights, correction = correction_weights(
                cfg, rollout_logp, sampler, chunks, packed
            )
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
                    [token_weights[k] for k in group] if token_weights is not None else None,
                )
                for key, values in part.items():
                    stats.setdefault(key, []).extend(values)
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

        # --- metrics over the global batch, held-out accuracy when due
        row = step_metrics(
            cfg,
            step,
            rewards=rewards,
            clean_rewards=rollouts.clean_rewards,
            advantages=advantages,
            correct=rollouts.correct,
            completion_ids=completion_ids,
            rollouts=rollouts,
            correction=correction,
            train_tokens=cfg.epochs_per_step * sum(p.sequence_tokens for p in packed),
            stats=stats,
            norms=norms,
            spreads=spreads if spread is not None else None,
            skipped=skipped,
            lr=scheduler.get_last_lr()[0],
            seconds=(t_gen, t_train, time.perf_counter() - t0),
        )
        if step + 1 == cfg.max_steps or (cfg.eval_steps and (step + 1) % cfg.eval_steps == 0):
            row["eval_accuracy"] = last_eval = held_out_accuracy()
        if main_rank:
            append_line(metrics_path, json.dumps(row))
            if skipped:
                tqdm.write(f"step {step + 1}: skipped {skipped} update(s) with a non-finite loss")
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}")

        # --- checkpoint
        progress["step"] = step + 1
        last = step + 1 == cfg.max_steps
        if last or (cfg.save_steps and progress["step"] % cfg.save_steps == 0):
            elapsed = progress["elapsed"] + time.perf_counter() - started
            extra = {**progress, "elapsed": elapsed, "config": dataclasses.asdict(cfg)}
            # Gathering a sharded state needs every rank; writing it needs one.
            model_state = distributed.full_model_state(policy) if run.sharded else None
            optimizer_state = distributed.full_optimizer_state(policy, optimizer)
            if main_rank:
                save_checkpoint(
                    run.out,
                    progress["step"],
                    policy,
                    tokenizer,
                    optimizer,
                    scheduler,
                    extra,
                    copy_files,
                    cfg.save_total_limit,
                    model_state,
                    optimizer_state,
                )
            distributed.barrier()
    bar.close()

    if last_eval is None:  # resumed from the final checkpoint: nothing ran
        last_eval = held_out_accuracy()
    return finish_run(run, last_eval, started)


def finish_run(run: Run, accuracy_after: float, started: float) -> dict[str, Any]:
    """The run's summary; rank 0 also writes it and the plots into the run directory."""
    progress = run.progress
    summary = {
        "accuracy_before": progress["accuracy_before"],
        "accuracy_after": accuracy_after,
        "eval_size": len(run.inputs.held_out.rows),
        "steps": progress["step"],
        "wall_time_s": round(progress["elapsed"] + time.perf_counter() - started, 1),
        "generation_backend": run.backend,
        "world_size": run.world,
        "model": run.inputs.model_path,
        "final_checkpoint": str(run.out / f"checkpoint-{progress['step']}"),
    }
    if run.rank == 0:
        rows = read_metrics(run.out / METRICS_FILE)
        if rows:
            plot_metrics(rows, run.out)
        atomic_write_text(run.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def step_metrics(
    cfg: TrainConfig,
    step: int,
    *,
    rewards: torch.Tensor,
    clean_rewards: torch.Tensor,
    advantages: torch.Tensor,
    correct: torch.Tensor,
    completion_ids: list[list[int]],
    rollouts: Rollouts | None = None,
    correction: dict[str, list[float]] | None = None,
    train_tokens: int,
    stats: dict[str, list[float]],
    norms: list[float],
    spreads: list[tuple[float, float]] | None,
    skipped: int,
    lr: float,
    seconds: tuple[float, float, float],
) -> dict[str, Any]:
    """One ``metrics.jsonl`` row: this rank's numbers gathered over every rank.

    ``seconds``: (generation, training, whole step) on this rank; throughput uses the
    slowest rank's.
    """
    B = cfg.prompts_per_step * cfg.group_size
    all_rewards = distributed.gather(rewards.float())
    all_advantages = distributed.gather(advantages.detach().float().cpu())
    lengths = torch.tensor([float(len(c)) for c in completion_ids])
    sums = distributed.all_reduce(
        torch.tensor(
            [
                float(correct.sum()),
                float(lengths.sum()),
                float(clean_rewards.sum()),
                float(train_tokens),
            ],
            dtype=torch.float64,
        )
    )
    n_correct, gen_tokens, clean_sum, all_train_tokens = sums.tolist()
    t_gen, t_train, t_step = seconds
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
        # The op's other metrics (ratio_mean, clip_fraction_low/high, entropy, ...).
        **{
            k: _global_mean(v) for k, v in stats.items() if k not in ("kl", "clip_fraction", "loss")
        },
        "grad_norm": _mean(norms),
        "lr": lr,
        "skipped_updates": skipped,
        "completion_len": gen_tokens / B,
        "gen_tokens_per_s": gen_tokens / slowest[0],
        "train_tokens_per_s": all_train_tokens / slowest[1],
        "step_time": t_step,
    }
    if cfg.reward_noise or cfg.reward_flip_rate:
        row["reward_clean_mean"] = clean_sum / B
    if correction is not None:  # the rollout/trainer mismatch and its importance weights
        row["is_weight_mean"] = _global_mean(correction["weight_mean"])
        row["is_weight_min"] = -_global_max([-v for v in correction["weight_min"]])
        row["is_weight_max"] = _global_max(correction["weight_max"])
        row[
            "is_masked_fraction"
            if cfg.rollout_correction.endswith("mask")
            else "is_truncated_fraction"
        ] = _global_mean(correction["clipped_fraction"])
        row["mismatch_kl"] = _global_mean(correction["mismatch_kl"])
    if rollouts is not None and cfg.filter_groups:
        counts = distributed.all_reduce(
            torch.tensor([rollouts.groups_filtered, rollouts.groups_topped_up], dtype=torch.float64)
        )
        row["groups_filtered"] = int(counts[0])
        row["groups_topped_up"] = int(counts[1])
        row["generation_rounds"] = int(_global_max([rollouts.rounds]))
    if rollouts is not None and cfg.overlong_buffer_len:
        total = distributed.all_reduce(torch.tensor([float(rollouts.overlong)]))
        row["overlong_penalised"] = int(total.item())
    if spreads is not None:
        row["grad_var"] = _global_mean([v for v, _ in spreads])
        row["grad_mean_sq"] = _global_mean([m for _, m in spreads])
    return row


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Greedy held-out accuracy of a model (through vLLM when ``auto`` picks it)."""
    cfg.validate()
    setup(cfg.torch_threads)
    device = resolve_device(cfg.device)
    inputs = resolve_inputs(cfg)
    backend = resolve_backend(cfg.generation_backend, device)
    policy = load_model(inputs.model_path, device, trainable=False)
    generator = make_generator(
        backend, inputs.model_path, policy, inputs.tokenizer, device, cfg, None
    )
    held_out = inputs.held_out
    correct = greedy_correct(
        generator,
        inputs.tokenizer,
        held_out.ids,
        [r["answer"] for r in held_out.rows],
        cfg.max_new_tokens,
        cfg.eval_batch_size,
    )
    return {
        "accuracy": sum(correct) / len(held_out.rows),
        "n": len(held_out.rows),
        "model": inputs.model_path,
        "generation_backend": backend,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _global_mean(values: list[float]) -> float | None:
    """Mean of every rank's ``values`` together (None when all are empty)."""
    total = distributed.all_reduce(torch.tensor([sum(values), len(values)], dtype=torch.float64))
    return total[0].item() / total[1].item() if total[1] else None


def _global_max(values: list[float]) -> float:
    """Largest of every rank's ``values``."""
    return distributed.all_reduce(torch.tensor([max(values)], dtype=torch.float64), "max").item()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics file; a last line cut short by a kill is dropped, any other
    damage is a ValueError naming the file and line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError
        except ValueError:
            if lineno == len(lines):
                break  # torn by a kill mid-write: that step is redone
            raise ValueError(
                f"{path}:{lineno}: not a metrics row (damaged file; move it away to "
                "resume without the earlier rows)"
            ) from None
        rows.append(row)
    return rows
