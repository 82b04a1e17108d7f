"""The study report: every figure and table from a realistic study fixture built without the pipeline.

The fixture writes what the study's stages would: cell JSONs whose evaluations are real
metrics files (``cxrsynth.evaluate.metrics`` on toy predictions), the families' comparison
files (``cxrsynth.evaluate.compare``), FID files, a label co-occurrence run, and a real cxp
dataset with a micro generator's synthetic replica for the image grid. Some cells, one FID
file and the CFG comparison are left out on purpose: the report must say so.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (F, chexpert_rows, ingest_site, make_rows, micro_generator, model_dict, patients, replica, write_dataset,
                      write_predictions)
from PIL import Image

from cxrsynth import labels, manifest
from cxrsynth.evaluate import metrics
from cxrsynth.evaluate.compare import CompareConfig, compare
from cxrsynth.evaluate.cooccurrence import cooccurrence
from cxrsynth.study import report

TESTS = ["cxp:test", "mimic:test", "emory:test"]
#: params.yaml as the pipeline reads it (cxrsynth.study.plan).
PARAMS = {
    "seed": 0,
    "replicas": {"w1": {"guidance": 1.0, "replicas": 3}, "w5": {"guidance": 5.0, "replicas": 1},
                 "w8p5": {"guidance": 8.5, "replicas": 1}},
    "study": {"real": "cxp", "tests": ["cxp", "mimic", "emory"]},
    "evaluate": {"bootstrap": 200, "seed": 0, "alpha": 0.05},
    "cfg": {"replicas": ["w1", "w5", "w8p5"]},
    "supplement": {"replica": "w1", "k": [0, 1, 2, 3]},
    "synthetic": {"replica": "w1", "k": [1, 2, 3]},
    "external": {"real": "mimic", "replica": "w1", "k": [0, 1, 2]},
    "rebalance": {"guidance": 1.0, "target": 0.2, "k": 1},
}
MISSING = ("synthetic_k3", "cfg_w8p5_synthetic")  # expected by PARAMS, never written
RARE = ("lung_lesion", "pneumothorax", "pleural_other")  # 3% positive in the test sets
#: The paper's Table 2 as the cells' tuning-set macro AUROC (cfg_w8p5_synthetic is missing).
TUNE = {"supplement_k0": 0.8053, "cfg_real_w1": 0.7911, "cfg_real_w5": 0.9199, "cfg_real_w8p5": 0.9245,
        "cfg_w1_real": 0.7969, "cfg_w1_synthetic": 0.8016, "cfg_w5_real": 0.7406, "cfg_w5_synthetic": 0.9671,
        "cfg_w8p5_real": 0.6983}
GUIDANCE = {"w1": 1.0, "w5": 5.0, "w8p5": 8.5}


def _cells() -> dict[str, dict]:
    """Every cell the fixture writes: family, k, replica, tune, and the signal strength of its scores."""
    out = {}
    for k in PARAMS["supplement"]["k"]:
        out[f"supplement_k{k}"] = dict(family="supplement", k=k, replica="w1" if k else None, tune="real", signal=0.9 + 0.12 * k)
    for k in (1, 2):
        out[f"synthetic_k{k}"] = dict(family="synthetic", k=k, replica="w1", tune="real", signal=0.55 + 0.18 * k)
    for k in PARAMS["external"]["k"]:
        out[f"external_k{k}"] = dict(family="external", k=k, replica="w1" if k else None, tune="real", signal=0.8 + 0.1 * k)
    for r in PARAMS["cfg"]["replicas"]:
        for tune in ("real", "synthetic"):
            if f"cfg_{r}_{tune}" not in MISSING:
                out[f"cfg_{r}_{tune}"] = dict(family="cfg", k=None, replica=r, tune=tune, signal=1.0 - 0.04 * GUIDANCE[r])
        out[f"cfg_real_{r}"] = dict(family="cfg", k=None, replica=r, tune="synthetic", signal=0.9, real_train=True)
    out["rebalance_targeted"] = dict(family="rebalance", k=1, replica="rebalanced", tune="real", signal=1.02, rare_boost=0.8)
    return out


def _test_frames() -> dict[str, pd.DataFrame]:
    """Real test sets of the three sites (with a few rare findings), and cxp's training rows for the leak guard."""
    frames = {}
    for i, site in enumerate(("cxp", "mimic", "emory")):
        test = make_rows(site, patients(f"{site}te", 110), "test", seed=10 + i)
        rng = np.random.default_rng(20 + i)
        for column in RARE:  # exactly 3% positive (not a draw that may land above 5%)
            test[column] = 0
            test.loc[rng.choice(len(test), size=round(0.03 * len(test)), replace=False), column] = 1
        frames[site] = test
    return frames


def _scores(test: pd.DataFrame, signal: float, seed: int, rare_boost: float = 0.0) -> np.ndarray:
    """Scores sharing one noise draw per test set (paired models), plus a little noise of the cell's own."""
    y = labels.findings_matrix(test).astype(float)
    y = np.where(y < 0, 0.5, y)
    common = np.random.default_rng(("cxp", "mimic", "emory").index(test["dataset"].iloc[0])).normal(0, 1, y.shape)
    own = np.random.default_rng(seed).normal(0, 0.35, y.shape)
    strength = np.full(F, signal)
    for column in RARE:
        strength[labels.FINDING_COLUMNS.index(column)] += rare_boost
    return (1 / (1 + np.exp(-(strength * y + common + own)))).astype(np.float32)


def _evaluation(path: Path, root: Path) -> dict:
    m = json.loads(path.read_text())
    keep = ("auroc", "sd", "ci95", "n_pos", "n_neg", "reason")
    return {"path": str(path.relative_to(root)), "macro": {k: m["macro"][k] for k in ("auroc", "sd", "ci95")},
            "findings": {c: {k: v for k, v in f.items() if k in keep} for c, f in m["findings"].items()},
            "images": m["test"]["images"]}


def build_study(tmp: Path) -> Path:
    """The project root the report reads. The metrics files the cells point at (relative paths, as the
    pipeline writes them) live in ``data/eval``, a project of their own with the test sets' manifests."""
    root = tmp / "proj"
    ev = root / "data" / "eval"
    # 1. test sets + a metrics file per cell and test set (what `cxrsynth evaluate` writes)
    frames = _test_frames()
    train = make_rows("cxp", patients("cxptr", 10), "train", seed=1)
    write_dataset(ev, "cxp", pd.concat([train, frames["cxp"]], ignore_index=True))
    for site in ("mimic", "emory"):
        write_dataset(ev, site, frames[site])
    cells = _cells()
    for n, (name, spec) in enumerate(cells.items()):
        evaluations = {}
        for test in TESTS:
            site = test.split(":")[0]
            pred = write_predictions(ev / "pred" / f"{name}_{site}.parquet", frames[site],
                                     _scores(frames[site], spec["signal"], seed=n, rare_boost=spec.get("rare_boost", 0.0)),
                                     model=model_dict(classifier_id=f"clf-{name}"),
                                     data={"name": site, "version": "v1", "split": "test"})
            evaluated = metrics.evaluate(ev, pred, metrics.EvaluateConfig(bootstrap=200, seed=0), threads=1)
            path, _ = metrics.write(evaluated, ev / "metrics" / f"{name}_{site}.json")
            evaluations[test] = _evaluation(path, root)
        tune = TUNE.get(name, 0.78 + 0.01 * n)
        evaluations["tune"] = {"path": f"data/eval/metrics/{name}_tune.json", "images": 40, "findings": {},
                               "macro": {"auroc": tune, "sd": 0.011, "ci95": [tune - 0.02, tune + 0.02]}}
        real_images = 0 if spec["family"] == "synthetic" or (spec["family"] == "cfg" and not spec.get("real_train")) else 400
        synthetic_images = 400 * (spec["k"] or 0) if spec["family"] != "cfg" else (0 if spec.get("real_train") else 400)
        doc = {"cell": name, "family": spec["family"], "tag": name.split("_", 1)[1], "k": spec["k"], "replica": spec["replica"],
               "guidance": GUIDANCE.get(spec["replica"] or "", 1.0 if spec["replica"] else None), "tune": spec["tune"],
               "train": {"name": name, "real_images": real_images, "synthetic_images": synthetic_images},
               "classifier": {"preset": "small", "classifier_id": f"clf-{name}", "best": {"epoch": 3, "tune_loss": 0.31}},
               "evaluations": evaluations}
        (root / "metrics" / "study").mkdir(parents=True, exist_ok=True)
        (root / "metrics" / "study" / f"{name}.json").write_text(json.dumps(doc, indent=1))
    # 2. comparisons per family and test set, as cxrsynth.study.compare writes them (no cfg: the report must
    #    say so; the rebalance file without the "cell" key: its cells are found by their metrics paths)
    members = {"supplement": ("supplement_k0", ["supplement_k1", "supplement_k2", "supplement_k3"]),
               "synthetic": ("supplement_k0", ["synthetic_k1", "synthetic_k2"]),
               "external": ("external_k0", ["external_k1", "external_k2"]),
               "rebalance": ("supplement_k1", ["rebalance_targeted"])}
    for family, (base, others) in members.items():
        tests = {}
        for test in TESTS:
            site = test.split(":")[0]
            m = ev / "metrics"
            tests[test] = compare(ev, m / f"{base}_{site}.json", [m / f"{o}_{site}.json" for o in others],
                                  CompareConfig(bootstrap=2000), threads=1)
            if family != "rebalance":
                for comparison, other in zip(tests[test]["comparisons"], others):
                    comparison["cell"] = other
        doc = {"family": family, "baseline": base, "cells": others, "tests": tests}
        (root / "metrics" / "compare").mkdir(parents=True, exist_ok=True)
        (root / "metrics" / "compare" / f"{family}.json").write_text(json.dumps(doc, indent=1))
    # 3. Fréchet distances (none for w8p5)
    (root / "metrics" / "distance").mkdir(parents=True)
    for r, fid in (("w1", 3.21), ("w5", 4.87)):
        (root / "metrics" / "distance" / f"{r}.json").write_text(json.dumps(
            {"replica": r, "dataset": f"cxp_{r}", "guidance": GUIDANCE[r], "feature": "classifier", "fid": fid,
             "real_halves": 0.52, "n_real": 24, "n_synthetic": 24}))
    # 4. a real cxp dataset with images and a micro generator's replica cxp_w1 of its training split
    ingest_site(tmp, chexpert_rows(n_patients=12, studies=1, uncertain=False), size=64, shard_size=8,
                split={"tune": 0.2, "seed": 0})
    replica(root, micro_generator(tmp / "gen"), "cxp_w1", replicas=1, steps=2, guidance=1.0, seed=5, shard_size=4)
    # 5. the other sites' labels, the training mixes of the rebalancing pair, label co-occurrence
    write_dataset(root, "mimic", make_rows("mimic", patients("m", 40), "train", seed=3))
    write_dataset(root, "emory", make_rows("emory", patients("e", 40), "test", seed=4))
    for name, share in (("supplement_k1", 0.03), ("rebalance_targeted", 0.2)):
        mix = make_rows(name, patients(name, 30), "train", seed=6)
        mix["pneumothorax"] = (np.arange(len(mix)) < share * len(mix)).astype(int)
        manifest.write(root, name, mix, {"dataset": name, "version": f"{name}-v", "kind": "mix"})
    cooccurrence(root, ["cxp", "mimic", "emory"], root / "metrics" / "cooccurrence")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    root = build_study(tmp)
    path = report.build_report(root, PARAMS, root / "report")
    return root, path, path.read_text()


# ------------------------------------------------------------------ a small HTML reader


class Page(HTMLParser):
    """Images, headings, sections and tables (rows of cells with their classes) of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.h2, self.sections, self.tables = [], [], [], []
        self._text: list[str] | None = None
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "h2":
            self._text = []
        elif tag == "table":
            self.tables.append({"attrs": a, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = {"tag": tag, "class": a.get("class", ""), "title": a.get("title", ""), "text": ""}
            self.tables[-1]["rows"][-1].append(self._cell)

    def handle_endtag(self, tag):
        if tag == "h2" and self._text is not None:
            self.h2.append("".join(self._text))
            self._text = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)
        if self._cell is not None:
            self._cell["text"] += data

    def table(self, css: str, **attrs) -> dict:
        (found,) = [t for t in self.tables if css in t["attrs"].get("class", "").split()
                    and all(t["attrs"].get(f"data-{k}") == v for k, v in attrs.items())]
        return found


def _study(root: Path) -> report.Study:
    return report.load(root, PARAMS)


# ------------------------------------------------------------------ tests
# The tests that read ``built`` are slow: building the study (a 64 px site, a replica, the
# comparisons' 2000-draw bootstraps) takes ~10 s.


@pytest.mark.slow
def test_every_figure_and_table_is_there_and_embedded(built):
    root, path, text = built
    page = Page(text)
    assert page.sections == ["summary", "reading", "figure3", "figure4", "table2", "findings", "rebalance", "cas",
                             "quality", "cooccurrence", "facts"]
    assert [h.split(" —")[0] for h in page.h2][:5] == ["Summary", "How to read this report", "Figure 3", "Figure 4", "Table 2"]
    # figures 3 and 4, rebalancing, CAS, co-occurrence overview + 3 full heat maps, 8 real/synthetic pairs
    figures_ = [i for i in page.images if i.get("class") == "figure"]
    xrays = [i for i in page.images if i.get("class") == "xray"]
    assert len(figures_) == 8 and len(xrays) == 16 and len(page.images) == 24
    for image in page.images:  # every image is an embedded PNG that decodes: nothing is fetched from disk or network
        assert image["src"].startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))) as im:
            im.load()
            assert im.size[0] >= 32
    assert "<link" not in text and "<script" not in text and 'src="http' not in text and "<style>" in text
    # per-finding tables: 4 families x 3 test sets, + rebalancing per test set; each 14 findings + macro + header
    for family in ("supplement", "synthetic", "external", "cfg", "rebalance"):
        for test in TESTS:
            table = page.table("findings", family=family, test=test)
            names = [r[0]["text"].replace("rare", "").strip() for r in table["rows"][1:]]
            assert len(names) == 15 and "Macro mean" in names and set(labels.FINDINGS) <= set(names)
    for css in ("table2", "cas", "fid", "cooccurrence"):
        assert page.table(css)
    assert len([t for t in page.tables if "facts" in t["attrs"]["class"]]) == 2
    assert "Parameters (params.yaml)" in text and "replicas: [w1, w5, w8p5]" in text


@pytest.mark.slow
def test_figure3_and_4_panels_are_the_test_sets_and_the_plot_data_match_the_cells(built):
    root, _, _ = built
    study = _study(root)
    panels = report.curve_panels(study, "supplement")
    assert [p.title for p in panels] == ["cxp test", "mimic test", "emory test"]
    for panel, test in zip(panels, TESTS):
        blue, orange = panel.series
        assert [p.k for p in blue.points] == [0, 1, 2, 3] and [p.k for p in orange.points] == [1, 2]
        assert panel.lines[0].value == study.cells["supplement_k0"]["evaluations"][test]["macro"]["auroc"]
        assert blue.points[2].sd == study.cells["supplement_k2"]["evaluations"][test]["macro"]["sd"]
    external = report.curve_panels(study, "external")
    assert [p.k for p in external[2].series[0].points] == [0, 1, 2]
    assert external[2].lines[0].value == study.macro("external_k0", "emory:test")[0]
    paths = report.write_plot_data(root, PARAMS)
    assert [p.name for p in paths] == ["supplement.json", "external.json"]
    points = json.loads(paths[0].read_text())
    assert len(points) == 3 * (4 + 2) and set(points[0]) == {"k", "test", "family", "auroc", "sd"}
    for p in points:
        assert p["auroc"] == study.macro(f"{p['family']}_k{p['k']}", p["test"])[0]
    assert {p["family"] for p in json.loads(paths[1].read_text())} == {"external"}


@pytest.mark.slow
def test_headline_metrics_are_one_macro_auroc_per_cell_and_evaluation_and_the_cas(built):
    from cxrsynth import __version__
    from cxrsynth.study.summary import write_headline

    root, _, _ = built
    study = _study(root)
    data = json.loads(write_headline(root, PARAMS, "out/metrics.json").read_text())
    assert set(data) == set(study.cells) | {"cas", "cxrsynth"} and data["cxrsynth"] == __version__
    for name, cell in study.cells.items():
        assert data[name] == {label: round(e["macro"]["auroc"], 4) for label, e in cell["evaluations"].items()}
    # CAS: the synthetic_k1 cell (100% synthetic alone, as the report's CAS section), test sets only
    assert data["cas"] == {label: v for label, v in data["synthetic_k1"].items() if label != "tune"}
    assert set(data["cas"]) == set(TESTS)


@pytest.mark.slow
def test_table2_grid_guidance_and_missing_cell(built):
    _, _, text = built
    rows = Page(text).table("table2")["rows"]
    heads = [c["text"] for c in rows[1]]
    assert heads == ["Real", "w1w = 1 (paper's CFG 0)", "w5w = 5 (paper's CFG 4)", "w8p5w = 8.5 (paper's CFG 7.5)"]
    grid = {r[0]["text"][:4]: [c["text"] for c in r[1:]] for r in rows[2:]}
    value = lambda cell: float(cell.split("SD")[0])  # noqa: E731
    assert [value(c) for c in grid["Real"]] == [TUNE[c] for c in ("supplement_k0", "cfg_real_w1", "cfg_real_w5", "cfg_real_w8p5")]
    assert [value(c) for c in grid["w1w "][:2]] == [TUNE["cfg_w1_real"], TUNE["cfg_w1_synthetic"]]
    assert grid["w1w "][2:] == ["–", "–"]
    assert value(grid["w5w "][0]) == TUNE["cfg_w5_real"] and value(grid["w5w "][2]) == TUNE["cfg_w5_synthetic"]
    assert value(grid["w8p5"][0]) == TUNE["cfg_w8p5_real"] and grid["w8p5"][3] == "–†"  # expected, not run: marked
    assert all(c.endswith("SD 0.011") for c in grid["Real"])


@pytest.mark.slow
def test_significant_changes_are_marked_as_the_comparisons_say(built):
    root, _, text = built
    page = Page(text)
    marked = 0
    for family in ("supplement", "synthetic", "external", "rebalance"):
        doc = json.loads((root / "metrics" / "compare" / f"{family}.json").read_text())
        for test in TESTS:
            table = page.table("findings", family=family, test=test)
            header = [c["text"] for c in table["rows"][0]]
            by_name = {r[0]["text"].replace("rare", "").strip(): r for r in table["rows"][1:]}
            for comparison in doc["tests"][test]["comparisons"]:
                cell = Path(comparison["other"]).stem.rsplit("_", 1)[0]
                label = "AUROC, targeted" if family == "rebalance" else report.cell_label(cell)
                column = next(i for i, h in enumerate(header) if h.startswith(label))
                for row in comparison["rows"]:
                    name = "Macro mean" if row["finding"] == "macro" else report.FINDING_NAME[row["finding"]]
                    td = by_name[name][column]
                    assert td["text"].startswith(f"{row['other']:.3f}") and f"{row['delta']:+.3f}" in td["text"]
                    expected = {True: "sig-up" if row["delta"] > 0 else "sig-down", False: ""}[row["significant_paired"]]
                    assert td["class"] == expected, (family, test, cell, row)
                    marked += row["significant_paired"]
    assert marked >= 3  # the fixture's planted gains reach significance somewhere
    # rare findings are flagged where the test set has < 5% positives, with the prevalence shown
    table = page.table("findings", family="supplement", test="cxp:test")
    for r in table["rows"][1:]:
        name = r[0]["text"].replace("rare", "").strip()
        if name == "Macro mean":
            continue
        share = float(r[1]["text"].split("%")[0]) / 100
        assert ("rare" in r[0]["text"]) == (share < 0.05), name
        assert ("rare" in r[0]["text"]) == (report.labels.COLUMN_OF[name] in RARE)


@pytest.mark.slow
def test_missing_results_are_said_and_the_cfg_family_has_no_significance(built):
    root, _, text = built
    notice = text.split('<div class="notice">', 1)[1].split("</div>", 1)[0]
    for cell in MISSING:
        assert f"<code>{cell}</code>" in notice
    assert "no comparison of the cfg family" in notice and "of the supplement family" not in notice
    table = Page(text).table("findings", family="synthetic", test="cxp:test")
    assert [c["text"] for c in table["rows"][0]][-1] == "k = 3 (300%)" and table["rows"][1][-1]["text"] == "–"
    cfg = Page(text).table("findings", family="cfg", test="emory:test")
    assert not any(c["class"].startswith("sig") for r in cfg["rows"] for c in r)  # no comparison file: nothing marked
    fid = Page(text).table("fid")["rows"]  # two distance files of three replicas: the third is said to be missing
    assert [r[0]["text"] for r in fid[1:]] == ["w1", "w5", "w8p5"] and fid[3][3]["text"].startswith("not measured yet")
    assert [c["text"] for c in fid[1][1:6]] == ["1", "0", "classifier", "3.210", "0.520"]


def _expected_significance(rows: dict[str, dict], family_size: int) -> str:
    """The significance clause for one cell's macro rows on the three test sets, as a reader would put it."""
    significant = [t.replace(":", " ") for t, r in rows.items() if r["significant_paired"]]
    if len(significant) == 3:
        words = "significant on all three test sets"
    elif not significant:
        words = "not significant on any test set"
    else:
        words = "significant on " + " and ".join(significant) + " only"
    return f"{words} after Bonferroni (paired bootstrap, Bonferroni over {family_size} comparisons)"


@pytest.mark.slow
def test_summary_sentences_are_computed_from_the_numbers(built):
    root, _, text = built
    study = _study(root)
    sentences = report.summary(study)
    for family, cell, base, lead in (
            ("supplement", "supplement_k3", "supplement_k0", "Adding 300% synthetic images (k = 3) to the real cxp training set"),
            ("synthetic", "synthetic_k2", "supplement_k0",
             "Training on 200% synthetic images alone (k = 2) instead of the real cxp images"),
            ("external", "external_k2", "external_k0",
             "Adding 200% cxp synthetic images (k = 2) to the real mimic training set")):
        docs = {n: json.loads((root / "metrics" / "study" / f"{n}.json").read_text()) for n in (base, cell)}
        doc = json.loads((root / "metrics" / "compare" / f"{family}.json").read_text())
        parts, rows = [], {}
        for test in TESTS:
            a, b = (docs[n]["evaluations"][test]["macro"]["auroc"] for n in (base, cell))
            (comparison,) = [c for c in doc["tests"][test]["comparisons"] if c["cell"] == cell]
            rows[test] = next(r for r in comparison["rows"] if r["finding"] == "macro")
            parts.append(f"{b - a:+.3f} on {test.replace(':', ' ')} ({a:.3f} → {b:.3f})")
        size = doc["tests"]["cxp:test"]["family"]["size"]
        expected = (f"{lead} changed the macro AUROC by {parts[0]}, {parts[1]} and {parts[2]}; "
                    f"{_expected_significance(rows, size)}.")
        (sentence,) = [s for s in sentences if s.startswith(lead)]
        assert sentence.startswith(expected), (sentence, expected)
        assert report.esc(sentence) in text
    # synthetic only: from which k it matched real-only training on each test set (or that it never did)
    (s,) = [s for s in sentences if s.startswith("Training on 200% synthetic images alone")]
    for test in TESTS:
        real = study.macro("supplement_k0", test)[0]
        hit = next((k for k in (1, 2) if study.macro(f"synthetic_k{k}", test)[0] >= real), None)
        label = test.replace(":", " ")
        assert (f"from k = {hit} on" if hit else "at no k up to 2 on") in s and label in s.split("Synthetic-only")[1]
    # CFG, CAS, co-occurrence, FID and the missing cells are said with their numbers
    assert any("reached 0.797 (w1, w = 1), 0.741 (w5, w = 5), 0.698 (w8p5, w = 8.5), against 0.805" in s for s in sentences)
    cas = study.macro("synthetic_k1", "cxp:test")
    assert any(f"macro AUROC {cas[0]:.3f} (SD {cas[1]:.3f})" in s for s in sentences)
    corr = json.loads((root / "metrics" / "cooccurrence" / "correlations.json").read_text())
    best = max(corr["pairs"], key=lambda p: p["pearson"]["r"])
    assert any(f"most between {best['a']} and {best['b']} (Pearson r = {best['pearson']['r']:.3f})" in s for s in sentences)
    assert any("w1 3.21 (real-vs-real floor 0.52), w5 4.87 (real-vs-real floor 0.52)." in s for s in sentences)
    assert any(s.startswith("2 classifiers expected by params.yaml have no results yet: synthetic_k3, cfg_w8p5_synthetic")
               for s in sentences)
    # rebalancing: the rare findings' mean change is the mean of the per-finding differences
    (s,) = [s for s in sentences if s.startswith("Targeted synthesis")]
    d = [study.finding("rebalance_targeted", "cxp:test", c)["auroc"] - study.finding("supplement_k1", "cxp:test", c)["auroc"]
         for c in RARE]
    assert f"On the findings under 5% prevalence the mean change was {np.mean(d):+.3f} on cxp test (3 findings, " in s


@pytest.mark.slow
def test_rebalancing_cas_grid_and_run_facts(built):
    root, _, text = built
    page = Page(text)
    table = page.table("findings", family="rebalance", test="cxp:test")
    first = [r[0]["text"].replace("rare", "").strip() for r in table["rows"][2:5]]
    assert set(first) == {report.FINDING_NAME[c] for c in RARE}  # rarest first
    ptx = next(r for r in table["rows"] if r[0]["text"].startswith("Pneumothorax"))
    assert [c["text"] for c in ptx[2:4]] == ["3.3%", "20.0%"]  # positive share in the plain and targeted training mixes
    cas = page.table("cas")
    assert cas["rows"][1][2]["text"].startswith(f"{_study(root).macro('synthetic_k1', 'cxp:test')[0]:.3f}")
    # image pairs: each synthetic image beside the real row it was conditioned on, with those conditions
    syn = manifest.read(root, "cxp_w1").set_index("key")
    pairs = re.findall(r'alt="real ([^"]+)".*?alt="synthetic ([^"]+)"', text)
    assert len(pairs) == 8 and all(syn.loc[s, "source_key"] == r for r, s in pairs)
    real = manifest.read(root, "cxp").set_index("key")
    r0 = real.loc[pairs[0][0]]
    positives = [report.FINDING_NAME[c] for c in labels.FINDING_COLUMNS if r0[c] == 1]
    assert f"{', '.join(positives) or 'no positive finding'}" in text
    # run facts: data versions, generator id, classifier ids
    for name in ("cxp", "cxp_w1", "mimic", "emory"):
        assert f"<code>{manifest.read_meta(root, name)['version']}</code>" in text
    assert f"<code>{syn['generator_id'].iloc[0]}</code>" in text
    assert "<code>clf-supplement_k2</code>" in text and "supplement_k1 <code>supplement_k1-v</code>" in text


def test_report_of_an_empty_or_damaged_study_says_what_is_missing(tmp_path):
    root = tmp_path / "empty"
    (root / "metrics" / "study").mkdir(parents=True)
    (root / "metrics" / "study" / "supplement_k1.json").write_text("{not json")
    params = {"study": {"real": "cxp", "tests": ["cxp"]}, "replicas": {"w1": {"guidance": 1.0, "replicas": 1}},
              "supplement": {"k": [0, 1], "replica": "w1"}, "external": {"real": "mimic", "replica": "w1", "k": [0, 1], "enabled": False}}
    path = report.build_report(root, params, tmp_path / "out")
    text = path.read_text()
    page = Page(text)
    assert "figure4" not in page.sections and "table2" not in page.sections  # families off: not drawn
    assert "<code>supplement_k0</code>" in text and "<code>supplement_k1</code>" in text
    assert "supplement_k1.json: unreadable (JSONDecodeError" in text
    assert "families not in params.yaml (turned off): synthetic, external, cfg, rebalance" in text
    assert "No CAS" in text and "No label co-occurrence" in text and "No image grid: no manifest named &#x27;cxp_w1&#x27;" in text
    assert not page.images and "No classifier of this figure has results on any test set yet." in text
    assert "No classifier of the supplement family has results yet." in text
    assert report.write_plot_data(root, params)[0].read_text() == "[]\n"


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _chrome(binary: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
        return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "HOME": profile})


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_chromium_renders_the_page(built, tmp_path):
    root, path, text = built
    binary = _chromium()
    shot = tmp_path / "report.png"
    r = _chrome(binary, f"--screenshot={shot}", "--window-size=1400,4000", "--hide-scrollbars", path.resolve().as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.shape == (4000, 1400)
    assert (gray < 200).mean() > 0.05 and gray.std() > 20  # text, tables and figures were drawn, not a blank page
    dom = _chrome(binary, "--dump-dom", path.resolve().as_uri()).stdout
    page = Page(dom)
    assert page.sections == Page(text).sections and len(page.images) == 24
    assert len(page.tables) == len(Page(text).tables)
