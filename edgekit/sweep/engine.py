"""Running a sweep's cells on Ray: baselines, builds and measurements as Ray tasks, boards as Ray resources.

- A local Ray instance (started and stopped here) by default, or a cluster with ``address``. On a cluster the
  output folder must be on storage every node sees (builds are files that the measuring tasks read).
- Every board is a custom resource of capacity 1 (``edgekit-board-<addr>``), so two measurements never share a
  board. A measurement on a board is handed out only when the board is free and its build is done, so the boards of
  one device share the load. A board that stops answering is marked down and its cell goes to another board of
  the device, or is reported as not measured; the sweep goes on.
- Work that times or trains here takes every CPU of this machine (builds, whose int8 search times candidates on a
  local profile, and local measurements), so no timing runs beside other work. An estimate takes one CPU; an SSH
  measurement none.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import EdgekitError, first_line
from .plan import Cell, Plan
from .spec import CheckedSweep
from .work import Settings, build, measure_cell, train_baseline

LOCAL = "edgekit-local"


def board_resource(dest: str) -> str:
    """The Ray resource name of a board (``pi@10.0.0.5:22`` -> ``edgekit-board-pi-10.0.0.5-22``)."""
    return "edgekit-board-" + re.sub(r"[^A-Za-z0-9.]+", "-", dest).strip("-")


class Boards:
    """The device pool: which boards each device has, which are busy, which are down."""

    def __init__(self, boards: Dict[str, list]):
        from ..measure.ssh import destination

        self.by_device: Dict[str, List[Tuple[str, Any]]] = {
            dev: [(destination(s), s) for s in specs] for dev, specs in boards.items()}
        self.busy: set = set()
        self.down: Dict[str, str] = {}
        self.uses: Dict[str, int] = {}

    def resources(self) -> Dict[str, float]:
        return {board_resource(d): 1.0 for specs in self.by_device.values() for d, _ in specs}

    def free(self, device: str) -> Optional[Tuple[str, Any]]:
        """The free, live board of ``device`` that has measured least so far (the boards share the cells)."""
        free = [(d, s) for d, s in self.by_device.get(device, []) if d not in self.busy and d not in self.down]
        return min(free, key=lambda b: self.uses.get(b[0], 0)) if free else None

    def take(self, dest: str) -> None:
        self.busy.add(dest)
        self.uses[dest] = self.uses.get(dest, 0) + 1

    def any_up(self, device: str) -> bool:
        return any(d not in self.down for d, _ in self.by_device.get(device, []))


def _start_ray(address: Optional[str], resources: Dict[str, float]) -> str:
    """ray.init for this sweep; returns what sweep.json records as the address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        # Ray's processes inherit SIGINT ignored: Ctrl-C in a terminal signals the whole process group, and a raylet
        # or worker killed under the driver made Ray's driver core abort (exit 1, a C++ stack) instead of edgekit
        # stopping it in order. The driver gets its handler back at once and shuts Ray down itself.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            ray.init(num_cpus=os.cpu_count() or 1, resources={LOCAL: 1.0, **resources},
                     object_store_memory=256 * 2**20, **quiet)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        return "local"
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:  # noqa: BLE001 - Ray's own connection errors are several types
        raise EdgekitError(f"Cannot connect to the Ray cluster at {address}: {first_line(exc)}") from None
    have = ray.cluster_resources()
    missing = [r for r in [LOCAL, *resources] if have.get(r, 0) < 1]
    if missing:
        ray.shutdown()
        spec = ", ".join(f'"{r}": 1' for r in missing)
        raise EdgekitError(f"The Ray cluster at {address} lacks the resources {', '.join(missing)}: start the node "
                           f"that runs edgekit with `ray start --address {address} --resources '{{{spec}}}'` (each "
                           f"board on one node only)")
    return address


def _build_cpus(local: bool) -> int:
    import ray

    if local:
        return os.cpu_count() or 1
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(min(c for c in cpus if c > 0))) if any(cpus) else 1


def run_cells(sweep: CheckedSweep, plan: Plan, settings: Settings, work_dir: Path,
              on_done: Callable[[Cell, dict], None]) -> Dict[str, Any]:
    """Run every unfinished cell of ``plan``; ``on_done(cell, outcome)`` as each one ends. Returns what sweep.json
    says of the engine (address, Ray version, boards marked down)."""
    boards = Boards(sweep.boards)
    address = _start_ray(sweep.spec.address, boards.resources())
    import ray

    try:
        return _run(ray, sweep, plan, settings, work_dir, boards, on_done, address)
    except BaseException:
        raise
    finally:
        ray.shutdown()


def _run(ray, sweep: CheckedSweep, plan: Plan, settings: Settings, work_dir: Path, boards: Boards,
         on_done: Callable[[Cell, dict], None], address: str) -> Dict[str, Any]:
    cpus = _build_cpus(address == "local")
    gpus = sweep.spec.gpus_per_build
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}  # this machine, for builds and timings of `local`
    train_r, build_r, measure_r = (ray.remote(max_retries=0)(f) for f in (train_baseline, build, measure_cell))
    todo = plan.todo
    pending: Dict[Any, tuple] = {}
    base_refs: Dict[str, Any] = {}
    for bid in dict.fromkeys(c.baseline for c in todo):
        b = plan.baselines[bid]
        if sweep.sources[b["model"]].torch:
            ref = train_r.options(num_cpus=cpus, num_gpus=gpus).remote(b["model"], b["recipe"], settings)
            base_refs[bid] = ref
            pending[ref] = ("baseline", bid)
    build_refs: Dict[str, Any] = {}
    for c in todo:
        if c.build in build_refs:
            continue
        b = plan.builds[c.build]
        pin = here if sweep.devices[b["device"]].local else {}
        ref = build_r.options(num_cpus=cpus, num_gpus=gpus, resources=pin).remote(
            b["model"], b["recipe"], str(Path(b["device"]).resolve()) if Path(b["device"]).is_file() else b["device"],
            settings, work_dir / c.build, base_refs.get(c.baseline))
        build_refs[c.build] = ref
        pending[ref] = ("build", c.build)
    built: set = set()
    queues: Dict[str, deque] = {}
    for c in todo:
        dev = sweep.devices[c.device]
        if c.device in boards.by_device:
            queues.setdefault(c.device, deque()).append(c)
            continue
        opts = dict(num_cpus=cpus, resources={LOCAL: 1, **here}) if dev.local else dict(num_cpus=1)
        ref = measure_r.options(**opts).remote(build_refs[c.build], c.device, settings, c.folder, c.key)
        pending[ref] = ("measure", (c, None))
    down_log: List[dict] = []

    def dispatch() -> None:
        for device, queue in queues.items():
            for c in [c for c in queue if c.build in built]:
                board = boards.free(device)
                if board is None:
                    break
                if not boards.any_up(device):
                    break
                queue.remove(c)
                dest, ssh = board
                boards.take(dest)
                ref = measure_r.options(num_cpus=0, resources={board_resource(dest): 1}).remote(
                    build_refs[c.build], c.device, settings, c.folder, c.key, ssh)
                pending[ref] = ("measure", (c, dest))
            if not boards.any_up(device):
                while queue:
                    c = queue.popleft()
                    on_done(c, {"error": f"not measured: every board of {c.device_name} is down "
                                         f"({'; '.join(boards.down.values())})", "not_measured": True})

    # Ctrl-C ends here: run_cells shuts Ray down (tasks are not force-cancelled while their replies are in flight)
    dispatch()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            kind, what = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a worker that died: the cell fails, the sweep goes on
                result = {"error": f"the Ray task failed: {first_line(exc)}"}
            if kind == "build":
                built.add(what)
            elif kind == "measure":
                cell, dest = what
                if dest is not None:
                    boards.busy.discard(dest)
                if isinstance(result, dict) and result.get("down"):
                    boards.down[dest] = result["error"]
                    down_log.append({"board": dest, "device": cell.device_name, "error": result["error"]})
                    queues[cell.device].appendleft(cell)  # measured on another board, or reported below
                else:
                    on_done(cell, result)
        dispatch()
    return {"address": address, "ray_version": ray.__version__, "cpus_per_build": cpus, "gpus_per_build": gpus,
            "boards_down": down_log}
