"""Runtime choices made once for every stage: device, distributed setup, fast paths.

* :func:`device` — the torch device a command runs on (``cuda`` when available, else
  ``cpu``; under ``torchrun`` on CUDA, the process's own GPU ``cuda:LOCAL_RANK``).
* :func:`distributed` — the process's place in a ``torchrun`` job (rank, world size, local
  rank), joining the process group (gloo on CPU, nccl on CUDA) when ``join`` is true.
* :func:`cuda_fast_paths` — TF32 matmuls and the cuDNN algorithm choice (deterministic for
  anything whose bytes must repeat, autotuned for benchmarks). Per-stage choices (bf16
  autocast, channels_last, compile) stay with the stage and call this for the global ones.
* :func:`numerics` — what a network's output bytes depend on besides its inputs and
  weights (device type, CPU instruction set and thread count, or GPU model and library
  versions): recorded, and part of the version, wherever bytes must repeat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Distributed:
    """A process's place in a (possibly one-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed(join: bool = True) -> Distributed:
    """Rank and world size from ``torchrun``'s environment (1 process without it).

    With ``join`` the process group is initialised (once): nccl on CUDA (after binding the
    process to ``cuda:LOCAL_RANK``), gloo on CPU. Without it only the environment is read —
    enough for work split by rank that needs no collective (``generate``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    rank = int(os.environ.get("RANK", "0"))
    if not join:
        return Distributed(rank=rank, world=world, local_rank=local)
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def device(name: str | None = None) -> "torch.device":
    """The device to run on: ``name`` if given, else cuda when available, else cpu.

    A bare ``cuda`` under ``torchrun`` becomes ``cuda:LOCAL_RANK`` (one GPU per process).
    A name torch does not know, or CUDA asked for where there is none, is a
    :class:`~cxrsynth.errors.CxrsynthError`.
    """
    import torch

    from cxrsynth.errors import CxrsynthError

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:  # torch's message lists the device types it knows
        raise CxrsynthError(f"unknown device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CxrsynthError(f"device {name!r}: no CUDA device is available here (use cpu)")
    return dev


def cuda_fast_paths(deterministic: bool) -> None:
    """TF32 matmuls and convolutions; cuDNN deterministic algorithms or autotuning."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def numerics(dev: "torch.device") -> dict:
    """What the bytes of a network's outputs on ``dev`` depend on, besides inputs and weights.

    CPU kernels (oneDNN convolutions, GEMMs) split their sums by the intra-op thread count and
    choose code by instruction set (AVX2, AVX-512...), and each choice rounds differently; on
    CUDA the GPU model and the cuDNN/cuBLAS versions choose the kernels. The torch version is
    in both: a new release may change kernels.
    """
    import torch

    if dev.type == "cuda":
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(dev), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__}
    return {"device": dev.type, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def cpu_threads() -> int:
    """torch's intra-op thread count (what CPU kernels' rounding depends on)."""
    import torch

    return torch.get_num_threads()
