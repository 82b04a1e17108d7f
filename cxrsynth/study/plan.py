"""The paper's experiments as cells: one training set, one classifier, its evaluations.

Every experiment of the study is a family of *cells*, each named ``<family>_<tag>`` and
defined entirely by ``params.yaml`` (:class:`~cxrsynth.study.params.StudyParams`; :func:`cell`):

* ``cfg`` — the guidance study (the paper's Table 2): tag ``<replica>-real`` trains on a
  synthetic replica of the training split and tunes on the real tuning split,
  ``<replica>-synthetic`` tunes on the replica's own synthetic tuning split, and
  ``real-<replica>`` trains on real data and tunes on that synthetic tuning split. The
  real/real cell of the table is ``supplement_k0``.
* ``supplement`` — tag ``k<k>``: the real training split + k x 100% synthetic replicas
  (k = 0: the real-only baseline);
* ``synthetic`` — tag ``k<k>``: k x 100% synthetic replicas alone;
* ``external`` — tag ``k<k>``: another site's real training split + k x 100% replicas
  made from the first site;
* ``rebalance`` — tag ``targeted``: the real training split + k x 100% replicas whose
  conditions raise rarer findings to a target prevalence (compare with ``supplement_k<k>``,
  plain replicas of the same size).

Synthetic replicas are datasets named ``<real>_<replica>`` (``replicas``); the rebalanced
one is ``<real>_rebalanced`` (``rebalance``: its guidance and target). Tuning and test sets
are real unless a cfg cell says otherwise; every cell is evaluated on its own tuning split
and on every test set of ``study.tests`` (:func:`check_data` checks they have test rows).

Every function takes a :class:`~cxrsynth.study.params.StudyParams`, or a params.yaml mapping
that it parses (and checks) first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrsynth.errors import CxrsynthError, UnknownNameError
from cxrsynth.mix import MixParams
from cxrsynth.study.params import FAMILIES, StudyParams

#: Where a cell's files go, relative to the project root.
CELL_DIR = Path("data/study")
METRICS_DIR = Path("metrics/study")
#: Family comparisons (outside METRICS_DIR, which they read).
COMPARE_DIR = Path("metrics/compare")
#: Replicas' Fréchet distances.
DISTANCE_DIR = Path("metrics/distance")
#: The cell whose test AUROC is the Classification Accuracy Score: 100% synthetic images alone.
CAS_CELL = "synthetic_k1"


@dataclass(frozen=True)
class Cell:
    """One classifier of the study: what it trains on and where it is evaluated."""

    family: str
    tag: str
    mix: MixParams
    k: float | None = None
    replica: str | None = None
    guidance: float | None = None
    tune: str = "real"

    @property
    def name(self) -> str:
        """The cell's name, also its training mix's dataset name."""
        return f"{self.family}_{self.tag}".replace("-", "_")

    def directory(self, root: str | Path) -> Path:
        return Path(root) / CELL_DIR / self.name

    def metrics_path(self, root: str | Path) -> Path:
        return Path(root) / METRICS_DIR / f"{self.name}.json"


def cell_metrics_problem(doc: Any) -> str | None:
    """What makes ``doc`` not a cell's metrics as ``cxrsynth study cell`` writes them, or None.

    Checked before anything reads a cell file (the summary, the report): a cell file cut
    short, hand-edited or from another tool is named, not a ``KeyError``.
    """
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object"
    if not isinstance(doc.get("cell"), str):
        return "no 'cell' name"
    train = doc.get("train")
    if not isinstance(train, dict) or not all(isinstance(train.get(k), int) for k in ("real_images", "synthetic_images")):
        return "no 'train' counts (real_images, synthetic_images)"
    evaluations = doc.get("evaluations")
    if not isinstance(evaluations, dict):
        return "no 'evaluations' mapping"
    for label, ev in evaluations.items():
        macro = ev.get("macro") if isinstance(ev, dict) else None
        auroc = macro.get("auroc", 0.0) if isinstance(macro, dict) else "absent"
        if not (auroc is None or (isinstance(auroc, (int, float)) and 0 <= auroc <= 1)):
            return f"evaluation {label!r} has no macro AUROC in [0, 1]"
    return None


def replica_dataset(params: StudyParams | Mapping[str, Any], replica: str) -> str:
    """The dataset name of a synthetic replica set (``rebalanced``: the rebalance family's)."""
    params = StudyParams.of(params)
    if replica != "rebalanced" and replica not in params.replicas:
        raise UnknownNameError("replica", replica, params.replicas)
    return f"{params.study.real}_{replica}"


def _k(tag: str) -> float:
    match = re.fullmatch(r"k(\d+(?:\.\d+)?)", tag)
    if not match:
        raise CxrsynthError(f"expected a tag k<replicas> such as k2, got {tag!r}")
    return float(match.group(1))


def cell(params: StudyParams | Mapping[str, Any], family: str, tag: str) -> Cell:
    """The cell ``family``/``tag`` as ``params`` defines it."""
    params = StudyParams.of(params)
    real, seed = params.study.real, params.seed
    if family == "cfg":
        train, _, tune = tag.partition("-")
        if not tune:
            raise CxrsynthError(f"cfg cells are <train>-<tune> (e.g. w5-real, w5-synthetic, real-w5), got {tag!r}")
        if train == "real":
            syn = replica_dataset(params, tune)
            return Cell(family, tag, MixParams(real=real, synthetic_from=syn, synthetic_tune=True, seed=seed),
                        replica=tune, guidance=params.guidance(tune), tune="synthetic")
        if tune not in ("real", "synthetic"):
            raise CxrsynthError(f"a cfg cell tunes on 'real' or 'synthetic', got {tag!r}")
        syn = replica_dataset(params, train)
        return Cell(family, tag, MixParams(real=real, synthetic=1.0, synthetic_from=syn, only_synthetic=True,
                                           synthetic_tune=tune == "synthetic", seed=seed),
                    k=1.0, replica=train, guidance=params.guidance(train), tune=tune)
    if family in ("supplement", "synthetic"):
        k = _k(tag)
        replica = params.family(family).replica
        syn = replica_dataset(params, replica)
        if family == "synthetic" and k <= 0:
            raise CxrsynthError("a purely synthetic training set needs k > 0")
        mix = MixParams(real=real, synthetic=k, synthetic_from=syn if k > 0 else None,
                        only_synthetic=family == "synthetic", seed=seed)
        return Cell(family, tag, mix, k=k, replica=replica, guidance=params.guidance(replica))
    if family == "external":
        k = _k(tag)
        section = params.family("external")
        syn = replica_dataset(params, section.replica)
        mix = MixParams(real=section.real, synthetic=k, synthetic_from=syn if k > 0 else None, seed=seed)
        return Cell(family, tag, mix, k=k, replica=section.replica, guidance=params.guidance(section.replica))
    if family == "rebalance":
        if tag != "targeted":
            raise CxrsynthError(f"the rebalance family has one cell, 'targeted' (its plain twin is supplement_k<k>), got {tag!r}")
        k = float(params.family("rebalance").k)
        syn = replica_dataset(params, "rebalanced")
        return Cell(family, tag, MixParams(real=real, synthetic=k, synthetic_from=syn, seed=seed), k=k, replica="rebalanced",
                    guidance=params.guidance("rebalanced"))
    raise UnknownNameError("study family", family, FAMILIES)


def family_cells(params: StudyParams | Mapping[str, Any], family: str) -> list[Cell]:
    """Every cell of a family that ``params`` asks for, baseline first."""
    params = StudyParams.of(params)
    section = params.family(family)
    if family == "cfg":
        tags = [f"{r}-{t}" for r in section.replicas for t in ("real", "synthetic")] + [f"real-{r}" for r in section.replicas]
        return [cell(params, "cfg", t) for t in tags]
    if family == "rebalance":
        return [cell(params, "rebalance", "targeted")]
    return [cell(params, family, f"k{_tag_number(k)}") for k in section.k]


def baseline(params: StudyParams | Mapping[str, Any], family: str) -> Cell:
    """The cell each of a family's cells is compared with."""
    params = StudyParams.of(params)
    if family in ("cfg", "supplement", "rebalance"):
        k = params.family("rebalance").k if family == "rebalance" else 0
        return cell(params, "supplement", f"k{_tag_number(k)}")
    if family == "synthetic":
        return cell(params, "supplement", "k0")  # what synthetic data alone is measured against: real data alone
    if family == "external":
        return cell(params, "external", "k0")
    raise UnknownNameError("study family", family, FAMILIES)


def _tag_number(k: float) -> str:
    return f"{k:g}"


def tests(params: StudyParams | Mapping[str, Any]) -> list[tuple[str, str]]:
    """The test sets, ``(dataset, split)``: every name of ``study.tests`` at its ``test`` split."""
    return [(name, "test") for name in StudyParams.of(params).study.tests]


def check_data(root: str | Path, params: StudyParams | Mapping[str, Any], *, require: bool = True) -> list[str]:
    """Check that the data every cell needs is there: each test set has test rows, the real
    site (and the external family's site) has training rows.

    Run before a cell trains, so that a missing or empty test set fails in seconds rather
    than after training. With ``require=False`` (``cxrsynth study check`` before the data
    stages ran) a dataset not ingested yet is skipped; its name is returned.

    Returns:
        The datasets skipped (not ingested yet).
    """
    from cxrsynth import manifest

    params = StudyParams.of(params)
    needs = [(f"study.tests[{i}]", name, "test", "every cell is evaluated on it") for i, name in enumerate(params.study.tests)]
    needs.append(("study.real", params.study.real, "train", "the cells train on it"))
    if params.external is not None:
        needs.append(("external.real", params.external.real, "train", "the external cells train on it"))
    skipped, counts = [], {}
    for key, name, split, why in needs:
        if not require and not manifest.manifest_path(root, name).is_file():
            skipped.append(name)
            continue
        if name not in counts:
            counts[name] = manifest.read(root, name)["split"].value_counts().to_dict()
        if not counts[name].get(split):
            have = ", ".join(f"{s} {n:,}" for s, n in sorted(counts[name].items())) or "no split assigned"
            raise CxrsynthError(f"{key}: dataset {name!r} has no {split} rows ({have}); {why}")
    return list(dict.fromkeys(skipped))
