"""``simmstnet models``: list every registered model with its kind and a one-line description."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("models", help="list the registered models",
                            description="List every model name usable as model.name.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from simmstnet.models.registry import list_models

    rows = list_models()
    width = max(len(name) for name, _, _ in rows)
    for name, multitask, description in rows:
        kind = "multi-task " if multitask else "single-task"
        print(f"{name:<{width}}  {kind}  {description}")
    return 0
