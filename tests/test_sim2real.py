"""Sim2real reweighting: toy problem with a known answer, cutting-plane bookkeeping, phases,
reproducibility, resume, L2RW and the diagnostics files."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.train.cutting_planes import CuttingPlanes
from simmstnet.train.sim2real import (BilevelReweighter, Sim2RealConfig, make_reweighter)
from simmstnet.train.sim2real_report import weights_report, write_diagnostics


# -- the toy problem ---------------------------------------------------------------------------
class Linear(nn.Module):
    """pred = x . w + b; batch["x"] (B, d) -> (B,)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, batch):
        return self.lin(batch["x"]).squeeze(-1)


class TinyMLP(nn.Module):
    """A nonlinear model so that h has curvature in theta (finite-difference check)."""

    def __init__(self, d: int, width: int = 6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, batch):
        return self.net(batch["x"]).squeeze(-1)


def sq_loss(pred, batch):
    return (pred - batch["y"]) ** 2


def toy_data(seed=0, d=5, n_sim=400, n_real=20, n_test=500, shift=2.0, noise=0.5,
             dtype=torch.float32):
    """Linear regression. Real and the first half of the simulated windows follow y = x.w;
    the second ("shifted") half follows y = x.w' with ||w' - w|| ~ shift."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w_shift = w + shift * torch.randn(d, generator=g) / math.sqrt(d)
    xs = torch.randn(n_sim, d, generator=g)
    shifted = torch.arange(n_sim) >= n_sim // 2
    ys = torch.where(shifted, xs @ w_shift, xs @ w) + 0.1 * torch.randn(n_sim, generator=g)
    xr = torch.randn(n_real, d, generator=g)
    yr = xr @ w + noise * torch.randn(n_real, generator=g)
    xt = torch.randn(n_test, d, generator=g)
    yt = xt @ w + noise * torch.randn(n_test, generator=g)
    sim = {"x": xs.to(dtype), "y": ys.to(dtype), "index": torch.arange(n_sim)}
    real = {"x": xr.to(dtype), "y": yr.to(dtype), "index": torch.arange(n_real)}
    test = {"x": xt.to(dtype), "y": yt.to(dtype)}
    return sim, shifted, real, test


def train(mode, seed=0, epochs=60, batch=50, lr=0.05, data=None, steps=None, **cfg_kw):
    """The training loop a trainer runs: one rw.step per simulated minibatch, the full (small)
    real set as the real batch. Returns (test loss, reweighter, model, per-step diags)."""
    sim, shifted, real, test = data if data is not None else toy_data(seed)
    torch.manual_seed(seed)
    model = Linear(sim["x"].shape[1])
    cfg = Sim2RealConfig(mode=mode, **cfg_kw)
    n = len(shifted)
    spe = n // batch
    rw = make_reweighter(cfg, model, n, sq_loss, steps_per_epoch=spe, total_steps=spe * epochs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    diags = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(spe):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad(set_to_none=True)
            diags.append(rw.step({k: v[idx] for k, v in sim.items()}, real))
            opt.step()
            if steps is not None and len(diags) >= steps:
                break
        rw.end_epoch()
        if steps is not None and len(diags) >= steps:
            break
    with torch.no_grad():
        test_loss = float(sq_loss(model(test), test).mean())
    return test_loss, rw, model, diags


# The default bilevel form (as before issue 12), spelled out, and the held-out form (held-out folds,
# a learned share, the noise-robust lambda optimizer, bounded duals, planes aged out), reachable by
# settings and not the default: measured, it did not beat the default form on the real block.
FORMER = dict(upper_folds=1, learn_share=False, lambda_opt="adam", lr_lambda=0.2, dual_max=None,
              dual_reg=0.0, plane_max_age=None)
HELDOUT = dict(upper_folds=2, learn_share=True, lambda_opt="sgd", lr_lambda=0.02, dual_max=10.0,
               dual_reg=0.1, plane_max_age=25)


def test_former_form_is_the_default():
    cfg = Sim2RealConfig(mode="bilevel")
    assert {k: getattr(cfg, k) for k in FORMER} == FORMER and cfg.eps_quantile is None


def by_city(data, n_cities=8):
    """The toy problem with one weight per simulated "city": windows in n_cities equal groups (the
    first half of the cities follow the real model, the second half are shifted), the city id as the
    index, as sim2real.weight_by=scenario gives the reweighter."""
    sim, shifted, real, test = data
    n = len(shifted)
    return ({**sim, "index": torch.arange(n) * n_cities // n}, shifted, real, test)


def good_half(data):
    """The oracle's data: only the unshifted simulated windows."""
    sim, shifted, real, test = data
    keep = ~shifted
    sim = {k: v[keep] for k, v in sim.items()}
    sim["index"] = torch.arange(int(keep.sum()))
    return (sim, shifted[keep], real, test)


# -- the known answer ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 3])
def test_heldout_bilevel_beats_off_and_comes_near_the_oracle(seed):
    data = toy_data(seed)
    off_loss, *_ = train("off", seed, data=data)
    oracle_loss, *_ = train("mix", seed, data=good_half(data))
    loss, rw, _, diags = train("bilevel", seed, data=by_city(data), warm_start_epochs=5, **HELDOUT)
    w = rw.weights()[:8]
    # every good city above every shifted one
    assert float(w[:4].min()) > float(w[4:].max()), w
    assert float(w[:4].mean()) > float(w[4:].mean()) + 0.4, w
    assert loss < off_loss, (loss, off_loss)
    assert loss < 1.25 * oracle_loss, (loss, oracle_loss)
    # with eps following the running median of h (sim2real.eps_quantile=0.5, not the default: a
    # binding constraint cost accuracy on the real block) the constraint acts: planes are cut, carry
    # positive duals, and bind on a good share of the phase-1 steps, at no loss here
    loss_q, rw, _, diags = train("bilevel", seed, data=by_city(data), warm_start_epochs=5, eps_quantile=0.5,
                                 **HELDOUT)
    assert loss_q < off_loss, (loss_q, off_loss)
    phase1 = [d for d in diags if d["phase"] == "phase1"]
    assert sum(d["added"] for d in phase1) >= 5
    assert max(d["gamma_max"] for d in phase1) > 0
    assert np.mean([d["plane_active"] for d in phase1]) > 0.3
    # no plane outlives plane_max_age
    assert rw.planes.n_dropped > 0
    born = rw.planes.born[rw.planes.active]
    assert bool(torch.all(born >= rw.t - 1 - rw.cfg.plane_max_age))
    assert rw.metrics_block()["plane_active_share"] == pytest.approx(np.mean([d["plane_active"] for d in phase1]))
    # the live dual is bounded
    assert all(0 <= d["gamma0"] <= rw.cfg.dual_max for d in phase1)


def test_the_share_falls_when_every_source_is_shifted():
    for seed in (0, 1):
        sim, shifted, real, test = toy_data(seed, shift=4.0)
        n = int(shifted.sum())
        sim = {k: v[shifted] for k, v in sim.items()}
        sim["index"] = torch.arange(n) * 4 // n  # four cities, all shifted
        _, rw, _, diags = train("bilevel", seed, data=(sim, shifted[shifted], real, test), warm_start_epochs=5,
                                **HELDOUT)
        assert rw.sim_share() < 0.25, (seed, rw.sim_share())
        # it fell over the run, from the 0.5 it started at
        shares = [d["share"] for d in diags if "share" in d]
        assert shares[0] > 0.45 and shares[-1] < shares[0] - 0.25


def test_pure_noise_hypergradients_leave_the_weights_near_their_start():
    """32 city weights fed 3,000 steps of pure-noise hypergradients at a trainer's scale: the sgd
    optimizer keeps every weight within a narrow band of 0.5, where Adam at the former lr spreads
    them over (0, 1)."""
    def spread(**kw):
        cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=0, t1=10_000, **{**HELDOUT, **kw})
        rw = BilevelReweighter(Linear(3), 32, cfg, sq_loss)
        g = torch.Generator().manual_seed(0)
        for _ in range(3000):
            noise = 1e-4 * torch.randn(32, generator=g)
            rw._update_lambda(noise, 1e-4 * torch.randn(1, generator=g))
        w = rw.weights()
        return float((w - 0.5).abs().max()), float(w.std()), rw.sim_share()

    worst, std, share = spread()
    assert worst < 0.2 and std < 0.08 and abs(share - 0.5) < 0.2, (worst, std, share)
    worst_adam, std_adam, _ = spread(lambda_opt="adam", lr_lambda=0.2, learn_share=False)
    assert worst_adam > 0.4 and std_adam > 0.25, (worst_adam, std_adam)
    # a consistent sign still moves a weight: one city's hypergradient has a small bias
    cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=0, t1=10_000, **HELDOUT)
    rw = BilevelReweighter(Linear(3), 32, cfg, sq_loss)
    g = torch.Generator().manual_seed(1)
    for _ in range(3000):
        noise = torch.randn(32, generator=g)
        noise[0] += 0.5  # descending it lowers lambda_0
        rw._update_lambda(1e-4 * noise, None)
    w = rw.weights()
    assert float(w[0]) < 0.5 - 0.3 and float((w[1:] - 0.5).abs().max()) < 0.2, w


def test_the_upper_level_reads_a_held_out_fold_that_rotates():
    cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=0, t1=1000, upper_folds=3)
    rw = BilevelReweighter(Linear(5), 10, cfg, sq_loss)
    real = toy_data(0)[2]  # 20 windows, index 0..19
    seen_fit = torch.zeros(20)
    for t in range(6):
        fit, held = rw.split_real(real, t=t)
        f, h = set(fit["index"].tolist()), set(held["index"].tolist())
        assert not f & h and f | h == set(range(20))
        assert h == {i for i in range(20) if i % 3 == t % 3}
        assert fit["x"].shape[0] == len(f) and torch.equal(held["y"], real["y"][sorted(h)])
        seen_fit[sorted(f)] += 1
    assert torch.all(seen_fit == 4)  # each window in theta's real loss in 2 of every 3 steps
    # a fold_key (the loop's time blocks) takes precedence over the index
    fit, held = rw.split_real({**real, "fold_key": torch.arange(20) // 7}, t=1)
    assert held["index"].tolist() == list(range(7, 14))
    # a batch with windows of one fold only is used whole for both
    one = {k: v[:1] for k, v in real.items()}
    assert rw.split_real(one, t=1)[0] is one


def test_g_reads_only_the_held_out_windows_and_theta_does_not_descend_it():
    """Perturbing the targets of held-out windows changes lambda's step but not theta's gradient;
    perturbing a fit window's target changes theta's gradient."""
    sim, _, real, _ = by_city(toy_data(0))

    def one_step(real_batch):
        torch.manual_seed(0)
        model = Linear(5)
        cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=0, t1=1000, live_constraint=False, k_pre=1000,
                             **HELDOUT)
        rw = BilevelReweighter(model, 8, cfg, sq_loss)
        seen = []
        rw._update_lambda = lambda g_lam, g_share: seen.append(torch.cat([g_lam, g_share]))
        rw.step({k: v[:50] for k, v in sim.items()}, real_batch)
        return seen[0], torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    lam0, g0 = one_step(real)
    held = {**real, "y": real["y"].clone()}
    held["y"][0] += 5.0  # index 0: fold 0, held out at t = 0
    lam1, g1 = one_step(held)
    assert not torch.equal(lam0, lam1) and torch.equal(g0, g1)
    fit = {**real, "y": real["y"].clone()}
    fit["y"][1] += 5.0  # index 1: in theta's real loss at t = 0
    _, g2 = one_step(fit)
    assert not torch.allclose(g0, g2)


def test_duals_are_regularised_and_bounded():
    pool = CuttingPlanes(3, 2, p_max=2)
    pool.add(torch.ones(3), torch.ones(2), 0.0, step=0)
    pool.dual_ascent(torch.tensor([100.0, 0.0]), lr_gamma=1.0, upper=10.0)
    assert pool.gamma.tolist() == [10.0, 0.0]
    pool.dual_ascent(torch.tensor([0.0, 0.0]), lr_gamma=0.5, reg=0.2, upper=10.0)
    assert pool.gamma.tolist() == pytest.approx([10.0 - 0.5 * 0.2 * 10.0, 0.0])


def test_planes_older_than_the_max_age_are_dropped():
    pool = CuttingPlanes(3, 2, p_max=3)
    for t in (0, 5, 9):
        pool.add(torch.ones(3), torch.ones(2), 0.0, step=t)
    pool.gamma = torch.tensor([1.0, 1.0, 1.0])
    assert pool.drop_older(6) == 2 and pool.born.tolist() == [-1, -1, 9] and pool.n_dropped == 2
    assert pool.gamma.tolist() == [0.0, 0.0, 1.0] and float(pool.a[:2].abs().sum()) == 0.0


def test_eps_follows_a_running_quantile_of_h():
    cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=0, t1=1000, eps_quantile=0.25, eps_window=4)
    rw = BilevelReweighter(Linear(5), 8, cfg, sq_loss)
    for h in (4.0, 1.0, 3.0, 2.0, 10.0, 20.0):
        before = list(rw._calib)
        rw._update_eps(h)
        window = before[-4:] or [h]
        assert rw.eps == pytest.approx(float(np.quantile(window, 0.25)))
    assert rw._calib == [3.0, 2.0, 10.0, 20.0]


def test_frozen_weights_and_mix_with_a_warm_start():
    data = by_city(toy_data(0))
    _, rw, _, diags = train("bilevel", 0, data=data, warm_start_epochs=5, freeze_weights=True, epochs=10,
                            eps_quantile=0.5, **HELDOUT)
    assert torch.all(rw.weights() == 0.5) and rw.sim_share() == pytest.approx(0.5)
    assert sum(d["added"] for d in diags) > 0  # the constraint still runs
    sim, shifted, real, test = data
    model = Linear(5)
    cfg = Sim2RealConfig(mode="mix", mix_warm_start=True, warm_start_epochs=2)
    rw = make_reweighter(cfg, model, 8, sq_loss, steps_per_epoch=4, total_steps=40)
    assert rw.T0 == 8
    bad_real = {**real, "y": real["y"] + float("nan")}
    for t in range(8):  # the warm start reads no real window
        model.zero_grad()
        rw.step({k: v[:50] for k, v in sim.items()}, bad_real)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    rw.step({k: v[:50] for k, v in sim.items()}, bad_real)
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_finetune_beats_real_only_on_an_underdetermined_toy():
    """10 unknowns, 6 real windows: real-only training cannot pin the model down; pretraining on
    the simulated windows (half of them shifted) and fine-tuning on the real ones can. The loop runs
    the stepper as the trainer's does: needs(), before_step() and the lr_factor() schedule."""
    for seed in (0, 1):
        data = toy_data(seed, d=10, n_real=6)
        sim, shifted, real, test = data
        off_loss, *_ = train("off", seed, data=data)
        torch.manual_seed(seed)
        model = Linear(10)
        n, batch, epochs = len(shifted), 50, 60
        spe = n // batch
        rw = make_reweighter(Sim2RealConfig(mode="finetune"), model, n, sq_loss, steps_per_epoch=spe,
                             total_steps=spe * epochs)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rw.lr_factor(lambda step, total: 1.0))
        g = torch.Generator().manual_seed(seed + 1)
        needs = set()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(spe):
                need = rw.needs()
                needs.add(need)
                rw.before_step(opt)
                opt.zero_grad(set_to_none=True)
                idx = perm[i * batch:(i + 1) * batch]
                rw.step({k: v[idx] for k, v in sim.items()} if need != "real" else None,
                        real if need != "sim" else None)
                opt.step()
                sched.step()
        with torch.no_grad():
            ft_loss = float(sq_loss(model(test), test).mean())
        assert needs == {"sim", "real"}
        assert ft_loss < 0.5 * off_loss, (seed, ft_loss, off_loss)


# The default form's known answer (one weight per window, Adam, G on the real windows theta trains on).
@pytest.mark.parametrize("seed", [0, 3])
def test_bilevel_downweights_shifted_half_and_beats_mix(seed):
    data = toy_data(seed)
    shifted = data[1]
    mix_loss, *_ = train("mix", seed, data=data)
    bil_loss, rw, _, diags = train("bilevel", seed, data=data, warm_start_epochs=5)
    w = rw.weights()
    good, bad = float(w[~shifted].mean()), float(w[shifted].mean())
    assert bad < good - 0.2, (good, bad)
    # ranking: most shifted windows sit below the median weight
    assert float((w[shifted] < w.median()).float().mean()) > 0.65
    assert bil_loss < 0.7 * mix_loss, (bil_loss, mix_loss)
    # the constraint is held at the end: h within a few eps on average over the last epoch
    last = [d["h"] for d in diags[-8:]]
    assert np.mean(last) < 3 * rw.eps


def test_l2rw_downweights_shifted_half_and_beats_mix():
    data = toy_data(0)
    shifted = data[1]
    mix_loss, *_ = train("mix", 0, data=data)
    l2rw_loss, rw, _, _ = train("l2rw", 0, data=data)
    w = rw.weights()
    assert not torch.isnan(w).any()  # every window was seen
    assert float(w[shifted].mean()) < float(w[~shifted].mean()) - 0.3
    assert l2rw_loss < 0.7 * mix_loss


def test_mix_and_off_gradients_are_plain_means():
    sim, _, real, _ = toy_data(0, n_sim=20, n_real=6)
    for mode in ("mix", "off"):
        torch.manual_seed(0)
        model = Linear(5)
        rw = make_reweighter(Sim2RealConfig(mode=mode), model, 20, sq_loss)
        rw.step(sim, real)
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        if mode == "mix":
            both = {k: torch.cat([sim[k], real[k]]) for k in ("x", "y")}
            sq_loss(model(both), both).mean().backward()
        else:
            sq_loss(model(real), real).mean().backward()
        for a, b in zip(got, model.parameters()):
            torch.testing.assert_close(a, b.grad)
        assert float(rw.weights()[0]) == (1.0 if mode == "mix" else 0.0)


# -- the plane is the linearization of h ---------------------------------------------------------
def _reference_h(model, lam, batch, K, eta):
    """h = ||theta - phi_K||^2 by a plain loop on a copy of the model (independent of unroll)."""
    m = copy.deepcopy(model)
    theta0 = [p.detach().clone() for p in m.parameters()]
    w = torch.sigmoid(lam[batch["index"]])
    for _ in range(K):
        m.zero_grad()
        ls = sq_loss(m(batch), batch)
        ((w * ls).sum() / w.sum()).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= eta * p.grad
    return float(sum(((p.detach() - t0) ** 2).sum() for p, t0 in zip(m.parameters(), theta0)))


def test_plane_equals_linearization_of_h_by_finite_differences():
    torch.manual_seed(0)
    sim, _, real, _ = toy_data(1, d=3, n_sim=30, dtype=torch.float64)
    model = TinyMLP(3).double()
    cfg = Sim2RealConfig(mode="bilevel", k_steps=2, inner_lr=0.3, warm_start_epochs=0,
                         t1=100, eps=1e-6, k_pre=1, **FORMER)
    rw = BilevelReweighter(model, 30, cfg, sq_loss)
    with torch.no_grad():
        rw.lam.copy_(torch.linspace(-1.5, 1.5, 30, dtype=torch.float64))
    batch = {k: v[5:17] for k, v in sim.items()}
    eps = 1e-6
    a, b, c, h = rw.linearize(batch, eps=eps)
    lam0, theta0 = rw.lam.detach().clone(), rw.theta_flat()
    assert h == pytest.approx(_reference_h(model, lam0, batch, 2, 0.3), rel=1e-10)
    # the plane passes through (lambda_t, theta_t) at height h - eps
    assert float(a @ lam0 + b @ theta0) + c == pytest.approx(h - eps, rel=1e-10)
    # a is zero off the minibatch
    off = torch.ones(30, dtype=torch.bool)
    off[5:17] = False
    assert torch.all(a[off] == 0) and torch.any(a[~off] != 0)
    # central differences on lambda entries and on every parameter coordinate
    step = 1e-6
    for j in (5, 9, 16):
        lp, lm = lam0.clone(), lam0.clone()
        lp[j] += step
        lm[j] -= step
        fd = (_reference_h(model, lp, batch, 2, 0.3) - _reference_h(model, lm, batch, 2, 0.3)) / (2 * step)
        assert float(a[j]) == pytest.approx(fd, rel=1e-5, abs=1e-12)
    params = list(model.parameters())
    k = 0
    for p in params:
        for i in range(p.numel()):
            orig = float(p.detach().view(-1)[i])
            with torch.no_grad():
                p.view(-1)[i] = orig + step
            hp = _reference_h(model, lam0, batch, 2, 0.3)
            with torch.no_grad():
                p.view(-1)[i] = orig - step
            hm = _reference_h(model, lam0, batch, 2, 0.3)
            with torch.no_grad():
                p.view(-1)[i] = orig
            assert float(b[k]) == pytest.approx((hp - hm) / (2 * step), rel=1e-5, abs=1e-11)
            k += 1
    assert k == b.numel()
    # step() stores the same plane, divided by ||(a, b)|| (same half-space, unit normal)
    rw.step(batch, real)
    slot = int(rw.planes.active.nonzero()[0])
    scale = float(torch.sqrt(a @ a + b @ b))
    torch.testing.assert_close(rw.planes.a[slot], a / scale)
    torch.testing.assert_close(rw.planes.b[slot], b / scale)
    assert float(rw.planes.c[slot]) == pytest.approx(c / scale, rel=1e-9)


# -- cutting-plane bookkeeping ---------------------------------------------------------------------
def test_cutting_planes_pool_unit():
    pool = CuttingPlanes(n_sim=4, n_params=2, p_max=3)
    for t in range(3):
        pool.add(torch.full((4,), float(t)), torch.ones(2), -1.0, step=t)
    assert len(pool) == 3
    pool.gamma = torch.tensor([0.5, 0.2, 0.9])
    slot = pool.add(torch.zeros(4), torch.zeros(2), 0.0, step=3)  # evicts the smallest dual
    assert slot == 1 and len(pool) == 3 and pool.n_evicted == 1
    # values a.lam + b.theta + c
    v = pool.values(torch.ones(4), torch.ones(2))
    torch.testing.assert_close(v, torch.tensor([1.0, 0.0, 9.0]))
    # projected dual ascent, then the zero-dual plane goes
    pool.gamma = torch.tensor([0.5, 0.0, 0.1])
    pool.dual_ascent(torch.tensor([-1.0, 2.0, -0.05]), lr_gamma=1.0)
    torch.testing.assert_close(pool.gamma, torch.tensor([0.0, 2.0, 0.05]))
    assert pool.drop_inactive() == 1 and len(pool) == 2 and not bool(pool.active[0])
    assert torch.all(pool.a[0] == 0)



def test_dropping_planes_from_a_part_filled_pool_leaves_empty_slots_empty():
    # Found by make mutate: the full-pool test above cannot tell `active &= ~dead` from
    # `active = ~dead` (which would turn the never-used slots into live planes).
    pool = CuttingPlanes(n_sim=4, n_params=2, p_max=4)
    pool.add(torch.ones(4), torch.ones(2), -1.0, step=0)
    pool.add(torch.ones(4), torch.ones(2), -2.0, step=1)
    pool.gamma = torch.tensor([0.0, 0.3, 0.0, 0.0])
    assert pool.drop_inactive() == 1 and pool.n_dropped == 1 and len(pool) == 1
    assert pool.active.tolist() == [False, True, False, False]
    state = pool.state_dict()
    assert state["gamma"].tolist() == pytest.approx([0.0, 0.3, 0.0, 0.0])
    assert state["born"].tolist() == [-1, 1, -1, -1] and float(state["c"][0]) == 0.0
    assert pool.drop_inactive() == 0 and pool.n_dropped == 1 and pool.n_added == 2


def test_plane_count_capped_and_inactive_planes_dropped():
    cfg_kw = dict(warm_start_epochs=1, eps=0.0, k_pre=2, p_max=3, t1=0.9, lr_gamma=0.05)
    data = toy_data(0, n_sim=200)
    sim, _, real, _ = data
    torch.manual_seed(0)
    model = Linear(5)
    cfg = Sim2RealConfig(mode="bilevel", **cfg_kw)
    rw = BilevelReweighter(model, 200, cfg, sq_loss, steps_per_epoch=4, total_steps=60)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    dropped_total = 0
    for t in range(60):
        idx = torch.randperm(200, generator=g)[:50]
        phase, check = rw.phase(), rw.phase() == "phase1" and (t - rw.T0) % 2 == 0
        dead = (rw.planes.active & (rw.planes.gamma == 0)).nonzero().flatten().tolist()
        opt.zero_grad()
        diag = rw.step({k: v[idx] for k, v in sim.items()}, real)
        opt.step()
        assert diag["planes"] <= 3 and len(rw.planes) <= 3
        if check:
            dropped_total += diag["dropped"]
            assert diag["dropped"] == len(dead)
            for s in dead:  # gone, or reused by the plane just cut
                assert not bool(rw.planes.active[s]) or int(rw.planes.born[s]) == t
            assert diag["added"] == 1  # eps = 0: every check adds a plane
        elif phase == "phase1":
            assert diag["added"] == 0 and diag["dropped"] == 0
    assert rw.planes.n_added > 3  # the cap was reached and planes were evicted or dropped
    assert rw.planes.n_evicted + rw.planes.n_dropped >= rw.planes.n_added - 3


def test_phase_switch_at_t1_and_frozen_polyhedron():
    sim, _, real, _ = toy_data(0, n_sim=200)
    for t1, expect_T1 in ((0.5, 20), (13, 13)):
        torch.manual_seed(0)
        model = Linear(5)
        cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=1, eps=0.0, k_pre=1, t1=t1, plane_max_age=None)
        rw = BilevelReweighter(model, 200, cfg, sq_loss, steps_per_epoch=4, total_steps=40)
        assert (rw.T0, rw.T1) == (4, expect_T1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        frozen = None
        for t in range(40):
            opt.zero_grad()
            diag = rw.step({k: v[(t * 50) % 200:(t * 50) % 200 + 50] for k, v in sim.items()}, real)
            opt.step()
            want = "warm" if t < 4 else ("phase1" if t < expect_T1 else "phase2")
            assert diag["phase"] == want, (t, diag["phase"])
            if want == "phase1":
                assert diag["added"] == 1  # eps = 0 and k_pre = 1: a plane every iteration
            if want == "phase2":
                state = rw.planes.state_dict()
                if frozen is None:
                    frozen = state
                for key in ("a", "b", "c", "gamma", "active"):
                    assert torch.equal(state[key], frozen[key])
                assert state["n_added"] == frozen["n_added"]
        assert frozen is not None and len(rw.planes) > 0


def test_t1_inside_warm_start_is_a_user_error():
    model = Linear(5)
    cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=5, t1=0.1)
    with pytest.raises(UserError, match="sim2real.t1"):
        BilevelReweighter(model, 10, cfg, sq_loss, steps_per_epoch=10, total_steps=100)


# -- reproducibility and resume --------------------------------------------------------------------
def test_reproducible_under_seed():
    data = toy_data(2, n_sim=200)
    kw = dict(epochs=12, warm_start_epochs=2)
    l1, rw1, m1, _ = train("bilevel", 5, data=data, **kw)
    l2, rw2, m2, _ = train("bilevel", 5, data=data, **kw)
    assert l1 == l2
    assert torch.equal(rw1.weights(), rw2.weights())
    assert torch.equal(rw1.planes.gamma, rw2.planes.gamma)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    l3, rw3, _, _ = train("bilevel", 6, data=data, **kw)
    assert not torch.equal(rw1.weights(), rw3.weights())


@pytest.mark.parametrize("form", ["former", "heldout"])
def test_state_dict_resume_continues_identically(form):
    sim, _, real, _ = toy_data(0, n_sim=200)
    if form == "former":
        # a tight eps so that the duals and planes are all in play at the save point
        cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=1, k_pre=2, t1=0.6, eps_factor=0.1, **FORMER)
    else:
        # the share, the sgd normalizer and the running eps window are in play
        cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=1, k_pre=1, t1=0.6, eps_window=5, eps_quantile=0.5,
                             **HELDOUT)

    def batches(t):
        return {k: v[(t * 50) % 200:(t * 50) % 200 + 50] for k, v in sim.items()}

    def fresh():
        torch.manual_seed(0)
        model = Linear(5)
        rw = BilevelReweighter(model, 200, cfg, sq_loss, steps_per_epoch=4, total_steps=30)
        return model, rw, torch.optim.Adam(model.parameters(), lr=0.05)

    def run(model, rw, opt, ts):
        for t in ts:
            opt.zero_grad()
            rw.step(batches(t), real)
            opt.step()

    model, rw, opt = fresh()
    run(model, rw, opt, range(12))
    # deep copies: optimizer states hold the live tensors that later steps update in place
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), rw.state_dict()))
    if form == "former":
        assert rw.gamma0 > 0 and len(rw.planes) > 1 and float(rw.planes.gamma.max()) > 0
    else:
        assert rw.sim_share() != 0.5 and rw._rms_n[1] > 0 and len(rw._calib) == 5 and rw.planes.n_added > 0
    run(model, rw, opt, range(12, 30))
    model2, rw2, opt2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    rw2.load_state_dict(saved[2])
    run(model2, rw2, opt2, range(12, 30))
    assert torch.equal(rw.weights(), rw2.weights())
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(UserError, match="simulated windows"):
        BilevelReweighter(Linear(5), 199, cfg, sq_loss, steps_per_epoch=4,
                          total_steps=30).load_state_dict(saved[2])


# -- config --------------------------------------------------------------------------------------
def test_config_validation_names_the_key():
    with pytest.raises(UserError, match="sim2real.mode"):
        Sim2RealConfig(mode="bogus").validate()
    with pytest.raises(UserError, match="sim2real.k_steps"):
        Sim2RealConfig(k_steps=0).validate()
    with pytest.raises(UserError, match="sim2real.t1"):
        Sim2RealConfig(t1=2.5).validate()
    with pytest.raises(UserError, match="sim2real.nope"):
        Sim2RealConfig.from_dict({"mode": "mix", "nope": 1})
    with pytest.raises(UserError, match="sim2real.p_max"):
        Sim2RealConfig.from_dict({"p_max": "ten"})
    with pytest.raises(UserError, match="sim2real.live_constraint"):
        Sim2RealConfig.from_dict({"live_constraint": "yes"})
    assert Sim2RealConfig.from_dict({"eps": 1, "t1": 500}).eps == 1.0
    cfg = Sim2RealConfig.from_dict({"mode": "bilevel", "p_max": 4})
    assert cfg.p_max == 4 and Sim2RealConfig.from_dict(cfg.to_dict()) == cfg


# -- diagnostics --------------------------------------------------------------------------------
def test_weights_report_per_scenario_and_files(tmp_path):
    w = np.array([0.1, 0.3, 0.8, 1.0, np.nan, 0.5])
    sid = np.array([0, 0, 1, 1, 1, 2])
    params = {"noise": [0.0, 0.5, 1.0], "users": [10, 20, 30]}
    rep = weights_report(w, sid, params)
    assert rep["n"] == 6 and rep["n_weighted"] == 5
    assert rep["mean"] == pytest.approx(np.nanmean(w))
    rows = {r["id"]: r for r in rep["scenarios"]}
    assert rows[0]["mean_weight"] == pytest.approx(0.2)
    assert rows[1]["mean_weight"] == pytest.approx(0.9) and rows[1]["n"] == 2
    assert rows[2]["noise"] == 1.0 and rows[2]["users"] == 30
    with pytest.raises(UserError, match="scenario ids"):
        weights_report(w, sid[:3])
    history = [{"G": 1.0, "h": 0.1, "planes": 2, "duals": [0.5, 0.25]}, {"G": 0.5, "planes": 1}]
    paths = write_diagnostics(tmp_path, history, w, sid, params, param="noise")
    assert paths["plot"].stat().st_size > 1000
    assert json.loads(paths["report"].read_text())["scenarios"][0]["mean_weight"] == pytest.approx(0.2)
    csv_text = paths["history"].read_text().splitlines()
    assert csv_text[0] == "epoch,G,h,planes,duals" and csv_text[1] == "0,1.0,0.1,2,0.5 0.25"
    with np.load(paths["weights"]) as z:
        assert z["weights"].shape == (6,) and z["scenario_ids"].tolist() == sid.tolist()
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes left nothing behind


# -- CUDA: fused attention kernels have no double backward ----------------------------------------
def test_second_order_attention_selects_the_math_kernel_on_cuda(monkeypatch):
    """l2rw / bilevel steps run under second_order_attention(device): on CUDA it must pick the
    math SDPA kernel (the efficient kernel raised 'derivative for
    aten::_scaled_dot_product_efficient_attention_backward is not implemented' on an H100),
    on CPU it must change nothing."""
    import contextlib

    import simmstnet.train.sim2real as s2r

    assert isinstance(s2r.second_order_attention(torch.device("cpu")), contextlib.nullcontext)
    with s2r.second_order_attention(torch.device("cuda")):
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit

    # every model forward of the second-order modes goes through it, with the reweighter's
    # device; the first-order modes keep the fused kernels
    seen = []
    real_ctx = s2r.second_order_attention
    monkeypatch.setattr(s2r, "second_order_attention", lambda dev: seen.append(str(dev)) or real_ctx(dev))
    sim, _, real, _ = toy_data(0, n_sim=20, n_real=6)
    # bilevel: the simulated windows in the unroll, the real ones at phi_K; held out: the simulated
    # and the real fit windows in the unroll, the held-out ones at phi_K
    for mode, forwards, kw in (("mix", 0, {}), ("off", 0, {}), ("l2rw", 3, {}), ("bilevel", 2, {}),
                               ("bilevel", 3, HELDOUT)):
        torch.manual_seed(0)
        rw = make_reweighter(Sim2RealConfig(mode=mode, warm_start_epochs=0, t1=50, **kw), Linear(5), 20,
                             sq_loss, steps_per_epoch=1, total_steps=10)
        seen.clear()
        rw.step(sim, real)
        assert seen == ["cpu"] * forwards, (mode, seen)


def test_mix_real_share_weights_the_two_means():
    sim, _, real, _ = toy_data(0, n_sim=20, n_real=6)
    for r in (0.0, 0.3, 1.0):
        torch.manual_seed(0)
        model = Linear(5)
        rw = make_reweighter(Sim2RealConfig(mode="mix", real_share=r), model, 20, sq_loss)
        rw.step(sim, real)
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ((1 - r) * sq_loss(model(sim), sim).mean() + r * sq_loss(model(real), real).mean()).backward()
        for a, b in zip(got, model.parameters()):
            torch.testing.assert_close(a, b.grad)


def test_a_warm_start_as_long_as_the_run_is_shortened():
    cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=1)  # the defaults, one-epoch run
    rw = BilevelReweighter(Linear(5), 10, cfg, sq_loss, steps_per_epoch=10, total_steps=10)
    assert (rw.T0, rw.T1) == (4, 8) and "shortened to 4" in rw.note
    # a run of one step still reweights it
    rw = BilevelReweighter(Linear(5), 10, cfg, sq_loss, steps_per_epoch=1, total_steps=1)
    assert (rw.T0, rw.T1) == (0, 1) and rw.phase(0) == "phase1"
    # the toy run of one epoch gets past the warm start and calibrates eps
    _, rw, _, diags = train("bilevel", 0, epochs=1, warm_start_epochs=1)
    assert [d["phase"] for d in diags].count("warm") == rw.T0 > 0 and rw.eps is not None
    # a run long enough for its warm start is unchanged
    rw = BilevelReweighter(Linear(5), 10, cfg, sq_loss, steps_per_epoch=10, total_steps=20)
    assert (rw.T0, rw.T1, rw.note) == (10, 16, None)


def test_a_mode_is_one_registered_class():
    """register_mode: the mode check accepts the new name, make_reweighter builds its class, and
    the loop's hooks have no-op defaults; a name is registered once. The experiment config offers
    the modes registered when it is imported (those of sim2real.py and MODE_MODULES)."""
    import dataclasses

    from simmstnet.config import ExperimentConfig
    from simmstnet.train import sim2real as S

    assert S.modes() == ("off", "mix", "l2rw", "bilevel", "finetune") == S.MODES
    field = {f.name: f for f in dataclasses.fields(ExperimentConfig().sim2real)}["mode"]
    assert field.metadata["choices"] == S.modes()
    assert S.mode_class("mix") is S.mode_class("off") is S.UniformReweighter

    @S.register_mode("test-only")
    class Halves(S.Reweighter):
        mode = "test-only"

        def step(self, sim_batch, real_batch):
            loss = 0.5 * self._losses(self._params(), sim_batch).mean()
            loss.backward()
            self.t += 1
            return self._log({"loss": float(loss.detach())})

        def weights(self):
            return torch.full((self.n_sim,), 0.5)

    try:
        assert "test-only" in S.modes() and Sim2RealConfig(mode="test-only").validate()
        rw = make_reweighter(Sim2RealConfig(mode="test-only"), Linear(5), 20, sq_loss)
        assert isinstance(rw, Halves)
        assert rw.needs() == "both" and rw.lr_factor(lambda s, n: 1.0) is None and not rw.done
        assert rw.real_windows("ds") == "ds" and rw.metrics_block() == {} and rw.note is None
        assert rw.after_step(lambda ds: {}, print) is False and rw.start(None, print) is None
        with pytest.raises(ValueError, match="registered twice"):
            S.register_mode("mix")(Halves)
    finally:
        S._REGISTRY.pop("test-only", None)
    with pytest.raises(UserError, match="choose one of off, mix, l2rw, bilevel, finetune"):
        Sim2RealConfig(mode="test-only").validate()
