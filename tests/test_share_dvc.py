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
from conftest import Project, plain_audit

from cxrsynth import manifest, shards
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


def md5s(folder: Path, skip: tuple[str, ...] = ()) -> set[str]:
    return {hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file() and p.name not in skip}


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
    export_lib.export(project.root, "syn", sender / "exports/syn_pkg",
                      export_lib.ExportConfig(audit=plain_audit(), audit_out=tmp_path / "audit"))
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


# ------------------------------------------------------------------ every byte the synthetic remote receives

REPO = Path(__file__).resolve().parents[1]


def tiny_run():
    """scripts/tiny-run.py, loaded by path: the study's tiny parameters and project copy."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_run", REPO / "scripts" / "tiny-run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def received(data: bytes, where: str):
    """(where, bytes) of a pushed file and of everything inside it: tar members, and every parquet cell and
    the parquet metadata as text; JSON members and parquet rows also yield ``(where, {"age": ...})``."""
    import io
    import json
    import tarfile

    import pyarrow.parquet as pq

    yield where, data
    if data[:4] == b"PAR1":
        parquet = pq.ParquetFile(io.BytesIO(data))
        yield f"{where} (metadata)", json.dumps({k.decode(): v.decode() for k, v in
                                                 (parquet.schema_arrow.metadata or {}).items()}).encode()
        for row in parquet.read().to_pylist():
            yield f"{where} row", json.dumps(row, default=str).encode()
            yield f"{where} row", row
        return
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data))
    except tarfile.TarError:
        return
    with tar:
        for member in tar.getmembers():
            body = tar.extractfile(member).read() if member.isfile() else b""
            yield f"{where}:{member.name}", member.name.encode() + b"\0" + body
            if member.name.endswith(".json"):
                yield f"{where}:{member.name}", json.loads(body)


@pytest.mark.slow  # the tiny study's data stages, one package stage and a push: ~45 s
def test_dvc_push_sends_only_the_gated_scrubbed_package_no_real_identifier_or_exact_age(tmp_path):
    clone = tmp_path / "repo" / "clone"
    tiny_run().tiny_project(REPO, clone)
    sh(*GIT, "init", "-q", cwd=clone)
    sh(*GIT, "add", "-A", cwd=clone)
    sh(*GIT, "commit", "-qm", "tiny", cwd=clone)
    env = {"PYTHONPATH": str(clone)}
    out = subprocess.run(["dvc", "repro", "package@w1"], cwd=clone, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                              "DVC_NO_ANALYTICS": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Passed the gate" in out.stdout
    sh("dvc", "push", cwd=clone)
    remote = clone.parent / "cxrsynth-remote-synthetic"  # .dvc/config: ../../cxrsynth-remote-synthetic (from .dvc/)
    pushed = {p.relative_to(remote).as_posix(): p.read_bytes() for p in sorted(remote.rglob("*")) if p.is_file()}

    # what must never leave: every real key, patient, study and path; the replica's links to them
    real = manifest.read(clone, "cxp")
    syn = manifest.read(clone, "cxp_w1")
    words = set(real["key"].astype(str)) | set(real["patient_id"].astype(str)) | set(real["study_id"].astype(str))
    words |= set(real["source_path"].dropna().astype(str)) | set(syn["source_key"].astype(str))
    words |= set(syn["seed"].dropna().astype(str))
    exact_ages = {float(a) for a in real["age"].dropna() if a % 10}
    assert set(syn["source_key"]) <= set(real["key"]) and len(exact_ages) > 20  # the scan has something to find
    assert set(syn["age"].dropna().astype(float)) & exact_ages  # ...and the replica carries exact ages locally

    # the remote holds the package (every file of it) and nothing of the replica itself
    package_md5 = md5s(clone / "data/packages/cxp_w1")
    remote_md5 = {"".join(Path(name).parts[-2:]).removesuffix(".dir") for name in pushed}
    assert package_md5 <= remote_md5
    # features.json (the Hugging Face schema: column names and types, no value) is the same file in every shard folder
    schema = (shards.HF_FEATURES_NAME,)
    local = md5s(clone / "data/shards/cxp_w1", schema) | md5s(clone / "data/audits/cxp_w1") | md5s(clone / "data/shards/cxp", schema)
    local |= {hashlib.md5((clone / f"manifests/{n}.parquet").read_bytes()).hexdigest() for n in ("cxp", "cxp_w1")}
    assert not local & remote_md5

    leaks, ages, kinds = [], [], set()
    for name, data in pushed.items():
        for where, part in received(data, name):
            if isinstance(part, dict):
                if part.get("age") is not None:
                    ages.append((where, float(part["age"])))
                continue
            kinds.add("tar" if ":" in where else "parquet" if " row" in where else "file")
            leaks += [(where, word) for word in words if word.encode() in part]
    assert not leaks, leaks[:10]
    assert {"tar", "parquet", "file"} <= kinds and len(ages) >= 2 * len(syn)  # each row in the parquet and a JSON member
    assert not [(w, a) for w, a in ages if a % 10 or a in exact_ages], ages[:10]
