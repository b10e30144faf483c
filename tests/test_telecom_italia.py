"""Raw Telecom Italia reader and `simmstnet data prepare`.

Small raw-format files are generated in code and checked against a plain-Python reference
aggregation; the shared excerpt (ODbL, ../shared/data) pins down the real schema."""
from __future__ import annotations

import gzip
import json
import math
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simmstnet.cli import main
from simmstnet.data.grid import TrafficGrid
from simmstnet.data.telecom_italia import raster_from_geojson, read_telecom_italia
from simmstnet.errors import UserError

DAY = "2013-11-05"
MIDNIGHT = 1383606000  # 2013-11-05 00:00 Europe/Rome = 2013-11-04 23:00 UTC, epoch seconds
SLOTS = 144
EXCERPT = "sms-call-internet-mi-2013-11-01.excerpt.txt"
SERVICE_INDEX = {"call": 0, "sms": 1, "net": 2}


# ------------------------------------------------------------------------------ fixtures in code
def raw_name(day: str = DAY, city: str = "mi", ext: str = "txt") -> str:
    return f"sms-call-internet-{city}-{day}.{ext}"


def random_records(rng: np.random.Generator, squares, slots, empty: float = 0.4):
    """Rows (square, slot, country_code, [sms_in, sms_out, call_in, call_out, internet] as text)."""
    records = []
    for sq in squares:
        for slot in slots:
            if rng.random() < 0.3:  # this square has no row in this slot: an observed zero
                continue
            for cc in rng.choice([0, 39, 33, 46, 48, 1], size=rng.integers(1, 4), replace=False):
                fields = ["" if rng.random() < empty else repr(float(rng.lognormal(-1, 1.5)))
                          for _ in range(5)]
                records.append((int(sq), int(slot), int(cc), fields))
    rng.shuffle(records)  # the reader must not rely on the file's order
    return records


def raw_lines(records, midnight: int = MIDNIGHT):
    return ["\t".join([str(sq), str((midnight + 600 * slot) * 1000), str(cc), *fields])
            for sq, slot, cc, fields in records]


def write_raw(path: Path, lines, newline: str = "\n", final_newline: bool = True) -> Path:
    text = newline.join(lines) + (newline if final_newline else "")
    data = text.encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(path.name[:-4] + ".txt", data)
    else:
        path.write_bytes(data)
    return path


def reference(records, rows=(0, 100), cols=(0, 100), n_slots=SLOTS):
    """Plain-Python aggregation: (n_slots, H, W, 3) sums in (call, sms, net) order and the
    (n_slots,) reported flags, Milano raster id = 100*row + col + 1."""
    (a, b), (c, d) = rows, cols
    values = np.zeros((n_slots, b - a, d - c, 3))
    reported = np.zeros(n_slots, bool)
    for sq, slot, _cc, fields in records:
        reported[slot] = True
        r, k = divmod(sq - 1, 100)
        if a <= r < b and c <= k < d:
            x = [float(f) if f else 0.0 for f in fields]
            values[slot, r - a, k - c] += (x[2] + x[3], x[0] + x[1], x[4])
    return values, reported


def to_hours(values, reported):
    hourly = values.reshape(-1, 6, *values.shape[1:]).sum(1)
    return hourly, reported.reshape(-1, 6).all(1)


def assert_grid(grid: TrafficGrid, values, slot_observed, services=("call", "sms", "net")):
    idx = [SERVICE_INDEX[s] for s in services]
    np.testing.assert_allclose(grid.values, values[..., idx], rtol=1e-6, atol=1e-6)
    expected_mask = np.broadcast_to(slot_observed[:, None, None, None], grid.shape)
    np.testing.assert_array_equal(grid.mask, expected_mask)


def cli(capsys, *argv):
    code = main(["data", "prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ generated data
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), chunk=st.sampled_from([2000, 1 << 20]),
       missing_slots=st.integers(0, 20))
def test_random_files_match_reference_at_10min_and_1h(seed, chunk, missing_slots):
    rng = np.random.default_rng(seed)
    # Squares in rows 0..4 (ids 1..500); the crop keeps rows 0:3, cols 2:6, so some squares
    # fall outside it and still mark their slots as reported.
    squares = rng.choice(np.arange(1, 501), size=12, replace=False)
    slots = np.sort(rng.choice(SLOTS, size=SLOTS - missing_slots, replace=False))
    records = random_records(rng, squares, slots)
    expected, reported = reference(records, rows=(0, 3), cols=(2, 6))
    with tempfile.TemporaryDirectory() as tmp:
        write_raw(Path(tmp) / raw_name(), raw_lines(records))
        kw = dict(rows=(0, 3), cols=(2, 6), chunk_bytes=chunk)
        fine = read_telecom_italia(tmp, "milano", step="10min", **kw)
        hourly = read_telecom_italia(tmp, "milano", step="1h", **kw)
    assert fine.timestamps[0] == MIDNIGHT and fine.shape == (SLOTS, 3, 4, 3)
    assert_grid(fine, expected, reported)
    hour_values, hour_observed = to_hours(expected, reported)
    assert_grid(hourly, hour_values, hour_observed)
    # Same rule as TrafficGrid.resample, and the totals survive aggregation.
    resampled = fine.resample(3600)
    np.testing.assert_allclose(hourly.values, resampled.values, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(hourly.mask, resampled.mask)
    np.testing.assert_allclose(hourly.values.sum((0, 1, 2)), fine.values.sum((0, 1, 2)), rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_totals_do_not_depend_on_country_split_or_in_out_split(seed):
    """Merging a (square, slot)'s country-code rows into one row, or moving all activity to the
    'in' column, must give the same grid."""
    rng = np.random.default_rng(seed)
    records = random_records(rng, rng.choice(np.arange(1, 301), 6, replace=False), range(0, SLOTS, 5))
    merged: dict[tuple[int, int], np.ndarray] = {}
    for sq, slot, _cc, fields in records:
        merged.setdefault((sq, slot), np.zeros(5))
        merged[(sq, slot)] += [float(f) if f else 0.0 for f in fields]
    as_in = [(sq, slot, 39, [repr(float(v[0] + v[1])), "", repr(float(v[2] + v[3])), "", repr(float(v[4]))])
             for (sq, slot), v in merged.items()]
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp, "a"), Path(tmp, "b")
        a.mkdir(), b.mkdir()
        write_raw(a / raw_name(), raw_lines(records))
        write_raw(b / raw_name(), raw_lines(as_in))
        ga = read_telecom_italia(a, "milano", step="1h", rows=(0, 3), cols=(0, 100))
        gb = read_telecom_italia(b, "milano", step="1h", rows=(0, 3), cols=(0, 100))
    np.testing.assert_allclose(ga.values, gb.values, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ga.mask, gb.mask)
    assert ga.values.sum() > 0


def test_empty_fields_count_as_zero_and_unreported_slot_is_masked(tmp_path):
    lines = [
        f"1\t{MIDNIGHT * 1000}\t39\t1.5\t\t\t2\t",          # sms 1.5, call 2
        f"1\t{MIDNIGHT * 1000}\t0\t\t0.25\t\t\t",            # sms 0.25
        f"2\t{MIDNIGHT * 1000}\t39\t\t\t\t\t",               # all empty: still reports the slot
        f"2\t{(MIDNIGHT + 600) * 1000}\t39\t\t\t1\t1\t7",   # slot 1 reported by square 2 only
        # slot 2 is reported by no square at all
        f"1\t{(MIDNIGHT + 1800) * 1000}\t39\t\t\t\t\t3",
    ]
    write_raw(tmp_path / raw_name(), lines)
    g = read_telecom_italia(tmp_path, "milano", step="10min", rows=(0, 1), cols=(0, 3))
    np.testing.assert_allclose(g.values[0, 0, 0], [2.0, 1.75, 0.0])
    np.testing.assert_allclose(g.values[0, 0, 1], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(g.values[1, 0, 1], [2.0, 0.0, 7.0])
    assert g.mask[0].all() and g.mask[1].all() and g.mask[3].all()
    # square 1 has no row in slot 1, which square 2 reports: an observed zero
    assert g.mask[1, 0, 0].all() and (g.values[1, 0, 0] == 0).all()
    # slot 2 (and every slot after slot 3): no square reports it -> masked everywhere
    assert not g.mask[2].any() and (g.values[2] == 0).all()
    assert not g.mask[4:].any()
    hourly = read_telecom_italia(tmp_path, "milano", step="1h", rows=(0, 1), cols=(0, 3))
    assert not hourly.mask.any()  # first hour lacks slots 2, 4, 5
    # partial hours keep the sum of their observed slots, as TrafficGrid.resample does
    np.testing.assert_allclose(hourly.values[0, 0, 0], [2.0, 1.75, 3.0])


def test_full_hour_observed_only_when_all_six_slots_reported(tmp_path):
    lines = [f"5\t{(MIDNIGHT + 600 * s) * 1000}\t39\t\t\t\t\t1" for s in range(12) if s != 9]
    write_raw(tmp_path / raw_name(), lines)
    g = read_telecom_italia(tmp_path, "milano", step="1h", rows=(0, 1), cols=(0, 10), services=["net"])
    assert g.shape == (24, 1, 10, 1)
    assert g.mask[0].all() and not g.mask[1].any() and not g.mask[2:].any()
    assert g.values[0, 0, 4, 0] == pytest.approx(6.0)


def test_line_endings_blank_lines_and_missing_final_newline(tmp_path):
    rng = np.random.default_rng(3)
    records = random_records(rng, [1, 2, 101], range(SLOTS))
    lines = raw_lines(records)
    plain = tmp_path / "plain"
    odd = tmp_path / "odd"
    plain.mkdir(), odd.mkdir()
    write_raw(plain / raw_name(), lines)
    write_raw(odd / raw_name(), lines[:10] + [""] + lines[10:], newline="\r\n", final_newline=False)
    a = read_telecom_italia(plain, "milano", rows=(0, 2), cols=(0, 2), chunk_bytes=997)
    b = read_telecom_italia(odd, "milano", rows=(0, 2), cols=(0, 2), chunk_bytes=997)
    # other chunk boundaries change the float32 summation order, hence rtol
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_trailing_blank_lines_in_a_chunk_of_their_own(tmp_path):
    lines = [good_line(1, s) for s in range(SLOTS)]
    write_raw(tmp_path / raw_name(), lines + [""] * 300)
    g = read_telecom_italia(tmp_path, "milano", step="1h", rows=(0, 1), cols=(0, 1), chunk_bytes=64)
    assert g.mask.all() and g.values[:, 0, 0].tolist() == [[42.0, 18.0, 30.0]] * 24


@pytest.mark.parametrize("ext", ["txt.gz", "zip"])
def test_compressed_files_read_like_plain_text(tmp_path, ext):
    rng = np.random.default_rng(5)
    records = random_records(rng, [1, 3, 250], range(SLOTS))
    (tmp_path / "p").mkdir(), (tmp_path / "c").mkdir()
    write_raw(tmp_path / "p" / raw_name(), raw_lines(records))
    write_raw(tmp_path / "c" / raw_name(ext=ext), raw_lines(records))
    a = read_telecom_italia(tmp_path / "p", "milano", rows=(0, 3), cols=(0, 100))
    b = read_telecom_italia(tmp_path / "c", "milano", rows=(0, 3), cols=(0, 100))
    np.testing.assert_array_equal(a.values, b.values)
    assert b.meta["raw_files"] == [raw_name(ext=ext)]


def test_several_days_dates_crop_services_and_meta(tmp_path):
    rng = np.random.default_rng(11)
    days = ["2013-11-04", "2013-11-05", "2013-11-06"]
    midnights = [MIDNIGHT - 86400, MIDNIGHT, MIDNIGHT + 86400]
    per_day = []
    for day, midnight in zip(days, midnights):
        records = random_records(rng, [1, 2, 102, 9999], range(SLOTS))
        records += [(5000, s, 39, ["", "", "", "", "1"]) for s in range(SLOTS)]  # reports every slot
        per_day.append(records)
        write_raw(tmp_path / raw_name(day), raw_lines(records, midnight))
    full = read_telecom_italia(tmp_path, "milano", step="1h")
    assert full.shape == (72, 100, 100, 3) and full.timestamps[0] == MIDNIGHT - 86400
    assert full.mask.all()
    # --start/--end are local dates: only the middle day, and the crop/services asked for
    g = read_telecom_italia(tmp_path, "milano", step="1h", rows=(1, 3), cols=(0, 4),
                            services=("net", "call"), start="2013-11-05", end="2013-11-06")
    assert g.services == ("net", "call") and g.shape == (24, 2, 4, 2)
    assert g.timestamps[0] == MIDNIGHT and np.all(np.diff(g.timestamps) == 3600)
    values, reported = reference(per_day[1], rows=(1, 3), cols=(0, 4))
    assert_grid(g, *to_hours(values, reported), services=("net", "call"))
    np.testing.assert_allclose(g.values, full.values[24:48, 1:3, 0:4][..., [2, 0]], rtol=1e-6)
    assert g.meta["raw_files"] == [raw_name("2013-11-05")]
    assert g.meta["crop"] == {"rows": [1, 3], "cols": [0, 4]}
    assert g.meta["timezone"] == "Europe/Rome" and g.meta["license"] == "ODbL-1.0"
    assert "150055" in g.meta["citation"] and g.meta["city"] == "milano" and g.meta["step"] == "1h"
    # a requested span beyond the files is kept on the regular step, masked
    wide = read_telecom_italia(tmp_path, "milano", step="1h", rows=(0, 1), cols=(0, 1),
                               start="2013-11-06", end="2013-11-09")
    assert wide.shape[0] == 72 and wide.mask[:24].all() and not wide.mask[24:].any()


def test_output_written_by_cli_loads_back(tmp_path, capsys):
    rng = np.random.default_rng(2)
    records = random_records(rng, [1, 7, 42], range(SLOTS))
    raw = tmp_path / "raw"
    raw.mkdir()
    write_raw(raw / raw_name(), raw_lines(records))
    out = tmp_path / "out" / "g.npz"
    code, stdout, err = cli(capsys, "--raw", raw, "--city", "milano", "--out", out, "--step", "10min",
                            "--rows", "0:1", "--cols", "0:50", "--services", "sms,net")
    assert code == 0, err
    assert "wrote" in stdout and "prepare" in err  # the progress bar goes to stderr
    g = TrafficGrid.load(out)
    values, reported = reference(records, rows=(0, 1), cols=(0, 50))
    assert_grid(g, values, reported, services=("sms", "net"))


# ------------------------------------------------------------------------------ Trento / GeoJSON
def write_grid_geojson(path: Path, ids_at: dict[tuple[int, int], int], size=0.01, angle_deg=2.0,
                       origin=(11.0, 46.0), warp=0.0, projected=False) -> Path:
    """A square grid in lon/lat (or metres if ``projected``), rotated by ``angle_deg`` and bent
    by ``warp`` (cells of eastward shift per squared row / 10); ``ids_at`` maps (row, col) -> cellId."""
    th = math.radians(angle_deg)
    kx = 1 if projected else 1 / math.cos(math.radians(origin[1]))  # squares square on the ground

    def point(u, v):
        u = u + warp * v * v / 10
        x, y = u * math.cos(th) - v * math.sin(th), u * math.sin(th) + v * math.cos(th)
        return [origin[0] + x * size * kx, origin[1] + y * size]

    feats = []
    for (r, c), cid in ids_at.items():
        ring = [point(c, r + 1), point(c + 1, r + 1), point(c + 1, r), point(c, r), point(c, r + 1)]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"cellId": cid}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def trento_like_layout(seed=0, H=7, W=9):
    """Irregular outline (holes, missing corners) and ids that follow no row formula."""
    rng = np.random.default_rng(seed)
    cells = [(r, c) for r in range(H) for c in range(W) if rng.random() > 0.25]
    cells += [(0, 0), (H - 1, W - 1)]  # pin the extent
    cells = sorted(set(cells))
    ids = rng.permutation(np.arange(1, 4 * len(cells)))[: len(cells)] + 1
    return dict(zip(cells, (int(i) for i in ids)))


@pytest.mark.parametrize("angle, warp, projected", [(3.0, 0.0, False), (-4.0, 0.05, False), (1.0, 0.02, True)])
def test_raster_from_geojson_recovers_rotated_irregular_grid(tmp_path, angle, warp, projected):
    layout = trento_like_layout()
    kw = dict(size=1000.0, origin=(650_000.0, 5_100_000.0)) if projected else {}
    path = write_grid_geojson(tmp_path / "trentino-grid.geojson", layout, angle_deg=angle, warp=warp,
                              projected=projected, **kw)
    ids, rows, cols, H, W = raster_from_geojson(path)
    assert (H, W) == (7, 9)
    got = {(int(r), int(c)): int(i) for i, r, c in zip(ids, rows, cols)}
    assert got == layout


def test_trento_reader_uses_grid_from_raw_folder(tmp_path, capsys):
    layout = trento_like_layout(seed=1)
    write_grid_geojson(tmp_path / "trentino-grid.geojson", layout)
    (r0, c0), id0 = next(iter(layout.items()))
    lines = [f"{id0}\t{(MIDNIGHT + 600 * s) * 1000}\t39\t1\t\t\t\t2" for s in range(SLOTS)]
    write_raw(tmp_path / raw_name(city="tn"), lines)
    g = read_telecom_italia(tmp_path, "trento", step="1h")
    assert g.shape == (24, 7, 9, 3) and g.meta["city"] == "trento"
    np.testing.assert_allclose(g.values[:, r0, c0], np.tile([0.0, 6.0, 12.0], (24, 1)))
    present = np.zeros((7, 9), bool)
    for r, c in layout:
        present[r, c] = True
    # raster positions without a square are never observed
    np.testing.assert_array_equal(g.mask[0, :, :, 0], present)
    # and a Milano file there is not taken for Trento
    (tmp_path / raw_name(city="tn")).unlink()
    write_raw(tmp_path / raw_name(), lines)
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "trento", "--out", tmp_path / "t.npz", "--quiet")
    assert code == 2 and "check --city" in err


def test_geojson_reproduces_milano_formula(shared_ti):
    ids, rows, cols, H, W = raster_from_geojson(shared_ti / "milano-grid.geojson")
    assert (H, W) == (100, 100) and ids.size == 10_000
    np.testing.assert_array_equal(ids, 100 * rows + cols + 1)


# ------------------------------------------------------------------------------ the real excerpt
def test_excerpt_squares_land_on_milano_raster(shared_ti):
    g = read_telecom_italia([shared_ti / EXCERPT], "milano", step="10min")
    assert g.shape == (SLOTS, 100, 100, 3) and g.mask.all()
    assert g.timestamps[0] == 1383260400  # 2013-11-01 00:00 Europe/Rome
    active = np.argwhere(g.values.sum((0, 3)) > 0)
    assert sorted(map(tuple, active.tolist())) == [(0, 0), (0, 9), (0, 99), (9, 99)]
    # hand sums over the country-code rows of the file
    np.testing.assert_allclose(g.values[0, 0, 0], [
        0.16093793691701822 + 0.052274848528573205,                            # call: in + out
        0.08136262351125882 + 0.14186425470242922 + 0.1567870050390246,       # sms
        11.028366381681026], rtol=1e-6)                                        # net
    np.testing.assert_allclose(g.values[1, 0, 0], [
        0.02730046487718618 + 0.1887771729145041 + 0.13363747203983203,
        0.13658782275823106 + 0.27845207746066025 + 0.11992572014174135,
        0.026137424264286602 + 11.100963451409388], rtol=1e-6)
    np.testing.assert_allclose(g.values[44, 9, 99], [
        0.0036215255509797514 + 0.07755488668215431,
        0.24029879104270352 + 0.08734264811619401,
        6.673858857534368], rtol=1e-6)
    # after its last row, square 1000 is an observed zero (other squares report those slots)
    assert (g.values[45:, 9, 99] == 0).all() and g.mask[45:, 9, 99].all()


def test_excerpt_totals_match_plain_python(shared_ti):
    totals = np.zeros(3)
    for line in (shared_ti / EXCERPT).read_text().splitlines():
        f = [float(x) if x else 0.0 for x in line.split("\t")]
        totals += (f[5] + f[6], f[3] + f[4], f[7])
    g = read_telecom_italia([shared_ti / EXCERPT], "milano", step="1h")
    assert g.shape[0] == 24 and g.mask.all()
    np.testing.assert_allclose(g.values.sum((0, 1, 2), dtype=np.float64), totals, rtol=1e-5)


# ------------------------------------------------------------------------------ bad input, CLI
def good_line(square=1, slot=0):
    return f"{square}\t{(MIDNIGHT + 600 * slot) * 1000}\t39\t1\t2\t3\t4\t5"


BAD_FILES = {
    "seven_fields": ([good_line(), good_line(2), f"3\t{MIDNIGHT * 1000}\t39\t1\t2\t3\t4"], ":3: 7 tab-separated fields"),
    "nine_fields": ([good_line(), f"{good_line(2)}\t9"], ":2: 9 tab-separated fields"),
    # 9 + 7 fields add up to the right tab count: the first row must still be caught
    "nine_fields_first": ([f"{good_line(2)}\t9", f"3\t{MIDNIGHT * 1000}\t39\t1\t2\t3\t4"], ":1: 9 tab-separated fields"),
    # 8 + 9 + 7 fields: the tab total is right, the middle row is not
    "balanced_counts": ([good_line(), f"{good_line(2)}\t9", f"3\t{MIDNIGHT * 1000}\t39\t1\t2\t3\t4"],
                        ":2: 9 tab-separated fields"),
    "text_value": ([good_line(), good_line(2), f"3\t{MIDNIGHT * 1000}\t39\t1\tabc\t3\t4\t5"], ":3: sms_out is 'abc'"),
    "header": (["square_id\ttime_interval\tcountry_code\tsms_in\tsms_out\tcall_in\tcall_out\tinternet",
                good_line()], ":1: square_id is 'square_id'"),
    "fractional_id": ([good_line(), f"1.5\t{MIDNIGHT * 1000}\t39\t1\t2\t3\t4\t5"], ":2: square_id is '1.5'"),
    "square_too_big": ([good_line(), good_line(10001)], ":2: square_id 10001 is not a square"),
    "square_zero": ([good_line(0)], ":1: square_id 0 is not a square"),
    "negative": ([good_line(), f"2\t{MIDNIGHT * 1000}\t39\t1\t2\t-3\t4\t5"], ":2: call_in is -3"),
    "far_time": ([good_line(), f"2\t0\t39\t1\t2\t3\t4\t5"], ":2: time_interval 0 (1970-01-01"),
    "off_slot": ([good_line(), f"2\t{MIDNIGHT * 1000 + 1000}\t39\t1\t2\t3\t4\t5"], ":2: time_interval"),
}


def assert_one_line_error(code, err, *fragments, out: Path | None = None):
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("simmstnet: error: ") and "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_cli_bad_raw_content(tmp_path, capsys, case):
    lines, fragment = BAD_FILES[case]
    # pad so the bad line is not the only thing in its chunk
    write_raw(tmp_path / raw_name(), lines)
    out = tmp_path / "g.npz"
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "milano", "--out", out, "--quiet")
    assert_one_line_error(code, err, raw_name() + fragment, out=out)


def test_bad_line_number_counts_across_chunks(tmp_path):
    lines = [good_line(1 + i % 100, i // 100) for i in range(3000)] + ["7\tx\t39\t1\t2\t3\t4\t5"]
    write_raw(tmp_path / raw_name(), lines)
    with pytest.raises(UserError, match=r":3001: time_interval is 'x'"):
        read_telecom_italia(tmp_path, "milano", chunk_bytes=1000)


def test_cli_error_after_progress_bar_is_still_one_line(tmp_path, capsys):
    write_raw(tmp_path / raw_name(), [good_line(), good_line(20000)])
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "milano", "--out", tmp_path / "g.npz")
    assert code == 2
    assert err.count("\n") == 1 and err.rstrip("\n").split("\r")[-1].startswith("simmstnet: error: ")


@pytest.mark.parametrize("argv, fragments", [
    (["--city", "rome"], ["unknown city 'rome'", "milano, trento"]),
    (["--services", "call,video"], ["unknown service 'video'"]),
    (["--rows", "90:101"], ["crop rows 90:101 outside the 100x100 raster"]),
    (["--cols", "5:5"], ["crop cols 5:5"]),
    (["--rows", "a:b"], ["--rows 'a:b'"]),
    (["--step", "15min"], ["step 15min not supported"]),
    (["--step", "2h"], ["step 2h not supported"]),
    (["--start", "2013-12-01", "--end", "2013-12-02"], ["no raw file from 2013-12-01"]),
    (["--start", "2013-11-06", "--end", "2013-11-05"], ["must come after"]),
    (["--start", "5/11/2013", "--end", "2013-11-06"], ["--start", "YYYY-MM-DD"]),
])
def test_cli_bad_options(tmp_path, capsys, argv, fragments):
    write_raw(tmp_path / raw_name(), [good_line()])
    out = tmp_path / "g.npz"
    # argparse keeps the last of a repeated option, so argv may override --city
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "milano", "--out", out, "--quiet", *argv)
    assert_one_line_error(code, err, *fragments, out=out)


def test_cli_output_must_be_npz(tmp_path, capsys):
    write_raw(tmp_path / raw_name(), [good_line()])
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "milano", "--out", tmp_path / "g.csv")
    assert_one_line_error(code, err, "g.csv: a TrafficGrid file must end in .npz")
    assert not (tmp_path / "g.csv").exists()


def test_cli_folder_problems(tmp_path, capsys):
    out = tmp_path / "g.npz"
    code, _, err = cli(capsys, "--raw", tmp_path / "nope", "--city", "milano", "--out", out)
    assert_one_line_error(code, err, "nope: no such folder", out=out)
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "milano", "--out", out)
    assert_one_line_error(code, err, "no raw files named sms-call-internet-mi-YYYY-MM-DD.txt", out=out)
    write_raw(tmp_path / raw_name(), [good_line()])
    write_raw(tmp_path / raw_name(ext="txt.gz"), [good_line()])
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "milano", "--out", out)
    assert_one_line_error(code, err, "both hold 2013-11-05", out=out)
    (tmp_path / raw_name(ext="txt.gz")).write_bytes(b"\x1f\x8b\x08\x00garbage")
    (tmp_path / raw_name()).unlink()
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "milano", "--out", out, "--quiet")
    assert_one_line_error(code, err, raw_name(ext="txt.gz"), "cannot read", out=out)


def test_cli_empty_selection_inside_files(tmp_path, capsys):
    # the file is named for 11-05 but holds only rows of 11-06: 11-05 selects no data
    write_raw(tmp_path / raw_name(), [good_line(1, 150)])
    out = tmp_path / "g.npz"
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "milano", "--out", out, "--quiet",
                       "--start", "2013-11-05", "--end", "2013-11-06")
    assert_one_line_error(code, err, "no data from 2013-11-05", out=out)


def test_api_refuses_file_of_other_city(tmp_path):
    path = write_raw(tmp_path / raw_name(city="tn"), [good_line()])
    with pytest.raises(UserError, match="other city"):
        read_telecom_italia([path], "milano")
    with pytest.raises(UserError, match="no such folder or file"):
        read_telecom_italia(tmp_path / "missing", "milano")


def test_cli_trento_without_grid(tmp_path, capsys):
    write_raw(tmp_path / raw_name(city="tn"), [good_line()])
    out = tmp_path / "g.npz"
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "trento", "--out", out)
    assert_one_line_error(code, err, "Trentino grid GeoJSON", "--grid", out=out)
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "trento", "--out", out, "--grid", tmp_path / "x.geojson")
    assert_one_line_error(code, err, "x.geojson: no such grid GeoJSON file", out=out)
    (tmp_path / "bad.geojson").write_text("{not json")
    code, _, err = cli(capsys, "--raw", tmp_path, "--city", "trento", "--out", out, "--grid", tmp_path / "bad.geojson")
    assert_one_line_error(code, err, "bad.geojson: not valid JSON", out=out)
