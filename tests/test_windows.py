"""WindowDataset, split_ranges and BatchLoader checked against brute-force slicing of tiny grids."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import torch

from simmstnet.data.calendar import calendar_features
from simmstnet.data.scaling import Scaler
from simmstnet.data.windows import BatchLoader, WindowDataset, data_range, split_ranges
from simmstnet.errors import UserError
from tests.conftest import make_grid

L, LABEL, H, K = 8, 4, 3, 3


def _scaled_reference(grid, scaler, services):
    """Scaled (T, H, W, C) array with unobserved -> 0, computed the obvious way."""
    idx = [grid.services.index(s) for s in services]
    v = grid.values[..., idx].astype(np.float64)
    m = grid.mask[..., idx]
    if scaler.kind == "log-standard":
        v = np.log1p(v)
    z = (v - scaler.mean) / scaler.std
    return np.where(m, z, 0.0), m


def _brute_force_windows(grid, lo, hi, stride=1, cells=None, services=None):
    """Every (start, row, col) whose targets lie in [lo, hi) and include an observed value."""
    T, Hg, Wg, _ = grid.shape
    idx = [grid.services.index(s) for s in (services or grid.services)]
    cells = cells if cells is not None else [(r, c) for r in range(Hg) for c in range(Wg)]
    first = max(lo - L, 0)
    out = set()
    for s in range(first, T, stride):
        if s + L < lo or s + L + H > hi:
            continue
        for r, c in cells:
            if grid.mask[s + L:s + L + H, r, c][:, idx].any():
                out.add((s, r, c))
    return out


@pytest.mark.parametrize("kind", ["standard", "log-standard"])
def test_every_window_matches_brute_force_slicing(kind):
    grid = make_grid(T=60, H=4, W=5, missing=0.2, seed=3)
    scaler = Scaler.fit(grid, (0, 40), kind=kind)
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=K, scaler=scaler,
                       target_range=(30, 55))
    z, m = _scaled_reference(grid, scaler, grid.services)
    marks = calendar_features(grid.timestamps, grid.timezone)
    assert {tuple(map(int, w)) for w in zip(*ds.window_info(np.arange(len(ds))))} \
        == _brute_force_windows(grid, 30, 55)
    batch = ds.get_batch(np.arange(len(ds)))
    starts, rows, cols = ds.window_info(np.arange(len(ds)))
    for i, (s, r, c) in enumerate(zip(starts, rows, cols)):
        np.testing.assert_allclose(batch["x"][i].numpy(), z[s:s + L, r, c], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(batch["x_mask"][i].numpy(), m[s:s + L, r, c])
        np.testing.assert_allclose(batch["y"][i].numpy(), z[s + L:s + L + H, r, c], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(batch["y_mask"][i].numpy(), m[s + L:s + L + H, r, c])
        # y_raw is the grid's own value in original units, bit for bit.
        np.testing.assert_array_equal(batch["y_raw"][i].numpy(), grid.values[s + L:s + L + H, r, c])
        np.testing.assert_array_equal(batch["x_mark"][i].numpy(), marks[s:s + L])
        np.testing.assert_array_equal(batch["y_mark"][i].numpy(), marks[s + L - LABEL:s + L + H])
        assert 30 <= s + L and s + L + H <= 55
    assert batch["index"].tolist() == list(range(len(ds)))


def test_patches_are_padded_and_masked_at_borders():
    grid = make_grid(T=20, H=4, W=5, seed=1)
    k = 5
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=k)
    starts, rows, cols = ds.window_info(np.arange(len(ds)))
    p = k // 2
    padded = np.zeros((grid.shape[0], 4 + 2 * p, 5 + 2 * p, 3))
    inside = np.zeros(padded.shape, bool)
    padded[:, p:p + 4, p:p + 5] = grid.values
    inside[:, p:p + 4, p:p + 5] = True
    batch = ds.get_batch(np.arange(len(ds)))
    for i, (s, r, c) in enumerate(zip(starts, rows, cols)):
        want = padded[s:s + L, r:r + k, c:c + k].transpose(0, 3, 1, 2)   # (L, C, k, k)
        np.testing.assert_allclose(batch["x_patch"][i].numpy(), want, rtol=1e-6)
        np.testing.assert_array_equal(batch["patch_mask"][i].numpy(),
                                      inside[s:s + L, r:r + k, c:c + k].transpose(0, 3, 1, 2))
    # The corner cell (0, 0): its two top rows and two left columns lie outside the grid.
    corner = int(np.flatnonzero((rows == 0) & (cols == 0))[0])
    patch, pmask = batch["x_patch"][corner], batch["patch_mask"][corner]
    assert not pmask[:, :, :p, :].any() and not pmask[:, :, :, :p].any()
    assert torch.all(patch[:, :, :p, :] == 0) and torch.all(patch[:, :, :, :p] == 0)
    assert pmask[:, :, p:, p:].all()
    # The centre of every patch is the cell's own input.
    torch.testing.assert_close(batch["x_patch"][:, :, :, p, p], batch["x"])


def test_unobserved_patch_entries_are_zero_and_masked():
    grid = make_grid(T=20, H=3, W=3, missing=0.3, seed=5)
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=3)
    batch = ds.get_batch(np.arange(len(ds)))
    assert not torch.isnan(batch["x_patch"]).any()
    assert torch.all(batch["x_patch"][~batch["patch_mask"]] == 0)
    assert torch.all(batch["y"][~batch["y_mask"]] == 0)
    assert torch.all(batch["y_raw"][~batch["y_mask"]] == 0)
    assert (~batch["patch_mask"]).sum() > 0


def test_dec_in_is_label_part_then_zeros():
    grid = make_grid(T=30, H=2, W=2)
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=1)
    b = ds.get_batch([0, 5, len(ds) - 1])
    assert b["dec_in"].shape == (3, LABEL + H, 3)
    torch.testing.assert_close(b["dec_in"][:, :LABEL], b["x"][:, L - LABEL:])
    assert torch.all(b["dec_in"][:, LABEL:] == 0)
    ds0 = WindowDataset(grid, input_len=L, label_len=0, horizon=H, patch=1)
    assert torch.all(ds0.get_batch([0])["dec_in"] == 0)


def test_batch_keys_shapes_and_dtypes_follow_the_contract():
    grid = make_grid(T=40, H=4, W=5)
    cells = np.array([[0, 0], [3, 4], [2, 1]])
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, services=["net", "call"],
                       patch=K, stride=2, cells=cells)
    assert (ds.n_services, ds.n_marks, ds.input_len, ds.label_len, ds.horizon, ds.patch) == (2, 5, L, LABEL, H, K)
    assert ds.services == ("net", "call")
    B, S, C = 7, LABEL + H, 2
    b = ds.get_batch(np.arange(B))
    want = {"x": ((B, L, C), torch.float32), "x_mask": ((B, L, C), torch.bool),
            "x_patch": ((B, L, C, K, K), torch.float32), "patch_mask": ((B, L, C, K, K), torch.bool),
            "x_mark": ((B, L, 5), torch.float32), "dec_in": ((B, S, C), torch.float32),
            "y_mark": ((B, S, 5), torch.float32), "y": ((B, H, C), torch.float32),
            "y_raw": ((B, H, C), torch.float32), "y_mask": ((B, H, C), torch.bool),
            "index": ((B,), torch.int64)}
    assert set(b) == set(want)
    for key, (shape, dtype) in want.items():
        assert tuple(b[key].shape) == shape and b[key].dtype == dtype, key
    # Service order and cell subset: y_raw follows ("net", "call") at the chosen cells only.
    starts, rows, cols = ds.window_info(np.arange(len(ds)))
    assert set(zip(rows.tolist(), cols.tolist())) == {(0, 0), (3, 4), (2, 1)}
    assert np.all((starts - starts[0]) % 2 == 0)
    s, r, c = starts[4], rows[4], cols[4]
    np.testing.assert_array_equal(b["y_raw"][4].numpy(), grid.values[s + L:s + L + H, r, c][:, [2, 0]])
    assert len(ds) == ds.n_starts * 3


def test_getitem_is_one_numpy_sample():
    grid = make_grid(T=30, H=3, W=3)
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=3)
    one = ds[4]
    batch = ds.get_batch([4])
    assert isinstance(one["x"], np.ndarray) and one["x"].shape == (L, 3)
    for key in batch:
        np.testing.assert_array_equal(one[key], batch[key][0].numpy())
    np.testing.assert_array_equal(ds[-1]["x"], ds.get_batch([len(ds) - 1])["x"][0].numpy())
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_windows_without_observed_targets_are_skipped_and_counted():
    grid = make_grid(T=40, H=2, W=3, seed=2)
    grid.mask[20:30, 1, 2] = False   # cell (1, 2) unobserved for 10 steps
    grid.values[20:30, 1, 2] = 0
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=1)
    full = ds.n_starts * 6
    expected = _brute_force_windows(grid, 0, 40)
    # Targets t+L .. t+L+2 all inside 20..29: starts 12..19 for that cell -> 8 windows.
    assert ds.n_skipped == full - len(expected) == 8
    got = {tuple(map(int, w)) for w in zip(*ds.window_info(np.arange(len(ds))))}
    assert got == expected
    # Windows with at least one observed target are all kept (here: start 11 and 20).
    assert (11, 1, 2) in got and (20, 1, 2) in got
    kept_all = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=1, skip_unobserved=False)
    assert len(kept_all) == full and kept_all.n_skipped == 0


@pytest.mark.parametrize("missing", [0.5, 0.97])
@pytest.mark.parametrize("stride", [1, 3])
def test_skipping_matches_brute_force_when_few_or_most_windows_are_empty(missing, stride):
    # 0.5: few windows without any observed target; 0.97: most of them (both index layouts).
    grid = make_grid(T=40, H=3, W=4, seed=9, missing=missing, services=("sms", "net"))
    cells = np.array([[2, 3], [0, 0], [1, 2]]) if stride == 3 else None
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=3, stride=stride,
                       cells=cells, services=["net"], target_range=(5, 40))
    expected = _brute_force_windows(grid, 5, 40, stride=stride, services=["net"],
                                    cells=None if cells is None else [tuple(c) for c in cells])
    got = [tuple(map(int, w)) for w in zip(*ds.window_info(np.arange(len(ds))))]
    assert len(got) == len(set(got)) and set(got) == expected
    assert ds.n_skipped == ds.n_starts * ds.n_cells - len(expected) > 0
    assert bool(ds.get_batch(np.arange(len(ds)))["y_mask"].any(dim=(1, 2)).all())


def test_bad_arguments_raise_user_errors():
    grid = make_grid(T=20, H=2, W=2)
    with pytest.raises(UserError, match="label_len"):
        WindowDataset(grid, input_len=4, label_len=5, horizon=2)
    with pytest.raises(UserError, match="odd"):
        WindowDataset(grid, input_len=4, label_len=2, horizon=2, patch=4)
    with pytest.raises(UserError, match="no complete window"):
        WindowDataset(grid, input_len=8, label_len=2, horizon=3, target_range=(0, 10))
    with pytest.raises(UserError, match="outside the 2x2 grid"):
        WindowDataset(grid, input_len=4, label_len=2, horizon=2, cells=np.array([[0, 2]]))
    with pytest.raises(UserError, match="service 'sms' not in this grid"):
        WindowDataset(grid.select_services(["net"]), input_len=4, label_len=2, horizon=2, services=["sms"])


def test_one_scaled_copy_shared_by_all_windows():
    grid = make_grid(T=50, H=6, W=7)
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=5)
    assert ds._scaled.numel() == 50 * (6 + 4) * (7 + 4) * 3   # one padded copy, nothing per window
    # A split's dataset copies only the steps its windows read (inputs before t_lo included).
    val = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=5, target_range=(30, 40))
    assert val._scaled.numel() == (40 - (30 - L)) * (6 + 4) * (7 + 4) * 3
    assert ds._raw.data_ptr() == grid.values.__array_interface__["data"][0]  # raw targets not copied
    assert ds._kept is None   # complete data: no per-window index array either


# ---------------------------------------------------------------------- loader
def _collect(loader):
    return np.concatenate([b["index"].numpy() for b in loader]) if len(loader) else np.array([], int)


def test_loader_covers_every_window_once_and_shuffles_by_seed_and_epoch():
    ds = WindowDataset(make_grid(T=30, H=3, W=3), input_len=L, label_len=LABEL, horizon=H, patch=3)
    n = len(ds)
    plain = BatchLoader(ds, batch_size=16)
    assert np.array_equal(_collect(plain), np.arange(n))
    assert len(plain) == -(-n // 16) and len(list(plain)) == len(plain)
    a = BatchLoader(ds, batch_size=16, shuffle=True, seed=7)
    b = BatchLoader(ds, batch_size=16, shuffle=True, seed=7)
    e0 = _collect(a)
    assert sorted(e0.tolist()) == list(range(n)) and not np.array_equal(e0, np.arange(n))
    assert np.array_equal(e0, _collect(b))                   # same seed, same epoch: same order
    a.set_epoch(1)
    e1 = _collect(a)
    assert sorted(e1.tolist()) == list(range(n)) and not np.array_equal(e0, e1)
    b.set_epoch(1)
    assert np.array_equal(e1, _collect(b))
    assert not np.array_equal(e0, _collect(BatchLoader(ds, batch_size=16, shuffle=True, seed=8)))
    dropped = BatchLoader(ds, batch_size=16, drop_last=True)
    assert len(dropped) == n // 16 and all(x["x"].shape[0] == 16 for x in dropped)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ddp_shards_are_disjoint_and_complete(world_size, shuffle):
    ds = WindowDataset(make_grid(T=31, H=3, W=3), input_len=L, label_len=LABEL, horizon=H, patch=1)
    n = len(ds)
    shards = [_collect(BatchLoader(ds, 8, shuffle=shuffle, seed=3, rank=r, world_size=world_size))
              for r in range(world_size)]
    everything = np.concatenate(shards)
    assert len(everything) == n and sorted(everything.tolist()) == list(range(n))
    # drop_last: equal step counts on every rank, still disjoint.
    loaders = [BatchLoader(ds, 8, shuffle=shuffle, seed=3, drop_last=True, rank=r, world_size=world_size)
               for r in range(world_size)]
    assert len({len(ld) for ld in loaders}) == 1
    dropped = np.concatenate([_collect(ld) for ld in loaders])
    assert len(set(dropped.tolist())) == len(dropped)


# ---------------------------------------------------------------------- splits
def test_split_by_ratios_is_chronological():
    grid = make_grid(T=100, H=2, W=2)
    r = split_ranges(grid, (0.7, 0.1, 0.2), input_len=L, horizon=H)
    assert r == {"train": (0, 70), "val": (70, 80), "test": (80, 100)}
    assert split_ranges(grid, "0.7,0.1,0.2", input_len=L, horizon=H) == r
    for bad in ("0.7,0.2,0.2", "0.5,0.5", "a,b,c,d", (0.9, 0.1, 0.0)):
        with pytest.raises(UserError):
            split_ranges(grid, bad, input_len=L, horizon=H)
    # Windows built from these ranges never put a target outside their split.
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=1, target_range=r["val"])
    starts, _, _ = ds.window_info(np.arange(len(ds)))
    assert starts.min() + L == 70 and starts.max() + L + H == 80


def test_split_by_dates_in_local_time():
    grid = make_grid(T=24 * 10, H=2, W=2)   # hourly from 2013-11-01 00:00 Europe/Rome
    r = split_ranges(grid, ["2013-11-07", "2013-11-09"], input_len=L, horizon=H)
    assert r == {"train": (0, 144), "val": (144, 192), "test": (192, 240)}
    r3 = split_ranges(grid, "2013-11-07,2013-11-08 12:00,2013-11-10", input_len=L, horizon=H)
    assert r3 == {"train": (0, 144), "val": (144, 180), "test": (180, 216)}
    zone = ZoneInfo("Europe/Rome")
    assert grid.timestamps[144] == int(dt.datetime(2013, 11, 7, tzinfo=zone).timestamp())
    with pytest.raises(UserError, match="test start"):
        split_ranges(grid, ["2013-11-07", "2013-11-06"], input_len=L, horizon=H)
    with pytest.raises(UserError, match="outside"):
        split_ranges(grid, ["2013-11-07", "2014-01-01"], input_len=L, horizon=H)
    with pytest.raises(UserError, match="YYYY-MM-DD"):
        split_ranges(grid, ["7 Nov", "2013-11-09"], input_len=L, horizon=H)


def test_train_days_keeps_the_most_recent_days_only():
    grid = make_grid(T=24 * 12, H=2, W=2)
    full = split_ranges(grid, "0.75,0.125,0.125", input_len=24, horizon=6)
    assert full["train"] == (0, 216)
    r = split_ranges(grid, "0.75,0.125,0.125", input_len=24, horizon=6, train_days=3)
    assert r["train"] == (216 - 72 + 24, 216) and r["val"] == full["val"] and r["test"] == full["test"]
    ds = WindowDataset(grid, input_len=24, label_len=12, horizon=6, patch=1, target_range=r["train"])
    starts, _, _ = ds.window_info(np.arange(len(ds)))
    # Every training window's input and target lie in the last 3 days before validation.
    assert starts.min() == 216 - 72 and starts.max() + 30 == 216
    assert data_range(r["train"], 24) == (144, 216)


def test_train_days_one_with_input_24_hourly_says_there_is_no_window():
    grid = make_grid(T=24 * 12, H=2, W=2)
    with pytest.raises(UserError, match="no complete training window") as err:
        split_ranges(grid, "0.75,0.125,0.125", input_len=24, horizon=6, train_days=1)
    assert "train_days=1" in str(err.value) and "24" in str(err.value) and "30" in str(err.value)
    with pytest.raises(UserError, match="only 216 steps"):
        split_ranges(grid, "0.75,0.125,0.125", input_len=24, horizon=6, train_days=10)


def test_split_without_room_for_a_window_is_an_error():
    grid = make_grid(T=40, H=2, W=2)
    with pytest.raises(UserError, match="val split"):
        split_ranges(grid, "0.85,0.05,0.1", input_len=8, horizon=3)


# ---------------------------------------------------------------------- real data and scale
def test_real_milano_block_hourly_protocol(shared_ti):
    from simmstnet.data.importers import import_wide_csv

    grid = import_wide_csv(shared_ti / "milano-internet-r41-45-c41-45-10min-2013-11-01-to-21.csv",
                           grid=(5, 5), service="net", start="2013-11-01 00:00", tz="Europe/Rome",
                           step="10min").resample(3600)
    assert grid.shape == (504, 5, 5, 1)
    r = split_ranges(grid, "2013-11-15,2013-11-18", input_len=24, horizon=6, train_days=3)
    assert r["val"] == (14 * 24, 17 * 24) and r["train"] == (14 * 24 - 72 + 24, 14 * 24)
    scaler = Scaler.fit(grid, data_range(r["train"], 24), kind="log-standard")
    test = WindowDataset(grid, scaler=scaler, target_range=r["test"])
    assert len(test) == (504 - 17 * 24 - 6 + 1) * 25
    b = test.get_batch(np.arange(len(test)))
    s, row, col = test.window_info(np.arange(len(test)))
    np.testing.assert_array_equal(b["y_raw"][:, :, 0].numpy(),
                                  grid.values[s[:, None] + 24 + np.arange(6), row[:, None], col[:, None], 0])
    with pytest.raises(UserError, match="no complete training window"):
        split_ranges(grid, "2013-11-15,2013-11-18", input_len=24, horizon=6, train_days=1)


@pytest.mark.slow
def test_full_milano_size_grid_builds_fast_without_per_window_copies():
    import time

    from simmstnet.data.grid import TrafficGrid

    rng = np.random.default_rng(0)
    shape = (1488, 100, 100, 3)
    big = TrafficGrid.from_values(rng.gamma(2.0, 10.0, size=shape).astype(np.float32), start=1383260400,
                                  step=3600, services=("call", "sms", "net"), meta={"timezone": "Europe/Rome"})
    t0 = time.perf_counter()
    ds = WindowDataset(big, input_len=24, label_len=12, horizon=6, patch=5)
    elapsed = time.perf_counter() - t0
    assert len(ds) == (1488 - 30 + 1) * 10_000
    assert ds._scaled.numel() == 1488 * 104 * 104 * 3
    # < 1 s on an idle core; the bound here only catches gross regressions on a busy CI machine.
    assert elapsed < 5.0, elapsed
