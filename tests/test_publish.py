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
    assert meta.to_dict(stored["rows_in"], stored["kept"], stored["rejected"]) == stored
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
