"""Every public op rejects bad input with an error that names the argument."""

import pytest
import torch

from krpo_fast import group_advantages, kalman_advantages, krpo_loss, policy_loss

R8 = torch.rand(8)
LOGP = -torch.rand(4, 6)
MASK = torch.ones(4, 6, dtype=torch.bool)
ADV = torch.randn(4)


def adv_call(**overrides):
    kwargs = dict(rewards=R8, group_size=4)
    kwargs.update(overrides)
    return lambda: group_advantages(**kwargs)


def loss_call(**overrides):
    kwargs = dict(logp=LOGP, old_logp=LOGP, ref_logp=LOGP, advantages=ADV, mask=MASK)
    kwargs.update(overrides)
    return lambda: policy_loss(**kwargs)


def krpo_call(**overrides):
    kwargs = dict(
        logp=LOGP, old_logp=LOGP, ref_logp=LOGP, rewards=torch.rand(4), mask=MASK, group_size=2
    )
    kwargs.update(overrides)
    return lambda: krpo_loss(**kwargs)


CASES = {
    "rewards not a tensor": (adv_call(rewards=[1.0, 2.0]), TypeError, "rewards"),
    "rewards 2-D": (adv_call(rewards=torch.rand(2, 4)), ValueError, "rewards"),
    "rewards int": (adv_call(rewards=torch.ones(8, dtype=torch.int64)), TypeError, "rewards"),
    "rewards empty": (adv_call(rewards=torch.rand(0)), ValueError, "rewards"),
    "rewards NaN": (
        adv_call(rewards=torch.tensor([0.0, float("nan"), 1, 1])),
        ValueError,
        "rewards",
    ),
    "rewards inf": (
        adv_call(rewards=torch.tensor([0.0, float("inf"), 1, 1])),
        ValueError,
        "rewards",
    ),
    "group_size does not divide": (adv_call(group_size=3), ValueError, "group_size"),
    "group_size zero": (adv_call(group_size=0), ValueError, "group_size"),
    "group_size float": (adv_call(group_size=4.0), TypeError, "group_size"),
    "no layout": (adv_call(group_size=None), ValueError, "group_size"),
    "both layouts": (adv_call(group_offsets=torch.tensor([0, 8])), ValueError, "group_size"),
    "offsets float": (
        adv_call(group_size=None, group_offsets=torch.tensor([0.0, 8.0])),
        TypeError,
        "group_offsets",
    ),
    "offsets short": (
        adv_call(group_size=None, group_offsets=torch.tensor([8])),
        ValueError,
        "group_offsets",
    ),
    "offsets wrong end": (
        adv_call(group_size=None, group_offsets=torch.tensor([0, 4, 7])),
        ValueError,
        "group_offsets",
    ),
    "offsets wrong start": (
        adv_call(group_size=None, group_offsets=torch.tensor([1, 8])),
        ValueError,
        "group_offsets",
    ),
    "offsets decreasing": (
        adv_call(group_size=None, group_offsets=torch.tensor([0, 6, 4, 8])),
        ValueError,
        "group_offsets",
    ),
    "unknown mode": (adv_call(mode="mean"), ValueError, "mode"),
    "process_var zero": (adv_call(process_var=0.0), ValueError, "process_var"),
    "meas_var negative": (adv_call(meas_var=-1.0), ValueError, "meas_var"),
    "init_var zero": (adv_call(init_var=0.0), ValueError, "init_var"),
    "init_mean nan": (adv_call(init_mean=float("nan")), ValueError, "init_mean"),
    "eps negative": (adv_call(eps=-1e-8), ValueError, "eps"),
    "kalman bad var": (
        lambda: kalman_advantages(R8, group_size=4, meas_var=0.0),
        ValueError,
        "meas_var",
    ),
    "logp 1-D": (loss_call(logp=torch.rand(6)), ValueError, "logp"),
    "logp int": (loss_call(logp=torch.ones(4, 6, dtype=torch.int32)), TypeError, "logp"),
    "logp empty": (
        loss_call(logp=torch.rand(0, 6), old_logp=None, ref_logp=None, mask=torch.ones(0, 6)),
        ValueError,
        "logp",
    ),
    "old shape": (loss_call(old_logp=-torch.rand(4, 5)), ValueError, "old_logp"),
    "ref missing with beta": (loss_call(ref_logp=None), ValueError, "ref_logp"),
    "ref shape": (loss_call(ref_logp=-torch.rand(3, 6)), ValueError, "ref_logp"),
    "mask shape": (loss_call(mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "mask"),
    "mask complex": (loss_call(mask=torch.ones(4, 6, dtype=torch.complex64)), TypeError, "mask"),
    "advantages length": (loss_call(advantages=torch.randn(5)), ValueError, "advantages"),
    "advantages 2-D": (loss_call(advantages=torch.randn(4, 1)), ValueError, "advantages"),
    "eps_low negative": (loss_call(eps_low=-0.1), ValueError, "eps_low"),
    "eps_high nan": (loss_call(eps_high=float("nan")), ValueError, "eps_high"),
    "beta negative": (loss_call(beta=-0.01), ValueError, "beta"),
    "unknown loss_agg": (loss_call(loss_agg="sum"), ValueError, "loss_agg"),
    "norm without max_len": (loss_call(loss_agg="seq-mean-token-sum-norm"), ValueError, "max_len"),
    "check_finite": (
        loss_call(logp=torch.full((4, 6), float("nan")), check_finite=True),
        ValueError,
        "logp",
    ),
    # The meta device stands in for a second device on CPU-only machines.
    "mask on another device": (loss_call(mask=MASK.to("meta")), ValueError, "mask"),
    "advantages on another device": (
        loss_call(advantages=ADV.to("meta")),
        ValueError,
        "advantages",
    ),
    "old on another device": (loss_call(old_logp=LOGP.to("meta")), ValueError, "old_logp"),
    "offsets on another device": (
        adv_call(group_size=None, group_offsets=torch.tensor([0, 8], device="meta")),
        ValueError,
        "group_offsets",
    ),
    "krpo rewards length": (krpo_call(rewards=torch.rand(6), group_size=3), ValueError, "rewards"),
    "krpo group_size": (krpo_call(group_size=3), ValueError, "group_size"),
    "krpo NaN reward": (
        krpo_call(rewards=torch.tensor([0.0, 1.0, float("nan"), 0.0])),
        ValueError,
        "rewards",
    ),
    "krpo adv_mode": (krpo_call(adv_mode="kalmann"), ValueError, "adv_mode"),
    "mask negative": (loss_call(mask=torch.full((4, 6), -1.0)), ValueError, "mask"),
    "mask fractional": (loss_call(mask=torch.full((4, 6), 0.5)), ValueError, "mask"),
    "mask NaN": (loss_call(mask=torch.full((4, 6), float("nan"))), ValueError, "mask"),
    "mask int 2": (loss_call(mask=torch.full((4, 6), 2)), ValueError, "mask"),
    "krpo mask negative": (krpo_call(mask=-torch.ones(4, 6)), ValueError, "mask"),
    "logp meta": (loss_call(logp=LOGP.to("meta")), ValueError, "logp"),
    "all meta": (
        loss_call(
            **{
                k: t.to("meta")
                for k, t in dict(
                    logp=LOGP, old_logp=LOGP, ref_logp=LOGP, advantages=ADV, mask=MASK
                ).items()
            }
        ),
        ValueError,
        "logp",
    ),
    "rewards meta": (adv_call(rewards=R8.to("meta")), ValueError, "rewards"),
    "krpo rewards on another device": (
        krpo_call(rewards=torch.rand(4, device="meta")),
        ValueError,
        "rewards",
    ),
    "krpo loss_agg": (krpo_call(loss_agg="mean"), ValueError, "loss_agg"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_with_its_name(case):
    call, error, name = CASES[case]
    with pytest.raises(error, match=name):
        call()


def test_check_finite_ignores_masked_out_tokens():
    logp = LOGP.clone()
    logp[:, -1] = float("-inf")
    mask = MASK.clone()
    mask[:, -1] = False
    loss, _ = policy_loss(logp, logp, logp, ADV, mask, check_finite=True)
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mismatched_devices():
    with pytest.raises(ValueError, match="mask"):
        policy_loss(LOGP.cuda(), None, None, ADV.cuda(), MASK, beta=0.0)
    with pytest.raises(ValueError, match="group_offsets"):
        group_advantages(R8.cuda(), group_offsets=torch.tensor([0, 8]))


def test_integer_masks_of_zeros_and_ones_equal_bool():
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    expected, _ = policy_loss(LOGP, LOGP, LOGP, ADV, mask)
    for dtype in (torch.uint8, torch.int32, torch.float32, torch.bfloat16):
        loss, _ = policy_loss(LOGP, LOGP, LOGP, ADV, mask.to(dtype))
        assert torch.equal(loss, expected), dtype
