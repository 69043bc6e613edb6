"""Latency: measured on this machine, over SSH, or estimated, decided in one place (``latency_source``).

A ``local: true`` profile is measured here, a ``--host`` (or a profile's ``ssh:`` block) is measured on the device
over SSH, anything else is estimated from the ONNX graph. Every result is a ``Latency`` whose ``source`` says which:
``measured`` (this machine: report.json's word), ``measured-ssh`` or ``estimated``.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

from ..config import DeviceProfile, load_device
from ..errors import EdgekitError
from ..results import ESTIMATED, MEASURED, MEASURED_SSH, Latency
from .local import interleaved_latency, measure_latency, percentiles  # noqa: F401


def measures_here(device: DeviceProfile) -> bool:
    """The one decision between measuring and estimating for a device with no host given: its profile says it is
    this machine (``local: true``)."""
    return bool(device.local)


def latency_source(device: DeviceProfile, host: Optional[str] = None, ssh: bool = True) -> str:
    """How ``device``'s latency is obtained: ``measured-ssh`` (a host, or with ``ssh`` a profile's ``ssh:`` block, on a
    profile that is not this machine), ``measured`` (this machine) or ``estimated``. The pipeline passes
    ``ssh=False``: it times variants side by side here or estimates them."""
    if host or (ssh and device.ssh is not None and not measures_here(device)):
        return MEASURED_SSH
    return MEASURED if measures_here(device) else ESTIMATED


def _runtime_for(path: Path) -> str:
    from ..formats import FORMATS

    for _, fmt in FORMATS.items():
        if fmt.suffix == path.suffix.lower():
            return fmt.runtime
    known = sorted({fmt.suffix for _, fmt in FORMATS.items()})
    raise EdgekitError(f"No runtime for {path.name}: known model suffixes are {', '.join(known)}")


def profile_local(path: str | Path, threads: Optional[int] = None, warmup: int = 10, runs: int = 100) -> Latency:
    """p50/p90 (ms; mean/min in ``extra``) of ``path`` on this machine, with the runner edgekit.runtime has for its
    format."""
    import numpy as np

    from ..runtime import load_runner

    path = Path(path)
    runner = load_runner(_runtime_for(path), path, threads=threads)
    shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in runner.input_shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    stats = measure_latency(runner.run, x, warmup=warmup, runs=runs, description=f"profile {path.name}")
    return Latency(stats["p50"], MEASURED, p90=stats["p90"], threads=runner.threads, runtime=runner.runtime,
                   runtime_version=runner.version, runs=stats["runs"],
                   extra={"mean": stats["mean"], "min": stats["min"], "version": runner.version, "warmup": warmup,
                          "machine": platform.machine(), "python": platform.python_version(), "artifact": str(path)})


def profile_artifact(path: str | Path, device: str | DeviceProfile, host: Optional[str] = None,
                     threads: Optional[int] = None, runs: int = 100, warmup: int = 10) -> Latency:
    """Latency of an exported model on ``device``: measured here, measured over SSH, or estimated.

    ``host`` (``user@addr[:port]``) measures on that machine over SSH, with the profile's ``ssh:`` settings
    (key, known_hosts, python) for everything the address does not say.
    """
    dev = load_device(device) if isinstance(device, str) else device
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"Model file not found: {path}")
    if runs < 1 or warmup < 0:
        raise EdgekitError("runs must be >= 1 and warmup >= 0")
    n_threads = int(threads or dev.resolved_threads())
    source = latency_source(dev, host)
    if source == MEASURED_SSH:
        from .ssh import profile_remote, spec_for_target

        spec = spec_for_target(host, dev.ssh) if host else dev.ssh
        result = profile_remote(path, spec, threads=n_threads, warmup=warmup, runs=runs)
    elif source == MEASURED:
        result = profile_local(path, threads=n_threads, warmup=warmup, runs=runs)
    else:
        from ..estimate import estimate

        result = estimate(path, dev, threads=n_threads)
    result.device = dev.name
    return result
