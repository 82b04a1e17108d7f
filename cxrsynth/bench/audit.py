"""Memorization-audit speed: nearest-neighbour search of synthetic against real embeddings.

Random unit vectors stand in for embeddings (the search does not care what they mean); the
timed call is :func:`cxrsynth.share.embed.nearest`, the chunked matrix product + top-k that
``cxrsynth share audit`` runs. The figure is seconds per million (synthetic, training)
pairs, and from it the paper's scale: 720K synthetic against 72K real images (5.2e10 pairs).
The ``pixels`` embedding of decoded images is timed too (images/s), the other part of an audit.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrsynth.bench import Timer
from cxrsynth.config import Record

#: The paper's scale: 10 replicas of CheXpert's 72,053 training images, against those images.
PAPER_PAIRS = 720_530 * 72_053


@dataclass(frozen=True)
class AuditBench(Record):
    """What one audit timing measured."""

    device: str
    threads: int
    queries: int
    bank: int
    dim: int
    k: int
    chunk: int
    seconds: float
    seconds_per_million_pairs: float
    paper_scale_hours: float
    embed_images_per_s: float


def bench_audit(queries: int = 4096, bank: int = 16384, dim: int = 1024, k: int = 5, chunk: int = 4096,
                device: str | None = None, seed: int = 0, repeats: int = 3) -> AuditBench:
    """Time ``queries x bank`` nearest-neighbour search at embedding size ``dim`` (best of ``repeats``)."""
    import torch

    from cxrsynth import runtime
    from cxrsynth.share import embed

    dev = runtime.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1).to(dev)
    b = torch.nn.functional.normalize(torch.randn(bank, dim, generator=gen), dim=1).to(dev)
    embed.nearest(q[:chunk], b, k, chunk)  # warm-up (allocations, kernels)
    timer = Timer(sync)
    for _ in range(repeats):
        timer.run("nearest", queries * bank, lambda: embed.nearest(q, b, k, chunk))
    seconds = min(r["seconds"] for r in timer.rows)
    per_million = seconds / (queries * bank / 1e6)
    side = int(round(dim ** 0.5))
    images = torch.randint(0, 256, (1024, side, side), dtype=torch.uint8, generator=gen).to(dev)
    pixels = embed.pixels(side)
    pixels(images[:64])
    timer.run("embed pixels", len(images), lambda: pixels(images))
    return AuditBench(device=str(dev), threads=runtime.cpu_threads(), queries=queries, bank=bank, dim=dim, k=k, chunk=chunk,
                      seconds=seconds, seconds_per_million_pairs=per_million,
                      paper_scale_hours=per_million * PAPER_PAIRS / 1e6 / 3600,
                      embed_images_per_s=timer.rows[-1]["per_second"])
