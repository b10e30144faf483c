"""TrafficGrid: the one in-memory type for gridded cellular traffic, real or simulated.

Arrays
    values      float32 (T, H, W, C) activity in original units (never scaled)
    mask        bool    (T, H, W, C) True where observed. Values under False are never used as
                data: 0 where nothing was observed, or the sum of the observed parts of a partially
                observed aggregate (e.g. an hour with a missing 10-minute slot), kept for inspection
    timestamps  int64   (T,) epoch seconds UTC, strictly regular step
    services    tuple of C distinct names from SERVICES
    meta        dict of JSON-serializable facts (source, step, timezone, crop, license, ...)

On disk: one ``.npz`` with the arrays ``values``, ``mask``, ``timestamps``, ``services`` (unicode)
and ``meta`` (JSON text), readable with plain NumPy::

    z = np.load("grid.npz"); json.loads(str(z["meta"]))
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from simmstnet.errors import UserError
from simmstnet.utils import atomic_path, check_memory, format_bytes, format_step, time_range_problem

SERVICES = ("call", "sms", "net")
_NPZ_KEYS = ("values", "mask", "timestamps", "services", "meta")
# What each array of a TrafficGrid file may hold: numpy dtype kinds, number of dimensions.
_NPZ_KINDS = {"values": ("fiu", (4,), "numbers"), "mask": ("biu", (4,), "booleans"),
              "timestamps": ("iu", (1,), "integer epoch seconds"), "services": ("U", (0, 1), "text"),
              "meta": ("U", (0,), "JSON text")}
_MAX_TEXT_BYTES = 64 << 20  # services and meta are small; a bigger header is forged
_NPY_MAGIC = b"\x93NUMPY"


@dataclasses.dataclass(eq=False)
class TrafficGrid:
    values: np.ndarray
    mask: np.ndarray
    timestamps: np.ndarray
    services: tuple[str, ...]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        self.timestamps = np.asarray(self.timestamps, dtype=np.int64)
        self.services = tuple(str(s) for s in self.services)
        self.meta = dict(self.meta or {})
        self.validate()
        self.meta.setdefault("step", format_step(self.step))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_values(cls, values: np.ndarray, start: int, step: int, services: Sequence[str],
                    mask: np.ndarray | None = None, meta: dict | None = None) -> "TrafficGrid":
        """Build a grid from a (T, H, W, C) array; NaN entries become unobserved."""
        values = np.asarray(values, dtype=np.float32)
        observed = ~np.isnan(values) if mask is None else np.asarray(mask, bool) & ~np.isnan(values)
        values = np.where(observed, values, 0.0).astype(np.float32)
        timestamps = int(start) + int(step) * np.arange(values.shape[0], dtype=np.int64)
        return cls(values, observed, timestamps, tuple(services), dict(meta or {}))

    def validate(self, source: str = "grid") -> None:
        """Raise UserError naming ``source`` if the arrays are inconsistent or impossible."""
        v, m, t = self.values, self.mask, self.timestamps
        if v.ndim != 4:
            raise UserError(f"{source}: values must be 4-D (T, H, W, C), got shape {v.shape}")
        if m.shape != v.shape:
            raise UserError(f"{source}: mask shape {m.shape} differs from values shape {v.shape}")
        if t.ndim != 1 or t.shape[0] != v.shape[0]:
            raise UserError(f"{source}: {t.shape[0] if t.ndim == 1 else t.shape} timestamps for "
                            f"{v.shape[0]} time steps")
        if v.shape[0] == 0 or v.shape[1] == 0 or v.shape[2] == 0:
            raise UserError(f"{source}: empty grid (shape {v.shape})")
        for i in (int(np.argmin(t)), int(np.argmax(t))):  # before np.diff, which could overflow
            problem = time_range_problem(int(t[i]))
            if problem:
                raise UserError(f"{source}: timestamp {i} ({int(t[i])}) {problem}")
        if len(self.services) != v.shape[3]:
            raise UserError(f"{source}: {len(self.services)} service names for {v.shape[3]} channels")
        unknown = [s for s in self.services if s not in SERVICES]
        if unknown:
            raise UserError(f"{source}: unknown service {unknown[0]!r}; known services: {', '.join(SERVICES)}")
        if len(set(self.services)) != len(self.services):
            raise UserError(f"{source}: duplicate service names {list(self.services)}")
        if t.shape[0] > 1:
            d = np.diff(t)
            if np.any(d <= 0):
                i = int(np.argmax(d <= 0))
                raise UserError(f"{source}: timestamps not strictly increasing at index {i + 1}")
            if np.any(d != d[0]):
                i = int(np.argmax(d != d[0]))
                raise UserError(f"{source}: irregular time step at index {i + 1} "
                                f"({int(d[i])} s after {int(d[0])} s steps)")
        # Check in blocks of time steps: a full-size boolean temporary per check would double
        # the peak memory of a large grid (62 days of 10-minute Milano data is ~1.4 GB).
        block = max(1, (1 << 24) // max(1, v[0].size))
        for lo in range(0, v.shape[0], block):
            vb, mb = v[lo:lo + block], m[lo:lo + block]
            bad = mb & ~np.isfinite(vb)
            if bad.any():
                idx = np.argwhere(bad)[0]
                raise UserError(f"{source}: non-finite value where observed at (t={lo + idx[0]}, "
                                f"row={idx[1]}, col={idx[2]}, service={self.services[idx[3]]})")
            neg = mb & (vb < 0)
            if neg.any():
                idx = np.argwhere(neg)[0]
                raise UserError(f"{source}: negative activity {vb[tuple(idx)]:g} at (t={lo + idx[0]}, "
                                f"row={idx[1]}, col={idx[2]}, service={self.services[idx[3]]})")
            unobserved_nonfinite = ~mb & ~np.isfinite(vb)
            if unobserved_nonfinite.any():  # NaN under the mask is allowed on input, stored as 0
                if not v.flags.writeable:
                    v = self.values = v.copy()
                v[lo:lo + block][unobserved_nonfinite] = 0.0

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    @property
    def step(self) -> int:
        """Time step in seconds (taken from meta for a one-step grid)."""
        if self.timestamps.shape[0] > 1:
            return int(self.timestamps[1] - self.timestamps[0])
        from simmstnet.utils import parse_step
        return parse_step(self.meta.get("step", "1h"))

    @property
    def timezone(self) -> str:
        return str(self.meta.get("timezone", "UTC"))

    def service_index(self, name: str) -> int:
        if name not in self.services:
            raise UserError(f"service {name!r} not in this grid; it has: {', '.join(self.services)}")
        return self.services.index(name)

    def missing_share(self) -> float:
        return float(1.0 - self.mask.mean())

    # ------------------------------------------------------------------ selections
    def select_services(self, names: Iterable[str]) -> "TrafficGrid":
        names = list(names)
        idx = [self.service_index(n) for n in names]
        return TrafficGrid(self.values[..., idx], self.mask[..., idx], self.timestamps, tuple(names),
                           dict(self.meta))

    def crop(self, rows: tuple[int, int], cols: tuple[int, int]) -> "TrafficGrid":
        """Half-open crop ``rows=(a, b)``, ``cols=(c, d)`` in this grid's coordinates."""
        (a, b), (c, d) = rows, cols
        H, W = self.shape[1:3]
        if not (0 <= a < b <= H and 0 <= c < d <= W):
            raise UserError(f"crop rows {a}:{b} cols {c}:{d} outside the {H}x{W} grid")
        meta = dict(self.meta)
        base = meta.get("crop") or {"rows": [0, H], "cols": [0, W]}
        meta["crop"] = {"rows": [base["rows"][0] + a, base["rows"][0] + b],
                        "cols": [base["cols"][0] + c, base["cols"][0] + d]}
        return TrafficGrid(self.values[:, a:b, c:d], self.mask[:, a:b, c:d], self.timestamps,
                           self.services, meta)

    def slice_time(self, start: int | None = None, stop: int | None = None) -> "TrafficGrid":
        """Time steps with ``start <= timestamp < stop`` (epoch seconds UTC)."""
        t = self.timestamps
        keep = np.ones(t.shape[0], bool)
        if start is not None:
            keep &= t >= start
        if stop is not None:
            keep &= t < stop
        if not keep.any():
            raise UserError("time selection is empty")
        return TrafficGrid(self.values[keep], self.mask[keep], t[keep], self.services, dict(self.meta))

    def resample(self, step: int) -> "TrafficGrid":
        """Aggregate to a coarser step by summing activity.

        A coarse slot is observed only when every fine slot inside it is observed (a partial sum
        would understate the traffic); its value is still the sum of the observed fine slots.
        The grid is trimmed to whole coarse slots aligned on epoch multiples of ``step``.
        """
        own = self.step
        if step == own:
            return self
        if step % own:
            raise UserError(f"cannot resample step {format_step(own)} to {format_step(step)}: "
                            "the new step must be a multiple of the old one")
        k = step // own
        first = int(np.argmax(self.timestamps % step == 0)) if np.any(self.timestamps % step == 0) else None
        if first is None:
            raise UserError(f"no timestamp aligned on {format_step(step)}")
        n = (self.shape[0] - first) // k
        if n == 0:
            raise UserError(f"fewer than one whole {format_step(step)} slot in the grid")
        sl = slice(first, first + n * k)
        T, H, W, C = self.shape
        v = np.where(self.mask[sl], self.values[sl], 0).reshape(n, k, H, W, C).sum(1, dtype=np.float64)
        m = self.mask[sl].reshape(n, k, H, W, C).all(1)
        meta = dict(self.meta)
        meta["step"] = format_step(step)
        return TrafficGrid(v.astype(np.float32), m, self.timestamps[sl][::k], self.services, meta)

    # ------------------------------------------------------------------ io
    def save(self, path: str | os.PathLike, compress: bool = False) -> Path:
        """Write one ``.npz`` atomically (temporary file, then rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise UserError(f"{path}: a TrafficGrid file must end in .npz")
        saver = np.savez_compressed if compress else np.savez
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                saver(fh, values=self.values, mask=self.mask, timestamps=self.timestamps,
                      services=np.array(self.services, dtype=str),
                      meta=np.array(json.dumps(self.meta, sort_keys=True, default=_json_default)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrafficGrid":
        """Read a TrafficGrid ``.npz``; UserError naming the file for anything it cannot be.

        Every array's ``.npy`` header is read and checked first (dtype, dimensions, that the data
        the header declares is really in the file, and the memory the grid needs against
        :func:`simmstnet.utils.memory_budget`), so a forged or oversized file is refused before
        anything is decompressed. Pickled objects are never loaded.
        """
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: no such file")
        if path.is_dir():
            raise UserError(f"{path}: is a folder, expected a TrafficGrid .npz file")
        headers = _npz_headers(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in _NPZ_KEYS}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
            raise UserError(f"{path}: cannot read as .npz ({_first_line(exc)})") from None
        for k, (shape, _dtype) in headers.items():  # the zip directory and the data must agree
            if arrays[k].shape != shape:
                raise UserError(f"{path}: array {k!r} read with shape {arrays[k].shape}, its header "
                                f"says {shape}")
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: meta is not valid JSON ({exc})") from None
        grid = cls.__new__(cls)
        grid.values = arrays["values"].astype(np.float32, copy=False)
        grid.mask = arrays["mask"].astype(bool, copy=False)
        grid.timestamps = arrays["timestamps"].astype(np.int64, copy=False)
        grid.services = tuple(str(s) for s in np.atleast_1d(arrays["services"]))
        grid.meta = meta if isinstance(meta, dict) else {}
        grid.validate(source=str(path))
        grid.meta.setdefault("step", format_step(grid.step))
        return grid

    def __repr__(self) -> str:
        T, H, W, C = self.shape
        return (f"TrafficGrid(T={T}, H={H}, W={W}, services={list(self.services)}, "
                f"step={format_step(self.step)}, missing={self.missing_share():.1%})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, _fortran, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _fortran, dtype = fmt.read_array_header_2_0(fh)
    else:
        shape, _fortran, dtype = fmt._read_array_header(fh, version)  # 3.0: utf-8 field names
    return tuple(int(n) for n in shape), np.dtype(dtype)


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every TrafficGrid array, read from the ``.npy`` headers only, checked
    against what a TrafficGrid may hold and against the memory budget (see TrafficGrid.load)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not zipfile.is_zipfile(path):
        if head == _NPY_MAGIC:
            raise UserError(f"{path}: is a plain .npy array, not a TrafficGrid .npz (a zip of the "
                            f"arrays {', '.join(_NPZ_KEYS)})")
        raise UserError(f"{path}: not a .npz file (not a zip archive)")
    headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename: info for info in zf.infolist()}
            missing = [k for k in _NPZ_KEYS if f"{k}.npy" not in members]
            if missing:
                raise UserError(f"{path}: not a TrafficGrid file (missing arrays: {', '.join(missing)})")
            for key in _NPZ_KEYS:
                info = members[f"{key}.npy"]
                with zf.open(info) as fh:
                    try:
                        shape, dtype = _read_npy_header(fh)
                    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
                        raise UserError(f"{path}: array {key!r} has no valid .npy header "
                                        f"({_first_line(exc)})") from None
                    header_len = fh.tell()
                kinds, ndims, meaning = _NPZ_KINDS[key]
                if dtype.hasobject:
                    raise UserError(f"{path}: array {key!r} holds Python objects (pickled); a "
                                    "TrafficGrid file holds only plain arrays")
                if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
                    shown = dtype.str if str(dtype) == dtype.str else f"{dtype.str} ({dtype})"
                    raise UserError(f"{path}: array {key!r} has dtype {shown}; expected {meaning}")
                if len(shape) not in ndims:
                    raise UserError(f"{path}: array {key!r} has shape {shape}; expected "
                                    f"{' or '.join(f'{n}-D' for n in ndims)}")
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                stored = info.file_size - header_len
                if declared != stored:
                    raise UserError(f"{path}: array {key!r} declares shape {shape} "
                                    f"({format_bytes(declared)}) but the file holds "
                                    f"{format_bytes(max(stored, 0))} of data: damaged or forged")
                if key in ("services", "meta") and declared > _MAX_TEXT_BYTES:
                    raise UserError(f"{path}: array {key!r} is {format_bytes(declared)}; expected a short text")
                headers[key] = (shape, dtype)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{path}: cannot read as .npz ({_first_line(exc)})") from None
    (vshape, vdtype), (mshape, mdtype) = headers["values"], headers["mask"]
    tshape = headers["timestamps"][0]
    if mshape != vshape:
        raise UserError(f"{path}: mask shape {mshape} differs from values shape {vshape}")
    if tshape[0] != vshape[0]:
        raise UserError(f"{path}: {tshape[0]} timestamps for {vshape[0]} time steps")
    entries = int(np.prod(vshape, dtype=object))
    # Loaded as read, then converted to float32 / bool (a copy unless already of that type).
    need = entries * (vdtype.itemsize + mdtype.itemsize)
    need += entries * 4 * (vdtype != np.float32) + entries * (mdtype != np.bool_)
    need += tshape[0] * 8 * 2
    check_memory(need, f"{path}: a grid of shape {vshape}")
    return headers


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path,)):
        return str(obj)
    raise TypeError(f"meta value of type {type(obj).__name__} is not JSON-serializable")
