"""Data-layer benchmarks (``cxrsynth bench ingest``): figures, not tests.

Measures, on phantom CheXpert-format images written to a scratch folder:
image ingest (read JPEG → pad/resize/equalize → PNG → tar) with 1 worker and with
all workers, streaming the shards back as decoded batches, and — given CheXpert's
real train.csv — the labels-only ingest of its 223,414 rows.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cxrsynth.bench import Timer


def bench_ingest(n: int = 1000, size: int = 256, workers: int | None = None, chexpert_csv: Path | None = None, seed: int = 0) -> list[dict]:
    """Run the data-layer timings; returns rows ``{"what", "items", "seconds", "per_second"}``."""
    from cxrsynth import ingest, loader, splits
    from cxrsynth.errors import CxrsynthError

    if chexpert_csv is not None and not Path(chexpert_csv).is_file():
        raise CxrsynthError(f"CheXpert CSV not found: {chexpert_csv}")  # before minutes of image work
    from cxrsynth.imaging import Preprocess
    from cxrsynth.phantom import write_site
    from cxrsynth.sources import chexpert

    workers = workers or os.cpu_count() or 1
    timer = Timer()
    timed = timer.run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_site("cxp", n, tmp / "raw", seed=seed)
        csv = tmp / "raw/CheXpert-v1.0/train.csv"
        source = chexpert.read(csv)
        count = len(source.records)
        params = Preprocess(size=size)
        import webdataset  # noqa: F401  (torch import outside the timings)

        timed("ingest images, 1 worker", count, lambda: ingest.ingest(
            source, root=tmp / "one", name="cxp", kind="chexpert", inputs={}, params=params, shard_size=max(count // 8, 1), workers=1))
        timed(f"ingest images, {workers} workers", count, lambda: ingest.ingest(
            source, root=tmp / "many", name="cxp", kind="chexpert", inputs={}, params=params, shard_size=max(count // 8, 1), workers=workers))
        splits.split(tmp / "one", "cxp", splits.SplitParams(tune=0.0, seed=0))
        rows = loader.select(tmp / "one", "cxp", "train", exclude_uncertain=False)
        generator_batches = loader.LoaderConfig(batch_size=min(64, len(rows)), image_size=size, augment=None, order="buffer",
                                                cond=True, uint8=True)  # the generator's batches
        timed("stream + decode batches (1 process)", count, lambda: sum(
            len(b["key"]) for b in loader.ShardLoader(tmp / "one", rows, generator_batches).batches()))
        if chexpert_csv is not None:
            full = chexpert.read(chexpert_csv)
            timed("labels-only ingest, CheXpert train.csv", full.rows_in, lambda: ingest.ingest(
                chexpert.read(chexpert_csv), root=tmp / "labels", name="cxpfull", kind="chexpert", inputs={}, labels_only=True))
    return timer.rows
