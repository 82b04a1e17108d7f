"""Shared CLI pieces: the --root option, the console, the one error handler, progress bars.

:class:`CleanErrors` is the command class of the app and every command group: a
:class:`cxrsynth.errors.CxrsynthError` raised anywhere below a command becomes one line
``error: ...`` on stderr and the error's exit code (2 for bad input, 1 for a failed
check), so commands never catch errors themselves. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from cxrsynth.errors import CxrsynthError

console = Console(stderr=False)
err_console = Console(stderr=True)

Root = Annotated[Path, typer.Option("--root", help="Project root holding manifests/ and data/.")]
#: ``--store URL`` of every writer (default: the project setting CXRSYNTH_STORE).
Store = Annotated[Optional[str], typer.Option(
    "--store", envvar="CXRSYNTH_STORE", show_envvar=True,
    help="Publish the shards to this fsspec URL (s3://bucket/prefix, gs://..., file:///...); credentials come from the "
         "environment or the store's config files, never the URL. Default: the local disk.")]


def threads_option(help: str = "CPU threads (torch.set_num_threads); default: torch's. On a shared 2-core machine "
                               "1 is several times faster than 2.") -> Any:
    """The ``--threads`` option (the one declaration); ``help`` where a command's threads mean more or other."""
    return Annotated[Optional[int], typer.Option("--threads", min=1, help=help)]


#: ``--device`` and ``--threads`` of every command that runs torch (``threads_option`` for another help).
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu).")]
Threads = threads_option()
#: ``--threads`` of the bootstrap (``evaluate``, ``compare``, ``bench evaluate``): a thread pool, not torch's.
BootstrapThreads = threads_option("Bootstrap threads (default: the CPUs available).")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a short error naming what is wrong and exit non-zero."""
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _usage_errors() -> tuple[type, tuple]:
    """``(UsageError, NoArgsIsHelpError)`` of the click that typer runs on: recent typer
    vendors click as ``typer._click`` (no public name), older typer uses click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer < 0.25
        from click import exceptions
    return exceptions.UsageError, getattr(exceptions, "NoArgsIsHelpError", ())


def _usage_error(exc) -> NoReturn:
    """A value or option typer refused while parsing, as one ``error:`` line (exit 2), naming the help."""
    path = exc.ctx.command_path if exc.ctx is not None else "cxrsynth"
    fail(f"{exc.format_message()} (see: {path} --help)", exc.exit_code)


#: What the machine refuses (permissions, a read-only or full disk, a size limit, a path that is a file where a
#: folder is needed or the reverse), not a defect: one line naming the file and what to do. Any other OSError is
#: a defect and keeps its traceback.
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                       errno.ENOTDIR, errno.EISDIR}


def environment_error(exc: OSError) -> str:
    """The one line a user sees when the machine refuses a read or write."""
    where = f" {exc.filename}" if exc.filename else ""
    hint = {errno.ENOSPC: "free some space and rerun (finished work is kept; resumable jobs resume)",
            errno.EDQUOT: "the disk quota is reached: free some space and rerun",
            errno.EFBIG: "a file size limit was reached (ulimit -f): raise it and rerun",
            errno.EROFS: "the file system is read-only: choose a writable --root or --out",
            errno.ENOTDIR: "a file stands where a folder is needed: choose another --out (or move the file)",
            errno.EISDIR: "a folder stands where a file is needed: give --out a file name",
            }.get(exc.errno, "check the permissions of that path, or choose another --root or --out")
    return f"cannot access{where}: {exc.strerror or exc}; {hint}"


class CleanErrors(TyperGroup):
    """A typer group whose commands' :class:`CxrsynthError`, and any usage error typer finds
    while parsing (a value out of range, an unknown option), print as one clean line.
    ``--help`` and a command given without its arguments still print the help."""

    def make_context(self, info_name, args, parent=None, **extra):
        usage, help_only = _usage_errors()
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except usage as exc:
            if isinstance(exc, help_only):
                raise
            _usage_error(exc)

    def invoke(self, ctx):
        usage, help_only = _usage_errors()

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
            except OSError as exc:
                if exc.errno not in _ENVIRONMENT_ERRNOS:
                    raise
                fail(environment_error(exc), 1)
            except usage as exc:
                if isinstance(exc, help_only):
                    raise
                _usage_error(exc)


#: How much a command prints besides errors and its result: 0 ``--quiet`` (no progress),
#: 1 the default, 2 ``--verbose`` (per-step detail where a command has it). Set once by the
#: root command's callback; :func:`progress_bar`, :func:`info` and the training bars read it.
VERBOSITY = {"level": 1}


def set_verbosity(quiet: bool, verbose: bool) -> None:
    """The root command's ``--quiet`` / ``--verbose`` (both: an error)."""
    if quiet and verbose:
        fail("--quiet and --verbose exclude each other")
    VERBOSITY["level"] = 0 if quiet else 2 if verbose else 1


def quiet() -> bool:
    return VERBOSITY["level"] <= 0


def verbose() -> bool:
    return VERBOSITY["level"] >= 2


def info(message: str, *, detail: bool = False) -> None:
    """A progress note on stderr: hidden by ``--quiet``; ``detail`` notes only with ``--verbose``."""
    if quiet() or (detail and not verbose()):
        return
    err_console.print(message, soft_wrap=True, highlight=False)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None):
    """Progress of a loop; yields ``advance(n)``. A rich bar on a terminal; periodic plain lines
    with rate and ETA (:class:`cxrsynth.progress.Ticker`) when stderr is a file or pipe; nothing
    with ``--quiet``."""
    if quiet():
        yield lambda n=1: None
        return
    from cxrsynth.progress import Ticker, stderr_is_terminal

    if not stderr_is_terminal():
        ticker = Ticker(description, total)
        yield ticker.advance
        ticker.close()
        return
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
