"""`cxrsynth phantom`: a thin layer over cxrsynth.phantom.

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
