"""KRPO inside TRL: a ``GRPOTrainer`` whose advantages and loss are krpo-fast's ops.

Usage (TRL 1.16)::

    from krpo_fast.integrations.trl import KRPOConfig, KRPOGRPOTrainer

    args = KRPOConfig(output_dir="out", loss_type="grpo", beta=0.01, process_var=1e-5)
    trainer = KRPOGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)
    trainer.train()

What changes against ``GRPOTrainer``:

- Advantages: ``krpo_fast.group_advantages`` over the weighted sum of the reward
  functions, one group per prompt (``num_generations`` completions in rollout order),
  ``mode=adv_mode`` ("kalman" by default; TRL's ``scale_rewards`` is then unused). As in
  TRL, rewards are gathered from every process before the advantages are computed, so a
  group never depends on how completions were spread over ranks; each process keeps its
  slice. Completions that every reward function scored ``None`` are left out of their
  group's filter and get advantage 0 (TRL's rule).
- Loss: ``krpo_fast.policy_loss`` (the fused loss family, docs/loss_family.md) on TRL's
  per-token log-probs, with ``epsilon``/``epsilon_high`` as the clip range (for
  ``cispo``, ``epsilon_high`` is the cap, as in TRL) and ``beta`` as the KL weight. TRL
  loss types map to krpo-fast's ``loss_type`` and aggregation as follows:

  ============  =========  ============================  ===============================
  TRL           krpo-fast  krpo-fast ``loss_agg``         scaling applied afterwards
  ============  =========  ============================  ===============================
  ``grpo``      clip       ``seq-mean-token-mean``        / gradient accumulation steps
  ``bnpo``      clip       ``token-mean``                 / gradient accumulation steps
  ``dr_grpo``   clip       ``seq-mean-token-sum-norm``    ``max_len =
                                                          max_completion_length``,
                                                          / gradient accumulation steps
  ``dapo``      clip       ``token-mean``                 x local tokens / TRL's global
                                                          token normaliser (TRL's)
  ``cispo``     cispo      ``token-mean``                 as ``dapo``
  ``sapo``      sapo       ``seq-mean-token-mean``        / gradient accumulation steps
  ============  =========  ============================  ===============================

  TRL's options become the op's keywords: ``importance_sampling_level`` ->
  ``ratio_level`` (GSPO), ``delta``, ``sapo_temperature_pos/neg`` -> ``tau_pos/neg``,
  ``use_bias_correction_kl`` (TRL's default is True; :class:`KRPOConfig` keeps the
  paper's False) -> ``bias_correction_kl``. The token masks and weights TRL multiplies
  into its per-token policy loss go into the op's ``token_weights`` (their product):
  ``top_entropy_quantile < 1`` (TRL's ``get_high_entropy_mask`` on the entropies of
  TRL's forward), ``off_policy_mask_threshold`` (TRL's ``get_off_policy_mask``) and,
  with ``use_vllm``, ``vllm_importance_sampling_correction`` (the ratio TRL computes in
  every ``vllm_importance_sampling_mode``). A static ``entropy_coef`` subtracts TRL's
  entropy bonus (mean entropy over the tokens the entropy mask keeps). Loss and
  gradients equal TRL's own ``_compute_loss`` (tests/test_integration_trl.py).

  Rejected with the reason: ``luspo`` and ``vespo`` (other objectives),
  ``use_adaptive_entropy`` (a controller outside the loss),
  ``multi_objective_aggregation="normalize_then_sum"``.
- ``KRPOConfig(shared_prefix=True)``: the policy, old and reference per-token log-probs
  come from ``krpo_fast.sequence_logprobs``, which forwards each prompt once per group
  (same values; see ``docs/shared_prefix.md``).
- Metrics added to TRL's logs: ``krpo/advantages/{mean,std,abs_max}``, ``kl`` (when
  ``beta != 0``; before any bias correction), ``clip_ratio/{low,high,region}_mean``
  (clip losses; token means, also with sequence-level ratios), ``cispo_clip_ratio``
  (cispo) and ``entropy`` (when TRL's forward computed entropies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer

from krpo_fast import defaults
from krpo_fast.defaults import ADVANTAGE_MODES
from krpo_fast.ops import group_advantages, policy_loss
from krpo_fast.shared_prefix import sequence_logprobs

__all__ = ["LOSS_TYPE_TO_AGG", "KRPOConfig", "KRPOGRPOTrainer"]

LOSS_TYPE_TO_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
}
# TRL's loss types normalised by the generation batch's token count (num_items_in_batch).
_GLOBAL_TOKEN_NORMALISED = ("dapo", "cispo")

# Extra model inputs TRL forwards for multimodal models; passed through unchanged.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class KRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the advantage settings of krpo-fast (parsable by ``TrlParser``).

    A plain ``GRPOConfig`` also works with :class:`KRPOGRPOTrainer`; these defaults apply.
    """

    adv_mode: str = field(
        default=defaults.ADV_MODE,
        metadata={"help": f"krpo-fast advantage mode: one of {', '.join(ADVANTAGE_MODES)}."},
    )
    process_var: float = field(
        default=defaults.PROCESS_VAR, metadata={"help": "Kalman process variance Q."}
    )
    meas_var: float = field(
        default=defaults.MEAS_VAR, metadata={"help": "Kalman measurement variance R."}
    )
    init_mean: float = field(
        default=defaults.INIT_MEAN, metadata={"help": "Kalman initial state x_0."}
    )
    init_var: float = field(
        default=defaults.INIT_VAR, metadata={"help": "Kalman initial variance P_0."}
    )
    adv_eps: float = field(
        default=defaults.ADV_EPS, metadata={"help": "Added to sqrt(P) or the std."}
    )
    # The paper's k3 KL by default; TRL's GRPOConfig turns the correction on.
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "Multiply the KL term by the importance ratio (TRL's default: True)."},
    )
    shared_prefix: bool = field(
        default=False,
        metadata={
            "help": "Compute the per-token log-probs (policy, old, reference) with each "
            "prompt forwarded once per group (krpo_fast.sequence_logprobs): the same "
            "values with less work. Text-only models without a wrapper; others fall back."
        },
    )


def _unsupported_options(args: GRPOConfig, trainer: GRPOTrainer) -> list[str]:
    """The TRL options that the fused loss or the advantage op cannot honour."""
    problems = []
    if args.loss_type not in LOSS_TYPE_TO_AGG:
        problems.append(
            f"loss_type={args.loss_type!r}: another per-token objective than the fused "
            f"loss family (supported: {', '.join(sorted(LOSS_TYPE_TO_AGG))})"
        )
    if args.use_adaptive_entropy:
        problems.append(
            "use_adaptive_entropy: its controller runs outside the loss (a static "
            "entropy_coef is supported)"
        )
    if args.multi_objective_aggregation != "sum_then_normalize":
        problems.append(f"multi_objective_aggregation={args.multi_objective_aggregation!r}")
    if getattr(args, "adv_mode", defaults.ADV_MODE) not in ADVANTAGE_MODES:
        problems.append(f"adv_mode={args.adv_mode!r} (supported: {', '.join(ADVANTAGE_MODES)})")
    return problems


class KRPOGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with krpo-fast's group advantages and fused policy loss.

    Takes the same arguments as ``GRPOTrainer``; ``args`` may be a :class:`KRPOConfig`
    (to set the advantage mode and the Kalman filter) or a plain ``GRPOConfig``.
    Raises ``ValueError`` at construction for TRL options the fused path does not
    implement (see the module docstring).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        problems = _unsupported_options(self.args, self)
        if problems:
            raise ValueError(
                "KRPOGRPOTrainer does not support these GRPOConfig settings: " + "; ".join(problems)
            )
        defaults = KRPOConfig.__dataclass_fields__
        self._krpo_adv = {
            name: getattr(self.args, name, defaults[name].default)
            for name in ("adv_mode", "process_var", "meas_var", "init_mean", "init_var", "adv_eps")
        }
        self._krpo_rewards_per_func: torch.Tensor | None = None
        self._krpo_shared_prefix = getattr(self.args, "shared_prefix", False)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards of every process; keep them for the advantages.
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        self._krpo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def krpo_advantages(self, rewards_per_func: torch.Tensor, group_size: int) -> torch.Tensor:
        """Advantages of all processes' completions from TRL's [N, n_reward_funcs] rewards.

        Rows that every reward function scored ``None`` (NaN) are left out of their
        group's filter and get 0.
        """
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        scorable = ~torch.isnan(rewards_per_func).all(dim=1)
        c = self._krpo_adv
        options = {
            "mode": c["adv_mode"],
            "process_var": c["process_var"],
            "meas_var": c["meas_var"],
            "init_mean": c["init_mean"],
            "init_var": c["init_var"],
            "eps": c["adv_eps"],
        }
        if bool(scorable.all()):
            return group_advantages(rewards, group_size=group_size, **options)
        advantages = torch.zeros_like(rewards)
        if bool(scorable.any()):
            # Ragged groups of the scorable rows keep rollout order within each group.
            offsets = torch.zeros(rewards.numel() // group_size + 1, dtype=torch.int32)
            offsets[1:] = scorable.view(-1, group_size).sum(dim=1).cumsum(0).cpu()
            kept = group_advantages(
                rewards[scorable], group_offsets=offsets.to(rewards.device), **options
            )
            advantages[scorable] = kept
        return advantages

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        all_advantages = self.krpo_advantages(self._krpo_rewards_per_func, group_size)
        self._krpo_rewards_per_func = None

        n_local = output["advantages"].shape[0]
        start = self.accelerator.process_index * n_local
        output["advantages"] = all_advantages[start : start + n_local].to(
            output["advantages"].dtype
        )

        # TRL logged its own advantages for these completions last: replace them.
        logged = self._logs["advantages"]
        for _ in range(min(all_advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(all_advantages.tolist())
        metrics = self._metrics[mode]
        metrics["krpo/advantages/mean"].append(all_advantages.mean().item())
        metrics["krpo/advantages/std"].append(all_advantages.std().nan_to_num(0.0).item())
        metrics["krpo/advantages/abs_max"].append(all_advantages.abs().max().item())
        return output

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **model_inputs,
    ):
        """TRL's per-token log-probs, through the shared-prefix forward when it applies.

        It applies to plain Hugging Face models (no DDP/PEFT wrapper), text only, without
        entropies or MoE aux loss, and completion masks that end at the first padding
        (TRL's). Log-probs past a completion's mask are 0 instead of TRL's values there,
        which nothing downstream reads.
        """
        prompt_mask = attention_mask[:, :-logits_to_keep].bool()
        completion_mask = attention_mask[:, -logits_to_keep:].bool()
        applies = (
            self._krpo_shared_prefix
            and isinstance(model, PreTrainedModel)
            and not compute_entropy
            and not compute_aux_loss
            and all(value is None for value in model_inputs.values())
            and bool((completion_mask.cummin(dim=1).values == completion_mask).all())
        )
        if not applies:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **model_inputs,
            )
        prompt_ids, completion_ids = input_ids[:, :-logits_to_keep], input_ids[:, -logits_to_keep:]
        prompts = [row[keep].tolist() for row, keep in zip(prompt_ids, prompt_mask, strict=True)]
        completions = [
            row[keep].tolist() for row, keep in zip(completion_ids, completion_mask, strict=True)
        ]
        # TRL's batch_size bounds the rows per forward; bound the packed tokens alike.
        budget = batch_size * input_ids.shape[1] if batch_size else None
        with self.accelerator.autocast():
            logps, _ = sequence_logprobs(
                model,
                prompts,
                completions,
                temperature=self.temperature,
                micro_batch_tokens=budget,
            )
        return torch.nn.functional.pad(logps, (0, logits_to_keep - logps.shape[1])), None, None

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )

        # Entropies only when a mask or the bonus reads them (the shared-prefix path has none).
        needs_entropy = self.top_entropy_quantile < 1.0 or self._entropy_bonus_enabled
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=needs_entropy,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )
        old_logps = inputs.get("old_per_token_logps")
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )
        token_weights = self._krpo_token_weights(
            inputs, per_token_logps, old_logps, mask, entropy_mask
        )
        loss_agg = LOSS_TYPE_TO_AGG[self.loss_type]
        clip = self.loss_type not in ("cispo", "sapo")
        loss, stats = policy_loss(
            per_token_logps,
            old_logps,
            inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            inputs["advantages"],
            mask,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            beta=self.beta,
            loss_agg=loss_agg,
            max_len=self.max_completion_length if loss_agg == "seq-mean-token-sum-norm" else None,
            loss_type="clip" if clip else self.loss_type,
            ratio_level=self.importance_sampling_level,
            delta=self.args.delta if clip else None,  # TRL applies delta to the clip only
            tau_pos=self.args.sapo_temperature_pos,
            tau_neg=self.args.sapo_temperature_neg,
            bias_correction_kl=bool(self.args.use_bias_correction_kl) and self.beta != 0.0,
            token_weights=token_weights,
        )

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in _GLOBAL_TOKEN_NORMALISED:
            # TRL's dapo and cispo divide the token sum by the global token count of the
            # accumulation window: undo the local token mean, then apply that normaliser.
            normalizer = (
                inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            )
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            loss = loss * mask.sum() / normalizer
        else:
            loss = loss / accumulation
        metrics = self._metrics[mode]
        if self._entropy_bonus_enabled:
            # TRL's bonus: the mean entropy over the tokens the entropy mask keeps.
            metrics["policy_loss"].append(self.accelerator.gather(loss.detach()).nanmean().item())
            kept = mask if entropy_mask is None else mask * entropy_mask
            mean_entropy = (entropies * kept).sum() / kept.sum().clamp(min=1.0)
            loss = loss - self.entropy_coef * mean_entropy / accumulation
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )

        def global_mean(value: torch.Tensor) -> float:
            return self.accelerator.gather(value).mean().item()

        if self.beta != 0.0:
            metrics["kl"].append(global_mean(stats["kl"]))
        if entropies is not None:
            masked = mask.to(entropies.dtype)
            metrics["entropy"].append(
                global_mean((entropies * masked).sum() / masked.sum().clamp(min=1.0))
            )
        if clip:
            metrics["clip_ratio/region_mean"].append(global_mean(stats["clip_fraction"]))
            for name in ("low", "high"):  # the paper's loss path returns the region only
                if f"clip_fraction_{name}" in stats:
                    value = global_mean(stats[f"clip_fraction_{name}"])
                    metrics[f"clip_ratio/{name}_mean"].append(value)
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean(stats["clip_fraction_high"]))
        return loss

    def _krpo_token_weights(
        self,
        inputs: dict[str, Any],
        per_token_logps: torch.Tensor,
        old_logps: torch.Tensor | None,
        mask: torch.Tensor,
        entropy_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The product of the masks and weights TRL multiplies into its per-token policy
        loss: [B, T], [B] when all are per row, None when there are none."""
        factors = [] if entropy_mask is None else [entropy_mask]
        if self.off_policy_mask_threshold is not None:
            # TRL's choice: the engine's log-probs, else the rollout-time ones.
            rollout = per_token_logps.detach() if old_logps is None else old_logps
            factors.append(
                self.get_off_policy_mask(
                    inputs["advantages"].unsqueeze(-1),
                    per_token_logps,
                    inputs.get("sampling_per_token_logps", rollout),
                    mask,
                    self.off_policy_mask_threshold,
                )
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
            factors.append(ratio if ratio.dim() == 2 else ratio.unsqueeze(-1))
        if not factors:
            return None
        weights = factors[0].to(per_token_logps.dtype)
        for factor in factors[1:]:
            weights = weights * factor.to(per_token_logps.dtype)
        return weights.squeeze(-1) if weights.shape[-1] == 1 else weights
