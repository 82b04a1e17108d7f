"""The short table ``make demo`` ends with: macro AUROC of every cell that ran, on every test set."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrsynth import __version__
from cxrsynth.config import read_json
from cxrsynth.errors import CxrsynthError
from cxrsynth.study.params import StudyParams
from cxrsynth.study.plan import CAS_CELL, FAMILIES, cell_metrics_problem, family_cells, tests

Params = StudyParams | Mapping[str, Any]


def cell_summaries(root: str | Path, params: Params) -> list[dict]:
    """The summaries of the cells of the families in the study (:meth:`StudyParams.enabled`)
    that have run, family by family (each cell once)."""
    params = StudyParams.of(params)
    seen, out = set(), []
    for family in FAMILIES:
        if not params.enabled(family):
            continue
        for c in family_cells(params, family):
            path = c.metrics_path(root)
            if c.name not in seen and path.is_file():
                seen.add(c.name)
                invalid = f"{path} is not a cell's metrics (rerun `dvc repro` for cell {c.name})"
                doc = read_json(path, missing=f"{path} is missing", invalid=invalid)
                problem = cell_metrics_problem(doc)
                if problem:
                    raise CxrsynthError(f"{invalid}: {problem}")
                out.append(doc)
    return out


def summary_table(root: str | Path, params: Params):
    """A rich table: cell, training images (real + synthetic), macro AUROC ± SD on the tuning split and each test set."""
    from rich import box
    from rich.table import Table

    params = StudyParams.of(params)
    labels = ["tune"] + [f"{name}:{split}" for name, split in tests(params)]
    # Compact (no outer edge, one space between columns) so that a 4-test-set table fits 80 columns.
    table = Table(title="Study: macro AUROC ±bootstrap SD", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("cell", no_wrap=True)
    table.add_column("real+syn", justify="right", no_wrap=True)
    for label in labels:
        table.add_column(label, justify="right", no_wrap=True)
    for s in cell_summaries(root, params):
        cells = []
        for label in labels:
            macro = s["evaluations"].get(label, {}).get("macro", {})
            auroc, sd = macro.get("auroc"), macro.get("sd")
            cells.append("–" if auroc is None else f"{auroc:.3f}±{sd:.3f}".replace("±0.", "±.") if sd is not None else f"{auroc:.3f}")
        table.add_row(s["cell"], f"{s['train']['real_images']}+{s['train']['synthetic_images']}", *cells)
    return table


#: The study's headline metrics (``dvc metrics show`` / ``diff`` / ``exp show``), written by the report stage.
HEADLINE = Path("report/metrics.json")


def headline(root: str | Path, params: Params) -> dict:
    """``{cell: {evaluation: macro AUROC}}`` for every cell that ran, plus ``cas`` (the CAS on each test set).

    One number per cell and evaluation (rounded to 4 places), so that ``dvc metrics show``,
    ``dvc metrics diff`` and ``dvc exp show`` read as a table; the per-finding AUROCs, SDs and
    CIs stay in each cell's ``metrics/study/<cell>.json``. ``cas`` is the test-set macro AUROCs
    of ``CAS_CELL`` (100% synthetic images alone: the Classification Accuracy Score, as the report's).
    """
    params = StudyParams.of(params)
    out: dict[str, Any] = {}
    for s in cell_summaries(root, params):
        out[s["cell"]] = {label: None if e["macro"].get("auroc") is None else round(e["macro"]["auroc"], 4)
                          for label, e in s["evaluations"].items()}
    if CAS_CELL in out:
        out["cas"] = {label: v for label, v in out[CAS_CELL].items() if label != "tune"}
    return out


def write_headline(root: str | Path, params: Params, path: str | Path | None = None) -> Path:
    path = Path(root) / (HEADLINE if path is None else path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**headline(root, params), "cxrsynth": __version__}, indent=1, sort_keys=True) + "\n")
    return path
