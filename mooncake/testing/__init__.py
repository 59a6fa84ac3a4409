"""Test support for mooncake: the persistent multi-process cluster (cluster.py)."""
