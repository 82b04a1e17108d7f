"""Comparing models on one test set: the paired bootstrap finds a planted difference and no null one; Bonferroni."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_rows, model_dict, patients, scores_for, write_dataset, write_predictions
from scipy import stats
from typer.testing import CliRunner

from cxrsynth import labels, manifest
from cxrsynth.cli import app
from cxrsynth.errors import CxrsynthError
from cxrsynth.evaluate import metrics
from cxrsynth.evaluate.compare import CompareConfig, compare, paired_p

PLANTED = "cardiomegaly"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """cxp with 200 test patients (400 images); a baseline and three other models, each evaluated (B = 300)."""
    root = tmp_path_factory.mktemp("compare") / "proj"
    frame = pd.concat([make_rows("cxp", patients("tr", 10), "train", seed=1), make_rows("cxp", patients("tu", 4), "tune", seed=2),
                       make_rows("cxp", patients("te", 200), "test", seed=3)], ignore_index=True)
    frame.loc[frame["split"] == "test", "fracture"] = 0  # one finding without an AUROC: a smaller family
    write_dataset(root, "cxp", frame)
    test = frame.loc[frame["split"] == "test"]
    base = scores_for(test, seed=1)
    planted = base.copy()
    j = labels.FINDING_COLUMNS.index(PLANTED)
    planted[:, j] = np.clip(planted[:, j] + 0.3 * (test[PLANTED].to_numpy() == 1), 0, 1)  # better on one finding only
    tiny = (base + np.random.default_rng(5).normal(0, 1e-4, base.shape)).astype(np.float32)  # the same model, jittered
    independent = scores_for(test, seed=2)  # another model with the same score distribution
    for name, s in (("base", base), ("planted", planted), ("tiny", tiny), ("independent", independent)):
        write_predictions(root / f"{name}.parquet", test, s, model=model_dict(classifier_id=name))
        ev = metrics.evaluate(root, root / f"{name}.parquet", metrics.EvaluateConfig(bootstrap=300, seed=0))
        metrics.write(ev, root / "metrics" / f"{name}.json")
    return root


def _rows(result: dict, other: str) -> dict:
    (comparison,) = [c for c in result["comparisons"] if c["other"].endswith(f"{other}.json")]
    return {r["finding"]: r for r in comparison["rows"]}


def test_paired_bootstrap_detects_the_planted_difference_and_no_null_one(evaluated: Path):
    m = evaluated / "metrics"
    result = compare(evaluated, m / "base.json", [m / "planted.json", m / "tiny.json", m / "independent.json"],
                     CompareConfig(alpha=0.05, bootstrap=2000))
    others = {str(m / f"{n}.json"): 300 for n in ("planted", "tiny", "independent")}
    assert result["bootstrap"] == {"n": 2000, "seed": 0, "cluster": "image", "ttest_replicates": {"baseline": 300, **others}}
    planted = _rows(result, "planted")
    assert planted[PLANTED]["delta"] > 0.1 and planted[PLANTED]["significant_paired"]
    assert planted[PLANTED]["delta_ci95"][0] > 0
    for finding, row in planted.items():
        if finding not in (PLANTED, "macro"):  # identical scores: every replicate difference is 0
            assert row["delta"] == 0 and row["p_paired"] == 1.0 and not row["significant_paired"]
    for null in ("tiny", "independent"):
        for finding, row in _rows(result, null).items():
            assert row["p_paired_bonferroni"] > result["alpha"], (null, finding, row)
            assert not row["significant_paired"]
    assert max(abs(r["delta"]) for r in _rows(result, "tiny").values()) < 1e-3
    assert "fracture" not in planted and result["warnings"] == []


def test_bonferroni_family_and_the_ttest_on_saved_replicates(evaluated: Path):
    m = evaluated / "metrics"
    result = compare(evaluated, m / "base.json", [m / "planted.json", m / "independent.json"], CompareConfig(bootstrap=400))
    assert result["family"]["size"] == 2 * (13 + 1)  # 2 others x (13 findings with an AUROC + macro)
    base_m, base_r = metrics.read_metrics(m / "base.json")
    _, other_r = metrics.read_metrics(m / "independent.json")
    rows = _rows(result, "independent")
    for finding, row in rows.items():
        for p, adjusted, sig in (("p_ttest", "p_ttest_bonferroni", "significant_ttest"),
                                 ("p_paired", "p_paired_bonferroni", "significant_paired")):
            assert row[adjusted] == pytest.approx(min(1.0, row[p] * 28), abs=1e-15)
            assert row[sig] == (row[adjusted] < 0.05)
        if finding == "macro":
            a, b = base_r["macro"], other_r["macro"]
        else:
            j = labels.FINDING_COLUMNS.index(finding)
            a, b = base_r["findings"][:, j], other_r["findings"][:, j]
        assert row["p_ttest"] == pytest.approx(stats.ttest_ind(a, b).pvalue, rel=1e-12, abs=1e-300)
        assert row["baseline"] == base_m["findings"].get(finding, base_m["macro"])["auroc"]
    # the smallest paired p is 2 / (B + 1): too few replicates for this family is said
    small = compare(evaluated, m / "base.json", [m / "planted.json", m / "independent.json"], CompareConfig(bootstrap=100))
    assert small["warnings"] and "--bootstrap 1120" in small["warnings"][0]


def test_paired_p_value():
    assert paired_p(np.zeros(99)) == 1.0
    assert paired_p(np.ones(99)) == pytest.approx(2 / 100)
    d = np.r_[-np.ones(10), np.ones(89)]
    assert paired_p(d) == pytest.approx(2 * 11 / 100)


def test_compare_refuses_another_test_set(evaluated: Path):
    frame = manifest.read(evaluated, "cxp")
    tune = frame.loc[frame["split"] == "tune"]
    write_predictions(evaluated / "tune.parquet", tune, scores_for(tune), data={"name": "cxp", "version": "v1", "split": "tune"})
    ev = metrics.evaluate(evaluated, evaluated / "tune.parquet", metrics.EvaluateConfig(bootstrap=50, allow_leak=True))
    metrics.write(ev, evaluated / "metrics" / "tune.json")
    with pytest.raises(CxrsynthError, match=r"another test set.*test\.split is 'tune' there, 'test' in the baseline"):
        compare(evaluated, evaluated / "metrics" / "base.json", [evaluated / "metrics" / "tune.json"])


def test_compare_cli_table_and_clean_errors(evaluated: Path):
    m = evaluated / "metrics"
    runner = CliRunner()
    out = evaluated / "table.json"
    r = runner.invoke(app, ["compare", str(m / "base.json"), str(m / "planted.json"), "--bootstrap", "700", "--out", str(out),
                            "--root", str(evaluated)])
    assert r.exit_code == 0, r.output
    assert PLANTED in r.output and "p(pair)" in r.output and "Bonferroni over 14" in r.output
    table = json.loads(out.read_text())
    assert _rows(table, "planted")[PLANTED]["significant_paired"] and table["family"]["size"] == 14
    bad = evaluated / "bad.json"
    bad.write_text("{not json")
    r = runner.invoke(app, ["compare", str(m / "base.json"), str(bad), "--root", str(evaluated)])
    assert r.exit_code == 2 and "is not a metrics JSON" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["compare", str(m / "base.json"), "--root", str(evaluated)])
    assert r.exit_code == 2 and "Traceback" not in r.output
