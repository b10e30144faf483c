"""Generic CSV import (wide and long) and `data info`, good and bad inputs, through the CLI too."""
from __future__ import annotations

import csv
import datetime as dt
import json
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from simmstnet.cli import main
from simmstnet.data.grid import TrafficGrid
from simmstnet.data.importers import import_long_csv, import_wide_csv
from simmstnet.errors import UserError

ROME = ZoneInfo("Europe/Rome")
NOV1 = 1383260400   # 2013-11-01 00:00 Europe/Rome
TI_BLOCK = "milano-internet-r41-45-c41-45-10min-2013-11-01-to-21.csv"


def _write(path, text):
    path.write_text(text)
    return path


def _wide_text(rows):
    return "\n".join(",".join("" if v is None else str(v) for v in row) for row in rows) + "\n"


def _cli_error(capsys, argv):
    """Run the CLI expecting a user error; return the one stderr line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simmstnet: error:"), err
    return err[0]


# ---------------------------------------------------------------------- wide
def test_wide_values_order_and_missing(tmp_path):
    rows = [[1, 2, 3, 4, 5, 6], [7, None, 9, "NaN", 11, 12], [13, 14, 15, 16, 17, 18.5]]
    path = _write(tmp_path / "w.csv", _wide_text(rows))
    g = import_wide_csv(path, grid=(2, 3), service="sms", start="2013-11-01 00:00", tz="Europe/Rome",
                        step="1h", origin=(10, 20))
    assert g.shape == (3, 2, 3, 1) and g.services == ("sms",)
    assert g.timestamps.tolist() == [NOV1, NOV1 + 3600, NOV1 + 7200]
    # Row-major: column k is cell (k // W, k % W).
    assert g.values[0, 1, 0, 0] == 4 and g.values[2, 1, 2, 0] == 18.5 and g.values[1, 0, 2, 0] == 9
    assert not g.mask[1, 0, 1, 0] and not g.mask[1, 1, 0, 0] and g.values[1, 0, 1, 0] == 0
    assert g.mask.sum() == 16
    assert g.meta["crop"] == {"rows": [10, 12], "cols": [20, 23]} and g.timezone == "Europe/Rome"


def test_wide_fast_path_reads_empty_and_nan_fields(tmp_path, monkeypatch):
    # The per-field Python reader is only for locating errors; clean files go through pandas.
    import simmstnet.data.importers as importers

    def refuse(text):
        raise AssertionError("slow path used")

    monkeypatch.setattr(importers, "_to_float", refuse)
    path = _write(tmp_path / "w.csv", "1,,3.5,NaN\n,2e3,nan,4\n")
    g = import_wide_csv(path, grid="2x2", service="net", start=0, step="1h")
    assert g.mask[..., 0].tolist() == [[[True, False], [True, False]], [[False, True], [False, True]]]
    assert g.values[1, 0, 1, 0] == 2000 and g.values[0, 1, 0, 0] == 3.5


def test_wide_header_and_offset_start(tmp_path):
    path = _write(tmp_path / "w.csv", "a,b\n1,2\n3,4\n")
    g = import_wide_csv(path, grid="1x2", service="net", start="2013-10-31T23:00+00:00", step="10min",
                        header=True)
    assert g.shape == (2, 1, 2, 1) and g.timestamps[0] == NOV1 and g.step == 600
    assert g.values[:, 0, :, 0].tolist() == [[1, 2], [3, 4]]


def test_wide_steps_are_absolute_time_across_dst(tmp_path):
    # 2013-10-27 01:00 Europe/Rome (CEST); the next 3 hourly rows cross the switch to CET.
    path = _write(tmp_path / "w.csv", "1\n2\n3\n4\n")
    g = import_wide_csv(path, grid="1x1", service="net", start="2013-10-27 01:00", tz="Europe/Rome", step="1h")
    local = [dt.datetime.fromtimestamp(int(t), tz=ROME).strftime("%H:%M%z") for t in g.timestamps]
    assert local == ["01:00+0200", "02:00+0200", "02:00+0100", "03:00+0100"]


def test_shared_milano_block_imports(shared_ti, tmp_path, capsys):
    src = shared_ti / TI_BLOCK
    out = tmp_path / "block.npz"
    assert main(["data", "import", "--csv", str(src), "--layout", "wide", "--grid", "5x5", "--service", "net",
                 "--start", "2013-11-01 00:00", "--tz", "Europe/Rome", "--step", "10min",
                 "--origin", "41,41", "--out", str(out)]) == 0
    g = TrafficGrid.load(out)
    assert g.shape == (3024, 5, 5, 1) and g.timestamps[0] == 1383260400 and g.step == 600
    assert g.meta["crop"] == {"rows": [41, 46], "cols": [41, 46]}
    with open(src) as fh:
        table = [row for row in csv.reader(fh)]
    for t, k in [(0, 0), (0, 24), (1500, 7), (3023, 12), (3023, 24)]:
        assert g.values[t, k // 5, k % 5, 0] == np.float32(float(table[t][k]))
    assert g.mask.all()
    capsys.readouterr()
    assert main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == {"T": 3024, "H": 5, "W": 5, "C": 1}
    assert info["start_local"] == "2013-11-01T00:00+01:00" and info["start_utc"] == "2013-10-31T23:00+00:00"
    assert info["statistics"]["net"]["max"] == pytest.approx(float(g.values.max()), rel=1e-6)


# ---------------------------------------------------------------------- long
LONG = """timestamp,row,col,service,value
2013-11-01T00:00+01:00,0,0,net,1.5
2013-11-01T00:00+01:00,0,1,net,2
2013-11-01T00:00+01:00,1,2,sms,3
2013-11-01T00:20+01:00,0,0,net,4
2013-11-01T00:20+01:00,1,2,call,
2013-11-01T00:30+01:00,1,1,call,6
"""


def test_long_infers_grid_step_services_and_masks_gaps(tmp_path):
    g = import_long_csv(_write(tmp_path / "l.csv", LONG), tz="Europe/Rome")
    assert g.shape == (4, 2, 3, 3) and g.services == ("call", "sms", "net") and g.step == 600
    assert g.timestamps[0] == NOV1 and g.timezone == "Europe/Rome"
    assert g.values[0, 0, 0, 2] == 1.5 and g.values[0, 1, 2, 1] == 3 and g.values[2, 0, 0, 2] == 4
    assert g.values[3, 1, 1, 0] == 6
    assert not g.mask[1].any()            # the missing 00:10 step is a masked slot
    assert not g.mask[2, 1, 2, 0]         # empty value: unobserved, not zero
    assert g.mask.sum() == 5


def test_long_timestamp_forms_agree(tmp_path):
    naive = LONG.replace("+01:00", "")
    epoch_rows = ["timestamp,row,col,service,value"]
    for line in LONG.strip().splitlines()[1:]:
        ts, rest = line.split(",", 1)
        epoch_rows.append(f"{int(dt.datetime.fromisoformat(ts).timestamp())},{rest}")
    a = import_long_csv(_write(tmp_path / "a.csv", LONG))
    b = import_long_csv(_write(tmp_path / "b.csv", naive), tz="Europe/Rome")
    c = import_long_csv(_write(tmp_path / "c.csv", "\n".join(epoch_rows) + "\n"))
    for other in (b, c):
        np.testing.assert_array_equal(a.values, other.values)
        np.testing.assert_array_equal(a.timestamps, other.timestamps)
    d = import_long_csv(_write(tmp_path / "d.csv", LONG), grid="3x4", step="10min")
    assert d.shape == (4, 3, 4, 3)


def test_long_offsets_across_dst_are_one_regular_series(tmp_path):
    text = ("timestamp,row,col,service,value\n2013-10-27T02:00+02:00,0,0,net,1\n"
            "2013-10-27T02:00+01:00,0,0,net,2\n2013-10-27T03:00+01:00,0,0,net,3\n")
    g = import_long_csv(_write(tmp_path / "l.csv", text), tz="Europe/Rome")
    assert g.step == 3600 and g.values[:, 0, 0, 0].tolist() == [1, 2, 3]
    with pytest.raises(UserError, match="ambiguous"):
        import_long_csv(_write(tmp_path / "n.csv", text.replace("+02:00", "").replace("+01:00", "")),
                        tz="Europe/Rome")


# ---------------------------------------------------------------------- bad inputs via the CLI
WIDE_ARGS = ["--layout", "wide", "--grid", "2x2", "--service", "net", "--start", "2013-11-01 00:00",
             "--tz", "Europe/Rome", "--step", "1h"]


@pytest.mark.parametrize("text,needle", [
    ("1,2,3,4\n5,6,7\n", "w.csv:2: 3 fields, expected 4"),
    ("1,2,3,4\n5,6,7,8,9\n", "w.csv:2: 5 fields, expected 4"),
    ("1,2,3,4\n5,x,7,8\n", "w.csv:2: field 2 'x' is not a number"),
    ("1,2,3,4\n5,6,7,-8\n", "w.csv:2: field 4 (cell row 1, col 1) is negative"),
    ("1,2,3,4\n5,6,inf,8\n", "w.csv:2: field 3"),
    ("1,2,3,4\n\n5,6,7,8\n", "w.csv:2: empty line"),
    (",,,\nnan,,,\n", "no observed value"),
    ("", "no data rows"),
])
def test_wide_bad_inputs(tmp_path, capsys, text, needle):
    path = _write(tmp_path / "w.csv", text)
    out = tmp_path / "out.npz"
    err = _cli_error(capsys, ["data", "import", "--csv", str(path), *WIDE_ARGS, "--out", str(out)])
    assert needle in err
    assert not out.exists() and not list(tmp_path.glob(".out.npz*"))   # no partial output


def test_wide_24_columns_for_a_5x5_grid(tmp_path, capsys):
    path = _write(tmp_path / "w.csv", "\n".join(",".join(["1"] * 24) for _ in range(3)) + "\n")
    err = _cli_error(capsys, ["data", "import", "--csv", str(path), "--layout", "wide", "--grid", "5x5",
                              "--service", "net", "--start", "2013-11-01 00:00", "--step", "10min",
                              "--out", str(tmp_path / "o.npz")])
    assert "w.csv:1: 24 fields, expected 25 (one per cell of the 5x5 grid)" in err


@pytest.mark.parametrize("extra,needle", [
    (["--service", "video"], "unknown service 'video'"),
    (["--tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
    (["--start", "2014-03-30 02:30"], "does not exist in Europe/Rome"),
    (["--start", "yesterday"], "--start 'yesterday'"),
    (["--step", "fortnight"], "cannot read step"),
    (["--grid", "5by5"], "grid size '5by5'"),
    (["--origin", "41"], "--origin '41'"),
])
def test_wide_bad_options(tmp_path, capsys, extra, needle):
    path = _write(tmp_path / "w.csv", "1,2,3,4\n")
    err = _cli_error(capsys, ["data", "import", "--csv", str(path), *WIDE_ARGS, *extra,
                              "--out", str(tmp_path / "o.npz")])
    assert needle in err


def test_missing_file_and_missing_options(tmp_path, capsys):
    err = _cli_error(capsys, ["data", "import", "--csv", str(tmp_path / "nope.csv"), *WIDE_ARGS,
                              "--out", str(tmp_path / "o.npz")])
    assert "nope.csv: no such file" in err
    path = _write(tmp_path / "w.csv", "1,2,3,4\n")
    err = _cli_error(capsys, ["data", "import", "--csv", str(path), "--layout", "wide", "--grid", "2x2",
                              "--out", str(tmp_path / "o.npz")])
    assert "--service is required with --layout wide" in err
    err = _cli_error(capsys, ["data", "import", "--csv", str(path), *WIDE_ARGS, "--out", str(tmp_path / "o.csv")])
    assert "must end in .npz" in err


HEAD = "timestamp,row,col,service,value\n"


@pytest.mark.parametrize("body,extra,needle", [
    ("2013-11-01T00:00+01:00,0,0,net,1\n2013-11-01T00:00+01:00,0,0,net,2\n", [],
     "l.csv:3: duplicate of line 2"),
    ("0,0,0,net,1\n600,0,0,net,1\n1500,0,0,net,1\n", [], "l.csv:4: irregular timestamps"),
    ("0,0,0,net,1\n600,0,0,net,1\n900,0,0,net,1\n", ["--step", "10min"], "l.csv:4: timestamp"),
    ("0,0,0,net,1\n600,0,0,video,1\n", [], "l.csv:3: unknown service 'video'"),
    ("0,0,0,net,1\n600,0,0,net,-1\n", [], "l.csv:3: value -1 is negative"),
    ("0,0,0,net,1\n600,0,0,net,lots\n", [], "l.csv:3: value 'lots' is not a number"),
    ("0,0,0,net,1\n600,0,1.5,net,1\n", [], "l.csv:3: col '1.5' is not a non-negative integer"),
    ("0,0,0,net,1\n600,-1,0,net,1\n", [], "l.csv:3: row '-1' is not a non-negative integer"),
    ("0,0,0,net,1\n600,0,5,net,1\n", ["--grid", "2x2"], "l.csv:3: col 5 is outside the 2x2 grid"),
    ("0,0,0,net,1\n600,0,0,net\n", [], "l.csv:3: 4 fields, expected 5"),
    ("0,0,0,net,1\nnoon,0,0,net,1\n", [], "l.csv:3: timestamp 'noon' is not ISO 8601"),
    ("2013-11-01T00:00,0,0,net,1\n", ["--step", "1h"], "has no UTC offset; give the time zone"),
    ("0,0,0,net,\n600,0,0,net,NaN\n", [], "no observed value"),
    ("0,0,0,net,1\n", [], "only one distinct timestamp"),
    ("", [], "header only, no data rows"),
])
def test_long_bad_inputs(tmp_path, capsys, body, extra, needle):
    path = _write(tmp_path / "l.csv", HEAD + body)
    out = tmp_path / "out.npz"
    err = _cli_error(capsys, ["data", "import", "--csv", str(path), "--layout", "long", *extra, "--out", str(out)])
    assert needle in err
    assert not out.exists()


def test_long_bad_header(tmp_path, capsys):
    path = _write(tmp_path / "l.csv", "time,row,col,service,value\n0,0,0,net,1\n")
    err = _cli_error(capsys, ["data", "import", "--csv", str(path), "--layout", "long", "--out", str(tmp_path / "o.npz")])
    assert "l.csv:1: header lacks column 'timestamp'" in err
    err = _cli_error(capsys, ["data", "import", "--csv", str(path), "--layout", "long", "--service", "net",
                              "--out", str(tmp_path / "o.npz")])
    assert "--service is not used with --layout long" in err


def test_long_cli_round_trip_and_info_text(tmp_path, capsys):
    path = _write(tmp_path / "l.csv", LONG)
    out = tmp_path / "l.npz"
    assert main(["data", "import", "--csv", str(path), "--layout", "long", "--tz", "Europe/Rome",
                 "--license", "CC0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "T=4 x H=2 x W=3 x C=3" in text and "2013-11-01 00:00 .. 2013-11-01 00:30 Europe/Rome" in text
    assert "2013-10-31 23:00 .. 2013-10-31 23:30 UTC" in text and "CC0" in text
    g = TrafficGrid.load(out)
    missing_net = 1 - g.mask[..., 2].mean()
    assert f"net {missing_net:.2%}" in text
    capsys.readouterr()
    assert main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    net = g.values[..., 2][g.mask[..., 2]]
    assert info["statistics"]["net"]["mean"] == pytest.approx(net.mean())
    assert info["statistics"]["net"]["median"] == pytest.approx(np.median(net))
    assert info["statistics"]["sms"]["observed"] == 1
    assert info["missing_share"] == pytest.approx(1 - g.mask.mean())


def test_info_on_missing_file(tmp_path, capsys):
    err = _cli_error(capsys, ["data", "info", str(tmp_path / "x.npz")])
    assert "x.npz: no such file" in err
