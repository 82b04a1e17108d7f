"""Memorization-audit speed: nearest-neighbour search of synthetic against real embeddings.

Random unit vectors stand in for embeddings (the search does not care what they mean); the
timed call is :func:`cxrsynth.share.embed.nearest`, the chunked matrix product + top-k that
``cxrsynth share audit`` runs. The figure is seconds per million (synthetic, training)
pairs, and from it the paper's scale: 720K synthetic against 72K real images (5.2e10 pairs).
The ``pixels`` embedding of decoded images is timed too (images/s), and the detector rule's
test-time alignment (:class:`cxrsynth.share.align.Aligner`: each synthetic image registered
onto its ``candidates`` nearest, ``(image, candidate)`` pairs per second), which dominates the
default audit: the paper's scale registers 720K x 16 pairs.
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
    align_size: int
    align_candidates: int
    align_pairs_per_s: float
    paper_scale_align_hours: float


def bench_audit(queries: int = 4096, bank: int = 16384, dim: int = 1024, k: int = 5, chunk: int = 4096,
                device: str | None = None, seed: int = 0, repeats: int = 3, align_size: int = 64,
                align_candidates: int = 16, align_queries: int | None = None) -> AuditBench:
    """Time ``queries x bank`` nearest-neighbour search at embedding size ``dim`` (best of ``repeats``), and the
    alignment of ``align_queries`` images onto ``align_candidates`` each at ``align_size`` px (default: 64 images on
    a CPU, 1,024 on a GPU)."""
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
    embed_rate = timer.rows[-1]["per_second"]

    import numpy as np

    from cxrsynth.share.align import Aligner

    n_align = align_queries or (1024 if dev.type == "cuda" else 64)
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(256, align_size, align_size), dtype=np.uint8)
    query = rng.integers(0, 256, size=(n_align, align_size, align_size), dtype=np.uint8)
    cand = rng.integers(0, len(train), size=(n_align, align_candidates))
    aligner = Aligner(train, size=align_size, device=dev, chunk=32 if dev.type == "cpu" else 256)
    aligner.distances(query[:2], cand[:2])  # warm-up
    timer.run("align", n_align * align_candidates, lambda: aligner.distances(query, cand))
    pairs_per_s = timer.rows[-1]["per_second"]
    return AuditBench(device=str(dev), threads=runtime.cpu_threads(), queries=queries, bank=bank, dim=dim, k=k, chunk=chunk,
                      seconds=seconds, seconds_per_million_pairs=per_million,
                      paper_scale_hours=per_million * PAPER_PAIRS / 1e6 / 3600,
                      embed_images_per_s=embed_rate, align_size=align_size, align_candidates=align_candidates,
                      align_pairs_per_s=pairs_per_s,
                      paper_scale_align_hours=720_530 * align_candidates / pairs_per_s / 3600)
