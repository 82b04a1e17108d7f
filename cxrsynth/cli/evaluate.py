"""Evaluation commands: ``evaluate`` (metrics of predictions), ``compare`` (models on one test set), ``cooccurrence``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrsynth.cli.common import BootstrapThreads, Root, console, err_console


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_p(value) -> str:
    return "-" if value is None else (f"{value:.1e}" if value < 1e-3 else f"{value:.4f}")


def evaluate(
    predictions: Annotated[Path, typer.Argument(help="Predictions parquet (`cxrsynth classifier predict`).")],
    out: Annotated[Path, typer.Option("--out", help="Metrics JSON to write (replicates beside it: *.replicates.npz).")],
    bootstrap: Annotated[Optional[int], typer.Option(
        "--bootstrap", min=0, help="Bootstrap replicates (default {EvaluateConfig.bootstrap}).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Bootstrap seed (default {EvaluateConfig.seed}).")] = None,
    by: Annotated[Optional[str], typer.Option("--by", help="Subgroup columns, comma-separated: view, sex, age_band "
                                                           "(decades), race or any manifest column.")] = None,
    cluster: Annotated[Optional[str], typer.Option(
        "--cluster", help="Resample images, or whole patients ({clusters}; default {EvaluateConfig.cluster}).")] = None,
    allow_leak: Annotated[bool, typer.Option("--allow-leak", help="Evaluate a test set sharing patients with the "
                                                                   "training data anyway, recording the overlap.")] = False,
    threads: BootstrapThreads = None,
    root: Root = Path("."),
) -> None:
    """AUROC per finding and macro, bootstrap SD and 95% CI, subgroups, with the leakage guard."""
    from rich import box
    from rich.table import Table

    from cxrsynth import labels
    from cxrsynth.evaluate import metrics as lib

    given = {"bootstrap": bootstrap, "seed": seed, "cluster": cluster, "allow_leak": allow_leak or None,
             "by": tuple(c.strip() for c in by.split(",") if c.strip()) if by is not None else None}
    config = lib.EvaluateConfig().override(**given)
    result = lib.evaluate(root, predictions, config, threads=threads)
    path, npz = lib.write(result, out)
    m = result.metrics
    table = Table(title=f"{m['test']['name']} {m['test']['split'] or ''}: {m['test']['images']:,} images, "
                        f"bootstrap {config.bootstrap} x {config.cluster}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("finding", "AUROC", "SD", "95% CI", "pos", "neg", "unc"):
        table.add_column(col, justify="left" if col == "finding" else "right", no_wrap=True)
    undefined = []
    for column in labels.FINDING_COLUMNS:
        f = m["findings"][column]
        ci = "-" if f.get("ci95") is None else f"{f['ci95'][0]:.4f}-{f['ci95'][1]:.4f}"
        if f["auroc"] is None:
            undefined.append(f"{column}: {f.get('reason')}")
        table.add_row(column, _fmt(f["auroc"]) if f["auroc"] is not None else "n/a", _fmt(f.get("sd")), ci,
                      f"{f['n_pos']:,}", f"{f['n_neg']:,}", f"{f['n_uncertain']:,}")
    ci = m["macro"].get("ci95")
    table.add_row("[bold]macro[/]", f"[bold]{_fmt(m['macro']['auroc'])}[/]", _fmt(m["macro"].get("sd")),
                  "-" if ci is None else f"{ci[0]:.4f}-{ci[1]:.4f}", "", "", "")
    console.print(table)
    for line in undefined:
        console.print(f"n/a {line}", highlight=False)
    if m["leak"]["overlap"] or m["leak"]["unverifiable"]:
        err_console.print(f"[yellow]leak allowed:[/] {m['leak']['overlap'] or m['leak']['unverifiable']}", highlight=False)
    console.print(f"{lib.summary_line(m)}; wrote {path} and {npz}", highlight=False, soft_wrap=True)


def compare(
    baseline: Annotated[Path, typer.Argument(help="The baseline's metrics JSON.")],
    others: Annotated[list[Path], typer.Argument(help="Metrics JSON(s) of the models to compare with it.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the table as JSON.")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", min=0.0, max=1.0, help="Significance level "
                                                                                     "(default {CompareConfig.alpha}).")] = None,
    bootstrap: Annotated[Optional[int], typer.Option("--bootstrap", min=1, help="Paired replicates (default: the "
                                                                                "baseline's).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Paired bootstrap seed (default: the baseline's).")] = None,
    threads: BootstrapThreads = None,
    root: Root = Path("."),
) -> None:
    """Per finding and macro: deltas, the paper's t-test and a paired bootstrap, Bonferroni-corrected."""
    from rich import box
    from rich.table import Table

    from cxrsynth.evaluate import compare as lib

    given = {"alpha": alpha, "bootstrap": bootstrap, "seed": seed}
    result = lib.compare(root, baseline, list(others), lib.CompareConfig().override(**given),
                         threads=threads)
    for comparison in result["comparisons"]:
        table = Table(title=f"{Path(comparison['other']).name} vs {Path(result['baseline']).name} "
                            f"({result['test']['name']}; Bonferroni over "
                            f"{result['family']['size']}, alpha {result['alpha']})", box=box.SIMPLE_HEAD,
                      pad_edge=False, collapse_padding=True)
        table.add_column("finding", no_wrap=True, max_width=24)
        for col in ("base", "other", "delta", "p(t)", "sig", "p(pair)", "sig "):
            table.add_column(col, justify="right", no_wrap=True)
        for r in comparison["rows"]:
            style = "bold" if r["finding"] == "macro" else ""
            table.add_row(r["finding"], _fmt(r["baseline"]), _fmt(r["other"]), f"{r['delta']:+.4f}",
                          _fmt_p(r["p_ttest"]), "yes" if r["significant_ttest"] else "no",
                          _fmt_p(r["p_paired"]), "[green]yes[/]" if r["significant_paired"] else "no", style=style)
        console.print(table)
    console.print("p(t): the paper's t-test on the bootstrap replicates; p(pair): paired bootstrap; sig: significant "
                  "after Bonferroni; delta 95% CIs in --out", highlight=False)
    for warning in result["warnings"]:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if out is not None:
        console.print(f"wrote {lib.write(result, out)}", highlight=False)


def cooccurrence(
    names: Annotated[list[str], typer.Argument(help="Datasets (two or more for correlations).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: NAME.json, NAME.png, correlations.json.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Only this split of each dataset (default: all rows).")] = None,
    root: Root = Path("."),
) -> None:
    """Each dataset's 14x14 label co-occurrence matrix (JSON + heat map) and their Pearson correlations."""
    from rich.table import Table

    from cxrsynth.evaluate.cooccurrence import cooccurrence as lib

    result = lib(root, list(names), out, split=split)
    if result["pairs"]:
        table = Table(title="Pearson correlation of co-occurrence matrices")
        for col in ("a", "b", "r (196 entries)", "r (upper, 105)"):
            table.add_column(col, justify="left" if col in ("a", "b") else "right")
        for p in result["pairs"]:
            table.add_row(p["a"], p["b"], _fmt(p["pearson"]["r"], 3), _fmt(p["pearson_upper"]["r"], 3))
        console.print(table)
    console.print(f"wrote {len(names)} matrices and heat maps and correlations.json to {out}", highlight=False)
