"""Shared CLI pieces: the --root option, the console, the one error handler, progress bars.

:class:`CleanErrors` is the command class of the app and every command group: a
:class:`cxrsynth.errors.CxrsynthError` raised anywhere below a command becomes one line
``error: ...`` on stderr and the error's exit code (2 for bad input, 1 for a failed
check), so commands never catch errors themselves. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from typer.core import TyperGroup

from cxrsynth.errors import CxrsynthError

console = Console(stderr=False)
err_console = Console(stderr=True)

Root = Annotated[Path, typer.Option("--root", help="Project root holding manifests/ and data/.")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a short error naming what is wrong and exit non-zero."""
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


class CleanErrors(TyperGroup):
    """A typer group whose commands' :class:`CxrsynthError` prints as one clean line."""

    def invoke(self, ctx):
        import warnings

        from cxrsynth.errors import CxrsynthWarning

        def show(message, category, *args, **kwargs):
            if not issubclass(category, CxrsynthWarning):
                return others(message, category, *args, **kwargs)
            from rich.markup import escape

            err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True, highlight=False)

        with warnings.catch_warnings():  # the library's warnings as one line each, every time
            warnings.simplefilter("always", CxrsynthWarning)
            others, warnings.showwarning = warnings.showwarning, show
            try:
                return super().invoke(ctx)
            except CxrsynthError as exc:
                fail(str(exc), exc.exit_code)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None):
    """A rich progress bar; yields ``advance(n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads for this process (the command owns the process)."""
    if threads is not None:
        if threads < 1:
            fail("--threads must be >= 1")
        import torch

        torch.set_num_threads(threads)
