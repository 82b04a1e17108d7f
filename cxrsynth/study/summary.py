"""The short table ``make demo`` ends with: macro AUROC of every cell that ran, on every test set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrsynth.study.plan import FAMILIES, family_cells, tests


def cell_summaries(root: str | Path, params: dict[str, Any]) -> list[dict]:
    """The summaries of the cells ``params`` asks for that have run, family by family (each cell once)."""
    seen, out = set(), []
    for family in FAMILIES:
        if family not in params:
            continue
        for c in family_cells(params, family):
            path = c.metrics_path(root)
            if c.name not in seen and path.is_file():
                seen.add(c.name)
                out.append(json.loads(path.read_text()))
    return out


def summary_table(root: str | Path, params: dict[str, Any]):
    """A rich table: cell, training images (real + synthetic), macro AUROC ± SD on the tuning split and each test set."""
    from rich import box
    from rich.table import Table

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
