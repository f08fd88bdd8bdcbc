"""Experiment configurations: one `get_config(arg)` per file, shared parts in common.py."""
