"""Process-group helpers for `torchrun`/DDP training: gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lddpm.errors import LddpmError

_joined_group = False  # True once this process has called init_process_group (a torchrun worker)


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank, and the torch device it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, grids and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU -> LddpmError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LddpmError("run.device = 'cuda' but no CUDA GPU is available; use run.device = 'cpu' or 'auto'")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise LddpmError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls and convolutions run on native hardware (CUDA bf16, CPU AMX/AVX-512 bf16).

    Without it bf16 autocast falls back to emulated kernels: on CPUs without AVX-512 bf16 it was
    ~15x slower than fp32, so `run.bf16 = "auto"` stays in fp32 there.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def bf16_flag(text: str) -> bool | str:
    """A `--bf16` command-line value: "true", "false" or "auto" -> True, False or "auto"."""
    value = {"true": True, "false": False, "auto": "auto"}.get(str(text).strip().lower())
    if value is None:
        raise LddpmError(f"--bf16 must be true, false or auto, got {text!r}")
    return value


def check_bf16(what: str, setting) -> bool | str:
    """A bf16 setting (run.bf16, [study] bf16, bf16=): true, false or "auto"; anything else is one clear error."""
    if setting is True or setting is False or setting == "auto":
        return setting
    raise LddpmError(f"{what} = {setting!r}: use true, false or \"auto\"")


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """Resolve run.bf16 (true, false or "auto") for a device."""
    check_bf16("bf16", setting)
    return native_bf16(device) if setting == "auto" else bool(setting)


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, store=_restart_safe_store(world_size))
        global _joined_group
        _joined_group = True
    return DistInfo(rank, world_size, local_rank, torch_device)


def _restart_safe_store(world_size: int):
    """The process group's key-value store; under torchrun's shared agent store, one key space per restart.

    torchrun (with its c10d rendezvous) lets the workers share the agent's store, and keeps it across
    `--max-restarts` restarts without a per-attempt prefix (pytorch/pytorch#135712): restarted gloo
    workers then read the dead workers' addresses and fail with "Connection refused" (or hang). A
    PrefixStore named after TORCHELASTIC_RESTART_COUNT gives every attempt fresh keys. Outside
    torchrun's shared store: None (init_process_group's own env:// store).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.distributed_c10d import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"lddpm/attempt_{elastic_restart_count()}/", store)


def teardown(info: DistInfo) -> None:
    """Leave the process group (if one was joined)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int | str | None, *, worker: bool | None = None) -> None:
    """End the process with `status`; a torchrun worker ends without interpreter finalization.

    worker: None asks whether `setup` joined a process group here; True is for a process that joined one
    itself (e.g. benchmarks/gpu.py's DDP probe), False for one that did not.

    Why: gloo runs each collective on its own worker threads, and a gradient all-reduce that DDP
    launches inside backward captures the thread-local state of that backward, which holds a
    Python object (the `contextvars` snapshot that `torch.autograd` stashes for the backward).
    The worker thread drops the finished work, and with it that object, some time after the
    main thread has its result. If the main thread reaches interpreter finalization first, the
    worker thread cannot take the GIL, Python ends it with pthread_exit, the forced unwind meets
    a noexcept C++ frame, and the process dies with SIGABRT ("terminate called without an active
    exception") although its work is done and saved. Destroying the process group does not join
    those threads while DDP's reducer holds it. So a worker that joined a group runs the atexit
    handlers, flushes its streams and leaves with os._exit, skipping the finalization that
    races the threads. Any other process exits normally (sys.exit).
    """
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status
    else:  # sys.exit("message"): Python prints the message and exits with 1
        print(status, file=sys.stderr)
        code = 1
    if not (_joined_group if worker is None else worker):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (identity when alone)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(params, info: DistInfo) -> None:
    """Average the .grad of `params` over ranks in one collective (for modules not wrapped in DDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not info.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank, in rank order."""
    if not info.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when alone)."""
    if info.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------- torchrun (torchelastic) jobs


def elastic_restart_count() -> int:
    """How many times torchrun restarted this job's workers (TORCHELASTIC_RESTART_COUNT; 0 on the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def elastic_run_id() -> str | None:
    """torchrun's job id (TORCHELASTIC_RUN_ID: --rdzv-id, a fresh uuid with --standalone), or None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


# What gloo and NCCL say when another process of the job died (its socket closed) or stopped answering.
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
                      "NCCL communicator was aborted", "remote process exited", "Connection refused")


def is_peer_failure(exc: BaseException) -> bool:
    """True for the error a process of a torchrun job gets when another process of the job failed first."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in PEER_FAILURE_SIGNS)


def record_elastic_error(message: str) -> None:
    """Give torchrun this process's error as one line: written to TORCHELASTIC_ERROR_FILE (when torchrun set it),
    torchrun's "Root Cause" block shows it instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError:  # a report of an error must not raise another one
        pass
