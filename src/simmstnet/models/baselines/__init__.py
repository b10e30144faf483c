"""Baseline forecasters, one file each; every module here registers its models on import
(the registry imports them all on first lookup)."""
