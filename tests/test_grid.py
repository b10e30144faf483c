import json

import numpy as np
import pytest

from simmstnet.data.grid import TrafficGrid
from simmstnet.errors import UserError
from tests.conftest import make_grid


def test_npz_round_trip_is_plain_numpy(tmp_path):
    g = make_grid(missing=0.1)
    path = g.save(tmp_path / "g.npz")
    z = np.load(path)  # readable without the package
    assert set(z.files) == {"values", "mask", "timestamps", "services", "meta"}
    assert json.loads(str(z["meta"]))["timezone"] == "Europe/Rome"
    h = TrafficGrid.load(path)
    np.testing.assert_array_equal(h.values, g.values)
    np.testing.assert_array_equal(h.mask, g.mask)
    np.testing.assert_array_equal(h.timestamps, g.timestamps)
    assert h.services == g.services and h.step == 3600


def test_save_leaves_no_partial_file(tmp_path):
    g = make_grid()
    with pytest.raises(UserError):
        g.save(tmp_path / "g.csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(timestamps=a["timestamps"][::-1].copy()), "not strictly increasing"),
    (lambda a: a["timestamps"].__setitem__(slice(5, None), a["timestamps"][5:] + 60), "irregular"),
    (lambda a: a.update(services=("call", "sms", "video")), "unknown service 'video'"),
    (lambda a: a.update(services=("call", "call", "net")), "duplicate"),
    (lambda a: a["values"].__setitem__((0, 0, 0, 0), -1.0), "negative activity"),
    (lambda a: a["values"].__setitem__((0, 0, 0, 0), np.inf), "non-finite"),
    (lambda a: a.update(mask=a["mask"][:-1]), "mask shape"),
])
def test_validation_rejects_bad_arrays(mutate, message):
    g = make_grid()
    arrays = dict(values=g.values.copy(), mask=g.mask.copy(), timestamps=g.timestamps.copy(),
                  services=g.services, meta=g.meta)
    mutate(arrays)
    with pytest.raises(UserError, match=message):
        TrafficGrid(**arrays)


def test_unobserved_values_may_be_nan():
    g = make_grid()
    v = g.values.copy()
    v[3, 1, 1, 2] = np.nan
    h = TrafficGrid.from_values(v, start=int(g.timestamps[0]), step=g.step, services=g.services)
    assert not h.mask[3, 1, 1, 2] and h.values[3, 1, 1, 2] == 0


def test_resample_preserves_totals_and_masks_partial_slots():
    g = make_grid(T=36, step=600, start=1383260400)  # 6 hours of 10-minute slots
    h = g.resample(3600)
    assert h.shape[0] == 6 and h.step == 3600
    np.testing.assert_allclose(h.values.sum(), g.values.astype(np.float64).sum(), rtol=1e-6)
    m = g.mask.copy()
    m[7, 0, 0, 0] = False  # second hour, one slot missing
    g2 = TrafficGrid(g.values, m, g.timestamps, g.services, g.meta)
    h2 = g2.resample(3600)
    assert not h2.mask[1, 0, 0, 0] and h2.mask[0, 0, 0, 0] and h2.mask[1, 0, 0, 1]


def test_crop_and_select(small_grid):
    c = small_grid.crop((1, 3), (2, 5)).select_services(["net"])
    assert c.shape == (72, 2, 3, 1) and c.meta["crop"] == {"rows": [1, 3], "cols": [2, 5]}
    with pytest.raises(UserError, match="outside"):
        small_grid.crop((0, 9), (0, 2))
    with pytest.raises(UserError, match="not in this grid"):
        small_grid.select_services(["video"])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        TrafficGrid.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_text("hello")
    with pytest.raises(UserError, match="bad.npz"):
        TrafficGrid.load(bad)


def test_saved_file_gets_umask_permissions(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        path = make_grid().save(tmp_path / "g.npz")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
