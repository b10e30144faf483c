"""Masked task losses and the dynamic / static task loss weighting."""
from __future__ import annotations

import json
import math

import pytest
import torch

from simmstnet.errors import UserError
from simmstnet.train.loss_weighting import DynamicLossWeighting, StaticLossWeighting, make_loss_weighting
from simmstnet.train.losses import masked_sample_losses, masked_task_losses


def test_masked_losses_by_hand():
    pred = torch.tensor([[[1.0, 0.0], [2.0, 5.0]]])  # (B=1, H=2, C=2)
    y = torch.tensor([[[0.0, float("nan")], [4.0, 1.0]]])
    mask = torch.tensor([[[True, False], [True, True]]])
    mse = masked_task_losses(pred, y, mask, "mse")
    mae = masked_task_losses(pred, y, mask, "mae")
    assert torch.allclose(mse, torch.tensor([(1 + 4) / 2, 16.0]))  # the NaN target is masked out
    assert torch.allclose(mae, torch.tensor([(1 + 2) / 2, 4.0]))


def test_service_without_observed_target_gives_zero_and_no_gradient():
    pred = torch.randn(4, 3, 2, requires_grad=True)
    y = torch.full((4, 3, 2), float("nan"))
    y[..., 0] = 1.0
    mask = torch.zeros(4, 3, 2, dtype=torch.bool)
    mask[..., 0] = True
    losses = masked_task_losses(pred, y, mask)
    assert losses[1] == 0
    losses.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[..., 1] == 0).all() and (pred.grad[..., 0] != 0).any()


def test_sample_weights_scale_window_terms():
    pred, y = torch.randn(3, 2, 1), torch.randn(3, 2, 1)
    mask = torch.ones(3, 2, 1, dtype=torch.bool)
    w = torch.tensor([1.0, 0.0, 0.5])
    sums, counts = masked_sample_losses(pred, y, mask)
    expected = (sums[:, 0] * w).sum() / counts.sum()
    assert torch.allclose(masked_task_losses(pred, y, mask, sample_weight=w), expected[None])
    assert torch.allclose(masked_task_losses(pred, y, mask, sample_weight=torch.ones(3)),
                          masked_task_losses(pred, y, mask))


def test_unknown_loss_kind_is_user_error():
    with pytest.raises(UserError, match="huber"):
        masked_task_losses(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1, 1, dtype=torch.bool),
                           kind="rmse")


def _run(weighting, steps=30):
    """Task 0 falls fast (halves every 5 steps), task 1 slowly, task 2 stays flat."""
    w = None
    for t in range(steps):
        losses = torch.tensor([2.0 * 0.5 ** (t / 5), 1.0 * 0.98 ** t, 0.3])
        w = weighting.weights(losses)
    return w


def test_slow_task_gains_weight_and_weights_sum_to_task_count():
    dyn = DynamicLossWeighting(3, beta=0.9, tau=0.5)
    first = dyn.weights(torch.tensor([2.0, 1.0, 0.3]))
    assert torch.allclose(first, torch.ones(3))  # nothing learned yet: equal weights
    w = _run(dyn)
    assert math.isclose(float(w.sum()), 3.0, rel_tol=1e-5)
    assert w[2] > w[1] > w[0]  # flat > slow > fast, whatever the loss scales
    # a larger temperature evens the weights out
    w_soft = _run(DynamicLossWeighting(3, beta=0.9, tau=5.0))
    assert float(w_soft.max() - w_soft.min()) < float(w.max() - w.min())


def test_combine_is_weighted_sum_with_constant_weights():
    dyn = DynamicLossWeighting(2, beta=0.5)
    dyn.weights(torch.tensor([1.0, 1.0]))
    losses = torch.tensor([0.5, 1.0], requires_grad=True)
    total = dyn.combine(losses)
    w = dyn.current()
    assert torch.allclose(total, (w * losses).sum())
    total.backward()
    assert torch.allclose(losses.grad, w)  # the weights carry no gradient


def test_missing_task_keeps_its_average():
    dyn = DynamicLossWeighting(2, beta=0.5)
    dyn.weights(torch.tensor([1.0, 0.0]))  # task 1 has no observed target yet
    assert dyn.state_dict()["seen"] == [True, False]
    dyn.weights(torch.tensor([0.5, 4.0]))  # its first real loss becomes its start
    state = dyn.state_dict()
    assert state["start"] == [1.0, 4.0] and state["ema"] == [0.75, 4.0]
    dyn.weights(torch.tensor([0.5, float("nan")]))
    assert dyn.state_dict()["ema"][1] == 4.0


def test_state_round_trip_resumes_identically():
    a = DynamicLossWeighting(3, beta=0.8, tau=0.7)
    _run(a, steps=10)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serializable
    b = DynamicLossWeighting(3)
    b.load_state_dict(state)
    nxt = torch.tensor([0.3, 0.9, 0.2])
    assert torch.equal(a.weights(nxt), b.weights(nxt))
    with pytest.raises(UserError, match="resume"):
        DynamicLossWeighting(2).load_state_dict(state)
    with pytest.raises(UserError, match="resume"):
        StaticLossWeighting(3).load_state_dict(state)


def test_static_weighting_is_plain_sum():
    s = make_loss_weighting("average", 3)
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(s.weights(losses), torch.ones(3))
    assert float(s.combine(losses)) == 6.0
    restored = StaticLossWeighting(3)
    restored.load_state_dict(s.state_dict())
    assert restored.steps == s.steps
    with pytest.raises(UserError, match="unknown loss weighting"):
        make_loss_weighting("uncertainty", 3)
    with pytest.raises(UserError, match="beta"):
        DynamicLossWeighting(3, beta=1.0)
