"""Each experiment family against its baseline, on every test set (Bonferroni across the family).

For a family, the baseline cell (:func:`cxrsynth.study.plan.baseline`) and every other cell
that has been run are compared with :func:`cxrsynth.evaluate.compare.compare` on each test
set both were evaluated on: the paper's t-test on the bootstrap replicates and a paired
bootstrap of the AUROC difference, Bonferroni-corrected across all of the family's
comparisons on that test set (every finding and the macro, of every cell). Writes
``metrics/compare/<family>.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrsynth.study.params import StudyParams
from cxrsynth.study.plan import COMPARE_DIR, baseline, family_cells, tests


def compare_family(root: str | Path, params: StudyParams | Mapping[str, Any], family: str) -> dict:
    """Run the family's comparisons; returns (and writes) them."""
    from cxrsynth.evaluate.compare import compare

    root = Path(root)
    params = StudyParams.of(params)
    base = baseline(params, family)
    others = [c for c in family_cells(params, family) if c.name != base.name and c.metrics_path(root).is_file()]
    config = params.evaluate.compare_config()
    out: dict[str, Any] = {"family": family, "baseline": base.name, "cells": [c.name for c in others], "tests": {}}
    base_summary = json.loads(base.metrics_path(root).read_text())
    for name, split in tests(params):
        label = f"{name}:{split}"
        paths = [json.loads(c.metrics_path(root).read_text())["evaluations"].get(label, {}).get("path") for c in others]
        pairs = [(c, p) for c, p in zip(others, paths) if p]
        if not pairs or label not in base_summary["evaluations"]:
            continue
        result = compare(root, root / base_summary["evaluations"][label]["path"], [root / p for _, p in pairs], config)
        for comparison, (c, _) in zip(result["comparisons"], pairs):
            comparison["cell"] = c.name
        out["tests"][label] = result
    path = root / COMPARE_DIR / f"{family}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, sort_keys=True, default=str) + "\n")
    return out
