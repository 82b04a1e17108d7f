"""Every writer publishes: a split is a new version of its dataset, and everything keyed by a
dataset's version (replica sets, a classifier's training data, the leakage guard) sees a re-split."""

from __future__ import annotations

import json
import tarfile

import pytest
from conftest import chexpert_rows, ingest_site, micro_generator, replica, tiny_classifier
from typer.testing import CliRunner

from cxrsynth import ingest, labels, manifest, shards, splits
from cxrsynth.cli import app
from cxrsynth.errors import CxrsynthError
from cxrsynth.imaging import Preprocess
from cxrsynth.sources import chexpert
from cxrsynth.verify import verify_dataset


def cli(root, *args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--root", str(root)], catch_exceptions=False,
                                env={"COLUMNS": "300"})
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def images(tmp_path):
    """cxp: 12 patients x 2 studies, 32 px images in 3 shards, not split yet."""
    return ingest_site(tmp_path, chexpert_rows(n_patients=12, studies=2, uncertain=False), shard_size=10)


def test_split_publishes_a_version_of_its_parameters_and_keeps_the_shards(images):
    root = images
    ingested = manifest.read_meta(root, "cxp")["version"]
    before = manifest.read(root, "cxp")
    rejects = manifest.rejects_path(root, "cxp").read_bytes()
    out = cli(root, "split", "cxp", "--tune", 0.25, "--test", 0.25, "--seed", 0)
    meta = manifest.read_meta(root, "cxp")
    first, first_bytes = meta["version"], manifest.manifest_path(root, "cxp").read_bytes()
    assert first != ingested and f"cxp @ {first}:" in out
    assert meta["split_of"] == ingested and meta["split"] == {"tune": 0.25, "test": 0.25, "view": None, "seed": 0}
    assert meta["kind"] == "chexpert" and (meta["rows_in"], meta["kept"], meta["rejected"]) == (24, 24, {})
    frame = manifest.read(root, "cxp")
    assert frame["version"].eq(first).all()  # every row names the dataset's version
    assert frame["shard"].tolist() == before["shard"].tolist()  # the shards are not rewritten (they hold no split)
    assert all(s.startswith(f"data/shards/cxp/{ingested}/") for s in frame["shard"])
    assert manifest.rejects_path(root, "cxp").read_bytes() == rejects
    assert verify_dataset(root, "cxp") == ([], 3)
    assert "3 shard(s) match" in cli(root, "verify", "cxp")

    # the same parameters again: the same version, the same bytes (dvc repro sees nothing new)
    cli(root, "split", "cxp", "--tune", 0.25, "--test", 0.25, "--seed", 0)
    assert manifest.manifest_path(root, "cxp").read_bytes() == first_bytes
    # another seed: another assignment, another version, split from the same ingested version
    cli(root, "split", "cxp", "--tune", 0.25, "--test", 0.25, "--seed", 5)
    other = manifest.read_meta(root, "cxp")
    assert other["version"] not in (first, ingested) and other["split_of"] == ingested
    assert manifest.read(root, "cxp")["split"].tolist() != frame["split"].tolist()
    assert verify_dataset(root, "cxp") == ([], 3)
    # each parameter enters the version; back to the first ones: the first version and bytes again
    for params in ({"tune": 0.25, "test": 0.25, "seed": 0, "view": "AP"}, {"tune": 0.5, "test": 0.0, "seed": 0}):
        splits.split(root, "cxp", splits.SplitParams(**params))
        assert manifest.read_meta(root, "cxp")["version"] not in (first, other["version"], ingested)
    splits.split(root, "cxp", splits.SplitParams(tune=0.25, test=0.25, seed=0))
    assert manifest.manifest_path(root, "cxp").read_bytes() == first_bytes
    # a re-ingest starts again from the ingested version; its split is the same version again
    csv = root.parent / "raw" / "CheXpert-v1.0" / "train.csv"
    ingest.ingest(chexpert.read(csv), root=root, name="cxp", kind="chexpert", inputs={}, params=Preprocess(size=32),
                  shard_size=10, workers=1)
    assert manifest.read_meta(root, "cxp")["version"] == ingested and "split_of" not in manifest.read_meta(root, "cxp")
    splits.split(root, "cxp", splits.SplitParams(tune=0.25, test=0.25, seed=0))
    assert manifest.manifest_path(root, "cxp").read_bytes() == first_bytes


def test_verify_finds_the_shards_of_a_split_dataset_without_rows(tmp_path):
    """Every image rejected: verify looks for the index in the folder of the version split from."""
    # no image files: every row a reject
    root = ingest_site(tmp_path, chexpert_rows(n_patients=2, studies=1, uncertain=False), images=False)
    ingested = manifest.read_meta(root, "cxp")["version"]
    assert manifest.read(root, "cxp").empty and verify_dataset(root, "cxp") == ([], 0)
    splits.split(root, "cxp", splits.SplitParams(tune=0.5, seed=0))
    assert manifest.read_meta(root, "cxp")["version"] != ingested
    assert verify_dataset(root, "cxp") == ([], 0)
    (shards.shard_dir(root, "cxp", ingested) / shards.INDEX_NAME).unlink()
    problems, _ = verify_dataset(root, "cxp")
    assert problems == [f"missing index: {shards.shard_dir(root, 'cxp', ingested) / shards.INDEX_NAME}"]


@pytest.fixture
def labels_only(tmp_path):
    """cxp: 10 patients, labels only, no uncertain finding; split seed 0; a micro generator."""
    root = ingest_site(tmp_path, chexpert_rows(n_patients=10, studies=1, uncertain=False), images=False, labels_only=True,
                       split={"tune": 0.3, "seed": 0})
    return root, micro_generator(tmp_path / "gen")


def replicas(root, gen, name):
    return replica(root, gen, name, replicas=2, steps=2, guidance=2.0, seed=5, shard_size=4)


def samples(root, name):
    """{key: (json member, png bytes)} over the shards the manifest of ``name`` points at."""
    out = {}
    for shard in sorted(set(manifest.read(root, name)["shard"].astype(str))):
        with tarfile.open(root / shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for member, data in members.items():
            if member.endswith(".json"):
                key = member[: -len(".json")]
                out[key] = (json.loads(data), members[f"{key}.png"])
    return out


def test_resplit_then_generate_gives_a_new_replica_set_whose_images_follow_the_new_rows(labels_only):
    root, gen = labels_only
    old = replicas(root, gen, "syn")
    old_rows = manifest.read(root, "syn")
    old_version = manifest.read_meta(root, "cxp")["version"]
    old_train = set(manifest.read(root, "cxp").query("split == 'train'")["key"])

    splits.split(root, "cxp", splits.SplitParams(tune=0.3, seed=5))  # another seed: other training rows
    new_train = set(manifest.read(root, "cxp").query("split == 'train'")["key"])
    assert new_train != old_train and len(new_train) == len(old_train)  # same row count: same keys and shard names
    new = replicas(root, gen, "syn")  # same name, outside DVC: the old version folder is still on disk
    assert new["complete"] and new["version"] != old["version"]
    assert new["written"] == new["units"] == old["units"]  # nothing old reused
    meta = manifest.read_meta(root, "syn")
    assert meta["conditions_version"] == manifest.read_meta(root, "cxp")["version"] != old_version
    syn = manifest.read(root, "syn")
    assert set(syn["source_key"]) == new_train and set(old_rows["source_key"]) == old_train
    assert syn["key"].tolist() == old_rows["key"].tolist()  # the same keys, under other rows
    assert all(s.startswith(f"data/shards/syn/{new['version']}/") for s in syn["shard"])
    assert verify_dataset(root, "syn") == ([], old["units"])

    # each row's image is the one its own source row and seed give: a fresh replica set of
    # the same conditions under another name has the same bytes, sample by sample
    fresh = replicas(root, gen, "fresh")
    assert fresh["version"] == new["version"] and fresh["written"] == fresh["units"]
    mine, theirs = samples(root, "syn"), samples(root, "fresh")
    assert len(mine) == len(syn) == len(theirs)
    for key, (record, png) in mine.items():
        other = theirs[key.replace("syn-", "fresh-", 1)]
        assert png == other[1], key
        assert {k: v for k, v in record.items() if k not in ("key", "dataset")} == \
            {k: v for k, v in other[0].items() if k not in ("key", "dataset")}
        assert record["source_key"] in new_train and record["version"] == new["version"]
    # a row whose source changed has another image than the old row of the same key had
    changed = syn.loc[syn["source_key"].to_numpy() != old_rows["source_key"].to_numpy(), "key"]
    assert len(changed)
    old_pngs = {}
    for shard in sorted(set(old_rows["shard"].astype(str))):
        with tarfile.open(root / shard) as tar:
            old_pngs.update({m.name[: -len(".png")]: tar.extractfile(m).read() for m in tar.getmembers()
                             if m.name.endswith(".png")})
    for key in changed:
        assert mine[key][1] != old_pngs[key], key

    # split again with the same parameters: the same version; generate reuses every shard
    splits.split(root, "cxp", splits.SplitParams(tune=0.3, seed=5))
    again = replicas(root, gen, "syn")
    assert again["version"] == new["version"] and again["written"] == 0 and again["complete"]


def test_split_refuses_a_synthetic_dataset(labels_only):
    root, gen = labels_only
    replicas(root, gen, "syn")
    before = manifest.manifest_path(root, "syn").read_bytes()
    with pytest.raises(CxrsynthError, match="syn is a synthetic dataset: split assigns the patients of a real dataset"):
        splits.split(root, "syn", splits.SplitParams(tune=0.3, seed=0))
    assert manifest.manifest_path(root, "syn").read_bytes() == before


def test_leak_guard_sees_a_resplit_after_the_classifier_was_trained(images):
    """A classifier trained on cxp; cxp re-split with another seed; its new test split holds
    patients the classifier trained on. The guard refuses instead of passing silently."""
    root = images
    cli(root, "split", "cxp", "--tune", 0.25, "--test", 0.25, "--seed", 0)
    trained_on = manifest.read_meta(root, "cxp")["version"]
    first = manifest.read(root, "cxp")
    model = tiny_classifier(root, root.parent / "cls")
    assert json.loads((model / "classifier.json").read_text())["data"]["version"] == trained_on

    cli(root, "split", "cxp", "--tune", 0.25, "--test", 0.25, "--seed", 5)
    now = manifest.read_meta(root, "cxp")["version"]
    second = manifest.read(root, "cxp")
    trained_patients = set(first.loc[first["split"].isin(["train", "tune"]).fillna(False), "patient_id"])
    leaked = trained_patients & set(second.loc[(second["split"] == "test").fillna(False), "patient_id"])
    assert leaked and now != trained_on  # the new test split holds patients the classifier learnt from

    cli(root, "classifier", "predict", "--model", model, "--data", "cxp", "--out", root / "pred.parquet", "--threads", 1)
    out = cli(root, "evaluate", root / "pred.parquet", "--bootstrap", 0, "--out", root / "m.json", code=2)
    text = " ".join(out.split())
    assert "cannot check test set" in text and f"trained on cxp@{trained_on}, the manifest is now cxp@{now}" in text
    assert "Traceback" not in out and not (root / "m.json").exists()
    cli(root, "evaluate", root / "pred.parquet", "--bootstrap", 0, "--allow-leak", "--out", root / "m.json")
    leak = json.loads((root / "m.json").read_text())["leak"]
    assert leak["allowed"] is True
    assert any(f"trained on cxp@{trained_on}, the manifest is now cxp@{now}" in u for u in leak["unverifiable"])

    # split back with the classifier's parameters: its version again, and a clean test split
    cli(root, "split", "cxp", "--tune", 0.25, "--test", 0.25, "--seed", 0)
    assert manifest.read_meta(root, "cxp")["version"] == trained_on
    cli(root, "classifier", "predict", "--model", model, "--data", "cxp", "--out", root / "pred2.parquet", "--threads", 1)
    cli(root, "evaluate", root / "pred2.parquet", "--bootstrap", 0, "--out", root / "m2.json")
    assert json.loads((root / "m2.json").read_text())["leak"]["overlap"] == {}


def test_split_changes_only_the_split_and_version_columns(images):
    root = images
    before = manifest.read(root, "cxp")
    splits.split(root, "cxp", splits.SplitParams(tune=0.25, seed=0))
    after = manifest.read(root, "cxp")
    keep = [c for c in manifest.COLUMNS if c not in ("split", "version")]
    assert after[keep].equals(before[keep]) and {"key", "shard", *labels.FINDING_COLUMNS} <= set(keep)
