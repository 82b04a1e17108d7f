"""``dvc plots show`` of the study: one line per test set (dvc.yaml's plot templates), drawn offline.

The plot data is what :func:`cxrsynth.study.report.write_plot_data` writes for a small study (cell
files as ``cxrsynth study cell`` writes them); the plot definitions are the project's own
``dvc.yaml`` and ``.dvc/plots/``; the page is what ``cxrsynth study plots-template`` writes, filled
by the installed DVC and opened in headless Chromium with every host name unresolvable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cli
from test_report import _chrome, _chromium

from cxrsynth.study import report
from cxrsynth.study.report import dvc_page

REPO = Path(__file__).resolve().parents[1]
TESTS = ("cxp", "mimic", "emory")
PARAMS = {"study": {"real": "cxp", "tests": list(TESTS)}, "replicas": {"w1": {"guidance": 1.0, "replicas": 2}},
          "supplement": {"replica": "w1", "k": [0, 1, 2]}, "synthetic": {"replica": "w1", "k": [1, 2]},
          "external": {"real": "mimic", "replica": "w1", "k": [0, 1, 2]}}
#: Encoding channels that split a line mark into lines (``shape`` does not: it styles the points only);
#: ``rev`` is the field DVC adds to every row (the revision: ``workspace``, or each one ``dvc plots diff`` reads).
SERIES_CHANNELS = ("color", "strokeDash", "detail", "opacity", "size")


def _plot_data(root: Path) -> dict[str, list[dict]]:
    """``report/plots/*.json`` under ``root`` for a study of the three test sets (AUROCs drawn at random)."""
    rng = np.random.default_rng(0)
    (root / "metrics" / "study").mkdir(parents=True)
    for family, ks in (("supplement", [0, 1, 2]), ("synthetic", [1, 2]), ("external", [0, 1, 2])):
        for k in ks:
            name = f"{family}_k{k}"
            evaluations = {f"{t}:test": {"macro": {"auroc": float(rng.uniform(0.55, 0.9)), "sd": 0.01}} for t in TESTS}
            doc = {"cell": name, "family": family, "k": k, "train": {"real_images": 100, "synthetic_images": 100 * k},
                   "evaluations": evaluations}
            (root / "metrics" / "study" / f"{name}.json").write_text(json.dumps(doc))
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in report.write_plot_data(root, PARAMS)}


def _plot_definitions() -> dict[str, dict]:
    """Every plot dvc.yaml defines (stage outputs and top level): path -> its properties."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    entries = [e for stage in doc.get("stages", {}).values() for e in stage.get("plots", [])] + list(doc.get("plots", []))
    return {path: props or {} for e in entries for path, props in (e.items() if isinstance(e, dict) else [(e, {})])}


def _template(name: str) -> dict:
    return json.loads((REPO / ".dvc" / "plots" / f"{name}.json").read_text())


def test_each_dvc_plot_draws_one_line_per_test_set_and_family(tmp_path):
    data = _plot_data(tmp_path)
    defs = _plot_definitions()
    assert set(data) <= set(defs), f"plot data dvc.yaml does not draw: {sorted(set(data) - set(defs))}"
    for path, rows in data.items():
        props = defs[path]
        assert "template" in props, f"{path}: DVC's default template colours by revision only and joins the test sets"
        encoding = _template(props["template"])["encoding"]
        x, y = props["x"], props["y"]
        assert all(x in r and y in r for r in rows)
        assert encoding["color"]["field"] in rows[0], f"{path}: colour field {encoding['color']['field']!r} not in its data"
        split = [encoding[c]["field"] for c in SERIES_CHANNELS if c in encoding]
        assert "rev" in split, f"{path}: `dvc plots diff` would join its revisions into one line"
        fields = [f for f in split if f != "rev"]
        assert all(f in r for r in rows for f in fields), (path, fields)
        series = defaultdict(list)
        for r in rows:
            series[tuple(r[f] for f in fields)].append(r[x])
        # each series is a function of x (one point per k): no zig-zag; without the split there would be one
        assert all(len(xs) == len(set(xs)) for xs in series.values()), series
        assert len({r[x] for r in rows}) < len(rows)
        assert {r["test"] for r in rows} == {f"{t}:test" for t in TESTS}
        assert len(series) == len({(r["test"], r["family"]) for r in rows})


def _project(tmp: Path) -> tuple[Path, dict[str, list[dict]]]:
    """A DVC project with the repository's dvc.yaml, params.yaml, .dvc/config and .dvc/plots and a study's plot data."""
    root = tmp / "proj"
    (root / ".dvc").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root, _plot_data(root)


def _dvc(root: Path, *args: str) -> str:
    dvc = Path(sys.executable).with_name("dvc")
    r = subprocess.run([str(dvc), *args], cwd=root, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The offline page, as `cxrsynth study plots-template` writes it into a project."""
    root = tmp_path_factory.mktemp("page")
    out = cli(root, "study", "plots-template")
    path = root / dvc_page.PAGE_TEMPLATE
    assert path.is_file() and "--html-template" in out and not (root / ".dvc" / "config.local").exists()  # not a DVC project
    return path


@pytest.mark.slow
def test_the_page_inlines_vega_and_keeps_dvc_placeholders(page):
    text = page.read_text(encoding="utf-8")
    assert text == dvc_page.page_template()  # same vl-convert, same bytes
    assert text.count("{plot_divs}") == 1 and "{scripts}" not in text and "{refresh_tag}" in text
    assert "window.vegaEmbed=" in text and len(text) > 500_000
    assert not re.search(r"<script[^>]*\bsrc=", text) and "cdn.jsdelivr" not in text
    from dvc_render.html import HTML

    filled = HTML(text).with_element("<div id='x'></div>").with_scripts('<script src="https://cdn/vega"></script>').embed()
    assert "<div id='x'></div>" in filled and "https://cdn" not in filled  # DVC's CDN tags have nowhere to go


def _render_offline(binary: str, html: Path) -> tuple[str, list[str]]:
    """Chromium's DOM of ``html`` after its scripts ran, with every host name unresolvable; its console lines."""
    r = _chrome(binary, "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
                "--virtual-time-budget=5000", "--dump-dom", html.resolve().as_uri())
    return r.stdout, [line for line in r.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_dvc_plots_show_draws_offline_one_line_per_series(tmp_path):
    root, data = _project(tmp_path)
    assert "html_template" not in (root / ".dvc" / "config").read_text()  # a fresh clone: DVC's own page
    cli(root, "study", "plots-template")  # what `make install` runs: the page, named in .dvc/config.local
    assert f"html_template = {dvc_page.PAGE_TEMPLATE.name}" in (root / ".dvc" / "config.local").read_text()
    out = Path(_dvc(root, "plots", "show", "-o", "offline").strip().removeprefix("file://"))
    assert out.name == "index.html" and not re.search(r"<script[^>]*\bsrc=", out.read_text())
    binary = _chromium()
    dom, console = _render_offline(binary, out)
    assert not [c for c in console if "Uncaught" in c or "Error" in c], console
    charts = dict(re.findall(r'<div id="([^"]+)" class="vega-embed".*?(<svg[^>]*class="marks".*?</svg>)', dom, re.S))
    # one chart per plot file, drawn as SVG (the template asks vega-embed for SVG), in the div DVC names after it
    assert set(charts) == {re.sub(r"[^a-zA-Z0-9]", "_", path) for path in data}, list(charts)
    for path, rows in data.items():
        svg = charts[re.sub(r"[^a-zA-Z0-9]", "_", path)]
        lines = re.findall(r'<g class="mark-line role-mark[^"]*"[^>]*>\s*<path', svg)
        assert len(lines) == len({(r["test"], r["family"]) for r in rows})  # a path per test set and family
        assert svg.count("mark-symbol") >= 1 and all(f"{t}:test" in svg for t in TESTS)  # points and the legend
    # DVC's own page (vega from a CDN) draws nothing offline: what the template fixes
    _dvc(root, "config", "--local", "--unset", "plots.html_template")
    cdn = Path(_dvc(root, "plots", "show", "-o", "cdn").strip().removeprefix("file://"))
    dom, console = _render_offline(binary, cdn)
    assert 'class="marks"' not in dom and any("vegaEmbed is not defined" in c for c in console), console
