"""`dvc repro` of the project's own dvc.yaml on a tiny parameter set, in a temporary clone.

Every stage runs and the report is written with its figures; a second repro runs nothing;
its cells run two at a time (scripts/parallel-cells.sh) give the same bytes;
one more k runs only that cell (and what reads every cell); `dvc push` sends the replicas'
audited, scrubbed packages to the synthetic remote and nothing real (not the replicas themselves,
whose rows link to real ones); `dvc pull` brings them back, the same bytes.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def sh(*args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _tiny_run():
    """scripts/tiny-run.py, loaded by path (a script, not a module): its tiny parameters and project copy."""
    spec = importlib.util.spec_from_file_location("tiny_run", REPO / "scripts" / "tiny-run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git_commit(clone: Path) -> None:
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=clone)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "step", cwd=clone)


@pytest.mark.slow
def test_dvc_repro_runs_the_study_in_parallel_too_reruns_nothing_and_pushes_only_synthetic_data(tmp_path):
    clone = tmp_path / "repo" / "clone"
    params = _tiny_run().tiny_project(REPO, clone)
    sh("git", "init", "-q", cwd=clone)
    git_commit(clone)

    first = sh("dvc", "repro", cwd=clone).stdout
    stages = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    expected = {"phantom@cxp", "ingest_cxp", "ingest_mimic", "ingest_emory", "generator_cxp", "replica@w1",
                "replica_rebalanced", "package@w1", "package_rebalanced", "cfg@w1-real", "cfg@w1-synthetic", "cfg_real@w1", "supplement@0", "supplement@1",
                "synthetic@1", "external@0", "external@1", "rebalance", "compare@supplement", "compare@cfg",
                "distance@w1", "cooccurrence", "stats@emory", "memorisation", "report"}
    assert expected <= set(stages) and expected <= ran(first)
    html = (clone / "report/index.html").read_text()
    assert html.count("<img") >= 6 and html.count("<table") >= 4
    cell = json.loads((clone / "metrics/study/supplement_k1.json").read_text())
    assert set(cell["evaluations"]) == {"tune", "cxp:test", "mimic:test", "emory:test"}
    assert cell["train"]["synthetic_images"] > 0 and cell["train"]["real_images"] > 0
    assert json.loads((clone / "metrics/compare/supplement.json").read_text())["baseline"] == "supplement_k0"
    memo = json.loads((clone / "metrics/memorisation/memorisation.json").read_text())
    assert memo["demo"]["dataset"] == "cxp_w1" and memo["control"]["training_subset"] == 8
    assert 'id="memorisation"' in html and "Positive control" in html
    # DVC reads the headline metrics (one macro AUROC per cell and evaluation, and the CAS) and the plots
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=clone).stdout)
    headline = next(iter(shown.values()))["data"]["report/metrics.json"]["data"]
    assert headline["supplement_k1"]["cxp:test"] == round(cell["evaluations"]["cxp:test"]["macro"]["auroc"], 4)
    assert set(headline["cas"]) == {"cxp:test", "mimic:test", "emory:test"}
    # every JSON document the study wrote names the cxrsynth version that wrote it (plot data are point lists)
    from cxrsynth import __version__

    for path in [*clone.glob("metrics/**/*.json"), clone / "report/metrics.json", *clone.glob("data/study/**/*.json"),
                 *clone.glob("data/generators/**/*.json"), *clone.glob("data/audits/**/*.json")]:
        doc = json.loads(path.read_text())
        # generator.json is hashed into the generator id (and so into every replica's version): a cxrsynth version
        # there would make each release a new generator; its train.json beside it records the version
        if isinstance(doc, dict) and path.name not in ("config.json", "features.json", "generator.json"):
            assert __version__ in json.dumps(doc), path  # as "cxrsynth" or in its metadata
    sh("dvc", "plots", "show", "-o", str(tmp_path / "plots"), cwd=clone)
    assert "supplement" in (tmp_path / "plots" / "index.html").read_text()
    git_commit(clone)
    _cells_in_parallel_equal_sequential(clone, tmp_path / "parallel")

    # nothing changed: nothing runs
    again = sh("dvc", "repro", cwd=clone).stdout
    assert ran(again) == set(), again

    # one more k: only that cell trains (the comparisons and the report read every cell)
    params["supplement"]["k"] = [0, 1, 2]
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    more = ran(sh("dvc", "repro", cwd=clone).stdout)
    trained = {s for s in more if s.split("@")[0] in ("cfg", "cfg_real", "supplement", "synthetic", "external", "rebalance",
                                                        "replica", "generator_cxp") or s.startswith("ingest")}
    assert trained == {"supplement@2"} and "report" in more

    # dvc push: the synthetic remote receives the replicas' packages and nothing real
    remote = clone.parent / "cxrsynth-remote-synthetic"  # .dvc/config: ../../cxrsynth-remote-synthetic (from .dvc/)
    sh("dvc", "push", cwd=clone)
    pushed = {p.name for p in remote.rglob("*") if p.is_file()}
    assert pushed, f"nothing in {remote}"

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    real_tars = list((clone / "data/shards/cxp").rglob("*.tar"))
    syn_tars = list((clone / "data/shards/cxp_w1").rglob("*.tar"))  # rows with source_key and exact ages: kept here
    package = [p for p in sorted((clone / "data/packages/cxp_w1").rglob("*")) if p.is_file()]
    assert real_tars and syn_tars and any(p.suffix == ".tar" for p in package)
    assert all(md5(p)[2:] in pushed for p in package)
    # ...and nothing but packages (the report's real-vs-synthetic grid, the real sites' label statistics stay)
    packages = {md5(p)[2:] for p in (clone / "data/packages").rglob("*") if p.is_file()}
    assert {name for name in pushed if not name.endswith(".dir")} == packages
    kept = real_tars + syn_tars + [clone / "manifests/cxp.parquet", clone / "manifests/cxp_w1.parquet"]
    assert not any(md5(t)[2:] in pushed for t in kept)
    # dvc pull brings the package back, byte for byte
    before = {p.relative_to(clone): p.read_bytes() for p in package}
    shutil.rmtree(clone / "data/packages/cxp_w1")
    shutil.rmtree(clone / ".dvc/cache")
    sh("dvc", "pull", "data/packages/cxp_w1", cwd=clone)  # the out, not the stage: its audit is push: false
    after = {p.relative_to(clone): p.read_bytes() for p in (clone / "data/packages/cxp_w1").rglob("*") if p.is_file()}
    assert after == before


def _cells_in_parallel_equal_sequential(clone: Path, copy: Path) -> None:
    """Four cells' outputs deleted in a copy of the project and made again two at a time by
    scripts/parallel-cells.sh are the sequential run's, byte for byte, and dvc.lock is unchanged."""
    shutil.copytree(clone, copy, symlinks=True)
    cells = sh(sys.executable, "scripts/cells.py", cwd=copy).stdout.split()
    upstream = sh(sys.executable, "scripts/cells.py", "--upstream", cwd=copy).stdout.split()
    assert {"supplement@0", "supplement@1", "cfg@w1-real", "cfg_real@w1", "external@1", "rebalance"} <= set(cells)
    assert {"ingest_cxp", "ingest_mimic", "replica@w1", "replica_rebalanced", "generator_cxp"} <= set(upstream)
    assert not set(cells) & set(upstream) and "report" not in cells + upstream and "compare@supplement" not in upstream
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    rerun = ["supplement@0", "supplement@1", "synthetic@1", "external@1"]  # four cells remade, two at a time
    outs = sorted(out["path"] for cell in rerun for out in lock[cell]["outs"])
    assert any(p.startswith("metrics/study/") for p in outs) and any(p.startswith("data/study/") for p in outs)

    def files(root: Path) -> dict[str, bytes]:
        found = {}
        for out in outs:
            path = root / out
            for f in [path] if path.is_file() else sorted(path.rglob("*")):
                if f.is_file():
                    found[f.relative_to(root).as_posix()] = f.read_bytes()
        return found

    before = files(clone)
    for out in outs:
        target = copy / out
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(copy / ".dvc" / "cache" / "runs", ignore_errors=True)  # no run-cache: every cell really runs,
    shutil.rmtree(copy / "data" / "checkpoints")  # from its first step (no finished run to resume)
    output = sh("bash", "scripts/parallel-cells.sh", "2", cwd=copy).stdout
    assert ran(output) == set(rerun)  # the other cells, their upstream and what reads them: up to date
    after = files(copy)
    assert sorted(after) == sorted(before)
    assert [k for k in before if after[k] != before[k]] == []
    relock = yaml.safe_load((copy / "dvc.lock").read_text())["stages"]
    assert relock == lock
