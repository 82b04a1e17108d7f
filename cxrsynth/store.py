"""Where shards live: the project's disk (the default) or an object store an fsspec URL reaches.

A dataset version published to a store (``--store s3://bucket/prefix``, or the
``CXRSYNTH_STORE`` setting) keeps the layout it has on disk under that URL:
``<url>/data/shards/<dataset>/<version>/<dataset>-%06d.tar`` beside its ``index.json``
and ``features.json``. Its manifest rows keep the store-relative shard names
(``data/shards/...``, as for a local dataset) and its metadata records the store's URL
(``store``): a dataset moves between stores by copying the objects and changing that one
value, never its rows. :func:`locations` turns rows' shard names into what to open.

Credentials are never recorded. fsspec's filesystems take them from the environment and
the usual config files (``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/``~/.aws/``,
``GOOGLE_APPLICATION_CREDENTIALS``, fsspec's own ``FSSPEC_<PROTOCOL>_<OPTION>`` settings;
an S3-compatible server's address from ``AWS_ENDPOINT_URL_S3``); a URL carrying user info
(``s3://key:secret@bucket``) is refused (:func:`check_url`).

Reading a remote shard (:func:`open_shard`) streams it front to back and never seeks
(so ``https://`` objects and pipes read the same way), hashing it on the way: the size
announced must be the index's ``bytes`` before a byte is used, and at its end the sha256
must be the index's, or :class:`ObjectChanged` is raised. A failed read is retried a
bounded number of times (:data:`ATTEMPTS`, reopening at the same byte where the object
allows ranged reads) with short timeouts, so a store that goes away ends the read with
:class:`StoreUnreachable` within seconds, never a hang. A local path (or ``file://``) is
opened as a plain file, as fast as before: the trusted local fast path stays as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from cxrsynth import manifest
from cxrsynth.errors import CheckFailed, CxrsynthError

#: The project setting naming the default store of every writer (``--store`` overrides it).
STORE_ENV = "CXRSYNTH_STORE"
#: Attempts of one read, open or upload before :class:`StoreUnreachable` (1 try + 2 retries).
ATTEMPTS = 3
#: Seconds before retry ``i`` (1-based): ``BACKOFF * 2 ** (i - 1)``.
BACKOFF = 0.2
#: Bytes fetched per request when streaming a shard (the read-ahead block).
BLOCK = 8 << 20
#: Options given to a protocol's filesystem unless fsspec's configuration sets them:
#: short connect/read timeouts and few retries inside the client, so that the retries
#: above bound the time a dead store takes to report (botocore's own default retries a
#: refused connection for about a minute).
CLIENT_DEFAULTS: dict[str, dict] = {
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 1, "mode": "standard"}}},
}


class StoreError(CxrsynthError):
    """An object store that cannot be read or written as asked."""


class ObjectMissing(StoreError, FileNotFoundError):
    """No object at the URL (also a ``FileNotFoundError``)."""


class AccessDenied(StoreError, PermissionError):
    """The store refused the request: credentials missing, wrong or without the right."""


class StoreUnreachable(StoreError):
    """Reads or writes kept failing (the store is down, the network cut) after the bounded retries."""


class ObjectChanged(CheckFailed):
    """An object whose size or sha256 is not the one its index records (changed after publishing)."""


# Where ------------------------------------------------------------------------------------

def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is a URL read through fsspec (``s3://``, ``gs://``, ``https://``...), not a local path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    """The local path of a plain path or a ``file://`` URL."""
    text = str(location)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` with exactly one slash between (URLs and paths alike)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def check_url(url: str) -> str:
    """``url`` without a trailing slash, refused when it carries credentials or no scheme.

    Raises:
        StoreError: user info or a query string in the URL (credentials belong in the
            environment or the usual config files, never in a manifest), or not a URL.
    """
    parts = urlsplit(url)
    if not parts.scheme or "://" not in url:
        raise StoreError(f"store {url!r} is not a URL (s3://bucket/prefix, gs://..., https://..., file:///path)")
    if parts.username or parts.password or "@" in parts.netloc:
        raise StoreError(f"store URL {parts.scheme}://…@{parts.hostname}…: credentials may not be part of a URL, which a "
                         f"manifest records; give them through the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE...) or the "
                         f"store's config file")
    if parts.query or parts.fragment:
        raise StoreError(f"store URL {parts.scheme}://{parts.netloc}{parts.path}?…: a query string (a signed URL's token, "
                         f"an access key) may not be part of a store URL, which a manifest records")
    return url.rstrip("/")


def default_store() -> str | None:
    """The project's default store (``CXRSYNTH_STORE``), or None: shards stay on the local disk."""
    value = os.environ.get(STORE_ENV, "").strip()
    return check_url(value) if value else None


def dataset_store(root: str | Path, name: str) -> str | None:
    """The store URL dataset ``name`` was published to (its metadata's ``store``), or None (local)."""
    try:
        value = manifest.read_meta(root, name).get("store")
    except CxrsynthError:
        return None
    return check_url(str(value)) if value else None


def locations(root: str | Path, rows: pd.DataFrame) -> dict[str, str]:
    """Shard name (the rows' ``shard``) → what to open: ``<store>/<shard>`` for a dataset on a
    store, the local path under ``root`` otherwise (an absolute shard path as it is)."""
    root = Path(root)
    stores: dict[str, str | None] = {}
    out: dict[str, str] = {}
    if rows.empty:
        return out
    datasets = rows["dataset"].astype(str) if "dataset" in rows else pd.Series("", index=rows.index)
    pairs = pd.DataFrame({"dataset": datasets, "shard": rows["shard"]}).dropna().drop_duplicates("shard")
    for dataset, shard in zip(pairs["dataset"], pairs["shard"].astype(str)):
        if dataset not in stores:
            stores[dataset] = dataset_store(root, dataset) if dataset else None
        base = stores[dataset]
        if base is not None and not Path(shard).is_absolute():
            url = join(base, shard)
            out[shard] = url if is_remote(url) else str(local_path(url))  # file://: the plain-file fast path
        else:
            out[shard] = str(Path(shard) if Path(shard).is_absolute() else root / shard)
    return out


def filesystem(url: str):
    """``(fsspec filesystem, path)`` of ``url``, with :data:`CLIENT_DEFAULTS` under fsspec's configuration."""
    import fsspec
    import fsspec.config

    protocol = urlsplit(url).scheme
    configured = fsspec.config.conf.get(protocol, {})
    options = {k: v for k, v in CLIENT_DEFAULTS.get(protocol, {}).items() if k not in configured}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise StoreError(f"{url}: no filesystem for {protocol}:// installed ({exc}); e.g. pip install s3fs (s3://), "
                         f"gcsfs (gs://)") from None
    except ValueError as exc:
        raise StoreError(f"{url}: {exc}") from None


# Errors -------------------------------------------------------------------------------------

def _final(exc: BaseException, url: str, what: str) -> CxrsynthError | None:
    """Our error for a failure that retrying cannot mend (missing, denied), or None (retry it)."""
    if isinstance(exc, CxrsynthError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ObjectMissing(f"missing object: {url} ({what})")
    if isinstance(exc, PermissionError):
        return AccessDenied(f"access denied: {url} ({what}): {exc}; check the credentials in the environment "
                            f"(AWS_ACCESS_KEY_ID, AWS_PROFILE...) or the store's config file")
    if isinstance(exc, (TypeError, AttributeError, NameError, AssertionError)):
        raise exc  # a bug, not the store
    return None


def retrying(url: str, what: str, action, attempts: int | None = None):
    """``action()``, retried up to ``attempts`` times on failures that may pass (a refused
    connection, a timeout, a 5xx); missing objects and denied requests are raised at once.

    Raises:
        ObjectMissing, AccessDenied: at the first such answer.
        StoreUnreachable: every attempt failed, naming the URL, what was done and the last error.
    """
    attempts = ATTEMPTS if attempts is None else attempts
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - sorted by _final: final ones raise, the rest retry
            final = _final(exc, url, what)
            if final is not None:
                raise final from None
            last = exc
            if attempt < attempts:
                time.sleep(BACKOFF * 2 ** (attempt - 1))
    raise StoreUnreachable(f"{url}: {what} failed {attempts} times, last: {type(last).__name__}: "
                           f"{' '.join(str(last).split()) or 'no message'}; is the store reachable?") from None


# Reading ------------------------------------------------------------------------------------

_INDEXES: dict[str, dict[str, dict]] = {}  # folder URL -> shard name -> index entry (per process)


def read_bytes(url: str) -> bytes:
    """A (small) object's bytes, with :func:`retrying`."""
    fs, path = filesystem(url)
    return retrying(url, "read", lambda: fs.cat_file(path))


def index_entries(folder: str, *, fresh: bool = False) -> dict[str, dict]:
    """Shard name → ``{name, count, bytes, sha256}`` of the ``index.json`` in store folder
    ``folder`` (read once per process unless ``fresh``)."""
    if fresh or folder not in _INDEXES:
        url = join(folder, "index.json")
        try:
            data = read_bytes(url)
        except ObjectMissing:
            raise ObjectMissing(f"missing index: {url} (a version folder on a store holds its shards' index.json)") from None
        try:
            index = json.loads(data)
            entries = {str(e["name"]): e for e in index["shards"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"unreadable index: {url}: {type(exc).__name__}: {exc}") from None
        _INDEXES[folder] = entries
    return _INDEXES[folder]


def expected(url: str) -> dict:
    """The index entry of the shard at ``url`` (its folder's ``index.json``).

    Raises:
        ObjectMissing: no index in the folder.
        StoreError: the index does not list the shard.
    """
    folder, _, name = url.rpartition("/")
    entry = index_entries(folder).get(name)
    if entry is None:
        raise StoreError(f"{url}: not listed in {join(folder, 'index.json')}")
    return entry


class RemoteReader:
    """A store object read front to back (``read(n)`` only, no seeking), hashed on the way.

    The object is opened at once (its size must be ``entry["bytes"]``); reads that fail
    are retried by reopening at the same byte (:func:`retrying`); at its end the sha256
    must be ``entry["sha256"]``. :meth:`finish` reads what is left and checks it: a
    reader that stops early calls it to know the object is the one indexed.
    """

    def __init__(self, url: str, entry: dict | None) -> None:
        self.url, self.entry = url, entry
        self.fs, self.path = filesystem(url)
        self.position, self.digest, self.done = 0, hashlib.sha256(), False
        self._file = None
        self._file = retrying(url, "open", self._open)
        size = getattr(self._file, "size", None)
        if entry is not None and size is not None and size != entry["bytes"]:
            self.close()
            raise ObjectChanged(f"size mismatch: {url}: {size} bytes, index says {entry['bytes']}: the object changed "
                                f"after it was published")
        self.name = url

    def _open(self):
        handle = self.fs.open(self.path, "rb", block_size=BLOCK, cache_type="readahead")
        if self.position:
            if not handle.seekable():
                raise StoreError(f"{self.url}: the read broke at byte {self.position} and the object cannot be "
                                 f"reopened there (no ranged reads)")
            handle.seek(self.position)
        return handle

    def _read(self, n: int) -> bytes:
        if self._file is None:  # the last attempt broke: reopen at the byte reached
            self._file = self._open()
        try:
            return self._file.read(n)
        except Exception:
            self.close()
            raise

    def read(self, n: int = -1) -> bytes:
        if self.done:
            return b""
        data = retrying(self.url, f"read at byte {self.position}", lambda: self._read(n))
        self.position += len(data)
        self.digest.update(data)
        if not data or (n < 0) or (self.entry is not None and self.position >= self.entry["bytes"]):
            self._check_end()
        return data

    def _check_end(self) -> None:
        self.done = True
        if self.entry is None:
            return
        if self.position != self.entry["bytes"]:
            raise ObjectChanged(f"size mismatch: {self.url}: {self.position} bytes read, index says {self.entry['bytes']}")
        digest = self.digest.hexdigest()
        if digest != self.entry["sha256"]:
            raise ObjectChanged(f"sha256 mismatch: {self.url}: {digest[:12]}…, index says {str(self.entry['sha256'])[:12]}…: "
                                f"the object changed after it was published; publish the dataset again or restore the object")

    def finish(self) -> None:
        """Read to the end and check the size and sha256 against the index."""
        while not self.done:
            self.read(BLOCK)

    def close(self) -> None:
        if self._file is not None:
            with _quiet():
                self._file.close()
            self._file = None

    def __enter__(self) -> "RemoteReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _quiet:
    """Swallow errors of a cleanup step (closing a broken connection)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        return kind is not None and issubclass(kind, Exception)


def open_shard(url: str, *, check: bool = True) -> RemoteReader:
    """A streaming reader of the shard at store ``url``, checked against its folder's index (``check``)."""
    return RemoteReader(url, expected(url) if check else None)


def spooled(url: str):
    """The shard at ``url`` read whole (checked) into a seekable temporary file, for a reader that
    needs every header before any data (an untrusted tar) or reads members out of order."""
    import tempfile

    copy = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # larger ones go to a temporary file
    with open_shard(url) as reader:
        while block := reader.read(BLOCK):
            copy.write(block)
        reader.finish()
    copy.seek(0)
    return copy


# Writing ------------------------------------------------------------------------------------

def put_files(directory: Path, names: Iterable[str], folder: str) -> list[str]:
    """Upload ``directory/<name>`` to ``folder/<name>`` for each name, in order, each with
    :func:`retrying`, checking each object's size once written; returns the URLs.

    Callers put a version's index last, so a reader never finds an index listing a shard
    not yet there.
    """
    fs, base = filesystem(check_url(folder))
    if urlsplit(folder).scheme == "file":  # object stores have no folders; a file:// store (a shared disk) does
        fs.makedirs(base, exist_ok=True)
    urls = []
    for name in names:
        local, url = directory / name, join(folder, name)
        target = join(base, name)
        retrying(url, "upload", lambda: fs.put_file(str(local), target))
        size = retrying(url, "stat", lambda: fs.info(target)["size"])
        if size != local.stat().st_size:
            raise StoreError(f"{url}: {size} bytes stored, {local.stat().st_size} uploaded")
        urls.append(url)
    _INDEXES.pop(folder.rstrip("/"), None)
    return urls


def put_unit(directory: Path, folder: str, shard: str) -> None:
    """Put one finished local shard on the store, then its receipt (``.progress/<shard>.json``).

    What a job-array part with no shared disk leaves for the step that assembles the version:
    each part writes only its own shards and receipts, never an index (:func:`stored_unit`
    reads them back). The receipt goes last, so a receipt on the store means its shard is there.
    """
    from cxrsynth.shards import PROGRESS_DIR

    put_files(directory, [shard], folder)
    put_files(directory / PROGRESS_DIR, [f"{shard}.json"], join(folder, PROGRESS_DIR))


def stored_unit(folder: str, shard: str, inputs: str | None = None):
    """The :class:`~cxrsynth.shards.ShardResult` of a shard a part put on the store (:func:`put_unit`),
    or None when it must be (re)made: no receipt, a receipt for other ``inputs``, or a shard
    object missing or of another size than its receipt says (its sha256 is the receipt's, and
    every reader checks it against the index built from these receipts)."""
    from cxrsynth.shards import PROGRESS_DIR, ShardResult

    fs, base = filesystem(check_url(folder))
    receipt = join(base, PROGRESS_DIR, f"{shard}.json")
    try:
        data = retrying(join(folder, PROGRESS_DIR, f"{shard}.json"), "read", lambda: fs.cat_file(receipt))
        record = json.loads(data)
        result = ShardResult(**{k: v for k, v in record.items() if k in ShardResult.__dataclass_fields__})
    except ObjectMissing:
        return None
    except (ValueError, TypeError, RecursionError):  # a damaged receipt: the unit is redone
        return None
    if inputs is not None and result.inputs != inputs:
        return None
    try:
        size = retrying(join(folder, shard), "stat", lambda: fs.info(join(base, shard))["size"])
    except ObjectMissing:
        return None
    return result if size == result.bytes else None


def publish_version(directory: Path, url: str, shard_names: list[str], after: tuple[str, ...], *,
                    keep_local: bool = False, sizes: dict[str, int] | None = None) -> list[str]:
    """Put a finished local version folder on the store: its shards, then the files ``after``
    (``features.json``, ``index.json`` last); the local shard files are removed afterwards
    unless ``keep_local`` (their receipts in ``.progress/`` stay). A shard with no local file
    is one a job-array part put there already (:func:`put_unit`): it must be on the store with
    its receipt's size (``sizes``: shard name -> bytes)."""
    local = [name for name in shard_names if (directory / name).is_file()]
    fs, base = filesystem(check_url(url))
    for name in sorted(set(shard_names) - set(local)):  # put there by job-array parts (put_unit): must be there
        target = join(url, name)
        try:
            size = retrying(target, "stat", lambda: fs.info(join(base, name))["size"])
        except ObjectMissing:
            raise StoreError(f"{name}: neither in {directory} nor on the store ({target})") from None
        if sizes is None or size != sizes.get(name):
            raise StoreError(f"{target}: {size} bytes on the store, its receipt says {None if sizes is None else sizes.get(name)}")
    urls = put_files(directory, [*local, *after], url)
    if not keep_local:
        for name in shard_names:
            (directory / name).unlink(missing_ok=True)
    return urls
