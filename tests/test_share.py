"""Sharing synthetic data: export without identifiers, verify, safe import, and plain consumers.

The project fixture (also used by test_audit.py and test_share_dvc.py): a CheXpert-format site of
10 patients x 3 studies whose images share a per-patient texture (so an embedding can
re-identify patients), ingested at 32 px and split 70/30 by patient; a random ``micro``
generator recorded as trained on it; one synthetic replica of its training split.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PLAIN_AUDIT_FLAGS, Project, plain_audit

from cxrsynth import loader, manifest, shards
from cxrsynth.errors import CheckFailed
from cxrsynth.share import export as export_lib
from cxrsynth.share import importer, package
from cxrsynth.share.audit import AuditConfig


@pytest.fixture(scope="module")
def built(share_project) -> Project:
    return share_project


@pytest.fixture
def project(built, tmp_path) -> Project:
    """A private copy of the built project (tests change it)."""
    return built.copy(tmp_path / "proj")


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory) -> Path:
    """One export of the synthetic dataset (read-only for the tests that use it)."""
    out = tmp_path_factory.mktemp("pkg") / "syn_pkg"
    export_lib.export(built.root, "syn", out,
                      export_lib.ExportConfig(audit=plain_audit(), shard_size=8, audit_out=out.parent / "audit"))
    return out


def identifiers(root: Path) -> list[str]:
    """Every real key, patient id, study id and source path of the conditions, and every synthetic
    row's source key and per-image seed (a seed is a hash of the source key: a dictionary inverts it)."""
    real = manifest.read(root, "cxp")
    syn = manifest.read(root, "syn")
    found = set()
    for column in ("key", "patient_id", "study_id", "source_path"):
        found |= set(real[column].dropna().astype(str))
    found |= set(syn["source_key"].dropna().astype(str)) | set(syn["seed"].dropna().astype(str))
    found |= {p.split("/", 1)[1] for p in real["source_path"].dropna().astype(str)}  # the path without its prefix
    return sorted(found)


def every_text(directory: Path) -> dict[str, bytes]:
    """Each file's raw bytes, plus the decoded content of tars (names, members) and parquet (cells, metadata)."""
    import pyarrow.parquet as pq

    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        out[rel] = path.read_bytes()
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    out[f"{rel}::{m.name}"] = m.name.encode() + b"\0" + tar.extractfile(m).read()
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            metadata = b"".join(k + b"=" + v for k, v in (table.schema.metadata or {}).items())
            cells = json.dumps(table.to_pylist(), default=str).encode()
            footer = repr(pq.ParquetFile(path).metadata.to_dict()).encode()
            out[f"{rel}::decoded"] = metadata + b"\0" + cells + b"\0" + footer
    return out


def test_export_holds_no_identifier_of_the_source_rows(built, exported):
    ids = identifiers(built.root)
    assert any(i.startswith("train_patient") for i in ids) and any(i.startswith("patient0") for i in ids)
    texts = every_text(exported)
    assert any("::" in k and k.endswith(".json") for k in texts) and "manifest.parquet::decoded" in texts
    leaks = [(where, i) for where, data in texts.items() for i in ids if i.encode() in data]
    assert leaks == []
    # what the receiver does get: synthetic rows, conditions, provenance, package-relative shards
    pkg = pd.read_parquet(exported / "manifest.parquet")
    syn = manifest.read(built.root, "syn")
    assert len(pkg) == len(syn) and (pkg["origin"] == "synthetic").all()
    for column in export_lib.DROPPED:
        assert pkg[column].isna().all(), column
    assert sorted(pkg["key"]) == [f"syn-r00-{i:07d}" for i in range(len(syn))]  # renumbered (order: a keyed hash)
    assert sorted(pkg["age"].dropna() % 10) == [0] * int(pkg["age"].notna().sum())  # decades only
    assert sorted((syn["age"] // 10 * 10).tolist()) == sorted(pkg["age"].tolist())
    assert pkg["shard"].str.fullmatch(r"shards/syn-\d{6}\.tar").all()
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(exported / "manifest.parquet").metadata[b"cxrsynth"])
    assert meta["generator"]["id"] == syn["generator_id"].iloc[0] and meta["generator"]["trained_on"].startswith("cxp@")
    assert meta["conditions"] == {"name": "cxp", "version": manifest.read_meta(built.root, "cxp")["version"], "split": "train"}
    assert str(built.gen) not in json.dumps(meta) and str(built.root) not in json.dumps(meta)
    sheet = (exported / "DATASHEET.md").read_text()
    for section in ("## Motivation", "## Composition", "## Collection process", "## Preprocessing", "## Uses",
                    "## Distribution", "## Maintenance", "## Known limits", "## Memorization audit",
                    "| Pleural Effusion |", "generator id", syn["generator_id"].iloc[0], "Passed the gate: one-sided binomial test of 0 flagged"):
        assert section in sheet, section
    assert package.verify(exported) == []


def test_export_keeps_the_images_and_refuses_real_rows(built, exported, tmp_path):
    pkg = pd.read_parquet(exported / "manifest.parquet")
    keymap = tmp_path / "keymap.parquet"
    again = tmp_path / "again"
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef-a-secret")
    fixed = export_lib.ExportConfig(audit=plain_audit(), secret_file=secret, audit_out=tmp_path / "a")
    export_lib.export(built.root, "syn", again, replace(fixed, keymap=keymap))
    mapping = pd.read_parquet(keymap).set_index("exported_key")["original_key"]
    original = dict(shards.images(built.root, manifest.read(built.root, "syn")))
    for path in sorted((again / "shards").glob("*.tar")):
        for sample in package.samples(path):
            assert sample["png"] == original[mapping[sample["__key__"]]]  # pixels untouched
    # a fixed secret gives the same package again; a random one other keys
    export_lib.export(built.root, "syn", tmp_path / "third", fixed)
    assert (tmp_path / "third/index.json").read_bytes() == (again / "index.json").read_bytes()
    assert sorted(pd.read_parquet(again / "manifest.parquet")["key"]) == sorted(pkg["key"])  # the same key set, renumbered
    assert (mapping.index.to_series().map(dict(zip(pkg["key"], pkg["key"]))).notna()).all()
    # real rows are refused, naming how many
    out = built.copy(tmp_path / "p").cli("share", "export", "cxp", "--out", tmp_path / "real_pkg", code=2)
    assert "30 real row(s)" in out and not (tmp_path / "real_pkg").exists()


def test_verify_catches_a_flipped_byte_a_missing_and_an_extra_file(exported, tmp_path):
    pkg = shutil.copytree(exported, tmp_path / "pkg")
    p = Project(tmp_path, Path())
    assert "match index.json" in p.cli("share", "verify", pkg)
    tar = sorted((pkg / "shards").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    (pkg / "DATASHEET.md").unlink()
    (pkg / "shards" / "notes.txt").write_text("hello")
    out = p.cli("share", "verify", pkg, code=1)
    assert f"sha256 mismatch: shards/{tar.name}" in out
    assert "missing file: DATASHEET.md" in out and "extra file: shards/notes.txt" in out
    assert len(package.verify(pkg)) == 3


def test_an_interrupted_export_leaves_nothing_verify_accepts(built, tmp_path, monkeypatch):
    out = tmp_path / "pkg"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_lib.datasheet, "render", crash)
    with pytest.raises(KeyboardInterrupt):
        export_lib.export(built.root, "syn", out, export_lib.ExportConfig(audit=plain_audit(), audit_out=tmp_path / "a"))
    assert not out.exists() and (tmp_path / "pkg.partial/shards").is_dir()
    assert package.verify(tmp_path / "pkg.partial") and package.verify(out)
    monkeypatch.undo()
    export_lib.export(built.root, "syn", out, export_lib.ExportConfig(audit=plain_audit(), audit_out=tmp_path / "a"))
    assert package.verify(out) == [] and not (tmp_path / "pkg.partial").exists()


def _reindexed(exported: Path, to: Path, mutate) -> Path:
    """A copy of the package changed by ``mutate(pkg)`` and re-indexed, so that it passes verify."""
    pkg = shutil.copytree(exported, to)
    mutate(pkg)
    meta = {k: v for k, v in json.loads((pkg / "index.json").read_text()).items() if k not in ("files", "format")}
    (pkg / "index.json").unlink()
    package.write_index(pkg, meta)
    assert package.verify(pkg) == []
    return pkg


def _crafted_tar(extra: tarfile.TarInfo, data: bytes = b""):
    """Replace the first shard with its own members plus one crafted member (and fix the shard index)."""
    def mutate(pkg: Path) -> None:
        tar_path = sorted((pkg / "shards").glob("*.tar"))[0]
        buffer = io.BytesIO()
        with tarfile.open(tar_path) as src, tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as dst:
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m))
            dst.addfile(extra, io.BytesIO(data) if data else None)
        tar_path.write_bytes(buffer.getvalue())
        index = json.loads((pkg / "shards/index.json").read_text())
        for e in index["shards"]:
            if e["name"] == tar_path.name:
                e.update(bytes=tar_path.stat().st_size, sha256=shards.sha256_file(tar_path))
        (pkg / "shards/index.json").write_text(json.dumps(index))
    return mutate


def _member(name: str, kind=tarfile.REGTYPE, link: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, size
    return info


@pytest.mark.parametrize("member, why", [
    (_member("../../evil.png", size=4), "a path with '..'"),
    (_member("ok-key.png", tarfile.SYMTYPE, "/etc/passwd"), "a symbolic link (to '/etc/passwd')"),
    (_member("ok-key.json", tarfile.LNKTYPE, "syn-r00-0000000.json"), "a hard link"),
    (_member("/tmp/abs.png", size=4), "an absolute path"),
    (_member("dev.png", tarfile.CHRTYPE), "a device file"),
    (_member("sub/x.png", size=4), "a path with folders"),
    (_member("x.sh", size=4), "not named <key>.<ext>"),
])
def test_import_refuses_unsafe_tar_members(exported, tmp_path, member, why):
    pkg = _reindexed(exported, tmp_path / "pkg", _crafted_tar(member, b"evil" if member.size else b""))
    with pytest.raises(package.UnsafePackage) as caught:
        importer.import_package(tmp_path / "proj", pkg, "received")
    assert f"member {member.name!r} refused: {why}" in str(caught.value)
    assert not manifest.manifest_path(tmp_path / "proj", "received").exists() and not (tmp_path / "evil.png").exists()
    out = Project(tmp_path / "proj", Path()).cli("share", "import", pkg, "--name", "received", code=1)
    assert member.name in out and "refused" in out


def test_import_refuses_data_hidden_after_the_tar_s_last_member(exported, tmp_path):
    """Bytes after a tar's end-of-archive blocks are read by no tar tool, so nothing would check
    them, yet an import copied them into the project: only zero padding may follow the members."""
    def hide(pkg: Path) -> None:
        tar_path = sorted((pkg / "shards").glob("*.tar"))[0]
        with open(tar_path, "ab") as f:
            f.write(b"patient00004 MRN 123456".ljust(512, b"\0"))
        index = json.loads((pkg / "shards/index.json").read_text())
        for e in index["shards"]:
            if e["name"] == tar_path.name:
                e.update(bytes=tar_path.stat().st_size, sha256=shards.sha256_file(tar_path))
        (pkg / "shards/index.json").write_text(json.dumps(index))

    pkg = _reindexed(exported, tmp_path / "pkg", hide)
    with pytest.raises(package.UnsafePackage, match="data after the tar's last member"):
        importer.import_package(tmp_path / "proj", pkg, "received")
    assert not manifest.manifest_path(tmp_path / "proj", "received").exists()
    padded = _reindexed(exported, tmp_path / "padded", lambda pkg: None)
    tar_path = sorted((padded / "shards").glob("*.tar"))[0]
    assert tar_path.read_bytes().endswith(b"\0" * 1024)  # zero blocks after the members stay fine
    importer.import_package(tmp_path / "proj", padded, "received")


def test_read_tar_refuses_before_reading_any_data(tmp_path):
    """The hardened reader: an oversize member (its header only: the file is sparse), a compressed tar, and a
    link in a tar the fast parser hands to ``tarfile`` (a PAX header) are refused, naming the member."""
    big = tarfile.TarInfo("big-key.png")
    big.size = shards.MAX_MEMBER_BYTES + 1
    path = tmp_path / "big.tar"
    ok = tarfile.TarInfo("ok-key.png")
    ok.size = 4
    with open(path, "wb") as f:
        f.write(ok.tobuf(tarfile.USTAR_FORMAT) + b"fine".ljust(512, b"\0") + big.tobuf(tarfile.USTAR_FORMAT))
        f.truncate(3 * 512 + ((big.size + 511) & ~511) + 1024)
    assert list(shards.members(path, lambda name: name.startswith("ok")))[0] == ("ok-key.png", b"fine")  # trusted: read
    with pytest.raises(package.UnsafePackage, match=f"member 'big-key.png' refused: {big.size} bytes, more than"):
        next(package.read_tar(path))  # nothing yielded, not even the member before it
    gz = tmp_path / "packed.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.addfile(ok, io.BytesIO(b"fine"))
    with pytest.raises(package.UnsafePackage, match="not an uncompressed tar"):
        next(package.read_tar(gz))
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(ok, io.BytesIO(b"fine"))
        tar.addfile(_member("ok-key.json", tarfile.SYMTYPE, "/" + "x" * 150))  # a long link target: a PAX header
    with pytest.raises(package.UnsafePackage, match="member 'ok-key.json' refused: a symbolic link"):
        next(package.read_tar(pax))


@pytest.mark.parametrize("shard, message", [
    ("../../outside.tar", "points at '../../outside.tar'"),
    ("/etc/passwd", "points at '/etc/passwd'"),
    ("shards/../manifest.parquet", "which is not a listed shards/*.tar"),
])
def test_import_refuses_rows_pointing_outside_the_package(exported, tmp_path, shard, message):
    def mutate(pkg: Path) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(pkg / "manifest.parquet")
        frame = table.to_pandas()
        frame.loc[0, "shard"] = shard
        pq.write_table(manifest.conform(frame).replace_schema_metadata(table.schema.metadata), pkg / "manifest.parquet")

    pkg = _reindexed(exported, tmp_path / "pkg", mutate)
    with pytest.raises(package.UnsafePackage, match="manifest.parquet: row") as caught:
        importer.import_package(tmp_path / "proj", pkg, "received")
    assert message in str(caught.value)


def test_import_refuses_identifiers_and_unverified_packages(exported, tmp_path):
    def mutate(pkg: Path) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(pkg / "manifest.parquet")
        frame = table.to_pandas()
        frame.loc[1, "patient_id"] = "patient00003"
        pq.write_table(manifest.conform(frame).replace_schema_metadata(table.schema.metadata), pkg / "manifest.parquet")

    pkg = _reindexed(exported, tmp_path / "pkg", mutate)
    with pytest.raises(package.UnsafePackage, match="1 row.s. carry patient_id"):
        importer.import_package(tmp_path / "proj", pkg, "received")
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / "DATASHEET.md").write_text("changed")
    with pytest.raises(CheckFailed, match="size mismatch: DATASHEET.md"):
        importer.import_package(tmp_path / "proj", broken, "received")


@pytest.mark.parametrize("copy", [False, True])
def test_import_then_mix_round_trip(built, exported, tmp_path, copy):
    # The receiving site: its own real dataset (here a copy of cxp) and the package inside its tree.
    receiver = Project(tmp_path / "site", Path())
    (receiver.root / "manifests").mkdir(parents=True)
    for f in ("cxp.parquet", "cxp.rejects.parquet"):
        shutil.copy(built.root / "manifests" / f, receiver.root / "manifests" / f)
    shutil.copytree(built.root / "data/shards/cxp", receiver.root / "data/shards/cxp")
    pkg = shutil.copytree(exported, receiver.root / "incoming" / "syn_pkg")
    out = receiver.cli("share", "import", pkg, "--name", "remote_syn", *(["--copy"] if copy else []))
    assert "remote_syn @" in out
    meta = manifest.read_meta(receiver.root, "remote_syn")
    assert meta["kind"] == "synthetic" and "conditions" not in meta and "generator" not in meta
    assert meta["imported"]["sender"]["generator"]["trained_on"].startswith("cxp@")
    rows = manifest.read(receiver.root, "remote_syn")
    assert (rows["dataset"] == "remote_syn").all() and (rows["origin"] == "synthetic").all()
    if copy:
        assert rows["shard"].str.startswith("data/shards/remote_syn/").all()
        assert "shard(s) match" in receiver.cli("verify", "remote_syn")
    else:
        assert rows["shard"].str.startswith("incoming/syn_pkg/shards/").all()
    pngs = dict(shards.images(receiver.root, rows))
    assert len(pngs) == len(rows) == len(pd.read_parquet(exported / "manifest.parquet"))
    receiver.cli("mix", "--real", "cxp", "--synthetic", "100%", "--synthetic-from", "remote_syn", "--seed", 0,
                 "--name", "cxp_mix")
    mixed = manifest.read(receiver.root, "cxp_mix")
    train = mixed.loc[mixed["split"] == "train"]
    assert int((train["dataset"] == "remote_syn").sum()) == len(rows)
    batch = next(loader.ShardLoader(receiver.root, train.reset_index(drop=True), loader.LoaderConfig(
        batch_size=64, image_size=32, train=False, streams=1, cond=True, uint8=True)).batches())
    assert batch["image"].shape[0] == len(train)
    with pytest.raises(package.ShareError, match="exists already"):
        importer.import_package(receiver.root, pkg, "remote_syn")


PLAIN_CONSUMER = r"""
import json, sys
import duckdb
import webdataset as wds

pkg = sys.argv[1]
index = json.load(open(f"{pkg}/shards/index.json"))
urls = [f"{pkg}/shards/{s['name']}" for s in index["shards"]]
dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l").to_tuple("__key__", "png", "json")
images = [(key, image.shape, row["pleural_effusion"]) for key, image, row in dataset]

con = duckdb.connect()
effusion = con.sql(f"SELECT key, pleural_effusion FROM '{pkg}/manifest.parquet' ORDER BY key").fetchall()
by_sex = con.sql(f"SELECT sex, count(*) AS n FROM '{pkg}/manifest.parquet' GROUP BY sex ORDER BY sex").fetchall()
assert "cxrsynth" not in sys.modules, "the plain consumer imported cxrsynth"
print(json.dumps({"images": [[k, list(s), e] for k, s, e in sorted(images)], "effusion": effusion, "by_sex": by_sex}))
"""


def test_plain_webdataset_and_duckdb_read_an_export(exported, tmp_path):
    script = tmp_path / "consumer.py"
    script.write_text(PLAIN_CONSUMER)
    result = subprocess.run([sys.executable, "-I", str(script), str(exported)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    pkg = pd.read_parquet(exported / "manifest.parquet").sort_values("key")
    assert [k for k, _, _ in seen["images"]] == pkg["key"].tolist()
    assert all(shape in ([32, 32], [32, 32, 1]) for _, shape, _ in seen["images"])
    assert [e for _, _, e in seen["images"]] == pkg["pleural_effusion"].astype(int).tolist()
    assert [list(r) for r in seen["effusion"]] == [[k, int(v)] for k, v in zip(pkg["key"], pkg["pleural_effusion"])]
    assert sum(n for _, n in seen["by_sex"]) == len(pkg)


def test_export_without_a_known_training_set_needs_audit_against_or_force(project, tmp_path):
    # forget where the generator came from: the audit cannot tell which real images it learnt from
    meta = manifest.read_meta(project.root, "syn")
    frame = manifest.read(project.root, "syn")
    manifest.write(project.root, "syn", frame, {**meta, "generator": "nowhere", "conditions": "gone"})
    out = project.cli("share", "export", "syn", "--out", tmp_path / "pkg", code=2)
    assert "--audit-against" in out and not (tmp_path / "pkg").exists()
    project.cli("share", "export", "syn", "--out", tmp_path / "pkg", "--audit-against", "cxp", "--audit-out", tmp_path / "a",
                *PLAIN_AUDIT_FLAGS)
    assert "Passed the gate: one-sided binomial test of 0 flagged" in (tmp_path / "pkg/DATASHEET.md").read_text()
    project.cli("share", "export", "syn", "--out", tmp_path / "pkg2", "--force", *PLAIN_AUDIT_FLAGS)
    assert "Exported unaudited with --force" in (tmp_path / "pkg2/DATASHEET.md").read_text()
    assert package.verify(tmp_path / "pkg2") == []


def test_audit_config_defaults_live_in_the_dataclass():
    from cxrsynth.share.audit import Rule

    assert AuditConfig().quantile == 0.01 and AuditConfig().embedding == "pixels" and AuditConfig().align == 0
    # the default audit: two rules, flagged when either flags (the planted bench's union row)
    assert AuditConfig().rules() == [Rule("first", "pixels", "combined", 0), Rule("detector", "sscd", "absolute", 16)]
    assert AuditConfig(detector="none").rules() == AuditConfig(detector=None).rules() == [AuditConfig().rules()[0]]
    with pytest.raises(Exception, match="quantile"):
        AuditConfig(quantile=0)
    with pytest.raises(Exception, match="copy criterion"):
        AuditConfig(detector_criterion="nearest")
    with pytest.raises(Exception, match="detector align"):
        AuditConfig(detector_align=-1)


def test_png_metadata_chunks_are_dropped_pixels_kept():
    from PIL import Image, PngImagePlugin

    from cxrsynth.imaging import decode_png

    image = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "patient00001")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    stripped = package.strip_png(buffer.getvalue())
    assert b"patient00001" in buffer.getvalue() and b"patient00001" not in stripped and b"tEXt" not in stripped
    assert (decode_png(stripped) == image).all()
    with pytest.raises(package.ShareError, match="CRC"):
        package.strip_png(stripped[:40] + bytes([stripped[40] ^ 1]) + stripped[41:])


def _manifest_cell(column: str, value):
    """Set ``column`` of the package manifest's first row to ``value`` (its JSON member is left: the
    row check comes first)."""
    def mutate(pkg: Path) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(pkg / "manifest.parquet")
        frame = manifest.conform(table.to_pandas()).to_pandas()
        frame.loc[0, column] = value
        pq.write_table(manifest.conform(frame).replace_schema_metadata(table.schema.metadata), pkg / "manifest.parquet")
    return mutate


@pytest.mark.parametrize("column, value, message", [
    ("pleural_effusion", 7, "pleural_effusion outside 1, 0, -1 or blank"),
    ("edema", -100, "edema outside 1, 0, -1 or blank"),
    ("sex", "X", "sex outside F, M or blank"),
    ("age", 1e9, "age outside 0..120 years"),
    ("age", -50.0, "age outside 0..120 years"),
    ("split", "train'; DROP TABLE images; --", "split outside train, tune, test"),
    ("view", "<script>alert(1)</script>", "view outside upper-case letters"),
    ("race", "Martian", "race outside"),
    ("replica", -1, "replica outside 0..10000"),
    ("guidance", float("inf"), "guidance outside 0..100"),
    ("sampler", "ddim; rm -rf /", "sampler outside"),
])
def test_import_refuses_cells_outside_the_contract(exported, tmp_path, column, value, message):
    """Each cell of a partner's manifest is checked against the label and demographics contract before
    anything is published (training would otherwise use label 7, SQL views a split named like a query)."""
    pkg = _reindexed(exported, tmp_path / "pkg", _manifest_cell(column, value))
    with pytest.raises(package.UnsafePackage) as caught:
        importer.import_package(tmp_path / "proj", pkg, "received")
    assert message in str(caught.value) and "1 row(s)" in str(caught.value)
    assert not manifest.manifest_path(tmp_path / "proj", "received").exists()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _swap_png(change):
    """Replace the first PNG member of the first shard by ``change(png)`` (and fix the shard index)."""
    def mutate(pkg: Path) -> None:
        tar_path = sorted((pkg / "shards").glob("*.tar"))[0]
        buffer, done = io.BytesIO(), False
        with tarfile.open(tar_path) as src, tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if m.name.endswith(".png") and not done:
                    data, done = change(data), True
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
        tar_path.write_bytes(buffer.getvalue())
        index = json.loads((pkg / "shards/index.json").read_text())
        for e in index["shards"]:
            if e["name"] == tar_path.name:
                e.update(bytes=tar_path.stat().st_size, sha256=shards.sha256_file(tar_path))
        (pkg / "shards/index.json").write_text(json.dumps(index))
    return mutate


def _broken_idat(png: bytes) -> bytes:
    """The same chunks, the image data replaced by 100 bytes that are not zlib (CRC fixed)."""
    from cxrsynth.imaging import png_chunks

    chunks, _ = png_chunks(png)
    out = png[:8]
    for kind, a, b in chunks:
        out += _png_chunk(kind, bytes(range(100))) if kind == b"IDAT" else png[a:b]
    return out


def _resized(png: bytes) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).resize((16, 16)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("change, message", [
    (lambda png: png[:-12] + _png_chunk(b"tEXt", b"Comment\0patient00004 MRN 123456") + png[-12:], "holds chunk(s) tEXt"),
    (lambda png: png + b"\0" * 70_000, "bytes after its IEND chunk"),
    (lambda png: png[:-30], "is not a well-formed PNG"),
    (_broken_idat, "does not decode"),
    (_resized, "is 16 px; the package records image_size"),
])
def test_import_refuses_pngs_that_are_not_plain_images(exported, tmp_path, change, message):
    """A partner's PNG must be exactly an image of the recorded size: no text chunk (it may carry an
    identifier), no junk after IEND (60 MB of padding passed before), pixels that decode."""
    pkg = _reindexed(exported, tmp_path / "pkg", _swap_png(change))
    with pytest.raises(package.UnsafePackage, match="its png member") as caught:
        importer.import_package(tmp_path / "proj", pkg, "received")
    assert message in str(caught.value)
    assert not manifest.manifest_path(tmp_path / "proj", "received").exists()


def test_import_refuses_a_manifest_of_more_rows_than_the_shards_hold_before_reading_it(exported, tmp_path):
    """A small parquet file may claim millions of rows (5 million took 3.5 GB before refusing): the footer's
    count is checked against what the package's shards can hold first."""
    def mutate(pkg: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = 2_000_000
        pq.write_table(pa.table({"key": pa.array(["k"] * n)}), pkg / "manifest.parquet", compression="zstd")

    pkg = _reindexed(exported, tmp_path / "pkg", mutate)
    assert (pkg / "manifest.parquet").stat().st_size < 100_000
    with pytest.raises(package.UnsafePackage, match="2000000 rows, more than the package's shards can hold"):
        importer.import_package(tmp_path / "proj", pkg, "received")


def test_hugging_face_datasets_loads_real_and_synthetic_shards_together(built, tmp_path, monkeypatch):
    """Every shard folder holds ``features.json`` (``datasets.Features.to_dict``): with it, Hugging Face
    ``datasets`` reads real and synthetic shards in one dataset, nulls kept and every field typed."""
    datasets = pytest.importorskip("datasets")  # a test extra; the import guard only spares a partial install

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    files = []
    for name in ("cxp", "syn"):
        frame = manifest.read(built.root, name)
        files += sorted({str(built.root / s) for s in frame["shard"].dropna()})
    folder = Path(files[0]).parent
    features = datasets.Features.from_dict(json.loads((folder / shards.HF_FEATURES_NAME).read_text()))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, features=features, split="train")
    rows = {r["json"]["key"]: r["json"] for r in ds}
    real, syn = manifest.read(built.root, "cxp"), manifest.read(built.root, "syn")
    assert len(ds) == len(real.dropna(subset=["shard"])) + len(syn)
    a_real, a_syn = rows[str(real["key"].iloc[0])], rows[str(syn["key"].iloc[0])]
    assert a_real["source_key"] is None and a_real["patient_id"] == real["patient_id"].iloc[0]
    assert a_syn["source_key"] == syn["source_key"].iloc[0] and a_syn["patient_id"] is None
    assert a_syn["replica"] == int(syn["replica"].iloc[0]) and ds.features["json"]["guidance"].dtype == "float64"
def test_the_datasheet_age_table_counts_an_unknown_age_after_scrubbing():
    # scrub leaves ages as nullable Float64, where a missing age is pd.NA (not NaN): the demo's phantom has some
    from cxrsynth.share import datasheet

    frame = pd.DataFrame({"age": pd.array([40.0, None, 60.0], dtype="Float64")})
    table = datasheet.age_table(frame)
    assert "| 40-49 | 1 |" in table and "| unknown | 1 |" in table


def test_share_secret_is_drawn_once_owner_only_and_kept(tmp_path):
    from conftest import cli

    path = tmp_path / "data/.cxrsynth/export-secret"
    assert "a new secret" in cli(tmp_path, "share", "secret", "data/.cxrsynth/export-secret")
    first = path.read_bytes()
    assert len(first.strip()) == 64 and path.stat().st_mode & 0o077 == 0
    assert "the existing secret kept" in cli(tmp_path, "share", "secret", "data/.cxrsynth/export-secret")
    assert path.read_bytes() == first and export_lib.read_secret(path)[0] == first.strip()
    path.write_text("short")
    assert "at least 16 bytes" in cli(tmp_path, "share", "secret", "data/.cxrsynth/export-secret", code=2)
