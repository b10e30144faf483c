"""sim2real.mode=finetune: the time split, the phases and their schedule, L2-SP, the held-out choice."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.train.finetune import FineTuner, split_in_time
from simmstnet.train.sim2real import Sim2RealConfig, make_reweighter


class Linear(nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, batch):
        return self.lin(batch["x"]).squeeze(-1)


def sq_loss(pred, batch):
    return (pred - batch["y"]) ** 2


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    sim = {"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, generator=g), "index": torch.arange(8)}
    real = {"x": torch.randn(6, 4, generator=g), "y": torch.randn(6, generator=g), "index": torch.arange(6)}
    return sim, real


def test_split_in_time_holds_out_the_last_targets():
    # 50 target steps, 20 % held out: the last 10; windows straddling step 50 belong to neither
    assert split_in_time((10, 60), horizon=3, holdout=0.2) == ((10, 50), (50, 60))
    # at least one horizon is held out, however small the share
    assert split_in_time((0, 40), horizon=6, holdout=0.01) == ((0, 34), (34, 40))
    with pytest.raises(UserError, match="sim2real.finetune_holdout"):
        split_in_time((0, 8), horizon=6, holdout=0.2)


def test_phases_read_sim_then_real_and_the_schedule_restarts_lower():
    cfg = Sim2RealConfig(mode="finetune", pretrain_share=0.3, finetune_lr_factor=0.1)
    rw = make_reweighter(cfg, Linear(), 8, sq_loss, steps_per_epoch=5, total_steps=10)
    assert isinstance(rw, FineTuner) and rw.T_pre == 3
    sim, real = _batches()
    needs = []
    for _ in range(10):
        needs.append(rw.needs())
        rw.step(sim if needs[-1] == "sim" else None, real if needs[-1] == "real" else None)
    assert needs == ["sim"] * 3 + ["real"] * 7
    # a cosine over each phase: the fine-tuning one starts again from its top, at 0.1 x
    def cosine(step, total):
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    f = rw.lr_factor(cosine)
    assert f(0) == 1.0 and f(2) == pytest.approx(cosine(2, 3))
    assert f(3) == pytest.approx(0.1) and f(9) == pytest.approx(0.1 * cosine(6, 7))
    with pytest.raises(ValueError, match="real batch"):
        rw.step(sim, None)


def test_l2sp_adds_the_pull_towards_the_pretrained_weights():
    """alpha (theta - theta_pre) on top of the real loss gradient, theta_pre = theta at the switch."""
    torch.manual_seed(0)
    sim, real = _batches(1)
    base = Linear()
    grads, pre = {}, None
    for alpha in (0.0, 0.5):
        model = copy.deepcopy(base)
        cfg = Sim2RealConfig(mode="finetune", pretrain_share=0.25, finetune_l2sp=alpha)
        rw = make_reweighter(cfg, model, 8, sq_loss, steps_per_epoch=4, total_steps=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):  # one pretraining step, then the first fine-tuning step (theta_pre taken)
            opt.zero_grad()
            rw.step(sim, real)
            opt.step()
        pre = {n: v.clone() for n, v in rw.theta_pre.items()}
        opt.zero_grad()
        rw.step(None, real)
        grads[alpha] = {n: p.grad.clone() for n, p in model.named_parameters()}
        moved = {n: p.detach() - pre[n] for n, p in model.named_parameters()}
    for n in grads[0.0]:
        assert float(moved[n].abs().max()) > 0  # theta left theta_pre, so the pull is not zero
        torch.testing.assert_close(grads[0.5][n] - grads[0.0][n], 0.5 * moved[n])


def test_best_heldout_parameters_are_kept_and_patience_stops():
    model = Linear()
    cfg = Sim2RealConfig(mode="finetune", pretrain_share=0.0, finetune_patience=2)
    rw = make_reweighter(cfg, model, 8, sq_loss, steps_per_epoch=10, total_steps=10)
    kept = None
    for i, score in enumerate([3.0, 2.0, 2.5, 2.6]):
        with torch.no_grad():
            model.lin.weight.fill_(float(i))
        best = rw.check(score)
        if best:
            kept = model.lin.weight.detach().clone()
        assert rw.done == (i == 3)
    assert float(kept[0, 0]) == 1.0 and rw.best_score == 2.0
    rw.restore_best()
    assert torch.equal(model.lin.weight, kept)
    state = copy.deepcopy(rw.state_dict())
    again = make_reweighter(cfg, Linear(), 8, sq_loss, steps_per_epoch=10, total_steps=10)
    again.load_state_dict(state)
    assert again.done and again.best_score == 2.0 and torch.equal(again.best["lin.weight"], kept)


def test_finetune_settings_are_checked():
    for key, value in (("pretrain_share", 1.5), ("finetune_holdout", 0.0), ("finetune_lr_factor", 0.0),
                       ("finetune_patience", -1), ("finetune_l2sp", -0.1)):
        with pytest.raises(UserError, match=f"sim2real.{key}"):
            Sim2RealConfig(mode="finetune", **{key: value}).validate()
