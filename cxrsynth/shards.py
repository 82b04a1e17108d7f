"""WebDataset tar shards: the sample encoder, deterministic atomic writing, an index, verification, reading.

Layout: ``data/shards/<dataset>/<version>/<dataset>-%06d.tar`` with ``index.json``
beside the shards. A sample is ``<key>.png`` (8-bit grayscale) and ``<key>.json`` (its
manifest row minus the columns a later step may change, :data:`SAMPLE_FIELDS`), made by
:func:`encode_sample` from a plain record (:func:`sample_records`). Tar members carry a
fixed mtime, owner and mode, so the same samples give byte-identical shards, which is
what lets DVC cache them.

Shards are planned as fixed work units (one unit of input rows → one shard), each
written with webdataset's :class:`~webdataset.ShardWriter` under a ``.partial`` name and
renamed only once complete, with a small progress record, the unit's receipt
(``.progress/<shard>.json``: count, bytes, sha256, keys, rejects and ``inputs``, a digest
of what the unit was made from). A killed job therefore never leaves a shard that a
later run would trust, and a restarted job skips finished units whose inputs are still
the recorded ones; units are independent, so they also run in parallel processes. Each
unit is written under an exclusive ``flock`` on ``.progress/<shard>.lock``, so two
processes that both write a unit (two parts of one job started twice) take turns instead
of writing one ``.partial`` file at once. A unit's input rows that
cannot become samples (an unreadable image) come to the writer as :class:`Reject` items
in the sample stream; :func:`write_shard` returns them with the shard, so rows in = samples
written + rows rejected holds per shard.

Reading has one path too: :func:`members` is the one tar iterator (a fast ustar header
parser for cxrsynth's own shards, webdataset's expander for any other tar, and with
``untrusted=True`` the checks a partner's package needs: no link, device, folder, path
outside, oversize or duplicate member), and :func:`images` gives the PNG bytes of
manifest rows from their shards. Pixels are decoded by :func:`cxrsynth.imaging.decode_png`.
A shard on an object store (a URL, :mod:`cxrsynth.store`) is read by the same iterator,
streamed front to back without seeking and checked against its index's size and sha256;
a local file keeps the seek-based fast path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from cxrsynth import manifest, store
from cxrsynth.errors import CheckFailed, CxrsynthError
from cxrsynth.imaging import encode_png

#: Record fields copied into each sample's JSON (the manifest row minus mutable columns).
SAMPLE_FIELDS = tuple(c for c in manifest.COLUMNS if c not in ("shard", "split"))

SHARD_ROOT = Path("data") / "shards"
INDEX_NAME = "index.json"
#: Hugging Face ``datasets`` features of the samples (``Features.from_dict``), beside ``index.json``.
HF_FEATURES_NAME = "features.json"
PROGRESS_DIR = ".progress"
TAR_OWNER = "cxrsynth"
TAR_MTIME = 0


@dataclass
class ShardResult:
    """What writing one shard produced.

    Attributes:
        name: Shard file name (no folder).
        count: Samples written.
        bytes: File size.
        sha256: Hex digest of the file.
        keys: Sample keys in write order.
        rejects: Input rows not written, as dicts with ``row``, ``key``, ``source_path``,
            ``reason`` and ``detail``.
        inputs: Digest of what the unit was made from (its rows, image contents and
            parameters), or None when the writer records none.
    """

    name: str
    count: int
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    inputs: str | None = None


@dataclass(frozen=True)
class Reject:
    """An input row that did not become a sample, as its rejects-ledger row."""

    row: int | None
    key: str | None
    source_path: str | None
    reason: str
    detail: str


def sample_records(frame: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[dict]:
    """Plain-Python rows of :data:`SAMPLE_FIELDS` (+ ``extra``): picklable, JSON-ready, nulls as None."""
    sub = frame.reindex(columns=[*extra, *SAMPLE_FIELDS]).astype(object)
    rows = sub.where(sub.notna(), None).to_dict("records")
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in rows]


def encode_sample(record: dict, image: np.ndarray) -> dict:
    """One WebDataset sample: ``<key>.png`` and ``<key>.json`` (the record's sample fields)."""
    meta = {k: record[k] for k in SAMPLE_FIELDS}
    return {"__key__": record["key"], "png": encode_png(image), "json": json_bytes(meta)}


def shard_dir(root: str | Path, dataset: str, version: str) -> Path:
    return Path(root) / SHARD_ROOT / dataset / version


def shard_path(dataset: str, version: str, name: str) -> str:
    """A shard's path relative to the project root, as the manifest's ``shard`` column holds it."""
    return str(SHARD_ROOT / dataset / version / name)


def shard_name(dataset: str, index: int) -> str:
    return f"{dataset}-{index:06d}.tar"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(obj: dict) -> bytes:
    """Canonical JSON (sorted keys, no spaces) for sample metadata and progress files."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def finished(directory: Path, dataset: str, index: int, inputs: str | None = None) -> ShardResult | None:
    """The result of an already finished shard, or None if it must be (re)written.

    A shard counts as finished only if its progress record exists, the file's size and
    sha256 match it and, when ``inputs`` is given, the record's ``inputs`` equal it (a
    unit made from other rows or other image bytes is redone).
    """
    name = shard_name(dataset, index)
    record, path = directory / PROGRESS_DIR / f"{name}.json", directory / name
    if not (record.is_file() and path.is_file()):
        return None
    try:
        stored = json.loads(record.read_text())
        result = ShardResult(**{k: v for k, v in stored.items() if k in ShardResult.__dataclass_fields__})
    except (ValueError, TypeError, RecursionError):  # a damaged receipt: the unit is redone
        return None
    if inputs is not None and result.inputs != inputs:
        return None
    if path.stat().st_size != result.bytes or sha256_file(path) != result.sha256:
        return None
    return result


@contextlib.contextmanager
def unit_lock(directory: Path, name: str):
    """Hold an exclusive ``flock`` on ``.progress/<name>.lock`` (waiting for it) for the block."""
    import fcntl

    (directory / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    with open(directory / PROGRESS_DIR / f"{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_shard(directory: Path, dataset: str, index: int, samples: Iterable[dict | Reject],
                inputs: str | None = None) -> ShardResult:
    """Write one shard from samples ``{"__key__": str, "png": bytes, "json": bytes}``.

    ``samples`` may also yield :class:`Reject` items (the rows whose image failed to
    load): they are not written, and the result lists them, in stream order, as
    ``rejects``. ``inputs`` (what the unit was made from) goes into its receipt. The
    unit is written under :func:`unit_lock`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = shard_name(dataset, index)
    with unit_lock(directory, name):
        return _write_shard(directory, dataset, index, samples, inputs)


def _write_shard(directory: Path, dataset: str, index: int, samples: Iterable[dict | Reject], inputs: str | None) -> ShardResult:
    import webdataset as wds

    rejects: list[dict] = []
    name = shard_name(dataset, index)
    final, partial = directory / name, directory / f"{name}.partial"
    keys: list[str] = []
    writer = wds.ShardWriter(
        str(directory / f"{dataset}-%06d.tar.partial"),
        maxcount=1 << 40,  # one writer, one shard: the unit of work decides the size
        maxsize=float("inf"),
        start_shard=index,
        verbose=0,
        encoder=False,
        mtime=TAR_MTIME,
        user=TAR_OWNER,
        group=TAR_OWNER,
        mode=0o444,
    )
    try:
        for sample in samples:
            if isinstance(sample, Reject):
                rejects.append(asdict(sample))
                continue
            writer.write(sample)
            keys.append(sample["__key__"])
    finally:
        writer.close()
    result = ShardResult(name=name, count=len(keys), bytes=partial.stat().st_size, sha256=sha256_file(partial), keys=keys,
                         rejects=rejects, inputs=inputs)
    _atomic_write_bytes(directory / PROGRESS_DIR / f"{name}.json", json_bytes(asdict(result)))
    os.replace(partial, final)
    return result


def hf_features() -> dict:
    """The samples' types as Hugging Face ``datasets`` serialises ``Features`` (``Features.to_dict``).

    A JSON member holds null where a row has no value (a real row's ``source_key``, a
    synthetic row's ``patient_id``), and ``datasets`` infers each field's type from the
    first shard it reads: a field null in every row there is typed null, and the first
    shard of the other kind then fails (``Couldn't cast array of type string to null``).
    Loading with these features types every field from the manifest schema, so real and
    synthetic shards load together, nulls kept::

        features = datasets.Features.from_dict(json.load(open(f"{shard_dir}/features.json")))
        datasets.load_dataset("webdataset", data_files=[...], features=features, split="train")
    """
    import pyarrow as pa

    def value(kind: pa.DataType) -> dict:
        return {"dtype": str(kind).replace("double", "float64"), "_type": "Value"}

    fields = {f.name: value(f.type) for f in manifest.SCHEMA if f.name in SAMPLE_FIELDS}
    return {"__key__": value(pa.string()), "__url__": value(pa.string()), "png": {"_type": "Image"}, "json": fields}


def write_index(directory: Path, dataset: str, version: str, results: list[ShardResult]) -> Path:
    """Write ``index.json`` (shard, count, bytes, sha256) and drop stale partial files.

    The per-shard progress records stay (``.progress/``): they hold each shard's keys
    and rejects, so a rerun of a finished job reuses every shard instead of redoing it.
    """
    index = {
        "dataset": dataset,
        "version": version,
        "samples": sum(r.count for r in results),
        "shards": [{"name": r.name, "count": r.count, "bytes": r.bytes, "sha256": r.sha256} for r in results],
    }
    path = directory / INDEX_NAME
    _atomic_write_bytes(directory / HF_FEATURES_NAME, json.dumps(hf_features(), indent=1).encode() + b"\n")
    _atomic_write_bytes(path, json.dumps(index, indent=1, sort_keys=True).encode() + b"\n")
    for stale in directory.glob("*.partial"):
        if not _being_written(directory, stale.name[: -len(".partial")]):
            stale.unlink(missing_ok=True)
    return path


def _being_written(directory: Path, name: str) -> bool:
    """Whether another process holds shard ``name``'s :func:`unit_lock` now."""
    import fcntl

    lock = directory / PROGRESS_DIR / f"{name}.lock"
    if not lock.is_file():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def file_mismatch(path: Path, entry: dict, shown: str | Path, against: str = "index says") -> str | None:
    """How the file ``path`` differs from its index entry (``bytes``, then ``sha256``), naming it
    ``shown`` and the entry's source ``against``; None when it matches. Shard indexes, share
    packages and the shards of an import (against what was recorded then) are checked by it."""
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"size mismatch: {shown}: {size} bytes, {against} {entry['bytes']}"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return f"sha256 mismatch: {shown}: {digest[:12]}…, {against} {str(entry['sha256'])[:12]}…"
    return None


def verify(directory: Path | str, expected_counts: dict[str, int] | None = None) -> list[str]:
    """Re-hash every shard listed in ``index.json``; return the problems found.

    Args:
        directory: A version folder holding ``index.json``, or its URL on a store (each
            object streamed and hashed, :func:`cxrsynth.store.open_shard`).
        expected_counts: Optional shard name → sample count from the manifest.

    Returns:
        Human-readable problems (empty when everything matches).
    """
    if store.is_remote(directory):
        return _verify_remote(str(directory), expected_counts)
    directory = store.local_path(directory)  # a path, or a file:// store's folder
    path = directory / INDEX_NAME
    if not path.is_file():
        return [f"missing index: {path}"]
    try:
        index = json.loads(path.read_text())
        entries = index["shards"]
        if not all({"name", "count", "bytes", "sha256"} <= set(e) for e in entries):
            raise ValueError("a shard entry lacks name, count, bytes or sha256")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # not JSON, or not a shard index
        return [f"unreadable index: {path}: {type(exc).__name__}: {exc}"]
    problems = []
    for entry in entries:
        shard = directory / entry["name"]
        if not shard.is_file():
            problems.append(f"missing shard: {shard}")
            continue
        problem = file_mismatch(shard, entry, shard)
        if problem is not None:
            problems.append(problem)
    return problems + _count_mismatches(entries, expected_counts)


def _count_mismatches(entries: list[dict], expected_counts: dict[str, int] | None) -> list[str]:
    if expected_counts is None:
        return []
    listed = {e["name"]: e["count"] for e in entries}
    return [f"count mismatch: {name}: manifest has {count} rows, index says {listed.get(name)}"
            for name, count in sorted(expected_counts.items()) if listed.get(name) != count]


def _verify_remote(folder: str, expected_counts: dict[str, int] | None) -> list[str]:
    """:func:`verify` of a version folder on a store: every listed object streamed and hashed."""
    try:
        entries = list(store.index_entries(folder, fresh=True).values())
    except store.StoreError as exc:
        return [str(exc)]
    problems = []
    for entry in entries:
        url = store.join(folder, entry["name"])
        try:
            with store.open_shard(url) as reader:
                reader.finish()
        except store.ObjectMissing:
            problems.append(f"missing shard: {url}")
        except (store.StoreError, store.ObjectChanged) as exc:
            problems.append(str(exc))
    return problems + _count_mismatches(entries, expected_counts)


# Reading ---------------------------------------------------------------------------------
#
# The one tar reader: :func:`members` iterates a tar's members (trusted shards through a
# fast ustar header parser, any other tar through webdataset's expander; untrusted tars,
# a partner's package, only after every header passed :func:`refusal`), and :func:`images`
# gives the PNG bytes of manifest rows from their shards.

#: Extensions a sample may carry (the project's sample layout).
SAMPLE_EXTENSIONS = ("png", "json")
#: A sample key: WebDataset splits a member name at its first dot, so no dot (and no folder).
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
#: The largest member an untrusted tar may hold (a 256 px PNG is ~33 KiB; 1024 px ~0.6 MiB).
MAX_MEMBER_BYTES = 64 << 20

_REGULAR = (b"0", b"\0")  # tar type flags of a regular file (ustar and pre-POSIX)
_PLAIN = frozenset(b"01234567\0"[i : i + 1] for i in range(9))  # types a ustar header describes alone
_ZERO_BLOCK = bytes(512)


class ShardError(CxrsynthError):
    """A shard that cannot be read as asked: missing, not a tar, or without a sample its rows place in it."""


class ShardNotFound(ShardError, FileNotFoundError):
    """A shard file that does not exist (also a ``FileNotFoundError``)."""


class UnsafeTar(CheckFailed):
    """A member an untrusted tar must not hold: a link, a device, a path outside, an oversize member..."""


@dataclass(frozen=True)
class Member:
    """A tar member's header: its name, tar type flag, data size, data offset in the file, link target."""

    name: str
    type: bytes
    size: int
    offset: int
    linkname: str = ""


class _NotPlainTar(Exception):
    """An entry the fast parser does not read (PAX or GNU long-name headers, a bad checksum...)."""


def split_name(name: str) -> tuple[str, str]:
    """``(key, ext)`` of a member name: its file name split at the first dot (WebDataset's rule)."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


def pngs_of(keys: set[str]) -> Callable[[str], bool]:
    """A member selector: the PNG members of ``keys``."""
    def select(name: str) -> bool:
        key, ext = split_name(name)
        return ext == "png" and key in keys
    return select


def _ustar_headers(f, every_type: bool = False) -> Iterator[Member]:
    """Member headers of an uncompressed ustar archive, parsed from fixed offsets, in order.

    A minimal parser for the plain members cxrsynth's shards hold (webdataset's writer
    with short key names): each header's checksum is verified and the data is seeked
    over, never read. Python's ``tarfile`` parses every header into an object, several
    times the cost of decoding a small PNG. Regular files only, unless ``every_type``
    (links, devices, folders and fifos are then listed, for :func:`refusal`); any entry
    a ustar header does not describe alone (PAX, GNU long names) raises :class:`_NotPlainTar`.
    """
    position = 0
    while True:
        f.seek(position)
        header = f.read(512)
        if not header or header == _ZERO_BLOCK:
            return
        member = _parse_header(header, position, every_type)
        yield member
        position += 512 + ((member.size + 511) & ~511)


def _parse_header(header: bytes, position: int, every_type: bool = False) -> Member:
    """The :class:`Member` of one 512-byte ustar header at byte ``position`` (see :func:`_ustar_headers`)."""
    if len(header) < 512:
        raise _NotPlainTar  # a cut header, or not a tar at all
    checksum = sum(header) - sum(header[148:156]) + 8 * 32
    try:
        recorded = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        if checksum != recorded or kind not in (_PLAIN if every_type else _REGULAR):
            raise _NotPlainTar
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
        linkname = header[157:257].split(b"\0", 1)[0].decode()
    except (ValueError, UnicodeDecodeError):
        raise _NotPlainTar from None
    if prefix:
        name = f"{prefix.decode(errors='surrogateescape')}/{name}"
    return Member(name, kind, size, position + 512, linkname)


def _read_exact(f, n: int) -> bytes:
    """``n`` bytes from a stream (fewer only at its end): a stream's ``read`` may return less."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n and (more := f.read(n - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _streamed_members(f, path: str, select: Callable[[str], bool] | None) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of a plain ustar archive's selected regular members, read front to back
    without seeking (a store object, a pipe): the other members are read past, not kept."""
    position = 0
    while True:
        header = _read_exact(f, 512)
        if not header or header == _ZERO_BLOCK:
            return
        member = _parse_header(header, position)
        padded = (member.size + 511) & ~511
        wanted = select is None or select(member.name)
        if wanted:
            data = _read_exact(f, padded)
            if len(data) < member.size:
                raise ShardError(f"{path}: member {member.name!r} is cut short ({len(data)} of its {member.size} bytes)")
            yield member.name, data[: member.size]
        else:
            for start in range(0, padded, 1 << 20):
                if len(_read_exact(f, min(1 << 20, padded - start))) < min(1 << 20, padded - start):
                    raise ShardError(f"{path}: member {member.name!r} is cut short")
        position += 512 + padded


def _tarfile_headers(f, path: str, error: type[CxrsynthError]) -> list[Member]:
    """Every member header of an uncompressed tar of any format, through ``tarfile``."""
    import tarfile

    f.seek(0)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            return [Member(i.name, i.type, i.size, i.offset_data, i.linkname) for i in tar.getmembers()]
    except tarfile.TarError as exc:
        raise error(f"{path}: not an uncompressed tar ({exc})") from None


def headers(path: str | Path, handle=None) -> list[Member]:
    """The regular members' headers of a (trusted) tar, in order, no data read.

    For a reader that reads members later, out of order (``share export`` gathers each
    package shard's images from many source shards): :func:`read_member` reads one.
    ``handle``: the tar already open (:func:`open_tar`; a store's object is then read once).
    """
    path = str(path)
    with contextlib.nullcontext(handle) if handle is not None else _open(path) as f:
        try:
            return list(_ustar_headers(f))
        except _NotPlainTar:
            import tarfile

            return [m for m in _tarfile_headers(f, path, ShardError) if m.type in (*_REGULAR, tarfile.CONTTYPE)]


def read_member(f, member: Member, path: str = "") -> bytes:
    """The data of ``member`` (from :func:`headers`) in the open tar file ``f``."""
    f.seek(member.offset)
    data = f.read(member.size)
    if len(data) != member.size:
        raise ShardError(f"{path or f.name}: member {member.name!r} is cut short ({len(data)} of its {member.size} bytes)")
    return data


def open_tar(path: str | Path):
    """A tar opened for :func:`read_member`: a local file, or a store's object read whole (checked
    against its index) into a seekable temporary copy."""
    return _open(str(path))


def _open(path: str):
    """A local tar opened for reading, or a store object read whole into a seekable copy."""
    if store.is_remote(path):
        return store.spooled(path)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ShardNotFound(f"missing shard: {path}") from None
    except OSError as exc:
        raise ShardError(f"unreadable shard: {path}: {exc.strerror or exc}") from None


def refusal(member: Member) -> str | None:
    """Why a member may not be read from an untrusted tar, or None.

    Only flat regular files named ``<key>.<ext>`` (:data:`KEY_PATTERN`,
    :data:`SAMPLE_EXTENSIONS`) of at most :data:`MAX_MEMBER_BYTES` pass: no absolute
    path, no ``..``, no folder, link, device or fifo.
    """
    import tarfile

    name, kind = member.name, member.type
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        return f"a {'symbolic' if kind == tarfile.SYMTYPE else 'hard'} link (to {member.linkname!r})"
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        return "a device file"
    if kind == tarfile.FIFOTYPE:
        return "a fifo"
    if kind == tarfile.DIRTYPE:
        return "a folder"
    if kind not in _REGULAR:
        return f"not a regular file (tar type {kind!r})"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "an absolute path"
    if ".." in name.split("/"):
        return "a path with '..'"
    if "/" in name or "\\" in name:
        return "a path with folders (members are flat <key>.<ext>)"
    key, dot, ext = name.partition(".")
    if not dot or not KEY_PATTERN.fullmatch(key) or ext not in SAMPLE_EXTENSIONS:
        return f"not named <key>.<ext> (key of [A-Za-z0-9_-], ext one of {', '.join(SAMPLE_EXTENSIONS)})"
    if member.size > MAX_MEMBER_BYTES:
        return f"{member.size} bytes, more than the {MAX_MEMBER_BYTES} a sample member may hold"
    return None


def _webdataset_members(f, path: str, select: Callable[[str], bool] | None) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of a tar's selected regular members through webdataset's expander (any tar)."""
    import tarfile

    import webdataset as wds

    if hasattr(f, "seek"):  # a store's stream is read once, from its start
        f.seek(0)
    try:
        for item in wds.tariterators.tar_file_expander([{"url": path, "stream": f}], select_files=select, eof_value=None):
            yield item["fname"], item["data"]
    except tarfile.TarError as exc:
        raise ShardError(f"{path}: not a readable tar ({' '.join(str(exc).split())})") from None


def members(path: str | Path, select: Callable[[str], bool] | None = None, *,
            untrusted: bool = False) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of a tar's regular members, in tar order: the one tar reader.

    Args:
        path: The tar file.
        select: ``name -> bool``; only the members it accepts are read (the others are
            seeked over). None reads every member.
        untrusted: The tar comes from elsewhere (a partner's package): every header is
            checked by :func:`refusal`, and for duplicate names, before any data is read;
            compressed tars are refused (which also rules out decompression bombs).

    A plain ustar shard (what cxrsynth writes) is read by a fast header parser; any other
    tar by webdataset's expander (trusted), from its start, past what was yielded, or by
    ``tarfile`` (untrusted: links and devices must be seen to be refused).

    Raises:
        ShardNotFound: No such file.
        ShardError: Not a readable tar, or a member shorter than its header says.
        UnsafeTar: (untrusted) A refused member, naming the tar, the member and why.
    """
    path = str(path)
    if store.is_remote(path) and not untrusted:
        yield from _remote_members(path, select)
        return
    with _open(path) as f:
        if untrusted:
            yield from _checked_members(f, path, select)
            return
        done = 0
        try:
            for member in _ustar_headers(f):
                if select is None or select(member.name):
                    yield member.name, read_member(f, member, path)
                    done += 1
            return
        except _NotPlainTar:
            pass
        yield from islice(_webdataset_members(f, path, select), done, None)


def _remote_members(url: str, select: Callable[[str], bool] | None) -> Iterator[tuple[str, bytes]]:
    """:func:`members` of a shard on a store: streamed front to back (:func:`_streamed_members`),
    checked against its index's size and sha256 (:class:`cxrsynth.store.RemoteReader`).

    A reader that stops early (the loader, once its span is read) still gets the check:
    closing this generator reads the rest of the object and raises
    :class:`cxrsynth.store.ObjectChanged` if it is not the one indexed. A tar the plain
    parser does not read is streamed again, through webdataset's expander.
    """
    done = 0
    with store.open_shard(url) as f:
        try:
            for item in _streamed_members(f, url, select):
                yield item
                done += 1
            f.finish()
            return
        except GeneratorExit:
            f.finish()
            raise
        except _NotPlainTar:
            pass
    with store.open_shard(url) as f:
        yield from islice(_webdataset_members(f, url, select), done, None)
        f.finish()


def _checked_members(f, path: str, select: Callable[[str], bool] | None) -> Iterator[tuple[str, bytes]]:
    try:
        listed = list(_ustar_headers(f, every_type=True))
    except _NotPlainTar:
        listed = _tarfile_headers(f, path, UnsafeTar)
    seen: set[str] = set()
    for member in listed:
        why = refusal(member)
        if why is None and member.name in seen:
            why = "a duplicate member name"
        if why is not None:
            raise UnsafeTar(f"{Path(path).name}: member {member.name!r} refused: {why}")
        seen.add(member.name)
    _refuse_trailing_data(f, path, max((m.offset + ((m.size + 511) & ~511) for m in listed), default=0))
    for member in listed:
        if select is None or select(member.name):
            yield member.name, read_member(f, member, path)


def _refuse_trailing_data(f, path: str, end: int) -> None:
    """Refuse anything but zeros after the last member's data (a tar ends in zero blocks).

    Bytes there are read by no tar tool, so nothing checks them, yet an import would copy
    them into the project: a hiding place for anything, identifiers included.
    """
    f.seek(end)
    position = end
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            at = position + next(i for i, b in enumerate(chunk) if b)
            raise UnsafeTar(f"{Path(path).name}: data after the tar's last member (non-zero byte at offset {at}; "
                            f"the members end at {end})")
        position += len(chunk)


def check_imported(root: str | Path, rows: pd.DataFrame) -> None:
    """Refuse rows whose shards belong to a package imported in place and differ from what was
    recorded at import (``imported.package.shards``: size and sha256 per shard).

    A package used in place stays writable by whoever sent or copied it; ``cxrsynth verify``
    reports a change, and every reader of pixels (the loader's selection, :func:`images`)
    refuses it too, so nothing trains on, audits or shows images nobody checked. The sha256
    comes from the digest cache (:mod:`cxrsynth.digests`: re-read only when a file's size,
    mtime, ctime or inode changed), so the check costs a ``stat`` per shard once hashed.

    Raises:
        ShardError: naming the shard, the dataset and what differs.
    """
    from cxrsynth import digests

    root = Path(root)
    if "dataset" not in rows or rows.empty:
        return
    for name in sorted(rows["dataset"].dropna().astype(str).unique()):
        try:
            meta = manifest.read_meta(root, name)
        except CxrsynthError:
            continue  # not a dataset of this project (rows built by hand): nothing recorded to hold them to
        package = (meta.get("imported") or {}).get("package") if isinstance(meta.get("imported"), dict) else None
        if not isinstance(package, dict) or package.get("copied"):
            continue
        recorded = {str(e.get("name")): e for e in package.get("shards") or [] if isinstance(e, dict)}
        used = sorted(set(rows.loc[(rows["dataset"] == name).fillna(False).to_numpy(dtype=bool), "shard"].dropna().astype(str)))
        paths = [str(root / s) for s in used]
        sha = digests.digests(paths, digests.cache_path(root, f"{name}.import"))
        for shard, path, digest in zip(used, paths, sha):
            entry = recorded.get(Path(shard).name)
            if entry is None:
                raise ShardError(f"{name}: shard {shard} was not among the shards recorded when the package was imported")
            if digest != entry.get("sha256"):
                raise ShardError(f"{name}: shard {path} changed since the package was imported (sha256 {digest[:12]}…, "
                                 f"recorded {str(entry.get('sha256'))[:12]}…); `cxrsynth verify {name}` lists every change; "
                                 f"import the package again if the change is wanted")


def images(root: str | Path, rows: pd.DataFrame, *, strict: bool = True) -> Iterator[tuple[str, bytes]]:
    """``(key, PNG bytes)`` of manifest ``rows`` from their shards: images for these rows.

    Each shard is read once, in sorted order, and its selected samples come in tar order
    (only the rows' PNG members are read). ``dict(images(root, rows))`` maps key to PNG.

    Args:
        root: Project root (the ``shard`` paths are relative to it, or absolute; a dataset
            published to a store is read from there, :func:`cxrsynth.store.locations`).
        rows: Manifest rows with ``key``, ``shard`` (and ``dataset``).
        strict: Raise when a row's sample is not in its shard (False: leave it out, for
            a caller that shows the gap).

    Raises:
        ShardError: A row without a shard (a labels-only manifest), or (strict) a row
            whose shard holds no sample of its key.
    """
    root = Path(root)
    keys, where = rows["key"].astype(str).to_numpy(), rows["shard"]
    missing = where.isna().to_numpy(dtype=bool)
    if missing.any():
        raise ShardError(f"{int(missing.sum())} of {len(rows)} rows have no shard (a labels-only manifest?), "
                         f"e.g. {keys[missing][0]!r}; their images cannot be read")
    check_imported(root, rows)
    wanted: dict[str, set[str]] = {}
    for key, shard in zip(keys, where.astype(str)):
        wanted.setdefault(shard, set()).add(key)
    located = store.locations(root, rows)  # a dataset on a store: its objects, streamed
    for shard in sorted(wanted):
        found = set()
        for name, data in members(located[shard], pngs_of(wanted[shard])):
            key = split_name(name)[0]
            found.add(key)
            yield key, data
        lost = wanted[shard] - found
        if strict and lost:
            more = f" (nor {len(lost) - 1} more)" if len(lost) > 1 else ""
            raise ShardError(f"{shard} holds no sample {sorted(lost)[0]!r}{more} that the manifest places in it; "
                             "`cxrsynth verify` checks a dataset's shards")
