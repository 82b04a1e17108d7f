"""Training checkpoints of both trainers (generator and classifier): one save, one load, one RNG policy.

* :func:`save` writes a checkpoint atomically (a temporary file renamed into place), so a
  run killed mid-write leaves the previous checkpoint whole.
* :func:`load` reads one without running code in it (``weights_only=True`` through
  :func:`cxrsynth.safeload.load_torch`: a checkpoint directory may come from another
  machine), and refuses a file that lacks what the trainer needs, naming the keys.
* Both refuse a state holding NaN or infinite values (:func:`cxrsynth.safeload.check_finite`),
  and :func:`check_loss` stops a trainer whose loss became NaN or infinite
  (:class:`Diverged`) before it writes anything from that point on.
* The RNG policy. A training run owns its randomness and leaves the caller's alone:

  1. it runs with the global torch generators forked (:func:`forked_rng` /
     :func:`isolated_rng`): the CPU one and, on CUDA, the run's device's; the caller's
     states come back when the run ends, however it ends;
  2. it seeds them per rank from the run's seed (:func:`seed_run`), so the draws of the
     model's own layers (dropout, drop-path) are a function of (seed, rank) and never of
     what the process did before; draws the loop makes itself may come from explicit
     ``torch.Generator`` objects the run seeds (the generator's noise and timesteps);
  3. a checkpoint holds every rank's :func:`rng_state` (global CPU, the CUDA device's,
     and the run's generators) and :func:`set_rng_state` puts them back on resume, so a
     resumed run on CPU continues bit for bit (tested for both trainers).

  numpy's and Python's global generators are not part of it: no training code draws from
  them (the loader derives its own seeded generators from (seed, epoch, position)).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from cxrsynth.errors import CxrsynthError

F = TypeVar("F", bound=Callable[..., Any])


class Diverged(CxrsynthError):
    """A training run whose loss became NaN or infinite: stopped before writing NaN weights."""


def check_loss(losses: Sequence[float], where: str, lr: float) -> None:
    """Stop a run (:class:`Diverged`) if any of ``losses`` (one per rank, or one) is NaN or infinite.

    Args:
        losses: Loss values every rank agrees on (gathered or all-reduced), so that every
            rank stops at the same point.
        where: When, for the message (``epoch 2``, ``step 40``).
        lr: The run's learning rate, for the advice.
    """
    bad = [x for x in losses if not math.isfinite(x)]
    if bad:
        raise Diverged(f"training diverged: the loss is {bad[0]} at {where}; stopped before writing weights or a "
                       f"checkpoint from this point on (checkpoints written before stay). Lower the learning rate "
                       f"(it is {lr:g}) or check the data")


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` to ``path`` atomically (``path.tmp``, then a rename).

    Raises:
        NonFiniteWeights: a tensor of ``state`` holds NaN or an infinity (nothing is written).
    """
    from cxrsynth.safeload import check_finite, writing

    path = Path(path)
    check_finite(state, f"not writing the checkpoint {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, "the checkpoint", partial=tmp):
        torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path, required: Sequence[str] = (), device: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint, loaded without running code in it (``weights_only=True``).

    Args:
        path: The checkpoint file.
        required: Keys the trainer needs; a file lacking any is refused.
        device: ``map_location`` of its tensors.

    Raises:
        CxrsynthError: the file is unreadable, needs code to load, lacks a required key, or
            holds NaN or infinite values.
    """
    from cxrsynth.safeload import load_torch

    from cxrsynth.safeload import check_finite

    state = load_torch(path, "training checkpoint", map_location=device)
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state, dict):
        raise CxrsynthError(f"{path} is not a cxrsynth training checkpoint (lacks {', '.join(missing) or 'a dict'})")
    check_finite(state, str(path))
    return state


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """The global CPU generator (and ``device``'s, on CUDA) as they were, once the block ends."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def isolated_rng(fn: F) -> F:
    """Run ``fn`` inside :func:`forked_rng` on the device its ``device`` argument resolves to
    (:func:`cxrsynth.runtime.device`), so that a trainer may seed the global generators."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from cxrsynth import runtime

        device = signature.bind(*args, **kwargs).arguments.get("device")
        with forked_rng(runtime.device(None if device is None else str(device))):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def seed_run(seed: int, rank: int) -> None:
    """Seed the global torch generators (CPU and CUDA) for one rank of a run (inside :func:`forked_rng`)."""
    from cxrsynth.loader import derive_seed

    torch.manual_seed(derive_seed("train", seed, rank))


def rng_state(device: torch.device, generator: torch.Generator | None = None) -> dict[str, Any]:
    """This rank's random state: ``cpu`` (global), ``cuda`` (the device's, on CUDA), ``gen`` (the run's generator)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if generator is not None:
        state["gen"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device, generator: torch.Generator | None = None) -> None:
    """Put back what :func:`rng_state` captured (the parts a checkpoint holds; older ones may lack ``cpu``)."""
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if generator is not None:
        generator.set_state(state["gen"])
