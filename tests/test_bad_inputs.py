"""Hostile and careless inputs through the command line: one clear line, exit 2, nothing left behind.

THE place for bad-input cases. Each row of ``CASES`` is a command line built in code (fixture
files are generated in ``tmp_path``), the substring its message must contain, and optionally
environment variables or module attributes to set. Every row is run in-process through
``simmstnet.cli.main`` and must give

* exit code 2,
* exactly one line on stderr, ``simmstnet: error: ...``, containing the expected text,
* no traceback,
* no new file or folder anywhere under ``tmp_path`` (no output, no run folder, no ``.part``).

To add a case: write a builder ``def _my_case(tmp, ctx) -> list[str]`` that creates its input
files under ``tmp`` and returns the argv, and append ``Case("group-what", _my_case, "text")``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from simmstnet.cli import main
from simmstnet.data.grid import TrafficGrid
from tests.conftest import make_grid
from tests.train_helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
START = 1383260400  # 2013-11-01 00:00 Europe/Rome
MI = "doi:10.7910/DVN/EGZHFV"  # the Milano telecom dataset (data fetch milano)


# ----------------------------------------------------------------------------- shared fixtures


class _Listing(ThreadingHTTPServer):
    """A Dataverse stand-in whose listing is whatever the current case puts in ``files``; every
    download streams zeros without a Content-Length until the client hangs up."""

    daemon_threads = True

    def __init__(self):
        self.files: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/api/datasets/"):
                    body = json.dumps({"status": "OK", "data": {"latestVersion": {"files": outer.files}}})
                    data = body.encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)  # HTTP/1.0, no length: the body ends when we close
                self.end_headers()
                chunk = b"\0" * 65536
                try:
                    for _ in range(512):  # 32 MiB at most, should the client not stop it
                        self.wfile.write(chunk)
                except OSError:
                    pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@dataclass
class Ctx:
    grid: Path        # a valid tiny TrafficGrid file
    run: Path         # a finished last-value run on it
    server: _Listing


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from simmstnet.train.trainer import Trainer

    root = tmp_path_factory.mktemp("bad-inputs")
    grid = make_grid(T=24 * 5, H=3, W=4, seed=3)
    path = grid.save(root / "grid.npz")
    run = root / "run"
    Trainer(tiny_config(run, f"data.path={path}", model="last-value"), progress=False, quiet=True).run()
    server = _Listing()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Ctx(path, run, server)
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- fixture files


def _npy_bytes(array: np.ndarray | None = None, header: dict | None = None, data: bytes = b"") -> bytes:
    """One .npy member: a real array, or a hand-made header followed by ``data``."""
    buf = io.BytesIO()
    if array is not None:
        np.lib.format.write_array(buf, array, allow_pickle=True)
    else:
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(data)
    return buf.getvalue()


def _grid_arrays(T: int = 4) -> dict[str, np.ndarray]:
    return {"values": np.ones((T, 2, 2, 1), np.float32), "mask": np.ones((T, 2, 2, 1), bool),
            "timestamps": START + 3600 * np.arange(T, dtype=np.int64), "services": np.array(["net"]),
            "meta": np.array(json.dumps({"timezone": "UTC"}))}


def _write_npz(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode) as zf:
        for name, data in members.items():
            zf.writestr(f"{name}.npy", data)
    return path


def _grid_with(tmp: Path, name: str = "bad.npz", compress: bool = False, **replace) -> Path:
    """A TrafficGrid file with some arrays replaced (an ndarray, or raw .npy bytes)."""
    arrays = _grid_arrays()
    members = {k: _npy_bytes(v) for k, v in arrays.items()}
    for k, v in replace.items():
        members[k] = v if isinstance(v, bytes) else _npy_bytes(v)
    return _write_npz(tmp / name, members, compress)


def _tiny_grid(tmp: Path, name: str = "g.npz") -> Path:
    return make_grid(T=24 * 5, H=3, W=4, seed=3).save(tmp / name)


def _run_copy(tmp: Path, ctx: Ctx) -> Path:
    run = tmp / "run"
    shutil.copytree(ctx.run, run)
    return run


def _csv(tmp: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _long_rows(times: list[str]) -> str:
    return "timestamp,row,col,service,value\n" + "".join(f"{t},0,0,net,1.5\n" for t in times)


def _fetch_argv(tmp: Path, ctx: Ctx, entry: dict) -> list[str]:
    ctx.server.files = [entry]
    dest = tmp / "cache"
    (dest / "milano").mkdir(parents=True)  # an existing cache folder; nothing new may appear in it
    return ["data", "fetch", "milano", "--dest", str(dest), "--server", ctx.server.url, "--days", "1",
            "--retries", "0", "--no-progress"]


def _fetch_entry(**data) -> dict:
    base = {"id": 5, "filename": "sms-call-internet-mi-2013-11-01.txt", "filesize": 10,
            "checksum": {"type": "MD5", "value": hashlib.md5(b"x").hexdigest()}}
    base.update(data)
    return {"label": base["filename"], "dataFile": {k: v for k, v in base.items() if v is not None}}


def _unwritable_dir(tmp: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: use /sys)."""
    if os.geteuid() != 0:
        ro = tmp / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            import tempfile

            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    pytest.skip("no unwritable folder found for this user")


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    argv: Callable[[Path, Ctx], list[str]]
    expect: str
    env: dict = field(default_factory=dict)
    patch: dict = field(default_factory=dict)   # "module:attribute" -> value


TRAIN = ["train.device=cpu", "model.name=last-value", "data.input_len=12", "data.label_len=6",
         "data.horizon=3", "data.patch=3"]


def _train(tmp: Path, ctx: Ctx, *extra: str) -> list[str]:
    return ["train", "--no-progress", f"data.path={ctx.grid}", *TRAIN, f"out={tmp / 'run'}", *extra]


CASES = [
    # 2. .npz headers are checked before anything is decompressed
    Case("2-forged-header-364TiB", lambda t, c: ["data", "info", str(_grid_with(
        t, values=_npy_bytes(header={"descr": "<f4", "fortran_order": False,
                                     "shape": (10**7, 1000, 1000, 10)}, data=b"\0" * 64)))],
         "declares shape (10000000, 1000, 1000, 10) (363.8 TiB) but the file holds 64 B of data"),
    Case("2-compressed-grid-over-memory-budget", lambda t, c: ["data", "info", str(_grid_with(
        t, compress=True, values=np.zeros((4, 512, 512, 4), np.float32),
        mask=np.zeros((4, 512, 512, 4), bool)))],
         "a grid of shape (4, 512, 512, 4) needs about 20.0 MiB of memory, more than the 8.0 MiB",
         env={"SIMMSTNET_MAX_MEMORY": "8M"}),
    Case("2-pickled-object-values", lambda t, c: ["data", "info", str(_grid_with(
        t, values=np.array([[[[{"x": 1}]]]], dtype=object)))],
         "array 'values' holds Python objects (pickled)"),
    Case("2-mask-shape-mismatch-before-load", lambda t, c: ["data", "info", str(_grid_with(
        t, mask=np.ones((4, 2, 3, 1), bool)))],
         "mask shape (4, 2, 3, 1) differs from values shape (4, 2, 2, 1)"),
    # 3. data fetch: a listing or a server that cannot be trusted
    Case("3-no-size-endless-download", lambda t, c: _fetch_argv(t, c, _fetch_entry(filesize=None)),
         "the server sent more than 1048576 bytes (the limit for a file of unknown size)",
         patch={"simmstnet.data.fetch:_MAX_DOWNLOAD": 1 << 20}),
    Case("3-unknown-checksum-type", lambda t, c: _fetch_argv(t, c, _fetch_entry(
        checksum={"type": "CRC32", "value": "abcd"})),
         "checksum type 'CRC32', which cannot be checked"),
    Case("3-no-checksum", lambda t, c: _fetch_argv(t, c, _fetch_entry(checksum=None)),
         "the listing gives no checksum; use --no-verify"),
    Case("3-non-integer-id", lambda t, c: _fetch_argv(t, c, _fetch_entry(id="12abc")),
         "a dataFile.id is '12abc' in the server's answer, not a non-negative whole number"),
    Case("3-non-integer-size", lambda t, c: _fetch_argv(t, c, _fetch_entry(filesize="10 MB")),
         "the size of file 5 is '10 MB'"),
    Case("3-nul-byte-in-name", lambda t, c: _fetch_argv(t, c, _fetch_entry(
        filename="sms-call-internet-mi-2013-11-01\0.txt")),
         "file 5 has no usable name"),
    # 4. batch sizes that silently gave zeros / nulls, or a traceback
    Case("4-predict-negative-batch", lambda t, c: ["predict", "--run", str(c.run), "--data", str(c.grid),
                                                   "--out", str(t / "fc.csv"), "--batch-size", "-5"],
         "--batch-size must be at least 1, got -5"),
    Case("4-predict-zero-batch", lambda t, c: ["predict", "--run", str(c.run), "--data", str(c.grid),
                                               "--out", str(t / "fc.csv"), "--batch-size", "0"],
         "--batch-size must be at least 1, got 0"),
    Case("4-evaluate-negative-batch", lambda t, c: ["evaluate", "--run", str(c.run), "--out", str(t / "m.json"),
                                                    "--batch-size", "-1"],
         "--batch-size must be at least 1, got -1"),
    # 5. implausible times
    Case("5-long-csv-epoch-ms", lambda t, c: ["data", "import", "--layout", "long", "--out", str(t / "o.npz"),
                                              "--csv", str(_csv(t, _long_rows(["1383260400000", "1383264000000"])))],
         "t.csv:2: timestamp '1383260400000' is not between 1970-01-01 and 2100-01-01 (it looks like "
         "epoch milliseconds, 2013-10-31; give epoch seconds)"),
    Case("5-long-csv-year-2999", lambda t, c: ["data", "import", "--layout", "long", "--out", str(t / "o.npz"),
                                               "--csv", str(_csv(t, _long_rows(
                                                   ["2013-11-01T00:00+01:00", "2013-11-01T01:00+01:00",
                                                    "2999-11-01T02:00+01:00"])))],
         "t.csv:4: timestamp '2999-11-01T02:00+01:00' is not between 1970-01-01 and 2100-01-01 (about year 2999)"),
    Case("5-wide-start-in-ms", lambda t, c: ["data", "import", "--layout", "wide", "--grid", "1x2", "--service",
                                             "net", "--step", "1h", "--start", "1383260400000",
                                             "--out", str(t / "o.npz"), "--csv", str(_csv(t, "1,2\n3,4\n"))],
         "--start 1383260400000 is not between 1970-01-01 and 2100-01-01 (it looks like epoch milliseconds"),
    Case("5-grid-file-year-2999", lambda t, c: ["data", "info", str(_grid_with(
        t, timestamps=32503680000 + 3600 * np.arange(4, dtype=np.int64)))],
         "timestamp 0 (32503680000) is not between 1970-01-01 and 2100-01-01 (about year 3000)"),
    # 6. config values that were silently accepted
    Case("6-empty-services", lambda t, c: _train(t, c, "data.services=[]"),
         "config key 'data.services' is an empty list"),
    Case("6-help-config-unknown-model", lambda t, c: ["train", "--help-config", "model.name=foo"],
         "--help-config model.name=foo: unknown model 'foo'"),
    Case("6-duplicate-yaml-key", lambda t, c: ["train", "--config", str(_csv(
        t, "train:\n  lr: 0.001\n  epochs: 2\n  lr: 0.01\n", "cfg.yaml")), f"out={t / 'run'}"],
         "cfg.yaml: line 4 invalid YAML (duplicate key 'lr' (first at line 2))"),
    Case("6-duplicate-yaml-section", lambda t, c: ["train", "--config", str(_csv(
        t, "train: {lr: 0.001}\ntrain: {epochs: 2}\n", "cfg.yaml")), f"out={t / 'run'}"],
         "duplicate key 'train' (first at line 1)"),
    Case("6-duplicate-key-in-override", lambda t, c: _train(t, c, "model.options={a: 1, a: 2}"),
         "cannot read the value of override 'model.options' as YAML: duplicate key 'a'"),
    Case("6-lr-inf", lambda t, c: _train(t, c, "train.lr=.inf"),
         "config key 'train.lr' must be a finite number, got inf"),
    Case("6-lr-nan", lambda t, c: _train(t, c, "train.lr=.nan"),
         "config key 'train.lr' must be a finite number, got nan"),
    # 7. checkpoints
    Case("7-zero-byte-best", lambda t, c: ["predict", "--run", str(_zero_best(t, c)), "--data", str(c.grid),
                                           "--out", str(t / "fc.csv")],
         "best.pt: cannot read checkpoint (empty file)"),
    Case("7-best-without-keys", lambda t, c: ["predict", "--run", str(_best_with(t, c, {"format": 1, "x": 1})),
                                              "--data", str(c.grid), "--out", str(t / "fc.csv")],
         "best.pt: not a best-model checkpoint (no 'model', 'model_name'"),
    Case("7-best-other-weights", lambda t, c: ["evaluate", "--run", str(_other_weights(t, c))],
         "best.pt: the weights do not fit model 'last-value' (Unexpected key(s) in state_dict"),
    Case("7-best-damaged-dims", lambda t, c: ["evaluate", "--run", str(_damaged_dims(t, c))],
         "best.pt: damaged checkpoint (TypeError"),
    # 8. output paths, checked before the work (data.path / --data missing: the output is named first)
    Case("8-predict-out-unwritable", lambda t, c: ["predict", "--run", str(c.run), "--data", str(t / "missing.npz"),
                                                   "--out", str(_unwritable_dir(t) / "sub" / "fc.csv")],
         "fc.csv: cannot write in"),
    Case("8-train-out-existing-file", lambda t, c: ["train", f"data.path={t / 'missing.npz'}", *TRAIN,
                                                    f"out={_csv(t, 'x', 'afile')}"],
         "afile: exists and is not a folder"),
    Case("8-train-out-unwritable", lambda t, c: ["train", f"data.path={t / 'missing.npz'}", *TRAIN,
                                                 f"out={_unwritable_dir(t) / 'run'}"],
         "run: cannot write in"),
    Case("8-evaluate-out-folder", lambda t, c: ["evaluate", "--run", str(c.run), "--data", str(t / "missing.npz"),
                                                "--out", str(t)],
         "is a folder, expected a file name"),
    Case("8-predict-out-folder", lambda t, c: ["predict", "--run", str(c.run), "--data", str(t / "missing.npz"),
                                               "--out", str(t)],
         "is a folder, expected a file name"),
    Case("8-import-out-under-a-file", lambda t, c: ["data", "import", "--layout", "long", "--csv",
                                                    str(_csv(t, _long_rows(["1383260400", "1383264000"]))),
                                                    "--out", str(_csv(t, "x", "afile") / "o.npz")],
         "afile is a file, not a folder"),
    Case("8-simulate-out-under-a-file", lambda t, c: ["simulate", "--rows", "2", "--cols", "2", "--days", "1",
                                                      "--out", str(_csv(t, "x", "afile") / "s.npz")],
         "afile is a file, not a folder"),
    # 9. unreadable grids and overflowing numbers
    Case("9-npy-renamed-npz", lambda t, c: ["data", "info", str(_npy_as_npz(t))],
         "is a plain .npy array, not a TrafficGrid .npz"),
    Case("9-not-a-zip", lambda t, c: ["data", "info", str(_csv(t, "hello", "x.npz"))],
         "x.npz: not a .npz file (not a zip archive)"),
    Case("9-string-values", lambda t, c: ["data", "info", str(_grid_with(
        t, values=np.full((4, 2, 2, 1), "abc")))],
         "array 'values' has dtype <U3; expected numbers"),
    Case("9-structured-values", lambda t, c: ["data", "info", str(_grid_with(
        t, values=np.zeros((4, 2, 2, 1), dtype=[("a", "<f4"), ("b", "<i4")])))],
         "array 'values' has dtype |V8 ([('a', '<f4'), ('b', '<i4')]); expected numbers"),
    Case("9-string-timestamps", lambda t, c: ["data", "info", str(_grid_with(
        t, timestamps=np.array(["2013-11-01"] * 4)))],
         "array 'timestamps' has dtype <U10; expected integer epoch seconds"),
    Case("9-timestamps-near-year-10000", lambda t, c: ["data", "info", str(_grid_with(
        t, timestamps=253402297200 + 3600 * np.arange(4, dtype=np.int64)))],
         "timestamp 0 (253402297200) is not between 1970-01-01 and 2100-01-01"),
    Case("9-timestamps-int64-max", lambda t, c: ["data", "info", str(_grid_with(
        t, timestamps=np.array([2**63 - 4, 2**63 - 3, 2**63 - 2, 2**63 - 1], dtype=np.int64)))],
         "timestamp 0 (9223372036854775804) is not between"),
    Case("9-import-step-overflow", lambda t, c: ["data", "import", "--layout", "wide", "--grid", "1x2",
                                                 "--service", "net", "--start", "2013-11-01 00:00",
                                                 "--step", "99999999999999999999d", "--out", str(t / "o.npz"),
                                                 "--csv", str(_csv(t, "1,2\n3,4\n"))],
         "step '99999999999999999999d' is longer than 366 days"),
    Case("9-simulate-step-overflow", lambda t, c: ["simulate", "--step", "99999999999999999999d",
                                                   "--out", str(t / "s.npz")],
         "step '99999999999999999999d' is longer than 366 days"),
    Case("9-import-start-overflow", lambda t, c: ["data", "import", "--layout", "wide", "--grid", "1x2",
                                                  "--service", "net", "--start", "99999999999999999999",
                                                  "--step", "1h", "--out", str(t / "o.npz"),
                                                  "--csv", str(_csv(t, "1,2\n3,4\n"))],
         "--start 99999999999999999999 is not between 1970-01-01 and 2100-01-01"),
    Case("9-import-start-year-9999-offset", lambda t, c: ["data", "import", "--layout", "wide", "--grid", "1x2",
                                                          "--service", "net", "--start", "9999-12-31T23:00-05:00",
                                                          "--step", "1h", "--out", str(t / "o.npz"),
                                                          "--csv", str(_csv(t, "1,2\n3,4\n"))],
         "--start '9999-12-31T23:00-05:00'"),
    Case("9-import-last-row-past-range", lambda t, c: ["data", "import", "--layout", "wide", "--grid", "1x2",
                                                       "--service", "net", "--start", "2099-12-31 23:00",
                                                       "--step", "1h", "--out", str(t / "o.npz"),
                                                       "--csv", str(_csv(t, "1,2\n3,4\n"))],
         "t.csv:2: the time of the last row (--start + 1 x --step 1h) is not between"),
    Case("9-simulate-start-year-2999", lambda t, c: ["simulate", "--rows", "2", "--cols", "2", "--days", "1",
                                                     "--start", "2999-01-01", "--out", str(t / "s.npz")],
         "--start 2999-01-01 is not between 1970-01-01 and 2100-01-01"),
    Case("9-simulate-start-overflow", lambda t, c: ["simulate", "--start", "99999999999999999999",
                                                    "--out", str(t / "s.npz")],
         "--start: cannot read '99999999999999999999' as a date"),
    Case("9-train-step-overflow", lambda t, c: _train(t, c, "data.step=99999999999999999999d"),
         "step '99999999999999999999d' is longer than 366 days"),
    # 10. simulate: refuse before allocating, with the figure
    Case("10-simulate-1000x1000x62d", lambda t, c: ["simulate", "--rows", "1000", "--cols", "1000", "--days", "62",
                                                    "--out", str(t / "s.npz")],
         "simulating 1 x 1000x1000 squares x 1488 steps x 3 services (output 20.8 GiB per scenario) needs "
         "about 87.3 GiB of memory, more than the 24.0 GiB $SIMMSTNET_MAX_MEMORY",
         env={"SIMMSTNET_MAX_MEMORY": "24G"}),
    Case("10-simulate-beyond-any-machine", lambda t, c: ["simulate", "--rows", "1000", "--cols", "1000",
                                                         "--days", "3000", "--out", str(t / "s.npz")],
         "of memory, more than the"),
    Case("10-simulate-workers-multiply", lambda t, c: ["simulate", "--rows", "100", "--cols", "100", "--days", "30",
                                                       "--scenarios", "8", "--workers", "8", "--out", str(t / "sims")],
         "simulating 8 x 100x100 squares x 720 steps x 3 services (output 103.0 MiB per scenario) needs about "
         "3.4 GiB of memory, more than the 2.0 GiB $SIMMSTNET_MAX_MEMORY",
         env={"SIMMSTNET_MAX_MEMORY": "2G"}),
    Case("10-simulate-small-over-budget", lambda t, c: ["simulate", "--rows", "10", "--cols", "10", "--days", "2",
                                                        "--out", str(t / "s.npz")],
         "simulating 1 x 10x10 squares x 48 steps x 3 services (output 70.3 KiB per scenario) needs about "
         "295.3 KiB of memory, more than the 100.0 KiB $SIMMSTNET_MAX_MEMORY",
         env={"SIMMSTNET_MAX_MEMORY": "100K"}),
    Case("extra-simulate-negative-seed", lambda t, c: ["simulate", "--rows", "2", "--cols", "2", "--days", "1",
                                                    "--seed", "-1", "--out", str(t / "s.npz")],
         "--seed must be 0 or more, got -1"),
    Case("10-simulate-days-1e6", lambda t, c: ["simulate", "--days", "1e6", "--out", str(t / "s.npz")],
         "the last time step (--start 2013-11-01 + --days 1e+06) is not between 1970-01-01 and 2100-01-01"),
    Case("10-simulate-days-inf", lambda t, c: ["simulate", "--days", "inf", "--out", str(t / "s.npz")],
         "--days must be a positive finite number, got inf"),
]


def _zero_best(tmp: Path, ctx: Ctx) -> Path:
    run = _run_copy(tmp, ctx)
    (run / "best.pt").write_bytes(b"")
    return run


def _best_with(tmp: Path, ctx: Ctx, state: dict) -> Path:
    run = _run_copy(tmp, ctx)
    torch.save(state, run / "best.pt")
    return run


def _other_weights(tmp: Path, ctx: Ctx) -> Path:
    state = torch.load(ctx.run / "best.pt", weights_only=True)
    state["model"] = {"encoder.weight": torch.zeros(4, 4)}  # another model's weights
    return _best_with(tmp, ctx, state)


def _damaged_dims(tmp: Path, ctx: Ctx) -> Path:
    state = torch.load(ctx.run / "best.pt", weights_only=True)
    state["dims"] = {"rows": 3}
    return _best_with(tmp, ctx, state)


def _npy_as_npz(tmp: Path) -> Path:
    path = tmp / "plain.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.ones((4, 2, 2, 1), np.float32))
    return path


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_leaves_nothing(case, ctx, tmp_path, capsys, monkeypatch):
    import importlib

    argv = case.argv(tmp_path, ctx)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    for target, value in case.patch.items():
        module, attr = target.split(":")
        monkeypatch.setattr(importlib.import_module(module), attr, value)
    monkeypatch.chdir(tmp_path)  # a default output (runs/...) would land here and be seen
    before = _tree(tmp_path)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("simmstnet: error: "), err
    assert case.expect in lines[0], lines[0]
    assert _tree(tmp_path) == before, sorted(_tree(tmp_path) - before)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- cases needing a subprocess


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    """A write that hits the file-size limit (ulimit -f, like a full disk) is one line, exit 2."""
    csv = _csv(tmp_path, "\n".join(",".join(["1.5"] * 100) for _ in range(200)) + "\n")
    out = tmp_path / "o.npz"
    before = _tree(tmp_path)

    def limit():  # the .npz is ~80 kB; the CSV and the code are only read
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    proc = subprocess.run(
        [sys.executable, "-m", "simmstnet", "data", "import", "--layout", "wide", "--grid", "10x10",
         "--service", "net", "--start", "2013-11-01 00:00", "--step", "1h", "--csv", str(csv), "--out", str(out)],
        capture_output=True, text=True, preexec_fn=limit, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"simmstnet: error: {out}: cannot write (File too large)"), lines[0]
    assert _tree(tmp_path) == before


def test_checkpoint_write_past_the_file_size_limit_is_a_user_error(tmp_path):
    """torch.save under ulimit -f fails with a RuntimeError; the run gets one line instead."""
    code = ("import sys, torch\n"
            "from simmstnet.errors import UserError\n"
            "from simmstnet.train.checkpoint import save_checkpoint\n"
            "try:\n"
            "    save_checkpoint(sys.argv[1], {'x': torch.zeros(100000)})\n"
            "except UserError as exc:\n"
            "    print(exc)\n")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))

    target = tmp_path / "best.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith(f"{target}: cannot write the checkpoint"), proc.stdout
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the fixes at their depth


def test_npz_header_refusal_reads_no_array_data(tmp_path, monkeypatch):
    """The memory check happens on the headers alone: no array is decompressed first."""
    path = _grid_with(tmp_path, compress=True, values=np.zeros((4, 256, 256, 2), np.float32),
                      mask=np.zeros((4, 256, 256, 2), bool))
    monkeypatch.setenv("SIMMSTNET_MAX_MEMORY", "1M")

    def no_read(*args, **kwargs):
        raise AssertionError("array data read before the header checks")

    monkeypatch.setattr(np.lib.format, "read_array", no_read)
    from simmstnet.errors import UserError

    with pytest.raises(UserError, match="needs about"):
        TrafficGrid.load(path)


def test_grid_within_budget_still_loads(tmp_path, monkeypatch):
    grid = make_grid(T=24, H=2, W=3)
    path = grid.save(tmp_path / "g.npz", compress=True)
    monkeypatch.setenv("SIMMSTNET_MAX_MEMORY", "1M")
    back = TrafficGrid.load(path)
    np.testing.assert_array_equal(back.values, grid.values)
    np.testing.assert_array_equal(back.timestamps, grid.timestamps)


def test_validate_rejects_times_outside_the_range():
    from simmstnet.errors import UserError

    with pytest.raises(UserError, match="looks like epoch milliseconds"):
        TrafficGrid.from_values(np.ones((2, 1, 1, 1)), start=START * 1000, step=3600, services=("net",))
    # the edges of the range are accepted
    TrafficGrid.from_values(np.ones((2, 1, 1, 1)), start=0, step=3600, services=("net",))
    TrafficGrid.from_values(np.ones((2, 1, 1, 1)), start=4102444800 - 7200, step=3600, services=("net",))


def test_fetch_verified_means_every_file_was_checked(tmp_path, capsys):
    """With checksums the listing gives, 'verified' is printed only after a real check."""
    from tests.dataverse_server import FakeDataverse, FakeFile

    content = b"day one\n" * 100
    with FakeDataverse() as dv:
        dv.add(MI, FakeFile(5, "sms-call-internet-mi-2013-11-01.txt", content, "SHA-256"))
        assert main(["data", "fetch", "milano", "--dest", str(tmp_path), "--server", dv.url,
                     "--no-progress", "--retries", "0"]) == 0
    assert "(verified)" in capsys.readouterr().out
    assert (tmp_path / "milano" / "sms-call-internet-mi-2013-11-01.txt").read_bytes() == content


def test_fetch_no_verify_accepts_unknown_checksum_type(tmp_path, capsys):
    """--no-verify is the way to take a file whose checksum cannot be checked (size only)."""
    from tests.dataverse_server import FakeDataverse, FakeFile

    class CrcFile(FakeFile):
        def entry(self) -> dict:
            entry = super().entry()
            entry["dataFile"]["checksum"] = {"type": "CRC32", "value": "abcd"}
            entry["dataFile"].pop("md5", None)
            return entry

    content = b"day one\n" * 100
    with FakeDataverse() as dv:
        dv.add(MI, CrcFile(5, "sms-call-internet-mi-2013-11-01.txt", content, "MD5"))
        argv = ["data", "fetch", "milano", "--dest", str(tmp_path), "--server", dv.url, "--no-progress",
                "--retries", "0"]
        assert main(argv) == 2
        assert not (tmp_path / "milano").exists()
        assert main(argv + ["--no-verify"]) == 0
    assert "(size checked, checksum not verified)" in capsys.readouterr().out
    assert (tmp_path / "milano" / "sms-call-internet-mi-2013-11-01.txt").read_bytes() == content


def test_unwritable_output_is_checked_before_the_work(tmp_path, monkeypatch):
    """train with an impossible out= never reads the data (the check comes first)."""
    import simmstnet.train.trainer as trainer_mod

    called = []
    monkeypatch.setattr(trainer_mod, "prepare_data", lambda *a, **k: called.append(1))
    target = _csv(tmp_path, "x", "afile")
    assert main(["train", f"data.path={_tiny_grid(tmp_path)}", *TRAIN, f"out={target}"]) == 2
    assert called == []


def test_torch_floor_is_past_known_weights_only_bypasses():
    """pyproject's torch floor excludes versions whose torch.load(weights_only=True) can be
    bypassed: CVE-2025-32434 (< 2.6) and CVE-2026-24747 (< 2.10)."""
    import re

    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert m, "no torch floor in pyproject.toml"
    assert (int(m.group(1)), int(m.group(2))) >= (2, 10)


# ----------------------------------------------------------------------------- fuzz


def test_fuzz_importers_and_npz_loader(tmp_path_factory):
    """Random CSV text and damaged .npz bytes: a grid or a UserError, never another exception,
    within a memory budget and a time bound."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from simmstnet.data.importers import import_long_csv, import_wide_csv
    from simmstnet.errors import UserError

    root = tmp_path_factory.mktemp("fuzz")
    make_grid(T=6, H=2, W=2, services=("net",)).save(root / "seed.npz")
    good = (root / "seed.npz").read_bytes()
    field_text = st.one_of(st.integers(-5, 10**14).map(str), st.floats(allow_nan=True).map(str),
                           st.sampled_from(["", "nan", "2013-11-01T00:00+01:00", "2999-01-01", "x",
                                            "9999-12-31T23:59-12:00", "net", "sms", "1e400"]))
    row = st.lists(field_text, min_size=1, max_size=6).map(",".join)
    csv_text = st.lists(row, min_size=0, max_size=8).map("\n".join)

    @settings(max_examples=60, deadline=2000, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(body=csv_text, header=st.sampled_from(["timestamp,row,col,service,value", "row,col", ""]),
           flips=st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)), max_size=6),
           cut=st.integers(0, len(good)))
    def check(body, header, flips, cut):
        os.environ["SIMMSTNET_MAX_MEMORY"] = "64M"
        try:
            path = root / "f.csv"
            path.write_text(header + "\n" + body if header else body)
            for call in (lambda: import_long_csv(path, tz="Europe/Rome"),
                         lambda: import_wide_csv(path, grid="1x2", service="net", start="2013-11-01 00:00")):
                try:
                    call()
                except UserError:
                    pass
            data = bytearray(good[:cut] if cut < len(good) // 2 else good)
            for pos, x in flips:
                if pos < len(data):
                    data[pos] ^= x
            npz = root / "f.npz"
            npz.write_bytes(bytes(data))
            try:
                TrafficGrid.load(npz)
            except UserError:
                pass
        finally:
            os.environ.pop("SIMMSTNET_MAX_MEMORY", None)

    check()
