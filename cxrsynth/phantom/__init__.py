"""The three-site chest X-ray phantom: procedural radiographs whose ground truth we control.

``write_site("cxp", 2000, Path("data/raw/cxp"), seed=0)`` writes a CheXpert tree, ``mimic``
a MIMIC-CXR-JPG tree with its gzipped tables, ``emory`` an in-house CSV with PNG and
DICOM images; the importers read them as they would the real datasets. Modules:
:mod:`~cxrsynth.phantom.sites` (site specs), :mod:`~cxrsynth.phantom.cohort` (patients,
studies, demographics, labels), :mod:`~cxrsynth.phantom.anatomy` (each patient's persistent
anatomy), :mod:`~cxrsynth.phantom.render` (the vectorized renderer), :mod:`~cxrsynth.phantom.formats` (the writers), :mod:`~cxrsynth.sheet`
(contact sheet) and :mod:`cxrsynth.bench.phantom` (the quality benchmark).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrsynth.phantom.sites import SITES, SiteSpec, get_site

SHEET_IMAGES = 24


@dataclass
class Phantom:
    """A sampled (not yet rendered) phantom dataset: cohort, scenes and file randomness."""

    site: SiteSpec
    seed: int
    cohort: "Cohort"  # noqa: F821 (imported lazily below)
    scene: "Scene"  # noqa: F821
    files_rng: np.random.Generator

    def images(self, chunk: int | None = None) -> Iterator[np.ndarray]:
        """Render the images in cohort order, chunk by chunk (bounded memory)."""
        from cxrsynth.phantom.render import CHUNK, render

        step = chunk or CHUNK
        for start in range(0, len(self.scene), step):
            yield from render(self.scene.take(slice(start, start + step)), self.site.imaging, chunk=step)


def sample_site(site: str, n: int, seed: int = 0) -> Phantom:
    """Sample ``n`` images of a site: everything but the pixels and the files.

    The seed is combined with the site name, so two sites never share draws. Three
    independent generators are spawned: cohort, scene parameters and files (IDs, dates).
    Each patient's persistent anatomy comes from its own generator, seeded by the seed,
    the site and the patient's index (:func:`cxrsynth.phantom.anatomy.sample_anatomy`).
    """
    from cxrsynth.phantom.anatomy import sample_anatomy
    from cxrsynth.phantom.cohort import sample_cohort
    from cxrsynth.phantom.render import sample_scene

    spec = get_site(site)
    entropy = (int(seed), zlib.crc32(spec.name.encode()))
    cohort_ss, scene_ss, files_ss = np.random.SeedSequence(list(entropy)).spawn(3)
    cohort = sample_cohort(spec, n, np.random.default_rng(cohort_ss))
    f = cohort.frame
    patient = f["patient"].to_numpy()
    anatomy = sample_anatomy(int(patient.max()) + 1, (*entropy, 0xA7A7)).take(patient)
    scene = sample_scene(
        cohort.labels,
        f["sex"].to_numpy(),
        f["age"].to_numpy(dtype=float),
        f["view"].to_numpy(),
        spec.imaging,
        np.random.default_rng(scene_ss),
        anatomy,
    )
    return Phantom(site=spec, seed=int(seed), cohort=cohort, scene=scene, files_rng=np.random.default_rng(files_ss))


def _ticking(images: Iterator[np.ndarray], progress) -> Iterator[np.ndarray]:
    for image in images:
        yield image
        if progress:
            progress(1)


def write_site(site: str, n: int, out: Path, seed: int = 0, sheet: Path | None = None, progress=None) -> dict:
    """Write ``n`` phantom images of ``site`` in the site's native on-disk format.

    Args:
        site: ``cxp``, ``mimic`` or ``emory`` (see :data:`SITES`).
        n: Number of images.
        out: Output directory (created).
        seed: Seed; the same seed writes byte-identical files.
        sheet: Optional path of a contact-sheet PNG of the first images.
        progress: Optional callable ``progress(images)`` called as images are written.

    Returns:
        Summary: site, seed, counts (images, patients, studies), the tables written,
        the image root, the sheet path, and the writer's own details. Also written to
        ``out/phantom.json``.
    """
    from cxrsynth.phantom.formats import WRITERS, captured
    from cxrsynth.sheet import write_sheet

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    phantom = sample_site(site, n, seed)
    kept: list[np.ndarray] = []
    details = WRITERS[phantom.site.name](
        phantom.cohort, captured(_ticking(phantom.images(), progress), SHEET_IMAGES if sheet else 0, kept), out, phantom.files_rng
    )
    f = phantom.cohort.frame
    summary = {
        "site": phantom.site.name,
        "seed": int(seed),
        "images": int(len(f)),
        "patients": int(f["patient"].nunique()),
        "studies": int(f["study"].nunique()),
        "out": str(out),
        **details,
    }
    if sheet:
        head = f.iloc[: len(kept)]
        headers = [
            f"{s or '?'} {'' if np.isnan(a) else int(a)} {v}"
            for s, a, v in zip(head["sex"], head["age"].to_numpy(dtype=float), head["view"])
        ]
        summary["sheet"] = str(write_sheet(Path(sheet), kept, phantom.cohort.labels[: len(kept)], headers))
    (out / "phantom.json").write_text(json.dumps(_relative(summary, out), indent=2, sort_keys=True) + "\n")
    return summary


def _relative(summary: dict, out: Path) -> dict:
    """The summary with paths under ``out`` made relative (so phantom.json is byte-stable)."""

    def rel(value: object) -> object:
        if isinstance(value, str) and value.startswith(str(out)):
            return str(Path(value).relative_to(out))
        if isinstance(value, list):
            return [rel(v) for v in value]
        return value

    return {k: rel(v) for k, v in summary.items() if k not in ("out", "sheet")}


__all__ = ["SITES", "Phantom", "SiteSpec", "get_site", "sample_site", "write_site"]
