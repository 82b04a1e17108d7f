"""Tiny on-disk fixtures in each dataset's native format, built by the tests themselves."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrsynth import labels

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *labels.FINDINGS]
MIMIC_LABEL_COLUMNS = ["subject_id", "study_id", *sorted(labels.FINDINGS)]


def radiograph(seed: int, width: int = 80, height: int = 96) -> np.ndarray:
    """A small non-square grayscale test image: two dark 'lungs' on a bright body."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    body = 170 + 30 * np.cos((x - width / 2) / width * np.pi)
    for cx in (0.3 * width, 0.7 * width):
        lung = ((x - cx) / (0.16 * width)) ** 2 + ((y - 0.5 * height) / (0.33 * height)) ** 2 < 1
        body = np.where(lung, 60 + 20 * rng.random(), body)
    return np.clip(body + rng.normal(0, 8, body.shape), 0, 255).astype(np.uint8)


def save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=90)


def save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")


def save_dicom(path: Path, image: np.ndarray, *, monochrome1: bool = False, window: tuple[float, float] | None = None) -> None:
    """A minimal valid DICOM (16-bit) written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = image.astype(np.uint16) * 16  # 12-bit range
    if monochrome1:
        pixels = (4095 - pixels).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def chexpert_rows(n_patients: int = 4, studies: int = 2, split: str = "train", prefix: str = "CheXpert-v1.0",
                  uncertain: bool = True) -> list[dict]:
    """CheXpert CSV rows with random labels; ``uncertain=False`` writes blanks instead of -1.0
    (so every image can train a generator or classifier)."""
    rows = []
    rng = np.random.default_rng(0)
    values = ["1.0", "0.0", "-1.0" if uncertain else "", ""]
    for p in range(1, n_patients + 1):
        for s in range(1, studies + 1):
            row = {
                "Path": f"{prefix}/{split}/patient{p:05d}/study{s}/view1_frontal.jpg",
                "Sex": ["Female", "Male"][p % 2],
                "Age": str(40 + p),
                "Frontal/Lateral": "Frontal",
                "AP/PA": ["AP", "PA"][s % 2],
            }
            for f in labels.FINDINGS:
                row[f] = values[rng.integers(0, 4)]
            rows.append(row)
    return rows


def write_chexpert(root: Path, rows: list[dict], *, images: bool = True, csv_name: str = "train.csv") -> Path:
    """Write ``root/CheXpert-v1.0/<csv_name>`` and one JPEG per row."""
    folder = root / "CheXpert-v1.0"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=CHEXPERT_COLUMNS).to_csv(folder / csv_name, index=False)
    if images:
        for i, row in enumerate(rows):
            save_jpeg(root / row["Path"], radiograph(i))
    return folder / csv_name


@pytest.fixture
def chexpert_tree(tmp_path: Path) -> Path:
    """A CheXpert tree of 4 patients x 2 studies with images; returns train.csv."""
    return write_chexpert(tmp_path / "raw", chexpert_rows())


def write_gz_csv(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        gz.write(frame.to_csv(index=False).encode())
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def mimic_tree(tmp_path: Path) -> Path:
    """A MIMIC-CXR-JPG tree: 3 subjects, 2 studies each, 2 images per study."""
    root = tmp_path / "mimic"
    root.mkdir()
    meta, lab, split, patients = [], [], [], []
    rng = np.random.default_rng(1)
    for s_i, subject in enumerate((10000032, 10000764, 11000011)):
        patients.append({"subject_id": subject, "gender": ["F", "M", "F"][s_i], "anchor_age": 50 + s_i, "anchor_year": 2180, "anchor_year_group": "2014 - 2016", "dod": ""})
        for st in range(2):
            study = 50000000 + 1000 * s_i + st
            lab.append({"subject_id": subject, "study_id": study, **{f: ["1.0", "0.0", "-1.0", ""][rng.integers(0, 4)] for f in sorted(labels.FINDINGS)}})
            for im in range(2):
                dicom = f"{s_i:08x}-{st:08x}-{im:08x}-0000abcd-00001234"
                meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": ["PA", "LATERAL"][im]})
                split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": ["train", "validate", "test"][s_i]})
                save_jpeg(root / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg", radiograph(100 + len(meta)))
    write_gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(meta))
    write_gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", pd.DataFrame(lab, columns=MIMIC_LABEL_COLUMNS))
    write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame(split))
    write_gz_csv(root / "patients.csv.gz", pd.DataFrame(patients))
    return root


def torchrun(*args, cwd: Path, timeout: int = 300) -> str:
    """Run ``torchrun --standalone --nproc-per-node 2 -m cxrsynth.cli ARGS`` (one thread per rank); return its output."""
    import os
    import subprocess
    import sys

    launcher = Path(sys.executable).with_name("torchrun")
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc-per-node", "2", "-m", "cxrsynth.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output
