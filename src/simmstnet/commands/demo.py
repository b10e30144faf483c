"""``simmstnet demo``: the whole idea end to end on an embedded default (see simmstnet.demo)."""
from __future__ import annotations

import dataclasses


def register(sub) -> None:
    from simmstnet.demo import DemoConfig

    d = DemoConfig()
    parser = sub.add_parser(
        "demo", help="scarce data + simulator + sim2real, side by side (no download needed)",
        description="Simulate source cities and a target city (or use --data), keep only a few days of "
                    "target training data, train Sim-MSTNet with bilevel sim2real next to real-only, "
                    "mix, finetune and naive baselines, and write report.md.")
    parser.add_argument("--out", default=d.out, help=f"output folder (default {d.out}); finished runs are reused")
    parser.add_argument("--data", default=None, help="your own TrafficGrid .npz as the target instead of a simulated city")
    parser.add_argument("--train-days", type=int, default=d.train_days, help=f"scarce-data days (default {d.train_days})")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    parser.set_defaults(func=run)


def run(args) -> int:
    from simmstnet.demo import DemoConfig, run_demo
    from simmstnet.errors import UserError

    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    if args.train_days < 1:
        raise UserError(f"--train-days must be at least 1, got {args.train_days}")

    cfg = dataclasses.replace(DemoConfig(), out=args.out, data=args.data, train_days=args.train_days,
                              epochs=args.epochs, seed=args.seed)
    run_demo(cfg)
    return 0
