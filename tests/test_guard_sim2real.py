"""Guards from `make mutate` on train/sim2real.py (issue 15): each test fails on a change to the
code that the rest of the suite let pass (see docs/results/mutation.md).

The bilevel step is checked against an independent reference: the unrolled lower level, h, G, the
live constraint and the lower-level descent written out again here with ``torch.func`` on a
float64 linear model, and compared with the hypergradient the step hands to the lambda optimizer
and the parameter gradient it accumulates."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from simmstnet.errors import UserError
from simmstnet.train.sim2real import (BilevelReweighter, Sim2RealConfig, _subset, make_reweighter,
                                      warm_start_steps)
from tests.test_sim2real import FORMER, Linear, sq_loss, toy_data

def data(n_sim=12, n_real=6):
    sim, _, real, _ = toy_data(0, d=3, n_sim=n_sim, n_real=n_real, dtype=torch.float64)
    return sim, real


def model_at(seed=1):
    torch.manual_seed(seed)
    return Linear(3).double()


# -- the reference ---------------------------------------------------------------------------
def ref_unroll(model, theta, lam, sim, K, eta, fit=None, share_logit=None):
    """phi_K and h = ||theta - phi_K||^2 of K gradient steps on the lower level: the weighted mean
    simulated loss, or s x that + (1 - s) x the mean real loss on ``fit``."""
    w = torch.sigmoid(lam[sim["index"]])
    phi = dict(theta)
    for _ in range(K):
        low = (w * sq_loss(functional_call(model, phi, (sim,)), sim)).sum() / w.sum()
        if fit is not None:
            s = torch.sigmoid(share_logit).squeeze()
            low = s * low + (1 - s) * sq_loss(functional_call(model, phi, (fit,)), fit).mean()
        grads = torch.autograd.grad(low, list(phi.values()), create_graph=True)
        phi = {n: p - eta * g for (n, p), g in zip(phi.items(), grads)}
    h = sum(((theta[n] - phi[n]) ** 2).sum() for n in theta)
    return phi, h


def leaves(model, lam, share_logit):
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    return theta, lam.detach().clone().requires_grad_(True), share_logit.detach().clone().requires_grad_(True)


def capture_updates(rw):
    """Replace the lambda optimizer step by a recorder of the hypergradients it is handed."""
    seen = []
    rw._update_lambda = lambda g_lam, g_share: seen.append((g_lam.clone(), None if g_share is None
                                                            else g_share.clone()))
    return seen


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def lower_grad(model, theta, lam, sim, fit=None, share_logit=None):
    """Gradient at theta of the lower level (what lower_coef adds to theta's step)."""
    w = torch.sigmoid(lam.detach()[sim["index"]])
    low = (w * sq_loss(functional_call(model, theta, (sim,)), sim)).sum() / w.sum()
    if fit is not None:
        s = torch.sigmoid(share_logit.detach()).squeeze()
        low = s * low + (1 - s) * sq_loss(functional_call(model, theta, (fit,)), fit).mean()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(low, list(theta.values()))])


K, ETA, RHO, LOWER = 2, 0.2, 3.0, 0.7


def bilevel_in_phase2(upper="unrolled", eps_over_h=0.5, folds=1, constraint_lambda=False):
    """A bilevel reweighter moved to its phase 2 (penalty on the live constraint, no planes), with
    eps a multiple of the h of its first step."""
    sim, real = data()
    model = model_at()
    lam = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64)
    share = torch.tensor([0.4], dtype=torch.float64)
    theta, lam_r, share_r = leaves(model, lam, share)
    t = 5  # the step's iteration (phase 2); with folds, fold t % 2 = 1 is held out
    fit = held = None
    if folds > 1:
        held_mask = real["index"] % 2 == t % 2
        fit, held = _subset(real, ~held_mask), _subset(real, held_mask)
    _, h0 = ref_unroll(model, theta, lam_r, sim, K, ETA, fit, share_r)
    cfg = Sim2RealConfig(mode="bilevel", k_steps=K, inner_lr=ETA, warm_start_epochs=0, t1=2,
                         eps=float(h0.detach()) * eps_over_h, live_phase2="penalty", rho=RHO, lower_coef=LOWER,
                         upper=upper, **{**FORMER, "upper_folds": folds, "learn_share": folds > 1,
                                         "constraint_lambda": constraint_lambda})
    rw = BilevelReweighter(model, 12, cfg, sq_loss, total_steps=10)
    with torch.no_grad():
        rw.lam.copy_(lam)
        rw.share.copy_(share)
    rw.t = t
    assert rw.phase() == "phase2" and len(rw.planes) == 0
    return rw, model, sim, real, fit, held


@pytest.mark.parametrize("upper", ["unrolled", "theta"])
def test_a_phase2_step_matches_the_reference_hypergradient_and_theta_gradient(upper):
    rw, model, sim, real, _, _ = bilevel_in_phase2(upper)
    theta, lam, share = leaves(model, rw.lam, rw.share)
    phi, h = ref_unroll(model, theta, lam, sim, K, ETA)
    G = sq_loss(functional_call(model, phi if upper == "unrolled" else theta, (real,)), real).mean()
    eps = rw.eps
    objective = G + 0.5 * RHO * torch.clamp(h / eps - 1, min=0) ** 2
    g_lam, *g_theta = torch.autograd.grad(objective, [lam, *theta.values()])
    want_theta = torch.cat([g.reshape(-1) for g in g_theta]) + LOWER * lower_grad(model, theta, lam, sim)

    seen = capture_updates(rw)
    model.zero_grad()
    diag = rw.step(sim, real)
    assert float(h.detach()) / eps == pytest.approx(2.0)  # the penalty is active
    assert diag["G"] == pytest.approx(float(G.detach()), rel=1e-10)
    assert diag["h"] == pytest.approx(float(h.detach()), rel=1e-10)
    torch.testing.assert_close(seen[0][0], g_lam)
    assert seen[0][1] is None
    torch.testing.assert_close(flat_grad(model), want_theta)


@pytest.mark.parametrize("constraint_lambda", [False, True])
@pytest.mark.parametrize("eps_over_h", [0.5, 10.0])
def test_a_held_out_phase2_step_matches_the_reference(constraint_lambda, eps_over_h):
    """upper_folds=2: lambda and the share descend G on the held-out fold (plus, with
    constraint_lambda, the live term); theta feels the live term and the lower level only."""
    rw, model, sim, real, fit, held = bilevel_in_phase2(eps_over_h=eps_over_h, folds=2,
                                                        constraint_lambda=constraint_lambda)
    theta, lam, share = leaves(model, rw.lam, rw.share)
    phi, h = ref_unroll(model, theta, lam, sim, K, ETA, fit, share)
    G = sq_loss(functional_call(model, phi, (held,)), held).mean()
    eps = rw.eps
    live_coef = RHO * max(0.0, float(h.detach()) / eps - 1.0) / eps
    gG = torch.autograd.grad(G, [lam, share], retain_graph=True)
    gh = torch.autograd.grad(h, [lam, share, *theta.values()])
    want_lam, want_share = gG[0].clone(), gG[1].clone()
    if constraint_lambda:
        want_lam += live_coef * gh[0]
        want_share += live_coef * gh[1]
    want_theta = live_coef * torch.cat([g.reshape(-1) for g in gh[2:]]) \
        + LOWER * lower_grad(model, theta, lam, sim, fit, share)

    seen = capture_updates(rw)
    model.zero_grad()
    diag = rw.step(sim, real)
    assert diag["G"] == pytest.approx(float(G.detach()), rel=1e-10)
    assert (live_coef > 0) == (eps_over_h < 1)
    torch.testing.assert_close(seen[0][0], want_lam)
    torch.testing.assert_close(seen[0][1], want_share)
    torch.testing.assert_close(flat_grad(model), want_theta)


def test_phase1_keeps_the_live_dual_even_when_phase2_uses_the_penalty():
    sim, real = data()
    model = model_at()
    theta, lam, share = leaves(model, torch.zeros(12, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    h = float(ref_unroll(model, theta, lam, sim, K, ETA)[1].detach())
    cfg = Sim2RealConfig(mode="bilevel", k_steps=K, inner_lr=ETA, warm_start_epochs=0, t1=4, eps=h / 2,
                         live_phase2="penalty", lr_gamma0=0.1, **FORMER)
    rw = BilevelReweighter(model, 12, cfg, sq_loss, total_steps=10)
    assert rw.phase() == "phase1"
    diag = rw.step(sim, real)
    # gamma0 <- max(0, gamma0 + lr_gamma0 (h / eps - 1)) = 0.1 x 1
    assert rw.gamma0 == pytest.approx(0.1) and diag["gamma0"] == pytest.approx(0.1)


def test_step_diagnostics_and_epoch_summary():
    sim, real = data()
    model = model_at()
    cfg = Sim2RealConfig(mode="bilevel", k_steps=1, inner_lr=ETA, warm_start_epochs=2, t1=8, eps=1e-9,
                         k_pre=1, **FORMER)
    rw = BilevelReweighter(model, 12, cfg, sq_loss, steps_per_epoch=1, total_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diags = []
    for _ in range(6):
        opt.zero_grad()
        diags.append(rw.step(sim, real))
        opt.step()
    assert [d["iteration"] for d in diags] == list(range(6))
    assert [d["phase"] for d in diags] == ["warm"] * 2 + ["phase1"] * 4
    assert all(d["added"] == 0 and d["dropped"] == 0 for d in diags[:2])
    assert sum(d["added"] for d in diags) >= 2  # eps is tiny: planes are cut
    gam = rw.planes.gamma[rw.planes.active]
    assert float(gam.max()) > 0
    assert diags[-1]["gamma_sum"] == pytest.approx(float(gam.sum()))
    assert diags[-1]["gamma_max"] == pytest.approx(float(gam.max()))
    with torch.no_grad():
        rw.lam.copy_(torch.linspace(-2.0, 3.0, 12, dtype=torch.float64))
    out = rw.end_epoch()
    assert out["planes"] == len(rw.planes) > 0
    assert out["gamma_sum"] == pytest.approx(sum(d["gamma_sum"] for d in diags[2:]) / 4)
    w = torch.sigmoid(torch.linspace(-2.0, 3.0, 12, dtype=torch.float64))
    assert out["w_min"] == pytest.approx(float(w.min()), rel=1e-6)
    assert out["w_max"] == pytest.approx(float(w.max()), rel=1e-6)


def test_the_share_and_fold_keys_follow_the_number_of_folds():
    one = BilevelReweighter(model_at(), 12, Sim2RealConfig(mode="bilevel", t1=8, **FORMER), sq_loss,
                            steps_per_epoch=1, total_steps=10)
    two = BilevelReweighter(model_at(), 12, Sim2RealConfig(mode="bilevel", t1=8, **{
        **FORMER, "upper_folds": 2, "learn_share": True, "share_init": 0.3}), sq_loss,
        steps_per_epoch=1, total_steps=10)
    assert one.sim_share() == 1.0 and one.metrics_block()["share"] == 1.0 and one.fold_keys is False
    assert two.sim_share() == pytest.approx(0.3) and two.fold_keys is True


def test_sgd_lambda_steps_are_normalized_by_the_running_rms_of_the_seen_entries():
    cfg = Sim2RealConfig(mode="bilevel", t1=8, lambda_pull=0.5,
                         **{**FORMER, "lambda_opt": "sgd", "lr_lambda": 0.1, "upper_folds": 2,
                            "learn_share": True})
    rw = BilevelReweighter(model_at(), 5, cfg, sq_loss, steps_per_epoch=1, total_steps=10)
    lam = torch.zeros(5, dtype=torch.float64)
    share = torch.zeros(1, dtype=torch.float64)
    ms = [0.0, 0.0]  # the EMA of the mean square, windows and share, with its bias correction
    steps = [(torch.tensor([0.0, 0.5, -1.0, 0.0, 2.0]), torch.tensor([0.3])),
             (torch.tensor([1.0, 0.0, 0.5, 0.0, -0.5]), torch.tensor([-0.6]))]
    for n, (g, gs) in enumerate(steps, start=1):
        rw._update_lambda(g.double(), gs.double())
        for k, (x, grad) in enumerate(((lam, g.double()), (share, gs.double()))):
            seen = grad != 0
            ms[k] = 0.99 * ms[k] + 0.01 * float((grad[seen] ** 2).mean())
            rms = math.sqrt(ms[k] / (1 - 0.99 ** n))
            x[seen] -= 0.1 * (grad[seen] / rms + 0.5 * x[seen])
        torch.testing.assert_close(rw.lam.detach(), lam)
        torch.testing.assert_close(rw.share.detach(), share)
    assert float(rw.lam.detach()[3]) == 0.0  # never seen: never moved
    assert float(lam[1]) == pytest.approx(-0.1 * 0.5 / math.sqrt((0.25 + 1 + 4) / 3))  # first step


def test_plane_of_an_h_that_does_not_reach_lambda_has_a_zero_lambda_part():
    rw = BilevelReweighter(model_at(), 6, Sim2RealConfig(mode="bilevel", t1=8, **FORMER), sq_loss,
                           steps_per_epoch=1, total_steps=10)
    plist = list(rw._params().values())
    h = sum((p ** 2).sum() for p in plist)
    grads = (None, *torch.autograd.grad(h, plist))
    a, b, c, hv = rw._plane_from(h, grads, plist, 0.0)
    assert torch.equal(a, torch.zeros(6, dtype=torch.float64)) and b.shape == (4,)
    assert c == pytest.approx(hv - float(b @ rw.theta_flat()))


# -- l2rw --------------------------------------------------------------------------------------
def test_l2rw_weights_are_the_clipped_gradient_alignment_and_resume():
    sim, real = data(n_sim=8, n_real=5)
    sim["y"] = torch.where(sim["index"] % 2 == 1, -3 * sim["y"], sim["y"])  # a shifted source
    model = model_at()
    rw = make_reweighter(Sim2RealConfig(mode="l2rw", inner_lr=0.1), model, 8, sq_loss)
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    G = sq_loss(functional_call(model, theta, (real,)), real).mean()
    gG = torch.cat([g.reshape(-1) for g in torch.autograd.grad(G, list(theta.values()))])
    align = []
    for j in range(8):
        one = {k: v[j:j + 1] for k, v in sim.items()}
        lj = sq_loss(functional_call(model, theta, (one,)), one).sum()
        align.append(float(gG @ torch.cat([g.reshape(-1) for g in torch.autograd.grad(lj, list(theta.values()))])))
    w = torch.clamp(torch.tensor(align, dtype=torch.float64), min=0)
    assert 0 < int((w > 0).sum()) < 8  # some windows help, some hurt
    diag = rw.step(sim, real)
    assert diag["G"] == pytest.approx(float(G.detach()), rel=1e-10)
    torch.testing.assert_close(rw.weights().double(), (8 * w / w.sum()).float().double())
    # a reweighter restored from the state continues with the same running means
    again = make_reweighter(Sim2RealConfig(mode="l2rw", inner_lr=0.1), model, 8, sq_loss)
    again.load_state_dict(rw.state_dict())
    half = {k: v[:4] for k, v in sim.items()}
    for r in (rw, again):
        model.zero_grad()
        r.step(half, real)
    torch.testing.assert_close(again.weights(), rw.weights(), equal_nan=True)


# -- small pieces ------------------------------------------------------------------------------
def test_subset_keeps_entries_that_are_not_per_window_tensors():
    batch = {"x": torch.arange(12.0).reshape(6, 2), "index": torch.arange(6), "city": "milano",
             "step": 3600, "scale": torch.tensor(2.0), "services": torch.arange(3)}
    keep = torch.tensor([True, False, True, False, False, True])
    out = _subset(batch, keep)
    assert out["index"].tolist() == [0, 2, 5] and out["x"].shape == (3, 2)
    assert out["city"] == "milano" and out["step"] == 3600
    assert out["scale"] is batch["scale"] and out["services"] is batch["services"]


def test_the_warm_start_note_names_what_it_was_shortened_against():
    cfg = Sim2RealConfig(mode="bilevel", warm_start_epochs=5)
    T0, note = warm_start_steps(cfg, 10, 20, t1_steps=16)
    assert T0 == 8 and note.endswith("half of those before the phase switch at iteration 16")
    T0, note = warm_start_steps(cfg, 10, 20)
    assert T0 == 10 and note.endswith("half of those before the end of the run")


def test_a_reweighter_works_on_the_device_it_is_given():
    rw = make_reweighter(Sim2RealConfig(mode="mix"), model_at(), 4, sq_loss, device="meta")
    assert rw.device == torch.device("meta")
    assert make_reweighter(Sim2RealConfig(mode="mix"), model_at(), 4, sq_loss).device == torch.device("cpu")


BAD = [
    (dict(live_phase2="both"), r"sim2real\.live_phase2='both': choose dual or penalty"),
    (dict(upper="phi"), r"sim2real\.upper='phi': choose one of unrolled"),
    (dict(k_pre=0), r"sim2real\.k_pre=0: must be an integer >= 1"),
    (dict(p_max=0), r"sim2real\.p_max=0: must be an integer >= 1"),
    (dict(inner_lr=0.0), r"sim2real\.inner_lr=0\.0: must be a positive number"),
    (dict(lr_gamma=-1.0), r"sim2real\.lr_gamma=-1\.0: must be a positive number"),
    (dict(rho=-1.0), r"sim2real\.rho=-1\.0: must be >= 0"),
    (dict(lower_coef=-0.5), r"sim2real\.lower_coef=-0\.5: must be a number >= 0"),
    (dict(t1=0), r"sim2real\.t1=0: use a fraction"),
    (dict(eps_calib_steps=0), r"sim2real\.eps_calib_steps=0: must be an integer >= 1"),
    (dict(real_batch_size=0), r"sim2real\.real_batch_size=0: must be >= 1 or null"),
    (dict(eps=-1.0), r"sim2real\.eps=-1\.0: must be >= 0 \(or null to calibrate\)"),
    (dict(warm_start_epochs=-1.0), r"sim2real\.warm_start_epochs=-1\.0: must be >= 0"),
    (dict(real_share=1.5, mode="mix"), r"sim2real\.real_share=1\.5: must be a share in \[0, 1\] or null"),
    (dict(lambda_opt="rmsprop"), r"sim2real\.lambda_opt='rmsprop': choose one of sgd, adam"),
    (dict(upper_folds=0), r"sim2real\.upper_folds=0: must be an integer >= 1 \(1 = G on every real window"),
    (dict(mode="bilevel", learn_share=True, upper_folds=1), r"sim2real\.learn_share=True: the share is learned"),
    (dict(mode="bilevel", upper_folds=2, lower_coef=0.0), r"sim2real\.lower_coef=0\.0: with sim2real\.upper_folds"),
    (dict(share_init=1.0), r"sim2real\.share_init=1\.0: must be a share strictly between 0 and 1"),
    (dict(lambda_pull=-1.0), r"sim2real\.lambda_pull=-1\.0: must be a number >= 0"),
    (dict(eps_quantile=1.0), r"sim2real\.eps_quantile=1\.0: must be a quantile strictly between 0 and 1"),
    (dict(eps_window=0), r"sim2real\.eps_window=0: must be an integer >= 1"),
    (dict(plane_max_age=0), r"sim2real\.plane_max_age=0: must be an integer >= 1 or null"),
    (dict(dual_max=0.0), r"sim2real\.dual_max=0\.0: must be > 0 or null"),
    (dict(dual_reg=-1.0), r"sim2real\.dual_reg=-1\.0: must be a number >= 0"),
    (dict(pretrain_share=1.5), r"sim2real\.pretrain_share=1\.5: must be a share in \[0, 1\]"),
    (dict(finetune_holdout=1.0), r"sim2real\.finetune_holdout=1\.0: must be a share strictly between 0 and 1"),
    (dict(finetune_lr_factor=0.0), r"sim2real\.finetune_lr_factor=0\.0: must be a positive number"),
    (dict(finetune_patience=-1), r"sim2real\.finetune_patience=-1: must be an integer >= 0 \(0 = never stop early\)"),
    (dict(finetune_l2sp=-1.0), r"sim2real\.finetune_l2sp=-1\.0: must be a number >= 0"),
]


@pytest.mark.parametrize("kw,message", BAD, ids=[next(iter(kw)) for kw, _ in BAD])
def test_each_bad_setting_is_a_user_error_naming_it(kw, message):
    with pytest.raises(UserError, match=message):
        Sim2RealConfig(**kw).validate()


def test_settings_on_the_boundary_are_accepted_and_typed():
    Sim2RealConfig(real_batch_size=1, rho=0.0, lower_coef=0.0, eps=0.0, t1=1.0, eps_window=1, plane_max_age=1,
                   lambda_pull=0.0, dual_reg=0.0, pretrain_share=1.0, finetune_patience=0,
                   finetune_l2sp=0.0).validate()
    cfg = Sim2RealConfig.from_dict({"real_batch_size": 16, "eps": 2})
    assert type(cfg.real_batch_size) is int and cfg.real_batch_size == 16 and type(cfg.eps) is float
    with pytest.raises(UserError, match=r"sim2real\.real_batch_size=16\.5: expected int"):
        Sim2RealConfig.from_dict({"real_batch_size": 16.5})
