"""One module per top-level CLI command; each exposes ``register(subparsers)``."""
