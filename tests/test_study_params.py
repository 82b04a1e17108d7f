"""params.yaml typed once: every bad key, type, range or family is refused before anything runs, naming the key."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cxrsynth import manifest
from cxrsynth.classify.presets import get_preset
from cxrsynth.cli import app
from cxrsynth.errors import CxrsynthError
from cxrsynth.evaluate.compare import CompareConfig
from cxrsynth.evaluate.metrics import EvaluateConfig
from cxrsynth.study import plan
from cxrsynth.study.cell import classifier_config, run_cell
from cxrsynth.study.params import ParamsError, StudyParams

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
PAPER = yaml.safe_load((REPO / "params-paper.yaml").read_text())


def edited(change) -> dict:
    params = copy.deepcopy(PARAMS)
    change(params)
    return params


def test_the_project_parameter_files_parse_to_what_they_say():
    demo, paper = StudyParams.from_dict(PARAMS), StudyParams.load(REPO, "params-paper.yaml")
    assert demo.study.real == "cxp" and demo.study.tests == ("cxp", "mimic", "emory")
    assert {n: (r.guidance, r.replicas) for n, r in demo.replicas.items()} == {"w1": (1.0, 1), "w5": (5.0, 2), "w8p5": (8.5, 1)}
    assert demo.supplement.replica == "w5" and demo.supplement.k == (0, 1, 2) and demo.rebalance.k == 1
    assert demo.classifier.preset == "small" and dict(demo.classifier.overrides) == {"image_size": 32, "epochs": 7}
    assert demo.generator.steps == 800 and demo.generate.sampler == "dpmpp" and demo.split.test == 0.2
    assert demo.sources.mimic.patients == "data/raw/mimic/patients.csv.gz" and demo.phantom == {"cxp": 2400, "mimic": 1200,
                                                                                                  "emory": 1200}
    assert paper.supplement.k == tuple(range(11)) and paper.phantom == {} and paper.classifier.preset == "paper"
    assert StudyParams.load(REPO) == demo and demo.mapping == PARAMS  # load reads params.yaml; the mapping is kept as written
    assert StudyParams.load(REPO).file == "params.yaml" and StudyParams.of(demo) is demo
    with pytest.raises(dataclasses.FrozenInstanceError):
        demo.seed = 1


def test_defaults_are_the_libraries_and_todays():
    """A parameter set with only its study section: seed 0, the small classifier preset, and the
    evaluation's and comparison's own defaults (1000 bootstrap replicates, seed 0, alpha 0.05)."""
    bare = StudyParams.from_dict({"study": {"real": "cxp", "tests": ["cxp"]}})
    assert bare.seed == 0 and bare.replicas == {} and all(getattr(bare, f) is None for f in plan.FAMILIES)
    assert classifier_config(bare) == ("small", get_preset("small"))
    assert bare.evaluate.evaluate_config() == EvaluateConfig() and EvaluateConfig().bootstrap == 1000
    assert bare.evaluate.compare_config() == CompareConfig() and CompareConfig().alpha == 0.05
    # params.yaml's own settings reach the configurations the cells and comparisons use
    demo = StudyParams.from_dict(PARAMS)
    assert classifier_config(PARAMS) == ("small", get_preset("small", image_size=32, epochs=7))
    assert demo.evaluate.evaluate_config(allow_leak=True) == EvaluateConfig(bootstrap=1500, seed=0, allow_leak=True)
    assert not bare.enabled("cfg") and demo.enabled("cfg")
    assert not StudyParams.from_dict(edited(lambda p: p["cfg"].update(enabled=False))).enabled("cfg")


@pytest.mark.parametrize("change, key, words", [
    # unknown keys, at any level
    (lambda p: p["supplement"].update(kk=[1]), "supplement.kk", "unknown key (known here: replica, k, enabled); did you mean 'k'?"),
    (lambda p: p.update(sead=1), "sead", "did you mean 'seed'?"),
    (lambda p: p["replicas"]["w5"].update(guidence=2.0), "replicas.w5.guidence", "unknown key"),
    (lambda p: p["sources"]["cxp"].update(labels="x.csv"), "sources.cxp.labels", "unknown key"),
    (lambda p: p["classifier"].update(epoch=3), "classifier.epoch", "did you mean 'epochs'?"),
    # wrong types
    (lambda p: p["supplement"].update(k="two"), "supplement.k", "expected a list of numbers, got 'two'"),
    (lambda p: p["supplement"].update(k=[0, "two"]), "supplement.k[1]", "expected a number, got 'two'"),
    (lambda p: p["classifier"].update(epochs=1.5), "classifier.epochs", "expected an integer, got 1.5"),
    (lambda p: p["classifier"].update(lr="1e-3"), "classifier.lr", "expected a number, got '1e-3'"),  # YAML 1.1: a string
    (lambda p: p["replicas"]["w5"].update(guidance="high"), "replicas.w5.guidance", "expected a number"),
    (lambda p: p.update(seed=True), "seed", "expected an integer, got True"),
    (lambda p: p["study"].update(tests="cxp"), "study.tests", "expected a list of names"),
    (lambda p: p.update(replicas=["w1"]), "replicas", "expected a mapping of names to"),
    (lambda p: p["sources"]["emory"].update(table=None), "sources.emory.table", "expected a non-empty string, got None"),
    # missing keys and out-of-range values
    (lambda p: p["replicas"]["w5"].pop("guidance"), "replicas.w5.guidance", "missing; expected a number"),
    (lambda p: p.pop("study"), "study", "missing; expected a mapping with keys real, tests"),
    (lambda p: p["classifier"].update(preset="huge"), "classifier.preset", "unknown classifier preset 'huge'; known: paper, small"),
    (lambda p: p["classifier"].update(epochs=0), "classifier.epochs", "expected a value >= 1, got 0"),
    (lambda p: p["replicas"]["w5"].update(replicas=0), "replicas.w5.replicas", "expected a value >= 1, got 0"),
    (lambda p: p["supplement"].update(k=[0, -1]), "supplement.k[1]", "expected a value >= 0, got -1"),
    (lambda p: p["supplement"].update(k=[0, 1, 1]), "supplement.k[2]", "1 is already in the list"),
    (lambda p: p["split"].update(tune=-0.1), "split.tune", "expected a value >= 0"),
    (lambda p: p["split"].update(tune=0.9), "split", "tune + test is 1.1"),
    (lambda p: p["evaluate"].update(alpha=1.5), "evaluate.alpha", "expected a value < 1, got 1.5"),
    (lambda p: p["rebalance"].update(target=0), "rebalance.target", "expected a value > 0, got 0"),
    (lambda p: p["phantom"].update(cxp=0), "phantom.cxp", "expected a value >= 1, got 0"),
    (lambda p: p["generator"].update(ema=1.0), "generator.ema", "expected a value < 1"),
    (lambda p: p["study"].update(tests=[]), "study.tests", "got an empty list"),
    (lambda p: p["study"].update(tests=["cxp", "cxp"]), "study.tests[1]", "'cxp' is already in the list"),
    # families that do not fit together
    (lambda p: p["supplement"].update(replica="w9"), "supplement.replica", "'w9' is not a replica of `replicas` (known: w1, w5, w8p5)"),
    (lambda p: p["cfg"].update(replicas=["w1", "w7"]), "cfg.replicas[1]", "'w7' is not a replica of `replicas`"),
    (lambda p: p["external"].update(replica="w2"), "external.replica", "'w2' is not a replica"),
    (lambda p: p["rebalance"].update(k=3), "rebalance.k", "compared with supplement_k3 (plain replicas of the same size), "
                                                          "but supplement.k is [0, 1, 2]"),
    (lambda p: p["supplement"].update(k=[1, 2]), "supplement.k", "baseline is supplement_k0"),
    (lambda p: p.pop("supplement"), "synthetic", "compared with supplement_k0 (real data alone), but there is no supplement section"),
    (lambda p: p["external"].update(k=[1, 2]), "external.k", "baseline is external_k0"),
    (lambda p: p["supplement"].update(k=[0, 1, 2, 3]), "supplement.k[3]", "k = 3 needs 3 replicas of w5; replicas.w5.replicas is 2"),
    (lambda p: p["synthetic"].update(k=[0, 1]), "synthetic.k[0]", "a purely synthetic training set needs k > 0"),
    (lambda p: p["replicas"].update(real={"guidance": 1.0, "replicas": 1}), "replicas.real", "not 'real' or 'rebalanced'"),
    (lambda p: p["replicas"].update({"w-2": {"guidance": 1.0, "replicas": 1}}), "replicas.w-2", "letters, digits and underscores"),
])
def test_a_bad_parameter_is_refused_naming_its_key(change, key, words):
    with pytest.raises(ParamsError) as caught:
        StudyParams.from_dict(edited(change), "params.yaml")
    assert caught.value.key == key and isinstance(caught.value, CxrsynthError)
    assert str(caught.value).startswith(f"params.yaml: {key}: ") and words in str(caught.value), str(caught.value)


def test_the_plan_refuses_a_bad_mapping_and_a_family_that_is_not_there():
    with pytest.raises(ParamsError, match=r"supplement\.k\[1\]"):
        plan.family_cells(edited(lambda p: p["supplement"].update(k=[0, "two"])), "supplement")
    bare = {"study": {"real": "cxp", "tests": ["cxp"]}}
    with pytest.raises(ParamsError, match="supplement: missing: the supplement family is not in these parameters"):
        plan.family_cells(bare, "supplement")


def write_params(root: Path, params: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.parametrize("command", [["check"], ["cell", "supplement", "k1"], ["compare", "supplement"], ["distance", "w5"],
                                     ["report"], ["summary"]])
def test_every_study_command_checks_params_first(tmp_path, command):
    root = write_params(tmp_path / "proj", edited(lambda p: p["supplement"].update(k=[0, "two"])))
    result = CliRunner().invoke(app, ["study", *command, "--root", str(root)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: params.yaml: supplement.k[1]: expected a number, got 'two'" in " ".join(result.output.split())
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]  # nothing ran, nothing was written


def test_check_says_ok_and_reads_bad_yaml_as_one_line(tmp_path):
    root = write_params(tmp_path / "proj", PARAMS)
    result = CliRunner().invoke(app, ["study", "check", "--root", str(root)])
    assert result.exit_code == 0 and result.output == "params.yaml: ok\n"
    result = CliRunner().invoke(app, ["study", "check", "--data", "--root", str(root)])
    assert result.exit_code == 0 and "data: ok (not ingested yet, not checked: cxp, mimic, emory)" in result.output
    (root / "params.yaml").write_text("study: {real: cxp, tests: [cxp]\nseed: 0\n")
    result = CliRunner().invoke(app, ["study", "check", "--root", str(root)])
    assert result.exit_code == 2 and "error: params.yaml: not valid YAML (line" in result.output
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False) + "seed: 1\n")  # safe_load would keep the last
    result = CliRunner().invoke(app, ["study", "check", "--root", str(root)])
    assert result.exit_code == 2 and "key 'seed' is given twice in one mapping (first on line 1)" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["study", "check", "--root", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "parameters file not found" in result.output


def test_a_bad_params_yaml_fails_in_under_two_seconds_without_torch(tmp_path):
    """The whole command, interpreter start included, in a fresh process; neither torch nor pandas is imported.

    Timed in the child's CPU seconds (user + system), not wall time: on a shared 2-core machine
    the wall time of a process start swings with the load (3.1 s once while another test ran),
    while the work the check does, which is what the 2 seconds bound, does not."""
    import resource

    root = write_params(tmp_path / "proj", edited(lambda p: p["classifier"].update(epochs=1.5)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cxrsynth", "study", "check", "--root", str(root)],
                          capture_output=True, text=True, env=env, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: params.yaml: classifier.epochs: expected an integer, got 1.5" in done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "cxrsynth.study.params" in imported and not imported & {"torch", "pandas", "numpy"}
    assert seconds < 2.0, f"{seconds:.2f} CPU seconds"


def manifest_with(root: Path, name: str, splits: list[str]) -> None:
    frame = pd.DataFrame({"key": [f"{name}_{i}" for i in range(len(splits))], "dataset": name, "version": "v1",
                          "split": splits, "patient_id": [f"p{i}" for i in range(len(splits))], "origin": "real"})
    manifest.write(root, name, frame, {"dataset": name, "version": "v1", "kind": "test"})


def test_a_test_set_without_test_rows_fails_before_a_cell_trains(tmp_path):
    root = write_params(tmp_path / "proj", PARAMS)
    manifest_with(root, "cxp", ["train", "tune", "test"])
    manifest_with(root, "mimic", ["train", "tune"])  # an official split without test rows
    assert CliRunner().invoke(app, ["study", "check", "--root", str(root)]).exit_code == 0  # the file alone is fine
    result = CliRunner().invoke(app, ["study", "check", "--data", "--root", str(root)])
    assert result.exit_code == 2 and "params.yaml: ok" in result.output
    assert "error: study.tests[1]: dataset 'mimic' has no test rows (train 1, tune 1); every cell is evaluated on it" in \
        " ".join(result.output.split())
    # a cell refuses to start (emory not ingested yet is an error there), before it mixes or trains anything
    with pytest.raises(CxrsynthError, match=r"study\.tests\[1\]: dataset 'mimic' has no test rows"):
        run_cell(root, PARAMS, "supplement", "k0", log=lambda line: None)
    manifest_with(root, "mimic", ["train", "test"])
    with pytest.raises(CxrsynthError, match="no manifest named 'emory'"):
        run_cell(root, PARAMS, "supplement", "k0", log=lambda line: None)
    assert not (root / "data").exists() and sorted(manifest.list_names(root)) == ["cxp", "mimic"]
    manifest_with(root, "emory", ["test"])
    assert plan.check_data(root, PARAMS) == []
    assert CliRunner().invoke(app, ["study", "check", "--data", "--root", str(root)]).output.endswith("data: ok\n")


def test_a_cell_runs_on_the_typed_parameters(tmp_path):
    """`cxrsynth study cell` on a tiny ingested site: the classifier and evaluation settings of
    params.yaml reach the training and the metrics, and the summary, headline and report read them."""
    from conftest import chexpert_rows, ingest_site

    from cxrsynth.study.summary import headline

    root = ingest_site(tmp_path, chexpert_rows(n_patients=16, studies=2, uncertain=False), shard_size=16,
                       split={"tune": 0.25, "test": 0.25, "seed": 0})
    params = {"seed": 0, "study": {"real": "cxp", "tests": ["cxp"]}, "replicas": {"w1": {"guidance": 1.0, "replicas": 1}},
              "classifier": {"preset": "small", "image_size": 16, "epochs": 1, "batch_size": 8, "exclude_uncertain": False},
              "evaluate": {"bootstrap": 20}, "supplement": {"replica": "w1", "k": [0]}}
    write_params(root, params)
    result = CliRunner().invoke(app, ["study", "cell", "supplement", "k0", "--root", str(root), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cell = json.loads((root / "metrics" / "study" / "supplement_k0.json").read_text())
    assert set(cell["evaluations"]) == {"tune", "cxp:test"} and cell["train"]["synthetic_images"] == 0
    model = json.loads((root / "data" / "study" / "supplement_k0" / "model" / "classifier.json").read_text())
    assert model["config"]["epochs"] == 1 and model["config"]["image_size"] == 16
    full = json.loads((root / cell["evaluations"]["cxp:test"]["path"]).read_text())
    assert full["bootstrap"]["n"] == 20 and full["bootstrap"]["seed"] == 0  # evaluate.bootstrap; the seed's default
    assert headline(root, params)["supplement_k0"]["cxp:test"] == round(cell["evaluations"]["cxp:test"]["macro"]["auroc"], 4)
    result = CliRunner().invoke(app, ["study", "report", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "supplement_k0" in (root / "report" / "index.html").read_text()
