"""Reading the study for the report: the cells' metrics, comparisons and distances, and the parameters.

:func:`load` reads what the study's stages wrote under the project root into a
:class:`Study` (what is missing or unreadable is recorded in ``Study.problems``, never
raised); the parameters are a :class:`~cxrsynth.study.params.StudyParams`, and the cells each
family should have come from the pipeline's own plan (:mod:`cxrsynth.study.plan`). The rest
of this module derives numbers from a Study (prevalences, the CAS rows, rare findings'
changes, training-set shares) for the prose and the page.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrsynth import labels
from cxrsynth.errors import CxrsynthError
from cxrsynth.study import plan
from cxrsynth.study.params import StudyParams
from cxrsynth.study.plan import CAS_CELL

#: The families in the order the report shows them.
FAMILIES: tuple[str, ...] = ("supplement", "synthetic", "external", "cfg", "rebalance")
STUDY_DIR = Path("metrics/study")
COMPARE_DIRS = (Path("metrics/compare"), STUDY_DIR)  # <family>.json, then compare_<family>.json
DISTANCE_DIRS = (Path("metrics/distance"), STUDY_DIR)  # <replica>.json, then fid_<replica>.json
COOCCURRENCE_DIR = Path("metrics/cooccurrence")
#: The memorisation audit's positive control (:mod:`cxrsynth.share.control`): ``memorisation.json`` and the audits' folders.
MEMORISATION_DIR = Path("metrics/memorisation")
MEMORISATION_JSON = "memorisation.json"
#: Findings rarer than this in a test set are "low prevalence" (the paper: < 5% gained most).
RARE = 0.05
#: A cell name's k: ``supplement_k2``, ``synthetic_k0.5``.
K_NAME = r"(supplement|synthetic|external)_k(\d+(?:\.\d+)?)"


def real_site(params: StudyParams) -> str:
    """The site whose training split is replicated (``study.real``)."""
    return params.study.real


def external_site(params: StudyParams) -> str | None:
    """The other site whose real training split the external family starts from (``external.real``; None: no such family)."""
    return params.external.real if params.external is not None else None


def k_of(name: str) -> float | None:
    """The k of a ``<family>_k<k>`` cell name (None for other cells)."""
    m = re.fullmatch(K_NAME, name)
    return float(m.group(2)) if m else None


def k_text(k: float) -> str:
    return f"{k:g}"


def expected_cells(params: StudyParams) -> dict[str, list[str]]:
    """The cells of each family in the study (:meth:`StudyParams.enabled`), baseline first, as the
    pipeline's own plan names them (:func:`cxrsynth.study.plan.family_cells` and :func:`~cxrsynth.study.plan.baseline`)."""
    out: dict[str, list[str]] = {}
    for family in FAMILIES:
        if params.enabled(family):
            base = plan.baseline(params, family).name
            out[family] = [base, *[c.name for c in plan.family_cells(params, family) if c.name != base]]
    return out


def _default_baseline(family: str, params: StudyParams) -> str:
    """The baseline of a family that is not in the study, by the naming convention (a cell file may still exist)."""
    if family == "external":
        return "external_k0"
    if family == "rebalance":
        return f"supplement_k{k_text(params.rebalance.k)}" if params.rebalance is not None else "supplement_k1"
    return "supplement_k0"


@dataclass
class Study:
    """Everything the report shows, read once from the root (see the module docstring)."""

    root: Path
    params: StudyParams
    tests: list[str]
    cells: dict[str, dict]
    expected: dict[str, list[str]]
    compares: dict[str, dict]
    fid: dict[str, dict]
    problems: list[str] = field(default_factory=list)
    #: ``metrics/memorisation/memorisation.json`` (None: the stage has not run, or an older project)
    memorisation: dict | None = None
    #: (family, test) -> {cell: {finding: compare row}}
    rows: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)

    def macro(self, cell: str, test: str) -> tuple[float | None, float | None]:
        """(macro AUROC, bootstrap SD) of a cell on a test set; (None, None) when absent."""
        m = (((self.cells.get(cell) or {}).get("evaluations") or {}).get(test) or {}).get("macro") or {}
        return m.get("auroc"), m.get("sd")

    def finding(self, cell: str, test: str, column: str) -> dict:
        """A cell's per-finding entry on a test set (``{}`` when absent)."""
        ev = ((self.cells.get(cell) or {}).get("evaluations") or {}).get(test) or {}
        return (ev.get("findings") or {}).get(column) or {}

    def baseline(self, family: str) -> str:
        """The family's baseline cell: as its comparison file names it, else the convention."""
        named = (self.compares.get(family) or {}).get("baseline")
        if named:
            return str(named)
        return self.expected[family][0] if self.expected.get(family) else _default_baseline(family, self.params)

    def row(self, family: str, test: str, cell: str, column: str = "macro") -> dict | None:
        """The paired comparison row of ``cell`` against the family baseline (None: not compared)."""
        return (self.rows.get((family, test)) or {}).get(cell, {}).get(column)

    def family_size(self, family: str, test: str) -> int | None:
        """How many comparisons Bonferroni corrected over (the family, on one test set)."""
        doc = ((self.compares.get(family) or {}).get("tests") or {}).get(test) or {}
        return (doc.get("family") or {}).get("size")

    def missing(self) -> list[tuple[str, str]]:
        """(family, cell) expected by params.yaml with no readable metrics file."""
        seen, out = set(), []
        for family, cells in self.expected.items():
            for cell in cells:
                if cell not in self.cells and cell not in seen:
                    seen.add(cell)
                    out.append((family, cell))
        return out

    def replicas(self) -> list[str]:
        """Replica names the study uses (CFG study, supplementation, FID files), first seen first."""
        names = list(cfg_replicas(self.params)) + list(self.params.replicas)
        for family in ("supplement", "synthetic", "external"):
            section = getattr(self.params, family)
            if section is not None:
                names.append(section.replica)
        names += [c.get("replica") for c in self.cells.values() if c.get("replica")]
        names += list(self.fid)
        return list(dict.fromkeys(str(n) for n in names))

    def guidance(self, replica: str) -> float | None:
        """Guidance scale (standard formula) of a replica: params.yaml, cells, FID file, manifest, or its name (``w8p5`` = 8.5)."""
        if replica in self.params.replicas or (replica == "rebalanced" and self.params.rebalance is not None):
            return self.params.guidance(replica)
        for cell in self.cells.values():
            if cell.get("replica") == replica and cell.get("guidance") is not None:
                return float(cell["guidance"])
        if (self.fid.get(replica) or {}).get("guidance") is not None:
            return float(self.fid[replica]["guidance"])
        meta = dataset_meta(self.root, f"{real_site(self.params)}_{replica}")
        if meta and meta.get("guidance") is not None:
            return float(meta["guidance"])
        m = re.fullmatch(r"w(\d+)(?:p(\d+))?", replica)
        return float(f"{m.group(1)}.{m.group(2) or 0}") if m else None


def read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name}: unreadable ({exc.__class__.__name__}: {exc}); left out")
        return None
    if not isinstance(doc, dict):
        problems.append(f"{path.name}: not a JSON object; left out")
        return None
    return doc


def dataset_meta(root: Path, name: str) -> dict | None:
    from cxrsynth import manifest

    try:
        return manifest.read_meta(root, name)
    except CxrsynthError:
        return None


def _norm(root: Path, path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    return os.path.normpath(str(p if p.is_absolute() else root / p))


def load(root: str | Path, params: StudyParams | Mapping[str, Any]) -> Study:
    """Read the study's metrics under ``root`` (what is missing or unreadable is recorded, not raised)."""
    root = Path(root)
    params = StudyParams.of(params)
    problems: list[str] = []
    cells, compares, fid = {}, {}, {}
    for directory, prefix, into in ((COMPARE_DIRS[0], "", compares), (DISTANCE_DIRS[0], "", fid)):
        for path in sorted((root / directory).glob("*.json")):
            doc = read_json(path, problems)
            if doc is not None:
                into[str(doc.get("replica") or path.stem) if into is fid else path.stem] = doc
    folder = root / STUDY_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        stem = path.stem
        if stem == "cas":
            continue  # CAS is computed from the synthetic_k1 cell, per finding
        doc = read_json(path, problems)
        if doc is None:
            continue
        if stem.startswith("compare_"):
            compares.setdefault(stem[len("compare_"):], doc)
        elif stem.startswith("fid_"):
            fid.setdefault(str(doc.get("replica") or stem[len("fid_"):]), doc)
        elif "evaluations" in doc:
            problem = plan.cell_metrics_problem(doc)
            if problem:
                problems.append(f"{path.name}: not a cell's metrics ({problem}); left out")
            else:
                cells[doc["cell"]] = doc
        else:
            problems.append(f"{path.name}: neither a cell, a comparison nor an FID file; left out")
    tests = [f"{name}:{split}" for name, split in plan.tests(params)]
    memo_path = root / MEMORISATION_DIR / MEMORISATION_JSON
    memo = read_json(memo_path, problems) if memo_path.is_file() else None
    study = Study(root=root, params=params, tests=tests, cells=cells,
                  expected=expected_cells(params), compares=compares, fid=fid, problems=problems, memorisation=memo)
    _index_comparisons(study)
    return study


def _index_comparisons(study: Study) -> None:
    """Match each comparison's OTHER metrics file to its cell (by path, then by classifier id)."""
    for family, doc in study.compares.items():
        for test, result in (doc.get("tests") or {}).items():
            by_path, by_id = {}, {}
            for name, cell in study.cells.items():
                ev = (cell.get("evaluations") or {}).get(test) or {}
                if ev.get("path"):
                    by_path[_norm(study.root, ev["path"])] = name
                cid = (cell.get("classifier") or {}).get("classifier_id")
                if cid and (cell.get("family") == family or name == study.baseline(family)):
                    by_id.setdefault(cid, name)
            table: dict[str, dict] = {}
            for comparison in result.get("comparisons") or []:
                name = (comparison.get("cell") if comparison.get("cell") in study.cells else None) or by_path.get(
                    _norm(study.root, comparison.get("other"))) or by_id.get(comparison.get("model"))
                if name is None:
                    study.problems.append(f"the {family} comparison on {test}: no cell evaluated as {comparison.get('other')}")
                    continue
                table[name] = {r["finding"]: r for r in comparison.get("rows") or []}
            study.rows[(family, test)] = table


def cfg_replicas(params: StudyParams) -> list[str]:
    """The CFG study's replica names (none without a cfg section)."""
    return list(params.cfg.replicas) if params.cfg is not None else []


def family_ks(study: Study, family: str) -> list[tuple[float, str]]:
    """``(k, cell)`` of the family's ``<family>_k<k>`` cells that have results, by k."""
    return sorted((k, name) for name in study.cells if name.startswith(f"{family}_k") and (k := k_of(name)) is not None)


def prevalence(study: Study, test: str, column: str, cells: list[str]) -> tuple[float | None, int | None]:
    """Share of positives among a test set's labelled images (positives + negatives), from the first cell that has it."""
    for cell in cells:
        f = study.finding(cell, test, column)
        if f.get("n_pos") is not None and f.get("n_neg") is not None and f["n_pos"] + f["n_neg"] > 0:
            return f["n_pos"] / (f["n_pos"] + f["n_neg"]), int(f["n_pos"])
    return None, None


def rare_changes(study: Study, test: str) -> list[tuple[str, float, bool]]:
    """``(finding, targeted − plain AUROC, significant)`` of the findings under :data:`RARE` prevalence in ``test``."""
    base, other = study.baseline("rebalance"), "rebalance_targeted"
    out = []
    for column in labels.FINDING_COLUMNS:
        share, _ = prevalence(study, test, column, [base, other])
        a = study.finding(base, test, column).get("auroc")
        b = study.finding(other, test, column).get("auroc")
        if share is not None and share < RARE and a is not None and b is not None:
            row = study.row("rebalance", test, other, column)
            out.append((column, b - a, bool(row and row.get("significant_paired"))))
    return out


def cas_rows(study: Study) -> dict | None:
    """CAS per finding: ``synthetic_k1`` (``plan.CAS_CELL``) on the internal test set, beside the real-only baseline."""
    real = real_site(study.params)
    test = next((t for t in study.tests if t.split(":")[0] == real), study.tests[0] if study.tests else None)
    if test is None or CAS_CELL not in study.cells or study.macro(CAS_CELL, test)[0] is None:
        return None
    base = study.baseline("synthetic")
    out = {"test": test, "macro": {"cas": study.macro(CAS_CELL, test)[0], "sd": study.macro(CAS_CELL, test)[1],
                                   "real": study.macro(base, test)[0]}, "findings": {}}
    for column in labels.FINDING_COLUMNS:
        f = study.finding(CAS_CELL, test, column)
        share, n_pos = prevalence(study, test, column, [CAS_CELL, base])
        out["findings"][column] = {"cas": f.get("auroc"), "sd": f.get("sd"),
                                   "real": study.finding(base, test, column).get("auroc"),
                                   "prevalence": share, "n_pos": n_pos, "reason": f.get("reason")}
    return out


def train_shares(study: Study, cell: str) -> dict[str, float] | None:
    """Share of positives per finding in a cell's training rows (its mix manifest), None if unreadable."""
    from cxrsynth import manifest

    name = ((study.cells.get(cell) or {}).get("train") or {}).get("name")
    if not name:
        return None
    try:
        frame = manifest.read(study.root, name)
    except CxrsynthError:
        return None
    if "split" in frame:
        frame = frame.loc[(frame["split"] == "train").fillna(False).to_numpy(dtype=bool)]
    if frame.empty:
        return None
    y = labels.findings_matrix(frame) == labels.POSITIVE
    return dict(zip(labels.FINDING_COLUMNS, y.mean(axis=0).tolist()))
