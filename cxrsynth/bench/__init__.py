"""Every benchmark of the project: commands that print figures, never tests.

One module per thing measured: :mod:`.ingest` (the data layer), :mod:`.phantom` (the
embedded sites' renderer and learnability), :mod:`.generator` (sampling and training
throughput, MFU), :mod:`.roofline` (what the generator network allows, counted on meta
tensors). :class:`Timer` is the one timing helper they share; the CLI is
``cxrsynth bench ...`` (:mod:`cxrsynth.cli.bench`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Timer:
    """Collects timed rows ``{"what", "items", "seconds", "per_second"}``.

    ``timer.run(what, items, fn)`` calls ``fn()`` once, records the wall time and the items
    per second, and returns ``fn``'s result; ``sync`` (e.g. ``torch.cuda.synchronize``) runs
    before the clock stops, so asynchronous GPU work is inside the measurement.
    """

    def __init__(self, sync: Callable[[], Any] | None = None) -> None:
        self.rows: list[dict] = []
        self.sync = sync

    def run(self, what: str, items: int, fn: Callable[[], T], **extra: Any) -> T:
        start = time.perf_counter()
        out = fn()
        if self.sync is not None:
            self.sync()
        seconds = time.perf_counter() - start
        self.rows.append({"what": what, "items": items, "seconds": seconds, "per_second": items / seconds if seconds > 0 else float("inf"), **extra})
        return out
