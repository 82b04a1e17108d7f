"""Can the audit's embeddings recognise a phantom patient? Patient-verification AUROC on held-out patients.

Renders ``N`` images of a phantom site (:func:`cxrsynth.phantom.sample_site`), preprocesses them
as ingest does (pad to square, resize to ``--size`` px, histogram equalization), splits the
patients in two (``--held-out`` of them are never seen in training), trains the audit's ``reid``
network (:func:`cxrsynth.share.embed.train_reid`, the audit's default :class:`ReidConfig` unless
``--steps`` etc. say otherwise) on the training patients, and reports the verification AUROC
(:func:`cxrsynth.share.audit.reid_auroc`: two images of one patient from different studies
against two images of different patients, cosine similarity as the score) of ``reid`` and of
``pixels`` on the held-out patients. Prints one JSON object.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/reid-phantom.py --site cxp --n 2400

The phantom's patients carry persistent anatomy (cxrsynth.phantom.render.sample_anatomy), so
``reid`` should reach >= 0.95 while ``pixels`` stays clearly lower (issue 17).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd


def render_site(site: str, n: int, size: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """``(N, size, size) uint8`` preprocessed images and their ``patient_id`` / ``study_id`` frame."""
    from cxrsynth.imaging import Preprocess, preprocess
    from cxrsynth.phantom import sample_site

    phantom = sample_site(site, n, seed)
    params = Preprocess(size=size)
    images = np.stack([preprocess(image, params) for image in phantom.images()])
    f = phantom.cohort.frame
    frame = pd.DataFrame({"patient_id": f["patient"].map(lambda p: f"patient{p:05d}"),
                          "study_id": [f"patient{p:05d}_study{s}" for p, s in zip(f["patient"], f["study_of_patient"])]})
    return images, frame


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """As the audit decodes a stored image for an embedding of another side (PIL bilinear)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def main() -> None:
    import torch

    from cxrsynth.share import embed
    from cxrsynth.share.audit import reid_auroc

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", default="cxp")
    ap.add_argument("--n", type=int, default=2400, help="images rendered (params.yaml's phantom: cxp is 2400)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--held-out", type=float, default=0.3, help="fraction of patients held out of training")
    ap.add_argument("--pairs", type=int, default=20000, help="most same-patient pairs per AUROC (the audit's default)")
    ap.add_argument("--pixel-size", type=int, default=32, help="side of the pixels embedding (the audit's default)")
    ap.add_argument("--seed", type=int, default=0)
    for name, kind in (("steps", int), ("width", int), ("dim", int), ("patients", int), ("lr", float), ("shift", int)):
        ap.add_argument(f"--{name}", type=kind, default=None, help=f"ReidConfig.{name} (default: the audit's)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    images, frame = render_site(args.site, args.n, args.size, args.seed)
    t_render = time.perf_counter() - t0
    patients = frame["patient_id"].unique()
    held = set(np.random.default_rng(args.seed).permutation(patients)[: int(round(args.held_out * len(patients)))])
    is_held = frame["patient_id"].isin(held).to_numpy()
    studies = frame.groupby("patient_id")["study_id"].nunique()

    overrides = {k: getattr(args, k) for k in ("steps", "width", "dim", "patients", "lr", "shift") if getattr(args, k) is not None}
    config = embed.ReidConfig(size=args.size, seed=args.seed, **overrides)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    train = frame[~is_held].reset_index(drop=True)
    reid = embed.train_reid(images[~is_held], train["patient_id"], config, device)
    t_train = time.perf_counter() - t0

    held_frame = frame[is_held].reset_index(drop=True)
    held_images = torch.from_numpy(images[is_held])
    pixels = embed.pixels(args.pixel_size)
    small = torch.from_numpy(np.stack([resize(image, args.pixel_size) for image in images[is_held]]))
    result = {
        "site": args.site, "n": args.n, "size": args.size, "seed": args.seed,
        "patients": int(len(patients)), "patients_with_2plus_studies": int((studies >= 2).sum()),
        "held_out_patients": int(len(held)), "held_out_images": int(is_held.sum()),
        "reid_config": config.to_dict(),
        "auroc_held_out": {"reid": reid_auroc(held_frame, reid(held_images), args.pairs, args.seed),
                           "pixels": reid_auroc(held_frame, pixels(small), args.pairs, args.seed)},
        "auroc_train": {"reid": reid_auroc(train, reid(torch.from_numpy(images[~is_held])), args.pairs, args.seed)["auroc"]},
        "seconds": {"render": round(t_render, 1), "train_reid": round(t_train, 1)},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
