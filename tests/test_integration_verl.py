"""verl integration: "krpo" and "krpo_fused" called through verl's own registries.

verl is not mocked: the functions are fetched with verl's ``get_adv_estimator_fn`` and
``get_policy_loss_fn`` and compared with krpo-fast's ops and with verl's ``"vanilla"``
loss (equal to ours where its dual clip does not act).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is not installed (see the README's verl section for the pip lines)",
)

from omegaconf import OmegaConf  # noqa: E402  (a verl dependency)
from verl.trainer.ppo.core_algos import (  # noqa: E402
    get_adv_estimator_fn,
    get_policy_loss_fn,
)

import krpo_fast.integrations.verl as krpo_verl  # noqa: E402
from krpo_fast import group_advantages, policy_loss  # noqa: E402

AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
]


def _batch(seed: int, n: int = 11, length: int = 7):
    """A ragged, shuffled uid layout (groups of 4, 3, 1, 3), random rewards and mask."""
    gen = torch.Generator().manual_seed(seed)
    uids = np.array(["a"] * 4 + ["b"] * 3 + ["c"] + ["d"] * 3, dtype=object)
    uids = uids[torch.randperm(n, generator=gen).numpy()]
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    lengths[3] = 0  # an empty response: no tokens, no loss
    mask = torch.arange(length) < lengths.unsqueeze(1)
    token_rewards = torch.zeros(n, length)
    token_rewards[:, 0] = torch.randint(0, 3, (n,), generator=gen).float() / 2
    token_rewards[:, 1] = torch.rand(n, generator=gen) * mask[:, 1]
    return uids, token_rewards, mask, gen


def _expected_advantages(uids, rewards, **settings):
    """Per uid: krpo-fast's op on that group's rewards in batch order."""
    expected = torch.empty_like(rewards)
    for uid in dict.fromkeys(uids):
        rows = torch.tensor(np.flatnonzero(uids == uid))
        expected[rows] = group_advantages(rewards[rows], group_size=len(rows), **settings)
    return expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verl_adv_estimator_matches_group_advantages(seed):
    uids, token_rewards, mask, _ = _batch(seed)
    estimator = get_adv_estimator_fn("krpo")
    advantages, returns = estimator(
        token_level_rewards=token_rewards, response_mask=mask, config=None, index=uids
    )
    expected = _expected_advantages(uids, token_rewards.sum(-1))
    assert advantages.shape == mask.shape and torch.equal(advantages, returns)
    torch.testing.assert_close(advantages, expected.unsqueeze(1) * mask)


def test_verl_adv_estimator_settings_from_environment(monkeypatch):
    uids, token_rewards, mask, _ = _batch(3)
    monkeypatch.setenv("KRPO_PROCESS_VAR", "1e-3")
    monkeypatch.setenv("KRPO_MEAS_VAR", "0.5")
    advantages, _ = get_adv_estimator_fn("krpo")(
        token_level_rewards=token_rewards, response_mask=mask, index=uids, config=None
    )
    expected = _expected_advantages(uids, token_rewards.sum(-1), process_var=1e-3, meas_var=0.5)
    torch.testing.assert_close(advantages, expected.unsqueeze(1) * mask)

    monkeypatch.setenv("KRPO_ADV_MODE", "grpo")
    advantages, _ = get_adv_estimator_fn("krpo")(
        token_level_rewards=token_rewards, response_mask=mask, index=uids, config=None
    )
    expected = _expected_advantages(uids, token_rewards.sum(-1), mode="grpo")
    torch.testing.assert_close(advantages, expected.unsqueeze(1) * mask)


def _loss_inputs(seed: int):
    uids, token_rewards, mask, gen = _batch(seed)
    adv, _ = get_adv_estimator_fn("krpo")(
        token_level_rewards=token_rewards, response_mask=mask, index=uids, config=None
    )
    old = -torch.rand(mask.shape, generator=gen) * 3
    # Ratios within [0.7, 1.4]: both clip sides act, verl's dual clip (ratio > 3) does not.
    logp = old + (torch.rand(mask.shape, generator=gen) - 0.4) * 0.7
    old[~mask] = float("nan")  # masked tokens must not leak into the loss
    return old, logp, adv, mask


def _actor_config(**global_batch_info):
    return OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.15,
            "clip_ratio_high": 0.25,
            "clip_ratio_c": 3.0,
            "global_batch_info": global_batch_info,
        }
    )


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize(
    "batch_info",
    [{}, {"dp_size": 2, "batch_num_tokens": 60, "global_batch_size": 20, "loss_scale_factor": 9}],
)
def test_verl_policy_loss_matches_ops_and_vanilla(agg, batch_info):
    old, logp, adv, mask = _loss_inputs(4)
    config = _actor_config(**batch_info)
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn("krpo_fused")(
        old_log_prob=old,
        log_prob=leaf,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=None,
    )
    loss.backward()

    # verl's vanilla loss on the same inputs (its NaN-free view of old log-probs).
    ref_leaf = logp.clone().requires_grad_(True)
    vanilla, vanilla_metrics = get_policy_loss_fn("vanilla")(
        old_log_prob=torch.where(mask, old, 0.0),
        log_prob=ref_leaf,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=None,
    )
    vanilla.backward()
    torch.testing.assert_close(loss, vanilla, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-7)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(vanilla_metrics["actor/pg_clipfrac"])
    assert metrics["actor/ppo_kl"] == pytest.approx(vanilla_metrics["actor/ppo_kl"], abs=1e-6)
    assert 0 < metrics["actor/pg_clipfrac"] < 1

    # With local normalisation, "krpo_fused" is krpo-fast's op itself.
    if not batch_info and agg in ("token-mean", "seq-mean-token-sum-norm"):
        row_adv = (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        ours, stats = policy_loss(
            logp,
            old,
            None,
            row_adv,
            mask,
            eps_low=0.15,
            eps_high=0.25,
            beta=0.0,
            loss_agg=agg,
            max_len=mask.shape[1] if agg.endswith("norm") else None,
        )
        if agg == "token-mean":
            torch.testing.assert_close(loss.detach(), ours)
        assert metrics["actor/pg_clipfrac"] == pytest.approx(stats["clip_fraction"].item())


def test_verl_policy_loss_rejects_what_it_cannot_fuse():
    old, logp, adv, mask = _loss_inputs(5)
    fn = get_policy_loss_fn("krpo_fused")
    token_level = adv + torch.rand(adv.shape) * mask
    with pytest.raises(ValueError, match="one advantage per response"):
        fn(old, logp, token_level, mask, "token-mean", _actor_config(), None)
    with pytest.raises(ValueError, match="kl_loss_type 'k3\\+' is not fused"):
        krpo_verl.compute_kl_loss_krpo_fused(logp, old, mask, "k3+")


def _wide_inputs(seed: int):
    """Ratios from 0.2 to 5 (verl's dual clip acts) and rollout-correction weights."""
    old, _, adv, mask = _loss_inputs(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    old = torch.where(mask, old, 0.0)
    logp = old + torch.rand(mask.shape, generator=gen) * 3.2 - 1.6
    is_weights = torch.where(mask, 0.5 + torch.rand(mask.shape, generator=gen), 0.0)
    return old, logp, adv, mask, is_weights


def _verl_actor_config(**overrides):
    from verl.workers.config.actor import FSDPActorConfig

    settings = {
        "strategy": "fsdp",
        "rollout_n": 1,
        "ppo_micro_batch_size_per_gpu": 1,
        "clip_ratio_low": 0.15,
        "clip_ratio_high": 0.25,
    }
    return FSDPActorConfig(**{**settings, **overrides})


def _both(name_ours, name_verl, old, logp, adv, mask, agg, config, weights):
    results = []
    for name in (name_ours, name_verl):
        leaf = logp.clone().requires_grad_(True)
        loss, metrics = get_policy_loss_fn(name)(
            old_log_prob=old,
            log_prob=leaf,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode=agg,
            config=config,
            rollout_is_weights=weights,
        )
        loss.backward()
        results.append((loss.detach(), leaf.grad, metrics))
    return results


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("with_weights", [False, True])
def test_verl_dual_clip_and_rollout_weights_match_vanilla(agg, with_weights):
    old, logp, adv, mask, is_weights = _wide_inputs(6)
    weights = is_weights if with_weights else None
    config = _actor_config(dp_size=2, batch_num_tokens=60, global_batch_size=20)
    config.clip_ratio_c = 2.5
    ours, theirs = _both("krpo_fused", "vanilla", old, logp, adv, mask, agg, config, weights)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
        assert ours[2][key] == pytest.approx(theirs[2][key], abs=1e-6), key
    assert ours[2]["actor/pg_clipfrac_lower"] > 0  # the dual clip acts on these inputs


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("with_weights", [False, True])
def test_verl_gspo_matches_verls_gspo(agg, with_weights):
    old, logp, adv, mask, is_weights = _wide_inputs(7)
    logp = old + (logp - old) * 0.3  # sequence ratios inside verl's cap of e^10
    # One weight per response (verl's rollout_is="sequence"). Weights varying within a
    # response give the same loss but a different gradient: ours flows through the
    # sequence ratio's mean (TRL's GSPO), verl's through each token's own ratio.
    weights = torch.where(mask, is_weights[:, :1], 0.0) if with_weights else None
    config = _verl_actor_config()
    ours, theirs = _both("krpo_fused_gspo", "gspo", old, logp, adv, mask, agg, config, weights)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    assert ours[2]["actor/pg_clipfrac"] == pytest.approx(theirs[2]["actor/pg_clipfrac"], abs=1e-6)
    assert 0 < theirs[2]["actor/pg_clipfrac"] < 1


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kl_loss_type", list(krpo_verl.KL_LOSS_TYPES))
def test_verl_kl_loss_matches_kl_penalty(agg, kl_loss_type):
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty

    _, logp, _, mask = _loss_inputs(8)
    gen = torch.Generator().manual_seed(8)
    ref = logp + torch.randn(mask.shape, generator=gen) * 2
    ref[0, 0] = logp[0, 0] + 25.0  # low_var_kl's clamps act
    config = _actor_config(dp_size=2, batch_num_tokens=60, global_batch_size=20)
    results = []
    for fused in (True, False):
        leaf = logp.clone().requires_grad_(True)
        if fused:
            loss = krpo_verl.compute_kl_loss_krpo_fused(leaf, ref, mask, kl_loss_type, agg, config)
        else:
            kld = kl_penalty(logprob=leaf, ref_logprob=ref, kl_penalty=kl_loss_type)
            loss = agg_loss(
                loss_mat=kld, loss_mask=mask.float(), loss_agg_mode=agg, **config.global_batch_info
            )
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_verl_register_is_idempotent():
    krpo_verl.register()
    krpo_verl.register()
    assert get_adv_estimator_fn("krpo") is krpo_verl.compute_krpo_advantage
    assert get_policy_loss_fn("krpo_fused") is krpo_verl.compute_policy_loss_krpo_fused
    assert get_policy_loss_fn("krpo_fused_gspo") is krpo_verl.compute_policy_loss_krpo_fused_gspo


def test_verl_loads_the_plugin_through_its_entry_point(tmp_path):
    # A distribution whose only content is the entry point that setup.py declares.
    dist = tmp_path / "krpo_fast_plugin-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: krpo-fast-plugin\nVersion: 0.0.0\n"
    )
    (dist / "entry_points.txt").write_text("[verl.plugins]\nkrpo = krpo_fast.integrations.verl\n")
    script = textwrap.dedent(
        """
        import sys
        import verl  # loads the verl.plugins entry points
        from verl.trainer.ppo import core_algos
        assert "krpo_fast.integrations.verl" in sys.modules
        print(sorted(set(core_algos.ADV_ESTIMATOR_REGISTRY) & {"krpo"}),
              sorted(set(core_algos.POLICY_LOSS_REGISTRY) & {"krpo_fused"}))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS="auto", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), root, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['krpo'] ['krpo_fused']"
