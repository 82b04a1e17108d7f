"""The share package format, its checksummed index, verification and safe tar reading.

A package is a folder::

    index.json           format, name, version, and every other file's path, bytes and sha256
    manifest.parquet     one row per image, no real identifier (uncompressed: greppable)
    DATASHEET.md         "Datasheets for Datasets" sections, the audit's result
    shards/index.json    the shard index of a dataset version (as data/shards/<name>/<version>/)
    shards/<name>-000000.tar ...   <key>.png + <key>.json per sample

:func:`verify` re-hashes every file against ``index.json`` and names each mismatch, missing
and extra file. A package comes from elsewhere, so everything here treats it as untrusted:
index paths must be plain relative paths inside the folder, no file may be a link, and
:func:`read_tar` yields a tar's members only after refusing anything but flat regular files
named ``<key>.<ext>`` (no absolute path, no ``..``, no link, device or fifo, no duplicate).
Nothing is ever extracted to disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from cxrsynth import shards
from cxrsynth.errors import CheckFailed, CxrsynthError

FORMAT = "cxrsynth-share/1"
INDEX = "index.json"
MANIFEST = "manifest.parquet"
DATASHEET = "DATASHEET.md"
SHARDS = "shards"
KEY_PATTERN = shards.KEY_PATTERN
EXTENSIONS = shards.SAMPLE_EXTENSIONS


class ShareError(CxrsynthError):
    """A package, an export or an import that cannot go ahead as asked."""


class UnsafePackage(CheckFailed):
    """A package member or row that an untrusted package must not contain (exit code 1)."""


def write_index(directory: Path, meta: dict) -> Path:
    """Write ``index.json``: ``meta`` plus every other file's path, bytes and sha256 (sorted)."""
    files = []
    for path in sorted(p for p in walk(directory) if p.is_file() and not p.is_symlink() and p != directory / INDEX):
        rel = path.relative_to(directory).as_posix()
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": shards.sha256_file(path)})
    index = {"format": FORMAT, **meta, "files": files}
    target = directory / INDEX
    target.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return target


def walk(directory: Path) -> list[Path]:
    """Every file, folder and link under ``directory``, sorted; links are listed, never followed."""
    import os

    out = []
    for top, folders, files in os.walk(directory, followlinks=False):
        out += [Path(top) / name for name in folders + files]
    return sorted(out)


def safe_relative(path: str) -> bool:
    """True for a plain relative POSIX path with no empty, ``.`` or ``..`` part."""
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def read_index(directory: Path) -> dict:
    """The package's ``index.json``, checked for shape (raises :class:`CheckFailed`)."""
    path = Path(directory) / INDEX
    if path.is_symlink() or not path.is_file():
        raise CheckFailed(f"{directory}: no {INDEX} (not a share package, or an interrupted export)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckFailed(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("files"), list):
        raise CheckFailed(f"{path}: not a {FORMAT} index")
    for entry in index["files"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            raise CheckFailed(f"{path}: malformed entry {entry!r}")
        if not safe_relative(entry.get("path")):
            raise UnsafePackage(f"{path}: entry {entry.get('path')!r} is not a plain relative path inside the package")
    return index


def verify(directory: str | Path) -> list[str]:
    """Re-hash every file of a package; return the problems (empty when it matches its index).

    Problems: a missing index; a listed file missing, of another size or sha256, or a link;
    any file, link or folder not listed (an extra file); a listed path given twice.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory}: no such package folder"]
    try:
        index = read_index(directory)
    except CheckFailed as exc:
        return [str(exc)]
    problems, listed = [], set()
    for entry in index["files"]:
        rel = entry["path"]
        if rel in listed:
            problems.append(f"listed twice: {rel}")
            continue
        listed.add(rel)
        path = directory / rel
        parts = PurePosixPath(rel).parts
        if any(directory.joinpath(*parts[: i + 1]).is_symlink() for i in range(len(parts))):
            problems.append(f"link: {rel} (a package holds plain files only)")
            continue
        if not path.is_file():
            problems.append(f"missing file: {rel}")
            continue
        problem = shards.file_mismatch(path, entry, rel)
        if problem is not None:
            problems.append(problem)
    folders = {str(PurePosixPath(rel).parent) for rel in listed} | {"."}
    folders |= {str(p) for rel in listed for p in PurePosixPath(rel).parents}
    for path in walk(directory):
        rel = path.relative_to(directory).as_posix()
        if rel == INDEX:
            continue
        if path.is_symlink():
            if rel not in listed:
                problems.append(f"extra link: {rel}")
        elif path.is_dir():
            if rel not in folders:
                problems.append(f"extra folder: {rel}")
        elif rel not in listed:
            problems.append(f"extra file: {rel}")
    return problems


def check(directory: str | Path) -> dict:
    """:func:`verify`, raising :class:`CheckFailed` naming every problem; returns the index."""
    problems = verify(directory)
    if problems:
        raise CheckFailed(f"{directory}: {len(problems)} problem(s): " + "; ".join(problems))
    return read_index(Path(directory))


def read_tar(path: str | Path) -> Iterator[tuple[str, str, bytes]]:
    """Yield ``(key, ext, data)`` of an untrusted tar's members, in order, after checking each.

    :func:`cxrsynth.shards.members` with ``untrusted=True``: every member header is checked
    before any data is read, and a refused member raises :class:`UnsafePackage` naming the
    tar, the member and why. Compressed tars are refused, which also rules out
    decompression bombs; duplicate names are refused (a later member would silently
    replace an earlier one).
    """
    try:
        for name, data in shards.members(path, untrusted=True):
            key, _, ext = name.partition(".")
            yield key, ext, data
    except shards.UnsafeTar as exc:
        raise UnsafePackage(str(exc)) from None


def samples(path: str | Path) -> Iterator[dict]:
    """Group :func:`read_tar`'s members into samples ``{"__key__", "png", "json"}``; each key once, complete."""
    current: dict | None = None
    done: set[str] = set()
    for key, ext, data in read_tar(path):
        if current is not None and key != current["__key__"]:
            yield _complete(path, current)
            done.add(current["__key__"])
            current = None
        if key in done:
            raise UnsafePackage(f"{Path(path).name}: sample {key!r} appears in two places")
        current = current or {"__key__": key}
        current[ext] = data
    if current is not None:
        yield _complete(path, current)


def _complete(path: str | Path, sample: dict) -> dict:
    missing = [ext for ext in EXTENSIONS if ext not in sample]
    if missing:
        raise UnsafePackage(f"{Path(path).name}: sample {sample['__key__']!r} has no {', '.join(missing)} member")
    return sample


#: PNG chunks a grayscale image needs; every other (text, time, ICC, EXIF...) is dropped.
PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")


def strip_png(data: bytes) -> bytes:
    """The PNG with only its image chunks (IHDR, PLTE, IDAT, IEND): no text, time or EXIF,
    nothing after IEND.

    The pixels are untouched (the same bytes for cxrsynth's own PNGs, which carry no other
    chunk). Raises :class:`ShareError` for data that is not a well-formed PNG.
    """
    from cxrsynth.imaging import ImageError, PNG_SIGNATURE, png_chunks

    try:
        chunks, _ = png_chunks(data)
    except ImageError as exc:
        raise ShareError(str(exc)) from None
    return PNG_SIGNATURE + b"".join(data[a:b] for kind, a, b in chunks if kind in PNG_CRITICAL)
