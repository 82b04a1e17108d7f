"""Classifier throughput (``cxrsynth bench classifier``): training and inference images/s, peak memory.

Training times :meth:`cxrsynth.classify.train.Trainer.step` — the very step ``classifier
train`` runs (masked BCE, the preset's optimizer, EMA update, clipping, bf16 autocast and
channels_last on CUDA) — on random images and labels held in CPU memory like a loader
batch (so the host-to-device copy is inside). Inference times the forward that
``classifier predict`` runs (EMA weights, eval mode, autocast). Data loading is not
included (``cxrsynth bench load`` measures it). Peak memory: CUDA's
``max_memory_allocated`` per phase; on CPU the process's peak resident set size.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import torch

from cxrsynth import runtime
from cxrsynth.bench import Timer
from cxrsynth.classify.presets import get_preset
from cxrsynth.classify.train import Trainer, autocast, to_device
from cxrsynth.config import Record
from cxrsynth.labels import FINDINGS


@dataclass
class ClassifierBench(Record):
    """One ``bench classifier`` result."""

    preset: str
    model: str
    parameters_m: float
    image_size: int
    batch: int
    steps: int
    device: str
    threads: int
    train_images_per_s: float
    infer_images_per_s: float
    train_peak_memory_gib: float | None  # CUDA only
    infer_peak_memory_gib: float | None  # CUDA only
    peak_rss_gib: float  # the process's peak resident set (CPU memory)


def _random_batch(batch: int, size: int, gen: torch.Generator, pin: bool) -> dict[str, Any]:
    image = torch.rand(batch, 1, size, size, generator=gen)  # (B, 1, S, S) in [0, 1], as the loader's
    labels = (torch.rand(batch, len(FINDINGS), generator=gen) < 0.3).float()
    out = {"image": image, "labels": labels, "mask": torch.ones_like(labels), "key": [str(i) for i in range(batch)]}
    if pin:
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def bench_classifier(preset: str = "small", *, batch: int | None = None, image_size: int | None = None, steps: int = 10,
                     warmup: int = 3, device: str | None = None, model: str | None = None) -> ClassifierBench:
    """Time ``steps`` training steps and ``steps`` inference batches after ``warmup`` of each."""
    config = get_preset(preset, batch_size=batch, image_size=image_size, model=model)
    dev = runtime.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else None
    timer = Timer(sync=sync)
    trainer = Trainer(config, dev, total_steps=warmup + steps)
    gen = torch.Generator().manual_seed(0)
    data = [_random_batch(config.batch_size, config.image_size, gen, pin=cuda) for _ in range(2)]
    b = config.batch_size

    def train(n: int) -> None:
        for i in range(n):
            trainer.step(data[i % 2])

    def infer(n: int) -> None:
        model = trainer.eval_model.eval()
        with torch.no_grad():
            for i in range(n):
                with autocast(dev, trainer.fast):
                    model(to_device(data[i % 2]["image"], dev, trainer.fast)).float().sigmoid()

    peaks: list[float | None] = []
    for what, fn in (("train", train), ("infer", infer)):
        fn(warmup)
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        timer.run(what, steps * b, lambda: fn(steps))
        peaks.append(torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    rates = {r["what"]: r["per_second"] for r in timer.rows}
    return ClassifierBench(
        preset=preset, model=config.model, parameters_m=sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        image_size=config.image_size, batch=b, steps=steps, device=str(dev), threads=runtime.cpu_threads(),
        train_images_per_s=rates["train"], infer_images_per_s=rates["infer"],
        train_peak_memory_gib=peaks[0], infer_peak_memory_gib=peaks[1], peak_rss_gib=rss_gib,
    )
