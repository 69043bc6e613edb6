"""Runtimes: load an artifact, run a batch. One table, keyed by runtime name, that imports the runner modules on its
first lookup (``edgekit.runtime.base.RUNTIMES``)."""

from .base import RUNTIMES, Runner, load_runner  # noqa: F401
