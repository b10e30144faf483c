"""What a radio parameter moves: one-at-a-time change of a simulated city's output.

For each preset and seed, simulates the same city twice with one parameter fixed at two values
(everything else, seeds included, equal) and prints the relative L1 change of the output
(sum |a - b| / sum |a| over every step, square and service). Issue 13 asked to remove or fold
parameters that move nothing; docs/simulator.md ("What the radio parameters move") quotes this.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_radio_params.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_radio_params.py --param bandwidth_mhz --values 5,20
"""
from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    from simmstnet.sim.randomization import Range, build_space
    from simmstnet.sim.simulator import simulate_scenario

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--param", default="tx_power_dbm")
    ap.add_argument("--values", default="30,50", help="the two values compared")
    ap.add_argument("--presets", default="milano-like,trento-like,random")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--size", type=int, default=12, help="rows = cols")
    ap.add_argument("--days", type=float, default=3)
    args = ap.parse_args()
    a, b = (float(v) for v in args.values.split(","))
    print(f"{args.param} {a:g} vs {b:g}: relative L1 change of the output, {args.size}x{args.size} squares, "
          f"{args.days:g} days hourly, call/sms/net")
    print("| preset | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " |")
    print("|---|" + "---:|" * args.seeds)
    for preset in args.presets.split(","):
        cells = []
        for seed in range(args.seeds):
            outs = []
            for v in (a, b):
                space = dict(build_space(preset))
                space[args.param] = Range("fixed", lo=v)
                g = simulate_scenario(space, args.size, args.size, days=args.days, step=3600, seed=seed, index=0,
                                      start=1383260400, services=("call", "sms", "net"), preset=preset)
                outs.append(g.values.astype(np.float64))
            cells.append(f"{np.abs(outs[0] - outs[1]).sum() / np.abs(outs[0]).sum():.2e}")
        print(f"| {preset} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
