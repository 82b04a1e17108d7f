"""Stream a manifest's rows from WebDataset shards as batches: the one loader (classifier and generator).

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

The generator's batches are the same loader in the generator's order with conditioning
vectors and uint8 pixels (what :func:`cxrsynth.diffusion.train.train_dataset` builds)::

    LoaderConfig(batch_size=16, image_size=256, augment=None, seed=0, order="buffer", cond=True, uint8=True)
    batch["cond"]     # float32 (B, 22): labels.conditioning_vectors of the rows
    batch["image"]    # uint8 (B, 1, S, S)

``order="buffer"`` is not the stream layout below but the order the generator has always
trained on (:func:`buffer_samples`), kept so that a seed still trains a generator to the
same bytes: that order (one shuffle buffer over all shards, samples dealt round-robin to
ranks) cannot be cut into the streams that make the classifier's batches independent of
the worker count, so it runs in one process per rank. Rows come from the one
:func:`select`, pixels from the one tar reader (:func:`cxrsynth.shards.members`) and the
one decoder (:func:`cxrsynth.imaging.decode_png`, whose error names the key and shard).

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
   rows' PNGs are read, by :func:`cxrsynth.shards.members`), a seeded ``wds.shuffle``
   buffer, decode + augment straight into the batch tensor. Every batch comes from one stream.
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

import contextlib
import hashlib
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

from cxrsynth import labels, manifest, shards, store
from cxrsynth.config import SHUFFLE_BUFFER
from cxrsynth.errors import CxrsynthError
from cxrsynth.imaging import decode_png


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
        order: ``"streams"``: the layout above. ``"buffer"``: the generator's order (see
            :func:`buffer_samples`: one seeded shard order and one shuffle buffer per epoch,
            samples dealt round-robin to the ranks), in this process only (``workers`` 0).
        cond: Add ``batch["cond"]``, the rows' 22-value conditioning vectors
            (:func:`cxrsynth.labels.conditioning_vectors`), float32 (B, 22).
        uint8: Keep unaugmented pixels as the stored uint8 (the generator scales them
            itself) instead of float32 ``uint8 / 255``.
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
    order: str = "streams"
    cond: bool = False
    uint8: bool = False


# 1. Which rows -------------------------------------------------------------------------

def select(root: str | Path, name: str, split: str | None, *, exclude_uncertain: bool = True,
           images: bool = True) -> pd.DataFrame:
    """The rows of ``name`` (a dataset or a mix) in ``split``: the one row selection.

    The classifier, the generator and ``generate`` (the rows it conditions replicas on)
    all select here; the rows keep the manifest's order.

    Args:
        root: Project root (manifests/ and the shards' relative paths).
        name: Manifest name.
        split: Split to keep: one name, or several separated by commas (``train,tune``);
            ``None``: every row.
        exclude_uncertain: Drop images with any uncertain finding (the training rule of the
            label contract); evaluation and prediction keep them.
        images: The rows must have shards (a loader streams their pixels). False for a
            caller that needs only labels and demographics (``generate``'s conditions may
            come from a labels-only manifest).

    Raises:
        LoaderError: A named split without rows, or (``images``) selected rows without a
            shard (a labels-only manifest cannot be streamed; no row is dropped silently).
    """
    frame = manifest.read(root, name)
    if split is not None:
        wanted = [s.strip() for s in split.split(",") if s.strip()]
        present = set(frame["split"].dropna().astype(str))
        missing = [s for s in wanted if s not in present] or ([] if wanted else [split])
        if missing:
            raise LoaderError(f"{name}: no rows in split {', '.join(map(repr, missing))} "
                              f"(splits: {', '.join(sorted(present)) or 'none; run cxrsynth split'})")
        frame = frame.loc[frame["split"].isin(wanted).fillna(False).to_numpy(dtype=bool)]
    if images:
        missing_shard = frame["shard"].isna().to_numpy(dtype=bool)
        if missing_shard.any():
            raise LoaderError(f"{name}/{split}: {int(missing_shard.sum())} of {len(frame)} rows have no shard (a labels-only "
                              f"manifest?), e.g. {frame.loc[missing_shard, 'key'].iloc[0]!r}; the loader needs images")
        shards.check_imported(root, frame)  # a package used in place, changed since its import: refused
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

def read_spans(spans: list[tuple[str, Span]], wanted: dict[str, set[str]]) -> Iterator[dict]:
    """Samples ``{"__key__", "png", "__url__"}`` of a stream's shard spans, in order.

    webdataset's ``tarfile_to_samples`` for this loader, over the one tar reader
    (:func:`cxrsynth.shards.members`): only the PNGs of the rows the manifest selected are
    read (other splits or datasets sharing the shard, and the JSON copies of the rows, are
    passed over unread), and a shard is closed as soon as its span is complete.

    Args:
        spans: ``(path, span)`` per shard, in reading order.
        wanted: Path → keys of the selected rows in that shard.

    Raises:
        LoaderError: A shard ends before its span does (it lacks rows the manifest places in it).
    """
    for url, span in spans:
        seen, end = 0, span.skip + span.take
        with contextlib.closing(shards.members(url, shards.pngs_of(wanted[url]))) as found:
            for name, data in found:
                seen += 1
                if seen > span.skip:
                    yield {"__key__": shards.split_name(name)[0], "png": data, "__url__": url}
                if seen == end:
                    break
        if seen < end:
            raise LoaderError(f"shard {url} holds {seen} of the {end} selected rows the manifest places in it")


def skip_samples(samples: Iterator[dict], n: int) -> Iterator[dict]:
    """Pass over the first ``n`` samples undecoded (resuming inside an epoch)."""
    return islice(samples, n, None)


def buffer_samples(root: Path, rows: _Rows, config: LoaderConfig, epoch: int) -> Iterator[dict]:
    """Every selected sample of an epoch in the generator's order (``order="buffer"``).

    The order ``cxrsynth generator train`` has trained on since its first version, kept
    so that a seed still trains a generator to the same bytes: the shards holding selected
    rows, sorted and (training) shuffled by ``random.Random(f"{seed}:{epoch}")``, their
    samples in tar order through :func:`buffer_shuffle` drawing from the same generator.
    A rank takes every ``world``-th sample of this sequence (:func:`ShardLoader.batches`).
    Unlike the stream layout, every rank reads every shard.
    """
    order = sorted(rows.wanted)
    rng = random.Random(f"{config.seed}:{epoch}")
    if config.train:
        rng.shuffle(order)
    spans = [(rows.where[shard], Span(shard, 0, len(rows.wanted[shard]))) for shard in order]
    samples = read_spans(spans, {rows.where[shard]: rows.wanted[shard] for shard in order})
    return buffer_shuffle(samples, config.shuffle_buffer, rng) if config.train else samples


def buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """The generator's shuffle buffer: once ``size`` samples are held, a random one swaps
    with the newest and leaves; at the end the rest leave in a shuffled order."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


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
    where: dict[str, str]  # shard (relative path) -> what to open: a local path or a store URL
    cond: np.ndarray | None = None  # (N, 22) float32, when the batches carry conditioning vectors


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
            pixels = decode_png(sample["png"], config.image_size, key=keys[i], shard=sample["__url__"])  # (S, S) uint8
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
        batch = {
            "image": images,  # (B, 1, S, S) float32 in [0, 1]; uint8 when unaugmented
            "labels": torch.from_numpy(rows.labels[idx]),  # (B, 14)
            "mask": torch.from_numpy(rows.mask[idx]),  # (B, 14)
            "key": keys,
            "dataset": rows.dataset[idx].tolist(),
        }
        if rows.cond is not None:
            batch["cond"] = torch.from_numpy(rows.cond[idx])  # (B, 22)
        yield batch


# 4. Streams, workers, ranks ---------------------------------------------------------------

def _stream_pipeline(root: Path, stream: Stream, rows: _Rows, config: LoaderConfig, epoch: int, skip: int):
    """The webdataset pipeline of one stream, skipping its first ``skip`` batches."""
    import webdataset as wds

    spans = [(rows.where[span.shard], span) for span in stream.spans]  # the stream's shard list, in order
    wanted = {rows.where[span.shard]: rows.wanted[span.shard] for span in stream.spans}
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


_ERROR = "__error__"  # a worker's CxrsynthError, in place of a batch


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
        try:
            for j in range(self.start + worker, self.total, workers):  # batch j comes from stream j % count
                s = j % count
                if s not in pipes:
                    skip = len(range(s, self.start, count))  # batches of stream s before `start`
                    pipes[s] = iter(_stream_pipeline(self.root, mine[s], self.rows, self.config, self.epoch, skip))
                yield next(pipes[s])
        except CxrsynthError as exc:
            if torch.utils.data.get_worker_info() is None:
                raise
            # The DataLoader would re-raise it wrapped in the worker's traceback; sent as the
            # worker's next batch, ShardLoader.batches raises it as it is (one clean line).
            yield {_ERROR: exc}


class ShardLoader:
    """Batches of manifest rows streamed from their shards (see the module docstring).

    Args:
        root: Project root (the rows' ``shard`` paths are relative to it; a dataset published
            to a store streams from there, :func:`cxrsynth.store.locations`).
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
        if config.order not in ("streams", "buffer"):
            raise LoaderError(f"unknown loader order {config.order!r} (streams or buffer)")
        if config.order == "buffer" and config.workers:
            raise LoaderError("the buffer order reads in this process: workers must be 0")
        if config.uint8 and config.train and config.augment is not None:
            raise LoaderError("augmented pixels are float: uint8 needs augment=None")
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
                          dataset=rows["dataset"].astype(str).to_numpy(dtype=object), wanted=wanted,
                          where=store.locations(root, rows),
                          cond=labels.conditioning_vectors(rows) if config.cond else None)
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
        if self.config.order == "buffer":
            sizes = rank_batches(self.n_rows, self.config.batch_size, self.world, self.rank, self.config.train)
            mine = islice(buffer_samples(self.root, self.rows, self.config, epoch), self.rank, None, self.world)
            batches = decode_batches(skip_samples(mine, sum(sizes[:start])), tuple(sizes[start:]), self.rows,
                                     self.config, epoch)
        else:
            dataset = RankEpoch(self.root, self.streams(epoch), self.rows, self.config, epoch, start, total)
            batches = iter(dataset) if self.config.workers == 0 else iter(self._workers(dataset, epoch))
        for batch in batches:
            if _ERROR in batch:
                raise batch[_ERROR]
            if batch["image"].dtype == torch.uint8 and not self.config.uint8:  # unaugmented (see decode_batches)
                batch["image"] = to_float(batch["image"], self.config.pin_memory)
            elif self.config.uint8 and self.config.pin_memory and not batch["image"].is_pinned():
                batch["image"] = batch["image"].pin_memory()
            yield batch

    def _workers(self, dataset: RankEpoch, epoch: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.config.workers, pin_memory=self.config.pin_memory,
            prefetch_factor=self.config.prefetch, persistent_workers=False,
            # Its own generator for the workers' base seed (unused: every draw here is seeded by
            # key), so that starting an epoch leaves the global torch generator untouched.
            generator=torch.Generator().manual_seed(derive_seed("workers", self.config.seed, epoch)),
        )
