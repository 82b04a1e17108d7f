"""Writers of each site's native on-disk layout (what the real importers read).

- ``cxp``: CheXpert-v1.0 tree, ``train.csv`` / ``valid.csv`` with CheXpert's columns and
  value conventions, and ``CHEXPERT DEMO.csv`` (the demographics file, with race).
- ``mimic``: MIMIC-CXR-JPG ``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg`` plus the gzipped
  metadata, chexpert, split and patients tables with MIMIC's column names.
- ``emory``: one in-house CSV table with PNG (8- and 16-bit) and DICOM images (some
  MONOCHROME1, some with a VOI window).

Every writer takes the cohort (one row per image), an iterator of rendered images in
the same order and a generator for file-level randomness (IDs, dates, ethnicity), and
returns a summary dict. Output is byte-identical for a seed: fixed JPEG quality, gzip
headers with mtime 0 and no file name, DICOM UIDs derived from the seed, no timestamps.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrsynth.labels import FINDINGS
from cxrsynth.phantom.cohort import Cohort

JPEG_QUALITY = 92
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS)
MIMIC_FINDINGS = tuple(sorted(FINDINGS))  # MIMIC's chexpert table is alphabetical
MIMIC_METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
EMORY_COLUMNS = (
    "ImagePath",
    "AnonPatientID",
    "AnonAccession",
    "PatientSex",
    "AgeAtExam",
    "Race",
    "ViewPosition",
    *FINDINGS,
)
#: Emory image kinds, assigned by shuffling this pattern over the images.
EMORY_KINDS = ("png8",) * 5 + ("png16",) * 2 + ("dcm_mono1", "dcm_mono1_window", "dcm_mono2_window")
DICOM_BITS = 12


# ----------------------------------------------------------------------------- helpers


def _label_text(labels: np.ndarray, explicit: np.ndarray, decimals: bool = True) -> np.ndarray:
    """(N, 14) int8 labels -> CheXpert text: "1.0", "-1.0", "0.0" (explicit) or "" (blank)."""
    one, minus, zero = ("1.0", "-1.0", "0.0") if decimals else ("1", "-1", "0")
    text = np.where(labels == 1, one, np.where(labels == -1, minus, np.where(explicit, zero, "")))
    return text.astype(object)


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, frame.to_csv(index=False, lineterminator="\n").encode())
    return path


def _write_csv_gz(frame: pd.DataFrame, path: Path) -> Path:
    """Deterministic gzip: mtime 0 and an empty file name in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=6) as gz:
        gz.write(frame.to_csv(index=False, lineterminator="\n").encode())
    _write(path, buffer.getvalue())
    return path


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    """Encode in memory, then write: PIL's JPEG encoder writing to a file ignores a failed write
    (a full disk or a file-size limit left truncated JPEGs and exit 0); ``write_bytes`` raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    _write(path, buffer.getvalue())


def _write(path: Path, data: bytes) -> None:
    """``path.write_bytes(data)``, naming ``path`` when the write fails (a failed write() names no file)."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _unique_ids(rng: np.random.Generator, count: int, low: int, span: int) -> np.ndarray:
    """``count`` distinct sorted integers in ``[low, low + span)``."""
    return low + np.sort(rng.choice(span, size=count, replace=False))


def _sex_text(sex: pd.Series, female: str, male: str, unknown: str) -> np.ndarray:
    return np.where(sex == "F", female, np.where(sex == "M", male, unknown)).astype(object)


# ----------------------------------------------------------------------------- CheXpert


def write_chexpert(cohort: Cohort, images: Iterable[np.ndarray], out: Path, rng: np.random.Generator) -> dict:
    """CheXpert-v1.0 tree with train.csv, valid.csv and ``CHEXPERT DEMO.csv``."""
    f = cohort.frame
    split = np.where(f["split"] == "valid", "valid", "train")
    rel = [
        f"CheXpert-v1.0/{s}/patient{p + 1:05d}/study{st + 1}/view{i + 1}_frontal.jpg"
        for s, p, st, i in zip(split, f["patient"], f["study_of_patient"], f["image_of_study"])
    ]
    for path, image in zip(rel, images, strict=True):
        _save_jpeg(image, out / path)
    age = f["age"].fillna(0).astype(int)
    table = pd.DataFrame(
        {
            "Path": rel,
            "Sex": _sex_text(f["sex"], "Female", "Male", "Unknown"),
            "Age": age,
            "Frontal/Lateral": "Frontal",
            "AP/PA": f["view"].to_numpy(),
        }
    )
    text = _label_text(cohort.labels, cohort.explicit)
    for k, name in enumerate(FINDINGS):
        table[name] = text[:, k]
    train = _write_csv(table[split == "train"], out / "CheXpert-v1.0" / "train.csv")
    valid = _write_csv(table[split == "valid"], out / "CheXpert-v1.0" / "valid.csv")

    patients = f.groupby("patient", sort=True).first()
    n = len(patients)
    ethnicity = np.array(["Non-Hispanic/Non-Latino", "Hispanic/Latino", "Unknown", "Patient Refused"], dtype=object)
    demo = pd.DataFrame(
        {
            "PATIENT": [f"patient{p + 1:05d}" for p in patients.index],
            "GENDER": _sex_text(patients["sex"], "Female", "Male", "Unknown"),
            "AGE_AT_CXR": patients["age"].fillna(0).astype(int).to_numpy(),
            "PRIMARY_RACE": patients["race"].fillna("Unknown").to_numpy(),
            "ETHNICITY": ethnicity[rng.choice(4, n, p=[0.8, 0.1, 0.08, 0.02])],
        }
    )
    demo_path = _write_csv(demo, out / "CHEXPERT DEMO.csv")
    return {
        "tables": [str(train), str(valid), str(demo_path)],
        "train_images": int((split == "train").sum()),
        "valid_images": int((split == "valid").sum()),
    }


# ----------------------------------------------------------------------------- MIMIC


def write_mimic(cohort: Cohort, images: Iterable[np.ndarray], out: Path, rng: np.random.Generator) -> dict:
    """MIMIC-CXR-JPG tree with the metadata, chexpert, split and patients tables (gzipped)."""
    f = cohort.frame
    n_patients, n_studies = int(f["patient"].max()) + 1, int(f["study"].max()) + 1
    subject_ids = _unique_ids(rng, n_patients, 10_000_000, 9_999_999)
    study_ids = rng.permutation(_unique_ids(rng, n_studies, 50_000_000, 9_999_999))
    words = rng.integers(0, 2**32, size=(len(f), 5), dtype=np.uint64)
    dicom_ids = ["-".join(f"{int(w):08x}" for w in row) for row in words]
    subject = subject_ids[f["patient"].to_numpy()]
    study = study_ids[f["study"].to_numpy()]

    rel = [f"files/p{str(s)[:2]}/p{s}/s{st}/{d}.jpg" for s, st, d in zip(subject, study, dicom_ids)]
    shapes = []
    for path, image in zip(rel, images, strict=True):
        _save_jpeg(image, out / path)
        shapes.append(image.shape)
    rows, cols = np.array(shapes).T

    # Dates are shifted into 2100-2200 as in MIMIC; anchor_year is the first study's year.
    anchor_year = rng.integers(2110, 2190, n_patients)
    year = anchor_year[f["patient"].to_numpy()] + np.floor(f["years_since_first"].to_numpy()).astype(int)
    day_of_year = rng.integers(0, 365, n_studies)[f["study"].to_numpy()]
    dates = pd.to_datetime(year.astype(str), format="%Y") + pd.to_timedelta(day_of_year, unit="D")
    seconds = rng.uniform(0, 86_400, n_studies)[f["study"].to_numpy()]
    hh, mm, ss = seconds // 3600, (seconds % 3600) // 60, seconds % 60
    study_time = np.round(hh * 10_000 + mm * 100 + ss, 3)
    ap = f["view"].to_numpy() == "AP"
    recumbent = rng.random(len(f)) < 0.4
    description = np.where(ap, "CHEST (PORTABLE AP)", "CHEST (PA AND LAT)")
    metadata = pd.DataFrame(
        {
            "dicom_id": dicom_ids,
            "subject_id": subject,
            "study_id": study,
            "PerformedProcedureStepDescription": description,
            "ViewPosition": f["view"].to_numpy(),
            "Rows": rows,
            "Columns": cols,
            "StudyDate": dates.strftime("%Y%m%d").astype(int),
            "StudyTime": study_time,
            "ProcedureCodeSequence_CodeMeaning": description,
            "ViewCodeSequence_CodeMeaning": np.where(ap, "antero-posterior", "postero-anterior"),
            "PatientOrientationCodeSequence_CodeMeaning": np.where(ap & recumbent, "Recumbent", "Erect"),
        },
        columns=list(MIMIC_METADATA_COLUMNS),
    )
    first = ~f["study"].duplicated().to_numpy()  # labels are per study
    text = _label_text(cohort.labels[first], cohort.explicit[first])
    chexpert = pd.DataFrame({"subject_id": subject[first], "study_id": study[first]})
    for name in MIMIC_FINDINGS:
        chexpert[name] = text[:, FINDINGS.index(name)]
    chexpert = chexpert.sort_values(["subject_id", "study_id"], kind="stable")
    split = pd.DataFrame(
        {"dicom_id": dicom_ids, "study_id": study, "subject_id": subject, "split": f["split"].to_numpy()}
    )
    patients_frame = f.groupby("patient", sort=True).first()
    dod = np.where(rng.random(n_patients) < 0.05, [f"{y + 2}-06-15" for y in anchor_year], "")
    groups = np.array(["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019"], dtype=object)
    patients = pd.DataFrame(
        {
            "subject_id": subject_ids,
            "gender": _sex_text(patients_frame["sex"], "F", "M", ""),
            "anchor_age": patients_frame["age"].fillna(0).astype(int).clip(upper=91).to_numpy(),
            "anchor_year": anchor_year,
            "anchor_year_group": groups[rng.integers(0, 4, n_patients)],
            "dod": dod.astype(object),
        }
    )
    tables = [
        _write_csv_gz(metadata, out / "mimic-cxr-2.0.0-metadata.csv.gz"),
        _write_csv_gz(chexpert, out / "mimic-cxr-2.0.0-chexpert.csv.gz"),
        _write_csv_gz(split, out / "mimic-cxr-2.0.0-split.csv.gz"),
        _write_csv_gz(patients, out / "patients.csv.gz"),
    ]
    return {"tables": [str(t) for t in tables], "splits": split["split"].value_counts().to_dict()}


# ----------------------------------------------------------------------------- Emory


def _dicom(image: np.ndarray, kind: str, uid_seed: str, row: pd.Series, ids: tuple[str, str]) -> bytes:
    """A DX DICOM of ``image`` (12-bit stored); MONOCHROME1 stores inverted values."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(tag: str) -> str:
        return generate_uid(entropy_srcs=[uid_seed, tag])

    pixels = image.astype(np.uint16) * 16 + 8  # 12-bit range
    mono1 = kind.startswith("dcm_mono1")
    if mono1:
        pixels = (2**DICOM_BITS - 1) - pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, for presentation
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "DX"
    ds.PatientID, ds.AccessionNumber = ids
    ds.PatientSex = {"F": "F", "M": "M"}.get(row["sex"], "O")
    ds.ViewPosition = row["view"]
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, DICOM_BITS, DICOM_BITS - 1
    ds.PixelRepresentation = 0
    if kind.endswith("window"):  # a VOI window slightly inside the stored range
        lo, hi = float(pixels.min()), float(pixels.max())
        ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
        ds.WindowWidth = f"{0.95 * (hi - lo) + 1:.1f}"
    ds.PixelData = pixels.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_table(cohort: Cohort, images: Iterable[np.ndarray], out: Path, rng: np.random.Generator) -> dict:
    """In-house table ``emory.csv`` with PNG and DICOM images under ``images/``."""
    f = cohort.frame
    n_patients, n_studies = int(f["patient"].max()) + 1, int(f["study"].max()) + 1
    patient_ids = rng.permutation(_unique_ids(rng, n_patients, 10_000_000, 89_999_999))
    accessions = rng.permutation(_unique_ids(rng, n_studies, 100_000_000_000, 899_999_999_999))
    pid = patient_ids[f["patient"].to_numpy()].astype(str)
    acc = accessions[f["study"].to_numpy()].astype(str)
    kinds = rng.permutation(np.resize(np.array(EMORY_KINDS), len(f)))
    uid_seed = str(rng.integers(0, 2**63))
    rel = []
    for i, (image, kind) in enumerate(zip(images, kinds, strict=True)):
        suffix = ".dcm" if kind.startswith("dcm") else ".png"
        path = f"images/{pid[i]}/{acc[i]}_{int(f['image_of_study'].iat[i]) + 1}{suffix}"
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "png8":
            Image.fromarray(image, mode="L").save(target, format="PNG", compress_level=6)
        elif kind == "png16":
            Image.fromarray(image.astype(np.uint16) * 257).save(target, format="PNG", compress_level=6)
        else:
            target.write_bytes(_dicom(image, kind, f"{uid_seed}-{i}", f.iloc[i], (pid[i], acc[i])))
        rel.append(path)
    table = pd.DataFrame(
        {
            "ImagePath": rel,
            "AnonPatientID": pid,
            "AnonAccession": acc,
            "PatientSex": _sex_text(f["sex"], "F", "M", ""),
            "AgeAtExam": f["age"].astype("Int64").to_numpy(),
            "Race": f["race"].fillna("Unknown").to_numpy(),
            "ViewPosition": f["view"].to_numpy(),
        }
    )
    text = _label_text(cohort.labels, cohort.explicit, decimals=False)
    for k, name in enumerate(FINDINGS):
        table[name] = text[:, k]
    path = _write_csv(table, out / "emory.csv")
    return {"tables": [str(path)], "kinds": pd.Series(kinds).value_counts().sort_index().to_dict()}


Writer = Callable[[Cohort, Iterable[np.ndarray], Path, np.random.Generator], dict]

#: Writers by site name.
WRITERS: dict[str, Writer] = {"cxp": write_chexpert, "mimic": write_mimic, "emory": write_table}


def captured(images: Iterable[np.ndarray], keep: int, into: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Pass images through, appending the first ``keep`` to ``into`` (for the contact sheet)."""
    for i, image in enumerate(images):
        if i < keep:
            into.append(image)
        yield image


__all__ = [
    "CHEXPERT_COLUMNS",
    "EMORY_COLUMNS",
    "MIMIC_FINDINGS",
    "MIMIC_METADATA_COLUMNS",
    "WRITERS",
    "write_chexpert",
    "write_mimic",
    "write_table",
]
