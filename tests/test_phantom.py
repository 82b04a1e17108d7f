"""Tests of the three-site phantom: formats, label rules, determinism, CLI."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrsynth.imaging import read_image
from cxrsynth.labels import FINDING_COLUMNS, FINDINGS
from cxrsynth.phantom import SITES, sample_site, write_site
from cxrsynth.phantom.cohort import sample_cohort
from cxrsynth.phantom.formats import MIMIC_FINDINGS

N = 24
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
IDX = {f: k for k, f in enumerate(FINDINGS)}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phantom")
    out = {}
    for site in SITES:
        out[site] = root / site
        write_site(site, N, out[site], seed=3, sheet=root / f"{site}-sheet.png")
    return out


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("site", sorted(SITES))
def test_same_seed_writes_identical_bytes(site, written, tmp_path):
    again = tmp_path / "again"
    write_site(site, N, again, seed=3)
    assert _digest(again) == _digest(written[site])


def test_different_seed_differs(written, tmp_path):
    other = tmp_path / "other"
    write_site("cxp", N, other, seed=4)
    a, b = _digest(written["cxp"]), _digest(other)
    assert a != b
    assert (other / "CheXpert-v1.0/train.csv").read_bytes() != (written["cxp"] / "CheXpert-v1.0/train.csv").read_bytes()


def test_images_do_not_depend_on_chunk_size():
    phantom = sample_site("emory", 10, seed=1)
    whole = list(phantom.images(chunk=10))
    pieces = list(phantom.images(chunk=3))
    assert all(np.array_equal(a, b) for a, b in zip(whole, pieces, strict=True))


# ----------------------------------------------------------------------------- formats


def test_chexpert_format(written):
    root = written["cxp"]
    train_csv = root / "CheXpert-v1.0" / "train.csv"
    assert train_csv.read_text().splitlines()[0] == CHEXPERT_HEADER
    train = pd.read_csv(train_csv, dtype=str, keep_default_na=False)
    valid = pd.read_csv(root / "CheXpert-v1.0" / "valid.csv", dtype=str, keep_default_na=False)
    assert len(train) + len(valid) == N and len(valid) >= 1
    assert train["Path"].str.fullmatch(r"CheXpert-v1\.0/train/patient\d{5}/study\d+/view\d+_frontal\.jpg").all()
    assert valid["Path"].str.fullmatch(r"CheXpert-v1\.0/valid/patient\d{5}/study\d+/view1_frontal\.jpg|"
                                       r"CheXpert-v1\.0/valid/patient\d{5}/study\d+/view\d+_frontal\.jpg").all()
    # Valid patients continue the numbering.
    first_valid = min(int(p[7:12]) for p in valid["Path"].str.split("/").str[2])
    last_train = max(int(p[7:12]) for p in train["Path"].str.split("/").str[2])
    assert first_valid == last_train + 1
    assert set(train["Sex"]) <= {"Female", "Male", "Unknown"}
    assert set(train["Frontal/Lateral"]) == {"Frontal"} and set(train["AP/PA"]) <= {"AP", "PA"}
    assert train["Age"].str.fullmatch(r"\d+").all()
    values = train[list(FINDINGS)].to_numpy()
    assert set(np.unique(values)) <= {"1.0", "0.0", "-1.0", ""}
    assert (values == "").sum() > (values == "0.0").sum()  # most negatives are blank
    assert set(np.unique(valid[list(FINDINGS)].to_numpy())) <= {"1.0", "0.0"}
    for path in pd.concat([train, valid])["Path"]:
        image = read_image(root / path)
        assert image.ndim == 2 and image.shape[0] != image.shape[1]
    demo = pd.read_csv(root / "CHEXPERT DEMO.csv", dtype=str, keep_default_na=False)
    assert list(demo.columns) == ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]
    patients = set(pd.concat([train, valid])["Path"].str.split("/").str[2])
    assert set(demo["PATIENT"]) == patients


def test_mimic_format(written):
    root = written["mimic"]
    for name in ("metadata", "chexpert", "split"):
        with open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "rb") as fh:
            head = fh.read(10)
        assert head[:2] == b"\x1f\x8b" and head[4:8] == b"\x00\x00\x00\x00"  # gzip, mtime 0
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert list(meta.columns) == [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
        "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]  # fmt: skip
    assert len(meta) == N
    assert meta["dicom_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all()
    assert meta["subject_id"].between(10_000_000, 19_999_999).all()
    assert meta["study_id"].between(50_000_000, 59_999_999).all()
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert list(labels.columns) == ["subject_id", "study_id", *MIMIC_FINDINGS]
    assert list(MIMIC_FINDINGS) == sorted(FINDINGS)
    assert labels["study_id"].is_unique and set(labels["study_id"]) == set(meta["study_id"])
    assert set(np.unique(labels[list(MIMIC_FINDINGS)].fillna(9).to_numpy())) <= {1.0, 0.0, -1.0, 9}
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split["split"]) <= {"train", "validate", "test"}
    assert split.groupby("subject_id")["split"].nunique().max() == 1  # patient-level
    patients = pd.read_csv(root / "patients.csv.gz")
    assert list(patients.columns) == ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]
    assert set(patients["gender"]) <= {"F", "M"} and set(patients["subject_id"]) == set(meta["subject_id"])
    for row in meta.itertuples():
        path = root / "files" / f"p{str(row.subject_id)[:2]}" / f"p{row.subject_id}" / f"s{row.study_id}" / f"{row.dicom_id}.jpg"
        image = read_image(path)
        assert image.shape == (row.Rows, row.Columns) and row.Rows != row.Columns


def test_emory_format_png_and_dicom(written):
    root = written["emory"]
    table = pd.read_csv(root / "emory.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == [
        "ImagePath", "AnonPatientID", "AnonAccession", "PatientSex", "AgeAtExam", "Race", "ViewPosition", *FINDINGS,
    ]  # fmt: skip
    assert set(np.unique(table[list(FINDINGS)].to_numpy())) <= {"1", "0", "-1", ""}
    suffixes = table["ImagePath"].str.rsplit(".", n=1).str[1]
    assert {"png", "dcm"} <= set(suffixes)
    import pydicom

    mono1 = 0
    for rel in table["ImagePath"]:
        path = root / rel
        image = read_image(path)
        assert image.shape[0] != image.shape[1]
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                mono1 += 1
                # Read back non-inverted: lungs (upper-middle of each half) darker than the spine.
                h, w = image.shape
                band = image[h // 3 : h // 2]
                lungs = np.concatenate([band[:, w // 5 : w // 3].ravel(), band[:, w - w // 3 : w - w // 5].ravel()])
                spine = image[h // 3 : h // 2, w // 2 - 4 : w // 2 + 4]
                assert lungs.mean() < spine.mean() - 20
    assert mono1 >= 1


def test_contact_sheet_written(written):
    sheet = written["cxp"].parent / "cxp-sheet.png"
    from PIL import Image

    with Image.open(sheet) as im:
        assert im.size[0] > 600 and im.size[1] > 300


# ----------------------------------------------------------------------------- signatures


def test_strength_follows_labels_with_a_faint_tail():
    phantom = sample_site("cxp", 3000, seed=0)
    labels, strength = phantom.cohort.labels, phantom.scene.strength
    assert (strength[labels == 0] == 0).all()
    for name in ("Edema", "Pleural Effusion", "Pneumothorax", "Consolidation"):
        s = strength[labels[:, IDX[name]] == 1, IDX[name]]
        assert (s > 0).all() and s.max() <= 1.0
        assert 0.2 < (s < 0.25).mean() < 0.6, name  # many faint cases: learnable, not trivial


def test_every_drawn_finding_changes_the_image():
    from cxrsynth.phantom.render import render_canvas

    phantom = sample_site("cxp", 400, seed=5)
    imaging = phantom.site.imaging
    drawn = [f for f in FINDINGS if f not in ("No Finding", "Cardiomegaly", "Enlarged Cardiomediastinum")]
    for name in drawn:
        k = IDX[name]
        i = int(np.flatnonzero(phantom.scene.strength[:, k] > 0.5)[0])
        scene = phantom.scene.take(np.array([i]))
        with_it = render_canvas(scene, imaging).astype(int)
        scene.strength[0, k] = 0.0
        scene.devices[0, :4] = scene.devices[0, :4] & (name != "Support Devices")
        without = render_canvas(scene, imaging).astype(int)
        assert np.abs(with_it - without).sum() > 500, name


def test_emory_is_imaged_differently():
    cxp, emory = SITES["cxp"].imaging, SITES["emory"].imaging
    assert emory.blur[0] > 2 * cxp.blur[0] and emory.noise[0] > 2 * cxp.noise[0]
    assert cxp.sharpen[0] > 0 and emory.sharpen[0] == 0 and emory.heel[0] > 0
    assert SITES["emory"].ap_fraction < SITES["cxp"].ap_fraction


# ----------------------------------------------------------------------------- labels


@pytest.fixture(scope="module", params=sorted(SITES))
def big_cohort(request):
    site = request.param
    return site, sample_cohort(site, 6000, np.random.default_rng(0))


def test_no_finding_excludes_all_but_support_devices(big_cohort):
    _, cohort = big_cohort
    labels = cohort.labels
    nf = labels[:, IDX["No Finding"]] == 1
    others = [k for f, k in IDX.items() if f not in ("No Finding", "Support Devices")]
    assert nf.any()
    assert (labels[nf][:, others] == 0).all()
    assert (labels[nf, IDX["Support Devices"]] == 1).any()


def test_pneumonia_and_consolidation_imply_opacity(big_cohort):
    _, cohort = big_cohort
    labels = cohort.labels
    for name in ("Pneumonia", "Consolidation"):
        pos = labels[:, IDX[name]] == 1
        assert pos.any() and (labels[pos, IDX["Lung Opacity"]] == 1).all()


def test_edema_goes_with_cardiomegaly_and_effusion(big_cohort):
    _, cohort = big_cohort
    labels = cohort.labels
    edema = labels[:, IDX["Edema"]] == 1
    for name in ("Cardiomegaly", "Pleural Effusion"):
        other = labels[:, IDX[name]] == 1
        assert other[edema].mean() > 1.3 * other[~edema].mean()


def test_prevalences_near_table_1(big_cohort):
    site, cohort = big_cohort
    labels = cohort.labels
    for k, (pos, unc) in enumerate(SITES[site].rates):
        assert abs((labels[:, k] == 1).mean() - pos) < 0.02 + 0.1 * pos, FINDINGS[k]
        assert abs((labels[:, k] == -1).mean() - unc) < 0.02 + 0.1 * unc, FINDINGS[k]


def test_demographics_and_structure(big_cohort):
    site, cohort = big_cohort
    spec = SITES[site]
    f = cohort.frame
    per_patient = f.groupby("patient")
    female = (per_patient["sex"].first() == "F").mean()
    assert abs(female - spec.female) < 0.04
    q1, q3 = np.nanpercentile(f["age"], [25, 75])
    assert abs(q1 - spec.age_iqr[0]) < 4 and abs(q3 - spec.age_iqr[1]) < 4
    assert per_patient.size().max() > 1  # several images per patient
    study_labels = f.groupby("study")[list(FINDING_COLUMNS)].nunique()
    assert (study_labels == 1).all().all()  # images of a study share labels
    assert abs((f["view"] == "AP").mean() - spec.ap_fraction) < 0.05


# ----------------------------------------------------------------------------- CLI


def test_cli_phantom(tmp_path):
    from typer.testing import CliRunner

    from cxrsynth.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["phantom", "mimic", "--n", "12", "--out", "ph", "--root", str(tmp_path), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ph" / "mimic-cxr-2.0.0-metadata.csv.gz").is_file()
    with gzip.open(tmp_path / "ph" / "mimic-cxr-2.0.0-metadata.csv.gz", "rt") as fh:
        assert len(fh.read().splitlines()) == 13
    bad = runner.invoke(app, ["phantom", "nowhere", "--n", "5", "--out", "x", "--root", str(tmp_path)])
    assert bad.exit_code == 2 and "nowhere" in bad.output and "cxp" in bad.output  # names the known sites


#: sha256 of the pixels of ``sample_site(site, 6, seed=3)``: the embedded default is the same
#: bytes on every x86 CPU (no BLAS, float64 transcendentals rounded to float32 in the renderer).
RENDER_SHA256 = {
    "cxp": "361e9b73357a58a4f23b0cd4dc6aa8850f1fdcb5079527a9c9738583055917f8",
    "mimic": "8b164bb42054765aeda43b89ef843fd7067dae3880e7b7bb3990750dac8fe6a4",
    "emory": "adff6c6b2c5112c5d6453940b2ca8d72815e25734dc4d85610f6adaa47348ef8",
}

_RENDER_HASHES = (
    "import hashlib, json; from cxrsynth.phantom import sample_site; "
    "print(json.dumps({s: hashlib.sha256(b''.join(i.tobytes() for i in sample_site(s, 6, seed=3).images())).hexdigest() "
    "for s in ('cxp', 'mimic', 'emory')}))"
)


@pytest.mark.slow
def test_render_bytes_pinned():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RENDER_HASHES], capture_output=True, text=True, check=True).stdout
    assert __import__("json").loads(out) == RENDER_SHA256


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"},
                                 {"OPENBLAS_CORETYPE": "Prescott"}, {"OPENBLAS_CORETYPE": "Sandybridge"}],
                         ids=["numpy-simd-baseline", "openblas-prescott", "openblas-sandybridge"])
def test_render_bytes_do_not_depend_on_cpu_kernels(env):
    """Another CPU, simulated: numpy's SIMD dispatch forced down, OpenBLAS on another core's kernels."""
    import json
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _RENDER_HASHES], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == RENDER_SHA256


# ----------------------------------------------------------------------------- patients


def test_a_patients_anatomy_persists_across_studies_and_does_not_depend_on_n():
    from cxrsynth.phantom.anatomy import ANATOMY, sample_anatomy

    phantom = sample_site("cxp", 60, seed=2)
    patient = phantom.cohort.frame["patient"].to_numpy()
    anatomy = phantom.scene.anatomy
    for p in np.unique(patient):  # every image of a patient carries its anatomy, implants and vessels
        rows = np.flatnonzero(patient == p)
        assert (anatomy[rows] == anatomy[rows[0]]).all() and (phantom.scene.texture[rows] == phantom.scene.texture[rows[0]]).all()
        assert (phantom.scene.implants[rows] == phantom.scene.implants[rows[0]]).all()
    assert len({tuple(r) for r in anatomy}) == len(np.unique(patient))  # and no two patients share one
    # Patient p's anatomy comes from its own generator: drawing more patients leaves it alone.
    few, many = sample_anatomy(5, (2, 7)), sample_anatomy(50, (2, 7))
    assert np.array_equal(few.values, many.values[:5]) and np.array_equal(few.texture, many.texture[:5])
    assert few.values.shape == (5, len(ANATOMY))
    # The labels and demographics are the cohort's alone: the anatomy draws no labels.
    assert phantom.cohort.frame.equals(sample_site("cxp", 60, seed=2).cohort.frame)


def test_studies_of_one_patient_vary_around_the_anatomy():
    """Positioning, inspiration and exposure are drawn per image, not per patient."""
    phantom = sample_site("cxp", 200, seed=1)
    scene, patient = phantom.scene, phantom.cohort.frame["patient"].to_numpy()
    p = np.bincount(patient).argmax()
    rows = np.flatnonzero(patient == p)
    assert len(rows) >= 3
    for field in ("shift", "rotation", "inspiration", "exposure", "gamma", "noise"):
        values = getattr(scene, field)[rows]
        assert len({np.asarray(v).tobytes() for v in values}) == len(rows), field


@pytest.mark.slow
def test_reid_recognises_held_out_phantom_patients_and_pixels_do_not():
    """Issue 17: the audit's reid network, trained on 70% of the patients, verifies the other 30%."""
    from cxrsynth.bench.reid import phantom_reid

    result = phantom_reid("cxp", n=700, size=32, seed=0, steps=400, shift=2)
    held = result["auroc_held_out"]
    assert held["reid"]["same_patient_pairs"] >= 100 and result["held_out_patients"] >= 40
    assert held["reid"]["auroc"] >= 0.95, result
    assert held["pixels"]["auroc"] <= held["reid"]["auroc"] - 0.15, result
