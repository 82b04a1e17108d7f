"""`cxrsynth phantom`: a thin layer over cxrsynth.phantom.

Heavy imports (numpy, pandas, torch) happen inside the command so `--help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cxrsynth.cli.common import Root, console, progress_bar


def phantom(
    site: str = typer.Argument(..., help="Site to simulate: {sites}."),
    n: int = typer.Option(..., "--n", min=1, help="Number of images."),
    out: Path = typer.Option(..., "--out", help="Output directory (relative to --root)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed; the same seed writes byte-identical files."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Also write a contact-sheet PNG here."),
    root: Root = Path("."),
) -> None:
    """Write N phantom chest X-rays of SITE in that site's native on-disk format."""
    from cxrsynth.errors import CxrsynthError
    from cxrsynth.phantom import get_site, write_site

    get_site(site)  # an unknown site fails here, naming the known ones
    target = out if out.is_absolute() else root / out
    if target.exists() and not target.is_dir():
        raise CxrsynthError(f"--out {target} is a file, not a folder")
    sheet_path = None if sheet is None else (sheet if sheet.is_absolute() else root / sheet)
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
