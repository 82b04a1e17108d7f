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
        return "cxrsynth " + " ".join(a if a and " " not in a else json.dumps(a) for a in args)


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
# The table.

_IMPORT = ("generator", "import-mediffusion", "{ckpt}", "--config", "{config}", "--out", "{out}")


def _ingest(*options: str) -> tuple[str, ...]:
    """``ingest chexpert`` of ``{csv}`` as ``cxp`` at 32 px in-process, ``options`` first."""
    given = set(options[::2])
    defaults = [o for opt, v in (("--size", str(SIDE)), ("--workers", "1")) if opt not in given for o in (opt, v)]
    return ("ingest", "chexpert", "{csv}", "--name", "cxp", *options, *defaults, "--root", "{root}")


_INGEST = _ingest()

CASES: tuple[Case, ...] = (
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
)
