"""Stream a manifest's rows from WebDataset shards as classifier batches (training and inference).

A manifest — a dataset split or a mix whose rows point into several datasets' shards —
decides *which* images; the shards supply the pixels; labels come from the manifest rows
(the label contract), never from the tar. Usage::

    from cxrsynth import loader

    rows = loader.select(".", "cxp_mix", "train")            # no uncertain findings (training rule)
    data = loader.ShardLoader(".", rows, loader.LoaderConfig(batch_size=32, image_size=256, workers=4))
    for epoch in range(10):
        for batch in data.batches(epoch):
            batch["image"]    # float32 (B, 1, S, S) in [0, 1] (not normalized; the model normalizes)
            batch["labels"]   # float32 (B, 14): 1 positive, 0 negative or uncertain
            batch["mask"]     # float32 (B, 14): 0 where the finding is uncertain (-1), else 1
            batch["key"], batch["dataset"]   # lists of B strings

How an epoch is laid out (a pure function of the rows, ``seed``, ``epoch``, ``batch_size``,
``world`` and ``streams``; see :func:`plan`):

1. The shards holding selected rows are put in a seeded order (sorted when not training)
   and their selected samples, counted from the manifest, are laid end to end.
2. That sequence is cut into ``world x streams`` contiguous *streams*; a stream is a list
   of shard spans ("the selected samples i..j of shard X", in tar order). Streams are
   dealt to DDP ranks and to DataLoader workers by :func:`split_by_node` and
   :func:`split_by_worker`, small stages like webdataset's own: every worker reads only
   its own shards (a shard split between two streams is read by both, each skipping the
   other's samples undecoded).
3. Each stream is a webdataset pipeline (``wds.DataPipeline``): its shard spans as
   samples (:func:`read_spans`, this loader's ``tarfile_to_samples``: only the selected
   rows' PNGs are read, plain ustar shards by a fast header parser, any other tar by
   webdataset's expander), a seeded ``wds.shuffle`` buffer, decode + augment straight
   into the batch tensor. Every batch comes from one stream.
4. Batch ``j`` of a rank comes from stream ``j % streams``; a worker yields exactly the
   batches ``j`` with ``j % workers == its id``, and the DataLoader collects workers in
   turn, so the rank's batch sequence does not depend on the number of workers.

Guarantees: (a) **the same sequence of batches** — keys, order, pixel values — on a rank
for 0 (in-process), 1, 2, ... workers, for any worker count that divides ``streams``
(default 8: 0, 1, 2, 4 or 8 workers); (b) **a fixed epoch length** in training: every rank
yields exactly ``len(rows) // (world * batch_size)`` full batches, so DDP ranks never wait
on each other; ranks read disjoint rows, and when ``len(rows)`` is a multiple of
``world * batch_size`` an epoch covers every row exactly once (otherwise the tail of the
epoch's last shard waits for a later epoch, a different tail each epoch); (c) each
sample's augmentation is drawn from its own generator seeded by ``(seed, epoch, key)``.
Inference (``train=False``) reads every row exactly once, unshuffled and unaugmented,
rows split across ranks by counts differing by at most one; the last batch may be short.

Augmentations (training only; :class:`Augment`): a small affine (rotation ±10°, scale
0.9–1.1, translation ±5% of the side, bilinear, border padding), horizontal flip off by
default (laterality matters on a chest radiograph), brightness/contrast jitter, Gaussian
noise. All are elementwise torch ops (no reductions), so a sample's pixels do not depend
on how many threads the process running it has.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.utils.data

from cxrsynth import labels, manifest
from cxrsynth.config import SHUFFLE_BUFFER
from cxrsynth.errors import CxrsynthError


class LoaderError(CxrsynthError):
    """Rows the loader cannot stream as asked (no shards, too few rows, shards not as listed)."""


@dataclass(frozen=True)
class Augment:
    """Training augmentations of a radiograph, drawn per sample (all magnitudes uniform).

    Attributes:
        rotate: Rotation range in degrees (±).
        scale: Zoom range (``(0.9, 1.1)``: up to 10% in or out).
        translate: Translation range as a fraction of the side (±).
        hflip: Probability of a horizontal flip (0: off; laterality matters).
        brightness: Additive brightness range on [0, 1] pixels (±).
        contrast: Contrast factor range around mid-grey (1 ± contrast).
        noise: Largest Gaussian noise standard deviation on [0, 1] pixels (drawn in [0, noise]).
    """

    rotate: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    hflip: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    noise: float = 0.03


@dataclass(frozen=True)
class LoaderConfig:
    """How a loader streams rows (``classifier train`` derives it from its recorded ClassifierConfig).

    Attributes:
        batch_size: Images per batch per process.
        image_size: Side the images are resized to (bilinear); None keeps the shards' size.
        train: Shuffle (seeded by ``seed`` and the epoch), augment, fixed epoch length of
            full batches. False: every row once, in shard order, no augmentation.
        augment: Augmentations when training; None disables them.
        seed: Seed of the shard order, the shuffle buffers and the augmentations.
        workers: DataLoader worker processes (0: in this process). Must divide ``streams``.
        streams: Streams per rank; the batch order depends on it (not on ``workers``).
        shuffle_buffer: Samples in each stream's shuffle buffer (PNG bytes, before decoding).
        pin_memory: Pin batches in page-locked memory (for CUDA).
        prefetch: Batches each worker prepares ahead.
    """

    batch_size: int = 64
    image_size: int | None = None
    train: bool = True
    augment: Augment | None = field(default_factory=Augment)
    seed: int = 0
    workers: int = 0
    streams: int = 8
    shuffle_buffer: int = SHUFFLE_BUFFER
    pin_memory: bool = False
    prefetch: int = 2


# 1. Which rows -------------------------------------------------------------------------

def select(root: str | Path, name: str, split: str | None, *, exclude_uncertain: bool = True) -> pd.DataFrame:
    """The rows of ``name`` (a dataset or a mix) in ``split`` that a loader streams.

    Args:
        root: Project root (manifests/ and the shards' relative paths).
        name: Manifest name.
        split: Split to keep (``None``: every row).
        exclude_uncertain: Drop images with any uncertain finding (the training rule of the
            label contract); evaluation and prediction keep them.

    Raises:
        LoaderError: No row in the split, or selected rows without a shard (a labels-only
            manifest cannot be streamed; no row is dropped silently).
    """
    frame = manifest.read(root, name)
    if split is not None:
        keep = (frame["split"] == split).fillna(False).to_numpy(dtype=bool)
        if not keep.any():
            have = sorted(str(s) for s in frame["split"].dropna().unique())
            raise LoaderError(f"{name}: no rows in split {split!r} (splits: {', '.join(have) or 'none'})")
        frame = frame.loc[keep]
    missing = frame["shard"].isna().to_numpy(dtype=bool)
    if missing.any():
        raise LoaderError(f"{name}/{split}: {int(missing.sum())} of {len(frame)} rows have no shard "
                          f"(a labels-only manifest?), e.g. {frame.loc[missing, 'key'].iloc[0]!r}; the loader needs images")
    if exclude_uncertain:
        frame = frame.loc[~labels.has_uncertain(frame)]
    return frame.reset_index(drop=True)


def label_arrays(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, mask)`` float32 (N, 14) of manifest rows: uncertain → label 0, mask 0."""
    codes = labels.findings_matrix(rows)
    mask = (codes != labels.UNCERTAIN).astype(np.float32)
    return (codes == labels.POSITIVE).astype(np.float32), mask


# 2. The epoch's layout -------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """Selected samples ``skip .. skip + take - 1`` of one shard, counted in tar order."""

    shard: str
    skip: int
    take: int


@dataclass(frozen=True)
class Stream:
    """One stream of an epoch: shard spans read in order, and the sizes of its batches.

    ``index`` is the stream's place on its rank (batch ``j`` of the rank comes from stream
    ``j % streams``); ``rank`` the DDP rank it belongs to.
    """

    rank: int
    index: int
    spans: tuple[Span, ...]
    batches: tuple[int, ...]

    @property
    def samples(self) -> int:
        return sum(self.batches)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any values (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rank_batches(n: int, batch_size: int, world: int, rank: int, train: bool) -> list[int]:
    """Sizes of a rank's batches in an epoch of ``n`` rows.

    Training: ``n // (world * batch_size)`` full batches on every rank. Inference: the
    rank's ``n // world`` (+1 for the first ``n % world`` ranks) rows in batches of
    ``batch_size``, the last one possibly short.
    """
    if train:
        return [batch_size] * (n // (world * batch_size))
    mine = n // world + (1 if rank < n % world else 0)
    return [min(batch_size, mine - start) for start in range(0, mine, batch_size)]


def plan(counts: list[tuple[str, int]], batch_size: int, world: int, streams: int, train: bool,
         seed: int = 0, epoch: int = 0) -> list[Stream]:
    """Lay out an epoch: ``world x streams`` streams of contiguous shard spans.

    Args:
        counts: ``(shard, selected rows)`` per shard, in any order (sorted here).
        batch_size, world, streams, train: As in :class:`LoaderConfig`.
        seed, epoch: Seed of the shard order (training).

    Returns:
        Streams in global order: stream ``g`` is stream ``g // world`` of rank ``g % world``
        (so :func:`split_by_node` is a stride, as in webdataset).
    """
    order = sorted(counts)
    if train:
        random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    sizes = {r: rank_batches(sum(c for _, c in order), batch_size, world, r, train) for r in range(world)}
    out: list[Stream] = []
    position, cursor = 0, 0  # samples laid out so far; index of the shard holding `position`
    starts = np.cumsum([0] + [c for _, c in order])
    for g in range(world * streams):
        rank, index = g % world, g // world
        batches = tuple(sizes[rank][index::streams])
        need, spans = sum(batches), []
        while need > 0:
            shard, count = order[cursor]
            skip = position - int(starts[cursor])
            take = min(count - skip, need)
            if take > 0:
                spans.append(Span(shard, skip, take))
            position, need = position + take, need - take
            if skip + take == count:
                cursor += 1
        out.append(Stream(rank, index, tuple(spans), batches))
    return out


def split_by_node(streams: list[Stream], rank: int, world: int) -> list[Stream]:
    """This rank's streams (webdataset's ``split_by_node``: a stride over the list)."""
    return list(islice(streams, rank, None, world))


def split_by_worker(streams: list[Stream], worker: int, workers: int, start: int = 0) -> list[Stream]:
    """A worker's streams: those whose batches ``j`` satisfy ``(j - start) % workers == worker``.

    With ``start = 0`` this is webdataset's ``split_by_worker`` stride. Streams must be a
    multiple of workers, so that each stream belongs to exactly one worker.
    """
    return [s for s in streams if (s.index - start) % workers == worker]


# 3. The stages of a stream ---------------------------------------------------------------

class _NotPlainTar(Exception):
    """A tar entry the fast reader does not handle (PAX or GNU long-name headers, links...)."""


_ZERO_BLOCK = bytes(512)


def plain_tar_members(stream, url: str, select) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the selected regular files of an uncompressed ustar archive, in order.

    A minimal reader for the plain ustar members cxrsynth's shards hold (webdataset's
    ``TarWriter`` with short key names): a header is parsed from fixed offsets and its
    checksum verified; an unselected member is seeked over unread. Python's ``tarfile``
    (which webdataset's expander uses) parses every header into an object, several times
    the cost of decoding a small PNG. Any other kind of entry raises :class:`_NotPlainTar`.
    """
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == _ZERO_BLOCK:
            return
        checksum = sum(header) - sum(header[148:156]) + 8 * 32
        try:
            recorded = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _NotPlainTar(url) from None
        if checksum != recorded or header[156:157] not in (b"0", b"\0"):
            raise _NotPlainTar(url)
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
            name = f"{prefix.decode()}/{name}"
        padded = (size + 511) & ~511
        if select(name):
            data = stream.read(size)
            stream.seek(padded - size, 1)
            yield name, data
        else:
            stream.seek(padded, 1)


def _webdataset_members(stream, url: str, select) -> Iterator[tuple[str, bytes]]:
    """The same as :func:`plain_tar_members` through webdataset's tar expander (any tar)."""
    import webdataset as wds

    for item in wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], select_files=select, eof_value=None):
        yield item["fname"], item["data"]


def read_spans(spans: list[tuple[str, Span]], wanted: dict[str, set[str]]) -> Iterator[dict]:
    """Samples ``{"__key__", "png", "__url__"}`` of a stream's shard spans, in order.

    webdataset's ``tarfile_to_samples`` for this loader: a sample is the members sharing a
    key (the file name up to its first dot); only the PNGs of the rows the manifest
    selected are read (other splits or datasets sharing the shard, and the JSON copies of
    the rows, are passed over unread), and a shard is closed as soon as its span is
    complete. Plain ustar shards are read by :func:`plain_tar_members`; any other tar by
    webdataset's expander (from the start of that shard, skipping what was yielded).

    Args:
        spans: ``(path, span)`` per shard, in reading order.
        wanted: Path → keys of the selected rows in that shard.

    Raises:
        LoaderError: A shard ends before its span does (it lacks rows the manifest places in it).
    """
    for url, span in spans:
        keys = wanted[url]

        def select(name: str) -> bool:
            key, _, ext = name.rsplit("/", 1)[-1].partition(".")
            return ext == "png" and key in keys

        yielded = 0
        for reader in (plain_tar_members, _webdataset_members):
            start, seen = span.skip + yielded, 0  # selected members to pass over in this reading
            with open(url, "rb") as stream:
                try:
                    for name, data in reader(stream, url, select):
                        seen += 1
                        if seen <= start:
                            continue
                        yield {"__key__": name.rsplit("/", 1)[-1].partition(".")[0], "png": data, "__url__": url}
                        yielded += 1
                        if yielded == span.take:
                            break
                except _NotPlainTar:
                    continue  # read this shard again with webdataset's expander, past what was yielded
            break
        if yielded < span.take:
            raise LoaderError(f"shard {url} holds {seen} of the {span.skip + span.take} selected rows "
                              "the manifest places in it")


def skip_samples(samples: Iterator[dict], n: int) -> Iterator[dict]:
    """Pass over the first ``n`` samples undecoded (resuming inside an epoch)."""
    return islice(samples, n, None)


def decode_png(png: bytes, size: int | None) -> np.ndarray:
    """PNG bytes → (S, S) uint8, bilinear-resized to ``size`` when given and different."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("L")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on PIL's read-only view)


def augment_image(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Augment one image ``(1, S, S)`` float in [0, 1] with draws from ``gen``.

    1. affine: output pixel ``p`` (normalized coords) samples the input at
       ``R(-angle) p / scale - t`` (rotation, zoom, translation), bilinear, border padding;
    2. horizontal flip with probability ``hflip``;
    3. ``x <- (x - 0.5) * contrast + 0.5 + brightness``;
    4. ``x <- x + sigma * N(0, 1)``, clamped to [0, 1].
    """
    import torch.nn.functional as F

    u = torch.rand(7, generator=gen, dtype=torch.float64).tolist()
    angle = math.radians((2 * u[0] - 1) * aug.rotate)
    scale = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * u[1]
    tx, ty = ((2 * u[2] - 1) * 2 * aug.translate, (2 * u[3] - 1) * 2 * aug.translate)  # normalized units span 2
    flip = u[4] < aug.hflip
    contrast = 1 + (2 * u[5] - 1) * aug.contrast
    brightness = (2 * u[6] - 1) * aug.brightness
    sigma = float(torch.rand((), generator=gen, dtype=torch.float64)) * aug.noise
    side = x.shape[-1]
    # The sampling grid, elementwise (no matmul, whose blocking could depend on threads).
    lin = (torch.arange(side, dtype=torch.float32) * 2 + 1) / side - 1  # pixel centres in (-1, 1)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")  # (S, S)
    if flip:
        gx = -gx
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    grid = torch.stack((c * gx + s * gy - tx, -s * gx + c * gy - ty), dim=-1)[None]  # (1, S, S, 2)
    x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]  # (1, S, S)
    x = (x - 0.5) * contrast + (0.5 + brightness)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp_(0.0, 1.0)


@dataclass
class _Rows:
    """What a worker needs of the selected rows (inherited by forked workers)."""

    row_of: dict[str, int]
    labels: np.ndarray  # (N, 14) float32
    mask: np.ndarray  # (N, 14) float32
    dataset: np.ndarray  # (N,) object
    wanted: dict[str, set[str]]  # shard (relative path) -> keys selected in it


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory.

    A worker's batch travels to the main process through shared memory; allocating it
    there from the start (as torch's own ``default_collate`` does) saves a copy per batch.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    base = torch.empty(0, dtype=dtype)
    storage = base._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return base.new(storage).resize_(shape)


def to_float(pixels: torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
    """uint8 pixels → float32 ``uint8 / 255`` (the one place unaugmented pixels are divided)."""
    # numpy, one thread: torch's division would wake its thread pool, whose spinning threads
    # take CPU from the workers; a fresh torch.empty would page-fault its 16 MB at 256 px.
    out = torch.from_numpy(np.divide(pixels.numpy(), np.float32(255.0), dtype=np.float32))
    return out.pin_memory() if pin_memory else out


def decode_batches(samples: Iterator[dict], sizes: tuple[int, ...], rows: _Rows, config: LoaderConfig,
                   epoch: int) -> Iterator[dict]:
    """Batch ``i`` of ``sizes[i]`` samples: PNGs decoded (and augmented when training) into one tensor.

    Augmented pixels are float32 in [0, 1]. Unaugmented ones stay uint8 here and
    :meth:`ShardLoader.batches` divides them by 255 (:func:`to_float`) in the main process:
    a quarter of the bytes through a DataLoader worker's shared memory, whose fresh pages
    cost a worker about a fifth of its decode rate in float32. Labels and masks come from
    the manifest rows.
    """
    augment = config.augment if config.train else None
    samples = iter(samples)
    for size in sizes:
        chunk = list(islice(samples, size))
        if len(chunk) < size:
            raise LoaderError(f"a stream ended after {len(chunk)} of a batch's {size} samples")
        keys = [sample["__key__"] for sample in chunk]
        images = None
        for i, sample in enumerate(chunk):
            pixels = decode_png(sample["png"], config.image_size)  # (S, S) uint8
            if images is None:
                images = _batch_buffer((size, 1, *pixels.shape), torch.uint8 if augment is None else torch.float32)  # (B, 1, S, S)
                view = images.numpy()
            elif pixels.shape != images.shape[2:]:
                raise LoaderError(f"images of different sizes in one batch ({tuple(images.shape[2:])} and "
                                  f"{pixels.shape}, {keys[i]!r}); set image_size")
            if augment is None:
                view[i, 0] = pixels
            else:
                gen = torch.Generator().manual_seed(derive_seed("augment", config.seed, epoch, keys[i]))
                x = torch.from_numpy(pixels).float().div_(255.0)[None]  # (1, S, S)
                images[i] = augment_image(x, augment, gen)
        idx = np.fromiter((rows.row_of[k] for k in keys), dtype=np.int64, count=len(keys))
        yield {
            "image": images,  # (B, 1, S, S) float32 in [0, 1]; uint8 when unaugmented
            "labels": torch.from_numpy(rows.labels[idx]),  # (B, 14)
            "mask": torch.from_numpy(rows.mask[idx]),  # (B, 14)
            "key": keys,
            "dataset": rows.dataset[idx].tolist(),
        }


# 4. Streams, workers, ranks ---------------------------------------------------------------

def _stream_pipeline(root: Path, stream: Stream, rows: _Rows, config: LoaderConfig, epoch: int, skip: int):
    """The webdataset pipeline of one stream, skipping its first ``skip`` batches."""
    import webdataset as wds

    spans = [(str(root / span.shard), span) for span in stream.spans]  # the stream's shard list, in order
    wanted = {str(root / span.shard): rows.wanted[span.shard] for span in stream.spans}
    stages: list[Any] = [lambda: read_spans(spans, wanted)]
    if config.train:
        rng = random.Random(derive_seed("buffer", config.seed, epoch, stream.rank, stream.index))
        buffer = max(1, min(config.shuffle_buffer, stream.samples))
        stages.append(wds.shuffle(buffer, initial=buffer, rng=rng))
    stages += [
        lambda src: skip_samples(src, sum(stream.batches[:skip])),
        lambda src: decode_batches(src, stream.batches[skip:], rows, config, epoch),
    ]
    return wds.DataPipeline(*stages)


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class RankEpoch(torch.utils.data.IterableDataset):
    """One rank's epoch from batch ``start`` on: in each worker, its streams' batches in the rank's order."""

    def __init__(self, root: Path, streams: list[Stream], rows: _Rows, config: LoaderConfig, epoch: int,
                 start: int, total: int) -> None:
        super().__init__()
        self.root, self.streams, self.rows, self.config = root, streams, rows, config
        self.epoch, self.start, self.total = epoch, start, total

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_info()
        count = len(self.streams)
        mine = {s.index: s for s in split_by_worker(self.streams, worker, workers, self.start)}
        pipes: dict[int, Iterator[dict]] = {}
        for j in range(self.start + worker, self.total, workers):  # batch j comes from stream j % count
            s = j % count
            if s not in pipes:
                skip = len(range(s, self.start, count))  # batches of stream s before `start`
                pipes[s] = iter(_stream_pipeline(self.root, mine[s], self.rows, self.config, self.epoch, skip))
            yield next(pipes[s])


class ShardLoader:
    """Batches of manifest rows streamed from their shards (see the module docstring).

    Args:
        root: Project root (the rows' ``shard`` paths are relative to it).
        rows: Manifest rows to stream (:func:`select`); needs ``key``, ``dataset``,
            ``shard`` and the 14 finding columns.
        config: How to stream them.
        rank, world: This process's place in a DDP job (:func:`cxrsynth.runtime.distributed`).

    ``len(loader)`` is the number of batches per epoch on this rank (the same on every
    rank when training); ``loader.batches(epoch)`` iterates one epoch; iterating the
    loader itself runs the epoch set by :meth:`set_epoch` (0 by default).
    """

    def __init__(self, root: str | Path, rows: pd.DataFrame, config: LoaderConfig, *, rank: int = 0, world: int = 1) -> None:
        if config.batch_size < 1 or config.streams < 1 or world < 1 or not 0 <= rank < world:
            raise LoaderError(f"bad loader setup: batch_size {config.batch_size}, streams {config.streams}, "
                              f"rank {rank} of {world}")
        if config.workers < 0 or (config.workers > 0 and config.streams % config.workers):
            raise LoaderError(f"workers ({config.workers}) must divide streams ({config.streams}): the batch order is "
                              "fixed by the streams, each of which one worker reads")
        if len(rows) == 0:
            raise LoaderError("no rows to stream")
        if config.train and len(rows) < world * config.batch_size:
            raise LoaderError(f"{len(rows)} rows are fewer than one global batch ({world} x {config.batch_size})")
        self.root, self.config, self.rank, self.world = Path(root), config, rank, world
        keys = rows["key"].astype(str).to_numpy()
        if len(set(keys)) != len(keys):
            raise LoaderError("rows must have unique keys")
        shard = rows["shard"].astype(str).to_numpy()
        wanted: dict[str, set[str]] = {}
        for k, s in zip(keys, shard):
            wanted.setdefault(s, set()).add(k)
        y, mask = label_arrays(rows)
        self.rows = _Rows(row_of={k: i for i, k in enumerate(keys)}, labels=y, mask=mask,
                          dataset=rows["dataset"].astype(str).to_numpy(dtype=object), wanted=wanted)
        self.counts = [(s, len(k)) for s, k in wanted.items()]
        self.n_rows = len(keys)
        self._epoch = 0

    def __len__(self) -> int:
        return len(rank_batches(self.n_rows, self.config.batch_size, self.world, self.rank, self.config.train))

    def streams(self, epoch: int) -> list[Stream]:
        """This rank's streams for ``epoch`` (the layout; nothing is read)."""
        c = self.config
        return split_by_node(plan(self.counts, c.batch_size, self.world, c.streams, c.train, c.seed, epoch),
                             self.rank, self.world)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        return self.batches(self._epoch)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """The batches of ``epoch`` on this rank, from batch ``start`` on (resuming an epoch).

        Skipped batches' samples are read but not decoded.
        """
        total = len(self)
        if not 0 <= start <= total:
            raise LoaderError(f"start batch {start} outside the epoch's {total} batches")
        dataset = RankEpoch(self.root, self.streams(epoch), self.rows, self.config, epoch, start, total)
        for batch in dataset if self.config.workers == 0 else self._workers(dataset, epoch):
            if batch["image"].dtype == torch.uint8:  # unaugmented (see decode_batches)
                batch["image"] = to_float(batch["image"], self.config.pin_memory)
            yield batch

    def _workers(self, dataset: RankEpoch, epoch: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.config.workers, pin_memory=self.config.pin_memory,
            prefetch_factor=self.config.prefetch, persistent_workers=False,
            # Its own generator for the workers' base seed (unused: every draw here is seeded by
            # key), so that starting an epoch leaves the global torch generator untouched.
            generator=torch.Generator().manual_seed(derive_seed("workers", self.config.seed, epoch)),
        )
