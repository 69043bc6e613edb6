"""Latency: measured on this machine (local), over SSH, or estimated."""

from .local import measure_latency  # noqa: F401
