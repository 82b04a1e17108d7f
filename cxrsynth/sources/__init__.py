"""Source adapters: each reads one on-disk dataset format and returns the same record table.

Every adapter (CheXpert, MIMIC-CXR-JPG, generic table) returns a :class:`SourceTable`
whose ``records`` frame has the columns of :data:`RECORD_COLUMNS` — the manifest's
identity, demographic and finding columns plus ``image_path`` (where to read the image,
or null) and ``row`` (the input row number, for the rejects ledger). One writer
(:mod:`cxrsynth.ingest`) consumes them all. Rows an adapter cannot keep go to
``rejects`` with a reason, so rows in = records + rejects; a value the label contract
changes (age 0 → unknown, a split spelled ``training``) is counted in ``normalized``, so
nothing changes without a word.

Keys (:func:`derive_keys`) are the image path without its extension, made WebDataset-safe
(``[A-Za-z0-9_-]``; path separators become ``_``). Where that loses information (another
character replaced, a collision with another path) a short hash of the original path is
appended, so distinct paths keep distinct keys and a clean key never changes.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import labels
from cxrsynth.errors import CxrsynthError

#: Columns every adapter's ``records`` frame has, in this order.
RECORD_COLUMNS: tuple[str, ...] = (
    "row", "key", "patient_id", "study_id", "source_path", "image_path", "split",
    "sex", "age", "race", "view", *labels.FINDING_COLUMNS,
)
REJECT_COLUMNS: tuple[str, ...] = ("row", "key", "source_path", "reason", "detail")

_KEY_FORBIDDEN = re.compile(r"[^A-Za-z0-9_-]+")


class SourceError(CxrsynthError):
    """An input that cannot be read at all (missing file, missing required columns)."""


@dataclass
class SourceTable:
    """What every adapter returns.

    Attributes:
        records: One row per kept input row, columns :data:`RECORD_COLUMNS`.
        rejects: One row per rejected input row, columns :data:`REJECT_COLUMNS`.
        rows_in: Number of input rows read.
        info: Adapter facts worth reporting (e.g. listed paths not found).
        normalized: Values the label contract changed, counted by what was done
            (``{"age 0 -> unknown": 12}``), over the kept records.
        images_root: The folder images must lie under (:func:`reject_outside_root`).
    """

    records: pd.DataFrame
    rejects: pd.DataFrame
    rows_in: int
    info: dict = field(default_factory=dict)
    normalized: dict[str, int] = field(default_factory=dict)
    images_root: str | None = None

    def __post_init__(self) -> None:
        if len(self.records) + len(self.rejects) != self.rows_in:
            raise AssertionError(
                f"accounting error: {len(self.records)} kept + {len(self.rejects)} rejected "
                f"!= {self.rows_in} rows in"
            )


def sanitize_key(raw: pd.Series) -> pd.Series:
    """Make WebDataset-safe keys: ``[A-Za-z0-9_-]`` only (a dot would split the key)."""
    return raw.astype("string").str.replace(_KEY_FORBIDDEN, "_", regex=True).str.strip("_")


def path_tag(text: str) -> str:
    """8 hex digits of BLAKE2b of ``text``: the suffix that keeps a normalised key distinct."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()


def derive_keys(base: pd.Series, identity: pd.Series | None = None) -> pd.Series:
    """Keys that stay distinct for distinct inputs.

    The key is :func:`sanitize_key` of ``base`` (an image path without its extension, or a
    given key). It gets ``-<path_tag(identity)>`` appended when

    * sanitizing changed more than path separators (``a b é`` and ``a_b_è`` both become
      ``a_b``), or
    * another row with a different ``identity`` already took the same key (``x.png`` and
      ``x.jpg``, both ``x``): the first row in table order keeps the plain key.

    So a clean key never changes; rows with the same identity (the same image listed
    twice) keep the same key and the later one is still rejected as ``duplicate_key``.

    Args:
        base: What the key is made from.
        identity: What must stay distinct (the original path with its extension); default ``base``.
    """
    base = base.astype("string")
    identity = base if identity is None else identity.astype("string")
    key = sanitize_key(base)
    plain = base.str.replace(r"[/\\]", "_", regex=True)
    lossy = (key != plain).fillna(False).to_numpy(dtype=bool)
    collides = np.zeros(len(base), dtype=bool)
    shared = key.duplicated(keep=False).fillna(False).to_numpy(dtype=bool) & ~lossy & key.notna().to_numpy(dtype=bool)
    if shared.any():  # keys taken by more than one row: the first row's identity keeps the key
        group = pd.DataFrame({"key": key[shared], "identity": identity[shared]})
        first = group.groupby("key", sort=False)["identity"].transform("first")
        collides[shared] = (group["identity"] != first).fillna(False).to_numpy(dtype=bool)
    needs = (lossy | collides) & identity.notna().to_numpy(dtype=bool)
    out = key.copy()
    if needs.any():
        tags = [path_tag(str(i)) for i in identity[needs]]
        out[needs] = [f"{k}-{t}" if k else t for k, t in zip(key[needs].fillna(""), tags)]
    return out.astype("string")


def require_columns(frame: pd.DataFrame, required: list[str] | tuple[str, ...], what: str) -> None:
    """Fail naming every required column that is missing."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SourceError(f"{what} is missing required column(s): {', '.join(missing)}")


def read_table(path: str | Path, what: str) -> pd.DataFrame:
    """Read a CSV (optionally gzipped), parquet or Excel table as strings.

    CSV text must be UTF-8 (a leading byte-order mark, as Excel writes, is dropped). Text
    in another encoding (Latin-1 / Windows-1252 exports) is refused, naming the file, line
    and byte, rather than guessed: a wrong guess would change names and values silently.

    Raises:
        SourceError: the file is missing, empty, not UTF-8, or not a readable table.
    """
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise SourceError(f"{what} {path} is empty (0 bytes)")
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            return pd.read_parquet(path).astype("string")
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"{what} {path} is not a readable parquet file: {' '.join(str(exc).split())}") from None
    if name.endswith((".xlsx", ".xls")):
        try:
            return pd.read_excel(path, dtype=str).astype("string")
        except ImportError as exc:
            raise SourceError(f"reading {path} needs openpyxl: pip install openpyxl ({exc})") from exc
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig").astype("string")
    except pd.errors.EmptyDataError:
        raise SourceError(f"{what} {path} is empty (no header row)") from None
    except UnicodeDecodeError:
        raise SourceError(f"{what} {path} is not UTF-8 text ({_first_bad_utf8(path)}); save it as UTF-8, "
                          f"e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}") from None
    except (pd.errors.ParserError, OSError, EOFError) as exc:  # ragged rows, bad gzip
        raise SourceError(f"{what} {path} is not a readable CSV: {' '.join(str(exc).split())}") from None


def _first_bad_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 is, as ``byte 0xe9 on line 2, column 7``."""
    import gzip

    raw = gzip.open(path).read() if path.name.lower().endswith(".gz") else path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        newline = b"\n"
        line, column = raw.count(newline, 0, exc.start) + 1, exc.start - raw.rfind(newline, 0, exc.start)
        return f"byte 0x{raw[exc.start]:02x} on line {line}, column {column}"
    return "an invalid byte"


def empty_rejects() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="string" if c != "row" else "int64") for c in REJECT_COLUMNS})


def make_rejects(frame: pd.DataFrame, mask: np.ndarray | pd.Series, reason: str, detail: pd.Series | str) -> pd.DataFrame:
    """Rejects rows for ``frame[mask]`` (which needs ``row``, ``key``, ``source_path``)."""
    mask = np.asarray(mask, dtype=bool)
    sub = frame.loc[mask]
    if isinstance(detail, str):
        detail_values = pd.Series(detail, index=sub.index, dtype="string")
    else:
        detail_values = detail[mask].astype("string") if len(detail) == len(frame) else detail.astype("string")
    return pd.DataFrame(
        {
            "row": sub["row"].astype("int64").to_numpy(),
            "key": sub["key"].astype("string").to_numpy() if "key" in sub else pd.NA,
            "source_path": sub["source_path"].astype("string").to_numpy() if "source_path" in sub else pd.NA,
            "reason": reason,
            "detail": detail_values.to_numpy(),
        }
    ).astype({"key": "string", "source_path": "string", "reason": "string", "detail": "string"})


def finish(frame: pd.DataFrame, raw_findings: dict[str, pd.Series], rejects: list[pd.DataFrame], rows_in: int,
           info: dict | None = None, *, normalized: dict[str, int] | None = None,
           images_root: str | Path | None = None) -> SourceTable:
    """Apply the label contract and the common checks, then build the :class:`SourceTable`.

    Args:
        frame: Candidate rows with ``row``, ``key``, ``patient_id``, ``study_id``,
            ``source_path``, ``image_path``, ``split`` and raw ``sex``, ``age``, ``race``,
            ``view`` columns (raw values; converted here through :mod:`cxrsynth.labels`).
            ``split`` may hold raw spellings (``training``, ``validate``).
        raw_findings: Finding display name → raw column aligned with ``frame``.
        rejects: Rejects the adapter already made (rows not in ``frame``).
        rows_in: Input rows read by the adapter.
        info: Facts to report.
        normalized: Normalisations the adapter already counted (values filled in from
            another table), added to the ones counted here.
        images_root: The folder the images must lie under (recorded for the writer).

    Rejections added here: ``bad_label`` (a finding value outside 1/0/-1/blank; the
    detail names the column and value), ``bad_sex`` / ``bad_age`` / ``bad_split`` (a
    demographic value outside the contract, see :mod:`cxrsynth.labels`), ``missing_patient``
    (no patient id, so no safe split), ``bad_key`` (no key), ``duplicate_key`` (a later
    row with an already-seen key). Normalisations the contract makes (age 0 → unknown,
    race outside the categories → unknown, a split spelling) are counted over the kept rows.
    """
    frame = frame.copy()
    bad_detail = pd.Series(pd.NA, index=frame.index, dtype="string")
    for name in labels.FINDINGS:
        raw = raw_findings[name]
        codes, bad = labels.encode_findings(raw)
        frame[labels.COLUMN_OF[name]] = codes
        if bad.any():
            detail = f"{name}=" + raw.astype("string").fillna("")
            bad_detail = bad_detail.mask(bad & bad_detail.isna().to_numpy(), detail)
    bad_label = bad_detail.notna().to_numpy()
    out_rejects = list(rejects)
    out_rejects.append(make_rejects(frame, bad_label, "bad_label", bad_detail))
    frame = frame.loc[~bad_label]

    for column, normalize in (("sex", labels.normalize_sex), ("age", labels.normalize_age), ("split", labels.normalize_split)):
        bad = normalize(frame[column]).bad
        detail = f"{column}=" + frame[column].astype("string").fillna("").map(repr) + f" is not a valid {column}"
        out_rejects.append(make_rejects(frame, bad, f"bad_{column}", detail))
        frame = frame.loc[~bad]

    no_patient = frame["patient_id"].isna().to_numpy() | (frame["patient_id"].astype("string").str.strip() == "").fillna(True).to_numpy()
    out_rejects.append(make_rejects(frame, no_patient, "missing_patient", "no patient id"))
    frame = frame.loc[~no_patient]

    no_key = frame["key"].isna().to_numpy() | (frame["key"] == "").fillna(True).to_numpy()
    out_rejects.append(make_rejects(frame, no_key, "bad_key", "empty key after sanitizing"))
    frame = frame.loc[~no_key]

    duplicate = frame["key"].duplicated(keep="first").to_numpy()
    out_rejects.append(make_rejects(frame, duplicate, "duplicate_key", "key seen on an earlier row"))
    frame = frame.loc[~duplicate]

    changed = dict(normalized or {})
    for column, normalize in (("sex", labels.normalize_sex), ("age", labels.normalize_age), ("race", labels.normalize_race),
                              ("view", labels.normalize_view), ("split", labels.normalize_split)):
        done = normalize(frame[column])
        frame[column] = done.values
        for what, n in done.changed.items():
            changed[what] = changed.get(what, 0) + n
    for col in ("key", "patient_id", "study_id", "source_path", "image_path", "split"):
        frame[col] = frame[col].astype("string")
    frame["row"] = frame["row"].astype("int64")
    records = frame.loc[:, list(RECORD_COLUMNS)].reset_index(drop=True)
    all_rejects = pd.concat([r for r in out_rejects if len(r)] or [empty_rejects()], ignore_index=True)
    root = None if images_root is None else str(Path(images_root).resolve())
    return SourceTable(records=records, rejects=all_rejects, rows_in=rows_in, info=info or {},
                       normalized=dict(sorted(changed.items())), images_root=root)


def unique_lookup(table: pd.DataFrame, keys: list[str], what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A lookup table with one row per key, and the keys whose rows disagree.

    Identical repeated rows are one row. Keys whose rows differ in any other column are
    *conflicting*: the caller rejects the rows that look them up (no row wins silently).

    Returns:
        ``(table indexed by keys, conflicts)``: ``conflicts`` has the key columns and
        ``detail`` (which columns differ), one row per conflicting key.
    """
    distinct = table.drop_duplicates()
    repeated = distinct.duplicated(keys, keep=False)
    conflicts = distinct.loc[repeated]
    details = []
    for key, group in conflicts.groupby(keys, sort=True):
        differ = [c for c in group.columns if c not in keys and group[c].astype("string").nunique(dropna=False) > 1]
        details.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                        "detail": f"{len(group)} different rows in the {what} ({', '.join(differ)})"})
    conflict_frame = pd.DataFrame(details, columns=[*keys, "detail"])
    return distinct.loc[~repeated].set_index(keys), conflict_frame


def _resolver():
    """``resolve(path)``: what ``os.path.realpath`` gives, each component resolved once (one lstat each)."""
    folders: dict[str, str] = {}

    def folder(path: str) -> str:
        if path in folders:
            return folders[path]
        parent, name = os.path.split(path)
        if not name:  # "/"
            return path
        base = folder(parent)
        if name == "..":
            out = os.path.dirname(base)
        elif name == ".":
            out = base
        else:
            joined = os.path.join(base, name)
            out = os.path.realpath(joined) if os.path.islink(joined) else joined
        folders[path] = out
        return out

    def resolve(path: str) -> str:
        return folder(os.path.join(os.getcwd(), path))

    return resolve


def reject_outside_root(source: SourceTable, allow: bool = False, follow_links: bool = True) -> SourceTable:
    """Reject rows whose image resolves outside the source's images root (``outside_root``).

    The rule: every image must lie under the images root (``--images``, or the table's
    folder). A ``../`` in a path, an absolute path elsewhere, or a symbolic link that
    resolves outside the root makes the row a reject, unless ``allow`` (the CLI's
    ``--allow-outside-root``). Paths are resolved as the operating system would
    (symbolic links followed), each folder once: about 2 lstat calls per image, 4-10 s
    for CheXpert's 223,414 (well under 1% of reading them). With ``follow_links=False``
    (a labels-only ingest, which reads no image) the check is lexical (``..`` and
    absolute paths) and takes a fraction of a second.
    """
    if allow or source.images_root is None or not len(source.records):
        return source
    if follow_links:
        resolve, root = _resolver(), os.path.realpath(source.images_root)
    else:
        resolve, root = (lambda p: os.path.normpath(os.path.abspath(p))), os.path.normpath(os.path.abspath(source.images_root))
    prefix = root.rstrip("/") + "/"
    paths = source.records["image_path"].astype("string")
    where = [None if pd.isna(p) else resolve(str(p)) for p in paths]
    outside = np.array([w is not None and not w.startswith(prefix) for w in where], dtype=bool)
    if not outside.any():
        return source
    records = source.records
    detail = pd.Series([f"resolves to {w}, outside {root} (--allow-outside-root to accept)" for w in where],
                       index=records.index, dtype="string")
    rejected = make_rejects(records, outside, "outside_root", detail)
    rejects = pd.concat([r for r in (source.rejects, rejected) if len(r)], ignore_index=True)
    return replace(source, records=records.loc[~outside].reset_index(drop=True), rejects=rejects)
