"""edgekit: compress lightweight CNNs and check them against edge devices."""

__version__ = "0.1.0"
