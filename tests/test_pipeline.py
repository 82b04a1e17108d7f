"""`dvc repro` of the project's own dvc.yaml on tiny phantom sites, in a temporary clone."""

import json
import os
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
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_is_reproducible(tmp_path):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for name in files:
        if (REPO / name).is_file() and not name.startswith(("tests/", "manifests/", "metrics/")):
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    (clone / "manifests").mkdir(exist_ok=True)
    (clone / "metrics").mkdir(exist_ok=True)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params.update(image_size=32, shard_size=20)
    params["phantom"] = {"cxp": 60, "mimic": 30, "emory": 30}
    params["generator"].update(preset="micro", steps=4, batch=4, warmup=1)
    params["generate"].update(steps=2, batch=8)
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    sh("git", "init", "-q", cwd=clone)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=clone)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone", cwd=clone)

    sh("dvc", "repro", cwd=clone)
    stats = {site: json.loads((clone / f"metrics/stats_{site}.json").read_text()) for site in ("cxp", "mimic", "emory", "cxp_syn")}
    assert stats["cxp"]["images"] > 40 and stats["mimic"]["images"] == 30 and stats["emory"]["images"] == 30
    assert 0 < stats["cxp_syn"]["images"] < stats["cxp"]["images"]  # one replica of the train split
    mixed = json.loads((clone / "metrics/stats_cxp_mix_train.json").read_text())
    assert mixed["images"] == stats["cxp_syn"]["images"] + int(sh("cxrsynth", "query", "SELECT count(*) FROM cxp WHERE split = 'train'",
                                                                  "--format", "csv", cwd=clone).stdout.split()[-1])
    assert (clone / "data/sheets/cxp_syn.png").is_file() and (clone / "data/generators/cxp_micro/generator.json").is_file()
    lock = (clone / "dvc.lock").read_text()
    assert "ingest_cxp" in lock and "stats@emory" in lock
    status = sh("dvc", "status", cwd=clone).stdout
    assert "up to date" in status.lower()

    # the same inputs again give the same bytes: dvc repro --force, compare the lock's hashes
    before = yaml.safe_load(lock)
    sh("dvc", "repro", "--force", cwd=clone)
    after = yaml.safe_load((clone / "dvc.lock").read_text())
    changed = [(stage, out["path"]) for stage, body in after["stages"].items() for out in body.get("outs", [])
               if out not in before["stages"][stage].get("outs", [])]
    assert changed == [] and before == after
