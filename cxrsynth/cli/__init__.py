"""The ``cxrsynth`` command line: a thin typer layer over the library.

Each command parses, calls one library function and prints. Heavy imports (pandas,
torch, duckdb) happen inside the command bodies, so ``--help`` is instant. Errors are
printed once, by :class:`~cxrsynth.cli.common.CleanErrors`, the app's group class.
"""

from __future__ import annotations

import typer

from cxrsynth.cli import bench as _bench
from cxrsynth.cli import data as _data
from cxrsynth.cli import evaluate as _evaluate
from cxrsynth.cli.classifier import classifier_app
from cxrsynth.cli.common import CleanErrors, set_verbosity
from cxrsynth.cli.generate import generate
from cxrsynth.cli.generator import generator_app
from cxrsynth.cli.options import LazyHelp
from cxrsynth.cli.phantom import phantom
from cxrsynth.cli.share import share_app
from cxrsynth.cli.study import study_app

app = typer.Typer(
    cls=CleanErrors,
    no_args_is_help=True,
    add_completion=False,
    help="Versioned real and synthetic chest X-ray datasets (WebDataset shards + parquet manifests) "
    "and the experiments of Khosravi et al., 'Synthetically enhanced'.",
)


def _print_version(value: bool) -> None:
    if value:
        from cxrsynth import __version__

        typer.echo(f"cxrsynth {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the cxrsynth version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and results (no progress)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print per-step detail where a command has it."),
) -> None:
    """Versioned real and synthetic chest X-ray datasets and the experiments of 'Synthetically enhanced'.

    Progress goes to stderr: a bar on a terminal, plain lines (every CXRSYNTH_LOG_EVERY seconds, default 10)
    when stderr is a file or pipe."""
    set_verbosity(quiet, verbose)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures (not tests).")

# data
app.command("phantom", cls=LazyHelp)(phantom)
app.add_typer(_data.ingest_app, name="ingest")
app.command("stats")(_data.stats)
app.command("split", cls=LazyHelp)(_data.split)
app.command("query")(_data.query)
app.command("verify")(_data.verify)
app.command("push")(_data.push)
app.command("sheet")(_data.sheet)
app.command("mix")(_data.mix)
# generator
app.add_typer(generator_app, name="generator")
app.command("generate", cls=LazyHelp)(generate)
# classifier and evaluation
app.add_typer(classifier_app, name="classifier")
app.command("evaluate", cls=LazyHelp)(_evaluate.evaluate)
app.command("compare", cls=LazyHelp)(_evaluate.compare)
app.command("cooccurrence")(_evaluate.cooccurrence)
# the study
app.add_typer(study_app, name="study")
# sharing
app.add_typer(share_app, name="share")
# benchmarks
app.add_typer(bench_app, name="bench")
bench_app.command("ingest")(_bench.bench_ingest)
bench_app.command("load")(_bench.bench_load)
bench_app.command("phantom")(_bench.bench_phantom)
bench_app.command("generate", cls=LazyHelp)(_bench.bench_generate)
bench_app.command("roofline", cls=LazyHelp)(_bench.bench_roofline)
bench_app.command("train", cls=LazyHelp)(_bench.bench_train)
bench_app.command("solvers")(_bench.bench_solvers)
bench_app.command("classifier", cls=LazyHelp)(_bench.bench_classifier)
bench_app.command("evaluate", cls=LazyHelp)(_bench.bench_evaluate)
bench_app.command("audit")(_bench.bench_audit)
bench_app.command("scale")(_bench.bench_scale)
