"""Quality benchmark of the phantom (``cxrsynth bench phantom``; not a unit test).

A small CNN is trained on the CPU on ``train`` ``cxp`` phantoms and tested on held-out
``cxp`` phantoms (another seed: other patients) and on ``emory`` phantoms (another
site: a distribution shift). The bar (issue 3): macro AUROC between 0.70 and 0.95 on
held-out ``cxp`` and lower on ``emory``. Images go through the paper's preprocessing
(:func:`cxrsynth.imaging.preprocess`: pad to square, resize, equalize) at a reduced size.

Labels follow the contract: uncertain findings are masked out of the loss (all training
images are used, unlike the paper, which drops them; this is a phantom check, not the
paper's experiment) and out of that finding's AUROC. Findings without both classes in a
test set are left out of its macro mean. Render speed is measured with one thread.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from cxrsynth.imaging import Preprocess, preprocess
from cxrsynth.labels import FINDINGS


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark parameters.

    Attributes:
        train: Training images (``cxp``, seed ``seed``).
        test: Held-out ``cxp`` images (seed ``seed + 1``).
        external: ``emory`` images (seed ``seed + 2``).
        size: Preprocessed side in pixels.
        epochs: Training epochs (upper bound).
        minutes: Optional wall-clock budget for training; stops after the epoch that
            crosses it.
        batch: Batch size.
        lr: AdamW learning rate (one-cycle schedule).
        width: Channels of the first convolution (doubles per stage, capped at 8x).
        seed: Seed of the data and of the model initialization.
        threads: Torch threads (default: all cores).
    """

    train: int = 2000
    test: int = 500
    external: int = 500
    size: int = 96
    epochs: int = 12
    minutes: float | None = None
    batch: int = 32
    lr: float = 3e-3
    width: int = 8
    seed: int = 0
    threads: int | None = None


def _jpeg_roundtrip(image: np.ndarray) -> np.ndarray:
    """What a reader of the written JPEG (cxp, mimic) would see."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=92)
    with Image.open(buffer) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def load_site(site: str, n: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Render ``n`` phantoms of ``site`` in memory and preprocess them.

    Returns:
        ``(images (n, size, size) uint8, labels (n, 14) int8, render seconds)``.
    """
    from cxrsynth.phantom import sample_site

    phantom = sample_site(site, n, seed)
    params = Preprocess(size=size, equalize=True)
    out = np.empty((n, size, size), dtype=np.uint8)
    render_s = 0.0
    images = phantom.images()
    for i in range(n):
        t0 = time.perf_counter()
        image = next(images)
        render_s += time.perf_counter() - t0
        if site in ("cxp", "mimic"):
            image = _jpeg_roundtrip(image)
        out[i] = preprocess(image, params)
    return out, phantom.cohort.labels, render_s


def render_speed(site: str = "cxp", n: int = 160, seed: int = 0) -> float:
    """Images per second per core of the renderer alone (one thread)."""
    from threadpoolctl import threadpool_limits

    from cxrsynth.phantom import sample_site
    from cxrsynth.phantom.render import render

    phantom = sample_site(site, n, seed)
    with threadpool_limits(limits=1):
        render(phantom.scene.take(slice(0, 16)), phantom.site.imaging)  # warm-up
        t0 = time.perf_counter()
        render(phantom.scene, phantom.site.imaging)
        return n / (time.perf_counter() - t0)


def build_model(width: int = 8, classes: int = len(FINDINGS)):
    """A small VGG-style CNN: five conv-BN-ReLU stages with max pooling, global pooling."""
    import torch.nn as nn

    layers: list[nn.Module] = []
    c_in = 1
    for stage in range(5):
        c_out = width * min(2**stage, 8)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if stage < 4:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def auroc(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Per-finding AUROC with uncertain (-1) masked out; NaN where a class is missing."""
    from sklearn.metrics import roc_auc_score

    result = {}
    for k, name in enumerate(FINDINGS):
        keep = labels[:, k] != -1
        y = labels[keep, k]
        result[name] = float(roc_auc_score(y, scores[keep, k])) if 0 < y.sum() < y.size else float("nan")
    return result


def _to_tensor(images: np.ndarray):
    import torch

    x = torch.from_numpy(images).float().div_(255.0).sub_(0.5).div_(0.25)
    return x[:, None]  # (N, 1, S, S)


def train(model, images: np.ndarray, labels: np.ndarray, cfg: BenchConfig, log=print) -> dict:
    """Masked-BCE training with AdamW and a one-cycle schedule; returns timing."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(cfg.seed)
    x = _to_tensor(images)
    y = torch.from_numpy(labels.astype(np.float32))
    mask = (y != -1).float()
    y = y.clamp(min=0)
    steps_per_epoch = (len(x) + cfg.batch - 1) // cfg.batch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    epochs = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = torch.zeros(())
        for start in range(0, len(x), cfg.batch):
            idx = order[start : start + cfg.batch]
            xb = x[idx]
            # Augmentation: small random translation (the phantom's framing already varies).
            dy, dx = (int(v) for v in torch.randint(-4, 5, (2,), generator=gen))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.binary_cross_entropy_with_logits(model(xb), y[idx], weight=mask[idx], reduction="sum")
            loss = loss / mask[idx].sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        epochs += 1
        minutes = (time.perf_counter() - t0) / 60
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {total.item() / len(x):.4f}  {minutes:.1f} min")
        if cfg.minutes is not None and minutes >= cfg.minutes:
            break
    return {"epochs": epochs, "train_seconds": time.perf_counter() - t0}


def predict(model, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Sigmoid scores (N, 14)."""
    import torch

    model.eval()
    x = _to_tensor(images)
    with torch.no_grad():
        return torch.cat([torch.sigmoid(model(x[i : i + batch])) for i in range(0, len(x), batch)]).numpy()


def run_bench(cfg: BenchConfig = BenchConfig(), log=print) -> dict:
    """Render, train, evaluate; returns figures (also suitable for the README).

    Returns:
        ``config``, ``render_images_per_second_per_core`` (320x390 ``cxp``),
        ``data_seconds``, ``epochs``, ``train_seconds``, ``cxp`` and ``emory``
        (per-finding AUROC dicts), ``macro_cxp``, ``macro_emory``, ``passed``.
    """
    import torch

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    speed = render_speed("cxp", 160, cfg.seed)
    log(f"render speed: {speed:.1f} images/s per core (cxp, {320}x{390})")
    t0 = time.perf_counter()
    x_train, y_train, _ = load_site("cxp", cfg.train, cfg.seed, cfg.size)
    x_test, y_test, _ = load_site("cxp", cfg.test, cfg.seed + 1, cfg.size)
    x_ext, y_ext, _ = load_site("emory", cfg.external, cfg.seed + 2, cfg.size)
    data_s = time.perf_counter() - t0
    log(f"rendered and preprocessed {cfg.train + cfg.test + cfg.external} images in {data_s:.0f} s")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching global state
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.width)
    timing = train(model, x_train, y_train, cfg, log)
    cxp = auroc(y_test, predict(model, x_test))
    emory = auroc(y_ext, predict(model, x_ext))
    macro_cxp = float(np.nanmean(list(cxp.values())))
    macro_emory = float(np.nanmean(list(emory.values())))
    return {
        "config": asdict(cfg),
        "render_images_per_second_per_core": speed,
        "data_seconds": data_s,
        **timing,
        "cxp": cxp,
        "emory": emory,
        "macro_cxp": macro_cxp,
        "macro_emory": macro_emory,
        "passed": bool(0.70 <= macro_cxp <= 0.95 and macro_emory < macro_cxp and speed >= 50),
    }
