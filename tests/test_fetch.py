"""`simmstnet data fetch` against a local fake Dataverse (no outside network)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from simmstnet.cli import main
from simmstnet.data import fetch as fetch_mod
from simmstnet.data.fetch import (CITIES, default_cache_dir, download_file, fetch_city,
                                  fetch_dataset, list_dataset, resolve_server)
from simmstnet.errors import UserError
from tests.dataverse_server import FakeDataverse, FakeFile, free_port

MI = CITIES["milano"].telecom
TN = CITIES["trento"].telecom
TN_GRID = CITIES["trento"].grid
MI_GRID = CITIES["milano"].grid


def payload(seed: int, size: int = 50_000) -> bytes:
    """Deterministic bytes that differ per file (so a mix-up cannot pass the checksum)."""
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def milano_files() -> list:
    # Listed out of date order on purpose; one non-daily file; mixed checksum types.
    return [
        FakeFile(13, "sms-call-internet-mi-2013-11-03.txt", payload(13), "SHA-1"),
        FakeFile(11, "sms-call-internet-mi-2013-11-01.txt", payload(11), "MD5"),
        FakeFile(14, "sms-call-internet-mi-2013-11-04.txt", payload(14), "SHA-256"),
        FakeFile(12, "sms-call-internet-mi-2013-11-02.txt", payload(12), "MD5"),
        FakeFile(19, "README-milano.pdf", payload(19, 1000), "MD5"),
    ]


@pytest.fixture
def sleeps(monkeypatch):
    """Record backoff pauses instead of sleeping (keeps the tests fast and checks the schedule)."""
    pauses = []
    monkeypatch.setattr(fetch_mod, "_sleep", pauses.append)
    return pauses


@pytest.fixture
def dv():
    with FakeDataverse() as server:
        server.add(MI, *milano_files())
        yield server


def fetch(dv, tmp_path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.5)
    kw.setdefault("timeout", 5.0)
    return fetch_city(kw.pop("city", "milano"), dest=tmp_path, server=dv.url, **kw)


def test_downloads_every_daily_file_verified(dv, tmp_path, sleeps):
    result = fetch(dv, tmp_path)
    assert result.folder == tmp_path / "milano"
    names = [p.name for p in result.paths]
    assert names == [f"sms-call-internet-mi-2013-11-0{d}.txt" for d in (1, 2, 3, 4)]
    for f in milano_files()[:4]:
        assert (tmp_path / "milano" / f.name).read_bytes() == f.content
    assert result.ignored == ["README-milano.pdf"]
    assert not list((tmp_path / "milano").glob("*.part"))
    assert len(dv.downloads()) == 4 and sleeps == []


def test_days_keeps_the_first_dates_whatever_the_listing_order(dv, tmp_path):
    paths = fetch_dataset("milano", dest=tmp_path, days=2, server=dv.url, progress=False)
    assert [p.name for p in paths] == ["sms-call-internet-mi-2013-11-01.txt",
                                       "sms-call-internet-mi-2013-11-02.txt"]
    assert sorted(int(p.rsplit("/", 1)[1]) for p, _, _ in dv.downloads()) == [11, 12]
    # More days than the dataset holds: everything, no error.
    assert len(fetch(dv, tmp_path / "all", days=99).paths) == 4


def test_already_downloaded_files_are_skipped_without_a_request(dv, tmp_path):
    first = fetch(dv, tmp_path, days=2)
    assert len(first.downloaded) == 2
    n = len(dv.downloads())
    again = fetch(dv, tmp_path, days=2)
    assert again.downloaded == [] and len(again.skipped) == 2
    assert len(dv.downloads()) == n
    # Without the manifest the files are hashed, found good, and still not fetched again.
    (tmp_path / "milano" / fetch_mod.MANIFEST_NAME).unlink()
    assert len(fetch(dv, tmp_path, days=2).skipped) == 2
    assert len(dv.downloads()) == n
    # A copy damaged on disk (same size) is detected and fetched again.
    bad = tmp_path / "milano" / "sms-call-internet-mi-2013-11-02.txt"
    bad.write_bytes(b"x" * bad.stat().st_size)
    third = fetch(dv, tmp_path, days=2)
    assert [p.name for p in third.downloaded] == [bad.name]
    assert bad.read_bytes() == payload(12)


def test_corrupt_once_is_deleted_and_retried(dv, tmp_path, sleeps):
    dv.fault(11, "corrupt")
    result = fetch(dv, tmp_path, days=1)
    assert result.paths[0].read_bytes() == payload(11)
    assert len(dv.downloads(11)) == 2
    assert sleeps == [0.5]
    # The retry starts from byte 0: the bad bytes were thrown away, not resumed from.
    assert dv.downloads(11)[1][2] is None


def test_always_corrupt_fails_with_one_line_naming_the_file(dv, tmp_path, sleeps):
    dv.always_corrupt.add(11)
    with pytest.raises(UserError) as err:
        fetch(dv, tmp_path, days=1, retries=2)
    msg = str(err.value)
    assert "sms-call-internet-mi-2013-11-01.txt" in msg and "MD5" in msg and "\n" not in msg
    assert "3 attempts" in msg
    assert len(dv.downloads(11)) == 3
    assert sleeps == [0.5, 1.0]  # exponential backoff
    assert not any((tmp_path / "milano").iterdir())  # no bad file, no .part left behind


def test_no_verify_accepts_bytes_of_the_right_size(dv, tmp_path):
    dv.always_corrupt.add(11)
    result = fetch(dv, tmp_path, days=1, verify=False)
    assert result.paths[0].read_bytes() != payload(11)  # shows the check was really skipped
    assert len(dv.downloads(11)) == 1


def test_dropped_connection_resumes_with_a_range_request(dv, tmp_path, sleeps):
    dv.fault(12, "drop")
    fetch(dv, tmp_path, days=2)
    reqs = dv.downloads(12)
    assert len(reqs) == 2
    assert reqs[0][2] is None
    assert reqs[1][2] == f"bytes={len(payload(12)) // 2}-"
    assert (tmp_path / "milano" / "sms-call-internet-mi-2013-11-02.txt").read_bytes() == payload(12)
    assert sleeps == [0.5]


def test_partial_file_from_an_earlier_run_is_resumed(dv, tmp_path):
    folder = tmp_path / "milano"
    folder.mkdir()
    (folder / "sms-call-internet-mi-2013-11-01.txt.part").write_bytes(payload(11)[:12_345])
    fetch(dv, tmp_path, days=1)
    assert dv.downloads(11) == [("/api/access/datafile/11", "", "bytes=12345-")]
    assert (folder / "sms-call-internet-mi-2013-11-01.txt").read_bytes() == payload(11)


def test_server_ignoring_range_restarts_cleanly(dv, tmp_path):
    dv.ignore_range.add(11)
    folder = tmp_path / "milano"
    folder.mkdir()
    (folder / "sms-call-internet-mi-2013-11-01.txt.part").write_bytes(payload(11)[:20_000])
    fetch(dv, tmp_path, days=1)
    assert dv.downloads(11)[0][2] == "bytes=20000-"  # asked to resume, got a 200
    # The 200 body replaced the part instead of being appended to it.
    assert (folder / "sms-call-internet-mi-2013-11-01.txt").read_bytes() == payload(11)


def test_drop_then_ignored_range(dv, tmp_path, sleeps):
    dv.fault(11, "drop")
    dv.ignore_range.add(11)
    fetch(dv, tmp_path, days=1)
    assert [r[2] for r in dv.downloads(11)] == [None, f"bytes={len(payload(11)) // 2}-"]
    assert (tmp_path / "milano" / "sms-call-internet-mi-2013-11-01.txt").read_bytes() == payload(11)


def test_503_then_success_backs_off(dv, tmp_path, sleeps):
    dv.fault(11, "503", "503")
    fetch(dv, tmp_path, days=1, backoff=0.25)
    assert len(dv.downloads(11)) == 3
    assert sleeps == [0.25, 0.5]


def test_503_forever_gives_up_after_the_retries(dv, tmp_path, sleeps):
    dv.fault(11, *["503"] * 10)
    with pytest.raises(UserError, match=r"sms-call-internet-mi-2013-11-01\.txt.*HTTP 503.*2 attempts"):
        fetch(dv, tmp_path, days=1, retries=1)


def test_range_survives_a_redirect_to_the_object_store(tmp_path, sleeps):
    with FakeDataverse(redirect=True) as dv:
        dv.add(MI, *milano_files())
        dv.fault(11, "drop")
        fetch(dv, tmp_path, days=1)
        assert [r[2] for r in dv.downloads(11)] == [None, f"bytes={len(payload(11)) // 2}-"]
        assert all(r[0] == "/store/11" for r in dv.downloads(11))
    assert (tmp_path / "milano" / "sms-call-internet-mi-2013-11-01.txt").read_bytes() == payload(11)


def test_ingested_tables_are_fetched_as_originals(tmp_path):
    raw = b"1,1383260400000,39,0.1,,0.2,,3.5\n" * 200
    with FakeDataverse() as dv:
        dv.add(MI, FakeFile(21, "sms-call-internet-mi-2013-11-01.txt", raw, "MD5", tabular=True))
        files = list_dataset(MI, server=dv.url)
        assert files[0].name == "sms-call-internet-mi-2013-11-01.txt" and files[0].size == len(raw)
        paths = fetch_dataset("milano", dest=tmp_path, server=dv.url, progress=True)
        assert dv.downloads(21)[0][1] == "format=original"
    assert paths[0].read_bytes() == raw


def test_trento_fetches_the_grid_and_milano_only_on_request(tmp_path, capsys):
    grid = b'{"type": "FeatureCollection", "features": []}'
    with FakeDataverse() as dv:
        dv.add(TN, FakeFile(31, "sms-call-internet-tn-2013-11-01.txt", payload(31)),
               FakeFile(32, "sms-call-internet-tn-2013-11-02.txt", payload(32)))
        dv.add(TN_GRID, FakeFile(33, "trentino-grid.geojson", grid, "SHA-1"))
        dv.add(MI, *milano_files())
        dv.add(MI_GRID, FakeFile(34, "milano-grid.geojson", grid))
        result = fetch(dv, tmp_path, city="trento", days=1)
        assert sorted(p.name for p in result.paths) == ["sms-call-internet-tn-2013-11-01.txt",
                                                        "trentino-grid.geojson"]
        assert result.grid == [tmp_path / "trento" / "trentino-grid.geojson"]
        assert (tmp_path / "trento" / "trentino-grid.geojson").read_bytes() == grid
        assert [p.name for p in fetch(dv, tmp_path, days=1).paths] == [
            "sms-call-internet-mi-2013-11-01.txt"]
        assert "milano-grid.geojson" in [p.name for p in fetch(dv, tmp_path, days=1,
                                                                with_grid=True).paths]
        assert main(["data", "fetch", "trento", "--dest", str(tmp_path), "--server", dv.url,
                     "--days", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 downloaded, 2 already present" in out
    assert (f"next: simmstnet data prepare --raw {tmp_path / 'trento'} --city trento "
            f"--out trento.npz --grid {tmp_path / 'trento' / 'trentino-grid.geojson'}") in out


def test_unknown_dataset_and_bad_answers_are_user_errors(tmp_path):
    with FakeDataverse() as dv:  # no datasets at all: every listing is a 404
        with pytest.raises(UserError, match=r"cannot list dataset doi:10\.7910/DVN/EGZHFV.*HTTP 404"):
            fetch(dv, tmp_path)
    with pytest.raises(UserError, match="unknown city"):
        fetch_city("roma", dest=tmp_path)
    with pytest.raises(UserError, match="positive"):
        fetch_city("milano", dest=tmp_path, days=0, server="http://127.0.0.1:1")
    with pytest.raises(UserError, match="not an http"):
        resolve_server("ftp://example.org")


def test_cli_unreachable_server_exits_2_with_one_line(tmp_path, capsys, sleeps):
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["data", "fetch", "milano", "--dest", str(tmp_path), "--server", url,
                 "--retries", "2", "--backoff", "0.1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simmstnet: error: ")
    assert url in lines[0] and "EGZHFV" in lines[0] and "3 attempts" in lines[0]
    assert sleeps == [0.1, 0.2]


def test_cli_reports_and_prints_the_next_command(dv, tmp_path, capsys):
    args = ["data", "fetch", "milano", "--dest", str(tmp_path), "--server", dv.url,
            "--days", "2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 downloaded, 0 already present" in out
    assert f"next: simmstnet data prepare --raw {tmp_path / 'milano'} --city milano" in out
    assert "ODbL" in out
    assert main(args) == 0
    assert "0 downloaded, 2 already present" in capsys.readouterr().out


def test_cli_rejects_bad_days(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "fetch", "milano", "--days", "0"])
    assert exc.value.code == 2


def test_cache_folder_env_override(dv, tmp_path, monkeypatch):
    cache = tmp_path / "my-cache"
    monkeypatch.setenv("SIMMSTNET_CACHE", str(cache))
    assert default_cache_dir() == cache
    monkeypatch.setenv("SIMMSTNET_DATAVERSE_URL", dv.url)
    paths = fetch_dataset("milano", days=1, progress=False)  # no dest, no server given
    assert paths == [cache / "milano" / "sms-call-internet-mi-2013-11-01.txt"]


@pytest.mark.skipif(os.name == "nt" or os.uname().sysname == "Darwin", reason="XDG is for Linux")
def test_default_cache_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("SIMMSTNET_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "simmstnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "simmstnet"


def test_download_file_direct_use(dv, tmp_path):
    remote = [f for f in list_dataset(MI, server=dv.url) if f.file_id == 14][0]
    assert remote.checksum_type == "SHA-256" and remote.size == len(payload(14))
    target = tmp_path / "x" / "day.txt"
    assert download_file(remote, target, server=dv.url, progress=False) == "downloaded"
    assert download_file(remote, target, server=dv.url, progress=False) == "skipped"
    assert Path(target).read_bytes() == payload(14)


def test_local_problems_are_one_line_user_errors(dv, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create download folder"):
        fetch_city("milano", dest=blocker, server=dv.url, progress=False)
    with FakeDataverse() as only_docs:
        only_docs.add(MI, FakeFile(41, "README.pdf", b"doc"))
        with pytest.raises(UserError, match=r"no daily files.*README\.pdf"):
            fetch(only_docs, tmp_path)
