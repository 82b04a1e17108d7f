"""DVC: an exported package goes to a named remote that real data never goes to, and another
repository gets it with ``dvc import`` byte for byte. Two git + DVC repositories in a temporary
folder, local-directory remotes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import Project

from cxrsynth import manifest
from cxrsynth.share import export as export_lib
from cxrsynth.share import package

pytestmark = pytest.mark.slow  # git + dvc round trips: ~10 s

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]


def sh(*args, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    sh(*GIT, "init", "-q", cwd=path)
    sh("dvc", "init", "-q", cwd=path)
    sh("dvc", "config", "core.autostage", "true", cwd=path)
    sh(*GIT, "commit", "-qm", "init", cwd=path)
    return path


def md5s(folder: Path) -> set[str]:
    return {hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synthetic_remote_and_dvc_import_round_trip(share_project: Project, tmp_path):
    project = share_project  # read only: copied into the sender, exported from
    sender = new_repo(tmp_path / "sender")
    remotes = {"real": tmp_path / "remote_real", "synthetic": tmp_path / "remote_synthetic"}
    for name, where in remotes.items():
        sh("dvc", "remote", "add", name, where, cwd=sender)
    sh("dvc", "remote", "default", "real", cwd=sender)  # everything goes to the real data's remote unless told otherwise

    # the sender's real data (tracked to the default remote) and its export (to the synthetic remote only)
    shutil.copytree(project.root / "data/shards/cxp", sender / "data/shards/cxp")
    shutil.copytree(project.root / "manifests", sender / "manifests")
    export_lib.export(project.root, "syn", sender / "exports/syn_pkg", export_lib.ExportConfig(audit_out=tmp_path / "audit"))
    sh("dvc", "add", "data/shards/cxp", "manifests", cwd=sender)
    sh("dvc", "add", "exports/syn_pkg", cwd=sender)
    dvc_file = sender / "exports/syn_pkg.dvc"
    spec = yaml.safe_load(dvc_file.read_text())
    spec["outs"][0]["remote"] = "synthetic"  # the output's own remote: `dvc push` sends it there and nowhere else
    dvc_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    sh(*GIT, "add", "-A", cwd=sender)
    sh(*GIT, "commit", "-qm", "real data and a synthetic export", cwd=sender)
    sh("dvc", "push", cwd=sender)

    import json

    from cxrsynth import shards

    schema = hashlib.md5(json.dumps(shards.hf_features(), indent=1).encode() + b"\n").hexdigest()  # the same in every folder
    real_files = (md5s(sender / "data/shards/cxp") | md5s(sender / "manifests")) - {schema}
    on_synthetic, on_real = md5s(remotes["synthetic"]), md5s(remotes["real"])
    assert md5s(sender / "exports/syn_pkg") <= on_synthetic  # every file of the package is there...
    assert not real_files & on_synthetic  # ...and not one real file
    assert real_files <= on_real and not (md5s(sender / "exports/syn_pkg") - {schema}) & on_real

    # the receiver: `dvc import` from the sender's repository; the sender's cache is gone, so the
    # bytes can only come from the synthetic remote
    shutil.rmtree(sender / ".dvc/cache")
    receiver = new_repo(tmp_path / "receiver")
    (receiver / "incoming").mkdir()
    sh("dvc", "import", sender, "exports/syn_pkg", "-o", "incoming/syn_pkg", cwd=receiver)
    assert files(receiver / "incoming/syn_pkg") == files(sender / "exports/syn_pkg")
    assert package.verify(receiver / "incoming/syn_pkg") == []
    lock = yaml.safe_load((receiver / "incoming/syn_pkg.dvc").read_text())
    assert lock["deps"][0]["repo"]["url"] == str(sender) and lock["deps"][0]["path"] == "exports/syn_pkg"

    # and registers it as a dataset of its own
    out = sh("cxrsynth", "share", "import", "incoming/syn_pkg", "--name", "remote_syn", "--copy", cwd=receiver)
    assert "remote_syn @" in out
    assert len(manifest.read(receiver, "remote_syn")) == len(manifest.read(project.root, "syn"))
