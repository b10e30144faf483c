"""Sim-MSTNet / STNet: shapes with every ablation, gradients, learning, registry behaviour."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from simmstnet.errors import UserError
from simmstnet.models import DataDims, build_model, list_models
from simmstnet.models.fake_batch import fake_batch
from simmstnet.models.registry import build_config, config_help, register_model
from simmstnet.models.sim_mstnet import SimMSTNet, SimMSTNetConfig
from simmstnet.train.loss_weighting import DynamicLossWeighting
from simmstnet.train.losses import masked_task_losses

SMALL = dict(d_model=16, n_heads=2, d_ff=32, enc_layers=2, dec_layers=1)


def _dims(c=3, patch=5):
    return DataDims(n_services=c, input_len=24, label_len=12, horizon=6, patch=patch, n_marks=5)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("switches", [{}, {"interaction": False}, {"spatial": False},
                                      {"interaction": False, "spatial": False},
                                      {"attn": "full"}, {"enc_attn": "prob"}, {"distil": True}])
def test_output_shape(c, switches):
    dims = _dims(c)
    model = build_model("sim-mstnet", dims, **SMALL, **switches)
    out = model(fake_batch(dims, 4, missing=0.1))
    assert out.shape == (4, 6, c) and torch.isfinite(out).all()


def test_ablation_switches_remove_modules():
    dims = _dims(3)
    full = build_model("sim-mstnet", dims, **SMALL)
    no_inter = build_model("sim-mstnet", dims, **SMALL, interaction=False)
    no_spatial = build_model("sim-mstnet", dims, **SMALL, spatial=False)
    single = build_model("stnet", _dims(1), **SMALL)
    assert full.temporal_interaction is not None and full.spatial_interaction is not None
    assert no_inter.temporal_interaction is None and no_inter.spatial_interaction is None
    assert all(t.spatial is None for t in no_spatial.tasks) and no_spatial.spatial_interaction is None
    assert single.temporal_interaction is None and len(single.tasks) == 1

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(full) > count(no_inter) and count(full) > count(no_spatial)


def test_gradient_reaches_every_parameter():
    dims = _dims(3)
    torch.manual_seed(0)
    model = build_model("sim-mstnet", dims, **SMALL, distil=True)
    batch = fake_batch(dims, 8, missing=0.1)
    losses = masked_task_losses(model(batch), batch["y"], batch["y_mask"])
    losses.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_inputs_matter():
    """Each input the model is meant to read changes the forecast (no silently ignored key)."""
    dims = _dims(3)
    torch.manual_seed(0)
    model = build_model("sim-mstnet", dims, **SMALL).eval()
    batch = fake_batch(dims, 4)
    base = model(batch)
    for key in ("x", "x_mark", "dec_in", "y_mark"):
        changed = dict(batch, **{key: batch[key] + 0.5})
        assert not torch.allclose(model(changed), base), key
    # The patch is normalized per cell, so a constant shift of it is (by design) invisible; a
    # change of one neighbour's shape is not (see test_a_neighbour_alone_moves_the_forecast).
    changed = dict(batch, x_patch=batch["x_patch"].clone())
    changed["x_patch"][:, -1] += 0.5
    assert not torch.allclose(model(changed), base), "x_patch"
    # another service's input changes this service's forecast only through interaction
    # (a change of shape: a level shift of one service is invisible to the others under the
    # per-window normalization)
    changed = dict(batch, x=batch["x"].clone())
    changed["x"][:, -3:, 2] += 1.0
    assert not torch.allclose(model(changed)[..., 0], base[..., 0])
    isolated = build_model("sim-mstnet", dims, **SMALL, interaction=False).eval()
    assert torch.allclose(isolated(changed)[..., 0], isolated(batch)[..., 0])


def test_eval_forward_is_deterministic():
    dims = _dims(3)
    model = build_model("sim-mstnet", dims, **SMALL).eval()
    batch = fake_batch(dims, 4)
    assert torch.equal(model(batch), model(batch))


@pytest.mark.parametrize("name,c", [("sim-mstnet", 3), ("stnet", 1)])
def test_loss_falls_on_a_fixed_batch(name, c):
    dims = _dims(c)
    torch.manual_seed(0)
    model = build_model(name, dims, **SMALL, dropout=0.0)
    batch = fake_batch(dims, 32, seed=1)
    weighting = DynamicLossWeighting(c)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        losses = masked_task_losses(model(batch), batch["y"], batch["y_mask"])
        total = weighting.combine(losses)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(losses.detach().mean()))
    assert history[-1] < 0.25 * history[0]


def test_registry_names_and_errors():
    names = {name: multitask for name, multitask, _ in list_models()}
    assert names["sim-mstnet"] is True and names["stnet"] is False
    with pytest.raises(UserError, match="unknown model 'nope'.*sim-mstnet.*stnet"):
        build_model("nope", _dims())
    with pytest.raises(UserError, match="'d_modle'.*known options: d_model"):
        build_model("sim-mstnet", _dims(), d_modle=8)
    with pytest.raises(UserError, match="'n_heads' must be int"):
        build_model("sim-mstnet", _dims(), n_heads="2")
    with pytest.raises(UserError, match="divisible"):
        build_model("sim-mstnet", _dims(), d_model=10, n_heads=4)
    with pytest.raises(UserError, match="one service"):
        build_model("stnet", _dims(3))
    with pytest.raises(UserError, match="odd patch"):
        build_model("sim-mstnet", _dims(patch=4))


def test_config_overrides_and_help():
    cfg = build_config("sim-mstnet", d_model=48, dropout=0)  # an int is accepted for a float
    assert cfg.d_model == 48 and isinstance(cfg.dropout, float)
    model = build_model("sim-mstnet", _dims(), d_model=48, n_heads=4)
    assert isinstance(model.model, SimMSTNet) and model.config.d_model == 48  # wrapped: norm=window
    assert isinstance(build_model("sim-mstnet", _dims(), norm="none"), SimMSTNet)
    helps = config_help("sim-mstnet")
    assert [row[0] for row in helps] == ["norm"] + [f.name for f in dataclasses.fields(SimMSTNetConfig)]
    assert all(text for _, _, text in helps)


def test_batch_that_does_not_fit_is_user_error():
    model = build_model("sim-mstnet", _dims(3), **SMALL)
    with pytest.raises(UserError, match="services"):
        model(fake_batch(_dims(1), 2))
    with pytest.raises(UserError, match="patch=5"):
        model(fake_batch(_dims(3, patch=3), 2))


def test_registering_a_second_class_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="registered twice"):
        @register_model("sim-mstnet", multitask=True, description="dup", config=SimMSTNetConfig)
        class Other(SimMSTNet):
            pass


def test_every_baseline_module_is_registered_lazily():
    """The registry imports each module of models/baselines on first lookup (no manual list)."""
    import pkgutil

    import simmstnet.models.baselines as baselines
    from simmstnet.models.registry import get_model_entry

    modules = {m.name for m in pkgutil.iter_modules(baselines.__path__) if not m.name.startswith("_")}
    registered = {get_model_entry(name).cls.__module__.rsplit(".", 1)[-1] for name, _, _ in list_models()}
    assert modules <= registered


def _double(batch):
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _edit_one_neighbour(batch, row=0, col=1):
    """A copy of the batch whose patch cell (row, col) (not the centre) gets a spike at the
    last two input steps of every service; the centre cell and x are untouched."""
    edited = dict(batch, x_patch=batch["x_patch"].clone())
    edited["x_patch"][:, -2:, :, row, col] += 3.0
    return edited


@pytest.mark.parametrize("norm", ["window", "none"])
def test_a_neighbour_alone_moves_the_forecast(norm):
    """The spatial branch reads the neighbours, not only the centre cell: editing one
    non-centre cell of the patch (centre series unchanged) moves the forecast; without the
    spatial branch it cannot."""
    dims = _dims(3)
    torch.manual_seed(0)
    # float64: the effect of one neighbour at initialization is small, but far above rounding
    model = build_model("sim-mstnet", dims, **SMALL, norm=norm).double().eval()
    batch = _double(fake_batch(dims, 4))
    edited = _edit_one_neighbour(batch)
    assert torch.equal(edited["x"], batch["x"])
    k = dims.patch
    assert torch.equal(edited["x_patch"][..., k // 2, k // 2], batch["x_patch"][..., k // 2, k // 2])
    moved = (model(edited) - model(batch)).abs().max()
    assert moved > 1e-6
    blind = build_model("sim-mstnet", dims, **SMALL, norm=norm, spatial=False).double().eval()
    assert (blind(edited) - blind(batch)).abs().max() < 1e-12
    control = build_model("sim-mstnet", dims, **SMALL, norm=norm, spatial_input="centre").double().eval()
    assert (control(edited) - control(batch)).abs().max() < 1e-12


def _cross_attention_weights(model, batch):
    """Softmax weights of task 0's decoder cross-attention over the encoder steps only (the z
    token, when present, left out), from the kernel's own q and k: (B, heads, S, T')."""
    seen = {}
    layer = model.model.tasks[0].decoder.layers[0].cross_attention
    hook = layer.kernel.register_forward_hook(lambda mod, args, kwargs_out: seen.update(q=args[0], k=args[1]))
    try:
        model(batch)
    finally:
        hook.remove()
    q, k = seen["q"], seen["k"]
    scores = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return scores[..., -model.dims.input_len:]


def test_fused_vector_changes_the_decoders_attention_weights():
    """As a memory token, z (what space and the other tasks contributed) changes which encoder
    steps the decoder reads; added to every step (fusion=shift, the old form) it cannot: a shift
    common to every key leaves the softmax unchanged."""
    dims = _dims(3)
    batch = _double(fake_batch(dims, 4))
    edited = _edit_one_neighbour(batch)  # changes z only: x, and so the encoder steps, stay
    for fusion, should_change in (("token", True), ("shift", False)):
        torch.manual_seed(0)
        model = build_model("sim-mstnet", dims, **SMALL, attn="full", fusion=fusion).double().eval()
        a, b = _cross_attention_weights(model, batch), _cross_attention_weights(model, edited)
        assert a.shape[-1] == dims.input_len
        assert bool((a - b).abs().max() > 1e-9) is should_change, fusion


def test_window_norm_reaches_targets_far_above_the_global_scale():
    """A busy cell 10 training std above the global mean: with per-window normalization and the
    highway the forecast gets there in a few dozen steps; today's bounded head (norm=none, no
    highway: Linear(LayerNorm(x))) stays far below."""
    dims = _dims(1)
    batch = fake_batch(dims, 32, seed=3)
    level = 10.0
    for key in ("x", "dec_in", "y"):
        batch[key] = batch[key] + level
    batch["x_patch"] = batch["x_patch"] + level
    results = {}
    for norm, highway in (("window", True), ("none", False)):
        torch.manual_seed(0)
        model = build_model("stnet", dims, **SMALL, dropout=0.0, norm=norm, highway=highway)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(60):
            loss = masked_task_losses(model(batch), batch["y"], batch["y_mask"]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[norm] = float((model(batch) - batch["y"]).abs().mean().detach())
    assert results["window"] < 0.3, results      # the daily cycle's amplitude is about 1
    assert results["none"] > 3 * results["window"], results


def test_zero_initialized_highway_adds_nothing_until_it_trains():
    """highway_init=zero (default): at initialization the forecast is the decoder's alone, so the
    linear part only grows as far as the gradient finds it useful (uniform init starts it as noise)."""
    dims = _dims(2, patch=3)
    batch = fake_batch(dims, 6, seed=2)
    outs = {}
    for init in ("zero", "uniform"):
        torch.manual_seed(0)
        model = build_model("sim-mstnet", dims, **SMALL, dropout=0.0, highway_init=init).eval()
        with torch.no_grad():
            outs[init] = model(batch)
            for task in model.model.tasks:      # the same network without its highway
                task.highway = None
            outs[init, None] = model(batch)
    assert SimMSTNetConfig().highway_init == "zero"
    torch.testing.assert_close(outs["zero"], outs["zero", None])
    assert (outs["uniform"] - outs["uniform", None]).abs().max() > 1e-3
