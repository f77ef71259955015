"""The public API: every op at the top level, tensors positional, hyperparameters
keyword-only with the same names, order and defaults across sibling ops."""

import inspect

import torch

import krpo_fast
import krpo_fast.logits_ops
import krpo_fast.ops
from krpo_fast import defaults

OPS = (
    "group_advantages",
    "kalman_advantages",
    "policy_loss",
    "krpo_loss",
    "selective_log_softmax",
    "policy_loss_from_logits",
    "policy_loss_from_hidden",
    "krpo_loss_from_logits",
    "krpo_loss_from_hidden",
)
# Inputs that are tensors (or None in place of one): the only positional parameters.
TENSORS = {
    "rewards",
    "logp",
    "old_logp",
    "ref_logp",
    "advantages",
    "mask",
    "logits",
    "token_ids",
    "hidden",
    "lm_head_weight",
}


def parameters(name):
    return inspect.signature(getattr(krpo_fast, name)).parameters.values()


def test_every_op_is_exported_and_old_paths_still_work():
    assert set(OPS) <= set(krpo_fast.__all__)
    for name in OPS:
        module = krpo_fast.ops if hasattr(krpo_fast.ops, name) else krpo_fast.logits_ops
        assert getattr(krpo_fast, name) is getattr(module, name)


def test_tensors_positional_hyperparameters_keyword_only():
    for name in OPS:
        for p in parameters(name):
            if p.name in TENSORS:
                assert p.kind is p.POSITIONAL_OR_KEYWORD, (name, p.name)
            else:
                assert p.kind is p.KEYWORD_ONLY, (name, p.name)


# Every keyword of every op, in the one order they all follow: group layout, advantage
# estimator, loss, then switches ("mode" of the advantage ops is "adv_mode" of the losses).
KEYWORD_ORDER = [
    "group_size",
    "group_offsets",
    "adv_mode",
    "process_var",
    "meas_var",
    "init_mean",
    "init_var",
    "eps",
    "eps_low",
    "eps_high",
    "beta",
    "loss_agg",
    "max_len",
    "ratio_level",
    "loss_type",
    "tau_pos",
    "tau_neg",
    "delta",
    "dual_clip",
    "kl_estimator",
    "bias_correction_kl",
    "token_weights",
    "entropy_coef",
    "temperature",
    "chunk_size",
    "return_entropy",
    "inplace_backward",
    "check_finite",
]


def test_shared_hyperparameters_have_one_order_and_one_default():
    default = {}
    for name in OPS:
        keywords = [p for p in parameters(name) if p.kind is p.KEYWORD_ONLY]
        names = ["adv_mode" if p.name == "mode" else p.name for p in keywords]
        assert names == [n for n in KEYWORD_ORDER if n in names], name
        for key, p in zip(names, keywords, strict=True):
            assert default.setdefault(key, p.default) == p.default, (name, p.name)
    assert default["adv_mode"] == defaults.ADV_MODE
    assert default["loss_agg"] == defaults.LOSS_AGG
    assert default["eps"] == defaults.ADV_EPS
    assert (default["eps_low"], default["eps_high"], default["beta"]) == (
        defaults.EPS_LOW,
        defaults.EPS_HIGH,
        defaults.BETA,
    )


def test_a_positional_hyperparameter_is_refused():
    rewards = torch.rand(8)
    try:
        krpo_fast.group_advantages(rewards, 4)
    except TypeError as error:
        assert "positional" in str(error)
    else:
        raise AssertionError("group_size was accepted positionally")
