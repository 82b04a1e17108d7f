"""Label co-occurrence matrices and their Pearson correlation (the paper's Figures E1-E3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import F, make_rows, patients, write_dataset
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from cxrsynth import labels
from cxrsynth.cli import app
from cxrsynth.evaluate.cooccurrence import correlation, matrix


def test_matrix_counts_images_positive_for_both():
    frame = make_rows("a", patients("p", 20), "test", seed=3)
    y = labels.findings_matrix(frame)
    counts = matrix(frame)
    for i in range(F):
        for j in range(F):
            assert counts[i, j] == sum(1 for row in y if row[i] == 1 and row[j] == 1)  # uncertain is not positive
    assert (np.diag(counts) == (y == 1).sum(axis=0)).all() and (counts == counts.T).all()


def test_correlation_is_pearson_of_the_flattened_matrices():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, (F, F))
    a = a + a.T
    b = a + rng.integers(0, 20, (F, F))
    b = b + b.T
    c = correlation(a, b)
    assert c["pearson"]["r"] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)
    upper = np.triu_indices(F)
    assert c["pearson_upper"]["r"] == pytest.approx(stats.pearsonr(a[upper], b[upper]).statistic, abs=1e-12)
    assert correlation(a, 3 * a)["pearson"]["r"] == pytest.approx(1.0)  # scale-invariant: counts or shares alike
    assert correlation(a, np.ones_like(a))["pearson"]["r"] is None


def test_cooccurrence_cli_writes_json_png_and_correlations(tmp_path: Path):
    root = tmp_path / "p"
    a = pd.concat([make_rows("a", patients("p", 30), "train", seed=1), make_rows("a", patients("q", 10), "test", seed=2)])
    write_dataset(root, "a", a)
    write_dataset(root, "b", make_rows("b", patients("r", 25), "train", seed=5))
    write_dataset(root, "c", make_rows("c", patients("s", 25), "train", seed=1))  # a's train labels, another name
    out = tmp_path / "co"
    r = CliRunner().invoke(app, ["cooccurrence", "a", "b", "c", "--split", "train", "--out", str(out), "--root", str(root)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "a.json").read_text())
    train = a.loc[a["split"] == "train"]
    assert doc["images"] == len(train) == 60 and doc["counts"] == matrix(train).tolist()
    assert np.allclose(doc["normalized"], matrix(train) / 60)
    corr = json.loads((out / "correlations.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in corr["pairs"]}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}
    b_counts = np.array(json.loads((out / "b.json").read_text())["counts"])
    direct = stats.pearsonr(matrix(train).ravel(), b_counts.ravel()).statistic
    assert pairs[("a", "b")]["pearson"]["r"] == pytest.approx(direct, abs=1e-9)
    # c has 25 of a's 30 training patients' label draws: a strong but imperfect correlation
    assert 0.9 < pairs[("a", "c")]["pearson"]["r"] < 1.0
    for name in ("a", "b", "c"):
        with Image.open(out / f"{name}.png") as image:
            assert image.size[0] > 800 and image.size[1] > 800
    assert "Pearson" in r.output
    r = CliRunner().invoke(app, ["cooccurrence", "a", "nosuch", "--out", str(out), "--root", str(root)])
    assert r.exit_code == 2 and "no manifest named 'nosuch'" in r.output and "Traceback" not in r.output
    assert json.loads((out / "a.json").read_text())["images"] == 60  # nothing was written by the failed call
    r = CliRunner().invoke(app, ["cooccurrence", "a", "--split", "tune", "--out", str(out), "--root", str(root)])
    assert r.exit_code == 2 and "a split tune has no images" in r.output
