"""Temporal single-task baselines (lstm, transformer, informer, itransformer): shapes, gradients,
option errors, how each reads services / masks / neighbours, and a loss that falls on a tiny grid."""
from __future__ import annotations

import json
import math

import pytest
import torch

from simmstnet.data.scaling import Scaler
from simmstnet.data.windows import WindowDataset
from simmstnet.errors import UserError
from simmstnet.models.fake_batch import fake_batch
from simmstnet.models.layers.attention import ProbSparseAttention
from simmstnet.models.registry import DataDims, build_model, config_help, list_models
from simmstnet.train.losses import masked_task_losses
from tests.conftest import make_grid

NAMES = ("lstm", "transformer", "informer", "itransformer")
# Tiny widths so that the whole file runs in seconds on one core.
SMALL = {
    "lstm": {"hidden_size": 16},
    "transformer": {"d_model": 16, "n_heads": 2, "d_ff": 32},
    "informer": {"d_model": 16, "n_heads": 2, "d_ff": 32},
    "itransformer": {"d_model": 16, "n_heads": 2, "d_ff": 32},
}
# (name, extra options) for every variant under test.
VARIANTS = [(n, {}) for n in NAMES] + [("itransformer", {"neighbours": True})]
VARIANT_IDS = [n + ("+neighbours" if o else "") for n, o in VARIANTS]


def _dims(c=1, L=24, label=12, H=6, patch=3):
    return DataDims(n_services=c, input_len=L, label_len=label, horizon=H, patch=patch, n_marks=5)


def _build(name, dims, **extra):
    return build_model(name, dims, **{**SMALL[name], **extra})


def test_registered_single_task_with_help():
    entries = {name: multitask for name, multitask, _ in list_models()}
    for name in NAMES:
        assert entries[name] is False, name
        rows = config_help(name)
        assert rows and all(text for _, _, text in rows), name


@pytest.mark.parametrize("name,extra", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("c", [1, 3])
def test_output_shape_and_defaults_build(name, extra, c):
    dims = _dims(c)
    batch = fake_batch(dims, 5, missing=0.2)
    for model in (build_model(name, dims, **extra), _build(name, dims, **extra)):  # defaults and tiny
        out = model.eval()(batch)
        assert out.shape == (5, dims.horizon, c)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,extra", VARIANTS, ids=VARIANT_IDS)
def test_gradient_reaches_every_parameter(name, extra):
    dims = _dims(3)
    torch.manual_seed(0)
    model = _build(name, dims, **extra, dropout=0.0).train()
    batch = fake_batch(dims, 8, missing=0.1)
    masked_task_losses(model(batch), batch["y"], batch["y_mask"]).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def _tiny_windows(services=("net",), seed=0):
    grid = make_grid(T=24 * 4, H=3, W=3, services=services, missing=0.05, seed=seed)
    scaler = Scaler.fit(grid, time_range=(0, 72))
    return WindowDataset(grid, input_len=12, label_len=6, horizon=3, patch=3, scaler=scaler,
                         target_range=(0, 72))


@pytest.mark.parametrize("name,extra", VARIANTS, ids=VARIANT_IDS)
def test_loss_falls_on_tiny_grid(name, extra):
    """Adam on one fixed batch of real windows of a tiny grid: the masked MSE must drop clearly."""
    ds = _tiny_windows()
    batch = ds.get_batch(torch.arange(0, len(ds), max(1, len(ds) // 64))[:64])
    torch.manual_seed(0)
    model = _build(name, DataDims.from_dataset(ds), **extra, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        loss = masked_task_losses(model(batch), batch["y"], batch["y_mask"]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0], (history[0], history[-1])


@pytest.mark.parametrize("name", NAMES)
def test_option_errors_are_user_errors(name):
    with pytest.raises(UserError, match=f"unknown option 'nope' for model '{name}'"):
        build_model(name, _dims(), nope=1)
    with pytest.raises(UserError, match="dropout"):
        build_model(name, _dims(), dropout=1.5)
    size = "hidden_size" if name == "lstm" else "d_model"
    with pytest.raises(UserError, match=size):
        build_model(name, _dims(), **{size: 0})
    if name != "lstm":
        with pytest.raises(UserError, match="divisible"):
            build_model(name, _dims(), d_model=10, n_heads=4)


def test_specific_option_errors():
    with pytest.raises(UserError, match="attn must be 'prob' or 'full'"):
        build_model("informer", _dims(), attn="sparse")
    with pytest.raises(UserError, match="neighbours needs an odd data.patch >= 3"):
        build_model("itransformer", _dims(patch=1), neighbours=True)
    with pytest.raises(UserError, match="label_len=30 exceeds"):
        build_model("transformer", _dims(label=30))


@pytest.mark.parametrize("name,extra", VARIANTS, ids=VARIANT_IDS)
def test_batch_that_does_not_fit_is_user_error(name, extra):
    model = _build(name, _dims(3), **extra)
    with pytest.raises(UserError, match="services"):
        model(fake_batch(_dims(1), 2))
    if extra:
        with pytest.raises(UserError, match="patch=3"):
            model(fake_batch(_dims(3, patch=5), 2))


@pytest.mark.parametrize("name", ("lstm", "transformer", "informer"))
def test_services_are_forecast_independently(name):
    """Channel independence: another service's input never moves this service's forecast, and
    the weights are shared (the same series in two service slots gives the same forecast)."""
    dims = _dims(3)
    model = _build(name, dims).eval()
    batch = fake_batch(dims, 4)
    base = model(batch)
    changed = dict(batch, x=batch["x"].clone(), dec_in=batch["dec_in"].clone())
    changed["x"][..., 2] += 1.0
    changed["dec_in"][..., 2] += 1.0
    out = model(changed)
    assert torch.equal(out[..., :2], base[..., :2])
    assert not torch.allclose(out[..., 2], base[..., 2])
    same = dict(batch, **{k: batch[k][..., [0, 0, 1]] for k in ("x", "x_mask", "dec_in")})
    pred = model(same)
    assert torch.allclose(pred[..., 0], pred[..., 1], atol=1e-6)


def test_itransformer_services_attend_to_each_other():
    """Inverted tokens: a service's forecast depends on the other services' series."""
    dims = _dims(3)
    model = _build("itransformer", dims).eval()
    batch = fake_batch(dims, 4)
    changed = dict(batch, x=batch["x"].clone())
    changed["x"][..., 2] = torch.randn(4, dims.input_len)
    assert not torch.allclose(model(changed)[..., 0], model(batch)[..., 0])


@pytest.mark.parametrize("neighbours", [False, True])
def test_itransformer_reads_neighbours_only_when_asked(neighbours):
    dims = _dims(1, patch=3)
    model = _build("itransformer", dims, neighbours=neighbours).eval()
    batch = fake_batch(dims, 4)
    patch = batch["x_patch"].clone()
    # A new shape for a corner neighbour (a constant shift would vanish in the normalization).
    patch[..., 0, 0] = torch.randn(patch[..., 0, 0].shape, generator=torch.Generator().manual_seed(1))
    moved = not torch.allclose(model(dict(batch, x_patch=patch)), model(batch))
    assert moved == neighbours


@pytest.mark.parametrize("name", NAMES)
def test_observed_flags_are_read(name):
    """Same values, different observed flags -> different forecast (missing is not a true 0)."""
    dims = _dims(1)
    model = _build(name, dims).eval()
    batch = fake_batch(dims, 4)
    flags = batch["x_mask"].clone()
    flags[:, -3:] = False
    assert not torch.allclose(model(dict(batch, x_mask=flags)), model(batch))


def test_itransformer_normalization_is_affine_equivariant_and_ignores_unobserved():
    """With use_norm, a*series + b gives a*forecast + b (per service), and a value at an
    unobserved step changes nothing (statistics over observed steps only)."""
    dims = _dims(2)
    torch.manual_seed(0)
    model = _build("itransformer", dims).eval()
    batch = fake_batch(dims, 4, missing=0.2)
    base = model(batch)
    a, b = torch.tensor([3.0, 0.5]), torch.tensor([-2.0, 7.0])
    x = torch.where(batch["x_mask"], batch["x"] * a + b, torch.zeros(()))
    assert torch.allclose(model(dict(batch, x=x)), base * a + b, atol=1e-4)
    noisy = torch.where(batch["x_mask"], batch["x"], torch.full_like(batch["x"], 99.0))
    assert torch.allclose(model(dict(batch, x=noisy)), base, atol=1e-6)
    # Without the normalization the map is not affine: the check above can fail.
    plain = _build("itransformer", dims, use_norm=False).eval()
    assert not torch.allclose(plain(dict(batch, x=x)), plain(batch) * a + b, atol=1e-2)


def test_informer_distils_and_uses_probsparse_in_decoder_self_attention():
    dims = _dims(1, L=24)
    model = _build("informer", dims, enc_layers=3)
    lengths = []
    model.encoder.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    model.eval()(fake_batch(dims, 2))
    assert lengths == [math.ceil(math.ceil(24 / 2) / 2)]  # halved between each pair of layers
    for layer in model.decoder.layers:
        assert isinstance(layer.self_attention.kernel, ProbSparseAttention)
        assert not isinstance(layer.cross_attention.kernel, ProbSparseAttention)
    full = _build("informer", dims, attn="full", distil=False)
    assert not any(isinstance(m, ProbSparseAttention) for m in full.modules())


@pytest.mark.parametrize("name", NAMES)
def test_eval_forward_is_deterministic(name):
    dims = _dims(1)
    model = _build(name, dims).eval()
    batch = fake_batch(dims, 3)
    assert torch.equal(model(batch), model(batch))


@pytest.mark.parametrize("name", NAMES)
def test_one_epoch_through_the_trainer(name, tmp_path):
    """The trainer builds the model by name, trains one epoch and writes metrics.json (about 1 s each)."""
    from simmstnet.train.trainer import Trainer
    from tests.train_helpers import tiny_config

    grid = make_grid(T=24 * 5, H=3, W=3, services=("net",), missing=0.05, seed=3)
    opts = [f"model.{k}={v}" for k, v in SMALL[name].items()]
    cfg = tiny_config(tmp_path / name, "train.epochs=1", "train.patience=0", *opts, model=name)
    metrics = Trainer(cfg, grid=grid, progress=False, quiet=True).run()
    saved = json.loads((tmp_path / name / "metrics.json").read_text())
    assert saved == metrics and saved["model"] == name
    assert saved["test"]["net"]["mae"] > 0
