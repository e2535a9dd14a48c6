import math

import pytest
import torch

from dspy_p2o.trainer.losses import TemplateRatio, aggregate, template_ratio_weights, token_loss, truncated_is_weights

LOG = math.log


def test_clipped_surrogate_by_hand():
    # one token per row: ratio 1.5 / 0.5 with positive and negative advantages
    logp = torch.tensor([[LOG(1.5)], [LOG(0.5)], [LOG(0.5)], [LOG(1.5)], [LOG(1.1)]], requires_grad=True)
    old = torch.zeros(5, 1)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    out = token_loss(logp, old, adv, epsilon_low=0.2, epsilon_high=0.28)
    # -min(r A, clip(r) A): 1.5 -> clip 1.28; .5 A=+1 -> .5; .5 A=-1 -> clip .8; 1.5 A=-1 -> 1.5; 1.1 A=2 -> 2.2
    assert out.loss.squeeze(1).tolist() == pytest.approx([-1.28, -0.5, 0.8, 1.5, -2.2])
    assert out.clipped_high.squeeze(1).tolist() == [True, False, False, False, False]
    assert out.clipped_low.squeeze(1).tolist() == [False, False, True, False, False]
    out.loss.sum().backward()
    # d/dlogp of -r A is -r A where unclipped; zero where the clip is active
    assert logp.grad.squeeze(1).tolist() == pytest.approx([0.0, -0.5, 0.0, 1.5, -2.2])


def test_weights_scale_the_surrogate_and_kl_is_k3():
    logp = torch.tensor([[LOG(0.5), LOG(1.0)]])
    old = torch.tensor([[LOG(0.5), LOG(1.0)]])
    ref = torch.tensor([[LOG(1.0), LOG(0.5)]])
    out = token_loss(logp, old, torch.tensor([1.0]), weights=torch.tensor([[2.0, 0.5]]), ref_logp=ref, beta=0.1)
    k3 = [math.exp(LOG(2.0)) - LOG(2.0) - 1, math.exp(LOG(0.5)) - LOG(0.5) - 1]
    assert out.kl[0].tolist() == pytest.approx(k3)
    assert out.loss[0].tolist() == pytest.approx([-1 * 2.0 + 0.1 * k3[0], -1 * 0.5 + 0.1 * k3[1]])
    with pytest.raises(ValueError, match="reference"):
        token_loss(logp, old, torch.tensor([1.0]), beta=0.1)


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("agg,expected", [("grpo", (6 / 3 + 4 / 1) / 2), ("dapo", 10 / 4), ("dr_grpo", 10 / (2 * 5))])
def test_aggregations_by_hand(agg, expected):
    got = aggregate(LOSS, MASK, agg, num_sequences=2, num_tokens=4, norm_length=5)
    assert got.item() == pytest.approx(expected)


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_mini_batch_loss(agg):
    norm = dict(num_sequences=2, num_tokens=4, norm_length=5)
    whole = aggregate(LOSS, MASK, agg, **norm)
    parts = aggregate(LOSS[:1], MASK[:1], agg, **norm) + aggregate(LOSS[1:], MASK[1:], agg, **norm)
    assert parts.item() == pytest.approx(whole.item())


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(LOSS, MASK, "mean", num_sequences=2, num_tokens=4, norm_length=5)


def test_template_ratio_mask_soft_and_off():
    logp_tilde = torch.zeros(4)
    logp_x = torch.tensor([LOG(0.005), LOG(0.5), LOG(10.0), LOG(20.0)])  # r = pi(y|x) / pi(y|x~)
    w, kept = template_ratio_weights(logp_x, logp_tilde, "mask", (0.01, 10.0))
    assert kept.tolist() == [False, True, True, False] and w.tolist() == [0, 1, 1, 0]
    w, kept = template_ratio_weights(logp_x, logp_tilde, "soft", (0.01, 10.0))
    assert kept.all() and w.tolist() == pytest.approx([0.5, 1.0, 1.0, 0.5])
    w, kept = template_ratio_weights(logp_x, logp_tilde, "off", (0.01, 10.0))
    assert kept.all() and w.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="template_ratio"):
        template_ratio_weights(logp_x, logp_tilde, "clip", (0.01, 10.0))


def test_template_ratio_mask_keeps_a_token_exactly_at_either_bound():
    """The authors' mask keeps r_t in the CLOSED interval [lo, hi]: strictness matters at both bounds."""
    ratio = TemplateRatio()  # the trainer's defaults: mask, bounds (0.01, 10)
    lo, hi = ratio.bounds
    # r exactly at each bound (the same float32 log the mask compares with), then just outside each
    r = torch.tensor([lo, hi, lo * (1 - 1e-3), hi * (1 + 1e-3)])
    w, kept = ratio.weights(torch.log(r), torch.zeros(4))
    assert kept.tolist() == [True, True, False, False] and w.tolist() == [1, 1, 0, 0]
    w, kept = template_ratio_weights(torch.log(r), torch.zeros(4), "soft", ratio.bounds)
    assert kept.all() and w.tolist() == pytest.approx([1.0, 1.0, 1 - 1e-3, 1 / (1 + 1e-3)], rel=1e-5)


def test_truncated_importance_weights():
    trainer = torch.tensor([LOG(0.5), LOG(0.5), LOG(0.9)])
    engine = torch.tensor([LOG(0.5), LOG(0.1), LOG(0.9 / 0.8)])
    assert truncated_is_weights(trainer, engine, cap=2.0).tolist() == pytest.approx([1.0, 2.0, 0.8])


def test_template_clip_lets_a_distilled_token_climb_to_its_template_probability():
    from dspy_p2o.trainer.losses import template_clip_upper

    # log pi(y|x) before the update vs log pi(y|x~): unlocked by the template, already likely, less likely
    old = torch.tensor([[LOG(0.01), LOG(0.5), LOG(0.5)]])
    tilde = torch.tensor([[LOG(0.9), LOG(0.55), LOG(0.2)]])
    upper = template_clip_upper(old, tilde, epsilon_high=0.28)
    assert upper.squeeze(0).tolist() == pytest.approx([90.0, 1.28, 1.28])
    # ratio 20 on the unlocked token: inside its ceiling (gradient flows); ratio 1.5 elsewhere: clipped
    logp = (old + torch.tensor([[LOG(20.0), LOG(1.5), LOG(1.5)]])).requires_grad_()
    out = token_loss(logp, old, torch.tensor([1.0]), upper=upper)
    assert out.clipped_high.squeeze(0).tolist() == [False, True, True]
    out.loss.sum().backward()
    # its gradient weight stays 1 + eps_high, not the ratio (20 here, e^20 in a run: it would own the batch)
    assert logp.grad.squeeze(0).tolist() == pytest.approx([-1.28, 0.0, 0.0])
    # the same token in a failed rollout is pushed down with that held weight, too (PPO: 20)
    logp.grad = None
    token_loss(logp, old, torch.tensor([-1.0]), upper=upper).loss.sum().backward()
    assert logp.grad.squeeze(0).tolist() == pytest.approx([1.28, 1.5, 1.5])
    # without the ceiling the unlocked token is clipped like any other
    plain = token_loss(logp.detach(), old, torch.tensor([1.0]))
    assert plain.clipped_high.squeeze(0).tolist() == [True, True, True]


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_a_ceiling_of_one_plus_eps_high_gives_ppos_gradient(advantage):
    old = torch.full((1, 5), LOG(0.5))
    ratios = [0.5, 0.9, 1.1, 1.5, 20.0]  # below, inside and above PPO's trust region
    grads = []
    for upper in (None, torch.full((1, 5), 1.28)):
        logp = (old + torch.tensor([[LOG(r) for r in ratios]])).requires_grad_()
        token_loss(logp, old, torch.tensor([advantage]), upper=upper).loss.sum().backward()
        grads.append(logp.grad)
    assert torch.allclose(grads[0], grads[1])
    assert grads[0].abs().sum() > 0

