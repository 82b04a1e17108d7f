"""``cxrsynth share export``: a synthetic dataset → a self-contained package with no real identifier.

What a synthetic row carries today and what the export does with it:

* ``key`` ``<name>-r<replica>-<row>``: ``row`` is the position of the real source row among
  the sorted condition keys, which anyone holding the source table (CheXpert is public) can
  rebuild. Exported keys are ``<name>-r<replica>-<ordinal>``, the ordinal set by the order
  of ``HMAC-SHA256(secret, original key)`` within the replica; the secret is never exported
  (a fresh random one per export unless ``secret_file`` names one, for repeatable exports).
  Samples are written in the new key order, so shard order reveals nothing either.
* ``source_key`` (the real key, embedding the CheXpert patient id): dropped.
* ``seed``: ``blake2b(base seed, replica, source key)`` — a dictionary of candidate real
  keys inverts it. Dropped; the base seed stays in the metadata.
* ``age``: the real patient's exact age. The generator is conditioned on ``age // 10``
  only, so the export keeps the decade (``10 * (age // 10)``): the image depends on
  nothing more.
* ``patient_id``, ``study_id``, ``source_path``: null for synthetic rows already; kept null.
* ``shard``: the exported shard, relative to the package folder (``shards/<name>-000000.tar``).
* JSON members are rebuilt from the scrubbed row; PNG members keep only their image chunks.
* Metadata: generator id, preset and training data name@version, conditions name@version
  and split, sampler, steps, guidance, base seed; no filesystem path.

Before writing, the memorization audit (:mod:`cxrsynth.share.audit`) runs against the real
images the generator learnt from (``audit_against``, or by default the training data named
in the generator's ``generator.json``, else the conditions dataset, each at the split the
replicas were conditioned on) and the gate (:mod:`cxrsynth.share.gate`) refuses the export
when more pairs are flagged than chance explains (a one-sided binomial test at ``gate.alpha``)
or any pair is a copy outright, unless ``force``; the datasheet records the test, its result
and the decision (an override included). The
package is written to ``OUT.partial`` and renamed when complete (``index.json`` last), so an
interrupted export leaves nothing that ``share verify`` accepts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cxrsynth import __version__, imaging, manifest, shards, store
from cxrsynth.config import SHARD_SIZE, Config, setting
from cxrsynth.errors import CheckFailed
from cxrsynth.share import audit as audit_lib
from cxrsynth.share import datasheet, package
from cxrsynth.share.gate import GateConfig, MemorizationError, decide
from cxrsynth.share.package import ShareError

#: Manifest columns an export never fills (real identifiers and links back to real rows).
DROPPED = ("patient_id", "study_id", "source_path", "source_key", "seed")
AUDIT_ROOT = Path("data") / "audits"


@dataclass(frozen=True)
class ExportConfig(Config):
    """How an export is made (its public part is recorded in the package metadata).

    Attributes:
        audit_against: Real dataset the generator learnt from; None: read it from the metadata.
        gate: When the audit refuses the export (binomial test level, optional cap on the flagged count).
        force: Export even when the gate refuses, or the audit cannot run (the datasheet says so).
        secret_file: File with the key-renumbering secret (>= 16 bytes); None: a random one.
        shard_size: Samples per exported shard.
        audit: The audit's settings (its ``split`` becomes ``audit_split``).
        audit_split: Training split of ``audit_against``; None: the split the replicas were conditioned on.
        audit_out: Folder for the audit's files (real keys and images: never in the package);
            default ``<root>/data/audits/<name>``.
        keymap: Optional parquet file to write (exported key → original key), kept locally.
    """

    kind = "export config"  # how errors name these settings (a class attribute, not a field)

    audit_against: str | None = None
    gate: GateConfig = field(default_factory=GateConfig)
    force: bool = False
    secret_file: Path | None = None
    shard_size: int = setting(SHARD_SIZE, ge=1)
    audit: audit_lib.AuditConfig = field(default_factory=audit_lib.AuditConfig)
    audit_split: str | None = None
    audit_out: Path | None = None
    keymap: Path | None = None


def read_secret(path: Path | None) -> tuple[bytes, str]:
    """The renumbering secret and how it was chosen."""
    if path is None:
        return os.urandom(32), "a random secret drawn for this export and kept nowhere"
    data = Path(path).read_bytes().strip()
    if len(data) < 16:
        raise ShareError(f"{path}: a key secret needs at least 16 bytes, it has {len(data)}")
    return data, "a secret kept by the sender (not exported)"


def ensure_secret(path: str | Path) -> bool:
    """Write a fresh random renumbering secret (64 hex digits, owner-only) to ``path`` unless it exists.

    Returns whether it was created. A pipeline draws it once and passes it as ``secret_file``
    to every later export, so repeated exports of the same data are byte-identical; the file
    stays local (never a pushed output), which is what keeps exported keys unlinkable.
    """
    path = Path(path)
    if path.exists():
        read_secret(path)  # an existing one must be usable
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(os.urandom(32).hex() + "\n")
    return True


def _resolve_generator(root: Path, path: str | None) -> Path | None:
    if not path:
        return None
    candidates = [Path(path)] if Path(path).is_absolute() else [root / path, Path.cwd() / path]
    return next((p for p in candidates if (p / "generator.json").is_file()), None)


def generator_facts(root: Path, meta: dict) -> dict[str, Any]:
    """Generator id, preset and training data (``NAME@VERSION``) of a synthetic dataset, as far as recorded."""
    facts: dict[str, Any] = {"id": meta.get("generator_id"), "preset": None, "trained_on": None, "trained_steps": None}
    directory = _resolve_generator(root, meta.get("generator"))
    if directory is not None:
        info = json.loads((directory / "generator.json").read_text())
        facts.update(preset=info.get("preset"), trained_on=info.get("data_version"), trained_steps=info.get("trained_steps"))
    return facts


def audit_target(root: Path, meta: dict, gen: dict, given_split: str | None = None) -> tuple[str | None, str | None, str]:
    """The real dataset and split a synthetic dataset's generator learnt from, and how that was decided
    (``given_split``: the training split named by the caller, ``--split``)."""
    split = given_split or meta.get("split") or "train"
    known = set(manifest.list_names(root))
    trained_on = gen.get("trained_on")
    if trained_on and "@" in str(trained_on):
        name, version = str(trained_on).rsplit("@", 1)
        if name not in known:
            return None, None, f"the generator was trained on {trained_on}, which has no manifest here"
        current = manifest.read_meta(root, name).get("version")
        if current != version:
            return None, None, f"the generator was trained on {trained_on}; {name} is now version {current}"
        if given_split:
            return name, split, f"the generator's training data {trained_on} (generator.json), split {split} as given"
        return name, split, (f"the generator's training data {trained_on} (generator.json); it records no split, so the "
                             f"split the replicas were conditioned on ({split}) stands for it")
    conditions = meta.get("conditions")
    if conditions and conditions in known:
        return conditions, split, (f"the generator records no training data; the conditions dataset {conditions} split "
                                   f"{split} stands for it")
    return None, None, "neither the generator's training data nor the conditions dataset is known here"


def renumber(frame: pd.DataFrame, name: str, secret: bytes) -> pd.Series:
    """New keys ``<name>-r<replica>-<ordinal>``: ordinals in ``HMAC(secret, key)`` order within each replica."""
    tags = [hmac.new(secret, str(k).encode(), hashlib.sha256).hexdigest() for k in frame["key"]]
    replica = frame["replica"].fillna(0).astype(int).to_numpy()
    ordinal = pd.Series(tags, index=frame.index).groupby(replica).rank(method="first").astype(int) - 1
    return pd.Series([f"{name}-r{r:02d}-{o:07d}" for r, o in zip(replica, ordinal)], index=frame.index, dtype="string")


def scrub(frame: pd.DataFrame, name: str, version: str, secret: bytes) -> pd.DataFrame:
    """The exported rows: renumbered keys, no identifier or link, age decades; sorted by key."""
    out = frame.copy()
    out["original_key"] = out["key"].astype(str)
    out["original_shard"] = out["shard"].astype(str)
    out["key"] = renumber(frame, name, secret)
    out["dataset"] = name
    out["version"] = version
    for column in (*DROPPED, "shard"):
        out[column] = pd.NA
    age = pd.to_numeric(out["age"], errors="coerce")
    out["age"] = (np.floor(age / 10.0) * 10.0).astype("Float64")
    return out.sort_values("key", kind="stable").reset_index(drop=True)


def _locate(located: dict[str, str], shard_paths: pd.Series, handles: dict) -> dict[str, tuple[str, shards.Member]]:
    """Original key → (shard location, header) of its PNG member, from the tar headers
    (``located``: shard → local path or store URL, :func:`cxrsynth.store.locations`). A store's
    shard is opened here, once (a checked temporary copy), and kept in ``handles`` for the reads."""
    where: dict[str, tuple[str, shards.Member]] = {}
    for shard in sorted(shard_paths.astype(str).unique()):
        path = located[shard]
        if store.is_remote(path):
            handles[path] = shards.open_tar(path)
        for member in shards.headers(path, handles.get(path)):
            key, _, ext = member.name.partition(".")
            if ext == "png":
                where[key] = (str(path), member)
    return where


def _samples(rows: pd.DataFrame, where: dict[str, tuple[str, shards.Member]], handles: dict) -> list[dict]:
    out = []
    for record, original in zip(shards.sample_records(rows), rows["original_key"]):
        if original not in where:
            raise ShareError(f"image of {original} not found in its shard")
        path, member = where[original]
        if path not in handles:
            handles[path] = shards.open_tar(path)  # a store's object: one checked download, then read in place
        png = package.strip_png(shards.read_member(handles[path], member, path))
        meta = {k: record[k] for k in shards.SAMPLE_FIELDS}
        out.append({"__key__": record["key"], "png": png, "json": shards.json_bytes(meta)})
    return out


def _write_shards(located: dict[str, str], rows: pd.DataFrame, directory: Path, name: str, version: str, shard_size: int,
                  progress: Callable[[int], None] | None) -> list[shards.ShardResult]:
    handles: dict = {}
    try:
        where = _locate(located, rows["original_shard"], handles)
        results = []
        for unit, start in enumerate(range(0, len(rows), shard_size)):
            part = rows.iloc[start : start + shard_size]
            results.append(shards.write_shard(directory, name, unit, _samples(part, where, handles)))
            if progress:
                progress(len(part))
    finally:
        for handle in handles.values():
            handle.close()
    shards.write_index(directory, name, version, results)
    shutil.rmtree(directory / shards.PROGRESS_DIR, ignore_errors=True)  # progress records are for resuming, not for receivers
    return results


def public_meta(meta: dict, gen: dict, name: str, version: str, rows: pd.DataFrame, image_size: int | None,
                training_meta: dict | None) -> dict[str, Any]:
    """The metadata a receiver needs: what made the images, without any path or identifier."""
    return {
        "dataset": name,
        "version": version,
        "kind": "export",
        "origin": "synthetic",
        "images": len(rows),
        "image_size": image_size,
        "replicas": sorted(int(r) for r in rows["replica"].dropna().unique()),
        "source": {"dataset": meta.get("dataset"), "version": meta.get("version")},
        "generator": {k: gen.get(k) for k in ("id", "preset", "trained_on", "trained_steps")},
        "conditions": {"name": meta.get("conditions"), "version": meta.get("conditions_version"), "split": meta.get("split")},
        "sampling": {k: meta.get(k) for k in ("sampler", "steps", "guidance", "eta", "cfg_formula", "seed", "replicas")},
        "preprocess": (training_meta or {}).get("preprocess"),
        "scrubbed": {"dropped": list(DROPPED), "age": "decade (10 * (age // 10)), what the generator was conditioned on",
                     "keys": "renumbered within each replica in the order of HMAC-SHA256(secret, original key)"},
        "cxrsynth": __version__,
    }


def export(
    root: str | Path,
    name: str,
    out: str | Path,
    config: ExportConfig = ExportConfig(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export synthetic dataset ``name`` as a package in ``out`` (which must not exist).

    Returns:
        ``{"out", "version", "images", "shards", "audit": public summary or None, "audit_dir", "forced"}``.

    Raises:
        ShareError: ``name`` has real rows or no images, ``out`` exists, or no audit can run unforced.
        MemorizationError: the gate refused (more flagged than chance explains, or a copy; without ``force``).
    """
    from cxrsynth.verify import verify_dataset

    say = progress or (lambda message: None)
    root, out = Path(root), Path(out)
    frame = manifest.read(root, name)
    meta = manifest.read_meta(root, name)
    real = int((frame["origin"].astype("string").fillna("") != "synthetic").sum())
    if real:
        raise ShareError(f"{name} has {real} real row(s) (origin is not 'synthetic'): "
                         "only purely synthetic datasets are exported")
    if frame.empty or frame["shard"].isna().any():
        raise ShareError(f"{name}: {int(frame['shard'].isna().sum())} of {len(frame)} rows have no image (labels-only?)")
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise ShareError(f"{out} exists: remove it or choose another --out")
    for keymap in [config.keymap] if config.keymap else []:
        if out.resolve() in Path(keymap).resolve().parents or partial.resolve() in Path(keymap).resolve().parents:
            raise ShareError(f"--keymap {keymap} would be inside the package: the key map links exported keys to real ones")
    problems, _ = verify_dataset(root, name)
    if problems:
        raise CheckFailed(f"{name} does not match its index; fix it before exporting: " + "; ".join(problems))

    secret, secret_how = read_secret(config.secret_file)  # before the audit: a missing secret file fails in a second
    gen = generator_facts(root, meta)
    if config.audit_against:
        against, split, how = config.audit_against, meta.get("split") or "train", "given with --audit-against"
    else:
        against, split, how = audit_target(root, meta, gen, config.audit_split)
    split = config.audit_split or split
    summary, public, audit_dir, decision = None, None, None, ""
    if against is None:
        if not config.force:
            raise ShareError(f"cannot audit {name} for memorization: {how}; pass --audit-against TRAINING "
                             f"(or --force to export it unaudited, which the datasheet records)")
        decision = f"Exported unaudited with --force ({how})."
    else:
        audit_dir = Path(config.audit_out) if config.audit_out else root / AUDIT_ROOT / name
        say(f"auditing {name} against {against} split {split} ({how})")
        audit_config = config.audit.override(split=split)
        summary = audit_lib.audit(root, name, against, audit_dir, audit_config, progress=say)
        public = audit_lib.public_summary(summary)
        public["target"] = how
        verdict = decide(summary, config.gate)
        public["gate"] = verdict.public()
        if not verdict.passed:
            where = f"{audit_dir / 'pairs.png'} and {audit_dir / audit_lib.AUDIT_JSON}"
            if not config.force:
                raise MemorizationError(verdict.refusal(name, where))
            decision = (f"Exported with --force although the gate refused it: {' and '.join(verdict.reasons)}; "
                        f"the sender reviewed the pairs ({verdict.test_text()}).")
        else:
            decision = f"Passed the gate: {verdict.test_text()}."

    version = hmac.new(secret, f"export:{meta.get('version')}:{config.shard_size}".encode(), hashlib.sha256).hexdigest()[:10]
    rows = scrub(frame, name, version, secret)
    training_meta = manifest.read_meta(root, against) if against else None
    info = public_meta(meta, gen, name, version, rows, _png_side_of(root, frame), training_meta)
    info["scrubbed"]["secret"] = secret_how
    info["audit"] = public if public is not None else {"audited": False, "why": how}
    info["export_decision"] = decision
    info["forced"] = bool(config.force and decision.startswith("Exported"))

    if partial.exists():
        shutil.rmtree(partial)  # an interrupted export of ours: never trusted, never resumed
    partial.mkdir(parents=True)
    say(f"writing {len(rows)} images to {partial}")
    results = _write_shards(store.locations(root, frame), rows, partial / package.SHARDS, name, version, config.shard_size,
                            None)
    shard_of = {k: f"{package.SHARDS}/{r.name}" for r in results for k in r.keys}
    rows["shard"] = rows["key"].map(shard_of).astype("string")  # relative to the package folder
    table = manifest.conform(rows.drop(columns=["original_key", "original_shard"]))
    _write_parquet(table, info, partial / package.MANIFEST)
    (partial / package.DATASHEET).write_text(datasheet.render(rows, info))
    package.write_index(partial, {"name": name, "version": version, "kind": "export", "images": len(rows),
                                  "cxrsynth": __version__})
    if config.keymap:
        _write_keymap(Path(config.keymap), rows)
    os.replace(partial, out)
    return {"out": str(out), "version": version, "images": len(rows), "shards": len(results), "audit": public,
            "audit_dir": str(audit_dir) if audit_dir else None, "forced": info["forced"], "decision": decision}


def _png_side_of(root: Path, frame: pd.DataFrame) -> int | None:
    for _, png in shards.images(root, frame.head(1), strict=False):
        return imaging.png_header(png).width
    return None


def _write_parquet(table, info: dict, path: Path) -> None:
    """The manifest, uncompressed (a byte scan or grep sees every value), with only the public metadata."""
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({"cxrsynth": json.dumps(info, sort_keys=True, default=str)})
    pq.write_table(table, path, compression="none")


def _write_keymap(path: Path, rows: pd.DataFrame) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"exported_key": rows["key"].astype(str), "original_key": rows["original_key"].astype(str)}), path)
