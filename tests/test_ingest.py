"""CheXpert / MIMIC / table adapters through the one writer: shards, manifest, rejects."""

import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import chexpert_rows, radiograph, save_dicom, save_png, write_chexpert

from cxrsynth import ingest, labels, manifest, shards
from cxrsynth.imaging import Preprocess, decode_png
from cxrsynth.sources import SourceError, chexpert, mimic, table
from cxrsynth.verify import verify_dataset


def run(source, root, name="cxp", **kw):
    kw.setdefault("params", Preprocess(size=32))
    kw.setdefault("workers", 1)
    return ingest.ingest(source, root=root, name=name, kind="test", inputs={}, **kw)


def files(directory: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_chexpert_ingest_writes_shards_and_manifest(chexpert_tree, tmp_path):
    result = run(chexpert.read(chexpert_tree), tmp_path / "proj", shard_size=3)
    assert (result.rows_in, result.kept, result.rejected, result.shards) == (8, 8, {}, 3)
    frame = manifest.read(tmp_path / "proj", "cxp")
    assert list(frame.columns) == list(manifest.COLUMNS)
    row = frame.set_index("key").loc["train_patient00001_study1_view1_frontal"]
    assert (row.patient_id, row.study_id, row.sex, row.age, row.view) == ("patient00001", "patient00001_study1", "M", 41.0, "PA")
    assert frame["origin"].eq("real").all() and frame["version"].eq(result.version).all()
    # labels went through the contract: compare with the CSV
    raw = pd.read_csv(chexpert_tree, dtype=str, keep_default_na=False)
    expected = raw["Edema"].map({"1.0": 1, "0.0": 0, "-1.0": -1, "": 0}).to_numpy()
    assert frame["edema"].to_numpy().tolist() == expected.tolist()
    # every key is WebDataset-safe and each sample is png + json in its shard
    assert frame["key"].str.fullmatch(r"[A-Za-z0-9_-]+").all()
    first = tmp_path / "proj" / frame["shard"].iloc[0]
    members = tar_members(first)
    assert [m.name for m in members[:2]] == [f"{frame['key'].iloc[0]}.json", f"{frame['key'].iloc[0]}.png"]
    assert {m.mtime for m in members} == {0} and {m.uname for m in members} == {"cxrsynth"}
    with tarfile.open(first) as tar:
        meta = json.loads(tar.extractfile(members[0]).read())
        image = decode_png(tar.extractfile(members[1]).read())
    assert image.shape == (32, 32) and meta["key"] == frame["key"].iloc[0] and meta["edema"] == int(frame["edema"].iloc[0])
    index = json.loads((first.parent / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [3, 3, 2]
    assert verify_dataset(tmp_path / "proj", "cxp") == ([], 3)


def test_reingest_is_byte_identical_and_same_version(chexpert_tree, tmp_path):
    a = run(chexpert.read(chexpert_tree), tmp_path / "a", shard_size=3)
    b = run(chexpert.read(chexpert_tree), tmp_path / "b", shard_size=3, workers=2)
    assert a.version == b.version
    da, db = (shards.shard_dir(tmp_path / x, "cxp", a.version) for x in "ab")
    assert files(da) == files(db) and "index.json" in files(da)
    assert (tmp_path / "a/manifests/cxp.parquet").read_bytes() == (tmp_path / "b/manifests/cxp.parquet").read_bytes()
    c = run(chexpert.read(chexpert_tree), tmp_path / "c", shard_size=3, params=Preprocess(size=48))
    assert c.version != a.version  # parameters are part of the version


def test_bad_rows_are_rejected_with_reasons_and_nothing_is_lost(tmp_path):
    rows = chexpert_rows(n_patients=5, studies=2)
    rows[1]["Edema"] = "2.0"  # out-of-domain label
    rows[3] = dict(rows[2])  # duplicate path -> duplicate key
    rows[5]["Path"] = "somewhere/else/image.jpg"  # unparseable path
    csv = write_chexpert(tmp_path / "raw", rows)
    (tmp_path / "raw" / rows[6]["Path"]).unlink()  # missing image
    (tmp_path / "raw" / rows[7]["Path"]).write_bytes(b"\xff\xd8\xff garbage")  # corrupt image
    result = run(chexpert.read(csv), tmp_path / "proj", shard_size=4)
    assert result.rejected == {"bad_label": 1, "bad_path": 1, "corrupt_image": 1, "duplicate_key": 1, "missing_image": 1}
    assert result.kept + sum(result.rejected.values()) == result.rows_in == 10
    rejects = pd.read_parquet(tmp_path / "proj/manifests/cxp.rejects.parquet")
    assert rejects["row"].tolist() == [1, 3, 5, 6, 7]
    assert "Edema=2.0" in rejects.loc[rejects.reason == "bad_label", "detail"].iloc[0]
    frame = manifest.read(tmp_path / "proj", "cxp")
    assert len(frame) == 5 and verify_dataset(tmp_path / "proj", "cxp")[0] == []


def test_missing_columns_fail_naming_them(tmp_path):
    rows = chexpert_rows(1, 1)
    csv = write_chexpert(tmp_path / "raw", rows, images=False)
    pd.read_csv(csv).drop(columns=["Edema", "Sex"]).to_csv(csv, index=False)
    with pytest.raises(SourceError, match="Sex, Edema"):
        chexpert.read(csv)


def test_small_prefix_include_list_and_demographics(tmp_path):
    rows = chexpert_rows(n_patients=3, studies=1, prefix="CheXpert-v1.0-small")
    rows[0]["Sex"], rows[0]["Age"] = "Unknown", "0"
    csv = write_chexpert(tmp_path / "raw", rows)
    (tmp_path / "raw/CheXpert-v1.0-small").mkdir(exist_ok=True)
    shutil.copytree(tmp_path / "raw/CheXpert-v1.0-small", tmp_path / "raw/CheXpert-v1.0", dirs_exist_ok=True)
    include = tmp_path / "split.csv"
    pd.DataFrame({"Path": ["CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
                           "CheXpert-v1.0/train/patient00003/study1/view1_frontal.jpg",
                           "CheXpert-v1.0/train/patient00099/study1/view1_frontal.jpg"]}).to_csv(include, index=False)
    demo = tmp_path / "demo.csv"
    pd.DataFrame({"PATIENT": ["patient00001", "patient00003"], "GENDER": ["Female", "Male"], "AGE_AT_CXR": ["77", "30"],
                  "PRIMARY_RACE": ["White, non-Hispanic", "Asian"], "ETHNICITY": ["", ""]}).to_csv(demo, index=False)
    source = chexpert.read(csv, images=tmp_path / "raw", demographics=demo, include=include)
    assert source.info == {"include_listed": 3, "include_not_found": 1}
    assert source.rejects["reason"].tolist() == ["not_included"]
    rec = source.records.set_index("patient_id")
    assert rec.loc["patient00001", "sex"] == "F" and rec.loc["patient00001", "age"] == 77  # filled from demographics
    assert rec.loc["patient00001", "race"] == labels.RACES[2] and rec.loc["patient00003", "race"] == labels.RACES[4]
    assert all(Path(p).is_file() for p in source.records["image_path"])


def test_interrupted_ingest_resumes_and_ignores_partial_shards(chexpert_tree, tmp_path, monkeypatch):
    calls = []
    real = ingest._write_unit

    def dying(directory, dataset, index, rows, params, tick=None, inputs=None):
        if index == 2:
            (directory / f"{dataset}-{index:06d}.tar.partial").write_bytes(b"half a tar")
            raise KeyboardInterrupt  # killed mid-run
        calls.append(index)
        return real(directory, dataset, index, rows, params, tick, inputs)

    monkeypatch.setattr(ingest, "_write_unit", dying)
    with pytest.raises(KeyboardInterrupt):
        run(chexpert.read(chexpert_tree), tmp_path / "proj", shard_size=3)
    assert not (tmp_path / "proj/manifests/cxp.parquet").exists()
    monkeypatch.setattr(ingest, "_write_unit", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    calls.clear()
    result = run(chexpert.read(chexpert_tree), tmp_path / "proj", shard_size=3)
    assert calls == [2] and result.resumed_shards == 2  # only the unfinished shard was redone
    run(chexpert.read(chexpert_tree), tmp_path / "fresh", shard_size=3)
    d1, d2 = (shards.shard_dir(tmp_path / p, "cxp", result.version) for p in ("proj", "fresh"))
    assert files(d1) == files(d2)  # same bytes, and no .partial left


def test_verify_reports_corruption_and_missing_shards(chexpert_tree, tmp_path):
    root = tmp_path / "proj"
    result = run(chexpert.read(chexpert_tree), root, shard_size=3)
    directory = shards.shard_dir(root, "cxp", result.version)
    data = bytearray((directory / "cxp-000001.tar").read_bytes())
    data[700] ^= 0xFF
    (directory / "cxp-000001.tar").write_bytes(bytes(data))
    (directory / "cxp-000002.tar").unlink()
    problems, _ = verify_dataset(root, "cxp")
    assert any("sha256 mismatch" in p and "cxp-000001" in p for p in problems)
    assert any("missing shard" in p and "cxp-000002" in p for p in problems)


def test_labels_only_writes_manifest_without_images(tmp_path):
    csv = write_chexpert(tmp_path / "raw", chexpert_rows(), images=False)
    result = run(chexpert.read(csv), tmp_path / "proj", labels_only=True)
    frame = manifest.read(tmp_path / "proj", "cxp")
    assert result.kept == 8 and frame["shard"].isna().all() and not (tmp_path / "proj/data/shards").exists()
    assert manifest.read_meta(tmp_path / "proj", "cxp")["labels_only"] is True


def test_mimic_ingest_joins_labels_split_and_patients(mimic_tree, tmp_path):
    source = mimic.read(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz", mimic_tree / "mimic-cxr-2.0.0-chexpert.csv.gz",
                        mimic_tree / "mimic-cxr-2.0.0-split.csv.gz", mimic_tree / "patients.csv.gz")
    result = run(source, tmp_path / "proj", name="mimic")
    assert (result.rows_in, result.kept) == (12, 12)
    frame = manifest.read(tmp_path / "proj", "mimic")
    assert set(frame["split"]) == {"train", "tune", "test"}
    assert frame.groupby("patient_id")["split"].nunique().max() == 1
    row = frame.set_index("key").loc["00000001-00000000-00000001-0000abcd-00001234"]
    assert (row.patient_id, row.study_id, row.sex, row.age, row.view) == ("10000764", "50001000", "M", 51.0, "LATERAL")
    assert row.source_path == "files/p10/p10000764/s50001000/00000001-00000000-00000001-0000abcd-00001234.jpg"
    lab = pd.read_csv(mimic_tree / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
    want = lab.set_index("study_id").loc["50001000", "Pleural Effusion"]
    assert row.pleural_effusion == {"1.0": 1, "0.0": 0, "-1.0": -1, "": 0}[want]
    # images of one study share the study's labels
    assert frame.groupby("study_id")[list(labels.FINDING_COLUMNS)].nunique().max().max() == 1


def test_mimic_rejects_images_without_labels_and_missing_columns(mimic_tree, tmp_path):
    lab = pd.read_csv(mimic_tree / "mimic-cxr-2.0.0-chexpert.csv.gz")
    lab.iloc[1:].to_csv(tmp_path / "labels.csv", index=False)
    source = mimic.read(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz", tmp_path / "labels.csv")
    assert source.rejects["reason"].tolist() == ["no_labels", "no_labels"] and len(source.records) == 10
    lab.drop(columns=["Edema"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SourceError, match="Edema"):
        mimic.read(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz", tmp_path / "bad.csv")


def test_table_ingest_with_png_and_dicom(tmp_path):
    raw = tmp_path / "emory"
    rows = []
    for i in range(6):
        name = f"images/img{i}." + ("dcm" if i % 2 else "png")
        if i % 2:
            save_dicom(raw / name, radiograph(i), monochrome1=(i == 3))
        else:
            save_png(raw / name, radiograph(i))
        rows.append({"ImagePath": name, "AnonPatientID": f"P{i // 2}", "Acc": f"A{i}", "PatientSex": "F" if i % 2 else "M",
                     "AgeAtExam": 30 + i, "Race": "African American or Black", "ViewPosition": "PA",
                     **{f: ["1", "0", "", "-1"][(i + j) % 4] for j, f in enumerate(labels.FINDINGS)}})
    pd.DataFrame(rows).rename(columns={"Edema": "EDEMA_LABEL"}).to_csv(raw / "emory.csv", index=False)
    mapping = ["ImagePath=path", "AnonPatientID=patient_id", "Acc=study_id", "PatientSex=sex", "AgeAtExam=age",
               "Race=race", "ViewPosition=view", "EDEMA_LABEL=Edema"]
    result = run(table.read(raw / "emory.csv", mapping), tmp_path / "proj", name="emory")
    assert result.kept == 6
    frame = manifest.read(tmp_path / "proj", "emory")
    assert frame["key"].tolist() == [f"images_img{i}" for i in range(6)]
    assert frame["race"].eq(labels.RACES[1]).all()
    with pytest.raises(SourceError, match="unknown field 'colour'"):
        table.read(raw / "emory.csv", ["Race=colour"])
    with pytest.raises(SourceError, match="no column for finding.*Edema"):
        table.read(raw / "emory.csv", mapping[:-1])
    with pytest.raises(SourceError, match="missing required column.*Nope"):
        table.read(raw / "emory.csv", ["Nope=path", "AnonPatientID=patient_id"])


def test_mimic_race_from_admissions(mimic_tree, tmp_path):
    adm = pd.DataFrame({
        "subject_id": [10000032, 10000032, 10000032, 10000764, 10000764, 11000011],
        "hadm_id": [1, 2, 3, 4, 5, 6],
        "race": ["WHITE", "WHITE - OTHER EUROPEAN", "BLACK/AFRICAN AMERICAN", "UNKNOWN", "ASIAN - CHINESE", "PATIENT DECLINED TO ANSWER"],
    })
    adm.to_csv(tmp_path / "admissions.csv", index=False)
    source = mimic.read(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz", mimic_tree / "mimic-cxr-2.0.0-chexpert.csv.gz",
                        admissions=tmp_path / "admissions.csv")
    race = source.records.groupby("patient_id")["race"].first()
    assert race["10000032"] == labels.RACES[2]  # White twice beats Black once
    assert race["10000764"] == labels.RACES[4]  # the only known category
    assert pd.isna(race["11000011"])  # declined: unknown


def test_digests_are_cached_by_stat_and_rehash_reads_every_image(chexpert_tree, tmp_path, monkeypatch):
    from cxrsynth import digests

    reads = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda p: reads.append(p) or real(p))
    first = run(chexpert.read(chexpert_tree), tmp_path / "proj", shard_size=3)
    assert len(reads) == 8 and digests.cache_path(tmp_path / "proj", "cxp").is_file()
    reads.clear()
    again = run(chexpert.read(chexpert_tree), tmp_path / "proj", shard_size=3)
    assert reads == [] and again.version == first.version and again.resumed_shards == 3  # stat unchanged: nothing read
    image = Path(chexpert.read(chexpert_tree).records["image_path"][4])
    image.write_bytes(image.read_bytes())  # same bytes, new mtime/ctime: read again, same digest, same version
    third = run(chexpert.read(chexpert_tree), tmp_path / "proj", shard_size=3)
    assert reads == [str(image)] and third.version == first.version
    reads.clear()
    fourth = run(chexpert.read(chexpert_tree), tmp_path / "proj", shard_size=3, rehash=True)
    assert len(reads) == 8 and fourth.version == first.version


def test_identical_repeated_lookup_rows_are_one_row_conflicting_ones_reject(mimic_tree, tmp_path):
    lab = pd.read_csv(mimic_tree / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
    pd.concat([lab, lab.iloc[[0]]]).to_csv(tmp_path / "repeated.csv", index=False)
    source = mimic.read(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz", tmp_path / "repeated.csv")
    assert len(source.records) == 12 and source.rejects.empty  # the same row twice: no conflict
    other = lab.iloc[[0]].assign(Edema="1.0" if lab.iloc[0]["Edema"] != "1.0" else "0.0")
    pd.concat([lab, other]).to_csv(tmp_path / "conflict.csv", index=False)
    source = mimic.read(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz", tmp_path / "conflict.csv")
    assert source.rejects["reason"].tolist() == ["conflicting_labels"] * 2  # both images of that study
    assert "2 different rows in the label table (Edema)" in source.rejects["detail"].iloc[0]
