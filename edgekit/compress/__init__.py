"""Compression: torch-level steps (prune, distill, svd) and format-level quantization."""
