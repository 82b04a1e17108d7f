"""Each experiment family against its baseline, on every test set (Bonferroni across the family).

For a family, the baseline cell (:func:`cxrsynth.study.plan.baseline`) and every other cell
that has been run are compared with :func:`cxrsynth.evaluate.compare.compare` on each test
set both were evaluated on: the paper's t-test on the bootstrap replicates and a paired
bootstrap of the AUROC difference, Bonferroni-corrected across all of the family's
comparisons on that test set (every finding and the macro, of every cell). Writes
``metrics/compare/<family>.json``. A family whose baseline has not been run, or with no
other cell run and evaluated on a test set of the baseline's, is an error (not an empty file).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrsynth import __version__
from cxrsynth.config import read_json
from cxrsynth.errors import CxrsynthError
from cxrsynth.study.params import StudyParams
from cxrsynth.study.plan import COMPARE_DIR, baseline, family_cells, tests


def compare_family(root: str | Path, params: StudyParams | Mapping[str, Any], family: str) -> dict:
    """Run the family's comparisons; returns (and writes) them."""
    from cxrsynth.evaluate.compare import compare

    root = Path(root)
    params = StudyParams.of(params)
    base = baseline(params, family)
    cells = [c for c in family_cells(params, family) if c.name != base.name]
    others = [c for c in cells if c.metrics_path(root).is_file()]
    if not base.metrics_path(root).is_file():
        raise CxrsynthError(f"{family}: its baseline cell {base.name} has not been run (no {base.metrics_path(root)}): "
                            f"run `cxrsynth study cell {base.family} {base.tag}` first")
    if not others:
        run = f"; run one first, e.g. `cxrsynth study cell {cells[0].family} {cells[0].tag}`" if cells else ""
        raise CxrsynthError(f"{family}: no cell to compare with the baseline {base.name}: none of "
                            f"{', '.join(c.name for c in cells) or 'its cells'} has been run{run}")
    config = params.evaluate.compare_config()
    out: dict[str, Any] = {"family": family, "baseline": base.name, "cells": [c.name for c in others], "tests": {}}
    base_summary = _evaluations(base.metrics_path(root))
    summaries = [_evaluations(c.metrics_path(root)) for c in others]
    for name, split in tests(params):
        label = f"{name}:{split}"
        paths = [evaluations.get(label, {}).get("path") for evaluations in summaries]
        pairs = [(c, p) for c, p in zip(others, paths) if p]
        if not pairs or label not in base_summary:
            continue
        result = compare(root, root / base_summary[label]["path"], [root / p for _, p in pairs], config)
        for comparison, (c, _) in zip(result["comparisons"], pairs):
            comparison["cell"] = c.name
        out["tests"][label] = result
    if not out["tests"]:
        raise CxrsynthError(f"{family}: no test set ({', '.join(f'{n}:{s}' for n, s in tests(params))}) on which both the "
                            f"baseline {base.name} and one of {', '.join(out['cells'])} were evaluated: nothing to compare")
    path = root / COMPARE_DIR / f"{family}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**out, "cxrsynth": __version__}, indent=1, sort_keys=True, default=str) + "\n")
    return out


def _evaluations(path: Path) -> dict[str, dict]:
    """Test label → ``{"path", ...}`` of a cell's summary (``metrics/study/<cell>.json``)."""
    summary = read_json(path, missing=f"no cell summary {path}", invalid=f"{path} is not a cell summary")
    evaluations = summary.get("evaluations") if isinstance(summary, dict) else None
    if not isinstance(evaluations, dict) or not all(isinstance(e, dict) for e in evaluations.values()):
        raise CxrsynthError(f"{path} is not a cell summary (no evaluations by test set): run its cell again")
    return evaluations
