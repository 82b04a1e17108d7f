"""Loader throughput (``cxrsynth bench load``): decoded images/s against the PNG-decode ceiling.

The ceiling is PIL decoding the same PNG bytes in a tight loop in this process (the
bytes read beforehand, no tar, no tensors): what one core can decode at best. Each
worker count then streams one training epoch of the same rows through
:class:`cxrsynth.loader.ShardLoader` (tar reading, manifest selection, shuffle buffer,
decode, float tensors, collation, the trip from worker processes) and reports images/s
over the epoch, the time to its first batch (worker start-up, shuffle buffer fill), the
steady images/s after it, that rate per worker (per process for 0 workers) as a share
of the ceiling, and the speed-up over one worker. Augmentation is off by default, so that the loader and the
ceiling do the same decoding work; ``augment=True`` times the training pipeline whole.

On a shared machine a core's speed drifts by 10-20% over seconds, more than the gap being
measured. So the measurement runs in *rounds*: each round times the ceiling and then one
epoch per worker count, back to back, and a worker count's share of the ceiling is the
median over rounds of its rate divided by the same round's ceiling (a paired ratio);
the rates shown are the best round's.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from cxrsynth import loader, shards
from cxrsynth.bench import Timer
from cxrsynth.imaging import decode_png


@dataclass(frozen=True)
class LoadBenchConfig:
    """What ``bench load`` measures.

    Attributes:
        name: Dataset or mix.
        split: Split streamed (``None``: every row).
        workers: Worker counts to time (0: in the main process).
        batch_size: Images per batch.
        limit: At most this many rows (the first by key); None: all.
        image_size: Resize to this side (None: the shards' size, as the ceiling decodes).
        augment: Time the training augmentations too.
        repeats: Rounds (each times the ceiling and one epoch per worker count).
    """

    name: str
    split: str | None = "train"
    workers: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 64
    limit: int | None = None
    image_size: int | None = None
    augment: bool = False
    repeats: int = 1


def _png_bytes(root: Path, rows) -> list[bytes]:
    """The PNG bytes of ``rows``, read from their shards (in-process, once)."""
    return [png for _, png in shards.images(root, rows)]


def _time_epoch(data: loader.ShardLoader, epoch: int) -> dict:
    """One epoch: images/s overall, seconds to the first batch (worker start, shuffle buffer), images/s after it."""
    start = time.perf_counter()
    batches = data.batches(epoch)
    first = len(next(batches)["key"])
    t_first = time.perf_counter()
    rest = sum(len(b["key"]) for b in batches)
    end = time.perf_counter()
    return {"images": first + rest, "seconds": end - start, "images_per_s": (first + rest) / (end - start),
            "first_batch_s": t_first - start, "steady_images_per_s": rest / max(end - t_first, 1e-9)}


def bench_load(root: str | Path, config: LoadBenchConfig) -> dict:
    """Time the PNG-decode ceiling and one loader epoch per worker count.

    Returns:
        ``{"config", "images", "image_side", "cpu_count", "ceiling": {...}, "loader": [{"workers",
        "images", "seconds", "images_per_s", "first_batch_s", "steady_images_per_s",
        "per_worker_of_ceiling" (median over rounds of the paired ratio), "rounds_of_ceiling",
        "speedup_vs_1"}, ...]}`` (the steady rate is the one compared).
    """
    root = Path(root)
    rows = loader.select(root, config.name, config.split, exclude_uncertain=False)
    rows = rows.sort_values("key").head(config.limit) if config.limit else rows
    n_rows = len(rows)
    pngs = _png_bytes(root, rows)
    timer = Timer()
    decode_png(pngs[0], config.image_size)  # warm-up (PIL plugins)
    side = decode_png(pngs[0], config.image_size).shape[0]
    batch = min(config.batch_size, n_rows)
    streams = math.lcm(*[w for w in config.workers if w > 0] or [1])  # the same batches for every worker count
    loaders = {w: loader.ShardLoader(root, rows, loader.LoaderConfig(
        batch_size=batch, image_size=config.image_size, train=True, augment=loader.Augment() if config.augment else None,
        workers=w, streams=streams)) for w in config.workers}
    runs: dict[int, list[dict]] = {w: [] for w in config.workers}
    for epoch in range(max(1, config.repeats)):
        timer.run("PIL decode, 1 process", len(pngs), lambda: [decode_png(p, config.image_size) for p in pngs])
        ceiling = timer.rows[-1]
        for w, data in loaders.items():
            run = _time_epoch(data, epoch)
            runs[w].append({**run, "of_ceiling": run["steady_images_per_s"] / max(1, w) / ceiling["per_second"]})
    ceiling_row = max(timer.rows, key=lambda r: r["per_second"])
    results = []
    for w in config.workers:
        best = max(runs[w], key=lambda r: r["steady_images_per_s"])
        results.append({"workers": w, **{k: v for k, v in best.items() if k != "of_ceiling"},
                        "per_worker_of_ceiling": statistics.median(r["of_ceiling"] for r in runs[w]),
                        "rounds_of_ceiling": [r["of_ceiling"] for r in runs[w]]})
    one = next((r["steady_images_per_s"] for r in results if r["workers"] == 1), None)
    for r in results:
        r["speedup_vs_1"] = r["steady_images_per_s"] / one if one else None
    return {
        "config": {**config.__dict__, "workers": list(config.workers)},
        "images": n_rows,
        "image_side": int(side),
        "cpu_count": os.cpu_count(),
        "ceiling": {"images": len(pngs), "seconds": ceiling_row["seconds"], "images_per_s": ceiling_row["per_second"]},
        "loader": results,
    }
