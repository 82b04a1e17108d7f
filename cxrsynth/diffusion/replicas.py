"""Synthetic replicas: a generator + a conditions manifest → a new shard version + manifest.

Each source row (real image) of the chosen split is replicated ``replicas`` times with its
exact demographics and findings. Replica ``r`` of source row ``k`` gets its own seed,
derived from (base seed, r, source key), so its noise does not depend on batch size,
ordering, the number of GPUs or which job-array part made it. The network's rounding
does depend on the batch size, on ``compile``, and on the numerics of the machine
(:func:`cxrsynth.runtime.numerics`: device type, CPU instruction set and intra-op thread
count, or GPU model and CUDA/cuDNN versions; the torch version): all of these are part of
the version, so one version names one set of bytes. Another batch size or thread count
is another version (measured on CPU: at most one grey level apart, on under 1% of
pixels). Under ``torchrun`` every rank runs with ``OMP_NUM_THREADS`` (1 unless set): a
single process gives the same bytes with ``--threads`` equal to it.

The version also hashes the conditions themselves (``conditions_sha256``: each conditioning
row's key, split, demographics and findings) beside the conditions dataset's version, so
other conditions (a re-split, labels changed under a hand-named version) are another
replica set, never the old images under new rows.

Rows are planned as fixed units of ``shard_size`` images, each written as one shard by
the project's single shard writer (:mod:`cxrsynth.shards`): a killed run restarted with
the same command skips finished shards and ends with byte-identical output; ``part``
(``i/N``, job arrays) or ``torchrun`` ranks take units ``i::N``. As in an ingest, each
shard's receipt records a digest of what the unit was made from (:func:`unit_inputs`: its
planned rows, with their source keys, conditioning values, seeds and replicas, and every
parameter of the version: generator, sampler, steps, guidance, eta, formula, batch size,
numerics, the conditions and their version); a shard is reused only when that digest is
unchanged, and redone otherwise.

Work is planned first (:func:`prepare`: conditions, generator, version, this process's
units), so that every bad input fails before any image is sampled; :func:`run` samples
and writes the units. Finishing (:func:`cxrsynth.publish.publish`: ``index.json``, the
manifest, its rejects file): every process, after its own units, takes an exclusive
``flock`` on ``<version>/.progress/finalize.lock``, and under it checks whether every
unit is finished; if so, it writes them. So the *last* process to finish writes them,
whichever rank or job-array part it is (a rank that finishes early sees unfinished units
and leaves); two processes finishing at the same moment are serialised by the lock, and
the second rewrites the same bytes after the first (atomic renames: readers never see a
half-written file). No process waits for another and no process group is needed
(``torchrun`` is only a launcher here); the lock is released by the kernel if a process
dies. ``flock`` is advisory and works on local file systems and NFS (Linux emulates it
with POSIX locks there).

With a ``store`` the parts need no shared disk at all: each unit's shard and receipt go to
the store's version folder as soon as written (:func:`cxrsynth.store.put_unit`; the local
shard file is removed), and a unit counts as done when its receipt is there for the same
inputs and its shard object has the receipt's size (:func:`cxrsynth.store.stored_unit`).
Each part writes only its own objects; whichever process finds every unit done (the last
part, or the same command run later without ``part`` in the project) writes the index
there, then its own manifest. A killed part rerun resumes from the store.

Synthetic rows carry no real identifiers: no patient, study or source path; the key is
``<name>-r<replica>-<row>``. ``source_key`` keeps the link to the real row for the
experiments (``cxrsynth share export`` drops it).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cxrsynth import labels, manifest, runtime, shards
from cxrsynth.config import MAX_BATCH, MAX_REPLICAS, MAX_SAMPLER_STEPS, SHARD_SIZE, Config, setting
from cxrsynth.errors import CxrsynthError
from cxrsynth.publish import Metadata, check_target, publish, writer_lock
from cxrsynth.store import check_url, join, put_unit, stored_unit


@dataclass(frozen=True)
class GenerateConfig(Config):
    """Sampling and layout parameters of a replica set (recorded in the manifest)."""

    kind = "generate config"  # how errors name these settings (a class attribute, not a field)

    replicas: int = setting(1, ge=1, le=MAX_REPLICAS)
    guidance: float = setting(1.0, ge=0)  # standard formula: 1 = conditional model alone (the paper's "CFG 0")
    sampler: str = "ddim"
    steps: int = setting(200, ge=1, le=MAX_SAMPLER_STEPS)
    eta: float = setting(0.0, ge=0, le=1)  # DDIM's eta: 1 is DDPM's variance; above it the step is NaN
    cfg_formula: str = "standard"
    seed: int = 0
    batch_size: int = setting(16, ge=1, le=MAX_BATCH)
    shard_size: int = SHARD_SIZE
    compile: bool = False  # torch.compile the network (GPU throughput; may round differently from eager)
    rebalance: float | None = None  # draw conditions so rarer findings reach this prevalence (cxrsynth.diffusion.rebalance)

    def __post_init__(self) -> None:
        super().__post_init__()  # every number finite (guidance, eta, rebalance), guidance >= 0
        for what in ("replicas", "steps", "batch_size", "shard_size"):
            if getattr(self, what) < 1:
                raise CxrsynthError(f"{what} must be >= 1, got {getattr(self, what)}")
        if self.eta < 0:
            raise CxrsynthError(f"eta must be >= 0, got {self.eta}")
        if self.rebalance is not None and not 0 < self.rebalance < 1:
            raise CxrsynthError(f"rebalance must be a prevalence in (0, 1), got {self.rebalance}")

    def recorded(self) -> dict:
        """The settings a version records and hashes (``rebalance`` only when set, so plain
        replica sets keep the versions they always had)."""
        out = asdict(self)
        if out["rebalance"] is None:
            del out["rebalance"]
        return out

    def check_names(self) -> None:
        """Fail now, naming the known ones, on a sampler or guidance formula nobody registered."""
        from cxrsynth.diffusion.sample import guidance_branches
        from cxrsynth.diffusion.schedule import get_sampler

        get_sampler(self.sampler)
        guidance_branches(self.guidance, self.cfg_formula)  # type: ignore[arg-type]


def image_seed(base: int, replica: int, source_key: str) -> int:
    """A 63-bit seed for one synthetic image, stable under any batching or sharding."""
    digest = hashlib.blake2b(f"{base}:{replica}:{source_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def draw_seed(base: int, replica: int) -> int:
    """The seed of replica ``replica``'s condition draw (rebalanced replicas)."""
    return image_seed(base, replica, "rebalance")


def generator_id(generator_dir: str | Path) -> str:
    """Short hash of a generator's weights (``*.safetensors``) and ``generator.json``."""
    digest = hashlib.sha256()
    files = sorted(Path(generator_dir).glob("*.safetensors")) + sorted(Path(generator_dir).glob("generator.json"))
    if not files:
        raise CxrsynthError(f"{generator_dir} holds no generator weights (*.safetensors): not a generator folder")
    for f in files:
        digest.update(f.name.encode())
        digest.update(shards.sha256_file(f).encode())
    return digest.hexdigest()[:12]


def plan(conditions: pd.DataFrame, name: str, config: GenerateConfig, gen_id: str) -> pd.DataFrame:
    """The synthetic manifest rows (without shards): replica-major, source order within.

    Each replica conditions on every source row once; with ``config.rebalance`` a replica
    is as many rows drawn from the source by :func:`cxrsynth.diffusion.rebalance.rebalance_weights`
    (rarer findings raised to that prevalence), a seeded draw of its own per replica.
    """
    keep = ["split", "sex", "age", "race", "view", *labels.FINDING_COLUMNS]
    base = conditions.reset_index(drop=True)
    weights = None
    if config.rebalance is not None and len(base):
        from cxrsynth.diffusion.rebalance import rebalance_weights

        weights = rebalance_weights(labels.findings_matrix(base), config.rebalance)
    parts = []
    for r in range(config.replicas):
        source = base
        if weights is not None:
            from cxrsynth.diffusion.rebalance import systematic_draw

            source = base.iloc[systematic_draw(weights, len(base), seed=draw_seed(config.seed, r))].reset_index(drop=True)
        part = source.loc[:, keep].copy()
        part.insert(0, "key", [f"{name}-r{r:02d}-{i:07d}" for i in range(len(source))])
        part["source_key"] = source["key"].astype("string").to_numpy()
        part["replica"] = r
        # a rebalanced replica may draw a source row twice: its seed also takes the row number
        seed_keys = source["key"].astype(str) if weights is None else [f"{k}#{i}" for i, k in enumerate(source["key"].astype(str))]
        part["seed"] = [image_seed(config.seed, r, k) for k in seed_keys]
        parts.append(part)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["key", *keep])
    out["dataset"] = name
    out["origin"] = "synthetic"
    out["guidance"] = float(config.guidance)
    out["sampler"] = config.sampler
    out["steps"] = int(config.steps)
    out["generator_id"] = gen_id
    return out


#: The columns of a conditioning row that a replica set's version hashes (:func:`conditions_digest`).
CONDITION_COLUMNS: tuple[str, ...] = ("key", "split", "sex", "age", "race", "view", *labels.FINDING_COLUMNS)


def conditions_digest(conditions: pd.DataFrame) -> str:
    """sha256 of the conditioning rows, in order: key, split, demographics and findings."""
    rows = [{k: r[k] for k in CONDITION_COLUMNS} for r in shards.sample_records(conditions, extra=("split",))]
    return hashlib.sha256(shards.json_bytes({"rows": rows})).hexdigest()


def unit_inputs(rows: list[dict], params: dict) -> str:
    """Digest of what one unit (shard) is made from: its planned rows (:func:`cxrsynth.shards.sample_records`:
    keys, source keys, conditioning values, seeds, replicas, version) and the version's parameters."""
    return hashlib.sha256(shards.json_bytes({"params": params, "rows": rows})).hexdigest()


def condition_rows(root: str | Path, conditions: str, split: str | None) -> pd.DataFrame:
    """The rows a synthetic replica is conditioned on: ``split`` (one name, or several
    separated by commas, e.g. ``train,tune``), no uncertain finding, by key.

    :func:`cxrsynth.loader.select` with ``images=False``: a replica needs only the rows'
    labels and demographics, so a labels-only manifest is a valid source of conditions.
    """
    from cxrsynth import loader

    return loader.select(root, conditions, split, images=False).sort_values("key", kind="stable")


def _parse_part(part: str | None) -> tuple[int, int]:
    if part is None:
        return 0, 1
    try:
        i, n = (int(x) for x in part.split("/"))
    except ValueError:
        raise CxrsynthError(f"--part expects i/N (e.g. 0/4), got {part!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise CxrsynthError(f"--part {part}: need 0 <= i < N")
    return i, n


@dataclass
class Job:
    """A replica set planned and ready to sample (:func:`prepare`): what :func:`run` needs.

    Attributes:
        root: Project root.
        name: Synthetic dataset name.
        version: Its version (hash of :attr:`params`).
        generator_dir: The generator folder, as given (recorded in the metadata).
        config: Sampling parameters.
        params: What the version hashes and records (conditions, generator, config, numerics).
        rows: The planned manifest rows (without shards).
        units: ``(start, stop)`` row ranges, one per shard.
        inputs: Each unit's :func:`unit_inputs` (recorded in its receipt; a unit is reused
            only when they are unchanged).
        todo: This process's unfinished units, ``(unit, start, stop)``.
        rank: This process's part (job-array part or torchrun rank).
        world: Number of parts.
        model: The loaded generator.
        device: Where it runs.
    """

    root: Path
    name: str
    version: str
    generator_dir: str | Path
    config: GenerateConfig
    params: dict
    rows: pd.DataFrame
    units: list[tuple[int, int]]
    inputs: list[str]
    todo: list[tuple[int, int, int]]
    rank: int
    world: int
    model: Any = field(repr=False)
    device: Any
    force: bool = False
    store: str | None = None  # publish the shards to this fsspec URL (cxrsynth.store)

    @property
    def directory(self) -> Path:
        return shards.shard_dir(self.root, self.name, self.version)

    @property
    def folder(self) -> str | None:
        """The version's folder on the store (None: local disk)."""
        return None if self.store is None else join(self.store, shards.SHARD_ROOT.as_posix(), self.name, self.version)

    @property
    def images_todo(self) -> int:
        """Images this process will sample."""
        return sum(stop - start for _, start, stop in self.todo)


def prepare(
    *,
    root: str | Path,
    generator_dir: str | Path,
    conditions: str,
    split: str | None,
    name: str,
    config: GenerateConfig,
    part: str | None = None,
    device: str | None = None,
    force: bool = False,
    store: str | None = None,
) -> Job:
    """Plan a replica set (arguments as :func:`generate`) and load its generator; nothing is sampled yet.

    Raises:
        CxrsynthError: a bad name, part, sampler, guidance formula, device, conditions
            dataset or generator folder; ``name`` may not be written
            (:func:`cxrsynth.publish.check_target`: one of its sources, another kind).
    """
    manifest.check_name(name)
    config.check_names()
    store = check_url(store) if store else None
    check_target(root, name, "synthetic", (conditions,), force)
    root = Path(root)
    index, count = _parse_part(part) if part is not None else (0, 1)
    frame = condition_rows(root, conditions, split)
    gen_id = generator_id(generator_dir)
    rows = plan(frame, name, config, gen_id)
    cond_version = manifest.read_meta(root, conditions).get("version")
    dev = runtime.device(device)
    params = {"conditions": conditions, "conditions_version": cond_version, "conditions_sha256": conditions_digest(frame),
              "split": split, "generator_id": gen_id, **config.recorded(), "numerics": runtime.numerics(dev)}
    version = hashlib.sha256(shards.json_bytes(params)).hexdigest()[:10]
    rows["version"] = version
    directory = shards.shard_dir(root, name, version)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # data/ is a file, a read-only folder...
        raise CxrsynthError(f"cannot create {directory}: {exc.strerror}") from None

    ranks = runtime.distributed(join=False)
    if ranks.world > 1 and part is None:
        index, count = ranks.rank, ranks.world
    from cxrsynth.diffusion.model import load_generator

    model = load_generator(Path(generator_dir), device=str(dev))
    units = [(s, min(s + config.shard_size, len(rows))) for s in range(0, len(rows), config.shard_size)]
    records = shards.sample_records(rows)
    inputs = [unit_inputs(records[start:stop], params) for start, stop in units]
    job = Job(root=root, name=name, version=version, generator_dir=generator_dir, config=config, params=params,
               rows=rows, units=units, inputs=inputs, rank=index, world=count, model=model, device=dev,
               force=force, store=store, todo=[])
    if store is None or not _published(job):  # on its store already: its local shards are gone, nothing to redo
        job.todo = [(u, start, stop) for u, (start, stop) in enumerate(units)
                    if u % count == index and _finished(job, u) is None]
    return job


def run(job: Job, progress: Callable[[int], None] | None = None) -> dict:
    """Sample and write a prepared job's units; publish the version when every unit is done.

    Holds the dataset's writer lock *shared* (:func:`cxrsynth.publish.writer_lock`): the
    parts and ranks of a job run together, any other writer of the dataset is refused.

    Returns:
        A summary: version, images planned, units done by this call, and whether the
        dataset is complete (index and manifest written).
    """
    with writer_lock(job.root, job.name, shared=True):
        return _run(job, progress)


def _run(job: Job, progress: Callable[[int], None] | None) -> dict:
    import torch

    from cxrsynth.diffusion.sample import fast_paths, sample

    config, model, dev, rows, directory, name = job.config, job.model, job.device, job.rows, job.directory, job.name
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # bf16 autocast on GPU only
    forward = fast_paths(model, compile=config.compile, deterministic=True)
    cond_all = torch.from_numpy(labels.conditioning_vectors(rows))
    seeds = rows["seed"].astype("int64").tolist()
    # One shard is PNG-encoded and written by a background thread while the next one is
    # sampled (the GPU waits on nothing; ~3 ms per 256 px image is ~10% of the time at 30
    # images/s). At most one shard is in flight; its error surfaces at the next wait.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrsynth-shard-writer") as writer:
        pending: Future | None = None
        for u, start, stop in job.todo:
            images = sample(
                model, cond_all[start:stop], seeds[start:stop], sampler=config.sampler, steps=config.steps,
                guidance=config.guidance, eta=config.eta, cfg_formula=config.cfg_formula,
                batch_size=config.batch_size, dtype=dtype, forward=forward,
            )  # (n, 1, H, W) uint8
            _wait(pending, progress)
            pending = writer.submit(_write_unit, directory, name, u, rows.iloc[start:stop], images, job.inputs[u],
                                    job.folder)
        _wait(pending, progress)

    with _exclusive(directory / shards.PROGRESS_DIR / "finalize.lock"):
        results = [_finished(job, u) for u in range(len(job.units))]
        complete = all(r is not None for r in results)
        if complete:  # idempotent: a second finisher rewrites the same bytes, after the first
            made_by = {"generator": str(job.generator_dir), **job.params}
            publish(job.root, Metadata(name, job.version, "synthetic", made_by), rows, shard_results=results,
                    force=job.force, store=job.store)
        elif job.store is not None:  # a first finisher put the shards on the store (their local files are gone)
            complete = _published(job)
    return {"name": name, "version": job.version, "images": len(rows), "units": len(job.units), "written": len(job.todo),
            "complete": complete, "rank": job.rank, "world": job.world}


def generate(
    *,
    root: str | Path,
    generator_dir: str | Path,
    conditions: str,
    split: str | None,
    name: str,
    config: GenerateConfig,
    part: str | None = None,
    device: str | None = None,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
    store: str | None = None,
) -> dict:
    """Write ``config.replicas`` synthetic replicas of ``conditions`` (one split) as dataset ``name``.

    :func:`prepare` then :func:`run`.

    Args:
        root: Project root.
        generator_dir: A saved generator (``cxrsynth generator train`` / ``import-mediffusion``).
        conditions: Dataset whose rows give the conditions (a manifest, labels-only is fine).
        split: Split of ``conditions`` to replicate (the paper: train); None = all rows.
            Rows with uncertain findings are skipped (a generator never saw them).
        name: Name of the synthetic dataset.
        config: Sampling parameters.
        part: ``"i/N"``: only units i::N (job arrays). Under torchrun, the rank/world.
        device: Torch device (:func:`cxrsynth.runtime.device`); default cuda when available.
        progress: Optional callable ``progress(images)``.
        force: Write over an existing dataset of another kind (never over the conditions).
        store: Publish the shards to this fsspec URL (:func:`cxrsynth.publish.publish`);
            every part of a job must name the same one. None: the local disk.

    Returns:
        A summary: version, images planned, units done by this call, and whether the
        dataset is complete (index and manifest written).
    """
    job = prepare(root=root, generator_dir=generator_dir, conditions=conditions, split=split, name=name,
                  config=config, part=part, device=device, force=force, store=store)
    return run(job, progress)


def _published(job: Job) -> bool:
    """Whether the job's version is already published to its store (by another part, or an earlier run)."""
    try:
        meta = manifest.read_meta(job.root, job.name)
    except CxrsynthError:
        return False
    return meta.get("version") == job.version and meta.get("store") == job.store


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive advisory lock on ``lock`` (created if missing) for the block."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_unit(directory: Path, name: str, unit: int, rows: pd.DataFrame, images, inputs: str,
                folder: str | None = None) -> int:
    """Encode and write one generated shard, its receipt recording ``inputs``; returns its image count.

    With a store ``folder``, the shard and its receipt go there at once (:func:`cxrsynth.store.put_unit`)
    and the local shard file is removed: a part on a node with no shared disk leaves its work on
    the store, where a rerun (any part, or the step that assembles the version) finds it."""
    result = shards.write_shard(directory, name, unit, _samples(rows, images), inputs)
    if folder is not None:
        put_unit(directory, folder, result.name)
        (directory / result.name).unlink(missing_ok=True)
    return len(rows)


def _finished(job: Job, unit: int) -> shards.ShardResult | None:
    """Unit ``unit``'s result when it is done: its shard here with its receipt, or (with a store) both on the store."""
    done = shards.finished(job.directory, job.name, unit, inputs=job.inputs[unit])
    if done is None and job.folder is not None:
        done = stored_unit(job.folder, shards.shard_name(job.name, unit), inputs=job.inputs[unit])
    return done


def _wait(pending: Future | None, progress: Callable[[int], None] | None) -> None:
    """Wait for the shard in flight (re-raising its error) and report it."""
    if pending is not None:
        n = pending.result()
        if progress:
            progress(n)


def _samples(rows: pd.DataFrame, images) -> list[dict]:
    return [shards.encode_sample(record, image[0]) for record, image in zip(shards.sample_records(rows), images.numpy())]
