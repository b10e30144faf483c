"""Scaler: fitted on observed training values only, exact inverse, numpy and torch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simmstnet.data.scaling import Scaler
from simmstnet.errors import UserError
from tests.conftest import make_grid


@pytest.mark.parametrize("kind", ["standard", "log-standard"])
def test_fit_matches_observed_training_values(kind):
    grid = make_grid(T=50, missing=0.3, seed=4)
    sc = Scaler.fit(grid, (0, 30), kind=kind)
    for c, name in enumerate(grid.services):
        obs = grid.values[:30, :, :, c][grid.mask[:30, :, :, c]].astype(np.float64)
        if kind == "log-standard":
            obs = np.log1p(obs)
        assert sc.services[c] == name
        assert sc.mean[c] == pytest.approx(obs.mean(), rel=1e-9)
        assert sc.std[c] == pytest.approx(obs.std(), rel=1e-9)


def test_fit_never_sees_validation_test_or_unobserved_values():
    grid = make_grid(T=60, missing=0.2, seed=1)
    before = Scaler.fit(grid, (0, 40)).state_dict()
    grid.values[40:] = 1e9               # huge values in the val/test span
    grid.values[:40][~grid.mask[:40]] = 1e9   # and under the mask inside the training span
    after = Scaler.fit(grid, (0, 40)).state_dict()
    assert after == before
    # The same edit inside the training span's observed values does move it (the test can fail).
    grid.values[0][grid.mask[0]] = 1e9
    assert Scaler.fit(grid, (0, 40)).state_dict() != before


@pytest.mark.parametrize("kind", ["standard", "log-standard"])
def test_inverse_of_transform_is_identity_numpy_and_torch(kind):
    grid = make_grid(T=40, seed=2)
    sc = Scaler.fit(grid, (0, 30), kind=kind)
    x = grid.values[:, :2, :2].astype(np.float64)
    np.testing.assert_allclose(sc.inverse(sc.transform(x)), x, rtol=1e-10)
    z = sc.transform(x)
    assert abs(z[:30].mean()) < 1.0 and z.dtype == np.float64
    xt = torch.from_numpy(grid.values[:, :2, :2].copy())
    zt = sc.transform(xt)
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    torch.testing.assert_close(sc.inverse(zt), xt, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(zt.numpy(), sc.transform(grid.values[:, :2, :2]), rtol=1e-5, atol=1e-5)


def test_state_dict_is_json_and_round_trips():
    sc = Scaler.fit(make_grid(T=30), (0, 20), kind="log-standard")
    state = json.loads(json.dumps(sc.state_dict()))
    back = Scaler.from_state_dict(state)
    assert back.state_dict() == sc.state_dict()
    with pytest.raises(UserError, match="'std'"):
        Scaler.from_state_dict({"kind": "standard", "services": ["net"], "mean": [0.0]})


def test_service_without_observed_training_value_is_an_error():
    grid = make_grid(T=30, seed=0)
    grid.mask[:20, :, :, 1] = False
    grid.values[:20, :, :, 1] = 0
    with pytest.raises(UserError, match="'sms' has no observed value in the training range"):
        Scaler.fit(grid, (0, 20))
    Scaler.fit(grid, (0, 21))   # one observed step is enough


def test_constant_service_gets_unit_std_and_subset_reorders():
    grid = make_grid(T=20, seed=0)
    grid.values[..., 2] = 7.0
    sc = Scaler.fit(grid, (0, 10))
    assert sc.std[2] == 1.0 and sc.mean[2] == pytest.approx(7.0)
    sub = sc.subset(["net", "call"])
    assert sub.services == ("net", "call") and sub.mean[1] == sc.mean[0]
    with pytest.raises(UserError, match="scaler has no statistics"):
        Scaler.fit(grid.select_services(["net"]), (0, 10)).subset(["sms"])
    with pytest.raises(UserError, match="last axis"):
        sc.transform(np.zeros((4, 2)))
    with pytest.raises(UserError, match="unknown scaler kind"):
        Scaler.fit(grid, (0, 10), kind="minmax")


# Guards found by `make mutate` (data/scaling): each fails with the mutant named beside it.
@pytest.mark.parametrize("kind", ["standard", "log-standard"])
def test_fit_over_several_time_chunks_and_without_a_range(kind):
    # 600 steps = 3 chunks of the fit's two-pass loop (256 steps each): the sums must accumulate
    # over every chunk (mutant: `sq =` instead of `sq +=`), and no time_range means every step.
    grid = make_grid(T=600, H=2, W=2, missing=0.1, seed=7)
    sc = Scaler.fit(grid, kind=kind)
    assert sc.state_dict() == Scaler.fit(grid, (0, 600), kind=kind).state_dict()
    for c in range(len(grid.services)):
        obs = grid.values[..., c][grid.mask[..., c]].astype(np.float64)
        obs = np.log1p(obs) if kind == "log-standard" else obs
        assert sc.mean[c] == pytest.approx(obs.mean(), rel=1e-9)
        assert sc.std[c] == pytest.approx(obs.std(), rel=1e-9)


def test_identity_scaler_changes_nothing():
    sc = Scaler.identity(["call", "net"])
    x = np.array([[1.5, -2.0], [3.0, 40.0]], dtype=np.float32)
    assert np.array_equal(sc.transform(x), x) and np.array_equal(sc.inverse(x), x)
    assert sc.state_dict() == {"kind": "standard", "services": ["call", "net"], "mean": [0.0, 0.0],
                               "std": [1.0, 1.0]}


def test_transform_keeps_float32_arrays_float32():
    # A float64 copy of a 100x100 grid doubles its memory: float32 in, float32 out.
    grid = make_grid(T=30, seed=2)
    sc = Scaler.fit(grid, (0, 20))
    assert sc.transform(grid.values).dtype == np.float32
    assert sc.inverse(grid.values).dtype == np.float32
    assert sc.transform(grid.values.astype(np.int64)).dtype == np.float32
