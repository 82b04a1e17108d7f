"""Source adapters: each reads one on-disk dataset format and returns the same record table.

Every adapter (CheXpert, MIMIC-CXR-JPG, generic table) returns a :class:`SourceTable`
whose ``records`` frame has the columns of :data:`RECORD_COLUMNS` — the manifest's
identity, demographic and finding columns plus ``image_path`` (where to read the image,
or null) and ``row`` (the input row number, for the rejects ledger). One writer
(:mod:`cxrsynth.ingest`) consumes them all. Rows an adapter cannot keep go to
``rejects`` with a reason, so rows in = records + rejects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
    """

    records: pd.DataFrame
    rejects: pd.DataFrame
    rows_in: int
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.records) + len(self.rejects) != self.rows_in:
            raise AssertionError(
                f"accounting error: {len(self.records)} kept + {len(self.rejects)} rejected "
                f"!= {self.rows_in} rows in"
            )


def sanitize_key(raw: pd.Series) -> pd.Series:
    """Make WebDataset-safe keys: ``[A-Za-z0-9_-]`` only (a dot would split the key)."""
    return raw.astype("string").str.replace(_KEY_FORBIDDEN, "_", regex=True).str.strip("_")


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


def finish(frame: pd.DataFrame, raw_findings: dict[str, pd.Series], rejects: list[pd.DataFrame], rows_in: int, info: dict | None = None) -> SourceTable:
    """Apply the label contract and the common checks, then build the :class:`SourceTable`.

    Args:
        frame: Candidate rows with ``row``, ``key``, ``patient_id``, ``study_id``,
            ``source_path``, ``image_path``, ``split`` and raw ``sex``, ``age``, ``race``,
            ``view`` columns (raw values; converted here through :mod:`cxrsynth.labels`).
        raw_findings: Finding display name → raw column aligned with ``frame``.
        rejects: Rejects the adapter already made (rows not in ``frame``).
        rows_in: Input rows read by the adapter.
        info: Facts to report.

    Rejections added here: ``bad_label`` (a finding value outside 1/0/-1/blank; the
    detail names the column and value), ``missing_patient`` (no patient id, so no safe
    split), ``duplicate_key`` (a later row with an already-seen key).
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

    no_patient = frame["patient_id"].isna().to_numpy() | (frame["patient_id"].astype("string").str.strip() == "").fillna(True).to_numpy()
    out_rejects.append(make_rejects(frame, no_patient, "missing_patient", "no patient id"))
    frame = frame.loc[~no_patient]

    no_key = frame["key"].isna().to_numpy() | (frame["key"] == "").fillna(True).to_numpy()
    out_rejects.append(make_rejects(frame, no_key, "bad_key", "empty key after sanitizing"))
    frame = frame.loc[~no_key]

    duplicate = frame["key"].duplicated(keep="first").to_numpy()
    out_rejects.append(make_rejects(frame, duplicate, "duplicate_key", "key seen on an earlier row"))
    frame = frame.loc[~duplicate]

    frame["sex"] = labels.normalize_sex(frame["sex"])
    frame["age"] = labels.normalize_age(frame["age"])
    frame["race"] = labels.normalize_race(frame["race"])
    frame["view"] = labels.normalize_view(frame["view"])
    for col in ("key", "patient_id", "study_id", "source_path", "image_path", "split"):
        frame[col] = frame[col].astype("string")
    frame["row"] = frame["row"].astype("int64")
    records = frame.loc[:, list(RECORD_COLUMNS)].reset_index(drop=True)
    all_rejects = pd.concat([r for r in out_rejects if len(r)] or [empty_rejects()], ignore_index=True)
    return SourceTable(records=records, rejects=all_rejects, rows_in=rows_in, info=info or {})
