"""``cxrsynth verify``: a dataset's manifest, shards and index against each other.

What is checked, for dataset ``name``:

1. the manifest's recorded identity (:func:`check_identity`): the dataset name in its
   metadata is the file's name (a manifest copied or renamed over another dataset's shows),
   its rows carry that name and the recorded version (a mix's rows: each source's mixed
   version), and the checksum of the rows its writer recorded (``rows_sha256``,
   :func:`cxrsynth.manifest.rows_checksum`) is there and equal: any edit made outside
   cxrsynth shows, also one by a tool that drops the metadata (DuckDB's ``COPY ... TO``);
2. every shard folder the ``shard`` column points at (``data/shards/<name>/<version>/``,
   or a package's ``shards/`` folder for a dataset imported in place): its ``index.json``,
   each listed shard's size and sha256, and the manifest's rows per shard against the
   index counts (for a dataset published to a store, ``<store>/data/shards/...``, each
   object streamed and hashed); for an imported dataset, each shard also against the size and sha256
   recorded at import (``imported.package.shards``), so a package changed in place after
   its import (a swapped image, its index re-hashed by the sender) shows;
3. every manifest row against its shard's sample: the key is there, and the JSON member's
   labels and demographics equal the manifest's (each mismatch names the key and column);
4. for a mix (rows drawn from other datasets), 3. on its rows and 1.-3. on each source,
   whose version must still be the one mixed. A cycle of sources (a dataset that is its
   own source, written before that was refused) is reported, not followed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from cxrsynth import labels, manifest, shards, store

#: Columns of a row that its shard's JSON member must hold unchanged.
CHECKED_COLUMNS: tuple[str, ...] = ("sex", "age", "race", "view", *labels.FINDING_COLUMNS)


def verify_dataset(root: str | Path, name: str, _path: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """Check dataset ``name`` (see the module docstring); return ``(problems, shards checked)``."""
    root = Path(root)
    frame = manifest.read(root, name)
    meta = manifest.read_meta(root, name)
    problems = check_identity(root, name, frame, meta)
    checked = 0
    missing = [c for c in manifest.COLUMNS if c not in frame.columns]
    if missing:  # rewritten by a tool that dropped columns: nothing below can be read row by row
        return problems + [f"{manifest.manifest_path(root, name)}: no column(s) {', '.join(missing)}"], checked
    if meta.get("kind") == "mix":  # a mix owns no shards: verify the datasets it draws from
        chain = (*_path, name)
        for source, version in (meta.get("sources") or {}).items():
            if source.lower() in {c.lower() for c in chain}:
                problems.append(f"cycle of sources: {' -> '.join((*chain, source))} (written before that was refused); "
                                f"rewrite {name} from other sources")
                continue
            now = manifest.read_meta(root, source).get("version")
            if now != version:
                problems.append(f"{name} was mixed from {source}@{version}, which is now @{now}")
            found, n = verify_dataset(root, source, chain)
            problems += found
            checked += n
        return problems + check_rows(root, frame.loc[frame["shard"].notna()]), checked
    if meta.get("labels_only"):
        return problems, 0  # labels-only: no shards to verify
    with_shard = frame.loc[frame["shard"].notna()]
    folders: dict[Path, dict[str, int]] = {}
    for shard, count in with_shard["shard"].astype(str).value_counts().items():
        folders.setdefault(Path(shard).parent, {})[Path(shard).name] = int(count)
    if not folders:  # no row has a shard: the version's own folder (every image rejected, or rows lost);
        # a split version's shards are those of the version it was split from
        folders[shards.shard_dir(".", name, str(meta.get("split_of") or meta.get("version")))] = {}
    recorded = _recorded_at_import(meta)
    if recorded is None and _imported_in_place(meta):
        problems.append(f"{name} was imported in place before cxrsynth recorded a package's shard hashes at import: its "
                        f"shards can only be checked against the sender's own index; import the package again")
    remote = store.dataset_store(root, name)
    for folder, counts in sorted(folders.items()):
        if remote is not None and not folder.is_absolute():  # published to a store: its objects, streamed
            problems += shards.verify(store.join(remote, folder.as_posix()), counts)
            checked += len(counts)
            continue
        directory = folder if folder.is_absolute() else root / folder
        problems += shards.verify(directory, counts)
        if recorded is not None:
            problems += _against_import(directory, counts, recorded)
        checked += len(counts)
    problems += check_rows(root, with_shard)
    return problems, checked


def check_identity(root: str | Path, name: str, frame: pd.DataFrame, meta: dict) -> list[str]:
    """What manifest ``name`` records about itself against its file name and rows.

    Returns:
        One problem each: no cxrsynth metadata at all; a recorded dataset name other than
        ``name``; rows of another dataset or version than recorded (for a mix: rows of a
        dataset it does not record as a source, or of another version of one); no recorded
        rows checksum, or one the rows no longer match.
    """
    root = Path(root)
    path = manifest.manifest_path(root, name)
    if not meta:
        return [f"{path}: no cxrsynth metadata (dataset, version, rows checksum): rewritten by another tool "
                f"(DuckDB, pandas...)? Restore it (git, DVC) or re-run the command that wrote it"]
    problems = []
    dataset, version = _strings(frame, "dataset"), _strings(frame, "version")
    if meta.get("dataset") != name:
        problems.append(f"{path}: it records dataset {meta.get('dataset')!r}, not {name!r}: a manifest copied or renamed "
                        f"from another dataset?")
    if meta.get("kind") == "mix":
        sources = meta.get("sources") if isinstance(meta.get("sources"), dict) else {}
        expected = pd.Series([sources.get(d) for d in dataset.fillna("")], index=frame.index, dtype="string")
        wrong = (version != expected).fillna(True).to_numpy(dtype=bool)
        what = "not a mixed version of one of its recorded sources " + \
            (", ".join(f"{d}@{v}" for d, v in sorted(sources.items())) or "(none)")
    else:
        wrong = ((dataset != name) | (version != str(meta.get("version")))).fillna(True).to_numpy(dtype=bool)
        what = f"not {name}@{meta.get('version')}, the dataset and version it records"
    if wrong.any():
        at = int(wrong.argmax())
        problems.append(f"{path}: {int(wrong.sum())} row(s) are {what}, e.g. {_strings(frame, 'key').iloc[at]} of "
                        f"{dataset.iloc[at]}@{version.iloc[at]}")
    recorded, computed = manifest.stored_checksum(root, name)
    if recorded is None:
        problems.append(f"{path}: no {manifest.CHECKSUM_KEY} recorded, so its rows cannot be checked: rewritten by "
                        f"another tool? Restore it (git, DVC) or re-run the command that wrote it")
    elif recorded != computed:
        problems.append(f"{path}: its rows differ from the checksum recorded when it was written "
                        f"({manifest.CHECKSUM_KEY} {recorded[:12]}…, now {computed[:12]}…): edited outside cxrsynth?")
    return problems


def _strings(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as strings; all null when a tool that rewrote the manifest dropped it."""
    if column in frame.columns:
        return frame[column].astype("string")
    return pd.Series(pd.NA, index=frame.index, dtype="string")


def _imported_in_place(meta: dict) -> bool:
    imported = meta.get("imported")
    return isinstance(imported, dict) and isinstance(imported.get("package"), dict) and \
        not imported["package"].get("copied")


def _recorded_at_import(meta: dict) -> dict[str, dict] | None:
    """Shard name → ``{name, count, bytes, sha256}`` recorded when the dataset was imported (None: not recorded)."""
    imported = meta.get("imported")
    package = imported.get("package") if isinstance(imported, dict) else None
    entries = package.get("shards") if isinstance(package, dict) else None
    if not isinstance(entries, list):
        return None
    return {str(e.get("name")): e for e in entries if isinstance(e, dict)}


def _against_import(directory: Path, counts: dict[str, int], recorded: dict[str, dict]) -> list[str]:
    """Each shard the rows use against its size and sha256 recorded at import."""
    problems = []
    for shard in sorted(counts):
        path = directory / shard
        entry = recorded.get(shard)
        if entry is None:
            problems.append(f"{path}: not among the shards recorded at import ({', '.join(sorted(recorded)) or 'none'})")
        elif not (isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            problems.append(f"{path}: what was recorded at import for it is not a size and a sha256 ({entry!r})")
        elif path.is_file():  # a missing shard is reported by the index check
            problem = shards.file_mismatch(path, entry, path, against="recorded at import")
            if problem is not None:
                problems.append(problem)
            elif counts[shard] != entry.get("count"):
                problems.append(f"count mismatch: {shard}: manifest has {counts[shard]} rows, {entry.get('count')} "
                                f"recorded at import")
    return problems


def check_rows(root: str | Path, frame: pd.DataFrame) -> list[str]:
    """Each row against the JSON member of its shard: key present, :data:`CHECKED_COLUMNS` equal.

    Returns:
        One problem per missing sample and per differing column, naming the key.
    """
    root = Path(root)
    problems = []
    located = store.locations(root, frame)
    for shard, rows in frame.groupby(frame["shard"].astype(str), sort=True):
        path = located[shard]
        try:
            members = _json_members(path)
        except FileNotFoundError:
            continue  # reported by the index check (missing shard)
        except (OSError, ValueError) as exc:  # shards.ShardError is a ValueError
            problems.append(f"unreadable shard: {path}: {type(exc).__name__}: {exc}")
            continue
        for record in shards.sample_records(rows):
            key = record["key"]
            member = members.get(key)
            if member is None:
                problems.append(f"{key}: no sample in {shard}")
                continue
            for column in CHECKED_COLUMNS:
                if not _same(record.get(column), member.get(column)):
                    problems.append(f"{key}: {column} is {record.get(column)!r} in the manifest, "
                                    f"{member.get(column)!r} in {shard}")
    return problems


def _json_members(path: str | Path) -> dict[str, dict]:
    """Key → parsed ``<key>.json`` member of a shard."""
    out = {}
    for name, data in shards.members(path, lambda name: name.endswith(".json")):
        try:
            out[name[: -len(".json")]] = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            out[name[: -len(".json")]] = {}
    return out


def _same(a, b) -> bool:
    """Manifest value == JSON value, nulls equal, numbers compared as numbers."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return isinstance(b, (int, float)) and not isinstance(b, bool) and float(a) == float(b)
    return a == b
