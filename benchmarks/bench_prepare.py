"""Throughput and peak memory of `simmstnet data prepare` on raw files shaped like Milano's.

Generates ``--files`` raw daily files like the real ``sms-call-internet-mi-YYYY-MM-DD.txt``
(10,000 squares x 144 ten-minute slots x 1-4 country-code rows each, about 2.9 on average,
values as full-precision decimals with the excerpt's share of empty fields: about 300 MB a
file at ``--scale 1``; ``--scale 0.1`` keeps 1,000 squares spread over the raster, so the
output grid is still written everywhere and its memory is real), then prepares a full 100x100
raster from them in a fresh child process and prints:

* throughput in MB of raw text per minute (target >= 1 GB/min);
* the child's peak resident memory (target < 2 GB for the hourly raster).

The files go to a temporary folder that is deleted afterwards (unless ``--keep``).

    python benchmarks/bench_prepare.py                    # 3 full-size days, hourly
    python benchmarks/bench_prepare.py --scale 0.1 --files 2 --step 10min
    python benchmarks/bench_prepare.py --files 62 --scale 0.01   # memory of the 62-day Milano grid
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Share of empty fields per activity column, read off the shared Milano excerpt.
EMPTY_SHARE = np.array([0.30, 0.62, 0.62, 0.57, 0.46])
COUNTRY_CODES = [b"39", b"0", b"33", b"48", b"46", b"41", b"49", b"20", b"34", b"44", b"1", b"355"]
COUNTRY_WEIGHTS = np.array([38, 30, 8, 4, 3, 3, 2, 2, 1, 1, 1, 1], float)
FIRST_DAY = dt.date(2013, 11, 1)
FIRST_MIDNIGHT_MS = 1383260400000  # 2013-11-01 00:00 Europe/Rome

CHILD = r"""
import json, sys, time
from simmstnet.data.telecom_italia import read_telecom_italia
raw, out, step, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
grid = read_telecom_italia(raw, "milano", step=step, chunk_bytes=chunk)
t1 = time.perf_counter()
grid.save(out)
t2 = time.perf_counter()
print(json.dumps({"read_s": t1 - t0, "save_s": t2 - t1, "shape": list(grid.shape),
                  "missing": grid.missing_share()}))
"""


def generate_day(path: Path, day_index: int, square_ids: np.ndarray, rng: np.random.Generator) -> int:
    """Write one raw daily file, rows ordered by square then slot like the real ones; returns bytes."""
    pool = np.array([repr(float(x)).encode() for x in rng.lognormal(-1.5, 1.8, 1 << 16)] + [b""],
                    dtype=object)
    empty = len(pool) - 1
    times = np.array([str(FIRST_MIDNIGHT_MS + (day_index * 144 + s) * 600_000).encode() for s in range(144)],
                     dtype=object)
    ccs = np.array(COUNTRY_CODES, dtype=object)
    written = 0
    with open(path, "wb") as fh:
        for lo in range(0, square_ids.size, 500):
            block_ids = square_ids[lo: lo + 500]
            squares = np.repeat(np.arange(block_ids.size), 144)
            slots = np.tile(np.arange(144), block_ids.size)
            per = rng.choice([1, 2, 3, 4], size=squares.size, p=[0.1, 0.25, 0.3, 0.35])
            squares, slots = np.repeat(squares, per), np.repeat(slots, per)
            cc = rng.choice(len(ccs), size=squares.size, p=COUNTRY_WEIGHTS / COUNTRY_WEIGHTS.sum())
            fields = rng.integers(0, empty, size=(5, squares.size))
            fields[rng.random((5, squares.size)) < EMPTY_SHARE[:, None]] = empty
            sq_text = np.array([str(i).encode() for i in block_ids], dtype=object)[squares]
            columns = [sq_text, times[slots], ccs[cc], *(pool[f] for f in fields)]
            block = b"\n".join([b"\t".join(row) for row in zip(*columns)]) + b"\n"
            fh.write(block)
            written += len(block)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=3, help="number of daily files (default 3)")
    ap.add_argument("--scale", type=float, default=1.0, help="share of the 10,000 squares (default 1)")
    ap.add_argument("--step", default="1h", help="output step (default 1h)")
    ap.add_argument("--chunk-mb", type=float, default=16, help="read chunk size in MiB (default 16)")
    ap.add_argument("--dir", help="where to write the files (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    n_squares = max(1, min(10_000, round(10_000 * args.scale)))
    # Spread the kept squares over the raster so every page of the output is written.
    squares = np.unique(np.linspace(1, 10_000, n_squares).round().astype(np.int64))
    base = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.dir))
    raw = base / "raw"
    raw.mkdir()
    try:
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        total = 0
        for d in range(args.files):
            name = f"sms-call-internet-mi-{FIRST_DAY + dt.timedelta(days=d)}.txt"
            total += generate_day(raw / name, d, squares, rng)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.files} file(s), {squares.size} squares each, {total / 1e6:.0f} MB "
              f"in {gen_s:.0f} s ({total / 1e6 / args.files:.0f} MB per file)", flush=True)

        cmd = [sys.executable, "-c", CHILD, str(raw), str(base / "out.npz"), args.step,
               str(int(args.chunk_mb * (1 << 20)))]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        stdout = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            print(f"prepare failed with exit code {child.returncode}", file=sys.stderr)
            return 1
        result = json.loads(stdout.decode().strip().splitlines()[-1])
        peak_gb = usage.ru_maxrss * 1024 / 1e9  # Linux reports KiB
        rate = total / 1e9 / (result["read_s"] / 60)
        print(f"prepare {args.step}: grid {tuple(result['shape'])}, missing {result['missing']:.1%}")
        print(f"  read+aggregate {result['read_s']:.1f} s, save {result['save_s']:.1f} s, "
              f"child wall {wall:.1f} s (with imports)")
        print(f"  throughput  {rate:.2f} GB of raw text per minute (target >= 1 GB/min)")
        T, H, W, C = result["shape"]
        print(f"  peak RSS    {peak_gb:.2f} GB (target < 2 GB); output arrays {T * H * W * C * 5 / 1e9:.2f} GB")
        print(f"  cpu         user {usage.ru_utime:.1f} s, system {usage.ru_stime:.1f} s, "
              f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    finally:
        if args.keep:
            print(f"kept files in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
