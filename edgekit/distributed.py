"""Training across processes under torchrun (``torchrun --nproc-per-node N -m edgekit compress ...``).

torchrun starts N copies of the command and tells each its place in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Every process trains (DistributedDataParallel: each takes its own
share of every epoch, gradients are averaged), and rank 0 alone does what must happen once: the baseline cache,
calibration, export, evaluation, timing, the report and the output folder. The other ranks wait for rank 0's
result and return it, or raise its error.

A process that torchrun did not start (no ``WORLD_SIZE`` above 1) initialises nothing: every helper here answers
as for one process, so single-process runs behave as they always did. The environment helpers do not import torch
(the CLI uses them before it knows it needs torch). ``compress`` and ``benchmark`` leave the group when they end;
a script of its own that calls ``edgekit.train.fit`` under torchrun joins it at the first fit and should call
:func:`shutdown` at its end.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any, Callable, Optional

from .errors import EdgekitError

WAIT_ENV = "EDGEKIT_DIST_TIMEOUT"  # seconds the other ranks wait for rank 0's export, evaluation and timing
WAIT_DEFAULT_S = 6 * 3600
_state: dict = {"cpu_group": None, "owned": False}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise EdgekitError(f"{name} must be a whole number, not {raw!r} (torchrun sets it)")
    return int(raw)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when not under torchrun)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def env_rank() -> int:
    return _env_int("RANK", 0)


def env_local_rank() -> int:
    """This process's index on its node: its GPU under ``--device-train cuda``."""
    return _env_int("LOCAL_RANK", 0)


def launched() -> bool:
    """True in a process torchrun started as one of several."""
    return env_world_size() > 1


def is_main_process() -> bool:
    """Rank 0, or a process not started by torchrun; from the environment alone (no torch import)."""
    return env_rank() == 0


def wait_timeout_s() -> int:
    return _env_int(WAIT_ENV, WAIT_DEFAULT_S)


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the initialised group; 1 when none is (also under torchrun before ``init``)."""
    import torch.distributed as dist

    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if initialized() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> Optional[str]:
    import torch.distributed as dist

    return str(dist.get_backend()) if initialized() else None


def init(device_type: str = "cpu") -> int:
    """Join torchrun's process group once (gloo for CPU training, NCCL for CUDA); returns the world size.

    Nothing happens outside torchrun, or when the group already exists (a caller's own ``init_process_group``).
    """
    if not launched():
        return 1
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise EdgekitError("this torch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(env_local_rank())  # before NCCL starts: each process on its own GPU
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")  # env://, as torchrun set it
        _state["owned"] = True
    _cpu_group()  # collective: every rank makes it here, at the same point
    return dist.get_world_size()


def _cpu_group():
    """A gloo group with its own (long) timeout for Python objects and the wait for rank 0, whatever the default
    group's backend: NCCL moves only CUDA tensors."""
    import torch.distributed as dist

    if _state["cpu_group"] is None:
        _state["cpu_group"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s()))
    return _state["cpu_group"]


def shutdown() -> None:
    """Leave the process group, if this module started it."""
    if _state["owned"] and initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
    _state.update(cpu_group=None, owned=False)


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (pickled; for small things: flags, reports)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_cpu_group())
    return box[0]


def check_same_model(model) -> None:
    """Every rank must hold the same architecture before DDP or a broadcast: the steps (pruning) ran on each rank
    with the same seed, so their decisions must agree; if they did not, say so instead of failing in a collective."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    shapes = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    mine = (hashlib.sha256(repr(shapes).encode()).hexdigest(), sum(p.numel() for p in model.parameters()))
    every: list = [None] * world_size()
    dist.all_gather_object(every, mine, group=_cpu_group())
    if len({d for d, _ in every}) > 1:
        counts = ", ".join(f"rank {r}: {n:,}" for r, (_, n) in enumerate(every))
        raise EdgekitError(f"the {len(every)} processes hold differently shaped models ({counts} parameters): a step "
                           "such as prune decided differently on different ranks; run with one process")


def broadcast_state(model, params: bool = True, buffers: bool = True, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and/or buffers into every rank's ``model``, in place."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    check_same_model(model)
    tensors = ([*model.parameters()] if params else []) + ([*model.buffers()] if buffers else [])
    with torch.no_grad():
        for t in tensors:
            buf = t.data if t.data.is_contiguous() else t.data.contiguous()
            dist.broadcast(buf, src=src, group=None if buf.is_cuda else _cpu_group())
            if buf is not t.data:
                t.data.copy_(buf)


class Session:
    """One command's part in a torchrun job: joins the group (if torchrun started it), lets rank 0 alone run
    what must happen once, hands its result or its error to the other ranks, and leaves the group at the end."""

    def __init__(self, device_type: str = "cpu"):
        self.owned = launched() and not initialized()
        self.world = init(device_type)
        self.rank = rank()
        self.is_main = self.rank == 0
        self._pending = False  # rank 0 is in its own part: the others wait for share() or fail()

    def main_only(self) -> bool:
        """True on rank 0, which goes on alone from here; the others should ``return self.result()``."""
        self._pending = self.world > 1 and self.is_main
        return self.is_main

    def share(self, value: Any) -> Any:
        """Rank 0: hand ``value`` to the waiting ranks."""
        if self._pending:
            self._pending = False
            broadcast_object(("ok", value))
        return value

    def fail(self, exc: BaseException) -> None:
        """Rank 0: tell the waiting ranks that its part failed, so they stop instead of waiting."""
        if self._pending:
            self._pending = False
            text = str(exc).strip().splitlines()
            broadcast_object(("error", type(exc).__name__, text[0] if text else "",
                              isinstance(exc, EdgekitError)))

    def result(self) -> Any:
        """Other ranks: rank 0's value, or its error raised here (one line)."""
        try:
            msg = broadcast_object(None)
        except RuntimeError as exc:  # gloo's timeout, or rank 0 gone
            raise EdgekitError(f"rank {self.rank}: no result from rank 0 ({str(exc).splitlines()[0][:200]}); "
                               f"{WAIT_ENV} (seconds, now {wait_timeout_s()}) sets how long to wait") from None
        if msg[0] == "ok":
            return msg[1]
        _, kind, text, user_error = msg
        raise EdgekitError(text if user_error else f"rank 0 failed: {kind}: {text}")

    def on_main(self, fn: Callable, *args, **kwargs) -> Any:
        """``fn`` on rank 0 only; every rank returns its result or raises its error."""
        if self.world == 1:
            return fn(*args, **kwargs)
        if not self.main_only():
            return self.result()
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            self.fail(exc)
            raise
        return self.share(value)

    def close(self) -> None:
        if self.owned:
            shutdown()
            self.owned = False
