"""``cxrsynth verify``: a dataset's manifest, shards and index against each other.

What is checked, for dataset ``name``:

1. the manifest's rows against the checksum its writer recorded (``rows_sha256``,
   :func:`cxrsynth.manifest.rows_checksum`): any edit made outside cxrsynth shows;
2. every shard folder the ``shard`` column points at (``data/shards/<name>/<version>/``,
   or a package's ``shards/`` folder for a dataset imported in place): its ``index.json``,
   each listed shard's size and sha256, and the manifest's rows per shard against the
   index counts;
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

from cxrsynth import labels, manifest, shards

#: Columns of a row that its shard's JSON member must hold unchanged.
CHECKED_COLUMNS: tuple[str, ...] = ("sex", "age", "race", "view", *labels.FINDING_COLUMNS)


def verify_dataset(root: str | Path, name: str, _path: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """Check dataset ``name`` (see the module docstring); return ``(problems, shards checked)``."""
    root = Path(root)
    frame = manifest.read(root, name)
    meta = manifest.read_meta(root, name)
    problems = _checksum(root, name)
    checked = 0
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
        folders[shards.shard_dir(".", name, meta.get("split_of") or meta["version"])] = {}
    for folder, counts in sorted(folders.items()):
        directory = folder if folder.is_absolute() else root / folder
        problems += shards.verify(directory, counts)
        checked += len(counts)
    problems += check_rows(root, with_shard)
    return problems, checked


def _checksum(root: Path, name: str) -> list[str]:
    recorded, computed = manifest.stored_checksum(root, name)
    if recorded is None:
        return []  # written before manifests recorded one: nothing to compare
    if recorded != computed:
        return [f"{manifest.manifest_path(root, name)}: its rows differ from the checksum recorded when it was written "
                f"(rows_sha256 {recorded[:12]}…, now {computed[:12]}…): edited outside cxrsynth?"]
    return []


def check_rows(root: str | Path, frame: pd.DataFrame) -> list[str]:
    """Each row against the JSON member of its shard: key present, :data:`CHECKED_COLUMNS` equal.

    Returns:
        One problem per missing sample and per differing column, naming the key.
    """
    root = Path(root)
    problems = []
    for shard, rows in frame.groupby(frame["shard"].astype(str), sort=True):
        path = Path(shard) if Path(shard).is_absolute() else root / shard
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


def _json_members(path: Path) -> dict[str, dict]:
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
