"""Bootstrap speed: B replicates of N images x 14 findings on random data (the paper: 1000 x 56K).

Random scores (float32, as predictions store them) and labels with prevalences spread from
1% to 45% (CheXpert's range) and 5% uncertain; the timed call is
:func:`cxrsynth.evaluate.auroc.bootstrap_aurocs`, the code ``cxrsynth evaluate`` runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cxrsynth import labels
from cxrsynth.config import Record
from cxrsynth.evaluate.metrics import EvaluateConfig


@dataclass(frozen=True)
class BootstrapBench(Record):
    """What one bootstrap timing measured."""

    images: int
    replicates: int
    findings: int
    cluster: str
    threads: int
    seconds: float
    cpu_seconds: float
    replicates_per_s: float
    mean_auroc: float


def bench_bootstrap(images: int = 56_000, replicates: int = EvaluateConfig.bootstrap, seed: int = 0, cluster: str = "image",
                    threads: int | None = None) -> BootstrapBench:
    """Time the bootstrap on random data; ``cluster="patient"`` groups images 2-4 per patient."""
    from cxrsynth.evaluate.auroc import available_cpus, bootstrap_aurocs

    rng = np.random.default_rng(seed)
    f = len(labels.FINDING_COLUMNS)
    prevalence = np.linspace(0.01, 0.45, f)
    u = rng.random((images, f))
    y = np.where(u < 0.05, -1, (rng.random((images, f)) < prevalence).astype(np.int8)).astype(np.int8)
    scores = rng.random((images, f)).astype(np.float32)
    codes = None
    if cluster == "patient":
        codes = np.sort(rng.integers(0, max(1, images // 3), size=images))
        codes = np.unique(codes, return_inverse=True)[1]
    threads = threads or available_cpus()
    start, cpu = time.perf_counter(), time.process_time()
    reps = bootstrap_aurocs([scores], y, codes, replicates, seed, threads=threads)[0]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return BootstrapBench(images=images, replicates=replicates, findings=f, cluster=cluster, threads=threads,
                          seconds=seconds, cpu_seconds=cpu, replicates_per_s=replicates / seconds,
                          mean_auroc=float(np.nanmean(reps)))
