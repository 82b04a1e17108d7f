"""The tests' shared fixtures, built by the tests themselves on tiny real data.

- raw sites in each dataset's native format (:func:`write_chexpert`, ``chexpert_tree``, ``mimic_tree``);
- a tiny ingested site (:func:`ingest_site`: CheXpert rows written, ingested, split);
- a micro generator (:func:`micro_generator`, untrained) and its replicas (:func:`replica`);
- a tiny classifier (:func:`tiny_classifier`: ``classifier train --preset small`` for one epoch);
- manifests without images for the evaluation tests (:func:`make_rows`, :func:`write_dataset`,
  :func:`write_predictions`);
- a local S3-compatible server (:class:`S3Server`, moto in server mode on 127.0.0.1; the
  ``s3`` fixture: a fresh bucket on it, fsspec configured to reach it);
- the shared project of the share and audit tests (``share_project``: a site whose patients'
  studies look alike, and one replica of its training split; read-only, :meth:`Project.copy` it).

Helpers are imported as ``from conftest import ...``; no test module imports another.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxrsynth import labels, manifest

# One OpenMP (torch) thread per test process unless OMP_NUM_THREADS says otherwise: `make test` runs
# two xdist workers on two cores, where a second thread per worker only spins (a micro generate ~10x
# slower). Set before any test imports torch; the CLI and torchrun subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def torchrun_two_nodes(*args, cwd: Path, timeout: int = 300) -> str:
    """Run ``cxrsynth ARGS`` as two torchrun "nodes" of one process each on this machine:
    ``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on 127.0.0.1 (a free port), gloo over the
    loopback only. Both launchers are killed if either fails or the time runs out; returns
    node 0's output then node 1's."""
    import socket
    import subprocess
    import sys
    import uuid

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = Path(sys.executable).with_name("torchrun")
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex[:12], "--local-addr", "127.0.0.1",
            "-m", "cxrsynth.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    nodes = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            out, _ = node.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
                node.wait()
    assert all(node.returncode == 0 for node in nodes), "\n----\n".join(o[-3000:] for o in outputs)
    return "\n".join(outputs)


# ------------------------------------------------------------------ a tiny ingested site


def ingest_site(base: Path, rows: list[dict] | None = None, *, name: str = "cxp", size: int = 32,
                shard_size: int | None = None, images: bool = True, labels_only: bool = False,
                split: dict | None = None, raw: str = "raw", store: str | None = None) -> Path:
    """CheXpert ``rows`` (default :func:`chexpert_rows`) written under ``base/raw``, ingested as
    ``name`` into the project ``base/proj`` (``size`` px, one worker; its shards published to
    ``store``, a URL, when given) and, given ``split`` (the :class:`~cxrsynth.splits.SplitParams`
    fields), split; returns the project root."""
    from cxrsynth import ingest, splits
    from cxrsynth.imaging import Preprocess
    from cxrsynth.sources import chexpert

    csv = write_chexpert(base / raw, chexpert_rows() if rows is None else rows, images=images)
    root = base / "proj"
    options = {} if shard_size is None else {"shard_size": shard_size}
    if labels_only:
        ingest.ingest(chexpert.read(csv), root=root, name=name, kind="chexpert", inputs={}, labels_only=True, **options)
    else:
        ingest.ingest(chexpert.read(csv), root=root, name=name, kind="chexpert", inputs={}, params=Preprocess(size=size),
                      workers=1, store=store, **options)
    if split is not None:
        splits.split(root, name, splits.SplitParams(**split))
    return root


# ------------------------------------------------------------------ a micro generator and its replicas


def micro_generator(out: Path, *, seed: int = 0, data_version: str | None = None) -> Path:
    """An untrained ``micro`` generator (weights from ``seed``; the global RNG is left as it was) saved in ``out``."""
    import torch

    from cxrsynth.diffusion.model import ConditionalUNet, save_generator
    from cxrsynth.diffusion.presets import get_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ConditionalUNet.build(get_preset("micro"))
    return save_generator(net, out, **({} if data_version is None else {"data_version": data_version}))


def replica(root: Path, gen: Path, name: str, *, conditions: str = "cxp", split: str | None = "train", **config) -> dict:
    """``generate`` on the CPU: ``config`` (the :class:`~cxrsynth.diffusion.replicas.GenerateConfig` fields)
    replicas of ``conditions``' ``split`` rows as dataset ``name``; returns its summary."""
    from cxrsynth.diffusion import replicas as generate

    return generate.generate(root=root, generator_dir=gen, conditions=conditions, split=split, name=name,
                             config=generate.GenerateConfig(**config), device="cpu")


# ------------------------------------------------------------------ a tiny classifier


def cli(root: Path | None, *args, code: int = 0) -> str:
    """``cxrsynth ARGS [--root ROOT]`` in-process (200 columns); asserts the exit code, returns the output."""
    from typer.testing import CliRunner

    from cxrsynth.cli import app

    extra = [] if root is None else ["--root", str(root)]
    result = CliRunner().invoke(app, [str(a) for a in args] + extra, catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result.output


def tiny_classifier(root: Path, out: Path, *args, data: str = "cxp", epochs: int = 1, image_size: int = 32,
                    batch: int = 4, warmup: int = 1) -> Path:
    """``classifier train --preset small`` on ``data`` (one thread, ``args`` appended); returns ``out``."""
    cli(root, "classifier", "train", "--data", data, "--preset", "small", "--epochs", epochs, "--batch", batch,
        "--image-size", image_size, "--warmup", warmup, "--threads", 1, *args, "--out", out)
    return out


# ------------------------------------------------------------------ manifests without images (evaluation)

F = len(labels.FINDING_COLUMNS)
VERSION = "v1"


def make_rows(dataset: str, patients: list[str], split: str, images: int = 2, seed: int = 0,
              version: str = VERSION) -> pd.DataFrame:
    """Manifest rows: ``images`` per patient, random findings with ~8% uncertain, demographics."""
    rng = np.random.default_rng(seed)
    rows = []
    for p_i, patient in enumerate(patients):
        for i in range(images):
            row = {"key": f"{dataset}-{patient}-{split}-{i}", "dataset": dataset, "version": version, "split": split,
                   "patient_id": patient, "study_id": f"{patient}-s{i}", "sex": ["F", "M"][p_i % 2],
                   "age": [None, 34.0, 61.0, 67.0, 85.0][p_i % 5], "race": ["White", None, "Asian"][p_i % 3],
                   "view": ["AP", "PA"][i % 2], "origin": "real"}
            for j, column in enumerate(labels.FINDING_COLUMNS):
                u = rng.random()
                row[column] = -1 if u < 0.08 else int(rng.random() < 0.15 + 0.5 * (j % 3 == 0))
            rows.append(row)
    return pd.DataFrame(rows)


def patients(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def write_dataset(root: Path, name: str, frame: pd.DataFrame, version: str = VERSION, **meta) -> None:
    manifest.write(root, name, frame, {"dataset": name, "version": version, "kind": "test", **meta})


def scores_for(frame: pd.DataFrame, seed: int = 1, signal: float = 1.0) -> np.ndarray:
    """Informative float32 scores: positives higher by ``signal`` (plus noise), uncertain anywhere."""
    rng = np.random.default_rng(seed)
    y = labels.findings_matrix(frame).astype(float)
    logits = signal * np.where(y < 0, 0.5, y) + rng.normal(0, 1, y.shape)
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


def model_dict(name: str = "cxp", split: str = "train", tune_split: str | None = "tune", version: str = VERSION,
               classifier_id: str = "clf0") -> dict:
    return {"preset": "small", "config": {"epochs": 1}, "best": {"epoch": 0}, "history": [{"epoch": 0, "loss": 1.0}],
            "data": {"name": name, "version": version, "split": split, "tune_split": tune_split,
                     "datasets": {name: version}, "train_images": 10, "tune_images": 2},
            "classifier_id": classifier_id, "cxrsynth": "0.1.0"}


def write_predictions(path: Path, frame: pd.DataFrame, scores: np.ndarray, *, model: dict | None = None,
                      data: dict | None = None) -> Path:
    """A predictions parquet as `classifier predict` writes it (key, dataset, 14 float32, metadata)."""
    import json

    columns = {"key": pa.array(frame["key"].astype(str).tolist()), "dataset": pa.array(frame["dataset"].astype(str).tolist())}
    for j, column in enumerate(labels.FINDING_COLUMNS):
        columns[column] = pa.array(scores[:, j].astype(np.float32))
    table = pa.table(columns)
    meta = {"model": model or model_dict(), "data": data or {"name": "cxp", "version": VERSION, "split": "test"},
            "rows": len(frame)}
    table = table.replace_schema_metadata({b"cxrsynth": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# ------------------------------------------------------------------ the share and audit tests' project


def patient_image(patient: int, study: int, h: int = 48, w: int = 40) -> np.ndarray:
    """A per-patient smooth texture plus per-study noise: two studies of a patient look alike."""
    from scipy.ndimage import gaussian_filter

    base = gaussian_filter(np.random.default_rng(1000 + patient).normal(size=(h, w)), 2.5)
    base = 128 + 50 * base / base.std()
    noise = np.random.default_rng(10_000 + 100 * patient + study).normal(0, 8, (h, w))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@dataclass
class Project:
    root: Path
    gen: Path

    def cli(self, *args, code: int = 0) -> str:
        from typer.testing import CliRunner

        from cxrsynth.cli import app

        result = CliRunner().invoke(app, [str(a) for a in args] + ["--root", str(self.root)], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    def copy(self, to: Path) -> "Project":
        shutil.copytree(self.root, to)
        return Project(to, self.gen)


#: The plain audit: the default's first rule alone (downsampled pixels, no alignment, the combined criterion; no
#: detector rule, so no network to train). Tests whose subject is not the copy detector use it; the default (with
#: the sscd detector rule) is tested in test_audit.py with a detector trained once (`share detector`).
PLAIN_AUDIT = {"embedding": "pixels", "align": 0, "criterion": "combined", "detector": "none"}
PLAIN_AUDIT_FLAGS = ("--embedding", "pixels", "--align", 0, "--criterion", "combined", "--detector", "none")


def plain_audit(**changes):
    """:class:`~cxrsynth.share.audit.AuditConfig` of :data:`PLAIN_AUDIT` (with ``changes``)."""
    from cxrsynth.share.audit import AuditConfig

    return AuditConfig(**{**PLAIN_AUDIT, **changes})


def build_share_project(base: Path) -> Project:
    """cxp: 10 patients x 3 look-alike studies at 32 px (shards of 10), split tune 0.3; a micro
    generator recorded as trained on it; ``syn``: one one-step DDIM replica of its training split."""
    rows = chexpert_rows(n_patients=10, studies=3, uncertain=False)
    for row in rows:
        patient = int(row["Path"].split("/patient")[1][:5])
        study = int(row["Path"].split("/study")[1].split("/")[0])
        save_jpeg(base / "raw" / row["Path"], patient_image(patient, study))
    # ingest_site writes the CSV next to these images
    root = ingest_site(base, rows, images=False, shard_size=10, split={"tune": 0.3, "seed": 0})
    # trained on the split dataset, as `generator train` records it (a split is a version of its own)
    gen = micro_generator(base / "gen", data_version=f"cxp@{manifest.read_meta(root, 'cxp')['version']}")
    replica(root, gen, "syn", replicas=1, sampler="ddim", steps=1, seed=5, shard_size=32, batch_size=32)  # one forward
    return Project(root, gen)


@pytest.fixture(scope="session")
def share_project(tmp_path_factory) -> Project:
    """:func:`build_share_project`, built once per worker; read-only (tests that change it copy it)."""
    return build_share_project(tmp_path_factory.mktemp("share"))


# ------------------------------------------------------------------ a local S3-compatible server


class S3Server:
    """moto's S3 server in its own process on 127.0.0.1 (a free port), started within ``timeout``
    seconds or failing; :meth:`stop` kills it (the tests of a store going away call it mid-read).
    ``auth``: the server checks credentials (moto's IAM), refusing the tests' dummy ones."""

    def __init__(self, timeout: float = 30.0, auth: bool = False) -> None:
        import socket
        import subprocess
        import sys
        import time

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else {})}
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not start on port {self.port} within {timeout} s")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def configure(self, monkeypatch) -> None:
        """Point fsspec's ``s3://`` at this server (its configuration, as a user's would) with dummy credentials."""
        import fsspec.config

        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": self.url})

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        import fsspec

        fsspec.filesystem("s3", endpoint_url=self.url).mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server per test process, stopped at the end."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request) -> str:
    """A fresh bucket (named after the test) on the session's S3 server, fsspec configured to reach it: ``s3://<bucket>``."""
    import hashlib
    import re

    s3_server.configure(monkeypatch)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    tag = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:6]  # parametrized names differ past the cut
    return s3_server.bucket(f"{name}-{tag}-{os.getpid()}")
