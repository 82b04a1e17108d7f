"""Data commands: ``ingest chexpert|mimic|table``, ``stats``, ``split``, ``query``, ``verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrsynth.cli.common import Root, console, fail, progress_bar

ingest_app = typer.Typer(no_args_is_help=True, help="Ingest a real dataset in its native format into shards + a manifest.")

Name = Annotated[str, typer.Option("--name", help="Dataset name (letters, digits, underscores).")]
Images = Annotated[Optional[Path], typer.Option("--images", help="Image root folder (default: beside the table).")]
LabelsOnly = Annotated[bool, typer.Option("--labels-only", help="Write the manifest only (no images read, no shards).")]
Size = Annotated[int, typer.Option("--size", help="Preprocessed image side (pad to square, resize).")]
Equalize = Annotated[bool, typer.Option("--equalize/--no-equalize", help="256-bin histogram equalization.")]
ShardSize = Annotated[int, typer.Option("--shard-size", help="Input rows per shard.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Processes for image work (default: all cores).")]
Version = Annotated[Optional[str], typer.Option("--version", help="Version name (default: a content hash).")]


def _run_ingest(read, *, kind: str, inputs: dict, root: Path, name: str, labels_only: bool, size: int, equalize: bool, shard_size: int, workers: int | None, version: str | None) -> None:
    from cxrsynth import ingest as ingest_lib
    from cxrsynth.imaging import Preprocess
    from cxrsynth import manifest as manifest_lib
    from cxrsynth.manifest import ManifestError
    from cxrsynth.sources import SourceError

    try:
        manifest_lib.check_name(name)
        source = read()
        with progress_bar("ingest " + name, total=len(source.records)) as advance:
            result = ingest_lib.ingest(
                source, root=root, name=name, kind=kind, inputs=inputs, labels_only=labels_only,
                params=Preprocess(size=size, equalize=equalize), shard_size=shard_size,
                workers=workers, version=version, progress=advance,
            )
    except (SourceError, ManifestError) as exc:
        fail(str(exc))
    _print_ingest(result)


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
    table.add_row("manifest", str(result.manifest))
    if sum(result.rejected.values()):
        table.add_row("rejects", str(result.rejects))
    console.print(table)


@ingest_app.command("chexpert")
def ingest_chexpert(
    csv: Annotated[Path, typer.Argument(help="CheXpert train.csv or valid.csv.")],
    name: Name,
    images: Images = None,
    demographics: Annotated[Optional[Path], typer.Option("--demographics", help="CheXpert demographics (PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE).")] = None,
    include: Annotated[Optional[Path], typer.Option("--include", help="CSV with a Path column restricting the rows (a published split).")] = None,
    labels_only: LabelsOnly = False,
    size: Size = 256,
    equalize: Equalize = True,
    shard_size: ShardSize = 1000,
    workers: Workers = None,
    version: Version = None,
    root: Root = Path("."),
) -> None:
    """Ingest CheXpert (train.csv / valid.csv + images)."""
    from cxrsynth.sources import chexpert

    inputs = {"csv": str(csv), "images": images and str(images), "demographics": demographics and str(demographics), "include": include and str(include)}
    _run_ingest(lambda: chexpert.read(csv, images, demographics, include), kind="chexpert", inputs=inputs, root=root, name=name,
                labels_only=labels_only, size=size, equalize=equalize, shard_size=shard_size, workers=workers, version=version)


@ingest_app.command("mimic")
def ingest_mimic(
    metadata: Annotated[Path, typer.Option("--metadata", help="mimic-cxr-2.0.0-metadata.csv(.gz).")],
    labels: Annotated[Path, typer.Option("--labels", help="mimic-cxr-2.0.0-chexpert.csv(.gz).")],
    name: Name,
    split_file: Annotated[Optional[Path], typer.Option("--split", help="mimic-cxr-2.0.0-split.csv(.gz).")] = None,
    patients: Annotated[Optional[Path], typer.Option("--patients", help="MIMIC-IV patients.csv(.gz) (gender, anchor_age).")] = None,
    admissions: Annotated[Optional[Path], typer.Option("--admissions", help="MIMIC-IV admissions.csv(.gz) (race).")] = None,
    images: Images = None,
    labels_only: LabelsOnly = False,
    size: Size = 256,
    equalize: Equalize = True,
    shard_size: ShardSize = 1000,
    workers: Workers = None,
    version: Version = None,
    root: Root = Path("."),
) -> None:
    """Ingest MIMIC-CXR-JPG 2.0 (metadata + CheXpert labels [+ split, patients, admissions] + images)."""
    from cxrsynth.sources import mimic

    inputs = {"metadata": str(metadata), "labels": str(labels), "split": split_file and str(split_file), "patients": patients and str(patients), "admissions": admissions and str(admissions), "images": images and str(images)}
    _run_ingest(lambda: mimic.read(metadata, labels, split_file, patients, images, admissions), kind="mimic", inputs=inputs, root=root, name=name,
                labels_only=labels_only, size=size, equalize=equalize, shard_size=shard_size, workers=workers, version=version)


@ingest_app.command("table")
def ingest_table(
    file: Annotated[Path, typer.Argument(help="CSV or parquet table, one row per image.")],
    name: Name,
    map_: Annotated[list[str], typer.Option("--map", help="COLUMN=FIELD; fields: path, key, patient_id, study_id, sex, age, race, view, split, or a finding.")] = [],
    images: Images = None,
    labels_only: LabelsOnly = False,
    size: Size = 256,
    equalize: Equalize = True,
    shard_size: ShardSize = 1000,
    workers: Workers = None,
    version: Version = None,
    root: Root = Path("."),
) -> None:
    """Ingest a generic (in-house) table with PNG, JPEG or DICOM images."""
    from cxrsynth.sources import table

    inputs = {"table": str(file), "map": list(map_), "images": images and str(images)}
    _run_ingest(lambda: table.read(file, map_, images), kind="table", inputs=inputs, root=root, name=name,
                labels_only=labels_only, size=size, equalize=equalize, shard_size=shard_size, workers=workers, version=version)


def stats(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Only this split (train, tune, test).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    root: Root = Path("."),
) -> None:
    """Table-1-style cohort summary: images, patients, female patients, age IQR, findings."""
    import json

    from rich.table import Table

    from cxrsynth import labels, manifest
    from cxrsynth.stats import dataset_stats

    try:
        result = dataset_stats(root, name, split)
    except manifest.ManifestError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result))
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
    for finding in labels.FINDINGS:
        c = result["labels"][finding]
        text = f"pos: {c['pos']:,} ({100 * c['pos'] / n:.2f}%)"
        if c["unc"]:
            text += f"  unc: {c['unc']:,} ({100 * c['unc'] / n:.2f}%)"
        table.add_row(finding, text)
    console.print(table)


def split(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the patient order.")],
    tune: Annotated[float, typer.Option("--tune", help="Fraction of patients for tuning.")] = 0.1,
    test: Annotated[float, typer.Option("--test", help="Fraction of patients for testing.")] = 0.0,
    view: Annotated[Optional[str], typer.Option("--view", help="Only images of this view (AP, PA); others get no split.")] = None,
    root: Root = Path("."),
) -> None:
    """Split a dataset at the patient level (deterministic for a seed) into its manifest."""
    from cxrsynth import manifest
    from cxrsynth.splits import SplitParams
    from cxrsynth.splits import split as split_lib

    try:
        counts = split_lib(root, name, SplitParams(tune=tune, test=test, view=view, seed=seed))
    except (ValueError, manifest.ManifestError) as exc:
        fail(str(exc))
    console.print(f"{name}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + " images")


def query(
    sql: Annotated[Optional[str], typer.Argument(help='SQL over the views "<dataset>" and "images".')] = None,
    views: Annotated[bool, typer.Option("--views", help="Print the CREATE VIEW statements (for `duckdb -init`) and exit.")] = False,
    format_: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the result here instead of printing.")] = None,
    root: Root = Path("."),
) -> None:
    """Run SQL (DuckDB) over all manifests: one view per dataset plus the union view `images`."""
    from cxrsynth import manifest

    if views:
        typer.echo(manifest.views_sql(root, relative=True), nl=False)
        return
    if sql is None:
        fail("give a SQL statement (or --views)")
    if format_ not in ("table", "csv", "json"):
        fail(f"--format must be table, csv or json, not {format_!r}")
    try:
        result = manifest.query(root, sql)
    except Exception as exc:  # duckdb errors carry the useful message
        fail(f"query failed: {exc}")
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
        out.write_text(text)
    else:
        typer.echo(text, nl=False)


def verify(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    root: Root = Path("."),
) -> None:
    """Re-hash a dataset's shards against index.json and the manifest; exit 1 on any mismatch."""
    from cxrsynth import manifest
    from cxrsynth.verify import verify_dataset

    try:
        problems, checked = verify_dataset(root, name)
    except manifest.ManifestError as exc:
        fail(str(exc))
    for problem in problems:
        console.print(f"[red]✗[/red] {problem}")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]✓[/green] {name}: {checked} shard(s) match index.json and the manifest")


def mix(
    real: Annotated[str, typer.Option("--real", help="Real dataset (with train/tune/test splits).")],
    name: Annotated[str, typer.Option("--name", help="Name of the mix.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed for a fractional replica's subset.")],
    synthetic: Annotated[str, typer.Option("--synthetic", help="Synthetic share of the training set, e.g. 500% = 5 replicas.")] = "0%",
    synthetic_from: Annotated[Optional[str], typer.Option("--synthetic-from", help="Synthetic dataset (default: the replicas of --real).")] = None,
    only_synthetic: Annotated[bool, typer.Option("--only-synthetic", help="Train on the synthetic rows alone (tune/test stay real).")] = False,
    root: Root = Path("."),
) -> None:
    """Mix real and synthetic training data as a manifest (a query: no shards are copied)."""
    from cxrsynth import manifest
    from cxrsynth.mix import MixError, MixParams, parse_percent
    from cxrsynth.mix import mix as mix_lib

    try:
        params = MixParams(real=real, synthetic=parse_percent(synthetic), synthetic_from=synthetic_from,
                           only_synthetic=only_synthetic, seed=seed)
        counts = mix_lib(root, name, params)
    except (MixError, manifest.ManifestError) as exc:
        fail(str(exc))
    console.print(f"{name}: train {counts['train']:,} ({counts['synthetic']:,} synthetic), "
                  f"tune {counts['tune']:,}, test {counts['test']:,} images")


def sheet(
    name: Annotated[str, typer.Argument(help="Dataset name (with shards).")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")],
    n: Annotated[int, typer.Option("--n", help="Images on the sheet.")] = 24,
    where: Annotated[Optional[str], typer.Option("--where", help="SQL condition, e.g. \"pleural_effusion = 1 AND view = 'PA'\".")] = None,
    root: Root = Path("."),
) -> None:
    """Contact sheet of a dataset's images (real or synthetic), captioned with their findings."""
    from cxrsynth import manifest
    from cxrsynth.sheet import dataset_sheet

    try:
        path = dataset_sheet(root, name, out, n=n, where=where)
    except manifest.ManifestError as exc:
        fail(str(exc))
    except Exception as exc:  # a bad --where is a DuckDB error with a useful message
        fail(f"{name}: {exc}")
    console.print(f"wrote {path}")
