"""Spatiotemporal baselines (ConvLSTM, STGCN, DCRNN, STAEformer) and the patch graph they share."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from simmstnet.errors import UserError
from simmstnet.models.baselines.dcrnn import diffusion_supports
from simmstnet.models.fake_batch import fake_batch
from simmstnet.models.layers.graph import (chebyshev_polynomials, gaussian_adjacency, patch_nodes,
                                           random_walk_matrix, scaled_laplacian)
from simmstnet.models.registry import DataDims, build_model, get_model_entry
from simmstnet.train.losses import masked_task_losses
from tests.conftest import make_grid

# Tiny widths so the whole file runs in seconds on one core.
TINY = {
    "convlstm": {"hidden": 8},
    "stgcn": {"channels": "16,8,16"},
    "dcrnn": {"rnn_units": 8},
    "staeformer": {"input_embedding_dim": 8, "tod_embedding_dim": 4, "dow_embedding_dim": 4,
                   "adaptive_embedding_dim": 8, "feed_forward_dim": 32, "n_heads": 2, "layers": 1},
}
NAMES = list(TINY)
A, B = math.exp(-1.0), math.exp(-2.0)  # side and diagonal neighbour weights with sigma = 1


def dims(c=1, input_len=12, horizon=3, patch=3):
    return DataDims(n_services=c, input_len=input_len, label_len=6, horizon=horizon, patch=patch, n_marks=5)


def model(name, d=None, **extra):
    torch.manual_seed(0)
    return build_model(name, d or dims(), **{**TINY[name], **extra})


# ----------------------------------------------------------------------------- graph


def test_adjacency_of_a_3x3_patch_by_hand():
    w = gaussian_adjacency(3)
    assert w.shape == (9, 9) and np.allclose(w, w.T) and np.all(np.diag(w) == 0)
    # Node 0 = top-left corner: right and down neighbours at d = 1, the centre at d = sqrt 2.
    assert np.allclose(w[0], [0, A, 0, A, B, 0, 0, 0, 0])
    # The centre touches all 8 cells.
    assert np.allclose(w[4], [B, A, B, A, 0, A, B, A, B])
    # Node 1 = top edge: 0, 2, 4 at d = 1; 3, 5 at d = sqrt 2; nothing two rows down.
    assert np.allclose(w[1], [A, 0, A, B, A, B, 0, 0, 0])


def test_threshold_and_radius_follow_the_kernel():
    # sigma = 0.7: diagonal weight exp(-2/0.49) = 0.017 < 0.1 is cut, side exp(-1/0.49) = 0.130 stays.
    w = gaussian_adjacency(3, sigma=0.7)
    assert w[0, 4] == 0 and w[0, 1] == pytest.approx(math.exp(-1 / 0.49))
    assert (w > 0).sum() == 2 * 12  # the 12 edges of the 4-neighbour 3x3 lattice
    # radius 2 and sigma 2 reach two cells along a row: exp(-4/4).
    w2 = gaussian_adjacency(3, sigma=2.0, radius=2.0)
    assert w2[0, 2] == pytest.approx(math.exp(-1.0)) and w2[0, 8] == 0  # d = 2 sqrt 2 is beyond
    with pytest.raises(UserError, match="sigma"):
        gaussian_adjacency(3, sigma=0.0)


def test_random_walk_matrix_by_hand():
    w = gaussian_adjacency(3)
    p = random_walk_matrix(w)
    corner, edge, centre = 2 * A + B, 3 * A + 2 * B, 4 * A + 4 * B
    assert p[0, 1] == pytest.approx(A / corner) and p[0, 4] == pytest.approx(B / corner)
    assert p[1, 0] == pytest.approx(A / edge) and p[4, 0] == pytest.approx(B / centre)
    assert np.allclose(p.sum(axis=1), 1.0)
    # An asymmetric graph: the reverse walk uses in-degrees.
    wa = np.array([[0, 2.0, 0], [0, 0, 1.0], [3.0, 0, 0]])
    assert np.allclose(random_walk_matrix(wa), [[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    sup = diffusion_supports(wa, 2)
    fwd, bwd = random_walk_matrix(wa), random_walk_matrix(wa.T)
    assert sup.shape == (5, 3, 3)
    assert np.allclose(sup[0], np.eye(3)) and np.allclose(sup[2], fwd @ fwd) and np.allclose(sup[4], bwd @ bwd)


def test_scaled_laplacian_and_chebyshev_by_hand():
    w = gaussian_adjacency(3)
    corner, edge, centre = 2 * A + B, 3 * A + 2 * B, 4 * A + 4 * B
    # With lambda_max = 2, L~ = L - I = -D^-1/2 W D^-1/2.
    lt = scaled_laplacian(w, lambda_max=2.0)
    assert lt[0, 0] == pytest.approx(0.0)
    assert lt[0, 1] == pytest.approx(-A / math.sqrt(corner * edge))
    assert lt[0, 4] == pytest.approx(-B / math.sqrt(corner * centre))
    t = chebyshev_polynomials(lt, 3)
    assert np.allclose(t[0], np.eye(9)) and np.allclose(t[1], lt)
    # T_2[0,0] = 2 (L~^2)[0,0] - 1 = 2 sum_j L~[0,j]^2 - 1.
    sq = 2 * A ** 2 / (corner * edge) + B ** 2 / (corner * centre)
    assert t[2][0, 0] == pytest.approx(2 * sq - 1)
    # The exact lambda_max maps the spectrum onto [-1, 1] with the top at 1.
    eig = np.linalg.eigvalsh(scaled_laplacian(w))
    assert eig.max() == pytest.approx(1.0) and eig.min() >= -1 - 1e-9


def test_patch_nodes_layout():
    d = dims(c=2)
    b = fake_batch(d, 2, missing=0.3)
    nodes = patch_nodes(b)
    assert nodes.shape == (2, 12, 9, 4)
    r, c = 0, 2
    assert torch.equal(nodes[:, :, r * 3 + c, :2], b["x_patch"][:, :, :, r, c])
    assert torch.equal(nodes[:, :, r * 3 + c, 2:], b["patch_mask"][:, :, :, r, c].float())


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", NAMES)
def test_registered_single_task(name):
    entry = get_model_entry(name)
    assert entry.multitask is False and entry.description


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("c", [1, 3])
def test_output_shape_and_every_parameter_learns(name, c):
    d = dims(c=c)
    m = model(name, d).train()
    batch = fake_batch(d, 4, missing=0.2)
    out = m(batch)
    assert out.shape == (4, d.horizon, c) and torch.isfinite(out).all()
    masked_task_losses(out, batch["y"], batch["y_mask"]).sum().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls(name):
    d = dims(c=1)
    m = model(name, d)
    batch = fake_batch(d, 32, seed=1, missing=0.1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def eval_loss():
        m.eval()  # no dropout, no scheduled sampling: the same function before and after
        with torch.no_grad():
            return float(masked_task_losses(m(batch), batch["y"], batch["y_mask"]).sum())

    initial = eval_loss()
    m.train()
    for _ in range(40):
        opt.zero_grad()
        masked_task_losses(m(batch), batch["y"], batch["y_mask"]).sum().backward()
        opt.step()
    assert eval_loss() < 0.7 * initial


@pytest.mark.parametrize("name", NAMES)
def test_forecast_reads_the_neighbours_and_only_its_own_window(name):
    d = dims(c=1)
    m = model(name, d).eval()
    batch = fake_batch(d, 3, seed=2)
    with torch.no_grad():
        base = m(batch)
        # A neighbour (top-left patch cell) of window 0 changes: window 0's forecast moves.
        moved = {**batch, "x_patch": batch["x_patch"].clone()}
        moved["x_patch"][0, :, :, 0, 0] += 1.0
        out = m(moved)
        assert not torch.allclose(out[0], base[0])
        # Windows are independent: the other windows' forecasts do not change.
        assert torch.allclose(out[1:], base[1:], atol=1e-6)
        # The observed flags are an input: hiding a neighbour changes the forecast too.
        hidden = {**batch, "patch_mask": batch["patch_mask"].clone()}
        hidden["patch_mask"][0, :, :, 2, 2] = False
        assert not torch.allclose(m(hidden)[0], base[0])


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_and_batches_raise_user_errors(name):
    with pytest.raises(UserError, match="no_such_option"):
        build_model(name, dims(), no_such_option=1)
    m = model(name, dims(patch=3))
    with pytest.raises(UserError, match="x_patch"):
        m(fake_batch(dims(patch=5), 2))


@pytest.mark.parametrize("name, overrides, message", [
    ("stgcn", {"channels": "64,16"}, "channels"),
    ("stgcn", {"temporal_kernel": 4}, "too short"),  # 12 - 2*2*3 = 0 steps left
    ("staeformer", {"n_heads": 5}, "divisible"),  # 8 + 4 + 4 + 8 = 24 wide
    ("convlstm", {"kernel": 2}, "odd"),
    ("dcrnn", {"rnn_units": 0}, "rnn_units"),
])
def test_invalid_option_values(name, overrides, message):
    with pytest.raises(UserError, match=message):
        build_model(name, dims(), **{**TINY[name], **overrides})


def test_dcrnn_scheduled_sampling():
    d = dims(c=1)
    m = model("dcrnn", d, cl_decay_steps=1000)
    assert m.teacher_probability() == pytest.approx(1000 / 1001)
    m.batches_seen.fill_(20000)
    assert m.teacher_probability() == pytest.approx(1000 / (1000 + math.exp(20)))
    m.batches_seen.fill_(0)
    batch = fake_batch(d, 4, seed=3)
    changed = {**batch, "y": batch["y"].clone()}
    changed["y"][:, 0] += 5.0  # the truth of the first horizon step
    m.eval()
    with torch.no_grad():  # forecasting never sees the targets
        assert torch.equal(m(batch), m(changed))
    m.train()
    torch.manual_seed(0)
    a = m(batch)
    torch.manual_seed(0)
    b = m(changed)
    # Teacher forcing (probability ~ 1 at the start) feeds y[:, 0] into step 2 onwards.
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 1:], b[:, 1:])
    assert int(m.batches_seen) == 2


# ----------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def grid():
    return make_grid(T=24 * 4, H=3, W=3, missing=0.05, seed=5)


@pytest.mark.parametrize("name", NAMES)
def test_one_epoch_through_the_trainer(name, grid, tmp_path):
    from simmstnet.train.trainer import Trainer
    from tests.train_helpers import tiny_config

    options = [f"model.{k}={v}" for k, v in TINY[name].items()]
    cfg = tiny_config(tmp_path / name, "train.epochs=1", "data.services=[net]", *options, model=name)
    metrics = Trainer(cfg, grid=grid, progress=False, quiet=True).run()
    on_disk = json.loads((tmp_path / name / "metrics.json").read_text())
    assert on_disk == metrics and metrics["model"] == name
    assert metrics["test"]["net"]["mae"] > 0 and metrics["params"] > 0


def test_dcrnn_curriculum_scales_to_the_run():
    """cl_decay_steps=0 (default): the teacher probability crosses 0.5 at 40 % of the run, so a
    short CPU run leaves teacher forcing (with the reference's fixed 2000 it would stay ~1)."""
    m = model("dcrnn", dims(c=1))
    total = 512
    m.schedule_for(total)
    tau = float(m.tau)
    assert tau * math.log(tau) == pytest.approx(0.4 * total, rel=1e-3)
    m.batches_seen.fill_(int(0.4 * total))
    assert m.teacher_probability() == pytest.approx(0.5, abs=0.01)
    m.batches_seen.fill_(total)
    assert m.teacher_probability() < 0.05
    fixed = model("dcrnn", dims(c=1), cl_decay_steps=2000)
    fixed.schedule_for(total)  # an explicit tau is kept
    fixed.batches_seen.fill_(total)
    assert fixed.teacher_probability() > 0.99
