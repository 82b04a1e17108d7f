"""Evaluation: AUROC and bootstrap against direct scikit-learn / numpy, subgroups, the leakage guard, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import VERSION, F, make_rows, model_dict, patients, scores_for, write_dataset, write_predictions
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cxrsynth import labels, manifest
from cxrsynth.cli import app
from cxrsynth.errors import CxrsynthError
from cxrsynth.evaluate import metrics
from cxrsynth.evaluate.auroc import bootstrap_aurocs, counts_of, resample_draws
from cxrsynth.evaluate.leakage import LeakError


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """cxp: 12 train, 3 tune, 40 test patients (2 images each); predictions of the test split."""
    root = tmp_path / "proj"
    frame = pd.concat([make_rows("cxp", patients("tr", 12), "train", seed=1), make_rows("cxp", patients("tu", 3), "tune", seed=2),
                       make_rows("cxp", patients("te", 40), "test", seed=3)], ignore_index=True)
    write_dataset(root, "cxp", frame)
    test = frame.loc[frame["split"] == "test"]
    write_predictions(root / "pred.parquet", test, scores_for(test))
    return root


# ---------------------------------------------------------------- the bootstrap against sklearn


def _explicit(y: np.ndarray, s: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        yy, ss = y[idx, j], s[idx, j]
        keep = yy != -1
        if len(set(yy[keep])) == 2:
            out[j] = roc_auc_score(yy[keep], ss[keep])
    return out


def test_bootstrap_equals_sklearn_on_resampled_images_with_ties():
    rng = np.random.default_rng(0)
    n = 150
    y = rng.choice([1, 0, -1], size=(n, 4), p=[0.3, 0.6, 0.1]).astype(np.int8)
    y[:, 3] = rng.choice([1, 0], size=n, p=[0.8, 0.2])  # positives the larger class
    s = np.round(rng.random((n, 4)), 1)  # many ties
    reps = bootstrap_aurocs([s], y, None, 40, seed=7)[0]
    draws = np.concatenate(list(resample_draws(np.random.default_rng(7), n, 40)))
    direct = np.array([_explicit(y, s, draws[b]) for b in range(40)])
    np.testing.assert_allclose(reps, direct, rtol=0, atol=1e-12)
    # the chunking of the draws and the threads do not change anything
    np.testing.assert_array_equal(bootstrap_aurocs([s], y, None, 40, seed=7, chunk=3, threads=1)[0], reps)
    # several models share the draws: the first model's replicates are unchanged
    two = bootstrap_aurocs([s, 1 - s], y, None, 40, seed=7)
    np.testing.assert_array_equal(two[0], reps)
    np.testing.assert_allclose(two[1], 1 - reps, atol=1e-12)


def test_patient_bootstrap_resamples_whole_patients():
    rng = np.random.default_rng(1)
    n_patients = 60
    clusters = np.repeat(np.arange(n_patients), 2)  # 2 images per patient
    n = clusters.size
    y = rng.choice([1, 0, -1], size=(n, 3), p=[0.35, 0.6, 0.05]).astype(np.int8)
    s = np.round(rng.random((n, 3)), 2)
    reps = bootstrap_aurocs([s], y, clusters, 30, seed=3)[0]
    draws = np.concatenate(list(resample_draws(np.random.default_rng(3), n_patients, 30)))
    members = [np.flatnonzero(clusters == c) for c in range(n_patients)]
    direct = np.array([_explicit(y, s, np.concatenate([members[c] for c in draws[b]])) for b in range(30)])
    np.testing.assert_allclose(reps, direct, rtol=0, atol=1e-12)
    # the weights are per patient: both images of a patient always carry the same multiplicity
    counts = counts_of(draws, n_patients)[:, clusters]
    assert (counts[:, 0::2] == counts[:, 1::2]).all() and counts.sum(axis=1).tolist() == [n] * 30


def test_evaluate_matches_direct_sklearn_and_numpy(project: Path):
    ev = metrics.evaluate(project, project / "pred.parquet", metrics.EvaluateConfig(bootstrap=25, seed=5))
    frame = manifest.read(project, "cxp")
    test = frame.loc[frame["split"] == "test"].sort_values("key").reset_index(drop=True)
    pred = pd.read_parquet(project / "pred.parquet").set_index("key").loc[test["key"]]
    y = labels.findings_matrix(test)
    s = pred.loc[:, list(labels.FINDING_COLUMNS)].to_numpy(dtype=np.float64)
    draws = np.concatenate(list(resample_draws(np.random.default_rng(5), len(test), 25)))
    direct = np.array([_explicit(y, s, draws[b]) for b in range(25)])
    np.testing.assert_allclose(ev.findings_replicates, direct, atol=1e-12)
    points = []
    for j, column in enumerate(labels.FINDING_COLUMNS):
        f = ev.metrics["findings"][column]
        keep = y[:, j] != -1
        assert f["auroc"] == pytest.approx(roc_auc_score(y[keep, j], s[keep, j]), abs=1e-15)
        assert (f["n_pos"], f["n_neg"], f["n_uncertain"]) == (int((y[:, j] == 1).sum()), int((y[:, j] == 0).sum()),
                                                             int((y[:, j] == -1).sum()))
        col = direct[:, j][~np.isnan(direct[:, j])]
        assert f["sd"] == pytest.approx(np.std(col, ddof=1), abs=1e-12)
        assert f["ci95"] == pytest.approx(list(np.percentile(col, [2.5, 97.5])), abs=1e-12)
        points.append(f["auroc"])
    macro = ev.metrics["macro"]
    assert macro["auroc"] == pytest.approx(np.mean(points)) and macro["findings"] == F
    macro_direct = direct.mean(axis=1)
    macro_direct = macro_direct[~np.isnan(macro_direct)]
    assert macro["sd"] == pytest.approx(np.std(macro_direct, ddof=1), abs=1e-12)  # per replicate, not averaged SDs
    assert macro["sd"] < np.mean([ev.metrics["findings"][c]["sd"] for c in labels.FINDING_COLUMNS])
    assert ev.metrics["test"]["images"] == 80 and ev.metrics["test"]["datasets"] == {"cxp": {"images": 80, "versions": [VERSION]}}
    assert ev.metrics["model"]["classifier_id"] == "clf0" and "history" not in ev.metrics["model"]
    assert ev.metrics["leak"]["overlap"] == {} and ev.metrics["leak"]["checked"]


def test_uncertain_labels_are_masked_and_one_class_findings_are_null(tmp_path: Path):
    root = tmp_path / "p"
    frame = make_rows("cxp", patients("te", 30), "test", seed=4)
    frame["fracture"] = 0  # no positives
    frame["pleural_other"] = -1  # all uncertain
    write_dataset(root, "cxp", frame)
    s = scores_for(frame)
    # uncertain images get extreme scores: they must not move the AUROC
    unc = frame["edema"].to_numpy() == -1
    assert unc.any()
    s[unc, labels.FINDING_COLUMNS.index("edema")] = 1.0
    write_predictions(root / "p.parquet", frame, s, model=model_dict(tune_split=None))
    m = metrics.evaluate(root, root / "p.parquet", metrics.EvaluateConfig(bootstrap=20)).metrics
    e = labels.FINDING_COLUMNS.index("edema")
    keep = ~unc
    assert m["findings"]["edema"]["auroc"] == pytest.approx(roc_auc_score(frame["edema"][keep], s[keep, e]))
    for column, reason in (("fracture", "only one class"), ("pleural_other", "no certain labels")):
        f = m["findings"][column]
        assert f["auroc"] is None and reason in f["reason"] and f["sd"] is None and f["ci95"] is None
    defined = [m["findings"][c]["auroc"] for c in labels.FINDING_COLUMNS if m["findings"][c]["auroc"] is not None]
    assert m["macro"]["findings"] == F - 2 and m["macro"]["auroc"] == pytest.approx(np.mean(defined))


def test_subgroups_by_value(project: Path):
    config = metrics.EvaluateConfig(bootstrap=0, by=("sex", "age_band", "view"))
    m = metrics.evaluate(project, project / "pred.parquet", config).metrics
    frame = manifest.read(project, "cxp")
    test = frame.loc[frame["split"] == "test"]
    pred = pd.read_parquet(project / "pred.parquet").set_index("key").loc[test["key"]]
    assert set(m["subgroups"]["age_band"]) == {"unknown", "30-39", "60-69", "80-89"}
    assert m["subgroups"]["age_band"]["60-69"]["n"] == int(test["age"].between(60, 69.999).sum())
    assert m["subgroups"]["age_band"]["unknown"]["n"] == int(test["age"].isna().sum())
    females = (test["sex"] == "F").to_numpy()
    g = m["subgroups"]["sex"]["F"]
    assert g["n"] == int(females.sum()) and set(m["subgroups"]["sex"]) == {"F", "M"}
    j = labels.FINDING_COLUMNS.index("cardiomegaly")
    y = test["cardiomegaly"].to_numpy()[females]
    s = pred["cardiomegaly"].to_numpy()[females]
    assert g["findings"]["cardiomegaly"]["auroc"] == pytest.approx(roc_auc_score(y[y != -1], s[y != -1]))
    assert j >= 0 and m["macro"]["sd"] is None and m["bootstrap"]["n"] == 0
    with pytest.raises(CxrsynthError, match="--by column 'colour'"):
        metrics.evaluate(project, project / "pred.parquet", metrics.EvaluateConfig(bootstrap=0, by=("colour",)))


def test_join_refuses_missing_rows_and_unknown_keys(project: Path):
    frame = manifest.read(project, "cxp")
    test = frame.loc[frame["split"] == "test"]
    write_predictions(project / "short.parquet", test.iloc[1:], scores_for(test.iloc[1:]))
    with pytest.raises(CxrsynthError, match=r"1 row\(s\) of cxp split test have no prediction"):
        metrics.evaluate(project, project / "short.parquet", metrics.EvaluateConfig(bootstrap=0))
    extra = pd.concat([test, frame.loc[frame["split"] == "tune"].iloc[:2]])
    write_predictions(project / "extra.parquet", extra, scores_for(extra))
    with pytest.raises(CxrsynthError, match=r"2 prediction key\(s\) not found in cxp split test \(2 of them are in another"):
        metrics.evaluate(project, project / "extra.parquet", metrics.EvaluateConfig(bootstrap=0))


# ---------------------------------------------------------------- the CLI


def test_cli_same_bytes_for_same_seed_patient_cluster(project: Path):
    runner = CliRunner()
    outs = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        out = project / name / "metrics.json"
        r = runner.invoke(app, ["evaluate", str(project / "pred.parquet"), "--bootstrap", "200", "--seed", str(seed),
                                "--cluster", "patient", "--by", "view,sex,age_band,race", "--root", str(project),
                                "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert "macro AUROC" in r.output
        outs.append(out)
    a, b, c = (p.read_bytes() for p in outs)
    assert a == b and a != c
    assert (project / "a" / "metrics.replicates.npz").read_bytes() == (project / "b" / "metrics.replicates.npz").read_bytes()
    m = json.loads(a)
    assert m["bootstrap"] == {"n": 200, "seed": 3, "cluster": "patient", "clusters": 40, "sd": "ddof=1",
                              "ci95": "percentile (numpy linear)", "subgroups": "point estimates only"}
    assert m["predictions"] == "../pred.parquet" and set(m["subgroups"]) == {"view", "sex", "age_band", "race"}
    assert m["subgroups"]["race"].keys() == {"White", "Asian", "unknown"}
    metrics_back, reps = metrics.read_metrics(outs[0])
    assert reps["findings"].shape == (200, F) and reps["macro"].shape == (200,)


def test_cli_bad_file_is_one_clean_line(project: Path):
    bad = project / "bad.parquet"
    bad.write_text("not parquet")
    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", str(bad), "--root", str(project), "--out", str(project / "m.json")])
    assert r.exit_code == 2 and "error:" in r.output and "not a parquet file" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 2
    r = runner.invoke(app, ["evaluate", str(project / "nothing.parquet"), "--root", str(project),
                            "--out", str(project / "m.json")])
    assert r.exit_code == 2 and "no predictions file" in r.output
    r = runner.invoke(app, ["evaluate", str(project / "pred.parquet"), "--cluster", "study", "--root", str(project),
                            "--out", str(project / "m.json")])
    assert r.exit_code == 2 and "--cluster must be one of image, patient" in r.output


# ---------------------------------------------------------------- the leakage guard


def test_leak_refused_for_a_training_patient_and_recorded_with_allow_leak(tmp_path: Path):
    root = tmp_path / "p"
    train = make_rows("cxp", patients("tr", 6), "train", seed=1)
    test = make_rows("cxp", patients("te", 10), "test", seed=3)
    # one training patient also has an image in the test split (a bad split)
    leaked = make_rows("cxp", ["tr002"], "test", images=1, seed=9)
    test = pd.concat([test, leaked], ignore_index=True)
    write_dataset(root, "cxp", pd.concat([train, test], ignore_index=True))
    write_predictions(root / "p.parquet", test, scores_for(test), model=model_dict(tune_split=None))
    with pytest.raises(LeakError, match=r"classifier training rows \(cxp split train\): 1 patient\(s\), e.g. cxp:tr002"):
        metrics.evaluate(root, root / "p.parquet", metrics.EvaluateConfig(bootstrap=0))
    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", str(root / "p.parquet"), "--bootstrap", "10", "--root", str(root),
                            "--out", str(root / "m.json")])
    assert r.exit_code == 2 and "shares patients" in r.output and "--allow-leak" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", str(root / "p.parquet"), "--bootstrap", "10", "--allow-leak", "--root", str(root),
                            "--out", str(root / "m.json")])
    assert r.exit_code == 0, r.output
    leak = json.loads((root / "m.json").read_text())["leak"]
    assert leak["allowed"] is True
    assert leak["overlap"] == {"classifier training rows (cxp split train)": {"patients": 1, "examples": ["cxp:tr002"]}}


def test_leak_through_the_generator_of_synthetic_training_rows(tmp_path: Path):
    """Classifier trained on synthetic rows only; their generator saw patient tr003, who is in the test set."""
    root = tmp_path / "p"
    train = make_rows("cxp", patients("tr", 6), "train", seed=1)
    tune = make_rows("cxp", patients("tu", 2), "tune", seed=2)
    test = make_rows("cxp", patients("te", 10), "test", seed=3)
    leaked = make_rows("cxp", ["tr003"], "test", images=1, seed=9)
    test = pd.concat([test, leaked], ignore_index=True)
    write_dataset(root, "cxp", pd.concat([train, tune, test], ignore_index=True))
    gen = root / "data" / "models" / "gen"
    gen.mkdir(parents=True)
    (gen / "generator.json").write_text(json.dumps({"preset": "micro", "data_version": f"cxp@{VERSION}"}))
    # replicas conditioned on tr000's rows only (so the source_key route alone would not see tr003)
    sources = train.loc[train["patient_id"] == "tr000"]
    syn = sources.assign(key=[f"syn-{i}" for i in range(len(sources))], dataset="cxp_syn", origin="synthetic",
                         source_key=sources["key"].to_numpy(), patient_id=None, version="s1", replica=0, generator_id="g123")
    write_dataset(root, "cxp_syn", syn, version="s1", kind="synthetic", conditions="cxp", split="train",
                  generator="data/models/gen", generator_id="g123")
    mix = pd.concat([syn.assign(split="train"), tune], ignore_index=True)
    write_dataset(root, "synmix", mix, version="m1", kind="mix")
    model = model_dict(name="synmix", version="m1")
    write_predictions(root / "p.parquet", test, scores_for(test), model=model)
    with pytest.raises(LeakError) as info:
        metrics.evaluate(root, root / "p.parquet", metrics.EvaluateConfig(bootstrap=0))
    message = str(info.value)
    assert "generator g123 training rows (cxp split train): 1 patient(s), e.g. cxp:tr003" in message
    assert "classifier training rows" not in message  # the mix's training rows are all synthetic
    # a test image of the patient the replicas were conditioned on is caught by both routes
    test2 = pd.concat([make_rows("cxp", patients("te", 10), "test", seed=3),
                       make_rows("cxp", ["tr000"], "test", images=1, seed=8)])
    write_dataset(root, "cxp", pd.concat([train, tune, test2], ignore_index=True))
    write_predictions(root / "p2.parquet", test2, scores_for(test2), model=model)
    ev = metrics.evaluate(root, root / "p2.parquet", metrics.EvaluateConfig(bootstrap=0, allow_leak=True))
    overlap = ev.metrics["leak"]["overlap"]
    assert overlap["real rows the synthetic cxp_syn images were conditioned on"] == {"patients": 1, "examples": ["cxp:tr000"]}
    assert overlap["generator g123 training rows (cxp split train)"]["patients"] == 1
    assert any("records no split" in n for n in ev.metrics["leak"]["notes"])


def test_leak_guard_refuses_what_it_cannot_check(project: Path):
    frame = manifest.read(project, "cxp")
    test = frame.loc[frame["split"] == "test"]
    write_predictions(project / "stale.parquet", test, scores_for(test), model=model_dict(version="old"))
    with pytest.raises(LeakError, match=r"trained on cxp@old, the manifest is now cxp@v1"):
        metrics.evaluate(project, project / "stale.parquet", metrics.EvaluateConfig(bootstrap=0))
    ev = metrics.evaluate(project, project / "stale.parquet", metrics.EvaluateConfig(bootstrap=0, allow_leak=True))
    assert ev.metrics["leak"]["allowed"] and ev.metrics["leak"]["unverifiable"]


def test_evaluation_never_imports_the_generator_code():
    import subprocess
    import sys

    code = ("import sys; import cxrsynth.evaluate.metrics, cxrsynth.evaluate.compare, cxrsynth.evaluate.cooccurrence, "
            "cxrsynth.evaluate.leakage, cxrsynth.bench.evaluate; "
            "print(sorted(m for m in sys.modules if m.startswith('cxrsynth.diffusion') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
