"""The bad-input table: each row is one bad input a new user (or another site) may give cxrsynth.

A row names what is bad, builds the tiny input in a temporary folder, gives the command
line, and states the outcome: the exit code, a substring of the message and, for
ingests, what was rejected and kept. ``tests/test_bad_input.py`` runs every row through
typer's ``CliRunner``; ``scripts/bad-input-table.py`` prints the README's "what happens
to bad input" table from the same rows. This module imports only the standard library at
import time, so the script can load it by path; the builders import what they need.

Arguments are formatted with the paths a builder returns (``{root}``, ``{csv}``...), plus
``{tmp}``, the case's own folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
CHEXPERT_HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS)
SIDE = 32  # every image and every ingest at 32 px: the whole table runs in seconds


@dataclass(frozen=True)
class Case:
    """One bad input and what must happen.

    Attributes:
        id: Short stable name (the pytest id).
        bad: What is wrong with the input, for a reader.
        setup: ``setup(tmp) -> {placeholder: path}``: builds the input under ``tmp``.
        args: The command line after ``cxrsynth``, with ``{placeholders}``.
        exit_code: Expected exit status.
        message: A substring the output (stdout + stderr) must contain.
        outcome: The outcome in words, for the README table.
        env: Environment variables for the run.
        rejected: For ingests: ``{reason: count}`` in the rejects ledger.
        kept: For ingests: rows in the manifest.
        check: ``check(paths, output)``: a further assertion after the run (e.g. no file created).
    """

    id: str
    bad: str
    setup: Callable[[Path], dict]
    args: tuple[str, ...]
    exit_code: int
    message: str
    outcome: str
    env: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, int] | None = None
    kept: int | None = None
    check: Callable[[dict, str], None] | None = None

    def command(self) -> str:
        """The command line as a user types it (placeholders kept; ``--root {root}`` left out)."""
        args = list(self.args)
        if args[-2:] == ["--root", "{root}"]:
            args = args[:-2]
        return "cxrsynth " + " ".join(a if a and " " not in a and a.isprintable() else json.dumps(a) for a in args)


# ---------------------------------------------------------------------------------------
# Builders for values that make garbage: non-finite or out-of-range numbers, NaN weights,
# diverging training, labels that leave nothing to learn, tuning on the training rows.


def _garbage_site(tmp: Path, labels: str = "certain") -> dict:
    """A project with ``cxp`` (4 patients, one 32 px image each) split 3 train / 1 tune.

    ``labels``: ``certain`` (No Finding positive, the rest blank), ``all-uncertain`` (every
    finding -1 in every row) or ``edema-uncertain`` (Edema -1 in every row, the rest certain).
    """
    import csv

    from cxrsynth import ingest, splits
    from cxrsynth.imaging import Preprocess
    from cxrsynth.sources import chexpert

    paths = _chexpert_tree(tmp, n=4)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    first = len(CHEXPERT_HEADER) - len(FINDINGS)
    for row in rows[1:]:
        if labels == "all-uncertain":
            row[first:] = ["-1.0"] * len(FINDINGS)
        elif labels == "edema-uncertain":
            row[first + FINDINGS.index("Edema")] = "-1.0"
    with open(paths["csv"], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    ingest.ingest(chexpert.read(paths["csv"]), root=paths["root"], name="cxp", kind="chexpert", inputs={},
                  params=Preprocess(size=SIDE), workers=1)
    splits.split(paths["root"], "cxp", splits.SplitParams(tune=0.25, seed=0))
    return {**paths, "work": tmp}


def _garbage_all_uncertain(tmp: Path) -> dict:
    return _garbage_site(tmp, "all-uncertain")


def _garbage_edema_uncertain(tmp: Path) -> dict:
    return _garbage_site(tmp, "edema-uncertain")


def _micro_generator(out: Path, nan: bool = False) -> Path:
    """An untrained ``micro`` generator in ``out``; ``nan``: then one weight set to NaN in its safetensors file."""
    import torch
    from safetensors.torch import load_file, save_file

    from cxrsynth.diffusion.model import ConditionalUNet, save_generator
    from cxrsynth.diffusion.presets import get_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_generator(ConditionalUNet.build(get_preset("micro")), out)
    if nan:
        (weights,) = out.glob("*.safetensors")
        state = load_file(str(weights))
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name][0] = float("nan")
        save_file(state, str(weights), metadata={"format": "pt"})
    return out


def _garbage_site_generator(tmp: Path) -> dict:
    return {**_garbage_site(tmp), "gen": _micro_generator(tmp / "gen")}


def _garbage_site_nan_generator(tmp: Path) -> dict:
    return {**_garbage_site(tmp), "gen": _micro_generator(tmp / "gen", nan=True)}


def _garbage_site_nan_weights(tmp: Path) -> dict:
    """The site and ``weights.safetensors``: a small state dict with one infinite value."""
    import torch
    from safetensors.torch import save_file

    weights = tmp / "weights.safetensors"
    save_file({"conv1.weight": torch.tensor([[1.0, float("inf")]]), "fc.bias": torch.zeros(14)}, str(weights))
    return {**_garbage_site(tmp), "weights": weights}


def _garbage_site_nan_classifier(tmp: Path) -> dict:
    """The site and ``clf/``: a classifier directory (the small preset at 32 px) whose weights hold a NaN."""
    from safetensors.torch import save_file

    from cxrsynth.classify.model import META, WEIGHTS, build
    from cxrsynth.classify.presets import get_preset

    config = get_preset("small", image_size=SIDE)
    state = {k: v.clone().contiguous() for k, v in build(config).net.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    (tmp / "clf").mkdir()
    save_file(state, str(tmp / "clf" / WEIGHTS), metadata={"format": "pt"})
    (tmp / "clf" / META).write_text(json.dumps({"config": config.to_dict(), "classifier_id": "0" * 12}))
    return {**_garbage_site(tmp), "model": tmp / "clf"}


def _safetensors_bytes(tensors: dict) -> bytes:
    import torch
    from safetensors.torch import save

    return save({k: torch.tensor(v) for k, v in tensors.items()})


def _classifier_dir(meta: bytes | None = None, weights: bytes | None = None):
    """The site and ``clf/``: a valid classifier directory (small preset, 32 px, untrained), then
    ``classifier.json`` replaced by ``meta`` and/or ``model.safetensors`` by ``weights``."""

    def build(tmp: Path) -> dict:
        from safetensors.torch import save_file

        from cxrsynth.classify.model import META, WEIGHTS, build
        from cxrsynth.classify.presets import get_preset

        config = get_preset("small", image_size=SIDE)
        (tmp / "clf").mkdir()
        state = {k: v.contiguous() for k, v in build(config).net.state_dict().items()}
        save_file(state, str(tmp / "clf" / WEIGHTS), metadata={"format": "pt"})
        if weights is not None:
            good = (tmp / "clf" / WEIGHTS).read_bytes()
            (tmp / "clf" / WEIGHTS).write_bytes(good[: len(good) // 2] if weights == b"TRUNCATE" else weights)
        text = json.dumps({"config": config.to_dict(), "classifier_id": "0" * 12}).encode()
        (tmp / "clf" / META).write_bytes(text if meta is None else meta)
        return {**_garbage_site(tmp), "model": tmp / "clf"}

    return build


def _ckpt_nan(tmp: Path) -> dict:
    """A Mediffusion checkpoint that fits :func:`_mediffusion_config` but holds a NaN weight."""
    adm = adm_state_dict(32)
    name = next(k for k in adm if k.endswith(".weight"))
    adm[name] = adm[name].clone()
    adm[name].view(-1)[0] = float("nan")
    return {**_checkpoint(tmp, {"state_dict": {f"model.{k}": v for k, v in adm.items()}}), "work": tmp}


def _fid_checkpoint_nan(tmp: Path) -> dict:
    import torch

    torch.save({"state_dict": {"conv1.weight": torch.tensor([1.0, float("nan")])}}, tmp / "classifier.pt")
    return {"ckpt": tmp / "classifier.pt", "root": tmp}


def _params_file(classifier: dict):
    def build(tmp: Path) -> dict:
        root = tmp / "proj"
        root.mkdir(parents=True, exist_ok=True)
        lines = ["study: {real: cxp, tests: [cxp]}", "classifier:"]
        lines += [f"  {k}: {v}" for k, v in classifier.items()]
        (root / "params.yaml").write_text("\n".join(lines) + "\n")
        return {"root": root}

    return build


def _truncated_cell(tmp: Path) -> dict:
    """The repository's params.yaml and the real-only cell's metrics cut off mid-JSON."""
    root = tmp / "proj"
    (root / "metrics" / "study").mkdir(parents=True)
    (root / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    (root / "metrics" / "study" / "supplement_k0.json").write_text('{"cell": "supplement_k0", "evaluations": [{"auro')
    return {"root": root}


def _no_dataset(name: str):
    def check(paths: dict, output: str) -> None:
        from cxrsynth import manifest

        assert not manifest.manifest_path(paths["root"], name).exists(), f"{name} was published"

    return check


def _wrote_none(*files: str):
    """Check that none of ``files`` (relative to the case's folder) was written."""
    def check(paths: dict, output: str) -> None:
        written = [f for f in files if (paths["work"] / f).exists()]
        assert not written, f"written: {written}"

    return check


def _images_not_black(paths: dict, output: str) -> None:
    """Every image of the published dataset ``s`` has some non-zero pixel (a NaN sample decodes to black)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from cxrsynth import manifest

    meta = manifest.read_meta(paths["root"], "s")
    images = []
    for shard in sorted((paths["root"] / "data" / "shards" / "s" / meta["version"]).glob("*.tar")):
        with tarfile.open(shard) as tar:
            images += [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))) for m in tar if m.name.endswith(".png")]
    assert images and all(image.any() for image in images), f"{sum(not i.any() for i in images)} of {len(images)} black"


_CLASSIFIER = ("classifier", "train", "--data", "cxp", "--out", "{tmp}/clf", "--preset", "small", "--image-size", "32",
               "--epochs", "2", "--batch", "2", "--threads", "1")
_GENERATE = ("generate", "--generator", "{gen}", "--conditions", "cxp", "--name", "s", "--steps", "2", "--batch", "4",
             "--threads", "1")


# ---------------------------------------------------------------------------------------
# Builders of tiny inputs.


def _image(seed: int, side: int = SIDE):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (side, side), dtype=np.uint8)


def _save_png(path: Path, image) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")


def _chexpert_tree(tmp: Path, n: int = 3, suffix: str = ".png") -> dict:
    """``tmp/raw/train.csv`` with ``n`` patients, one PNG image each (32 px)."""
    import csv

    raw = tmp / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(1, n + 1):
        rel = f"train/patient{p:05d}/study1/view1_frontal{suffix}"
        rows.append([rel, "Female", str(40 + p), "Frontal", "AP", *(["1.0"] + [""] * 13)])
        if suffix == ".png":
            _save_png(raw / rel, _image(p))
    with open(raw / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CHEXPERT_HEADER)
        writer.writerows(rows)
    return {"csv": raw / "train.csv", "raw": raw, "root": tmp / "proj"}


def _ingested(tmp: Path, name: str = "cxp") -> dict:
    """A project with dataset ``name`` ingested from :func:`_chexpert_tree` (1 shard)."""
    from cxrsynth import ingest, manifest
    from cxrsynth.imaging import Preprocess
    from cxrsynth.sources import chexpert

    paths = _chexpert_tree(tmp)
    ingest.ingest(chexpert.read(paths["csv"]), root=paths["root"], name=name, kind="chexpert", inputs={},
                  params=Preprocess(size=SIDE), workers=1)
    meta = manifest.read_meta(paths["root"], name)
    shard_dir = paths["root"] / "data" / "shards" / name / meta["version"]
    return {**paths, "manifest": manifest.manifest_path(paths["root"], name), "shards": shard_dir}


def _png16_header_only(path: Path, width: int, height: int) -> None:
    """A 16-bit grayscale PNG whose header claims ``width x height`` with almost no data:
    a decompression bomb's cheap stand-in (the size check must come before decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 2 * width) * 4)  # 4 rows of zeros, the rest missing
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _ingest_bomb(tmp: Path) -> dict:
    paths = _chexpert_tree(tmp)
    _png16_header_only(paths["raw"] / "train/patient00002/study1/view1_frontal.png", 13000, 13000)
    return paths


def _ingest_over_limit(tmp: Path) -> dict:
    import numpy as np
    from PIL import Image

    paths = _chexpert_tree(tmp)
    big = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(big).save(paths["raw"] / "train/patient00001/study1/view1_frontal.png")  # 16-bit, 4096 px
    return paths


def _ingest_dicom_over_limit(tmp: Path) -> dict:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    paths = _chexpert_tree(tmp, n=2)
    text = paths["csv"].read_text().replace("patient00002/study1/view1_frontal.png", "patient00002/study1/view1_frontal.dcm")
    paths["csv"].write_text(text)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bad-input"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CR", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 64, 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
    path = paths["raw"] / "train/patient00002/study1/view1_frontal.dcm"
    ds.save_as(path, enforce_file_format=True)
    return paths


def _csv_empty(tmp: Path) -> dict:
    (tmp / "train.csv").write_bytes(b"")
    return {"csv": tmp / "train.csv", "root": tmp / "proj"}


def _csv_latin1(tmp: Path) -> dict:
    paths = _chexpert_tree(tmp, n=2)
    text = paths["csv"].read_text().replace("Female", "Féminin")  # é as Latin-1: byte 0xe9
    paths["csv"].write_bytes(text.encode("latin-1"))
    table = tmp / "inhouse.csv"
    header = "path,patient," + ",".join(f'"{f}"' for f in FINDINGS)
    row = "train/patient00001/study1/view1_frontal.png,Müller," + ",".join(["0"] * 14)
    table.write_bytes(f"{header}\n{row}\n".encode("latin-1"))
    return {**paths, "table": table}


def _truncated_manifest(tmp: Path) -> dict:
    paths = _ingested(tmp)
    data = paths["manifest"].read_bytes()
    paths["manifest"].write_bytes(data[: len(data) // 2])
    return paths


def _empty_manifest(tmp: Path) -> dict:
    paths = _ingested(tmp)
    paths["manifest"].write_bytes(b"")
    return paths


def _invalid_index(tmp: Path) -> dict:
    paths = _ingested(tmp)
    (paths["shards"] / "index.json").write_text('{"shards": [{"name": ')
    return paths


def _junk_manifest(tmp: Path) -> dict:
    paths = _ingested(tmp)
    (paths["root"] / "manifests" / "junk.parquet").write_bytes(b"this is not parquet\n")
    return paths


def _corrupt_png_in_shard(tmp: Path) -> dict:
    """Overwrite the first PNG member of the shard with same-length garbage (tar stays valid)."""
    import tarfile

    paths = _ingested(tmp)
    shard = paths["shards"] / "cxp-000000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data[member.offset_data : member.offset_data + member.size] = b"\x00" * member.size
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    return {**paths, "key": member.name[: -len(".png")], "shard": shard.name}


def _mediffusion_config(tmp: Path, text: str | None = None) -> Path:
    path = tmp / "config.yaml"
    path.write_text(text if text is not None else (
        "model:\n  input_size: 32\n  num_classes: 22\n  model_channels: 32\n  channel_mult: [1, 2]\n"
        "  num_res_blocks: [1, 1]\n  attention_resolutions: [2]\n"))
    return path


class _Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint(tmp: Path, obj=None, raw: bytes | None = None) -> dict:
    path = tmp / "model.ckpt"
    if raw is not None:
        path.write_bytes(raw)
    else:
        import torch

        torch.save(obj, path)
    return {"ckpt": path, "config": _mediffusion_config(tmp), "out": tmp / "gen", "marker": tmp / "PWNED"}


def _ckpt_payload(tmp: Path) -> dict:
    import torch

    marker = tmp / "PWNED"
    return _checkpoint(tmp, {"state_dict": {"model.out.2.weight": torch.zeros(1)}, "hyper_parameters": _Payload(marker)})


def _ckpt_random(tmp: Path) -> dict:
    import random

    return _checkpoint(tmp, raw=random.Random(0).randbytes(4096))


def _ckpt_empty(tmp: Path) -> dict:
    return _checkpoint(tmp, raw=b"")


def _ckpt_tensor(tmp: Path) -> dict:
    import torch

    return _checkpoint(tmp, torch.zeros(3, 3))


def _ckpt_no_state_dict(tmp: Path) -> dict:
    return _checkpoint(tmp, {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.0.0"})


def adm_state_dict(model_channels: int = 32):
    """An ADM (Mediffusion ``UNetModel``) state dict for :func:`_mediffusion_config`'s layout,
    built by mapping a cxrsynth network's keys back (shapes only matter here)."""
    import torch

    from cxrsynth.diffusion.mediffusion import config_from_mediffusion, key_map
    from cxrsynth.diffusion.model import ConditionalUNet

    raw = {"model": {"input_size": 32, "num_classes": 22, "model_channels": model_channels, "channel_mult": [1, 2],
                     "num_res_blocks": [1, 1], "attention_resolutions": [2]}}
    config = config_from_mediffusion(raw)
    ours = ConditionalUNet.build(config).state_dict()
    prefixes, attn = key_map(config)
    back = {dst: src for src, dst in prefixes.items()}
    adm = {"null_cls_embed": ours["null_embed"]}
    for key, value in ours.items():
        module, _, leaf = key.rpartition(".")
        if module in back:
            adm[f"{back[module]}.{leaf}"] = value
    for src, dst in attn:
        qkv = [ours[f"{dst}.to_{x}.weight"] for x in "qkv"]
        adm[f"{src}.qkv.weight"] = torch.cat(qkv)[..., None]  # (3C, C, 1)
        adm[f"{src}.qkv.bias"] = torch.cat([ours[f"{dst}.to_{x}.bias"] for x in "qkv"])
        adm[f"{src}.norm.weight"], adm[f"{src}.norm.bias"] = ours[f"{dst}.group_norm.weight"], ours[f"{dst}.group_norm.bias"]
        adm[f"{src}.proj_out.weight"] = ours[f"{dst}.to_out.0.weight"][..., None]
        adm[f"{src}.proj_out.bias"] = ours[f"{dst}.to_out.0.bias"]
    return adm


def _ckpt_wrong_shape(tmp: Path) -> dict:
    return _checkpoint(tmp, {"state_dict": {f"model.{k}": v for k, v in adm_state_dict(64).items()}})


def _ckpt_missing_keys(tmp: Path) -> dict:
    adm = adm_state_dict(32)
    return _checkpoint(tmp, {"state_dict": {f"model.{k}": v for k, v in adm.items() if not k.startswith("middle_block.1.")}})


def _config_invalid_yaml(tmp: Path) -> dict:
    paths = _checkpoint(tmp, {"state_dict": adm_state_dict(32)})
    return {**paths, "config": _mediffusion_config(tmp, "model: [unclosed\n  input_size: 32\n")}


def _fid_checkpoint_payload(tmp: Path) -> dict:
    import torch

    marker = tmp / "PWNED"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": _Payload(marker)}, tmp / "classifier.pt")
    return {"ckpt": tmp / "classifier.pt", "root": tmp, "marker": marker}


def _fid_inception_random(tmp: Path) -> dict:
    (tmp / "inception.pth").write_bytes(b"\x80\x02not really a pickle")
    return {"weights": tmp / "inception.pth", "root": tmp}


def _generator_bad_json(tmp: Path) -> dict:
    (tmp / "gen").mkdir()
    (tmp / "gen" / "generator.json").write_text("{ not json")
    return {"gen": tmp / "gen"}


def _marker_absent(paths: dict, output: str) -> None:
    assert not paths["marker"].exists(), "the pickle payload ran: the marker file was created"


def _names_shard(paths: dict, output: str) -> None:
    assert paths["shard"] in output and paths["key"] in output, output


def _nothing(tmp: Path) -> dict:
    return {"root": tmp / "proj", "csv": tmp / "train.csv"}


def _no_root(tmp: Path) -> dict:
    return {"missing": tmp / "does-not-exist"}


# ---------------------------------------------------------------------------------------
# Builders for data integrity: versions, locks, orphans, sources, names, keys, values,
# paths, verification.


def _tree_uncompressed(tmp: Path) -> dict:
    """:func:`_chexpert_tree` with PNGs stored uncompressed: any two images have the same byte size."""
    from PIL import Image

    paths = _chexpert_tree(tmp)
    for p in range(1, 4):
        path = paths["raw"] / f"train/patient{p:05d}/study1/view1_frontal.png"
        Image.fromarray(_image(p)).save(path, format="PNG", compress_level=0)
    return paths


def _replace_same_size(path: Path, seed: int) -> None:
    """Overwrite an uncompressed PNG with other pixels of the same byte size, and restore its mtime."""
    from PIL import Image

    before = path.stat()
    Image.fromarray(_image(seed)).save(path, format="PNG", compress_level=0)
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _ingest_lib(paths: dict, name: str = "cxp", size: int = SIDE, **kw) -> str:
    from cxrsynth import ingest, manifest
    from cxrsynth.imaging import Preprocess
    from cxrsynth.sources import chexpert

    ingest.ingest(chexpert.read(paths["csv"]), root=paths["root"], name=name, kind="chexpert", inputs={},
                  params=Preprocess(size=size), workers=1, **kw)
    return manifest.read_meta(paths["root"], name)["version"]


def _changed_same_size(tmp: Path) -> dict:
    paths = _tree_uncompressed(tmp)
    version = _ingest_lib(paths)
    _replace_same_size(paths["raw"] / "train/patient00002/study1/view1_frontal.png", seed=99)
    return {**paths, "old_version": version}


def _version_changed(paths: dict, output: str) -> None:
    from cxrsynth import manifest

    new = manifest.read_meta(paths["root"], "cxp")["version"]
    assert new != paths["old_version"], "same version for other image bytes"
    _assert_shard_holds(paths, "train_patient00002_study1_view1_frontal", seed=99)


def _assert_shard_holds(paths: dict, key: str, seed: int) -> None:
    """The manifest's shard for ``key`` holds the image of ``seed`` (preprocessed as the ingest does)."""
    import tarfile

    import numpy as np

    from cxrsynth import manifest
    from cxrsynth.imaging import Preprocess, decode_png, preprocess

    frame = manifest.read(paths["root"], "cxp").set_index("key")
    with tarfile.open(paths["root"] / frame.loc[key, "shard"]) as tar:
        stored = decode_png(tar.extractfile(f"{key}.png").read())
    assert np.array_equal(stored, preprocess(_image(seed), Preprocess(size=SIDE))), "the shard holds the old image"


def _named_changed(tmp: Path) -> dict:
    paths = _tree_uncompressed(tmp)
    _ingest_lib(paths, version="v1")
    _replace_same_size(paths["raw"] / "train/patient00002/study1/view1_frontal.png", seed=99)
    return paths


def _unit_redone(paths: dict, output: str) -> None:
    assert "reused" not in output, output
    _assert_shard_holds(paths, "train_patient00002_study1_view1_frontal", seed=99)


def _stale_digest_cache(tmp: Path) -> dict:
    """An ingest, then its digest cache made to hold a wrong digest for one image whose stat it matches
    (what an unnoticed change of the file would look like), and a clean ingest to compare with."""
    import shutil

    import pandas as pd

    paths = _tree_uncompressed(tmp)
    _ingest_lib(paths)
    cache = paths["root"] / "data" / ".cxrsynth" / "digests" / "cxp.parquet"
    if cache.is_file():
        table = pd.read_parquet(cache)
        table.loc[0, "sha256"] = "0" * 64
        table.to_parquet(cache, index=False)
    fresh = {**paths, "root": tmp / "fresh"}
    shutil.copytree(paths["raw"], tmp / "raw2")
    version = _ingest_lib({**fresh, "csv": tmp / "raw2" / "train.csv"})
    return {**paths, "fresh_version": version}


def _same_as_fresh(paths: dict, output: str) -> None:
    from cxrsynth import manifest

    assert manifest.read_meta(paths["root"], "cxp")["version"] == paths["fresh_version"]


_HOLD = """
import sys, time
from cxrsynth.publish import writer_lock
with writer_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def _held_by_other(tmp: Path, name: str = "cxp", build=None) -> dict:
    """``build(tmp)``'s project, with dataset ``name``'s writer lock held by another process."""
    import subprocess
    import sys

    paths = (build or _chexpert_tree)(tmp)
    paths["root"].mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(paths["root"]), name], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()  # "held" (or nothing, if the holder could not take the lock)
    return {**paths, "holder": holder}


def _names_holder(paths: dict, output: str) -> None:
    holder = paths["holder"]
    try:
        assert f"PID {holder.pid}" in output, output
    finally:
        holder.kill()
        holder.wait()


def _ingested_held(tmp: Path) -> dict:
    return _held_by_other(tmp, build=_ingested)


_KILL_IMAGES, _KILL_SIZE = 40, 256


def _killed_ingest(tmp: Path) -> dict:
    """An ingest with 2 workers killed with SIGKILL once its first shard is done; the workers it had."""
    import signal
    import subprocess
    import sys
    import time

    paths = _chexpert_tree(tmp, n=_KILL_IMAGES)
    args = [sys.executable, "-m", "cxrsynth", "ingest", "chexpert", str(paths["csv"]), "--name", "cxp", "--size",
            str(_KILL_SIZE), "--shard-size", "2", "--workers", "2", "--root", str(paths["root"])]
    ingest = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards_dir, deadline = paths["root"] / "data" / "shards" / "cxp", time.monotonic() + 60
    while time.monotonic() < deadline and ingest.poll() is None and not list(shards_dir.glob("*/.progress/*.tar.json")):
        time.sleep(0.01)
    workers = _children(ingest.pid)  # the first shard is done: the pool is up, the other shards are being written
    ingest.send_signal(signal.SIGKILL)
    ingest.wait()
    midway = not (paths["root"] / "manifests" / "cxp.parquet").exists()
    reference = {**paths, "root": tmp / "reference"}
    _ingest_lib({**reference, "csv": paths["csv"]}, size=_KILL_SIZE, shard_size=2)
    return {**paths, "workers": workers, "reference": reference["root"], "midway": midway}


def _children(pid: int) -> set[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _workers_died_rerun_identical(paths: dict, output: str) -> None:
    import os
    import signal
    import time

    assert paths["workers"] and paths["midway"], "the ingest was not killed while its workers ran"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in paths["workers"]):
        time.sleep(0.05)
    survivors = [p for p in paths["workers"] if _alive(p)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"worker(s) {survivors} outlived the killed ingest"
    mine, theirs = (sorted(p.relative_to(r) for p in (r / "data" / "shards").rglob("*") if p.is_file() and p.suffix != ".lock")
                    for r in (paths["root"], paths["reference"]))
    assert mine == theirs, (mine, theirs)
    for rel in mine:
        assert (paths["root"] / rel).read_bytes() == (paths["reference"] / rel).read_bytes(), rel
    import pyarrow.parquet as pq

    mine, theirs = (pq.read_table(r / "manifests/cxp.parquet") for r in (paths["root"], paths["reference"]))
    assert mine.equals(theirs)  # the same rows (the metadata records the command's inputs)


def _ingested_split(tmp: Path) -> dict:
    from cxrsynth import splits

    paths = _ingested(tmp)
    splits.split(paths["root"], "cxp", splits.SplitParams(tune=0.34, seed=0))
    return paths


def _still_real(paths: dict, output: str) -> None:
    import pandas as pd

    from cxrsynth import manifest

    assert manifest.read_meta(paths["root"], "cxp")["kind"] == "chexpert"
    assert len(pd.read_parquet(manifest.rejects_path(paths["root"], "cxp")).columns) == 5


def _with_mix(tmp: Path) -> dict:
    from cxrsynth import mix

    paths = _ingested_split(tmp)
    mix.mix(paths["root"], "m", mix.MixParams(real="cxp", seed=0))
    return paths


def _m_is_real(paths: dict, output: str) -> None:
    from cxrsynth import manifest

    assert manifest.read_meta(paths["root"], "m")["kind"] == "chexpert"


def _mix_of_itself(tmp: Path) -> dict:
    """Dataset ``cxp`` rewritten as a mix whose source is ``cxp`` (what ``mix --real cxp --name cxp`` used to write)."""
    from cxrsynth import manifest

    paths = _ingested_split(tmp)
    frame = manifest.read(paths["root"], "cxp")
    meta = manifest.read_meta(paths["root"], "cxp")
    manifest.write(paths["root"], "cxp", frame, {"dataset": "cxp", "version": "mixed", "kind": "mix",
                                                  "sources": {"cxp": meta["version"]}, "params": {}})
    return paths


def _ingest_as(name: str, *options: str) -> tuple[str, ...]:
    return ("ingest", "chexpert", "{csv}", "--name", name, *options, "--size", str(SIDE), "--workers", "1", "--root", "{root}")


def _table(tmp: Path, files: list[str], *, splits: list[str] | None = None, paths: list[str] | None = None,
           make: bool = True) -> dict:
    """``tmp/site/table.csv``: one row per file (patients p1, p2...), images under ``tmp/site``."""
    import csv

    site = tmp / "site"
    site.mkdir(parents=True, exist_ok=True)
    header = ["path", "patient", *(["split"] if splits else []), *FINDINGS]
    with open(site / "table.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, name in enumerate(files):
            writer.writerow([(paths or files)[i], f"p{i + 1}", *([splits[i]] if splits else []), *(["1"] + ["0"] * 13)])
            if make:
                _save_png(site / name, _image(10 + i))
    return {"table": site / "table.csv", "site": site, "root": tmp / "proj"}


def _ingest_table(*options: str) -> tuple[str, ...]:
    return ("ingest", "table", "{table}", "--map", "path=path", "--map", "patient=patient_id", *options, "--name", "cxp",
            "--size", str(SIDE), "--workers", "1", "--root", "{root}")


def _path_leading_space(tmp: Path) -> dict:
    """Rows 'a.png' and ' a.png': only a.png exists."""
    return _table(tmp, ["a.png", "a.png", "b.png"], paths=["a.png", " a.png", "b.png"])


def _keys_normalised_alike(tmp: Path) -> dict:
    return _table(tmp, ["a b é.png", "a_b_è.png", "clean_name.png"])


def _keys_extension_only(tmp: Path) -> dict:
    return _table(tmp, ["x.png", "x.jpg", "y.png"])


def _keys(expected_plain: tuple[str, ...], distinct: int):
    def check(paths: dict, output: str) -> None:
        from cxrsynth import manifest

        keys = manifest.read(paths["root"], "cxp")["key"].tolist()
        assert len(set(keys)) == distinct and all(k in keys for k in expected_plain), keys
        assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for k in keys), keys

    return check


def _chexpert_values(tmp: Path, values: list[tuple[str, str]], demographics: list[tuple[str, str, str]] | None = None) -> dict:
    """:func:`_chexpert_tree` with the rows' (Sex, Age) replaced, and an optional demographics file."""
    import csv

    paths = _chexpert_tree(tmp, n=len(values))
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    for row, (sex, age) in zip(rows[1:], values):
        row[1], row[2] = sex, age
    with open(paths["csv"], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    if demographics is not None:
        demo = tmp / "demo.csv"
        with open(demo, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE"])
            writer.writerows([(f"patient{i + 1:05d}", *d) for i, d in enumerate(demographics)])
        paths["demo"] = demo
    return paths


def _age_300(tmp: Path) -> dict:
    return _chexpert_values(tmp, [("Female", "41"), ("Female", "300"), ("Male", "43")])


def _age_negative_text(tmp: Path) -> dict:
    return _chexpert_values(tmp, [("Female", "-5"), ("Female", "abc"), ("Male", "43")])


def _sex_x(tmp: Path) -> dict:
    return _chexpert_values(tmp, [("X", "41"), ("Female", "42"), ("Male", "43")])


def _age_text_with_demographics(tmp: Path) -> dict:
    return _chexpert_values(tmp, [("Female", "abc"), ("Female", "42"), ("Male", "43")],
                            [("Female", "50", "White"), ("Female", "42", "White"), ("Male", "43", "Asian")])


def _age_zero_with_demographics(tmp: Path) -> dict:
    return _chexpert_values(tmp, [("Female", "0"), ("Female", "42"), ("Male", "43")],
                            [("Female", "61", "White"), ("Female", "42", "White"), ("Male", "43", "Asian")])


def _recorded(normalized: dict, **expected):
    def check(paths: dict, output: str) -> None:
        from cxrsynth import manifest

        frame = manifest.read(paths["root"], "cxp")
        assert manifest.read_meta(paths["root"], "cxp")["normalized"] == normalized
        for column, values in expected.items():
            assert sorted(frame[column].dropna().tolist()) == sorted(values), frame[column].tolist()

    return check


def _table_split(value: str):
    def build(tmp: Path) -> dict:
        return _table(tmp, ["a.png", "b.png", "c.png"], splits=[value, "train", "test"])

    return build


def _mimic_conflicting_labels(tmp: Path) -> dict:
    """A MIMIC-CXR-JPG tree of 3 studies (one image each) whose label table lists study 2 twice, differently."""
    import csv

    from PIL import Image

    site = tmp / "mimic"
    site.mkdir(parents=True)
    meta, labels_rows = [], []
    for i in range(3):
        subject, study, dicom = f"1000000{i}", f"5000000{i}", f"d{i:07d}-0000"
        meta.append([dicom, subject, study, "PA"])
        labels_rows.append([subject, study, *(["1.0"] + [""] * 13)])
        path = site / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        path.parent.mkdir(parents=True)
        Image.fromarray(_image(20 + i)).save(path, format="JPEG")
    labels_rows.append(["10000001", "50000001", *(["0.0", "1.0"] + [""] * 12)])  # study 2 again, other labels
    for name, header, rows in (("metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta),
                               ("chexpert.csv", ["subject_id", "study_id", *sorted(FINDINGS)], labels_rows)):
        with open(site / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return {"meta": site / "metadata.csv", "labels": site / "chexpert.csv", "root": tmp / "proj"}


def _path_escapes(tmp: Path) -> dict:
    return _table(tmp, ["a.png", "b.png", "../outside.png"])  # the third image is written beside site/, not in it


def _chexpert_escapes(tmp: Path) -> dict:
    paths = _chexpert_tree(tmp, n=2)
    rel = "train/patient00003/study1/view1_frontal.png"
    _save_png(tmp / "elsewhere" / rel, _image(3))
    with open(paths["csv"], "a") as f:
        f.write(f"../elsewhere/{rel},Female,43,Frontal,AP,1.0" + "," * 13 + "\n")
    return paths


def _symlink_outside(tmp: Path) -> dict:
    paths = _table(tmp, ["a.png", "b.png", "link.png"], make=False)
    _save_png(paths["site"] / "a.png", _image(10))
    _save_png(paths["site"] / "b.png", _image(11))
    _save_png(tmp / "secret" / "outside.png", _image(12))
    (paths["site"] / "link.png").symlink_to(tmp / "secret" / "outside.png")
    return paths


def _edited_manifest(column: str, value):
    """:func:`_ingested` with one manifest cell changed the way pandas would (metadata kept)."""
    def build(tmp: Path) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths = _ingested(tmp)
        table = pq.read_table(paths["manifest"])
        values = table.column(column).to_pylist()
        values[1] = value
        index = table.column_names.index(column)
        table = table.set_column(index, column, pa.array(values, type=table.schema.field(column).type))
        pq.write_table(table, paths["manifest"])
        return {**paths, "key": table.column("key")[1].as_py()}

    return build


def _names(*words: str):
    def check(paths: dict, output: str) -> None:
        text = " ".join(output.split())
        for word in words:
            assert word.format(**paths) in text, (word, output)

    return check


def _imported_in_place(tmp: Path) -> dict:
    """A synthetic dataset (rows and shards written directly, no generator), exported, then
    imported in place as ``imp`` (its rows point into the package folder)."""
    import numpy as np
    import pandas as pd

    from cxrsynth import manifest, publish, shards
    from cxrsynth.share import export, importer
    from cxrsynth.share.audit import AuditConfig

    root = tmp / "proj"
    rows = pd.DataFrame({"key": [f"syn-r00-{i:07d}" for i in range(4)], "dataset": "syn", "version": "v1", "split": "train",
                         "sex": "F", "age": 45.0, "view": "AP", **{c: 0 for c in _finding_columns()}, "origin": "synthetic",
                         "replica": 0, "seed": list(range(4)), "guidance": 1.0, "sampler": "ddim", "steps": 1,
                         "generator_id": "g"})
    directory = shards.shard_dir(root, "syn", "v1")
    records = shards.sample_records(rows)
    result = shards.write_shard(directory, "syn", 0, [shards.encode_sample(r, _image(30 + i)) for i, r in enumerate(records)])
    publish.publish(root, publish.Metadata("syn", "v1", "synthetic", {"split": "train", "generator_id": "g"}), rows,
                    shard_results=[result])
    package = root / "pkg"
    export.export(root, "syn", package, export.ExportConfig(force=True, audit=AuditConfig(embedding="pixels", align=0),
                                                                audit_out=tmp / "audit"))
    importer.import_package(root, package, "imp")
    assert manifest.read(root, "imp")["shard"].str.startswith("pkg/").all()
    np.testing.assert_equal(len(manifest.read(root, "imp")), 4)
    return {"root": root}


def _finding_columns() -> list[str]:
    import re

    return [re.sub(r"[^a-z0-9]+", "_", f.lower()).strip("_") for f in FINDINGS]


def _train_corrupt_png(tmp: Path) -> dict:
    from cxrsynth import splits

    paths = _corrupt_png_in_shard(tmp)
    splits.split(paths["root"], "cxp", splits.SplitParams(tune=0.0, seed=0))
    return paths


def _data_is_a_file(tmp: Path) -> dict:
    paths = _chexpert_tree(tmp)
    paths["root"].mkdir(parents=True)
    (paths["root"] / "data").write_text("not a folder\n")
    return paths


# ---------------------------------------------------------------------------------------
# The table.

_IMPORT = ("generator", "import-mediffusion", "{ckpt}", "--config", "{config}", "--out", "{out}")


def _ingest(*options: str) -> tuple[str, ...]:
    """``ingest chexpert`` of ``{csv}`` as ``cxp`` at 32 px in-process, ``options`` first."""
    given = set(options[::2])
    defaults = [o for opt, v in (("--size", str(SIDE)), ("--workers", "1")) if opt not in given for o in (opt, v)]
    return ("ingest", "chexpert", "{csv}", "--name", "cxp", *options, *defaults, "--root", "{root}")


_INGEST = _ingest()

# --- wrong answers reported as right: verify, compare, evaluate, study compare, names ---------


def _split_with_test(tmp: Path) -> dict:
    """:func:`_ingested` split with a test patient (1 of 3), so rows can be moved out of test."""
    from cxrsynth import splits

    paths = _ingested(tmp)
    splits.split(paths["root"], "cxp", splits.SplitParams(tune=0.0, test=0.34, seed=0))
    return paths


def _rewrite_by_duckdb(paths: dict, select: str) -> dict:
    """Rewrite the manifest in place with DuckDB's ``COPY (SELECT {select} ...) TO``, which drops
    the parquet metadata, the recorded checksum with it."""
    import duckdb

    moved = paths["manifest"].with_name("moved.parquet")
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT {select} FROM read_parquet('{paths['manifest']}')) TO '{moved}' (FORMAT parquet)")
    os.replace(moved, paths["manifest"])
    return paths


def _manifest_rewritten_by_duckdb(tmp: Path) -> dict:
    """Every test row moved to train by DuckDB."""
    return _rewrite_by_duckdb(_split_with_test(tmp), "* REPLACE ('train' AS split)")


def _manifest_columns_dropped(tmp: Path) -> dict:
    """The manifest rewritten by DuckDB without its key and shard columns."""
    return _rewrite_by_duckdb(_ingested(tmp), "* EXCLUDE (key, shard)")


def _manifest_checksum_dropped(tmp: Path) -> dict:
    """The same edit by pyarrow, the metadata kept but without its ``rows_sha256``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = _split_with_test(tmp)
    table = pq.read_table(paths["manifest"])
    meta = json.loads(table.schema.metadata[b"cxrsynth"])
    meta.pop("rows_sha256")
    table = table.set_column(table.column_names.index("split"), "split", pa.array(["train"] * table.num_rows))
    pq.write_table(table.replace_schema_metadata({"cxrsynth": json.dumps(meta)}), paths["manifest"])
    return paths


def _manifest_renamed(tmp: Path) -> dict:
    """cxp's manifest copied over the name of another dataset (``cp cxp.parquet site2.parquet``)."""
    import shutil

    paths = _ingested(tmp)
    shutil.copyfile(paths["manifest"], paths["manifest"].with_name("site2.parquet"))
    return paths


def _import_changed_by_sender(tmp: Path) -> dict:
    """:func:`_imported_in_place`, then the sender swaps one PNG in the package's shard and
    re-hashes ``shards/index.json`` and ``index.json``: the package verifies against itself."""
    import io
    import tarfile

    from cxrsynth import shards
    from cxrsynth.share import package

    paths = _imported_in_place(tmp)
    pkg = paths["root"] / "pkg"
    (tar_path,) = sorted((pkg / "shards").glob("*.tar"))
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    swapped = io.BytesIO()
    _save_png_to(swapped, _image(999))
    first_png = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == first_png:
                data = swapped.getvalue()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    index = json.loads((pkg / "shards" / shards.INDEX_NAME).read_text())
    for entry in index["shards"]:
        entry.update(bytes=tar_path.stat().st_size, sha256=shards.sha256_file(tar_path))
    (pkg / "shards" / shards.INDEX_NAME).write_text(json.dumps(index))
    old = json.loads((pkg / package.INDEX).read_text())
    package.write_index(pkg, {k: v for k, v in old.items() if k not in ("format", "files")})
    assert package.verify(pkg) == []  # the package itself looks intact
    return {**paths, "shard": tar_path.name, "work": tmp}


def _save_png_to(handle, image) -> None:
    from PIL import Image

    Image.fromarray(image).save(handle, format="PNG")


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _evaluation_project(tmp: Path) -> dict:
    """Dataset cxp (manifest only: 6 train, 12 test patients) and a model's predictions of its test split."""
    import pandas as pd
    from conftest import make_rows, model_dict, patients, scores_for, write_dataset, write_predictions

    root = tmp / "proj"
    frame = pd.concat([make_rows("cxp", patients("tr", 6), "train", seed=1),
                       make_rows("cxp", patients("te", 12), "test", seed=2)], ignore_index=True)
    write_dataset(root, "cxp", frame)
    test = frame.loc[frame["split"] == "test"]
    write_predictions(root / "pred.parquet", test, scores_for(test), model=model_dict())
    return {"root": root, "pred": root / "pred.parquet", "test": test}


def _scores_outside(tmp: Path) -> dict:
    """Predictions whose scores are logits in [-3, 7], not probabilities."""
    from conftest import model_dict, write_predictions

    paths = _evaluation_project(tmp)
    import numpy as np

    scores = np.random.default_rng(0).uniform(-3, 7, (len(paths["test"]), len(FINDINGS))).astype(np.float32)
    write_predictions(paths["pred"], paths["test"], scores, model=model_dict())
    return paths


def _scores_nan_inf(tmp: Path) -> dict:
    """Predictions with 2 NaN scores of edema and one infinite one of fracture."""
    from conftest import model_dict, scores_for, write_predictions

    paths = _evaluation_project(tmp)
    scores = scores_for(paths["test"])
    columns = _finding_columns()
    scores[[0, 3], columns.index("edema")] = float("nan")
    scores[5, columns.index("fracture")] = float("inf")
    write_predictions(paths["pred"], paths["test"], scores, model=model_dict())
    return paths


def _no_file(name: str):
    def check(paths: dict, output: str) -> None:
        assert not (paths["root"] / name).exists(), name

    return check


def _metrics_pair(**other):
    """Two evaluations of the same predictions: the baseline (image bootstrap, seed 0, 20
    replicates) and one with ``other`` changed (e.g. ``cluster="patient"``)."""
    def build(tmp: Path) -> dict:
        from cxrsynth.evaluate import metrics

        paths = _evaluation_project(tmp)
        root = paths["root"]
        for name, config in (("base", {}), ("other", other)):
            ev = metrics.evaluate(root, paths["pred"], metrics.EvaluateConfig(**{"bootstrap": 20, **config}))
            metrics.write(ev, root / "metrics" / f"{name}.json")
        return {**paths, "base": root / "metrics" / "base.json", "other": root / "metrics" / "other.json"}

    return build


def _predictions_changed(tmp: Path) -> dict:
    """:func:`_metrics_pair` (the same evaluation twice), then the predictions file rewritten by another model."""
    from conftest import model_dict, scores_for, write_predictions

    paths = _metrics_pair()(tmp)
    write_predictions(paths["pred"], paths["test"], scores_for(paths["test"], seed=7), model=model_dict())
    return paths


def _replicates_swapped(tmp: Path) -> dict:
    """:func:`_metrics_pair`, then other.json's replicates replaced by those of a 30-replicate evaluation."""
    import shutil

    from cxrsynth.evaluate import metrics

    paths = _metrics_pair()(tmp)
    ev = metrics.evaluate(paths["root"], paths["pred"], metrics.EvaluateConfig(bootstrap=30))
    metrics.write(ev, tmp / "b30.json")
    shutil.copyfile(metrics.replicates_path(tmp / "b30.json"), metrics.replicates_path(paths["other"]))
    return paths


def _predictions_meta(raw: bytes):
    """An evaluation project whose predictions' ``cxrsynth`` metadata is replaced by ``raw``."""
    def build(tmp: Path) -> dict:
        import pyarrow.parquet as pq
        from conftest import model_dict, scores_for, write_predictions

        paths = _evaluation_project(tmp)
        write_predictions(paths["pred"], paths["test"], scores_for(paths["test"]), model=model_dict())
        table = pq.read_table(paths["pred"])
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"cxrsynth": raw}), paths["pred"])
        return paths

    return build


def _replicates_elsewhere(tmp: Path) -> dict:
    """:func:`_metrics_pair`, then other.json's ``replicates`` pointing up and out of its folder."""
    paths = _metrics_pair()(tmp)
    doc = json.loads(paths["other"].read_text())
    paths["other"].write_text(json.dumps({**doc, "replicates": "../../../../etc/passwd"}))
    return paths


def _predictions_without_version(tmp: Path) -> dict:
    from conftest import model_dict, scores_for, write_predictions

    paths = _evaluation_project(tmp)
    write_predictions(paths["pred"], paths["test"], scores_for(paths["test"]), model=model_dict(),
                      data={"name": "cxp", "split": "test"})
    return paths


def _study_baseline_only(tmp: Path) -> dict:
    """A study project whose supplement family has run only its baseline cell (supplement_k0)."""
    import shutil

    root = tmp / "proj"
    (root / "metrics" / "study").mkdir(parents=True)
    shutil.copyfile(Path(__file__).resolve().parents[1] / "params.yaml", root / "params.yaml")
    (root / "metrics" / "study" / "supplement_k0.json").write_text(json.dumps({"evaluations": {}}) + "\n")
    return {"root": root}


def _split_unchanged(paths: dict, output: str) -> None:
    from cxrsynth import manifest

    frame = manifest.read(paths["root"], "cxp")
    assert frame["split"].isna().all() and manifest.read_meta(paths["root"], "cxp")["version"] == paths["version"]


def _ingested_with_version(tmp: Path) -> dict:
    from cxrsynth import manifest

    paths = _ingested(tmp)
    return {**paths, "version": manifest.read_meta(paths["root"], "cxp")["version"]}


def _no_datasets(paths: dict, output: str) -> None:
    from cxrsynth import manifest

    assert manifest.list_names(paths["root"]) == []


def _predictions_edited(edit):
    """:func:`_evaluation_project`, its predictions rewritten by ``edit(frame) -> frame`` (metadata kept)."""
    def build(tmp: Path) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths = _evaluation_project(tmp)
        table = pq.read_table(paths["pred"])
        frame = edit(table.to_pandas())
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata),
                       paths["pred"])
        return paths

    return build


def _not_parquet(tmp: Path) -> dict:
    paths = _evaluation_project(tmp)
    paths["pred"].write_text("key,edema\nx,0.5\n")
    return paths


def _metrics_edited(edit):
    """:func:`_metrics_pair`, the second metrics JSON's text replaced by ``edit(text) -> text``."""
    def build(tmp: Path) -> dict:
        paths = _metrics_pair()(tmp)
        paths["other"].write_text(edit(paths["other"].read_text()))
        return paths

    return build


def _without_edema(text: str) -> str:
    data = json.loads(text)
    for value in data.values():
        if isinstance(value, dict):
            value.pop("edema", None)
    return json.dumps(data)


def _warned_once(warning: str):
    def check(paths: dict, output: str) -> None:
        text = " ".join(output.split())
        assert text.count("warning:") >= 1 and warning in text, output

    return check


_EVALUATE = ("evaluate", "{pred}", "--out", "{tmp}/m.json")
_COMPARE = ("compare", "{base}", "{other}", "--out", "{tmp}/c.json", "--root", "{root}")


CASES: tuple[Case, ...] = (
    # Wrong answers reported as right: what verify, compare and evaluate pass must be what they say it is.
    Case("verify-manifest-rewritten-by-duckdb", "every test row moved to train by DuckDB COPY ... TO the manifest (verify)",
         _manifest_rewritten_by_duckdb, ("verify", "cxp", "--root", "{root}"), 1, "rewritten by another tool",
         "a failed check: the manifest records no identity or checksum"),
    Case("verify-manifest-columns-dropped", "the manifest rewritten by DuckDB without its key and shard columns (verify)",
         _manifest_columns_dropped, ("verify", "cxp", "--root", "{root}"), 1, "no column(s) key, shard",
         "a failed check naming the missing columns"),
    Case("verify-manifest-checksum-dropped", "the same edit by pyarrow, the metadata kept without rows_sha256 (verify)",
         _manifest_checksum_dropped, ("verify", "cxp", "--root", "{root}"), 1, "no rows_sha256 recorded",
         "a failed check: the recorded checksum is missing"),
    Case("verify-manifest-renamed", "cxp's manifest copied as another dataset's (site2.parquet) (verify site2)",
         _manifest_renamed, ("verify", "site2", "--root", "{root}"), 1, "it records dataset 'cxp', not 'site2'",
         "a failed check naming the recorded dataset"),
    Case("verify-import-changed-by-sender", "a package imported in place, then a PNG swapped by its sender and its "
         "indexes re-hashed (verify)", _import_changed_by_sender, ("verify", "imp", "--root", "{root}"), 1,
         "recorded at import", "a failed check naming the shard: held to the hashes recorded at import",
         check=_names("{shard}")),
    Case("sheet-import-changed-by-sender", "the same changed package, read for a contact sheet (sheet)",
         _import_changed_by_sender, ("sheet", "imp", "--out", "{tmp}/s.png", "--root", "{root}"), 2,
         "changed since the package was imported", "refused before any pixel is read, naming the shard",
         check=_wrote_none("s.png")),
    Case("train-import-changed-by-sender", "the same changed package as training data (classifier train)",
         _import_changed_by_sender, ("classifier", "train", "--data", "imp", "--split", "train", "--tune-split", "none",
                                     "--out", "{tmp}/clf", "--preset", "small", "--image-size", "32", "--epochs", "1",
                                     "--batch", "2", "--threads", "1", "--root", "{root}"), 2,
         "changed since the package was imported", "refused before training: every reader of pixels holds an in-place "
         "package to its import record", check=_wrote_none("clf/model.safetensors")),
    Case("evaluate-scores-outside-0-1", "predictions whose scores are in [-3, 7] (evaluate)", _scores_outside,
         ("evaluate", "{pred}", "--out", "{tmp}/m.json", "--root", "{root}"), 2, "not probabilities in [0, 1]",
         "clean error naming each column and its count", check=_names("outside [0, 1]")),
    Case("evaluate-scores-nan-inf", "predictions with NaN and infinite scores (evaluate)", _scores_nan_inf,
         ("evaluate", "{pred}", "--out", "{tmp}/m.json", "--root", "{root}"), 2, "edema (2 NaN",
         "clean error naming each column and its count", check=_names("fracture (1 infinite")),
    Case("compare-image-vs-patient-bootstrap", "compare of an image bootstrap with a patient-cluster bootstrap",
         _metrics_pair(cluster="patient"), ("compare", "{base}", "{other}", "--out", "{tmp}/c.json", "--root", "{root}"),
         2, "another bootstrap kind (--cluster)", "clean error naming the difference", check=_names("'patient' there")),
    Case("compare-other-bootstrap-seed", "compare of metrics bootstrapped with another seed", _metrics_pair(seed=1),
         ("compare", "{base}", "{other}", "--out", "{tmp}/c.json", "--root", "{root}"), 2,
         "another bootstrap seed (--seed)", "clean error naming the difference"),
    Case("compare-other-replicate-count", "compare of metrics with another number of bootstrap replicates",
         _metrics_pair(bootstrap=30), ("compare", "{base}", "{other}", "--out", "{tmp}/c.json", "--root", "{root}"), 2,
         "another number of bootstrap replicates", "clean error naming the difference"),
    Case("compare-predictions-changed", "compare after a metrics file's predictions were rewritten by another model",
         _predictions_changed, ("compare", "{base}", "{other}", "--out", "{tmp}/c.json", "--root", "{root}"), 2,
         "the predictions changed since they were evaluated", "clean error naming the file and a finding"),
    Case("compare-replicates-swapped", "compare with a metrics file whose saved replicates are another evaluation's",
         _replicates_swapped, ("compare", "{base}", "{other}", "--out", "{tmp}/c.json", "--root", "{root}"), 2,
         "its saved replicates have shapes (30, 14)", "clean error naming the shapes"),
    Case("evaluate-predictions-without-version", "predictions whose metadata records no dataset version (evaluate)",
         _predictions_without_version, ("evaluate", "{pred}", "--out", "{tmp}/m.json", "--root", "{root}"), 2,
         "records no version of cxp", "clean error: the version cannot be checked"),
    Case("evaluate-predictions-meta-not-utf8", "predictions whose cxrsynth metadata is not UTF-8 (evaluate)",
         _predictions_meta(b"\xff\xfe\x00{"), ("evaluate", "{pred}", "--out", "{tmp}/m.json", "--root", "{root}"), 2,
         "the cxrsynth metadata is not UTF-8 JSON", "clean error naming the file"),
    Case("evaluate-predictions-meta-list", "predictions whose cxrsynth metadata is a JSON list (evaluate)",
         _predictions_meta(b"[1, 2]"), ("evaluate", "{pred}", "--out", "{tmp}/m.json", "--root", "{root}"), 2,
         "is a JSON list, not an object", "clean error naming the file"),
    Case("evaluate-predictions-meta-types", "predictions metadata with data.name a list and rows a text (evaluate)",
         _predictions_meta(b'{"data": {"name": ["cxp"]}, "rows": "many"}'),
         ("evaluate", "{pred}", "--out", "{tmp}/m.json", "--root", "{root}"), 2,
         "names no test data", "clean error naming the fields"),
    Case("compare-replicates-elsewhere", "compare with a metrics file whose replicates path is ../../../../etc/passwd",
         _replicates_elsewhere, ("compare", "{base}", "{other}", "--out", "{tmp}/c.json", "--root", "{root}"), 2,
         "must be a file name beside it, not a path", "refused: nothing outside the metrics folder is read"),
    Case("classifier-out-is-a-file", "classifier train --out naming an existing file", _garbage_site,
         (*_CLASSIFIER[:5], "{root}/manifests/cxp.parquet", *_CLASSIFIER[6:], "--root", "{root}"), 2,
         "is a file; the classifier is written to a folder", "refused before training; the file untouched"),
    Case("evaluate-out-is-a-folder", "evaluate --out naming an existing folder", _evaluation_project,
         ("evaluate", "{pred}", "--out", "{tmp}", "--root", "{root}"), 1,
         "a folder stands where a file is needed", "one line naming the path (it was an IsADirectoryError traceback)"),
    Case("study-report-cell-without-keys", "study report over a cell file that lacks the cell's name and counts",
         _study_baseline_only, ("study", "report", "--out", "{tmp}/rep", "--root", "{root}"), 2,
         "is not a cell's metrics (rerun `dvc repro` for cell supplement_k0): no 'cell' name",
         "refused naming the file and the cell to rerun (it was a KeyError)"),
    Case("classifier-workers-not-dividing", "classifier train --workers 3 (streams 2)", _garbage_site,
         (*_CLASSIFIER, "--workers", "3", "--root", "{root}"), 2, "workers (3) must divide streams (2)",
         "refused before training, naming both values"),
    Case("classifier-split-absent", "classifier train --split test on data without test rows", _garbage_site,
         (*_CLASSIFIER, "--split", "test", "--root", "{root}"), 2, "cxp: no rows in split 'test' (splits: train, tune)",
         "refused, naming the splits there are"),
    Case("study-compare-baseline-only", "study compare of a family whose only run cell is the baseline",
         _study_baseline_only, ("study", "compare", "supplement", "--root", "{root}"), 2,
         "no cell to compare with the baseline supplement_k0", "clean error naming the cells not run; no file written",
         check=_no_file("metrics/compare/supplement.json")),
    Case("name-trailing-newline", "a dataset name with a trailing newline (ingest --name 'cxp\\n')", _chexpert_tree,
         ("ingest", "chexpert", "{csv}", "--name", "cxp\n", "--size", str(SIDE), "--workers", "1", "--root", "{root}"), 2,
         "must match", "clean error; nothing written", check=_no_datasets),
    Case("split-view-absent", "split --view XX (no image has that view)", _ingested_with_version,
         ("split", "cxp", "--seed", "0", "--view", "XX", "--root", "{root}"), 2, "views present: AP",
         "clean error naming the views present; the splits are kept", check=_split_unchanged),
    # Checkpoints from another site are untrusted: nothing in them runs, every fault is one clean line.
    Case("ckpt-pickle-payload", "checkpoint with a pickle payload (code that runs on load)", _ckpt_payload, _IMPORT,
         2, "may be unsafe", "refused before anything runs; names the refused global", check=_marker_absent),
    Case("ckpt-random-bytes", "checkpoint of random bytes", _ckpt_random, _IMPORT,
         2, "not a PyTorch checkpoint", "clean error naming the file"),
    Case("ckpt-empty", "empty checkpoint file (0 bytes)", _ckpt_empty, _IMPORT,
         2, "is empty", "clean error: the file is empty"),
    Case("ckpt-bare-tensor", "checkpoint holding a bare tensor", _ckpt_tensor, _IMPORT,
         2, "holds a Tensor", "clean error: not a checkpoint dict"),
    Case("ckpt-no-state-dict", "checkpoint dict without state_dict (no weights)", _ckpt_no_state_dict, _IMPORT,
         2, "no state_dict", "clean error: no weights in the file"),
    Case("ckpt-wrong-shape", "state dict of another width than the config", _ckpt_wrong_shape, _IMPORT,
         2, "does not fit the config", "clean error naming a weight and both shapes"),
    Case("ckpt-missing-keys", "state dict lacking weights the config needs", _ckpt_missing_keys, _IMPORT,
         2, "lacks", "clean error naming the missing weights"),
    Case("config-invalid-yaml", "Mediffusion config that is not valid YAML", _config_invalid_yaml, _IMPORT,
         2, "is not valid YAML", "clean error naming the file and line"),
    Case("fid-classifier-payload", "classifier checkpoint with a pickle payload (generator fid)", _fid_checkpoint_payload,
         ("generator", "fid", "--real", "a", "--synthetic", "b", "--classifier", "resnet18", "--checkpoint", "{ckpt}",
          "--root", "{root}"),
         2, "may be unsafe", "refused before anything runs", check=_marker_absent),
    Case("fid-inception-junk", "Inception weights file that is not a checkpoint", _fid_inception_random,
         ("generator", "fid", "--real", "a", "--synthetic", "b", "--inception", "{weights}", "--root", "{root}"),
         2, "not a PyTorch checkpoint", "clean error naming the file"),
    Case("generator-bad-json", "generator folder with an invalid generator.json", _generator_bad_json,
         ("generator", "info", "{gen}"), 2, "generator.json", "clean error naming the file"),
    # Images: size limits are checked on the header, before any pixel is decoded.
    Case("image-bomb", "16-bit PNG whose header says 13000 x 13000 (a decompression bomb)", _ingest_bomb, _INGEST,
         0, "too_large", "ingested; that row rejected as too_large, nothing decoded", rejected={"too_large": 1}, kept=2),
    Case("image-over-limit", "16-bit PNG of 64 x 64 above a configured pixel limit (CXRSYNTH_MAX_PIXELS=2000)",
         _ingest_over_limit, _INGEST,
         0, "too_large", "ingested; that row rejected as too_large", env={"CXRSYNTH_MAX_PIXELS": "2000"},
         rejected={"too_large": 1}, kept=2),
    Case("dicom-over-limit", "DICOM of 64 x 64 above a configured pixel limit (CXRSYNTH_MAX_PIXELS=2000)",
         _ingest_dicom_over_limit, _INGEST,
         0, "too_large", "ingested; that row rejected as too_large", env={"CXRSYNTH_MAX_PIXELS": "2000"},
         rejected={"too_large": 1}, kept=1),
    # Options out of range are refused while parsing.
    Case("size-zero", "--size 0", _chexpert_tree, _ingest("--size", "0"),
         2, "Invalid value for '--size'", "refused at parse time (must be >= 1)"),
    Case("shard-size-zero", "--shard-size 0", _chexpert_tree, _ingest("--shard-size", "0"),
         2, "Invalid value for '--shard-size'", "refused at parse time (must be >= 1)"),
    Case("workers-negative", "--workers -1", _chexpert_tree, _ingest("--workers", "-1"),
         2, "Invalid value for '--workers'", "refused at parse time (must be >= 1)"),
    Case("name-300-chars", "a 300-character dataset name", _chexpert_tree,
         ("ingest", "chexpert", "{csv}", "--name", "d" * 300, "--root", "{root}"),
         2, "at most 64 characters", "clean error before anything is read"),
    # Tables.
    Case("csv-empty", "empty CSV (0 bytes) to ingest chexpert", _csv_empty, _INGEST,
         2, "is empty", "clean error naming the file"),
    Case("csv-latin1", "CheXpert CSV in Latin-1, not UTF-8", _csv_latin1, _INGEST,
         2, "is not UTF-8", "clean error naming the file, line and byte; says to re-save as UTF-8"),
    Case("table-latin1", "in-house table in Latin-1 (ingest table)", _csv_latin1,
         ("ingest", "table", "{table}", "--map", "path=path", "--map", "patient=patient_id", "--name", "t",
          "--size", str(SIDE), "--root", "{root}"),
         2, "is not UTF-8", "clean error naming the file, line and byte"),
    # Manifests and indexes damaged on disk.
    Case("manifest-truncated-verify", "truncated manifest parquet (verify)", _truncated_manifest,
         ("verify", "cxp", "--root", "{root}"),
         2, "cxp.parquet is unreadable", "clean error naming the file"),
    Case("manifest-truncated-stats", "truncated manifest parquet (stats)", _truncated_manifest,
         ("stats", "cxp", "--root", "{root}"),
         2, "cxp.parquet is unreadable", "clean error naming the file"),
    Case("manifest-empty-stats", "empty manifest file (stats)", _empty_manifest, ("stats", "cxp", "--json", "--root", "{root}"),
         2, "cxp.parquet is unreadable", "clean error naming the file"),
    Case("index-invalid", "index.json that is not valid JSON (verify)", _invalid_index, ("verify", "cxp", "--root", "{root}"),
         1, "unreadable index", "a failed check (✗) naming the file"),
    Case("junk-manifest-others", "a junk .parquet in manifests/, query of another dataset", _junk_manifest,
         ("query", "SELECT count(*) AS n FROM cxp", "--format", "csv", "--root", "{root}"),
         0, "junk.parquet", "other datasets query fine; a warning names the junk file"),
    Case("junk-manifest-itself", "a junk .parquet in manifests/, query of that dataset", _junk_manifest,
         ("query", "SELECT * FROM junk", "--root", "{root}"),
         2, "junk.parquet is unreadable", "clean error naming the file"),
    # Queries.
    Case("query-empty-sql", "empty SQL", _nothing, ("query", "", "--root", "{root}"),
         2, "empty SQL", "clean error"),
    Case("query-root-missing", "query --root pointing to a folder that does not exist", _no_root,
         ("query", "SELECT 1 AS one", "--root", "{missing}"), 2, "does not exist", "clean error naming the folder"),
    # Shards.
    Case("sheet-corrupt-png", "a corrupt PNG inside a shard (sheet)", _corrupt_png_in_shard,
         ("sheet", "cxp", "--out", "{tmp}/sheet.png", "--root", "{root}"),
         2, "corrupt PNG", "clean error naming the key and the shard", check=_names_shard),
    # Versions name bytes: a changed image is another version, and resume redoes the unit it changed.
    Case("image-changed-same-size", "an image replaced by another of the same byte size, mtime restored (re-ingest)",
         _changed_same_size, _INGEST, 0, "cxp @", "a new version; the shard holds the new image", check=_version_changed),
    Case("named-version-changed-image", "the same, under a named version (ingest --version v1 again)", _named_changed,
         _ingest("--version", "v1"), 0, "cxp @ v1", "its unit is redone, not reused", check=_unit_redone),
    Case("stale-digest-cache", "the digest cache holds a wrong digest for an unchanged stat; ingest --rehash",
         _stale_digest_cache, _ingest("--rehash"), 0, "cxp @", "every image re-read: the version of a fresh ingest",
         check=_same_as_fresh),
    # One writer per dataset; workers die with their ingest.
    Case("dataset-in-use", "a second ingest of a dataset another process is writing", _held_by_other, _INGEST,
         2, "is in use by PID", "refused before anything is written, naming the writer's PID", check=_names_holder),
    Case("dataset-in-use-split", "split of a dataset another process is writing", _ingested_held,
         ("split", "cxp", "--seed", "0", "--root", "{root}"), 2, "is in use by PID", "refused, naming the writer's PID",
         check=_names_holder),
    Case("ingest-killed", "an ingest with 2 workers killed with kill -9 mid-run, then run again", _killed_ingest,
         ("ingest", "chexpert", "{csv}", "--name", "cxp", "--size", str(_KILL_SIZE), "--shard-size", "2", "--workers", "2",
          "--root", "{root}"), 0, "reused", "its workers die with it; the rerun finishes byte-identical to a clean ingest",
         check=_workers_died_rerun_identical),
    Case("data-is-a-file", "the project's data/ is a file", _data_is_a_file, _INGEST,
         2, "cannot write under", "clean error naming the folder"),
    # A dataset is never written over its own sources, nor over another kind unless forced.
    Case("mix-over-own-source", "mix --real cxp --name cxp", _ingested_split,
         ("mix", "--real", "cxp", "--name", "cxp", "--seed", "0", "--root", "{root}"),
         2, "one of its own sources", "refused; cxp and its rejects ledger stay", check=_still_real),
    Case("ingest-over-mix", "ingest over an existing mix (another kind)", _with_mix, _ingest_as("m"),
         2, "exists as a mix dataset", "refused: needs --force"),
    Case("ingest-over-mix-forced", "the same with --force", _with_mix, _ingest_as("m", "--force"),
         0, "m @", "written: m is now a real dataset", check=_m_is_real),
    Case("verify-mix-cycle", "verify of a mix that names itself as its source (written before that was refused)",
         _mix_of_itself, ("verify", "cxp", "--root", "{root}"), 1, "cycle of sources", "a failed check naming the cycle"),
    Case("name-differs-in-case", "ingest --name CXP beside an existing cxp", _ingested, _ingest_as("CXP"),
         2, "collides with the existing dataset 'cxp'", "refused, naming the existing dataset"),
    # Keys stay distinct for distinct paths; clean keys stay as they were.
    Case("keys-normalised-alike", "images 'a b é.png' and 'a_b_è.png' (ingest table)", _keys_normalised_alike,
         _ingest_table(), 0, "cxp @", "both kept under distinct keys (a short path hash appended)", rejected={}, kept=3,
         check=_keys(("clean_name",), 3)),
    Case("table-path-leading-space", "a table row ' a.png' beside a row 'a.png'; only a.png exists (ingest table)",
         _path_leading_space, _ingest_table(), 0, "missing_image",
         "the path is taken verbatim: that row rejected as missing_image, not given a.png's pixels",
         rejected={"missing_image": 1}, kept=2),
    Case("keys-extension-only", "images 'x.png' and 'x.jpg' (ingest table)", _keys_extension_only, _ingest_table(),
         0, "cxp @", "both kept: the first keeps key x, the second gets x-<hash>", rejected={}, kept=3,
         check=_keys(("x", "y"), 3)),
    # Values outside the contract are rejected or counted, never changed silently.
    Case("age-300", "Age 300", _age_300, _INGEST, 0, "bad_age", "that row rejected as bad_age", rejected={"bad_age": 1}, kept=2),
    Case("age-negative-text", "Age -5 and Age abc", _age_negative_text, _INGEST, 0, "bad_age",
         "both rows rejected as bad_age", rejected={"bad_age": 2}, kept=1),
    Case("sex-unknown-code", "Sex X", _sex_x, _INGEST, 0, "bad_sex", "that row rejected as bad_sex", rejected={"bad_sex": 1},
         kept=2),
    Case("age-text-with-demographics", "Age abc with a demographics file giving an age", _age_text_with_demographics,
         _ingest("--demographics", "{demo}"), 0, "bad_age", "rejected, not replaced from the demographics file",
         rejected={"bad_age": 1}, kept=2),
    Case("age-zero-from-demographics", "Age 0 (unknown) with a demographics file giving 61", _age_zero_with_demographics,
         _ingest("--demographics", "{demo}"), 0, "age from demographics", "filled in, counted, printed and recorded",
         rejected={}, kept=3, check=_recorded({"age from demographics": 1}, age=[42.0, 43.0, 61.0])),
    Case("table-split-training", "a table split 'training'", _table_split("training"), _ingest_table("--map", "split=split"),
         0, "split training -> train", "kept as train, counted, printed and recorded", rejected={}, kept=3,
         check=_recorded({"split training -> train": 1}, split=["test", "train", "train"])),
    Case("table-split-unknown", "a table split 'banana'", _table_split("banana"), _ingest_table("--map", "split=split"),
         0, "bad_split", "that row rejected as bad_split", rejected={"bad_split": 1}, kept=2),
    Case("mimic-conflicting-labels", "a MIMIC study with two different label rows", _mimic_conflicting_labels,
         ("ingest", "mimic", "--metadata", "{meta}", "--labels", "{labels}", "--name", "cxp", "--size", str(SIDE),
          "--workers", "1", "--root", "{root}"),
         0, "conflicting_labels", "its images rejected as conflicting_labels", rejected={"conflicting_labels": 1}, kept=2),
    # Images lie under the images root.
    Case("path-escapes-root", "a table path ../outside.png", _path_escapes, _ingest_table(), 0, "outside_root",
         "that row rejected as outside_root", rejected={"outside_root": 1}, kept=2),
    Case("path-escapes-root-allowed", "the same with --allow-outside-root", _path_escapes,
         _ingest_table("--allow-outside-root"), 0, "cxp @", "kept", rejected={}, kept=3),
    Case("chexpert-path-escapes-root", "a CheXpert Path ../elsewhere/train/...", _chexpert_escapes, _INGEST, 0, "outside_root",
         "that row rejected as outside_root", rejected={"outside_root": 1}, kept=2),
    Case("symlink-outside-root", "an image that is a symbolic link to a file outside the root", _symlink_outside,
         _ingest_table(), 0, "outside_root", "that row rejected as outside_root", rejected={"outside_root": 1}, kept=2),
    # Verify checks every row and the manifest's checksum.
    Case("manifest-label-edited", "a label edited in the manifest (verify)", _edited_manifest("edema", 1),
         ("verify", "cxp", "--root", "{root}"), 1, "edema is 1 in the manifest", "a failed check naming the key and column",
         check=_names("{key}: edema")),
    Case("manifest-id-edited", "a patient id edited in the manifest (verify)", _edited_manifest("patient_id", "patient99999"),
         ("verify", "cxp", "--root", "{root}"), 1, "differ from the checksum", "a failed check: the rows' checksum differs"),
    Case("import-in-place-verify", "verify of a package imported in place (rows point into the package)", _imported_in_place,
         ("verify", "imp", "--root", "{root}"), 0, "match index.json", "the package's shards and index are verified"),
    # Numeric options in range, corrupt images named.
    Case("train-corrupt-png", "a corrupt PNG inside a shard (generator train)", _train_corrupt_png,
         ("generator", "train", "--data", "cxp", "--out", "{tmp}/gen", "--preset", "micro", "--image-size", "32",
          "--steps", "1", "--batch", "2", "--threads", "1", "--root", "{root}"),
         2, "corrupt PNG", "clean error naming the key and the shard", check=_names_shard),
    Case("generate-seed-negative", "generate --seed -1", _nothing,
         ("generate", "--generator", "{tmp}", "--conditions", "cxp", "--name", "s", "--seed", "-1", "--root", "{root}"),
         2, "Invalid value for '--seed'", "refused at parse time (must be >= 0)"),
    Case("generate-guidance-negative", "generate --guidance -2", _nothing,
         ("generate", "--generator", "{tmp}", "--conditions", "cxp", "--name", "s", "--guidance", "-2", "--root", "{root}"),
         2, "Invalid value for '--guidance'", "refused at parse time (must be >= 0)"),
    Case("train-seed-negative", "generator train --seed -1", _nothing,
         ("generator", "train", "--data", "cxp", "--out", "{tmp}/g", "--seed", "-1", "--root", "{root}"),
         2, "Invalid value for '--seed'", "refused at parse time (must be >= 0)"),
    Case("mix-seed-negative", "mix --seed -1", _nothing,
         ("mix", "--real", "cxp", "--name", "m", "--seed", "-1", "--root", "{root}"),
         2, "Invalid value for '--seed'", "refused at parse time (must be >= 0)"),
    Case("option-missing-value", "ingest chexpert --name without a value", _nothing, ("ingest", "chexpert", "{csv}", "--name"),
         2, "requires an argument", "one error line naming the option and the command's --help"),
    # Values that make garbage: refused where the config is made, weights that are not numbers,
    # training that diverges, labels that leave nothing to learn, tuning on the training rows.
    Case("generate-guidance-inf", "generate --guidance inf (typer's min=0 lets inf through)", _garbage_site_generator,
         (*_GENERATE, "--guidance", "inf", "--root", "{root}"), 2, "generate config: guidance: expected a finite number, got inf",
         "refused by GenerateConfig before sampling; no dataset published", check=_no_dataset("s")),
    Case("generate-guidance-nan", "generate --guidance nan", _nothing,
         ("generate", "--generator", "{tmp}", "--conditions", "cxp", "--name", "s", "--guidance", "nan", "--root", "{root}"),
         2, "Invalid value for '--guidance'", "refused at parse time (typer compares nan with min=0; GenerateConfig "
                                              "refuses it too, for the Python API)"),
    Case("generate-output-nonfinite", "generate --guidance 1e300 (finite, but the output overflows float32)",
         _garbage_site_generator, (*_GENERATE, "--guidance", "1e300", "--root", "{root}"), 2,
         "the generator's output is NaN or infinite", "refused at the first batch; no image written from it, no dataset published",
         check=_no_dataset("s")),
    Case("generate-eta-above-1", "generate --eta 1.5 (DDIM's step is NaN above eta 1)", _nothing,
         ("generate", "--generator", "{tmp}", "--conditions", "cxp", "--name", "s", "--eta", "1.5", "--root", "{root}"), 2,
         "generate config: eta: expected a value <= 1, got 1.5", "refused by GenerateConfig (eta is in [0, 1])"),
    Case("generate-eta-1", "generate --eta 1 with the default trailing spacing (its first step was NaN: black images)",
         _garbage_site_generator, ("generate", "--generator", "{gen}", "--conditions", "cxp", "--name", "s", "--steps", "3",
                                   "--eta", "1", "--threads", "1", "--root", "{root}"), 0, "complete",
         "accepted: the DDIM variance is fitted under 1 - alpha_bar_prev, no image is black", check=_images_not_black),
    Case("generate-nan-generator", "generate with a generator whose weights hold a NaN", _garbage_site_nan_generator,
         (*_GENERATE, "--root", "{root}"), 2, "NaN or infinite values in 1 of",
         "refused when the generator loads, naming the tensor; no dataset published", check=_no_dataset("s")),
    Case("import-mediffusion-nan", "generator import-mediffusion of a checkpoint with a NaN weight", _ckpt_nan, _IMPORT, 2,
         "NaN or infinite values in 1 of", "refused, naming the tensor; no generator written", check=_wrote_none("gen")),
    Case("fid-classifier-nan", "generator fid --checkpoint holding a NaN weight", _fid_checkpoint_nan,
         ("generator", "fid", "--real", "a", "--synthetic", "b", "--classifier", "resnet18", "--checkpoint", "{ckpt}",
          "--root", "{root}"), 2, "classifier.pt: NaN or infinite values in 1 of 1 tensor(s) (conv1.weight)",
         "refused when the weights load (the distance would be NaN)"),
    Case("generator-train-diverges", "generator train --lr 1e30 (finite, but the loss becomes NaN)", _garbage_site,
         ("generator", "train", "--data", "cxp", "--out", "{tmp}/gen", "--preset", "micro", "--image-size", "32", "--steps", "4",
          "--batch", "2", "--lr", "1e30", "--log-every", "1", "--threads", "1", "--root", "{root}"), 2, "training diverged",
         "stopped at the first NaN loss; no generator and no NaN checkpoint written",
         check=_wrote_none("gen/diffusion_pytorch_model.safetensors", "gen/generator.json")),
    Case("classifier-lr-inf", "classifier train --lr inf", _nothing,
         ("classifier", "train", "--data", "cxp", "--out", "{tmp}/clf", "--lr", "inf", "--root", "{root}"), 2,
         "classifier config: lr: expected a finite number, got inf", "refused by ClassifierConfig before any data is read"),
    Case("classifier-weight-decay-inf", "classifier train --weight-decay inf", _nothing,
         ("classifier", "train", "--data", "cxp", "--out", "{tmp}/clf", "--weight-decay", "inf", "--root", "{root}"), 2,
         "classifier config: weight_decay: expected a finite number, got inf", "refused by ClassifierConfig"),
    Case("classifier-epochs-huge", "classifier train --epochs 1000000000", _nothing,
         ("classifier", "train", "--data", "cxp", "--out", "{tmp}/clf", "--epochs", "1000000000", "--root", "{root}"), 2,
         "epochs: expected a value <= 100000, got 1000000000", "refused by ClassifierConfig before any data is read"),
    Case("classifier-batch-huge", "classifier train --batch 1000000000", _nothing,
         ("classifier", "train", "--data", "cxp", "--out", "{tmp}/clf", "--batch", "1000000000", "--root", "{root}"), 2,
         "batch_size: expected a value <= 65536, got 1000000000", "refused by ClassifierConfig before any allocation"),
    Case("generate-replicas-huge", "generate --replicas 1000000", _nothing,
         ("generate", "--generator", "{tmp}/gen", "--conditions", "cxp", "--replicas", "1000000", "--name", "syn",
          "--root", "{root}"), 2, "replicas: expected a value <= 1000, got 1000000", "refused by GenerateConfig"),
    Case("classifier-image-size-huge", "classifier train --image-size 100000", _nothing,
         ("classifier", "train", "--data", "cxp", "--out", "{tmp}/clf", "--image-size", "100000", "--root", "{root}"), 2,
         "image_size: expected a value <= 2048, got 100000", "refused by ClassifierConfig (8 to 2048 px)"),
    Case("params-classifier-image-size-huge", "params.yaml classifier.image_size: 100000", _params_file({"image_size": 100000}),
         ("study", "check", "--root", "{root}"), 2, "params.yaml: classifier.image_size: expected a value <= 2048, got 100000",
         "refused in a second by the study's parameter check, naming the key"),
    Case("params-classifier-lr-inf", "params.yaml classifier.lr: .inf", _params_file({"lr": ".inf"}),
         ("study", "check", "--root", "{root}"), 2, "params.yaml: classifier.lr: expected a finite number, got inf",
         "refused by the study's parameter check, naming the key"),
    Case("classifier-train-diverges", "classifier train --lr 1e30 (finite, but the loss becomes NaN)", _garbage_site,
         (*_CLASSIFIER, "--lr", "1e30", "--root", "{root}"), 2, "training diverged",
         "stopped when the loss is NaN; no model and no NaN checkpoint written",
         check=_wrote_none("clf/model.safetensors", "clf/classifier.json")),
    Case("classifier-weights-inf", "classifier train --weights holding an infinite value", _garbage_site_nan_weights,
         (*_CLASSIFIER, "--weights", "{weights}", "--root", "{root}"), 2, "NaN or infinite values in 1 of 2 tensor(s) (conv1.weight)",
         "refused when the weights load, naming the tensor", check=_wrote_none("clf/model.safetensors")),
    Case("predict-nan-model", "classifier predict with a model directory whose weights hold a NaN",
         _garbage_site_nan_classifier, ("classifier", "predict", "--model", "{model}", "--data", "cxp", "--out", "{tmp}/p.parquet",
                                        "--threads", "1", "--root", "{root}"), 2, "model.safetensors: NaN or infinite values",
         "refused when the model loads, naming the tensor; no predictions written", check=_wrote_none("p.parquet")),
    *(Case(f"predict-model-{what}", f"classifier predict --model DIR whose {bad}", _classifier_dir(**spec),
           ("classifier", "predict", "--model", "{model}", "--data", "cxp", "--out", "{tmp}/p.parquet", "--threads", "1",
            "--root", "{root}"), 2, message, "refused when the model directory is read, naming the file; no predictions",
           check=_wrote_none("p.parquet"))
      for what, bad, spec, message in (
          ("meta-not-json", "classifier.json is not JSON", {"meta": b"{not json"}, "classifier.json is not a cxrsynth classifier.json"),
          ("meta-not-utf8", "classifier.json is not UTF-8", {"meta": b"\xff\xfe{}"}, "is not a cxrsynth classifier.json"),
          ("meta-no-config", "classifier.json lacks its config", {"meta": b'{"classifier_id": "x"}'}, "lacks 'config'"),
          ("meta-list", "classifier.json is a JSON list", {"meta": b"[1, 2]"}, "expected a JSON object, got list"),
          ("meta-nested", "classifier.json is 200,000 nested brackets", {"meta": b"[" * 200_000}, "nested too deeply"),
          ("meta-config-types", "classifier.json's config has a text image size",
           {"meta": b'{"config": {"image_size": "big"}}'}, "image_size"),
          ("weights-empty", "model.safetensors is empty", {"weights": b""}, "is not a readable safetensors file"),
          ("weights-truncated", "model.safetensors is cut in half", {"weights": b"TRUNCATE"}, "is not a readable safetensors file"),
          ("weights-garbage", "model.safetensors is random bytes", {"weights": bytes(range(256)) * 8},
           "is not a readable safetensors file"),
          ("weights-other-model", "model.safetensors holds another network's tensors",
           {"weights": _safetensors_bytes({"fc.weight": [[0.0] * 3]})}, "does not fit the classifier"),
      )),
    Case("study-summary-truncated-cell", "a cell's metrics JSON cut off mid-file (study summary)", _truncated_cell,
         ("study", "summary", "--root", "{root}"), 2, "supplement_k0.json is not a cell's metrics",
         "refused naming the file and the cell to rerun"),
    Case("uncertain-mask-all-uncertain", "classifier train --uncertain mask on data whose every finding is uncertain",
         _garbage_all_uncertain, (*_CLASSIFIER, "--uncertain", "mask", "--root", "{root}"), 2,
         "every finding of all 3 training rows is uncertain", "refused before training: no label to learn from",
         check=_wrote_none("clf/model.safetensors")),
    Case("uncertain-mask-finding-never-certain", "classifier train --uncertain mask, Edema uncertain in every row",
         _garbage_edema_uncertain, (*_CLASSIFIER, "--uncertain", "mask", "--root", "{root}"), 2,
         "Edema uncertain in all 3 training rows", "refused before training, naming the findings without a label"),
    Case("uncertain-exclude-all-uncertain", "classifier train (uncertain images excluded) on all-uncertain data",
         _garbage_all_uncertain, (*_CLASSIFIER, "--root", "{root}"), 2, "no training rows without an uncertain finding",
         "refused before training, pointing to --uncertain mask"),
    Case("tune-split-is-train-split", "classifier train --split tune --tune-split tune", _garbage_site,
         (*_CLASSIFIER, "--split", "tune", "--tune-split", "tune", "--root", "{root}"), 2,
         "the tuning split 'tune' overlaps the training split 'tune'", "refused: the best epoch would be chosen on training rows"),
    Case("tune-split-overlaps-train", "classifier train --split train,tune --tune-split tune", _garbage_site,
         (*_CLASSIFIER, "--split", "train,tune", "--tune-split", "tune", "--root", "{root}"), 2,
         "overlaps the training split 'train,tune' (both hold tune)", "refused, naming the shared split"),
    Case("ingest-size-huge", "ingest chexpert --size 100000", _chexpert_tree,
         ("ingest", "chexpert", "{csv}", "--name", "cxp", "--size", "100000", "--root", "{root}"), 2,
         "preprocessing: size: expected a value <= 2048, got 100000", "refused before any image is read"),
    Case("evaluate-bootstrap-huge", "evaluate --bootstrap 1000000000", _nothing,
         ("evaluate", "{tmp}/p.parquet", "--out", "{tmp}/m.json", "--bootstrap", "1000000000", "--root", "{root}"), 2,
         "evaluate config: bootstrap: expected a value <= 100000", "refused before reading anything (it ended in a MemoryError)"),
    Case("evaluate-duplicate-keys", "predictions holding two rows twice (evaluate)",
         _predictions_edited(lambda f: pd_concat([f, f.iloc[:2]])), (*_EVALUATE, "--root", "{root}"), 2,
         "keys must be unique and non-null", "clean error naming the duplicated keys", check=_no_file("../m.json")),
    Case("evaluate-column-missing", "predictions without the edema column (evaluate)",
         _predictions_edited(lambda f: f.drop(columns=["edema"])), (*_EVALUATE, "--root", "{root}"), 2,
         "lacks column(s) edema", "clean error naming the column"),
    Case("evaluate-column-extra", "predictions with a column that is no finding (evaluate)",
         _predictions_edited(lambda f: f.assign(notes=1.0)), (*_EVALUATE, "--root", "{root}"), 0,
         "macro AUROC", "evaluated; the column is named in a warning as ignored",
         check=_warned_once("column(s) notes are not predictions of a finding and are ignored")),
    Case("evaluate-key-in-no-manifest", "predictions with a key the test split does not hold (evaluate)",
         _predictions_edited(lambda f: f.assign(key=f["key"].where(f.index != 0, "nobody_here"))),
         (*_EVALUATE, "--root", "{root}"), 2, "1 prediction key(s) not found in cxp split test: nobody_here",
         "clean error naming the key"),
    Case("evaluate-dataset-renamed", "predictions whose dataset column names another dataset (evaluate)",
         _predictions_edited(lambda f: f.assign(dataset="mimic")), (*_EVALUATE, "--root", "{root}"), 2,
         "name another dataset than their manifest row", "clean error naming a key and both names"),
    Case("evaluate-rows-dropped", "predictions file emptied by another tool, metadata kept (evaluate)",
         _predictions_edited(lambda f: f.iloc[:0]), (*_EVALUATE, "--root", "{root}"), 2,
         "the metadata says 24 rows, the file has 0", "clean error: rows lost since predict"),
    Case("evaluate-not-parquet", "a CSV named .parquet given as predictions (evaluate)", _not_parquet,
         (*_EVALUATE, "--root", "{root}"), 2, "is not a parquet file", "clean error naming the file"),
    Case("evaluate-bootstrap-0", "evaluate --bootstrap 0", _evaluation_project,
         (*_EVALUATE, "--bootstrap", "0", "--root", "{root}"), 0, "macro AUROC 0.",
         "accepted: point estimates only, no SD or CI (shown as -)"),
    Case("evaluate-by-unknown-column", "evaluate --by a column no manifest has", _evaluation_project,
         (*_EVALUATE, "--by", "nonexistent", "--root", "{root}"), 2,
         "--by column 'nonexistent' is neither a manifest column nor derived", "clean error listing the known columns"),
    Case("compare-metrics-not-json", "compare with a metrics file that is not JSON",
         _metrics_edited(lambda text: "{not json"), _COMPARE, 2, "is not a metrics JSON", "clean error naming the file"),
    Case("compare-metrics-foreign", "compare with a JSON file not written by evaluate",
         _metrics_edited(lambda text: "{}"), _COMPARE, 2, "is not written by `cxrsynth evaluate`",
         "clean error naming what it lacks"),
    Case("compare-other-findings", "compare of metrics of other findings (edema dropped from one)",
         _metrics_edited(_without_edema), _COMPARE, 2, "has metrics of other findings",
         "clean error naming both finding lists"),
    Case("classifier-finding-without-positive", "classifier train on data where 13 findings have no positive label",
         _garbage_site, (*_CLASSIFIER, "--root", "{root}"), 0, "written to",
         "trained; each finding without a positive (or negative) label is named in a warning",
         check=_warned_once("13 finding(s) have no positive training label")),
    Case("classifier-preset-unknown", "classifier train --preset huge9", _garbage_site,
         (*_CLASSIFIER, "--preset", "huge9", "--root", "{root}"), 2, "unknown classifier preset 'huge9'; known:",
         "clean error listing the presets"),
    Case("classifier-data-unknown", "classifier train --data of a dataset that does not exist", _garbage_site,
         ("classifier", "train", "--data", "nope", "--out", "{tmp}/clf", "--root", "{root}"), 2,
         "no manifest named 'nope'", "clean error listing the datasets"),
    Case("study-compare-unknown-family", "study compare of a family params.yaml does not define", _study_baseline_only,
         ("study", "compare", "nofamily", "--root", "{root}"), 2, "unknown study family 'nofamily'; known:",
         "clean error listing the families"),
)
