"""Masked metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from simmstnet.eval.metrics import MetricAccumulator, masked_metrics


def test_hand_computed_masked_mae_rmse_smape():
    # B=1, H=2, C=2; service b has one unobserved target whose (huge) error must not count.
    pred = np.array([[[1.0, 10.0], [4.0, 0.0]]])
    y = np.array([[[2.0, 7.0], [2.0, 999.0]]])
    mask = np.array([[[True, True], [True, False]]])
    m = masked_metrics(pred, y, mask, ["a", "b"])
    assert m["a"]["mae"] == pytest.approx((1 + 2) / 2)
    assert m["a"]["rmse"] == pytest.approx(math.sqrt((1 + 4) / 2))
    assert m["a"]["smape"] == pytest.approx(100 * (2 * 1 / 3 + 2 * 2 / 6) / 2)
    assert m["b"]["mae"] == pytest.approx(3.0) and m["b"]["n_observed"] == 1
    assert m["overall"]["mae"] == pytest.approx((1 + 2 + 3) / 3)
    assert m["overall"]["rmse"] == pytest.approx(math.sqrt((1 + 4 + 9) / 3))
    assert m["overall"]["n_observed"] == 3 and m["overall"]["n_windows"] == 1
    assert m["overall"]["mae_by_step"] == pytest.approx([(1 + 3) / 2, 2.0])


def test_nan_under_the_mask_is_ignored_and_empty_service_is_null():
    pred = np.ones((2, 3, 2))
    y = np.full((2, 3, 2), np.nan)
    y[..., 0] = 3.0
    mask = np.zeros((2, 3, 2), bool)
    mask[..., 0] = True
    m = masked_metrics(pred, y, mask, ["a", "b"])
    assert m["a"]["mae"] == pytest.approx(2.0)
    assert m["b"] == {"mae": None, "rmse": None, "smape": None, "n_observed": 0}
    assert m["overall"]["mae"] == pytest.approx(2.0)


def test_result_does_not_depend_on_batching():
    rng = np.random.default_rng(0)
    pred, y = rng.normal(size=(37, 4, 3)), rng.normal(size=(37, 4, 3))
    mask = rng.random((37, 4, 3)) > 0.3
    whole = masked_metrics(pred, y, mask, "abc")
    acc = MetricAccumulator("abc", horizon=4)
    for lo in range(0, 37, 5):
        acc.update(pred[lo:lo + 5], y[lo:lo + 5], mask[lo:lo + 5])
    parts = acc.result()
    for key in ("a", "b", "c", "overall"):
        for fig in ("mae", "rmse", "smape"):
            assert parts[key][fig] == pytest.approx(whole[key][fig], rel=1e-12)
    assert parts["overall"]["n_windows"] == 37
    # Brute force for one service.
    err = (pred - y)[..., 1][mask[..., 1]]
    assert whole["b"]["mae"] == pytest.approx(np.abs(err).mean())
    assert whole["b"]["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        masked_metrics(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)), np.ones((1, 2, 3), bool), "ab")
