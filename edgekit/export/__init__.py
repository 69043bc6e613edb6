"""Exporters: torch model -> artifact on disk."""
