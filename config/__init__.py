"""Checked-in defaults, shipped inside the package as ``worker.defaults``."""
