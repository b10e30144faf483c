"""Download the Telecom Italia Big Data Challenge files from Harvard Dataverse.

The data (Barlacchi et al., "A multi-source dataset of urban life in the city of Milan and the
Province of Trentino", Scientific Data 2, 150055, 2015) is released under the Open Database
License (ODbL); whoever uses it must attribute it.

What this module relies on (Dataverse API Guide, guides.dataverse.org: Native API and Data
Access API; the file JSON written by IQSS/dataverse ``JsonPrinter``):

* ``GET {server}/api/datasets/:persistentId/?persistentId=doi:...`` answers
  ``{"status": "OK", "data": {"latestVersion": {"files": [...]}}}``, one entry per file:
  ``{"label": <name in this version>, "dataFile": {"id", "filename", "filesize",
  "checksum": {"type", "value"}, "md5" (older servers), and for files that Dataverse ingested
  as tables also "originalFileName", "originalFileSize", "originalFileFormat", "tabularData"}}``.
* ``GET {server}/api/access/datafile/{id}`` returns the file's bytes (Harvard answers with a
  redirect to its object store; urllib follows it and keeps our ``Range`` header). For an
  ingested table the default is a generated tab-separated copy; ``?format=original`` returns
  the uploaded bytes. The checksum Dataverse records for an ingested file is that of the saved
  original (IQSS/dataverse issue 7275, pull request 8901), so tables are always fetched with
  ``format=original`` and checked against ``originalFileSize``.
* ``checksum.type`` is one of ``MD5``, ``SHA-1``, ``SHA-256``, ``SHA-512``.
* Resuming sends ``Range: bytes=N-``; a ``206`` whose ``Content-Range`` starts at N is appended
  to the ``.part`` file, a ``200`` (server ignores ranges) restarts the file from scratch.

Files land as ``DEST/<city>/<filename>``; a small manifest (``.simmstnet-fetch.json``) beside
them remembers which files were verified, so a rerun skips them without hashing gigabytes
again.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from simmstnet.errors import UserError
from simmstnet.utils import atomic_path

__all__ = [
    "DEFAULT_SERVER", "CITIES", "RemoteFile", "FetchResult", "default_cache_dir",
    "resolve_server", "list_dataset", "select_days", "download_file", "fetch_city",
    "fetch_dataset",
]

DEFAULT_SERVER = "https://dataverse.harvard.edu"
SERVER_ENV = "SIMMSTNET_DATAVERSE_URL"
CACHE_ENV = "SIMMSTNET_CACHE"
MANIFEST_NAME = ".simmstnet-fetch.json"
ATTRIBUTION = ("Telecom Italia Big Data Challenge (Barlacchi et al., Scientific Data 2, 150055, "
               "2015), Open Database License (ODbL)")

_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
# Most bytes one file may take when neither the listing nor the server says how long it is (the
# largest Telecom Italia file is ~0.5 GB): a server that never stops cannot fill the disk.
_MAX_DOWNLOAD = 8 << 30
_MAX_DELAY = 60.0  # cap on one backoff pause, so a long retry series never sleeps for minutes
_HASHES = {"MD5": "md5", "SHA-1": "sha1", "SHA1": "sha1", "SHA-256": "sha256", "SHA256": "sha256",
           "SHA-512": "sha512", "SHA512": "sha512"}
_DATE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)")
_sleep = time.sleep  # module-level so tests can record the backoff pauses instead of waiting


@dataclass(frozen=True)
class CitySource:
    """The Dataverse datasets one city needs."""

    telecom: str            # DOI of the daily telecom activity files
    grid: str               # DOI of the grid GeoJSON
    grid_required: bool     # whether `data prepare` cannot place squares without the grid


CITIES = {
    # Milano squares follow id = 100*row + col + 1, so the grid file is optional there.
    "milano": CitySource(telecom="doi:10.7910/DVN/EGZHFV", grid="doi:10.7910/DVN/QJWLFU",
                         grid_required=False),
    # Trentino squares sit on an irregular raster: the GeoJSON is the only square-to-cell map.
    "trento": CitySource(telecom="doi:10.7910/DVN/QLCABU", grid="doi:10.7910/DVN/FZRVSX",
                         grid_required=True),
}


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file of a Dataverse dataset (the original bytes for ingested tables)."""

    file_id: int
    name: str
    size: int | None
    checksum_type: str | None   # as Dataverse writes it: "MD5", "SHA-1", ...
    checksum: str | None
    original: bool              # ingested table: ask for ?format=original
    doi: str

    def url(self, server: str) -> str:
        url = f"{server}/api/access/datafile/{self.file_id}"
        return url + "?format=original" if self.original else url

    @property
    def date(self) -> str | None:
        """The ``YYYY-MM-DD`` date in the file name, or None for non-daily files."""
        m = _DATE.search(self.name)
        return "-".join(m.groups()) if m else None


@dataclass
class FetchResult:
    """What :func:`fetch_city` did: every file's local path and whether it was downloaded."""

    city: str
    folder: Path
    server: str
    downloaded: list = field(default_factory=list)   # Paths fetched in this run
    skipped: list = field(default_factory=list)      # Paths already complete (and verified)
    ignored: list = field(default_factory=list)      # remote names not needed (not daily files)
    grid: list = field(default_factory=list)         # Paths of grid files among the above

    @property
    def paths(self) -> list:
        return sorted(self.downloaded + self.skipped)


class _NetworkError(Exception):
    """A failure worth retrying: connection refused/reset, timeout, 5xx, truncated body."""


class _ChecksumMismatch(Exception):
    """The downloaded bytes do not match the size or checksum Dataverse reports."""


# --------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """Root folder for downloads: ``$SIMMSTNET_CACHE``, else the platform's user cache folder.

    Linux and others: ``$XDG_CACHE_HOME/simmstnet`` or ``~/.cache/simmstnet``; macOS:
    ``~/Library/Caches/simmstnet``; Windows: ``%LOCALAPPDATA%\\simmstnet\\Cache``.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "simmstnet" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "simmstnet"
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "simmstnet"


def resolve_server(server: str | None = None) -> str:
    """The Dataverse base URL: the argument, else ``$SIMMSTNET_DATAVERSE_URL``, else Harvard."""
    url = server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserError(f"server {url!r} is not an http(s) URL, e.g. {DEFAULT_SERVER}")
    return url.rstrip("/")


# --------------------------------------------------------------------------- HTTP helpers


def _request(url: str, headers: dict | None = None) -> urllib.request.Request:
    from simmstnet import __version__

    req = urllib.request.Request(url, headers={"User-Agent": f"simmstnet/{__version__}"})
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    return req


def _one_line(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) if isinstance(exc, urllib.error.URLError) else None
    text = str(reason if reason is not None else exc) or type(exc).__name__
    return " ".join(text.split())


def _open(url: str, headers: dict | None, timeout: float, what: str):
    """urlopen that sorts failures: retryable ones become _NetworkError, the rest UserError."""
    try:
        return urllib.request.urlopen(_request(url, headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code >= 500 or exc.code in (408, 429):
            raise _NetworkError(f"HTTP {exc.code} {exc.reason}") from None
        if exc.code == 416:  # handled by the caller (range past the end)
            raise
        raise UserError(f"{what}: {url} answered HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, refused, reset, timeout
        raise _NetworkError(_one_line(exc)) from None


T = TypeVar("T")


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def _with_retries(action: Callable[[], T], retries: int, backoff: float,
                  on_fail: Callable[[str, int], str]) -> T:
    """Run ``action``; on _NetworkError/_ChecksumMismatch wait backoff*2**k and try again.

    ``retries`` counts the extra attempts after the first; ``on_fail(reason, attempts)`` builds
    the final one-line UserError message.
    """
    attempt = 0
    while True:
        try:
            return action()
        except (_NetworkError, _ChecksumMismatch) as exc:
            attempt += 1
            if attempt > retries:
                raise UserError(on_fail(str(exc), attempt)) from None
            _sleep(min(backoff * 2 ** (attempt - 1), _MAX_DELAY))


# --------------------------------------------------------------------------- listing


def _listing_int(value, doi: str, what: str) -> int:
    """A non-negative integer of the listing (JSON number or digits), else UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, str) and not value.strip().isdigit()) or int(value) < 0:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise UserError(f"dataset {doi}: {what} is {shown} in the server's answer, not a "
                        "non-negative whole number")
    return int(value)


def _parse_file(entry: dict, doi: str) -> RemoteFile:
    if not isinstance(entry, dict):
        raise UserError(f"dataset {doi}: a file entry of the server's answer is not a JSON object")
    data = entry.get("dataFile") or {}
    if not isinstance(data, dict) or "id" not in data:
        raise UserError(f"dataset {doi}: file entry without dataFile.id in the server's answer")
    file_id = _listing_int(data["id"], doi, "a dataFile.id")
    original = bool(data.get("tabularData") or data.get("originalFileFormat")
                    or data.get("originalFileName"))
    if original:
        name = data.get("originalFileName") or entry.get("label") or data.get("filename")
        size = data.get("originalFileSize")
    else:
        name = entry.get("label") or data.get("filename")
        size = data.get("filesize")
    checksum = data.get("checksum") or {}
    if not isinstance(checksum, dict):
        checksum = {}
    ctype, cvalue = checksum.get("type"), checksum.get("value")
    if not cvalue and data.get("md5"):  # servers older than the "checksum" object
        ctype, cvalue = "MD5", data["md5"]
    # Never let a remote name escape the destination folder.
    safe = Path(str(name or "")).name
    if not safe or safe in (".", "..") or any(ord(ch) < 32 or ord(ch) == 127 for ch in safe):
        raise UserError(f"dataset {doi}: file {file_id} has no usable name ({name!r})")
    return RemoteFile(file_id=file_id, name=safe,
                      size=_listing_int(size, doi, f"the size of file {file_id}") if size is not None else None,
                      checksum_type=str(ctype).upper() if ctype else None,
                      checksum=str(cvalue).lower() if cvalue else None,
                      original=original, doi=doi)


def list_dataset(doi: str, server: str | None = None, retries: int = 5, backoff: float = 1.0,
                 timeout: float = 60.0) -> list:
    """Files of the latest version of dataset ``doi`` (a list of :class:`RemoteFile`)."""
    server = resolve_server(server)
    url = f"{server}/api/datasets/:persistentId/?" + urllib.parse.urlencode({"persistentId": doi})
    what = f"cannot list dataset {doi}"

    def attempt() -> bytes:
        with _open(url, None, timeout, what) as resp:
            try:
                return resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise _NetworkError(_one_line(exc)) from None

    body = _with_retries(attempt, retries, backoff,
                         lambda reason, n: f"{what} on {server}: {reason} (gave up after {_attempts(n)})")
    try:
        payload = json.loads(body.decode("utf-8"))
        files = payload["data"]["latestVersion"]["files"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{what}: {url} did not answer with Dataverse dataset JSON "
                        f"(data.latestVersion.files)") from None
    if payload.get("status", "OK") != "OK":
        raise UserError(f"{what}: server status {payload.get('status')!r}: {payload.get('message', '')}")
    return [_parse_file(entry, doi) for entry in files]


def select_days(files: Iterable[RemoteFile], days: int | None = None) -> tuple:
    """Split a telecom listing into (daily files to fetch, non-daily names ignored).

    Daily files are those with a ``YYYY-MM-DD`` date in their name; ``days=N`` keeps the files
    of the first N distinct dates (chronological, whatever the listing order).
    """
    files = list(files)
    if days is not None and days < 1:
        raise UserError(f"--days must be a positive number of days, got {days}")
    daily = [f for f in files if f.date]
    ignored = [f.name for f in files if not f.date]
    if not daily:
        names = ", ".join(sorted(f.name for f in files)[:5]) or "no files"
        raise UserError(f"dataset {files[0].doi if files else '?'} lists no daily files "
                        f"(names with a YYYY-MM-DD date); it has: {names}")
    dates = sorted({f.date for f in daily})
    keep = set(dates[:days] if days else dates)
    chosen = sorted((f for f in daily if f.date in keep), key=lambda f: (f.date, f.name))
    return chosen, ignored


def _grid_files(files: list) -> list:
    # The grid datasets hold the GeoJSON; if a server lists other formats, the GeoJSON is enough.
    geo = [f for f in files if f.name.lower().endswith((".geojson", ".json"))]
    return geo or files


# --------------------------------------------------------------------------- verification


def _file_digest(path: Path, checksum_type: str) -> str:
    h = hashlib.new(_HASHES[checksum_type])
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check(remote: RemoteFile, path: Path, verify: bool) -> None:
    """Raise _ChecksumMismatch unless ``path`` has the reported size (and checksum if verify)."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise _ChecksumMismatch(f"size {size} bytes, expected {remote.size}")
    if verify and remote.checksum and remote.checksum_type in _HASHES:
        got = _file_digest(path, remote.checksum_type)
        if got != remote.checksum:
            raise _ChecksumMismatch(f"{remote.checksum_type} {got}, expected {remote.checksum}")


def _can_verify(remote: RemoteFile) -> bool:
    return bool(remote.checksum and remote.checksum_type in _HASHES)


def _require_verifiable(remote: RemoteFile) -> None:
    """With verification on, a file whose checksum cannot be checked is an error, not a skip."""
    if _can_verify(remote):
        return
    why = (f"checksum type {remote.checksum_type!r}, which cannot be checked (known: MD5, SHA-1, "
           "SHA-256, SHA-512)" if remote.checksum else "no checksum")
    raise UserError(f"{remote.name} (file id {remote.file_id}): the listing gives {why}; "
                    "use --no-verify to accept it by size only")


class _Manifest:
    """Records files already verified, keyed by name, so reruns need not hash them again."""

    def __init__(self, folder: Path):
        self.path = folder / MANIFEST_NAME
        try:
            self.entries = json.loads(self.path.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}

    def matches(self, remote: RemoteFile, path: Path) -> bool:
        entry = self.entries.get(remote.name)
        if not entry or not _can_verify(remote):
            return False
        st = path.stat()
        return (entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
                and entry.get("checksum_type") == remote.checksum_type
                and entry.get("checksum") == remote.checksum)

    def record(self, remote: RemoteFile, path: Path) -> None:
        if not _can_verify(remote):
            return
        st = path.stat()
        self.entries[remote.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                     "checksum_type": remote.checksum_type,
                                     "checksum": remote.checksum, "doi": remote.doi,
                                     "file_id": remote.file_id}
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"files": self.entries}, indent=1, sort_keys=True))


# --------------------------------------------------------------------------- download


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", value or "")
    return int(m.group(1)) if m else None


def _transfer(remote: RemoteFile, part: Path, server: str, timeout: float, progress: bool) -> None:
    """One attempt: fetch the rest of ``remote`` into ``part`` (resuming from its size)."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()  # longer than the file can be: it is garbage, start over
        offset = 0
    if remote.size is not None and offset == remote.size and offset > 0:
        return  # a previous attempt got every byte; only the check remains
    url = remote.url(server)
    headers = {"Range": f"bytes={offset}-"} if offset else None
    try:
        resp = _open(url, headers, timeout, f"cannot download {remote.name}")
    except urllib.error.HTTPError:  # 416: our range starts past the end: the part is stale
        part.unlink()
        raise _NetworkError(f"server refused to resume at byte {offset}; restarting") from None
    with resp:
        status = resp.status
        if status == 206 and _content_range_start(resp.headers.get("Content-Range")) == offset:
            mode = "ab"
        elif status == 206:
            part.unlink(missing_ok=True)
            raise _NetworkError(f"server resumed at the wrong byte "
                                f"({resp.headers.get('Content-Range')!r}, asked for {offset})")
        else:
            mode, offset = "wb", 0  # 200: the server sends the whole file (ignores Range)
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        # Never write more than the file can be: its listed size, else what the server announces,
        # else a fixed cap (a server that streams without end must not fill the disk).
        if remote.size is not None:
            limit, why = remote.size, "its listed size"
        elif expected is not None:
            limit, why = offset + expected, "the length the server announced"
        else:
            limit, why = _MAX_DOWNLOAD, "the limit for a file of unknown size"
        got = 0
        bar = tqdm(total=remote.size, initial=offset, desc=remote.name, unit="B", unit_scale=True,
                   unit_divisor=1024, file=sys.stderr, disable=not progress, leave=False)
        try:
            with open(part, mode) as fh:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise _NetworkError(f"connection lost after {offset + got} bytes: "
                                            f"{_one_line(exc)}") from None
                    if not chunk:
                        break
                    if offset + got + len(chunk) > limit:
                        fh.close()
                        part.unlink(missing_ok=True)
                        msg = f"the server sent more than {limit} bytes ({why})"
                        if remote.size is not None:
                            raise _ChecksumMismatch(msg)  # damaged answer: retried from byte 0
                        raise UserError(f"cannot download {remote.name} (file id {remote.file_id}): "
                                        f"{msg}; stopped")
                    fh.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
    # http.client returns an empty read, not an error, when the peer closes early.
    if expected is not None and got < expected:
        raise _NetworkError(f"connection closed after {offset + got} of {offset + expected} bytes")
    if remote.size is not None and offset + got < remote.size:
        raise _NetworkError(f"connection closed after {offset + got} of {remote.size} bytes")


def download_file(remote: RemoteFile, target: str | os.PathLike, server: str | None = None,
                  retries: int = 5, backoff: float = 1.0, verify: bool = True,
                  progress: bool = True, timeout: float = 60.0) -> str:
    """Fetch ``remote`` to ``target`` via ``target.part``; return ``"downloaded"`` or ``"skipped"``.

    Skips a target that is already complete (and matches its checksum when ``verify``). A
    partial ``.part`` is resumed with a Range request. Connection errors, timeouts, 5xx and
    checksum mismatches are retried ``retries`` times with exponential backoff; a mismatch
    deletes the bytes first. Raises :class:`UserError` (one line naming the file) at the end.
    """
    server = resolve_server(server)
    target = Path(target)
    if verify:
        _require_verifiable(remote)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create download folder {target.parent}: {_one_line(exc)}") from None
    manifest = _Manifest(target.parent)
    if target.exists():
        if verify and manifest.matches(remote, target):
            return "skipped"
        try:
            _check(remote, target, verify)
        except _ChecksumMismatch:
            target.unlink()  # stale or damaged copy: fetch it again
        else:
            if verify:
                manifest.record(remote, target)
            return "skipped"
    part = target.with_name(target.name + ".part")

    def attempt() -> None:
        _transfer(remote, part, server, timeout, progress)
        try:
            _check(remote, part, verify)
        except _ChecksumMismatch:
            part.unlink()  # bad bytes cannot be resumed from: the next attempt starts at 0
            raise
        os.replace(part, target)

    def on_fail(reason: str, attempts: int) -> str:
        return (f"cannot download {remote.name} (file id {remote.file_id}) from {server}: "
                f"{reason} (gave up after {_attempts(attempts)})")

    try:
        _with_retries(attempt, retries, backoff, on_fail)
        if verify:
            manifest.record(remote, target)
    except OSError as exc:  # local disk trouble (full, read-only): not worth retrying
        raise UserError(f"cannot write {part}: {_one_line(exc)}") from None
    return "downloaded"


def fetch_city(city: str, dest: str | os.PathLike | None = None, days: int | None = None,
               server: str | None = None, retries: int = 5, backoff: float = 1.0,
               progress: bool = True, verify: bool = True, with_grid: bool | None = None,
               timeout: float = 60.0) -> FetchResult:
    """Download one city's daily telecom files (and its grid) into ``dest/<city>/``.

    ``dest`` defaults to :func:`default_cache_dir`; ``days=N`` keeps the first N daily files;
    ``with_grid`` defaults to the city's need (Trento yes, Milano no).
    """
    key = city.lower()
    if key not in CITIES:
        raise UserError(f"unknown city {city!r}: choose one of {', '.join(CITIES)}")
    if retries < 0:
        raise UserError(f"retries must be 0 or more, got {retries}")
    if days is not None and days < 1:  # before any network traffic
        raise UserError(f"--days must be a positive number of days, got {days}")
    source = CITIES[key]
    server = resolve_server(server)
    folder = Path(dest).expanduser() if dest is not None else default_cache_dir()
    folder = folder / key
    result = FetchResult(city=key, folder=folder, server=server)
    common = dict(server=server, retries=retries, backoff=backoff, timeout=timeout)

    daily, result.ignored = select_days(list_dataset(source.telecom, **common), days)
    grid = []
    if source.grid_required if with_grid is None else with_grid:
        grid = _grid_files(list_dataset(source.grid, **common))
    wanted = grid + daily
    names = [f.name for f in wanted]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise UserError(f"two remote files would both be saved as {folder / clash[0]}")
    if verify:  # before the first byte is fetched, not after hours of downloads
        for remote in wanted:
            _require_verifiable(remote)
    for remote in wanted:
        target = folder / remote.name
        status = download_file(remote, target, verify=verify, progress=progress, **common)
        (result.downloaded if status == "downloaded" else result.skipped).append(target)
        if remote in grid:
            result.grid.append(target)
    return result


def fetch_dataset(city: str, dest: str | os.PathLike | None = None, days: int | None = None,
                  server: str | None = None, retries: int = 5, backoff: float = 1.0,
                  progress: bool = True, **kwargs) -> list:
    """Download a city's files; return the local paths (sorted). See :func:`fetch_city`."""
    return fetch_city(city, dest=dest, days=days, server=server, retries=retries,
                      backoff=backoff, progress=progress, **kwargs).paths
