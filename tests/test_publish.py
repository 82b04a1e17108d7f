"""The one publisher of dataset versions, and the shard writer's rejects."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import chexpert_rows, write_chexpert

from cxrsynth import ingest, manifest, shards
from cxrsynth.errors import CxrsynthError, UnknownNameError
from cxrsynth.publish import KINDS, Metadata, empty_rejects, publish
from cxrsynth.sources import chexpert


def _rows(n: int, name: str = "d", version: str = "v1") -> pd.DataFrame:
    return pd.DataFrame({"key": [f"k{i}" for i in range(n)], "dataset": name, "version": version, "origin": "real",
                         "row": range(n), "source_path": [f"p{i}" for i in range(n)]})


def test_metadata_round_trips_the_stored_layout(tmp_path) -> None:
    result = ingest.ingest(chexpert.read(write_chexpert(tmp_path / "raw", chexpert_rows(), images=False)), root=tmp_path,
                           name="cxp", kind="chexpert", inputs={"csv": "x"}, labels_only=True)
    stored = manifest.read_meta(tmp_path, "cxp")
    meta = Metadata.from_dict(stored)
    assert (meta.kind, meta.source, meta.version) == ("real", "chexpert", result.version)
    checksum = stored.pop(manifest.CHECKSUM_KEY)  # written by manifest.write, over the rows
    assert meta.to_dict(stored["rows_in"], stored["kept"], stored["rejected"]) == stored
    assert checksum == manifest.stored_checksum(tmp_path, "cxp")[1]
    for kind in ("synthetic", "mix"):
        record = Metadata("s", "v", kind, {"params": {"a": 1}})  # type: ignore[arg-type]
        again = Metadata.from_dict(record.to_dict(3, 3, {}))
        assert again == record and record.to_dict(3, 3, {})["kind"] == kind
    assert KINDS == ("real", "synthetic", "mix")


def test_metadata_refuses_what_it_cannot_store() -> None:
    with pytest.raises(UnknownNameError, match="known: mix, real, synthetic"):
        Metadata("d", "v", "export")  # type: ignore[arg-type]
    with pytest.raises(CxrsynthError, match="names its adapter"):
        Metadata("d", "v", "real")
    with pytest.raises(CxrsynthError, match="names its adapter"):
        Metadata("d", "v", "mix", source="chexpert")
    with pytest.raises(CxrsynthError, match="may not set kept"):
        Metadata("d", "v", "mix", {"kept": 1})


def test_write_shard_returns_its_rejects_and_publish_accounts_for_them(tmp_path) -> None:
    rows = _rows(4)
    records = shards.sample_records(rows, extra=("row",))
    image = np.zeros((8, 8), np.uint8)
    stream = [shards.encode_sample(records[0], image),
              shards.Reject(row=1, key="k1", source_path="p1", reason="corrupt_image", detail="bad"),
              shards.encode_sample(records[2], image)]
    directory = shards.shard_dir(tmp_path, "d", "v1")
    first = shards.write_shard(directory, "d", 0, stream)
    second = shards.write_shard(directory, "d", 1, [shards.Reject(row=3, key="k3", source_path="p3", reason="missing_image",
                                                                  detail="gone")])
    assert first.keys == ["k0", "k2"] and [r["key"] for r in first.rejects] == ["k1"]
    assert second.count == 0 and second.rejects[0]["reason"] == "missing_image"
    assert shards.finished(directory, "d", 0) == first  # the progress record keeps the rejects too
    assert json.loads((directory / shards.PROGRESS_DIR / "d-000000.tar.json").read_text())["rejects"] == first.rejects

    done = publish(tmp_path, Metadata("d", "v1", "real", {"info": {}}, source="test"), rows, shard_results=[first, second])
    assert (done.rows_in, done.kept, done.rejected) == (4, 2, {"corrupt_image": 1, "missing_image": 1})
    kept = manifest.read(tmp_path, "d")
    assert kept["key"].tolist() == ["k0", "k2"]
    assert kept["shard"].tolist() == ["data/shards/d/v1/d-000000.tar"] * 2
    ledger = pd.read_parquet(done.rejects)
    assert ledger["row"].tolist() == [1, 3] and ledger["reason"].tolist() == ["corrupt_image", "missing_image"]
    index = json.loads((directory / shards.INDEX_NAME).read_text())
    assert [e["count"] for e in index["shards"]] == [2, 0] and index["samples"] == 2
    assert manifest.read_meta(tmp_path, "d")["kind"] == "test"


def test_publish_refuses_to_lose_a_row(tmp_path) -> None:
    with pytest.raises(AssertionError, match="accounting error: 3 kept \\+ 0 rejected != 4 rows in"):
        publish(tmp_path, Metadata("d", "v1", "mix"), _rows(3), rows_in=4)
    assert not manifest.manifest_path(tmp_path, "d").exists()
    done = publish(tmp_path, Metadata("d", "v1", "mix"), _rows(3), rows_in=4,
                   rejects=pd.DataFrame([{"row": 7, "key": "x", "source_path": None, "reason": "bad_label", "detail": "E=2"}]))
    assert done.rejected == {"bad_label": 1} and len(empty_rejects()) == 0


def _lock_holder(root, name: str, shared: bool):
    """A real process holding ``name``'s writer lock (shared or exclusive) until killed."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom cxrsynth.publish import writer_lock\n"
            "with writer_lock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == '1'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(root), name, "1" if shared else "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held", process.stderr.read()
    return process


def test_writer_lock_shared_parts_exclude_other_writers(tmp_path) -> None:
    """generate's parts hold the lock shared (they run together); an exclusive writer is refused while
    they do, and a part is refused while an exclusive writer holds it. Case does not matter."""
    from cxrsynth.publish import PublishError, writer_lock

    part = _lock_holder(tmp_path, "syn", shared=True)
    try:
        with writer_lock(tmp_path, "syn", shared=True):  # a second part joins
            pass
        with pytest.raises(PublishError, match=f"dataset SYN is in use by PID {part.pid}"):
            with writer_lock(tmp_path, "SYN"):
                pass
    finally:
        part.kill()
        part.wait()
    writer = _lock_holder(tmp_path, "syn", shared=False)
    try:
        with pytest.raises(PublishError, match=f"in use by PID {writer.pid}"):
            with writer_lock(tmp_path, "syn", shared=True):
                pass
    finally:
        writer.kill()
        writer.wait()
    with writer_lock(tmp_path, "syn"):  # the kernel dropped the killed holder's lock
        with writer_lock(tmp_path, "syn"):  # re-entrant in one process (publish inside ingest)
            pass


@pytest.mark.slow
def test_two_ingests_of_one_name_at_once(tmp_path) -> None:
    """Two real ``cxrsynth ingest`` processes of one dataset: the second is refused naming the first's PID,
    the first completes and verifies."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from cxrsynth.publish import lock_path

    rows = chexpert_rows(n_patients=12, studies=2)
    csv = write_chexpert(tmp_path / "raw", rows)
    root = tmp_path / "proj"
    args = [sys.executable, "-m", "cxrsynth", "ingest", "chexpert", str(csv), "--name", "cxp", "--size", "256",
            "--workers", "1", "--root", str(root)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = lock_path(root, "cxp")
    record, deadline = lock.with_name(f"{lock.name}.holders") / f"{socket.gethostname()}-{first.pid}", time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        if record.is_file():
            first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock, mid-write
            break
        time.sleep(0.002)
    try:
        assert first.poll() is None, "the first ingest finished before it could be held"
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"error: dataset cxp is in use by PID {first.pid}" in " ".join(second.stderr.split())
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, out
    verify = subprocess.run([sys.executable, "-m", "cxrsynth", "verify", "cxp", "--root", str(root)], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_check_target_rules(tmp_path) -> None:
    from cxrsynth.publish import PublishError, check_target

    publish(tmp_path, Metadata("cx", "v1", "real", {"info": {}}, source="test"), _rows(2))
    check_target(tmp_path, "cx", "real")  # a new version of the same kind is the normal case
    with pytest.raises(PublishError, match="one of its own sources"):
        check_target(tmp_path, "cx", "mix", ("cx",), force=True)
    with pytest.raises(PublishError, match="exists as a real dataset \\(test\\); writing a synthetic"):
        check_target(tmp_path, "cx", "synthetic")
    check_target(tmp_path, "cx", "synthetic", force=True)
    with pytest.raises(PublishError, match="collides with the existing dataset 'cx'"):
        publish(tmp_path, Metadata("CX", "v1", "mix", {"sources": {"other": "v"}}), _rows(2))
    with pytest.raises(PublishError, match="one of its own sources"):
        publish(tmp_path, Metadata("cx", "v2", "mix", {"sources": {"cx": "v1"}}), _rows(2), force=True)
    assert manifest.read_meta(tmp_path, "cx")["kind"] == "test"  # nothing was written over it


def test_every_manifest_column_is_described_in_the_parquet_schema(tmp_path):
    """A reader without cxrsynth finds what each column means in the file itself."""
    import pyarrow.parquet as pq

    frame = pd.DataFrame({"key": ["a", "b"], "age": [34.0, None], "origin": ["real", "real"]})
    path = manifest.write(tmp_path, "cxp", frame, {"dataset": "cxp", "version": "v1"})
    schema = pq.read_schema(path)
    assert schema.names == list(manifest.COLUMNS)
    described = {f.name: (f.metadata or {}).get(b"description", b"").decode() for f in schema}
    assert all(described.values()), [n for n, d in described.items() if not d]
    assert "null when unknown" in described["age"] and "-1 uncertain" in described["pleural_effusion"]
