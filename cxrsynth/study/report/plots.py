"""The report's figure data: Figure 3 / Figure 4 panels and the ``dvc plots`` files.

:func:`curve_panels` turns a :class:`~cxrsynth.study.report.load.Study` into the panels
:func:`cxrsynth.study.figures.curves` draws; :func:`write_plot_data` writes the same points
as JSON for ``dvc plots`` (report/plots/supplement.json, external.json).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrsynth.study import figures
from cxrsynth.study.params import StudyParams
from cxrsynth.study.report.load import Study, family_ks, load
from cxrsynth.study.report.prose import sites, test_label

#: Where :func:`write_plot_data` writes by default (the report stage's plots).
PLOTS_DIR = Path("report/plots")


def curve_panels(study: Study, family: str) -> list[figures.Panel]:
    """Figure 3 (``supplement``: real+synthetic and synthetic only) or Figure 4 (``external``) panels."""
    def points(prefix: str, test: str) -> list[figures.Point]:
        out = []
        for k, name in family_ks(study, prefix):
            a, sd = study.macro(name, test)
            if a is not None:
                out.append(figures.Point(k, a, sd))
        return out

    panels = []
    s = lambda text: sites(study.params, text)  # noqa: E731
    for test in study.tests:
        lines, series = [], []
        if family == "supplement":
            series = [figures.Series(s("cxp real + k x 100% synthetic"), figures.COLORS["real+synthetic"],
                                     points("supplement", test)),
                      figures.Series("k x 100% synthetic only", figures.COLORS["synthetic only"], points("synthetic", test),
                                     marker="s", linestyle="--")]
            a, sd = study.macro(study.baseline("supplement"), test)
            if a is not None:
                lines.append(figures.Line(s("baseline: cxp real only (k = 0), band = ±SD"), figures.COLORS["baseline"], a, sd))
        else:
            series = [figures.Series(s("mimic real + k x 100% cxp synthetic"), figures.COLORS["external"],
                                     points("external", test))]
            a, sd = study.macro(study.baseline("external"), test)
            if a is not None:
                lines.append(figures.Line(s("baseline: mimic real only (k = 0), band = ±SD"), figures.COLORS["baseline"], a, sd))
            c, _ = study.macro("supplement_k0", test)
            if c is not None:
                lines.append(figures.Line(s("reference: cxp real only"), figures.COLORS["reference"], c, None, linestyle=":"))
        panels.append(figures.Panel(test_label(test), series, lines))
    return panels


def plot_points(study: Study, families: tuple[str, ...]) -> list[dict]:
    """``{k, test, family, auroc, sd}`` of each cell of ``families`` on each test set, sorted."""
    out = []
    for family in families:
        for k, name in family_ks(study, family):
            for test in study.tests:
                a, sd = study.macro(name, test)
                if a is not None:
                    k_out = int(k) if float(k).is_integer() else k
                    out.append({"k": k_out, "test": test, "family": family, "auroc": a, "sd": sd})
    return sorted(out, key=lambda p: (p["family"], p["test"], p["k"]))


def write_plot_data(root: Path, params: StudyParams | Mapping[str, Any], out: Path | None = None) -> list[Path]:
    """Write the figure data for ``dvc plots``: ``supplement.json`` (supplement and synthetic families)
    and ``external.json``, each a list of ``{k, test, family, auroc, sd}``, into ``out``
    (default ``root/report/plots``: outside ``metrics/study``, which the report stage reads)."""
    study = load(root, params)
    folder = Path(out) if out is not None else Path(root) / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, families in (("supplement", ("supplement", "synthetic")), ("external", ("external",))):
        path = folder / f"{name}.json"
        path.write_text(json.dumps(plot_points(study, families), indent=1) + "\n")
        paths.append(path)
    return paths
