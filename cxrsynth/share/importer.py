"""``cxrsynth share import``: an untrusted package → a registered synthetic dataset.

A package comes from another site, so nothing in it is believed before it is checked:

1. :func:`cxrsynth.share.package.check` re-hashes every file against ``index.json`` (a
   missing, changed or extra file, or a link, stops the import);
2. the manifest may only hold the project's columns; every row must be synthetic, carry no
   patient, study, path or source key, have a valid unique key, and point (``shard``) at
   nothing but a listed ``shards/*.tar`` of the package;
3. every shard is read with the safe tar reader (:func:`~cxrsynth.share.package.read_tar`:
   flat ``<key>.png`` / ``<key>.json`` regular files only), each JSON member must equal its
   manifest row, each PNG must be an 8-bit grayscale PNG of sane size, and samples and rows
   must match one to one;
4. the dataset is published (:func:`cxrsynth.publish.publish`, ``kind = synthetic``) with
   the package's public metadata kept as provenance under ``imported``, and the name, sample
   count, size and sha256 of each shard as checked here (``imported.package.shards``), which
   ``cxrsynth verify`` holds the shards to afterwards (a package used in place may be changed
   later by whoever can write its folder, index included); shards stay in the
   package (``shard`` paths relative to the project root when the package is inside it) or
   are copied to ``data/shards/<name>/<version>/`` (``copy``), where ``cxrsynth verify``
   checks them like any other version.

The dataset deliberately records no ``conditions`` and no ``generator`` path: those name the
sender's datasets and folders, which mean nothing (or something else) here. So ``mix`` uses
it only when named (``--synthetic-from NAME``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pandas as pd

from cxrsynth import imaging, labels, manifest, publish, shards
from cxrsynth import store as store_lib
from cxrsynth.share import package
from cxrsynth.share.package import ShareError, UnsafePackage

#: Columns a package row must leave null: identifiers of real patients and links to real rows.
IDENTIFIERS = ("patient_id", "study_id", "source_path", "source_key")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Largest image side accepted (the paper's images are 256 px).
MAX_SIDE = 4096
#: Fewest bytes a sample takes in a tar: two member headers and two data blocks.
MIN_SAMPLE_BYTES = 4 * 512
MAX_REPLICA = 10_000
VIEW_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _read_manifest(directory: Path, max_rows: int) -> tuple[pd.DataFrame, dict]:
    """The package's manifest; refused before its rows are read when its footer claims more
    rows than the package's shards could hold (a 405 KB file of 5 million rows took 3.5 GB)."""
    import pyarrow.parquet as pq

    path = directory / package.MANIFEST
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # an untrusted file: any parse failure is a refusal, with its reason
        raise UnsafePackage(f"{package.MANIFEST}: not a readable parquet file ({exc})") from None
    if rows > max_rows:
        raise UnsafePackage(f"{package.MANIFEST}: {rows} rows, more than the package's shards can hold ({max_rows} samples "
                            f"of at least {MIN_SAMPLE_BYTES} bytes); refused before reading them")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # an untrusted file: any parse failure is a refusal, with its reason
        raise UnsafePackage(f"{package.MANIFEST}: not a readable parquet file ({exc})") from None
    unknown = [c for c in table.column_names if c not in manifest.COLUMNS]
    if unknown:
        raise UnsafePackage(f"{package.MANIFEST}: columns the manifest schema does not have: {', '.join(unknown)}")
    for required in ("key", "origin", "replica", "split"):
        if required not in table.column_names:
            raise UnsafePackage(f"{package.MANIFEST}: no {required!r} column")
    try:
        frame = manifest.conform(table.to_pandas())
    except Exception as exc:  # a column of the wrong type
        raise UnsafePackage(f"{package.MANIFEST}: columns of the wrong type ({exc})") from None
    raw = (table.schema.metadata or {}).get(b"cxrsynth", b"{}")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UnsafePackage(f"{package.MANIFEST}: its cxrsynth metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise UnsafePackage(f"{package.MANIFEST}: its cxrsynth metadata is not a JSON object")
    return frame.to_pandas(types_mapper=pd.ArrowDtype).pipe(manifest._to_nullable), meta


def check_rows(frame: pd.DataFrame, listed: set[str]) -> None:
    """Refuse rows that are not synthetic, carry identifiers, have bad keys or point outside the package."""
    keys = frame["key"].astype("string")
    bad = keys[~keys.fillna("").str.fullmatch(package.KEY_PATTERN.pattern)]
    if len(bad):
        raise UnsafePackage(f"{package.MANIFEST}: key {bad.iloc[0]!r} is not [A-Za-z0-9_-]+")
    if keys.duplicated().any():
        raise UnsafePackage(f"{package.MANIFEST}: key {keys[keys.duplicated()].iloc[0]!r} appears twice")
    origin = frame["origin"].astype("string").fillna("")
    if (origin != "synthetic").any():
        raise UnsafePackage(f"{package.MANIFEST}: {int((origin != 'synthetic').sum())} row(s) are not synthetic "
                            f"(e.g. {keys[origin != 'synthetic'].iloc[0]!r}, origin {origin[origin != 'synthetic'].iloc[0]!r})")
    for column in IDENTIFIERS:
        filled = frame[column].notna()
        if filled.any():
            raise UnsafePackage(f"{package.MANIFEST}: {int(filled.sum())} row(s) carry {column} "
                                f"(e.g. row {keys[filled].iloc[0]!r}): a package may not hold real identifiers")
    for key, shard in zip(keys, frame["shard"].astype("string")):
        if pd.isna(shard):
            continue
        if not (package.safe_relative(shard) and shard.startswith(f"{package.SHARDS}/") and shard.count("/") == 1
                and shard.endswith(".tar") and shard in listed):
            raise UnsafePackage(f"{package.MANIFEST}: row {key!r} points at {shard!r}, which is not a listed "
                                f"{package.SHARDS}/*.tar of the package")


def check_png(key: str, data: bytes, side: int | None) -> int:
    """Side of a square 8-bit grayscale PNG that decodes, refusing anything else.

    Refused: not a PNG, a failed CRC, bytes after IEND (a PNG padded with junk), any chunk
    but the image's own (a text chunk may carry an identifier), another size than ``side``
    (the package's recorded image size), more bytes than such an image can compress to, and
    pixels that do not decode.
    """
    where = f"sample {key!r}: its png member"
    try:
        width, height, depth, colour = astuple(imaging.png_header(data))
        chunks, end = imaging.png_chunks(data)
    except imaging.ImageError as exc:
        raise UnsafePackage(f"{where} is not a well-formed PNG ({exc})") from None
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or (depth, colour) != (8, 0) or width != height:
        raise UnsafePackage(f"{where} is {width}x{height}, bit depth {depth}, colour type {colour}; "
                            f"expected square 8-bit grayscale of at most {MAX_SIDE} px")
    if side is not None and width != side:
        raise UnsafePackage(f"{where} is {width} px; the package records image_size {side}")
    if end != len(data):
        raise UnsafePackage(f"{where} has {len(data) - end} bytes after its IEND chunk")
    extra = sorted({kind.decode("latin-1") for kind, _, _ in chunks} - {"IHDR", "IDAT", "IEND"})
    if extra:
        raise UnsafePackage(f"{where} holds chunk(s) {', '.join(extra)}: a package's images carry pixels only "
                            f"(text chunks may carry identifiers)")
    if len(data) > png_bound(width):
        raise UnsafePackage(f"{where} is {len(data)} bytes, more than a {width} px grayscale PNG needs ({png_bound(width)})")
    try:
        imaging.decode_png(data, key=key)
    except imaging.ImageError as exc:
        raise UnsafePackage(f"{where} does not decode: {exc}") from None
    return width


def png_bound(side: int) -> int:
    """Most bytes an 8-bit grayscale ``side`` px PNG takes: stored (uncompressed) deflate blocks of
    every row and its filter byte, plus chunk headers and a margin."""
    raw = side * (side + 1)
    return raw + 5 * (raw // 16_000 + 1) + 8_192


def check_values(frame: pd.DataFrame) -> None:
    """Refuse a cell no cxrsynth export writes: a label outside {1, 0, -1}, a sex, race, split or view
    outside the contract, an age outside [0, 120], a replica, guidance, steps, sampler or
    generator id that is not one. A partner's values flow into training and SQL views."""
    keys = frame["key"].astype("string")

    def refuse(column: str, bad, expected: str) -> None:
        bad = pd.Series(bad, index=frame.index).fillna(False).to_numpy(dtype=bool)
        if bad.any():
            first = int(bad.argmax())
            raise UnsafePackage(f"{package.MANIFEST}: {int(bad.sum())} row(s) have {column} outside {expected} "
                                f"(e.g. row {keys.iloc[first]!r}: {frame[column].iloc[first]!r})")

    for column in labels.FINDING_COLUMNS:
        values = frame[column]
        refuse(column, values.notna() & ~values.isin([1, 0, -1]), "1, 0, -1 or blank")
    for column, allowed in (("sex", labels.SEXES), ("race", labels.RACES), ("split", labels.SPLITS)):
        values = frame[column].astype("string")
        refuse(column, values.notna() & ~values.isin(allowed), f"{', '.join(allowed)} or blank")
    age = frame["age"].astype("Float64")
    refuse("age", age.notna() & ~((age >= 0) & (age <= labels.AGE_MAX)), f"0..{labels.AGE_MAX} years or blank")
    view = frame["view"].astype("string")
    refuse("view", view.notna() & ~view.str.fullmatch(VIEW_PATTERN.pattern), "upper-case letters, digits and _ (AP, PA, LL)")
    replica = frame["replica"].astype("Int64")
    refuse("replica", replica.isna() | (replica < 0) | (replica > MAX_REPLICA), f"0..{MAX_REPLICA} (synthetic rows have one)")
    guidance = frame["guidance"].astype("Float64")
    refuse("guidance", guidance.notna() & ~((guidance >= 0) & (guidance <= 100)), "0..100 or blank")
    steps = frame["steps"].astype("Int64")
    refuse("steps", steps.notna() & ((steps < 1) | (steps > 100_000)), "1..100000 or blank")
    for column in ("sampler", "generator_id"):
        values = frame[column].astype("string")
        refuse(column, values.notna() & ~values.str.fullmatch(TOKEN_PATTERN.pattern), "[A-Za-z0-9_.-]{1,64} or blank")


def check_shards(directory: Path, frame: pd.DataFrame, files: dict[str, dict], side: int | None = None) -> list[shards.ShardResult]:
    """Read every listed shard safely; match samples to rows one to one; check every PNG
    (:func:`check_png`; all of one size, ``side`` when the package records it); the shards as results."""
    index_path = f"{package.SHARDS}/{shards.INDEX_NAME}"
    if index_path not in files:
        raise UnsafePackage(f"the package has no {index_path}")
    try:
        shard_index = json.loads((directory / index_path).read_text())
        entries = shard_index["shards"]
        names = [str(e["name"]) for e in entries]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UnsafePackage(f"{index_path}: not a shard index") from None
    tars = sorted(p for p in files if p.startswith(f"{package.SHARDS}/") and p.endswith(".tar"))
    if sorted(f"{package.SHARDS}/{n}" for n in names) != tars:
        raise UnsafePackage(f"{index_path} lists {names}, the package holds {[t.split('/', 1)[1] for t in tars]}")
    rows = {k: r for k, r in zip(frame["key"].astype(str), shards.sample_records(frame))}
    shard_col = dict(zip(frame["key"].astype(str), frame["shard"].astype("string")))
    seen: dict[str, str] = {}
    results = []
    for entry in entries:
        rel = f"{package.SHARDS}/{entry['name']}"
        if not (package.safe_relative(rel) and rel.count("/") == 1):
            raise UnsafePackage(f"{index_path}: shard name {entry['name']!r} is not a plain file name")
        if entry.get("sha256") != files[rel]["sha256"]:
            raise UnsafePackage(f"{index_path}: sha256 of {entry['name']} differs from index.json's")
        keys = []
        for sample in package.samples(directory / rel):
            key = sample["__key__"]
            if key in seen:
                raise UnsafePackage(f"{entry['name']}: sample {key!r} is also in {seen[key]}")
            if key not in rows:
                raise UnsafePackage(f"{entry['name']}: sample {key!r} has no manifest row")
            where = shard_col.get(key)
            if where is not None and not pd.isna(where) and where != rel:
                raise UnsafePackage(f"{entry['name']}: sample {key!r}'s manifest row points at {where!r}")
            try:
                member = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UnsafePackage(f"{entry['name']}: member {key}.json is not JSON") from None
            expected = json.loads(shards.json_bytes({k: rows[key][k] for k in shards.SAMPLE_FIELDS}))
            if expected != member:
                differ = sorted(k for k in set(expected) | set(member) if expected.get(k) != member.get(k))
                raise UnsafePackage(f"{entry['name']}: member {key}.json differs from its manifest row in {', '.join(differ)}")
            side = check_png(key, sample["png"], side)
            seen[key] = entry["name"]
            keys.append(key)
        if len(keys) != entry.get("count"):
            raise UnsafePackage(f"{index_path}: {entry['name']} holds {len(keys)} samples, the index says {entry.get('count')}")
        results.append(shards.ShardResult(name=entry["name"], count=len(keys), bytes=files[rel]["bytes"],
                                          sha256=files[rel]["sha256"], keys=keys))
    missing = [k for k in rows if k not in seen]
    if missing:
        raise UnsafePackage(f"{len(missing)} manifest row(s) have no image in any shard, e.g. {missing[0]!r}")
    return results


def import_package(root: str | Path, directory: str | Path, name: str, *, copy: bool = False,
                   force: bool = False, store: str | None = None) -> dict[str, Any]:
    """Verify and check package ``directory``, then register it as synthetic dataset ``name``.

    Holds the dataset's writer lock (:func:`cxrsynth.publish.writer_lock`) for the whole import.

    Args:
        root: Project root.
        directory: The package folder.
        name: Dataset name (must not exist yet, unless ``force``).
        copy: Copy the shards to ``data/shards/<name>/<version>/``; else use them in place.
        force: Replace an existing dataset ``name`` (of any kind).
        store: With ``copy``: publish the copied shards to this fsspec URL
            (:func:`cxrsynth.publish.publish`); a package used in place stays where it is.

    Returns:
        ``{"name", "version", "images", "shards", "shard_dir", "manifest"}``.

    Raises:
        CheckFailed: the package does not match its index.
        UnsafePackage: a member or row the package may not hold (named, with the reason).
        ShareError: ``name`` exists already (and not ``force``).
    """
    root, directory = Path(root), Path(directory)
    manifest.check_name(name)
    if store and not copy:
        raise ShareError(f"--store {store}: only a copied package is published to a store (add --copy); a package "
                         f"imported in place is used where it is")
    with publish.writer_lock(root, name):
        return _import(root, directory, name, copy=copy, force=force, store=store or None)


def _import(root: Path, directory: Path, name: str, *, copy: bool, force: bool, store: str | None = None) -> dict[str, Any]:
    if manifest.manifest_path(root, name).exists() and not force:
        raise ShareError(f"a dataset named {name!r} exists already; choose another --name (or --force to replace it)")
    publish.check_target(root, name, "synthetic", force=force)
    index = package.check(directory)
    files = {e["path"]: e for e in index["files"]}
    version = str(index.get("version", ""))
    if not VERSION_PATTERN.fullmatch(version):
        raise UnsafePackage(f"{package.INDEX}: version {version!r} is not [A-Za-z0-9_-]{{1,64}}")
    for required in (package.MANIFEST, package.DATASHEET):
        if required not in files:
            raise UnsafePackage(f"the package has no {required}")
    tar_bytes = sum(int(e["bytes"]) for p, e in files.items() if p.startswith(f"{package.SHARDS}/") and p.endswith(".tar"))
    frame, public = _read_manifest(directory, tar_bytes // MIN_SAMPLE_BYTES)
    check_rows(frame, set(files))
    check_values(frame)
    side = public.get("image_size") if isinstance(public.get("image_size"), int) else None
    results = check_shards(directory, frame, files, side)

    rows = frame.assign(dataset=name, version=version)
    # the shards as checked now: verify holds them to this, not to what the package's index says later
    recorded = [{"name": r.name, "count": r.count, "bytes": r.bytes, "sha256": r.sha256} for r in results]
    provenance = {"package": {"name": index.get("name"), "version": version, "images": len(rows),
                              "index_sha256": shards.sha256_file(directory / package.INDEX), "copied": copy,
                              "shards": recorded},
                  "sender": public}
    splits = sorted(str(s) for s in rows["split"].dropna().unique())
    made_by = {"imported": provenance, "split": splits[0] if len(splits) == 1 else None,
               "generator_id": (public.get("generator") or {}).get("id") if isinstance(public.get("generator"), dict) else None}
    meta = publish.Metadata(dataset=name, version=version, kind="synthetic", made_by=made_by)
    if copy:
        target = shards.shard_dir(root, name, version)
        target.mkdir(parents=True, exist_ok=True)
        for r in results:
            tmp = target / f"{r.name}.partial"
            shutil.copyfile(directory / package.SHARDS / r.name, tmp)
            if shards.sha256_file(tmp) != r.sha256:
                raise package.CheckFailed(f"{r.name} changed while it was copied")
            os.replace(tmp, target / r.name)
        published = publish.publish(root, meta, rows, shard_results=results, force=force, store=store)
        shard_dir = store_lib.join(store, shards.SHARD_ROOT.as_posix(), name, version) if store else target
    else:
        shard_dir = (directory / package.SHARDS).resolve()
        base = root.resolve()
        where = shard_dir.relative_to(base) if base in shard_dir.parents else shard_dir
        shard_of = {k: str(where / r.name) for r in results for k in r.keys}
        published = publish.publish(root, meta, rows.assign(shard=rows["key"].map(shard_of).astype("string")), force=force)
    return {"name": name, "version": version, "images": len(rows), "shards": len(results), "shard_dir": str(shard_dir),
            "manifest": str(published.manifest)}
