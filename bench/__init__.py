"""Benchmarks: each scenario measures its baseline in the same run (see bench/README.md)."""
