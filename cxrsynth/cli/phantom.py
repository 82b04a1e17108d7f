"""`cxrsynth phantom` and `cxrsynth bench phantom`: thin layers over cxrsynth.phantom.

Heavy imports (numpy, pandas, torch) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def phantom(
    site: str = typer.Argument(..., help="Site to simulate: cxp | mimic | emory."),
    n: int = typer.Option(..., "--n", min=1, help="Number of images."),
    out: Path = typer.Option(..., "--out", help="Output directory (relative to --root)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed writes byte-identical files."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Also write a contact-sheet PNG here."),
    root: Path = typer.Option(Path("."), "--root", help="Project root."),
) -> None:
    """Write N phantom chest X-rays of SITE in that site's native on-disk format."""
    from rich.console import Console

    from cxrsynth.phantom import SITES, write_site

    console = Console()
    if site not in SITES:
        raise typer.BadParameter(f"unknown site {site!r}; choose one of: {', '.join(SITES)}", param_hint="SITE")
    target = out if out.is_absolute() else root / out
    sheet_path = None if sheet is None else (sheet if sheet.is_absolute() else root / sheet)
    from cxrsynth.cli.common import progress_bar

    with progress_bar(f"phantom {site}", total=n) as advance:
        summary = write_site(site, n, target, seed=seed, sheet=sheet_path, progress=advance)
    console.print(
        f"[bold]{summary['site']}[/] phantom: {summary['images']} images, {summary['patients']} patients, "
        f"{summary['studies']} studies (seed {summary['seed']}) -> {summary['out']}"
    )
    for table in summary["tables"]:
        console.print(f"  table  {table}")
    if "sheet" in summary:
        console.print(f"  sheet  {summary['sheet']}")


def bench_phantom(
    train: int = typer.Option(2000, "--train", min=10, help="Training images (cxp)."),
    test: int = typer.Option(500, "--test", min=10, help="Held-out cxp images."),
    external: int = typer.Option(500, "--external", min=10, help="Emory images (external site)."),
    size: int = typer.Option(96, "--size", min=32, help="Preprocessed image side."),
    epochs: int = typer.Option(12, "--epochs", min=1, help="Training epochs."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Stop training after this many minutes."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads (default: all cores)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON here."),
) -> None:
    """Train a small CNN on cxp phantoms (CPU); report AUROC on held-out cxp and on emory."""
    import json

    from rich.console import Console
    from rich.table import Table

    from cxrsynth.phantom.bench import BenchConfig, run_bench

    console = Console()
    cfg = BenchConfig(
        train=train, test=test, external=external, size=size, epochs=epochs, minutes=minutes, seed=seed, threads=threads
    )
    result = run_bench(cfg, log=console.print)
    table = Table(title=f"Phantom benchmark: CNN trained on {train} cxp phantoms ({result['epochs']} epochs)")
    table.add_column("Finding")
    table.add_column("cxp held-out", justify="right")
    table.add_column("emory", justify="right")
    for name in result["cxp"]:
        table.add_row(name, f"{result['cxp'][name]:.3f}", f"{result['emory'][name]:.3f}")
    table.add_row("[bold]macro[/]", f"[bold]{result['macro_cxp']:.3f}[/]", f"[bold]{result['macro_emory']:.3f}[/]")
    console.print(table)
    console.print(
        f"render {result['render_images_per_second_per_core']:.1f} images/s per core (320x390); "
        f"data {result['data_seconds']:.0f} s; training {result['train_seconds']:.0f} s; "
        f"bar (0.70 <= cxp <= 0.95, emory < cxp, >= 50 img/s): {'PASS' if result['passed'] else 'FAIL'}"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
