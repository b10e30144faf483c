"""Guards for the data layer (issue 15): raw reader, grid operations, loader sharding, fetch.

Each test fails on one plausible bug that the older tests let pass."""
from __future__ import annotations

import datetime as dt
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from simmstnet.data import fetch as fetch_mod
from simmstnet.data.fetch import RemoteFile, download_file, list_dataset
from simmstnet.data.grid import TrafficGrid
from simmstnet.data.telecom_italia import read_telecom_italia
from simmstnet.data.windows import BatchLoader, WindowDataset
from simmstnet.errors import UserError
from tests.conftest import make_grid
from tests.dataverse_server import FakeDataverse, FakeFile

# ----------------------------------------------------------------------------- raw Telecom Italia reader

MIDNIGHT = 1383606000  # 2013-11-05 00:00 Europe/Rome, epoch seconds


def _line(square, t_seconds, value):
    """One raw row: square, time (ms), country 39, sms_in sms_out call_in call_out internet."""
    return "\t".join([str(square), str(t_seconds * 1000), "39", "", "", "", "", repr(float(value))])


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _records(days, rng):
    """Rows over ``days`` local days from MIDNIGHT: (square, slot, value); square 1 every slot."""
    out = []
    for slot in range(days * 144):
        for sq in (1, 2, 102):
            if sq == 1 or rng.random() < 0.5:
                out.append((sq, slot, float(rng.integers(1, 100))))
    return out


def _reference(records, n_slots):
    """(n_slots, 2, 2) net sums at 10 minutes on the crop rows 0..1, cols 0..1."""
    ref = np.zeros((n_slots, 2, 2))
    for sq, slot, v in records:
        r, c = divmod(sq - 1, 100)
        if 0 <= slot < n_slots and r < 2 and c < 2:
            ref[slot, r, c] += v
    return ref


def test_rows_earlier_than_the_first_chunk_grow_the_buffer_backwards(tmp_path):
    rng = np.random.default_rng(0)
    records = _records(2, rng)
    # An unnamed file (no day in its name: no span known in advance) written day 2 first, then
    # day 1, read in small chunks: the buffer must grow before its first slot.
    ordered = [r for r in records if r[1] >= 144] + [r for r in records if r[1] < 144]
    path = _write(tmp_path / "export.txt", [_line(sq, MIDNIGHT + 600 * s, v) for sq, s, v in ordered])
    g = read_telecom_italia([path], "milano", step=600, rows=(0, 2), cols=(0, 2), services=("net",),
                            chunk_bytes=512)
    assert g.timestamps[0] == MIDNIGHT and g.shape[0] == 288
    np.testing.assert_allclose(g.values[..., 0], _reference(records, 288), rtol=1e-6)
    assert g.mask.all()


def test_end_date_is_exclusive(tmp_path):
    rng = np.random.default_rng(1)
    records = _records(3, rng)
    lines = [_line(sq, MIDNIGHT + 600 * s, v) for sq, s, v in records]
    # one unnamed file holding three days, and the same days as named daily files
    one = _write(tmp_path / "export.txt", lines)
    folder = tmp_path / "daily"
    folder.mkdir()
    for d in range(3):
        day = (dt.date(2013, 11, 5) + dt.timedelta(days=d)).isoformat()
        _write(folder / f"sms-call-internet-mi-{day}.txt",
               [_line(sq, MIDNIGHT + 600 * s, v) for sq, s, v in records if s // 144 == d])
    for src in ([one], folder):
        g = read_telecom_italia(src, "milano", step="1h", rows=(0, 2), cols=(0, 2), services=("net",),
                                start="2013-11-05", end="2013-11-07")
        assert g.shape[0] == 48
        assert g.timestamps[-1] == MIDNIGHT + 47 * 3600  # the last hour before 2013-11-07 00:00
        want = _reference(records, 288).reshape(48, 6, 2, 2).sum(1)
        np.testing.assert_allclose(g.values[..., 0], want, rtol=1e-6)
    assert g.meta["raw_files"] == ["sms-call-internet-mi-2013-11-05.txt", "sms-call-internet-mi-2013-11-06.txt"]



def test_start_and_end_together_keep_only_the_days_between(tmp_path):
    # Found by make mutate: with both bounds set, `keep = slot < end` (dropping the start test)
    # passed, since no other test had rows before --start together with an --end.
    rng = np.random.default_rng(2)
    records = _records(3, rng)
    one = _write(tmp_path / "export.txt", [_line(sq, MIDNIGHT + 600 * s, v) for sq, s, v in records])
    g = read_telecom_italia([one], "milano", step=600, rows=(0, 2), cols=(0, 2), services=("net",),
                            start="2013-11-06", end="2013-11-07")
    assert g.shape[0] == 144 and g.timestamps[0] == MIDNIGHT + 86400
    np.testing.assert_allclose(g.values[..., 0], _reference(records, 288)[144:], rtol=1e-6)


@pytest.mark.parametrize("offset, ok", [
    (-86400, True),               # the previous local day's first slot: accepted
    (-86400 - 600, False),        # one slot earlier: refused
    (2 * 86400 - 600, True),      # the next local day's last slot: accepted
    (2 * 86400, False),           # two days after the named day: refused
])
def test_rows_more_than_a_day_from_the_files_date_are_refused(tmp_path, offset, ok):
    lines = [_line(1, MIDNIGHT + 600 * s, 1.0) for s in range(144)] + [_line(1, MIDNIGHT + offset, 5.0)]
    _write(tmp_path / "sms-call-internet-mi-2013-11-05.txt", lines)
    if ok:
        g = read_telecom_italia(tmp_path, "milano", step=600, rows=(0, 1), cols=(0, 1), services=("net",))
        i = int(np.flatnonzero(g.timestamps == MIDNIGHT + offset)[0])
        assert g.values[i, 0, 0, 0] == 5.0
    else:
        with pytest.raises(UserError, match="more than a day away"):
            read_telecom_italia(tmp_path, "milano", step=600, rows=(0, 1), cols=(0, 1), services=("net",))


def test_raw_reader_reads_in_bounded_chunks_of_whole_lines():
    # Found by make mutate (2026-12-06): reading the whole stream at once passed every test.
    import io

    from simmstnet.data.telecom_italia import _iter_chunks

    lines = [f"{i}\t1383260400000\t39\t{i}.5\t\t\t\t\t{'x' * (i % 7)}\n" for i in range(1, 60)]
    lines[10] = "1\t" + "9" * 300 + "\n"  # one line longer than a chunk: kept whole
    data = "".join(lines).encode()
    chunks = list(_iter_chunks(io.BytesIO(data), "f", chunk_bytes=128))
    assert len(chunks) > 10 and b"".join(c for c, _ in chunks) == data
    line = 1
    for chunk, first in chunks:
        assert chunk.endswith(b"\n") and first == line
        assert len(chunk) <= 128 + 300  # a chunk holds at most one read beyond the long line
        line += chunk.count(b"\n")


def test_raw_value_diagnosis_accepts_decimals_and_empty_activity_fields():
    from simmstnet.data.telecom_italia import _diagnose_values
    from simmstnet.errors import UserError

    _diagnose_values(b"1\t1383260400000\t39\t1.5\t\t0.25\t\t3e2\r\n2\t1383260400000\t0\t\t\t\t\t\n", "f", 1)
    with pytest.raises(UserError, match=r"f:2: country_code is '3\.5', expected an integer"):
        _diagnose_values(b"1\t1383260400000\t39\t1.5\n1\t1383260400000\t3.5\t1\n", "f", 1)
    with pytest.raises(UserError, match=r"f:1: sms_out is 'n/a', expected a number or empty"):
        _diagnose_values(b"1\t1383260400000\t39\t1.5\tn/a\n", "f", 1)


def test_raw_files_given_one_by_one_take_their_day_from_the_name(tmp_path):
    import datetime as dt

    from simmstnet.data.telecom_italia import _resolve_files

    paths = []
    for day in ("2013-11-02", "2013-11-01"):
        p = tmp_path / f"sms-call-internet-mi-{day}.txt"
        p.write_text("")
        paths.append(p)
    other = tmp_path / "my-export.txt"
    other.write_text("")
    files, folder = _resolve_files([*paths, other], "milano")
    assert [f.day for f in files] == [dt.date(2013, 11, 2), dt.date(2013, 11, 1), None]
    assert folder == tmp_path


# ----------------------------------------------------------------------------- grid operations


def test_resample_aligns_on_epoch_multiples_of_the_new_step():
    start = 1383260400 + 20 * 60  # xx:20, not on an hour
    values = np.arange(1, 13, dtype=np.float32).reshape(12, 1, 1, 1)  # 12 ten-minute slots
    g = TrafficGrid.from_values(values, start=start, step=600, services=("net",))
    h = g.resample(3600)
    assert h.shape[0] == 1
    assert h.timestamps[0] % 3600 == 0 and h.timestamps[0] == start + 40 * 60
    assert h.values[0, 0, 0, 0] == sum(range(5, 11))  # slots xx+1:00 .. xx+1:50
    assert h.mask.all()


def test_crop_of_a_crop_records_the_offset_in_the_original_grid():
    g = make_grid(T=4, H=8, W=9)
    c1 = g.crop((2, 7), (1, 8))
    c2 = c1.crop((1, 4), (3, 6))
    c3 = c2.crop((1, 3), (0, 2))
    assert c2.meta["crop"] == {"rows": [3, 6], "cols": [4, 7]}
    assert c3.meta["crop"] == {"rows": [4, 6], "cols": [4, 6]}
    np.testing.assert_array_equal(c3.values, g.values[:, 4:6, 4:6])


def test_slice_time_stop_is_exclusive():
    g = make_grid(T=10)
    t = g.timestamps
    s = g.slice_time(int(t[2]), int(t[6]))
    np.testing.assert_array_equal(s.timestamps, t[2:6])
    np.testing.assert_array_equal(s.values, g.values[2:6])
    assert g.slice_time(None, int(t[1])).shape[0] == 1
    with pytest.raises(UserError):
        g.slice_time(int(t[3]), int(t[3]))


# ----------------------------------------------------------------------------- loader sharding


def test_ddp_loader_with_drop_last_gives_every_rank_len_full_batches():
    grid = make_grid(T=30, H=2, W=3)
    ds = WindowDataset(grid, input_len=6, label_len=3, horizon=2, patch=1)
    n = len(ds)
    for world in (2, 3, 4):
        for bs in range(1, 13):
            counts = []
            seen: set = set()
            for rank in range(world):
                loader = BatchLoader(ds, bs, shuffle=True, seed=1, drop_last=True, rank=rank, world_size=world)
                batches = [b["index"].tolist() for b in loader]
                assert len(batches) == len(loader), (world, bs, rank)
                assert all(len(b) == bs for b in batches)
                flat = [i for b in batches for i in b]
                assert not seen & set(flat)
                seen |= set(flat)
                counts.append(len(batches))
            assert len(set(counts)) == 1, (world, bs, counts)
            assert counts[0] == (n // world) // bs


# ----------------------------------------------------------------------------- fetch


def _payload(size=30_000):
    return bytes((i * 7919 + 13) % 251 for i in range(size))


@pytest.fixture
def sleeps(monkeypatch):
    pauses = []
    monkeypatch.setattr(fetch_mod, "_sleep", pauses.append)
    return pauses


class _WrongStartServer:
    """Answers a Range request with a 206 starting at byte 0 (not the byte asked for), once;
    every other request gets the whole file with a 200."""

    def __init__(self, content: bytes):
        self.content, self.ranges = content, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                owner.ranges.append(rng)
                body = owner.content
                if rng and len(owner.ranges) == 1:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _unsized(file_id, name="day.txt"):
    """A remote file whose size and checksum are unknown (only the transfer can be checked)."""
    return RemoteFile(file_id, name, None, None, None, False, "doi:test")


def test_a_206_that_starts_elsewhere_than_asked_is_not_appended(tmp_path, sleeps):
    content = _payload()
    target = tmp_path / "day.txt"
    target.with_name("day.txt.part").write_bytes(content[:10_000])
    with _WrongStartServer(content) as srv:
        download_file(_unsized(1), target, server=srv.url, verify=False, progress=False, timeout=5)
    assert srv.ranges == ["bytes=10000-", None]  # refused, then restarted from byte 0
    assert target.read_bytes() == content


def test_a_truncated_body_is_caught_by_its_content_length(tmp_path, sleeps):
    content = _payload()
    with FakeDataverse() as dv:
        dv.add("doi:test", FakeFile(7, "day.txt", content, "MD5"))
        dv.fault(7, "drop")
        download_file(_unsized(7), tmp_path / "day.txt", server=dv.url, verify=False, progress=False,
                      timeout=5)
        ranges = [r[2] for r in dv.downloads(7)]
    assert ranges == [None, f"bytes={len(content) // 2}-"]
    assert (tmp_path / "day.txt").read_bytes() == content


def test_an_oversize_part_is_discarded_before_asking(tmp_path, sleeps):
    content = _payload()
    with FakeDataverse() as dv:
        dv.add("doi:test", FakeFile(8, "day.txt", content, "MD5"))
        remote = [f for f in list_dataset("doi:test", server=dv.url) if f.file_id == 8][0]
        target = tmp_path / "day.txt"
        target.with_name("day.txt.part").write_bytes(content + b"junk after the end")
        download_file(remote, target, server=dv.url, progress=False, timeout=5)
        assert [r[2] for r in dv.downloads(8)] == [None]  # one request, from byte 0
    assert sleeps == []
    assert target.read_bytes() == content


def test_backoff_pauses_are_capped(tmp_path, sleeps):
    content = _payload(1000)
    with FakeDataverse() as dv:
        dv.add("doi:test", FakeFile(9, "day.txt", content, "MD5"))
        remote = [f for f in list_dataset("doi:test", server=dv.url) if f.file_id == 9][0]
        dv.fault(9, *["503"] * 5)
        download_file(remote, tmp_path / "day.txt", server=dv.url, retries=5, backoff=20.0,
                      progress=False, timeout=5)
    assert sleeps[:2] == [20.0, 40.0]
    assert len(sleeps) == 5 and max(sleeps) <= 60.0 and sleeps[2:] == [60.0, 60.0, 60.0]
    assert (tmp_path / "day.txt").read_bytes() == content


# ----------------------------------------------------------------------------- windows (make mutate)
# Each fails with the data/windows mutant its comment names.

def test_window_sizes_at_their_lower_bounds_and_non_integers():
    grid = make_grid(T=40, H=3, W=3, seed=5)
    ds = WindowDataset(grid, input_len=1, label_len=0, horizon=1, patch=1)  # horizon >= 1, not 2
    assert len(ds) == 39 * 9 and ds.get_batch(np.array([0]))["y"].shape == (1, 1, 3)
    for kw in ({"input_len": 1.5}, {"horizon": 2.5}, {"stride": 0}):  # `or` kept, not `and`
        with pytest.raises(UserError, match="must be an integer"):
            WindowDataset(grid, **{"input_len": 4, "label_len": 0, "horizon": 2, **kw})


def test_cells_outside_the_grid_or_misshapen_are_refused():
    grid = make_grid(T=40, H=3, W=4, seed=5)
    kw = dict(input_len=4, label_len=0, horizon=2, patch=1)
    with pytest.raises(UserError, match="non-empty"):
        WindowDataset(grid, cells=np.array([1, 2]), **kw)  # 1-D: a UserError, not an IndexError
    for bad in ([[3, 0]], [[0, 4]], [[-1, 0]]):  # row == H and col == W are outside
        with pytest.raises(UserError):
            WindowDataset(grid, cells=np.array(bad), **kw)
    ds = WindowDataset(grid, cells=np.array([[2, 3]]), target_range=(10, 30), **kw)
    assert ds.target_range == (10, 30) and len(ds) == 30 - 10 - 2 + 1
    with pytest.raises(IndexError):
        ds.get_batch(np.array([len(ds)]))  # one past the end (an IndexError either way)
    ds.get_batch(np.array([len(ds) - 1]))


def test_split_dates_at_the_ends_of_the_grid():
    from simmstnet.data.windows import _split_bounds

    grid = make_grid(T=72, seed=1)  # hourly, 2013-11-01 00:00 .. 2013-11-03 23:00 Europe/Rome
    assert _split_bounds(grid, ("2013-11-02 00:00", "2013-11-03 00:00", "2013-11-04 00:00")) == (24, 48, 72)
    # the test span may start at the last step (one test step)
    assert _split_bounds(grid, ("2013-11-02 00:00", "2013-11-03 23:00")) == (24, 71, 72)
    with pytest.raises(UserError, match=r"outside the grid's time span 2013-11-01 00:00 \.\. 2013-11-04 00:00"):
        _split_bounds(grid, ("2013-11-02 00:00", "2013-11-04 00:00"))
    with pytest.raises(UserError, match="three positive numbers"):
        _split_bounds(grid, "0.8,0.2")  # two ratios: a UserError, not an IndexError


# ----------------------------------------------------------------------------- grid (make mutate)

def test_validate_refuses_repeated_or_misshapen_timestamps():
    grid = make_grid(T=6, H=2, W=2, seed=1)
    t = grid.timestamps.copy()
    t[3] = t[2]  # a repeated time step (d == 0) is not "strictly increasing"
    with pytest.raises(UserError, match="not strictly increasing at index 3"):
        TrafficGrid(grid.values, grid.mask, t, grid.services, dict(grid.meta)).validate()
    with pytest.raises(UserError, match="timestamps for 6 time steps"):
        TrafficGrid(grid.values, grid.mask, grid.timestamps[:, None], grid.services, dict(grid.meta)).validate()


def test_validate_checks_every_block_of_a_large_grid():
    # One time step above 2**23 entries: validate checks one step per block, so the second step
    # is a second block (values ~34 MB, checked in blocks to bound the temporaries).
    side = 2897  # 2897**2 = 8,392,609 > 2**23
    values = np.zeros((2, side, side, 1), dtype=np.float32)
    mask = np.ones(values.shape, dtype=bool)
    mask[1, 5, 8, 0] = False
    t = np.array([1383260400, 1383264000], dtype=np.int64)
    grid = TrafficGrid(values, mask, t, ("net",), {})
    grid.values[1, 5, 8, 0] = np.inf  # unobserved: allowed, stored as 0
    grid.values[1, 5, 7, 0] = np.nan
    with pytest.raises(UserError, match=r"non-finite value where observed at \(t=1, row=5, col=7"):
        grid.validate()
    grid.values[1, 5, 7, 0] = 1.0
    grid.validate()
    assert grid.values[1, 5, 8, 0] == 0.0


def test_crop_from_the_origin_and_step_in_meta(tmp_path):
    grid = make_grid(T=8, H=3, W=4, seed=2)
    assert grid.meta["step"] == "1h"
    part = grid.crop((0, 2), (0, 1))
    assert part.shape == (8, 2, 1, 3) and np.array_equal(part.values, grid.values[:, :2, :1])
    loaded = TrafficGrid.load(grid.save(tmp_path / "g.npz"))
    assert loaded.timestamps.dtype == np.int64 and loaded.values.dtype == np.float32
    assert loaded.meta["step"] == "1h"
