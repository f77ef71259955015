"""Run configuration: dataclasses parsed from CLI flags and from a YAML file.

The flags follow the conventions of transformers' ``HfArgumentParser``: one
``--field value`` flag per dataclass field, help text from the field's metadata,
booleans as ``--flag`` / ``--flag false`` (and ``--no_flag`` when the default is
true), and ``--config run.yaml`` whose keys are field names. Flags given on the
command line override the YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from krpo_fast import defaults
from krpo_fast.data import ArithmeticTask
from krpo_fast.defaults import (
    ADVANTAGE_MODES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    LOSS_TYPES,
    RATIO_LEVELS,
)
from krpo_fast.rollout_correction import ROLLOUT_CORRECTION_MODES


def _f(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    # model and data
    model: str = _f("", "model directory (HF format); empty: the bundled tiny arithmetic model")
    output_dir: str = _f("runs/krpo", "run directory: metrics, plots, checkpoints, summary")
    overwrite_output_dir: bool = _f(
        False, "start a fresh run in an output_dir that holds another run, deleting its files"
    )
    dataset: str = _f(
        "arithmetic", "'arithmetic' (generated task) or a JSONL file of question/answer rows"
    )
    eval_dataset: str = _f(
        "", "held-out JSONL; empty: the generated test split, or the last eval_size rows of dataset"
    )
    train_size: int = _f(5000, "training rows generated for the arithmetic task")
    eval_size: int = _f(200, "held-out rows used for accuracy before and after training")
    system_prompt: str = _f(
        "", "system prompt; empty: the model's own (krpo_fast.json) or the paper's <think>/<answer>"
    )
    num_terms_min: int = _f(2, "arithmetic task: fewest terms in an expression")
    num_terms_max: int = _f(2, "arithmetic task: most terms in an expression")
    num_digits_min: int = _f(1, "arithmetic task: fewest digits in a term")
    num_digits_max: int = _f(2, "arithmetic task: most digits in a term")
    operators: str = _f("+-", "arithmetic task: operators drawn from (a subset of '+-*')")
    reward: str = _f("graded", "'graded' (paper), 'exact_match', or 'module:function'")
    reward_noise: float = _f(
        0.0, "std of Gaussian noise added to every training reward (a noisy grader); 0: none"
    )
    reward_flip_rate: float = _f(
        0.0, "probability that a training reward r becomes 1 - r (rewards in [0, 1]); 0: none"
    )
    # the RL loop
    max_steps: int = _f(250, "generation rounds (each: sample, score, mu epochs of updates)")
    prompts_per_step: int = _f(16, "prompts sampled per step")
    group_size: int = _f(8, "completions per prompt (G)")
    epochs_per_step: int = _f(1, "optimisation epochs per batch (mu); > 1 uses old log-probs")
    micro_batch_size: int = _f(
        8,
        "sequences per packed forward/backward; a multiple of group_size keeps every group "
        "whole, so with --shared_prefix its prompt is forwarded once",
    )
    shared_prefix: bool = _f(
        True,
        "forward each group's prompt once and attend its G completions to it (exact: the "
        "same log-probs and gradients as one forward per sequence; docs/shared_prefix.md)",
    )
    gradient_accumulation_steps: int = _f(
        0, "micro-batches per optimizer step; 0: the whole batch (one step per epoch)"
    )
    learning_rate: float = _f(
        5e-5, "AdamW peak learning rate (Kalman advantages reach |A| ~ 20: keep it small)"
    )
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(5, "optimizer steps of linear warm-up, then constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 disables")
    adv_mode: Literal[ADVANTAGE_MODES] = _f(
        defaults.ADV_MODE, "advantage estimator: kalman (KRPO) or a GRPO baseline"
    )
    process_var: float = _f(defaults.PROCESS_VAR, "Kalman process variance Q")
    meas_var: float = _f(defaults.MEAS_VAR, "Kalman measurement variance R")
    beta: float = _f(0.0, "KL weight; > 0 loads a frozen reference model")
    eps_low: float = _f(defaults.EPS_LOW, "ratio clip below 1")
    eps_high: float = _f(defaults.EPS_HIGH, "ratio clip above 1")
    loss_agg: Literal[LOSS_AGGREGATIONS] = _f(
        defaults.LOSS_AGG, "loss aggregation over tokens and sequences"
    )
    # the loss family beyond the paper's loss (docs/loss_family.md)
    loss_type: Literal[LOSS_TYPES] = _f(
        defaults.LOSS_TYPE,
        "policy term: clip (PPO/GRPO), cispo (truncated IS weight; --eps_high is the cap, "
        "e.g. 5) or sapo (smooth gate)",
    )
    ratio_level: Literal[RATIO_LEVELS] = _f(
        defaults.RATIO_LEVEL, "token ratios, or one per sequence (GSPO: geometric mean)"
    )
    delta: float = _f(0.0, "clip loss: upper bound of the unclipped ratio (TRL's delta); 0: off")
    dual_clip: float = _f(
        0.0, "clip loss: cap the loss of negative-advantage tokens at c |A| (c > 1); 0: off"
    )
    tau_pos: float = _f(defaults.TAU_POS, "sapo: gate temperature for positive advantages")
    tau_neg: float = _f(defaults.TAU_NEG, "sapo: gate temperature for other advantages")
    kl_estimator: Literal[KL_ESTIMATORS] = _f(
        defaults.KL_ESTIMATOR, "KL estimator (with --beta > 0): k3, k1, k2 or low_var_kl"
    )
    entropy_coef: float = _f(
        defaults.ENTROPY_COEF, "entropy bonus weight (the mean entropy is logged either way)"
    )
    rollout_correction: Literal[("none", *ROLLOUT_CORRECTION_MODES)] = _f(
        "sequence_mask",
        "reweight samples by trainer/engine probability ratios when the engine is not the "
        "policy itself (vLLM, HF on a copy); no effect when HF samples from the policy",
    )
    rollout_clip_max: float = _f(3.0, "upper bound of the rollout-correction ratio; 0: none")
    rollout_clip_min: float = _f(0.0, "lower bound of the rollout-correction ratio; 0: none")
    filter_groups: bool = _f(
        False,
        "dynamic sampling (DAPO): drop groups whose rewards are all equal and sample more "
        "prompts until the step's batch is full",
    )
    max_generation_rounds: int = _f(
        4, "--filter_groups: sampling rounds per step before the batch is topped up unfiltered"
    )
    overlong_buffer_len: int = _f(
        0, "DAPO's soft overlong punishment: the last N tokens before max_new_tokens; 0: off"
    )
    overlong_penalty: float = _f(
        1.0, "reward subtracted at max_new_tokens, linearly from 0 over the overlong buffer"
    )
    # generation
    temperature: float = _f(0.7, "sampling temperature (also applied to the training log-probs)")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    max_new_tokens: int = _f(48, "completion length limit")
    max_prompt_length: int = _f(
        0, "longest prompt in tokens; 0: what the model's context leaves after max_new_tokens"
    )
    truncate_prompts: bool = _f(
        False, "keep the last max_prompt_length tokens of longer prompts instead of refusing"
    )
    generation_backend: Literal["auto", "vllm", "hf"] = _f(
        "auto", "auto: vLLM when installed (measured faster, CPU too), else HF generate"
    )
    vllm_kv_cache_bytes: int = _f(256 << 20, "vLLM KV-cache size in bytes")
    vllm_tensor_parallel_size: int = _f(
        1, "GPUs one vLLM engine shards the model over (single-process runs on a multi-GPU node)"
    )
    eval_batch_size: int = _f(64, "prompts per greedy evaluation batch")
    eval_steps: int = _f(
        0, "held-out greedy accuracy every N steps, logged as eval_accuracy; 0: start and end"
    )
    log_grad_variance: bool = _f(
        False,
        "log grad_var: the spread of the micro-batch gradient estimates within each optimizer "
        "step (flattens the gradient once per micro-batch: for small models)",
    )
    # system
    seed: int = _f(0, "seed of data, sampling and initialisation")
    device: str = _f("auto", "auto, cpu or cuda")
    bf16: bool = _f(True, "bf16 autocast for the policy forward on CUDA (CPU is always fp32)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    fsdp: bool = _f(
        False,
        "under torchrun: shard parameters, gradients and optimizer state with FSDP2 "
        "(fully_shard per decoder layer) instead of replicating them with DDP",
    )
    torch_threads: int = _f(1, "CPU threads for torch; 0 keeps torch's default")
    save_steps: int = _f(50, "checkpoint every N steps (the final one is always saved); 0: final")
    save_total_limit: int = _f(2, "checkpoints kept (oldest deleted first); 0 keeps all")
    resume: str = _f(
        "",
        "continue the run in output_dir: --resume (its newest complete checkpoint) or "
        "--resume PATH (one of its checkpoints)",
        nargs="?",
        const="latest",
    )
    debug: bool = _f(False, "on an error, print the full traceback (for bug reports)")

    def task(self) -> ArithmeticTask:
        """The arithmetic task the flags describe (ValueError naming the bad flag)."""
        try:
            return ArithmeticTask(
                self.num_terms_min,
                self.num_terms_max,
                self.num_digits_min,
                self.num_digits_max,
                self.operators,
            )
        except ValueError as e:
            raise ValueError(f"--num_terms_*/--num_digits_*/--operators: {e}") from None

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        _check_types(self)
        if not self.output_dir.strip():
            raise ValueError("--output_dir must name a directory, got ''")
        positive = (
            "max_steps",
            "prompts_per_step",
            "group_size",
            "epochs_per_step",
            "vllm_tensor_parallel_size",
            "max_new_tokens",
            "eval_batch_size",
            "train_size",
            "eval_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "micro_batch_size",
            "gradient_accumulation_steps",
            "max_prompt_length",
            "save_steps",
            "save_total_limit",
            "warmup_steps",
            "torch_threads",
            "beta",
            "max_grad_norm",
            "weight_decay",
            "reward_noise",
            "eval_steps",
            "delta",
            "dual_clip",
            "entropy_coef",
            "rollout_clip_max",
            "rollout_clip_min",
            "overlong_buffer_len",
            "overlong_penalty",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.reward_flip_rate <= 1:
            raise ValueError(f"--reward_flip_rate must be in [0, 1], got {self.reward_flip_rate}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        self._validate_loss_family()
        if self.adv_mode == "grpo" and self.group_size < 2:
            raise ValueError("--adv_mode grpo needs --group_size >= 2")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self.task()

    def _validate_loss_family(self) -> None:
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"--dual_clip must be > 1 (or 0: off), got {self.dual_clip}")
        if self.loss_type != "clip" and (self.delta or self.dual_clip):
            raise ValueError(
                f"--delta and --dual_clip bound the clip loss, not --loss_type {self.loss_type}"
            )
        if self.loss_type == "cispo" and self.eps_high <= 1:
            raise ValueError(
                f"--loss_type cispo caps the ratio at --eps_high, which must be > 1 (e.g. 5), "
                f"got {self.eps_high}"
            )
        for name in ("tau_pos", "tau_neg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.rollout_correction.endswith("truncate") and not (
            self.rollout_clip_max or self.rollout_clip_min
        ):
            raise ValueError(
                f"--rollout_correction {self.rollout_correction} needs --rollout_clip_max or "
                "--rollout_clip_min"
            )
        if self.rollout_clip_max and self.rollout_clip_min >= self.rollout_clip_max:
            raise ValueError(
                f"--rollout_clip_min {self.rollout_clip_min} must be below "
                f"--rollout_clip_max {self.rollout_clip_max}"
            )
        if self.filter_groups and self.group_size < 2:
            raise ValueError(
                "--filter_groups needs --group_size >= 2 (it drops equal-reward groups)"
            )
        if self.max_generation_rounds < 1:
            raise ValueError(
                f"--max_generation_rounds must be >= 1, got {self.max_generation_rounds}"
            )
        if self.overlong_buffer_len > self.max_new_tokens:
            raise ValueError(
                f"--overlong_buffer_len {self.overlong_buffer_len} exceeds --max_new_tokens "
                f"{self.max_new_tokens}"
            )

    def loss_options(self) -> dict[str, Any]:
        """The loss family's keywords of the fused ops that differ from the paper's loss
        (the default call stays the paper's)."""
        options = {
            "loss_type": self.loss_type,
            "ratio_level": self.ratio_level,
            "delta": self.delta or None,
            "dual_clip": self.dual_clip or None,
            "tau_pos": self.tau_pos,
            "tau_neg": self.tau_neg,
            "kl_estimator": self.kl_estimator,
            "entropy_coef": self.entropy_coef,
        }
        return {k: v for k, v in options.items() if v != _PAPER_LOSS[k]}


@dataclass
class EvalConfig:
    model: str = _f("", "model directory (HF format, e.g. a checkpoint); empty: the bundled model")
    dataset: str = _f("arithmetic", "'arithmetic' (the generated test split) or a JSONL file")
    eval_size: int = _f(200, "rows evaluated (the first N)")
    system_prompt: str = _f("", "system prompt; empty: the model's own or the paper's")
    max_new_tokens: int = _f(48, "completion length limit")
    generation_backend: Literal["auto", "vllm", "hf"] = _f("auto", "auto, vllm or hf")
    vllm_kv_cache_bytes: int = _f(256 << 20, "vLLM KV-cache size in bytes")
    max_prompt_length: int = _f(
        0, "longest prompt in tokens; 0: what the model's context leaves after max_new_tokens"
    )
    truncate_prompts: bool = _f(
        False, "keep the last max_prompt_length tokens of longer prompts instead of refusing"
    )
    eval_batch_size: int = _f(64, "prompts per batch")
    seed: int = _f(0, "seed of the generated arithmetic split (must match training's)")
    device: str = _f("auto", "auto, cpu or cuda")
    torch_threads: int = _f(1, "CPU threads for torch; 0 keeps torch's default")
    debug: bool = _f(False, "on an error, print the full traceback (for bug reports)")

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        _check_types(self)
        for name in ("eval_size", "max_new_tokens", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_prompt_length", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")


# The loss family's keywords at the paper's loss (what the ops default to).
_PAPER_LOSS = {
    "loss_type": defaults.LOSS_TYPE,
    "ratio_level": defaults.RATIO_LEVEL,
    "delta": None,
    "dual_clip": None,
    "tau_pos": defaults.TAU_POS,
    "tau_neg": defaults.TAU_NEG,
    "kl_estimator": defaults.KL_ESTIMATOR,
    "entropy_coef": defaults.ENTROPY_COEF,
}

# What a resumed run takes from its checkpoint, whatever the flags say: what defines the
# run's data and model, and what the optimizer and scheduler states carry. Every other
# setting takes the value given now.
RESUME_KEEPS = (
    "model",
    "dataset",
    "eval_dataset",
    "train_size",
    "eval_size",
    "system_prompt",
    "num_terms_min",
    "num_terms_max",
    "num_digits_min",
    "num_digits_max",
    "operators",
    "seed",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
)
# Settings of the invocation, not of the run.
RESUME_IGNORES = ("output_dir", "overwrite_output_dir", "resume", "debug")


def _check_types(cfg: Any) -> None:
    """Every field holds its declared type, and every float is finite (a YAML null, or a
    NaN that compares false with every bound, would otherwise pass the range checks)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, want = getattr(cfg, f.name), hints[f.name]
        if value is None or (want is not bool and isinstance(value, bool)):
            raise ValueError(f"--{f.name} needs a value, got {value!r}")
        if want is float and not math.isfinite(value):
            raise ValueError(f"--{f.name} must be a finite number, got {value}")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """transformers' ``HfArgumentParser`` over dataclass ``cls`` (one flag per field,
    help from the field metadata), plus ``--config FILE.yaml``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file of flag values (field: value)")
    return parser


def parse_config(cls: type, argv: list[str], prog: str, description: str) -> Any:
    """Parse ``argv`` (and ``--config`` YAML) into a validated ``cls`` instance.

    Unknown flags exit through argparse (one line, status 2); bad YAML or values
    raise ValueError.
    """
    parser = build_parser(cls, prog, description)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_load_yaml(cls, pre.config, parser))
    args = parser.parse_args(argv)
    cfg = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    cfg.validate()
    return cfg


def _load_yaml(cls: type, path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of field: value")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # the flag itself, not its --no_ twin (no type)
        actions.setdefault(action.dest, action)
    values = {}
    for key, value in data.items():
        action = actions[key]
        try:
            # Through text, as on the command line: int("2.7") fails where int(2.7) is 2.
            if value is None or isinstance(value, (list, dict)) or not action.type:
                raise ValueError
            converted = action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(f"--config {path}: {key}: bad value {value!r}") from None
        if action.choices and converted not in action.choices:
            raise ValueError(f"--config {path}: {key} must be one of {list(action.choices)}")
        values[key] = converted
    return values
