"""Deployment helpers: the standalone device runner copied to targets."""

from pathlib import Path

RUNNER_PATH = Path(__file__).with_name("runner.py")
"""The standalone runner script (stdlib + numpy + a runtime; no edgekit import) that is copied to devices."""
