"""Multi-task baselines of the paper's Table 2 (MTTC, AST-MTL, CSLSL): shapes, learning,
gradient flow, the structure each paper prescribes, options, and one epoch through the trainer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from simmstnet.data.scaling import Scaler
from simmstnet.data.windows import WindowDataset
from simmstnet.errors import UserError
from simmstnet.models.fake_batch import fake_batch
from simmstnet.models.layers.multitask import cell_channels, patch_adjacency
from simmstnet.models.registry import DataDims, build_model, get_model_entry
from simmstnet.train.losses import masked_task_losses
from tests.conftest import make_grid

MODELS = ["mttc", "ast-mtl", "cslsl"]
# Small widths keep the whole file fast on one core; the structure is the default one.
TINY = {
    "mttc": {"width": 8, "hidden": 32},
    "ast-mtl": {"hidden": 16, "fnn_inner": 8},
    "cslsl": {"hidden": 16, "value_embed_dim": 16, "time_embed_dim": 8, "label_embed_dim": 8},
}


def dims(C=3, L=12, label=6, H=3, k=3):
    return DataDims(n_services=C, input_len=L, label_len=label, horizon=H, patch=k, n_marks=5)


@pytest.fixture(scope="module")
def grid_batch():
    """A batch of real windows (layout of docs/contracts.md) from a tiny synthetic grid."""
    grid = make_grid(T=72, H=4, W=4, missing=0.05, seed=1)
    scaler = Scaler.fit(grid, time_range=(0, 72))
    ds = WindowDataset(grid, input_len=12, label_len=6, horizon=3, patch=3, scaler=scaler, target_range=(0, 72))
    idx = np.random.default_rng(0).choice(len(ds), size=96, replace=False)
    return ds, ds.get_batch(idx)


def test_registered_as_multitask():
    for name in MODELS:
        assert get_model_entry(name).multitask


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("C", [1, 3])
def test_output_shape_any_service_count(name, C):
    torch.manual_seed(0)
    d = dims(C=C)
    model = build_model(name, d, **TINY[name])
    out = model(fake_batch(d, 5, missing=0.3))
    assert out.shape == (5, d.horizon, C)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_default_config_builds_for_the_hourly_protocol(name):
    d = DataDims(n_services=3, input_len=24, label_len=12, horizon=6, patch=5)
    out = build_model(name, d)(fake_batch(d, 2))
    assert out.shape == (2, 6, 3)


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls_on_grid_windows(name, grid_batch):
    ds, batch = grid_batch
    torch.manual_seed(0)
    model = build_model(name, DataDims.from_dataset(ds), **TINY[name])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = masked_task_losses(model(batch), batch["y"], batch["y_mask"]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name", MODELS)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    d = dims()
    model = build_model(name, d, **TINY[name])
    model(fake_batch(d, 4, missing=0.2)).pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", MODELS)
def test_neighbours_change_the_forecast(name):
    """Every model reads the patch: editing a neighbour (not the centre) moves the forecast."""
    torch.manual_seed(0)
    d = dims()
    model = build_model(name, d, **TINY[name]).eval()
    batch = fake_batch(d, 3)
    edited = dict(batch, x_patch=batch["x_patch"].clone())
    edited["x_patch"][..., 0, 0] += 2.0
    assert not torch.allclose(model(batch), model(edited))


@pytest.mark.parametrize("name", ["mttc", "cslsl"])
def test_spatial_off_ignores_neighbours(name):
    torch.manual_seed(0)
    d = dims()
    model = build_model(name, d, spatial=False, **TINY[name]).eval()
    batch = fake_batch(d, 3)
    edited = dict(batch, x_patch=batch["x_patch"] + 5.0)
    assert torch.equal(model(batch), model(edited))


@pytest.mark.parametrize("name", MODELS)
def test_options_are_checked(name):
    with pytest.raises(UserError, match="no_such_option"):
        build_model(name, dims(), no_such_option=1)
    key = {"mttc": "width", "ast-mtl": "hidden", "cslsl": "hidden"}[name]
    with pytest.raises(UserError, match=key):
        build_model(name, dims(), **{key: 0})


@pytest.mark.parametrize("name", MODELS)
def test_batch_that_does_not_fit_is_user_error(name):
    model = build_model(name, dims(C=3), **TINY[name])
    with pytest.raises(UserError, match="services"):
        model(fake_batch(dims(C=1), 2))
    with pytest.raises(UserError, match="patch=3"):
        model(fake_batch(dims(k=5), 2))
    with pytest.raises(UserError, match="dropout"):
        build_model(name, dims(), dropout=1.5)


def test_mttc_heads_are_task_specific():
    """Hard sharing: service c's forecast depends on the trunk and its own head only."""
    torch.manual_seed(0)
    d = dims()
    model = build_model("mttc", d, **TINY["mttc"])
    model(fake_batch(d, 4))[..., 1].sum().backward()
    assert model.heads[1].weight.grad.abs().sum() > 0
    for other in (0, 2):
        grad = model.heads[other].weight.grad
        assert grad is None or not grad.any()
    assert all(p.grad is not None for p in model.trunk_conv.parameters())


def _grad_norms(model, batch, service):
    model.zero_grad()
    model(batch)[..., service].sum().backward()
    return [sum(float(p.grad.abs().sum()) for p in cap.parameters() if p.grad is not None)
            for cap in model.capturers]


def test_cslsl_causal_chain_follows_order():
    """With order 2,0,1 the first task (net) sees only the first capturer; the last task
    (sms) is conditioned on every earlier one."""
    torch.manual_seed(0)
    d = dims()
    model = build_model("cslsl", d, order="2,0,1", **TINY["cslsl"])
    batch = fake_batch(d, 4)
    first = _grad_norms(model, batch, service=2)
    assert first[0] > 0 and first[1] == 0 and first[2] == 0
    last = _grad_norms(model, batch, service=1)
    assert all(g > 0 for g in last)
    middle = _grad_norms(model, batch, service=0)
    assert middle[0] > 0 and middle[1] > 0 and middle[2] == 0


def test_cslsl_default_order_is_batch_order():
    torch.manual_seed(0)
    d = dims()
    model = build_model("cslsl", d, **TINY["cslsl"])
    grads = _grad_norms(model, fake_batch(d, 4), service=0)
    assert grads[0] > 0 and grads[1] == 0 and grads[2] == 0


@pytest.mark.parametrize("order", ["0,1", "0,1,1", "a,b,c", "0,1,3"])
def test_cslsl_bad_order_is_a_user_error(order):
    with pytest.raises(UserError, match="order"):
        build_model("cslsl", dims(), order=order)


def test_cslsl_short_len_longer_than_input_uses_whole_window():
    d = dims()
    model = build_model("cslsl", d, short_len=50, **TINY["cslsl"])
    assert model.short_len == d.input_len
    assert model(fake_batch(d, 2)).shape == (2, d.horizon, 3)


def test_patch_adjacency_by_hand():
    """3x3 patch: corner 0 touches 1, 3 (sides) and 4 (diagonal); centre 4 touches all."""
    a = patch_adjacency(3)
    assert a.shape == (9, 9) and torch.allclose(a, a.T)
    deg_corner = 1 + 1 + 1 + 1 / math.sqrt(2)          # self + two sides + one diagonal
    deg_edge = 1 + 3 + 2 / math.sqrt(2)                # cell 1: sides 0, 2, 4; diagonals 3, 5
    deg_centre = 1 + 4 + 4 / math.sqrt(2)
    assert a[0, 0] == pytest.approx(1 / deg_corner, rel=1e-6)
    assert a[0, 1] == pytest.approx(1 / math.sqrt(deg_corner * deg_edge), rel=1e-6)
    assert a[0, 4] == pytest.approx((1 / math.sqrt(2)) / math.sqrt(deg_corner * deg_centre), rel=1e-6)
    assert a[0, 2] == 0 and a[0, 8] == 0 and a[0, 5] == 0


def test_cell_channels_patch_mean_by_hand():
    x_patch = torch.zeros(1, 1, 1, 3, 3)
    patch_mask = torch.zeros(1, 1, 1, 3, 3, dtype=torch.bool)
    x_patch[0, 0, 0, 0, 0], patch_mask[0, 0, 0, 0, 0] = 3.0, True
    x_patch[0, 0, 0, 1, 1], patch_mask[0, 0, 0, 1, 1] = 1.0, True
    x_patch[0, 0, 0, 2, 2] = 100.0  # unobserved: must not count
    batch = {"x": torch.ones(1, 1, 1), "x_mask": torch.ones(1, 1, 1, dtype=torch.bool),
             "x_patch": x_patch, "patch_mask": patch_mask}
    out = cell_channels(batch, spatial=True)
    assert out.shape == (1, 1, 4)
    assert out[0, 0].tolist() == pytest.approx([1.0, 1.0, 2.0, 2 / 9])
    assert cell_channels(batch, spatial=False).shape == (1, 1, 2)


# The trainer path is the same for the three; the two slower ones run in CI (make test-slow).
@pytest.mark.parametrize("name", [n if n == "mttc" else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_one_epoch_through_the_trainer(name, tmp_path):
    from simmstnet.train.trainer import Trainer
    from tests.train_helpers import tiny_config

    grid = make_grid(T=24 * 5, H=3, W=3, missing=0.05, seed=3)
    options = [f"model.{k}={v}" for k, v in TINY[name].items()]
    cfg = tiny_config(tmp_path / name, "train.epochs=1", *options, model=name)
    metrics = Trainer(cfg, grid=grid, progress=False, quiet=True).run()
    saved = json.loads((tmp_path / name / "metrics.json").read_text())
    assert saved == metrics and saved["model"] == name
    for split in ("val", "test"):
        for service in ("call", "sms", "net"):
            assert math.isfinite(saved[split][service]["mae"])
