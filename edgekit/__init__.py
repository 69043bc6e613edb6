"""edgekit: compress lightweight CNNs, export them for edge devices, and tell the truth about speed and accuracy.

    import edgekit
    r = edgekit.compress("shufflenetv2", recipe="int8")
    print(r.recommended, r.variants["int8"].latency.p50)

The public API (:mod:`edgekit.api`) loads lazily: ``import edgekit`` does not import torch.
"""

__version__ = "0.1.0"

_API = ("compress", "benchmark", "compare", "profile", "deploy", "run_sweep", "create_model", "load_recipe",
        "load_device", "ComparisonResult", "DeployResult")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
