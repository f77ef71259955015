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
    with pytest.raises(NotImplementedError, match="rollout importance weights"):
        fn(old, logp, adv, mask, "token-mean", _actor_config(), torch.ones_like(logp))


def test_verl_register_is_idempotent():
    krpo_verl.register()
    krpo_verl.register()
    assert get_adv_estimator_fn("krpo") is krpo_verl.compute_krpo_advantage
    assert get_policy_loss_fn("krpo_fused") is krpo_verl.compute_policy_loss_krpo_fused


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
