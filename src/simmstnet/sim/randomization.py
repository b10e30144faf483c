"""Domain randomization: the simulator's parameter space, presets and per-scenario draws.

A *parameter space* maps every simulator parameter to a :class:`Range`: a fixed value, a
uniform (or log-uniform) interval, or a set of choices. Presets are YAML files beside this
module (``milano-like.yaml``, ``trento-like.yaml``, ``random.yaml``); a user file given with
``--config`` overrides single parameters of the preset. YAML syntax::

    base: milano-like          # optional: start from this preset
    params:
      bs_spacing_m: [300, 600] # two numbers: drawn uniformly (log-uniformly where the spec says)
      scenario: [UMa, UMi]     # list of names: one drawn uniformly
      market_share: 0.34       # a single value: fixed

Each scenario's parameters are drawn from their own random stream, derived from the seed and the
parameter's name, so widening one range does not change the draws of the others.

``shift > 0`` draws every randomized parameter *outside* its range (on a random side, at a
distance of up to ``shift`` times the range's width, within the hard bounds) and every choice
parameter from the choices the range leaves out: a target city unlike any source city, for
sim2real experiments.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from simmstnet.errors import UserError

PRESET_DIR = Path(__file__).resolve().parent
PRESETS = ("milano-like", "trento-like", "random")
SERVICES3 = ("call", "sms", "net")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """What a parameter is: its type, hard bounds (numbers) or allowed values (choices), help."""

    name: str
    kind: str  # "float", "int" or "choice"
    help: str
    bounds: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    log: bool = False  # a two-number range is drawn log-uniformly


def _f(name, lo, hi, help, log=False):
    return ParamSpec(name, "float", help, bounds=(lo, hi), log=log)


def _i(name, lo, hi, help):
    return ParamSpec(name, "int", help, bounds=(lo, hi))


def _c(name, choices, help):
    return ParamSpec(name, "choice", help, choices=tuple(choices))


_SPECS: list[ParamSpec] = [
    # geometry and radio network
    _f("cell_size_m", 50, 5000, "side of a grid square in metres (Milano grid: about 235 m)"),
    _c("bs_layout", ("hex", "ppp"), "site layout: jittered hexagonal lattice thinned by population, "
       "or an inhomogeneous Poisson process whose density follows population"),
    _f("bs_spacing_m", 100, 10000, "inter-site distance where the population is densest"),
    _f("bs_rural_spacing_m", 200, 30000, "largest inter-site distance (sparsest areas)"),
    _f("bs_pop_exponent", 0.0, 1.5, "site density follows population to this power"),
    _f("bs_jitter", 0.0, 0.5, "hexagonal layout: jitter of each site, as a fraction of spacing"),
    _i("sectors", 1, 6, "sectors per site (3 = classic macro site)"),
    _c("scenario", ("UMa", "UMi"), "3GPP TR 38.901 propagation scenario (UMa: 25 m masts, UMi: 10 m)"),
    _f("carrier_ghz", 0.5, 6.0, "carrier frequency in GHz"),
    _f("bandwidth_mhz", 1.4, 100, "channel bandwidth per sector in MHz"),
    _f("tx_power_dbm", 30, 50, "transmit power per sector in dBm"),
    _f("shadow_std_db", 0.0, 15, "log-normal shadowing standard deviation in dB"),
    _f("shadow_corr_m", 5, 500, "shadowing decorrelation distance in metres (exponential model)"),
    _f("coverage_margin_db", 0.0, 15, "a sector 'covers' a place whose received power is within "
       "this margin of the best sector's (operator coverage maps overlap)"),
    _f("shannon_alpha", 0.3, 1.0, "attenuation of the Shannon bound (TR 36.942 A.1 uses 0.6)"),
    _f("se_cap_bps_hz", 1.0, 10, "spectral-efficiency cap in bit/s/Hz"),
    # people and land use
    _f("density_peak_per_km2", 10, 50000, "residents per km2 at the main centre", log=True),
    _f("density_floor_per_km2", 0.1, 20000, "residents per km2 far from every centre", log=True),
    _f("centre_decay_km", 0.2, 100, "e-folding distance of density around the main centre"),
    _i("n_towns", 0, 50, "secondary centres"),
    _f("town_scale", 0.0, 1.0, "peak density of a secondary centre relative to the main one"),
    _f("town_decay_km", 0.1, 20, "e-folding distance of density around a secondary centre"),
    _f("landuse_corr_km", 0.1, 20, "correlation length of the land-use random fields"),
    _f("landuse_temperature", 0.1, 3.0, "softness of the land-use mixture (high = more mixed)"),
    _i("n_business_hotspots", 0, 20, "business districts added to the business field"),
    _i("n_transport_hubs", 0, 20, "stations and other transport hubs"),
    _f("park_share", 0.0, 0.6, "weight of the park field (share of green areas)"),
    _f("commuter_share", 0.0, 0.9, "share of residents who move to a day location on working days"),
    _f("commute_morning_h", 5.0, 11.0, "middle of the morning commute (local hour)"),
    _f("commute_evening_h", 14.0, 21.0, "middle of the evening commute (local hour)"),
    _f("weekend_commute", 0.0, 1.0, "commuting on non-working days relative to working days"),
    _f("market_share", 0.01, 1.0, "share of people who are this operator's subscribers"),
    # activity
    _f("call_per_user_h", 0.001, 2.0, "calls per subscriber per hour (daily mean)", log=True),
    _f("sms_per_user_h", 0.001, 2.0, "SMS per subscriber per hour (daily mean)", log=True),
    _f("net_kbps_per_user", 0.1, 1000, "mean Net demand per subscriber in kbit/s (daily mean)", log=True),
]
for _s in SERVICES3:
    _SPECS += [
        _f(f"{_s}_amp1", 0.0, 2.0, f"{_s}: log-amplitude of the 24 h harmonic of the daily profile"),
        _f(f"{_s}_phase1", -24, 48, f"{_s}: peak hour of the 24 h harmonic"),
        _f(f"{_s}_amp2", 0.0, 2.0, f"{_s}: log-amplitude of the 12 h harmonic"),
        _f(f"{_s}_phase2", -24, 48, f"{_s}: a peak hour of the 12 h harmonic"),
        _f(f"{_s}_amp3", 0.0, 2.0, f"{_s}: log-amplitude of the 8 h harmonic"),
        _f(f"{_s}_phase3", -24, 48, f"{_s}: a peak hour of the 8 h harmonic"),
        _f(f"{_s}_saturday", 0.05, 3.0, f"{_s}: Saturday activity relative to a working day"),
        _f(f"{_s}_sunday", 0.05, 3.0, f"{_s}: Sunday and public-holiday activity relative to a working day"),
    ]
_SPECS += [
    _f("weekend_shift_h", -3, 6, "non-working days: the daily profile runs this many hours later"),
    _f("business_weekend", 0.0, 2.0, "business areas on non-working days (relative)"),
    _f("nightlife_shift_h", 0, 8, "nightlife areas: the daily profile runs this many hours later"),
    _f("xmas_factor", 0.1, 1.5, "business and transport activity from Dec 24 to Jan 6 (relative)"),
    _f("newyear_boost", 1.0, 20, "Call and SMS around midnight of New Year's Eve (relative)"),
    _f("trend_per_month", -0.5, 0.5, "slow linear trend of all activity, per 30 days"),
    _f("daily_level_sigma", 0.0, 0.5, "day-to-day random level changes (log-normal sigma, AR(1))"),
    _f("local_sigma", 0.0, 1.5, "local demand fluctuation per square: log-normal sigma"),
    _f("local_corr_h", 0.1, 48, "local demand fluctuation: correlation time in hours (AR(1))"),
    _f("events_per_week", 0.0, 30, "special events (stadium, fair, concert) per week"),
    _f("event_size", 0.0, 50, "extra people at an event, relative to the day population of its square"),
    _f("event_radius_m", 50, 3000, "radius of an event's crowd"),
    _f("burst_per_day", 0.0, 200, "short demand bursts per square per day, shared by all services "
       "(0 = none; demand.draw_bursts)"),
    _f("burst_minutes", 1.0, 360, "mean duration of a burst in minutes (exponential)"),
    _f("burst_scale", 0.0, 50, "size of a burst: extra activity as a share of the square's, times a Lomax variable"),
    _f("burst_alpha", 1.05, 20, "tail index of the burst size (low = heavier tail)"),
    # demand realism pieces (issue 13; neutral values in the presets turn them off)
    _f("square_shape_sigma", 0.0, 2.0, "per-square daily shape: std of each square's own 24 h log-harmonic "
       "coefficients (12 h: half), applied after attribution (0 = none; demand.draw_square_shape)"),
    _f("square_offday_sigma", 0.0, 1.0, "per-square off-day texture: log-normal sigma of each square's "
       "non-working-day factor, applied after attribution (0 = none)"),
    _f("call_night_depth", 0.0, 0.99, "Call: depth of the night trough around 03:30, 1 - factor at its "
       "bottom (0 = none; the daily mean is kept)"),
    _f("sms_night_depth", 0.0, 0.99, "SMS: depth of the night trough around 03:30 (0 = none)"),
    _f("square_mix_sigma", 0.0, 2.0, "per-square service mix: log-normal sigma of a per-square, "
       "per-service level factor applied after attribution (0 = none)"),
    _f("inflow_share", 0.0, 3.0, "people from outside the grid at their day location on working days, "
       "as a share of the grid's residents (0 = none)"),
    _f("bridge_factor", 0.3, 1.5, "activity on a bridge day (a working day between two non-working "
       "days, 'ponte'), relative (1 = none)"),
    _c("local_holiday", ("none", "milano", "torino", "roma", "trento", "bologna", "napoli"),
       "the city's patron-saint holiday, counted as a Sunday (milano: Dec 7; none = national holidays only)"),
    _f("event_attendance", 0.0, 200000, "people at a stadium event (fair: half, concert: a fifth); "
       "0 = the crowd is event_size times the venue square's people"),
    # measurement
    _c("count_noise", ("poisson", "negbin"), "noise of Call and SMS counts"),
    _f("negbin_k", 0.1, 1000, "negative-binomial dispersion k (variance = mu + mu^2/k)", log=True),
    _f("net_noise_sigma", 0.0, 2.0, "Net volume noise: log-scale of the Student-t multiplier at a 10-minute step "
       "(times sqrt(600 s / step) at other steps)"),
    _f("net_noise_df", 1.0, 100, "Net volume noise: degrees of freedom (low = heavy tail)"),
    _f("net_record_share", 0.0, 1.0, "Net output counts records: this share follows the unclipped demand "
       "(sessions), the rest the capacity-clipped volume (0 = volume only)"),
    _f("missing_rate", 0.0, 0.5, "share of (time, square) entries missing at random"),
    _f("gap_rate", 0.0, 0.5, "share of time steps missing for the whole grid (collection gaps)"),
    _f("outage_per_sector_week", 0.0, 5.0, "sector outages per sector per week (masked squares)"),
    _f("scale_call", 1e-6, 1e6, "unknown global scale of Call in the output", log=True),
    _f("scale_sms", 1e-6, 1e6, "unknown global scale of SMS in the output", log=True),
    _f("scale_net", 1e-6, 1e6, "unknown global scale of Net (from MB) in the output", log=True),
]
SPECS: dict[str, ParamSpec] = {s.name: s for s in _SPECS}


@dataclasses.dataclass(frozen=True)
class Range:
    """One parameter's range: ``kind`` is "fixed", "uniform" or "choice"."""

    kind: str
    lo: Any = None
    hi: Any = None
    values: tuple = ()
    log: bool = False

    def to_yaml(self) -> Any:
        if self.kind == "fixed":
            return self.lo
        if self.kind == "uniform":
            return [self.lo, self.hi]
        return list(self.values)

    def contains(self, value: Any) -> bool:
        if self.kind == "fixed":
            return value == self.lo
        if self.kind == "uniform":
            return self.lo <= value <= self.hi
        return value in self.values


ParamSpace = dict  # name -> Range, always holding every name in SPECS


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_range(name: str, raw: Any, source: str) -> Range:
    """Check one YAML entry against the parameter's spec; UserError naming ``source`` and ``name``."""
    spec = SPECS[name]
    where = f"{source}: parameter {name!r}"
    if spec.kind == "choice":
        vals = raw if isinstance(raw, list) else [raw]
        if not vals:
            raise UserError(f"{where}: empty list of choices")
        for v in vals:
            if v not in spec.choices:
                raise UserError(f"{where}: {v!r} is not one of {', '.join(spec.choices)}")
        return Range("fixed", lo=vals[0]) if len(vals) == 1 else Range("choice", values=tuple(vals))
    lo_b, hi_b = spec.bounds
    if _number(raw):
        vals = [raw]
    elif isinstance(raw, list) and len(raw) == 2 and all(_number(v) for v in raw):
        vals = list(raw)
    else:
        raise UserError(f"{where}: expected a number or a range [low, high], got {raw!r}")
    if spec.kind == "int":
        if any(float(v) != int(v) for v in vals):
            raise UserError(f"{where}: expected whole numbers, got {raw!r}")
        vals = [int(v) for v in vals]
    else:
        vals = [float(v) for v in vals]
    for v in vals:
        if not (math.isfinite(v) and lo_b <= v <= hi_b):
            raise UserError(f"{where}: {v:g} is outside the allowed bounds [{lo_b:g}, {hi_b:g}]")
    if len(vals) == 1:
        return Range("fixed", lo=vals[0])
    if vals[0] > vals[1]:
        raise UserError(f"{where}: range [{vals[0]:g}, {vals[1]:g}] has low > high")
    if spec.log and vals[0] <= 0:
        raise UserError(f"{where}: a log-uniform range needs a positive low end")
    return Range("uniform", lo=vals[0], hi=vals[1], log=spec.log)


def _read_yaml(path: Path) -> Mapping:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{line} invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with keys 'base' and 'params'")
    return data


def _apply(space: dict, params: Any, source: str) -> dict:
    if not isinstance(params, dict):
        raise UserError(f"{source}: 'params' must be a mapping of parameter names to values or ranges")
    out = dict(space)
    for name, raw in params.items():
        if name not in SPECS:
            close = difflib.get_close_matches(str(name), SPECS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{source}: unknown parameter {name!r}{hint}")
        out[name] = parse_range(name, raw, source)
    return out


def _read_space_file(path: Path) -> dict:
    """The top-level mapping of a parameter file, with its keys checked."""
    if not path.exists():
        raise UserError(f"{path}: no such parameter file")
    data = _read_yaml(path)
    unknown = [k for k in data if k not in ("base", "params", "description")]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (expected base, params, description)")
    return data


def load_space_file(path: str | Path, _depth: int = 0) -> ParamSpace:
    """Parameter space from a YAML file (a preset or a user config with ``base``)."""
    path = Path(path)
    data = _read_space_file(path)
    space: dict = {}
    if data.get("base") is not None:
        if _depth > 5:
            raise UserError(f"{path}: 'base' presets nest too deeply")
        space = preset_space(str(data["base"]), _depth=_depth + 1, source=f"{path}: key 'base'")
    space = _apply(space, data.get("params") or {}, str(path))
    if data.get("base") is None:
        missing = [n for n in SPECS if n not in space]
        if missing:
            raise UserError(f"{path}: parameter {missing[0]!r} is not set and there is no 'base' preset "
                            f"to take it from ({len(missing)} missing)")
    return space


def preset_space(name: str, _depth: int = 0, source: str = "--preset") -> ParamSpace:
    """The parameter space of a preset shipped with the package."""
    if name not in PRESETS:
        raise UserError(f"{source}: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return load_space_file(PRESET_DIR / f"{name}.yaml", _depth=_depth)


def build_space(preset: str = "milano-like", config: str | Path | Mapping | None = None) -> ParamSpace:
    """Preset space, overridden by ``config`` (a YAML path, or a mapping {name: value/range})."""
    space = preset_space(preset)
    if config is None:
        return space
    if isinstance(config, Mapping):
        return _apply(space, dict(config), "config")
    path = Path(config)
    data = _read_space_file(path)
    if data.get("base") is not None:
        space = preset_space(str(data["base"]), source=f"{path}: key 'base'")
    return _apply(space, data.get("params") or {}, str(path))


def _stream(seed_seq: np.random.SeedSequence, name: str) -> np.random.Generator:
    # one independent stream per parameter name: changing one range leaves the others' draws alone
    return np.random.default_rng([*seed_seq.generate_state(2), zlib.crc32(name.encode())])


def sample_params(space: ParamSpace, seed_seq: np.random.SeedSequence, shift: float = 0.0) -> dict:
    """Draw one scenario's parameters (plain Python values, JSON-serializable)."""
    if shift < 0:
        raise UserError(f"--shift must be >= 0, got {shift:g}")
    out: dict[str, Any] = {}
    for name, spec in SPECS.items():
        r = space[name]
        rng = _stream(seed_seq, name)
        if r.kind == "fixed":
            out[name] = r.lo
            continue
        if r.kind == "choice":
            pool = r.values
            if shift > 0:
                rest = tuple(c for c in spec.choices if c not in r.values)
                pool = rest or r.values
            out[name] = pool[int(rng.integers(len(pool)))]
            continue
        lo, hi = (math.log(r.lo), math.log(r.hi)) if r.log else (r.lo, r.hi)
        if shift > 0:
            blo, bhi = spec.bounds
            if r.log:
                blo, bhi = math.log(max(blo, 1e-300)), math.log(bhi)
            width = (hi - lo) * shift
            rooms = [(side, room) for side, room in ((1, bhi - hi), (-1, lo - blo)) if room > 0]
            if rooms and width > 0:
                side, room = rooms[int(rng.integers(len(rooms)))]
                dist = rng.uniform(0.1, 1.0) * min(width, room)
                x = hi + dist if side > 0 else lo - dist
            else:  # the range already spans the hard bounds: nothing lies outside it
                x = rng.uniform(lo, hi)
        else:
            x = rng.uniform(lo, hi)
        x = math.exp(x) if r.log else x
        out[name] = int(round(x)) if spec.kind == "int" else float(x)
    return out


def space_to_yaml(space: ParamSpace) -> dict:
    """A ``params`` mapping that reproduces ``space`` (for docs and for users to edit)."""
    return {name: space[name].to_yaml() for name in SPECS}


def params_table_markdown() -> str:
    """Markdown table of every parameter's range in each preset (kept in docs/simulator.md)."""
    spaces = {name: preset_space(name) for name in PRESETS}

    def cell(r: Range) -> str:
        if r.kind == "fixed":
            return f"{r.lo:g}" if _number(r.lo) else str(r.lo)
        if r.kind == "uniform":
            return f"{r.lo:g} .. {r.hi:g}" + (" (log)" if r.log else "")
        return " / ".join(map(str, r.values))

    lines = ["| parameter | " + " | ".join(PRESETS) + " | meaning |",
             "|---|" + "---|" * len(PRESETS) + "---|"]
    for name, spec in SPECS.items():
        lines.append(f"| `{name}` | " + " | ".join(cell(spaces[p][name]) for p in PRESETS) + f" | {spec.help} |")
    return "\n".join(lines)
