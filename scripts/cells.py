"""The study's cell stages in dvc.yaml, and the stages they read: what runs in parallel, and what first.

A cell is a stage whose command is ``cxrsynth study cell ...`` (one classifier trained and
evaluated). Cells read the ingested sites and the replicas and never each other, so once their
upstream stages are done they can run at the same time, each with ``dvc repro --single-item``.
DVC's own graph answers both questions, so a new family or a changed dvc.yaml needs no edit here.

    python scripts/cells.py              # the cells' stage names, one per line (dvc.yaml order)
    python scripts/cells.py --upstream   # every stage some cell depends on, directly or not

Used by scripts/parallel-cells.sh (this machine: xargs -P) and scripts/cells-array.slurm (a
cluster: one array task per cell).
"""

from __future__ import annotations

import argparse

import networkx as nx
from dvc.repo import Repo

CELL_COMMAND = "cxrsynth study cell "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", action="store_true", help="the stages the cells read, not the cells")
    args = parser.parse_args()
    with Repo(".") as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        order = {stage.addressing: i for i, stage in enumerate(repo.index.stages)}
        cells = [s for s in graph if getattr(s, "cmd", None) and str(s.cmd).startswith(CELL_COMMAND)]
        if args.upstream:
            names = {d.addressing for cell in cells for d in nx.descendants(graph, cell)} - {c.addressing for c in cells}
        else:
            names = {c.addressing for c in cells}
    for name in sorted(names, key=order.__getitem__):
        print(name)


if __name__ == "__main__":
    main()
