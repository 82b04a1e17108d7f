"""Can the audit's embeddings recognise a phantom patient? Patient verification on held-out patients.

:func:`phantom_reid` renders ``n`` images of a phantom site (:func:`cxrsynth.phantom.sample_site`),
preprocesses them as ingest does (pad to square, resize, histogram equalization), holds out a
share of the patients, trains the audit's ``reid`` network (:func:`cxrsynth.share.embed.train_reid`)
on the others and reports the verification AUROC (:func:`cxrsynth.share.audit.reid_auroc`: two
images of one patient from different studies against two images of different patients, cosine
similarity as the score) of ``reid`` and of ``pixels`` on the held-out patients.

The phantom's patients carry persistent anatomy (:mod:`cxrsynth.phantom.anatomy`), so ``reid``
should reach >= 0.95 while ``pixels`` stays clearly lower (issue 17); before that anatomy both
were 0.49 (cxp, 2400 images, 64 px). ``scripts/reid-phantom.py`` is the command line.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd


def render_site(site: str, n: int, size: int, seed: int, canvas: float = 1.0) -> tuple[np.ndarray, pd.DataFrame]:
    """``(N, size, size) uint8`` preprocessed images and their ``patient_id`` / ``study_id`` frame.

    ``canvas`` < 1 renders on a smaller canvas than the site's (the same scenes at a lower
    native resolution, ``canvas**2`` of the time): for quick checks at small ``size``.
    """
    from dataclasses import replace

    from cxrsynth.imaging import Preprocess, preprocess
    from cxrsynth.phantom import sample_site

    phantom = sample_site(site, n, seed)
    if canvas != 1.0:
        imaging = phantom.site.imaging
        small = replace(imaging, size=tuple(int(round(canvas * s)) for s in imaging.size),
                        crop_jitter=int(round(canvas * imaging.crop_jitter)))
        scene = phantom.scene  # the crops, scaled onto the small canvas
        scene.height, scene.width = (np.round(canvas * scene.height).astype(int), np.round(canvas * scene.width).astype(int))
        scene.crop = np.round(canvas * scene.crop).astype(int)
        phantom.site = replace(phantom.site, imaging=small)
    params = Preprocess(size=size)
    images = np.stack([preprocess(image, params) for image in phantom.images()])
    f = phantom.cohort.frame
    frame = pd.DataFrame({"patient_id": [f"patient{p:05d}" for p in f["patient"]],
                          "study_id": [f"patient{p:05d}_study{s}" for p, s in zip(f["patient"], f["study_of_patient"])]})
    return images, frame


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """As the audit decodes a stored image for an embedding of another side (PIL bilinear)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def phantom_reid(site: str = "cxp", n: int = 2400, size: int = 64, seed: int = 0, held_out: float = 0.3,
                 pairs: int = 20000, pixel_size: int = 32, canvas: float = 1.0, **reid: Any) -> dict[str, Any]:
    """Verification AUROC of ``reid`` (trained on the other patients) and ``pixels`` on held-out phantom patients.

    Args:
        site: Phantom site.
        n: Images rendered.
        size: Side the images are preprocessed to (and the reid network's input).
        seed: Seeds the phantom, the held-out patients, the pair sample and the network.
        held_out: Share of the patients never seen in training.
        pairs: Most same-patient pairs per AUROC (the audit's default).
        pixel_size: Side of the ``pixels`` embedding (the audit's default).
        canvas: Render on this fraction of the site's canvas (:func:`render_site`).
        reid: :class:`~cxrsynth.share.embed.ReidConfig` settings other than ``size`` and ``seed``
            (the audit's defaults otherwise).
    """
    import torch

    from cxrsynth.share import embed
    from cxrsynth.share.audit import reid_auroc

    t0 = time.perf_counter()
    images, frame = render_site(site, n, size, seed, canvas)
    t_render = time.perf_counter() - t0
    patients = frame["patient_id"].unique()
    held = set(np.random.default_rng(seed).permutation(patients)[: int(round(held_out * len(patients)))])
    is_held = frame["patient_id"].isin(held).to_numpy()
    studies = frame.groupby("patient_id")["study_id"].nunique()

    config = embed.ReidConfig(size=size, seed=seed, **reid)
    t0 = time.perf_counter()
    train = frame[~is_held].reset_index(drop=True)
    network = embed.train_reid(images[~is_held], train["patient_id"], config, torch.device("cpu"))
    t_train = time.perf_counter() - t0

    held_frame = frame[is_held].reset_index(drop=True)
    small = torch.from_numpy(np.stack([resize(image, pixel_size) for image in images[is_held]]))
    return {
        "site": site, "n": n, "size": size, "seed": seed, "canvas": canvas,
        "patients": int(len(patients)), "patients_with_2plus_studies": int((studies >= 2).sum()),
        "held_out_patients": int(len(held)), "held_out_images": int(is_held.sum()),
        "reid_config": config.to_dict(),
        "auroc_held_out": {"reid": reid_auroc(held_frame, network(torch.from_numpy(images[is_held])), pairs, seed),
                           "pixels": reid_auroc(held_frame, embed.pixels(pixel_size)(small), pairs, seed)},
        "auroc_train": {"reid": reid_auroc(train, network(torch.from_numpy(images[~is_held])), pairs, seed)["auroc"]},
        "seconds": {"render": round(t_render, 1), "train_reid": round(t_train, 1)},
    }
