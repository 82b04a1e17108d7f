"""Data commands: ``ingest chexpert|mimic|table``, ``stats``, ``split``, ``query``, ``verify``, ``push``, ``sheet``, ``mix``.

The three ingest commands differ only in what they read: each is an adapter call wrapped
by :func:`ingest_command`, which adds the options every ingest shares
(:data:`INGEST_OPTIONS`) and runs the one ingest. Options that only override a library
default are ``None`` unless given and dropped (:func:`~cxrsynth.cli.options.given`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrsynth.cli.common import Root, Store, console, fail, progress_bar
from cxrsynth.cli.options import LazyHelp, given

ingest_app = typer.Typer(no_args_is_help=True, help="Ingest a real dataset in its native format into shards + a manifest.")

Name = Annotated[str, typer.Option("--name", help="Dataset name (letters, digits, underscores).")]
Images = Annotated[Optional[Path], typer.Option("--images", help="Image root folder (default: beside the table).")]
LabelsOnly = Annotated[Optional[bool], typer.Option("--labels-only", help="Write the manifest only (no images read, no shards).")]
Size = Annotated[Optional[int], typer.Option(
    "--size", min=1, help="Preprocessed image side (pad to square, resize; default {Preprocess.size}).")]
Equalize = Annotated[Optional[bool], typer.Option(
    "--equalize/--no-equalize", help="256-bin histogram equalization (default {Preprocess.equalize}).")]
ShardSize = Annotated[Optional[int], typer.Option("--shard-size", min=1, help="Input rows per shard (default {ingest.shard_size}).")]
Workers = Annotated[Optional[int], typer.Option("--workers", min=1, help="Processes for image work (default: all cores).")]
Version = Annotated[Optional[str], typer.Option("--version", help="Version name (default: a content hash).")]
Rehash = Annotated[Optional[bool], typer.Option(
    "--rehash", help="Re-read every image for the version's content hash instead of trusting the stat cache "
                     "(size, mtime, ctime, inode) of files already hashed.")]
AllowOutside = Annotated[Optional[bool], typer.Option(
    "--allow-outside-root", help="Keep images that resolve outside the images root (../ paths, absolute paths, "
                                 "symbolic links); default: such rows are rejected as outside_root.")]
Force = Annotated[Optional[bool], typer.Option(
    "--force", help="Write over an existing dataset of another kind (a mix, a synthetic set).")]


def _option(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


#: The options of every ``ingest`` command, after the command's own inputs.
INGEST_OPTIONS: tuple[inspect.Parameter, ...] = (
    _option("name", Name),
    _option("images", Images, None),
    _option("labels_only", LabelsOnly, None),
    _option("size", Size, None),
    _option("equalize", Equalize, None),
    _option("shard_size", ShardSize, None),
    _option("workers", Workers, None),
    _option("version", Version, None),
    _option("rehash", Rehash, None),
    _option("allow_outside_root", AllowOutside, None),
    _option("force", Force, None),
    _option("store", Store, None),
    _option("root", Root, Path(".")),
)


def ingest_command(read: Callable[..., tuple[Callable, str, dict]]):
    """An ingest command from an adapter reader: its own inputs + :data:`INGEST_OPTIONS`.

    ``read(**own inputs, images=...)`` returns ``(adapter call, adapter name, inputs to
    record)``; the command checks the name, reads the source, ingests it and prints.
    """
    shared = {p.name for p in INGEST_OPTIONS}
    own = inspect.signature(read, eval_str=True)
    parameters = [p for p in own.parameters.values() if p.name not in shared]

    @functools.wraps(read)
    def command(**kwargs) -> None:
        from cxrsynth import ingest as ingest_lib
        from cxrsynth import manifest
        from cxrsynth.imaging import Preprocess

        options = {name: kwargs.pop(name) for name in shared}
        name, root = options["name"], options["root"]
        manifest.check_name(name)
        ingest_lib.check_version(options["version"])
        adapter, kind, inputs = read(**kwargs, images=options["images"])
        source = adapter()
        params = Preprocess(**given(size=options["size"], equalize=options["equalize"]))
        with progress_bar("ingest " + name, total=len(source.records)) as advance:
            result = ingest_lib.ingest(
                source, root=root, name=name, kind=kind, inputs=inputs, params=params, progress=advance,
                **given(labels_only=options["labels_only"], shard_size=options["shard_size"],
                        workers=options["workers"], version=options["version"], rehash=options["rehash"],
                        allow_outside_root=options["allow_outside_root"], force=options["force"],
                        store=options["store"]),
            )
        _print_ingest(result)

    command.__signature__ = own.replace(parameters=[*parameters, *INGEST_OPTIONS])  # what typer reads
    return command


def _print_ingest(result) -> None:
    from rich.table import Table

    table = Table(title=f"{result.name} @ {result.version}", show_header=False)
    table.add_row("rows in", f"{result.rows_in:,}")
    table.add_row("kept", f"{result.kept:,}")
    for reason, count in result.rejected.items():
        table.add_row(f"rejected: {reason}", f"{count:,}")
    table.add_row("shards", f"{result.shards}" + (f" ({result.resumed_shards} reused)" if result.resumed_shards else ""))
    for key, value in result.info.items():
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    for what, count in result.normalized.items():
        table.add_row(f"normalized: {what}", f"{count:,}")
    table.add_row("manifest", str(result.manifest))
    if sum(result.rejected.values()):
        table.add_row("rejects", str(result.rejects))
    console.print(table)


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)


@ingest_app.command("chexpert", cls=LazyHelp)
@ingest_command
def ingest_chexpert(
    csv: Annotated[Path, typer.Argument(help="CheXpert train.csv or valid.csv.")],
    demographics: Annotated[Optional[Path], typer.Option(
        "--demographics", help="CheXpert demographics (PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE).")] = None,
    include: Annotated[Optional[Path], typer.Option(
        "--include", help="CSV with a Path column restricting the rows (a published split).")] = None,
    *,
    images: Path | None,
):
    """Ingest CheXpert (train.csv / valid.csv + images)."""
    from cxrsynth.sources import chexpert

    inputs = {"csv": str(csv), "images": _path(images), "demographics": _path(demographics), "include": _path(include)}
    return (lambda: chexpert.read(csv, images, demographics, include)), "chexpert", inputs


@ingest_app.command("mimic", cls=LazyHelp)
@ingest_command
def ingest_mimic(
    metadata: Annotated[Path, typer.Option("--metadata", help="mimic-cxr-2.0.0-metadata.csv(.gz).")],
    labels: Annotated[Path, typer.Option("--labels", help="mimic-cxr-2.0.0-chexpert.csv(.gz).")],
    split_file: Annotated[Optional[Path], typer.Option("--split", help="mimic-cxr-2.0.0-split.csv(.gz).")] = None,
    patients: Annotated[Optional[Path], typer.Option(
        "--patients", help="MIMIC-IV patients.csv(.gz) (gender, anchor_age).")] = None,
    admissions: Annotated[Optional[Path], typer.Option("--admissions", help="MIMIC-IV admissions.csv(.gz) (race).")] = None,
    *,
    images: Path | None,
):
    """Ingest MIMIC-CXR-JPG 2.0 (metadata + CheXpert labels [+ split, patients, admissions] + images)."""
    from cxrsynth.sources import mimic

    inputs = {"metadata": str(metadata), "labels": str(labels), "split": _path(split_file), "patients": _path(patients),
              "admissions": _path(admissions), "images": _path(images)}
    return (lambda: mimic.read(metadata, labels, split_file, patients, images, admissions)), "mimic", inputs


@ingest_app.command("table", cls=LazyHelp)
@ingest_command
def ingest_table(
    file: Annotated[Path, typer.Argument(help="CSV or parquet table, one row per image.")],
    map_: Annotated[list[str], typer.Option(
        "--map", help="COLUMN=FIELD; fields: path, key, patient_id, study_id, sex, age, race, view, split, or a finding.")] = [],
    *,
    images: Path | None,
):
    """Ingest a generic (in-house) table with PNG, JPEG or DICOM images."""
    from cxrsynth.sources import table

    inputs = {"table": str(file), "map": list(map_), "images": _path(images)}
    return (lambda: table.read(file, map_, images)), "table", inputs


def stats(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Only this split (train, tune, test).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    root: Root = Path("."),
) -> None:
    """Table-1-style cohort summary: images, patients, female patients, age IQR, findings."""
    import json

    from rich.table import Table

    from cxrsynth import labels
    from cxrsynth.stats import dataset_stats

    result = dataset_stats(root, name, split)
    if as_json:
        from cxrsynth import __version__, manifest

        who = {"dataset": name, "version": manifest.read_meta(root, name).get("version"), "split": split,
               "cxrsynth": __version__}
        typer.echo(json.dumps({**result, **who}))
        return
    n = max(result["images"], 1)
    table = Table(title=f"{name}" + (f" ({split})" if split else ""))
    table.add_column("variable")
    table.add_column("value", justify="right")
    table.add_row("Number of images", f"{result['images']:,}")
    table.add_row("Number of patients", f"{result['patients']:,}")
    iqr = result["age_iqr"]
    table.add_row("Age (IQR, yrs.)", f"{iqr[0]:g}–{iqr[1]:g}" if iqr else "–")
    female_pct = 100 * result["female_patients"] / max(result["patients"], 1)
    table.add_row("Sex (female patients)", f"{result['female_patients']:,} ({female_pct:.2f}%)")
    for finding, column in zip(labels.FINDINGS, labels.FINDING_COLUMNS):
        c = result["labels"][column]
        text = f"pos: {c['pos']:,} ({100 * c['pos'] / n:.2f}%)"
        if c["unc"]:
            text += f"  unc: {c['unc']:,} ({100 * c['unc'] / n:.2f}%)"
        table.add_row(finding, text)
    console.print(table)


def split(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the patient order.")],
    tune: Annotated[Optional[float], typer.Option(
        "--tune", help="Fraction of patients for tuning (default {SplitParams.tune}).")] = None,
    test: Annotated[Optional[float], typer.Option(
        "--test", help="Fraction of patients for testing (default {SplitParams.test}).")] = None,
    view: Annotated[Optional[str], typer.Option("--view", help="Only images of this view (AP, PA); others get no split.")] = None,
    root: Root = Path("."),
) -> None:
    """Split a dataset at the patient level (deterministic for a seed), published as its new version."""
    from cxrsynth import manifest
    from cxrsynth.splits import SplitParams
    from cxrsynth.splits import split as split_lib

    counts = split_lib(root, name, SplitParams(view=view, seed=seed, **given(tune=tune, test=test)))
    version = manifest.read_meta(root, name).get("version")
    console.print(f"{name} @ {version}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + " images")


def query(
    sql: Annotated[Optional[str], typer.Argument(help='SQL over the views "<dataset>" and "images".')] = None,
    views: Annotated[bool, typer.Option(
        "--views", help="Print the CREATE VIEW statements (for `duckdb -init`) and exit; absolute paths.")] = False,
    relative: Annotated[bool, typer.Option(
        "--relative", help="With --views: paths relative to --root (for a DuckDB CLI started there).")] = False,
    format_: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the result here instead of printing.")] = None,
    root: Root = Path("."),
) -> None:
    """Run SQL (DuckDB) over all manifests: one view per dataset plus the union view `images`."""
    from cxrsynth import manifest

    if views:
        typer.echo(manifest.views_sql(root, relative=relative), nl=False)
        return
    if sql is None:
        fail("give a SQL statement (or --views)")
    if format_ not in ("table", "csv", "json"):
        fail(f"--format must be table, csv or json, not {format_!r}")
    if out is not None and (out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents)):
        fail(f"--out {out}: {'it is a folder' if out.is_dir() else 'a parent is a file'}; name a file to write")
    result = manifest.query(root, sql)
    if format_ == "csv":
        text = result.to_csv(index=False)
    elif format_ == "json":
        text = result.to_json(orient="records", lines=True)
    else:
        from rich.table import Table

        table = Table()
        for column in result.columns:
            table.add_column(str(column))
        for row in result.itertuples(index=False):
            table.add_row(*("" if v is None or (isinstance(v, float) and v != v) else str(v) for v in row))
        if out is None:
            console.print(table)
            return
        text = result.to_string(index=False) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    else:
        typer.echo(text, nl=False)


def verify(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    root: Root = Path("."),
) -> None:
    """Check a dataset: its manifest checksum, its shards against index.json, every row against its sample.

    Exit 1 on any mismatch, each one printed (naming the file, or the key and column).
    """
    from rich.markup import escape

    from cxrsynth.errors import CheckFailed
    from cxrsynth.verify import verify_dataset

    problems, checked = verify_dataset(root, name)
    for problem in problems:
        console.print(f"[red]✗[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if problems:
        raise CheckFailed(f"{name}: {len(problems)} problem(s) in {checked} shard(s); the data is not as its manifest and "
                          f"index.json record it")
    console.print(f"[green]✓[/green] {name}: {checked} shard(s) match index.json, every row its sample, the manifest its "
                  f"checksum", highlight=False)


def push(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    store: Annotated[str, typer.Argument(help="fsspec URL (s3://bucket/prefix, gs://..., file:///...).")],
    keep_local: Annotated[bool, typer.Option("--keep-local", help="Keep the local shard files after the upload.")] = False,
    root: Root = Path("."),
) -> None:
    """Put a published dataset's shards on an object store and record the store in its manifest (rows unchanged).

    Credentials come from the environment or the store's config files (AWS_ACCESS_KEY_ID, AWS_PROFILE,
    ~/.aws/, AWS_ENDPOINT_URL_S3 for an S3-compatible server), never from the URL.
    """
    from cxrsynth.publish import move_to_store

    for url in move_to_store(root, name, store, keep_local=keep_local):
        console.print(f"[green]✓[/green] {name}: {url}", highlight=False, soft_wrap=True)


def mix(
    real: Annotated[str, typer.Option("--real", help="Real dataset (with train/tune/test splits).")],
    name: Annotated[str, typer.Option("--name", help="Name of the mix.")],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed for a fractional replica's subset.")],
    synthetic: Annotated[Optional[str], typer.Option(
        "--synthetic", help="Synthetic share of the training set: 500% or 5x = 5 replicas (default: none).")] = None,
    synthetic_from: Annotated[Optional[str], typer.Option(
        "--synthetic-from", help="Synthetic dataset (default: the replicas of --real).")] = None,
    only_synthetic: Annotated[Optional[bool], typer.Option(
        "--only-synthetic", help="Train on the synthetic rows alone (tune/test stay real).")] = None,
    synthetic_tune: Annotated[Optional[bool], typer.Option(
        "--synthetic-tune", help="Tune on the synthetic replica of the tuning split instead of the real one (the paper's "
                                 "CFG study; generate it with --split train,tune).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write over an existing dataset of another kind (never over one of its sources).")] = False,
    root: Root = Path("."),
) -> None:
    """Mix real and synthetic training data as a manifest (a query: no shards are copied)."""
    from cxrsynth.mix import MixParams, parse_percent
    from cxrsynth.mix import mix as mix_lib

    share = None if synthetic is None else parse_percent(synthetic)
    params = MixParams(real=real, seed=seed,
                       **given(synthetic=share, synthetic_from=synthetic_from, only_synthetic=only_synthetic,
                             synthetic_tune=synthetic_tune))
    counts = mix_lib(root, name, params, force=force)
    console.print(f"{name}: train {counts['train']:,} ({counts['synthetic']:,} synthetic), "
                  f"tune {counts['tune']:,}, test {counts['test']:,} images")


def sheet(
    name: Annotated[str, typer.Argument(help="Dataset name (with shards).")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Images on the sheet.")] = 24,
    where: Annotated[Optional[str], typer.Option(
        "--where", help="SQL condition, e.g. \"pleural_effusion = 1 AND view = 'PA'\".")] = None,
    root: Root = Path("."),
) -> None:
    """Contact sheet of a dataset's images (real or synthetic), captioned with their findings."""
    from cxrsynth.sheet import dataset_sheet

    path = dataset_sheet(root, name, out, n=n, where=where)
    console.print(f"wrote {path}")
