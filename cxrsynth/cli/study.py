"""``cxrsynth study``: the paper's experiments as cells driven by params.yaml (the DVC stages call these).

Every command reads params.yaml through :meth:`cxrsynth.study.params.StudyParams.load` first,
so a bad key, type or family fails in a second, naming the key, before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrsynth.cli.common import Device, Root, console
from cxrsynth.study.params import FAMILIES, PARAMS_FILE, StudyParams

study_app = typer.Typer(no_args_is_help=True, help="The study: experiment cells, comparisons, distances, the report.")

Params = Annotated[Path, typer.Option("--params", help="The parameters file (relative to --root).")]


def _params(root: Path, path: Path) -> StudyParams:
    return StudyParams.load(root, path)


@study_app.command("check")
def check(
    data: Annotated[bool, typer.Option("--data", help="Also check the datasets already ingested: every test set has test "
                                                      "rows, the training sites train rows (a cell checks this itself).")] = False,
    params: Params = PARAMS_FILE,
    root: Root = Path("."),
) -> None:
    """Check params.yaml: unknown keys, types, ranges and families that fit together (in a second, before any stage)."""
    p = _params(root, params)
    console.print(f"{params}: ok", highlight=False)
    if data:
        from cxrsynth.study.plan import check_data

        skipped = check_data(root, p, require=False)
        console.print("data: ok" + (f" (not ingested yet, not checked: {', '.join(skipped)})" if skipped else ""),
                      highlight=False)


@study_app.command("cell")
def cell(
    family: Annotated[str, typer.Argument(help=" | ".join(FAMILIES) + ".")],
    tag: Annotated[str, typer.Argument(help="k<k> (supplement, synthetic, external), <replica>-real | <replica>-synthetic "
                                            "| real-<replica> (cfg), targeted (rebalance).")],
    params: Params = PARAMS_FILE,
    device: Device = None,
    root: Root = Path("."),
) -> None:
    """Build one cell's training mix, train its classifier, evaluate it on its tuning split and every test set."""
    p = _params(root, params)
    from cxrsynth.study.cell import run_cell

    run_cell(root, p, family, tag, device=device, log=lambda line: console.print(line, highlight=False))


@study_app.command("compare")
def compare(
    family: Annotated[str, typer.Argument(help=" | ".join(FAMILIES) + ".")],
    params: Params = PARAMS_FILE,
    root: Root = Path("."),
) -> None:
    """Compare a family's cells with its baseline on every test set (Bonferroni across the family)."""
    p = _params(root, params)
    from cxrsynth.study.compare import compare_family

    result = compare_family(root, p, family)
    for label, table in result["tests"].items():
        significant = [(c["cell"], r["finding"]) for c in table["comparisons"] for r in c["rows"] if r["significant_paired"]]
        console.print(f"{family} on {label}: {len(table['comparisons'])} cell(s) against {result['baseline']}; "
                      f"significant (paired bootstrap, Bonferroni): {', '.join(f'{c}/{f}' for c, f in significant) or 'none'}",
                      highlight=False, soft_wrap=True)


@study_app.command("distance")
def distance(
    replica: Annotated[str, typer.Argument(help="A replica of params.yaml's `replicas`.")],
    params: Params = PARAMS_FILE,
    device: Device = None,
    root: Root = Path("."),
) -> None:
    """Fréchet distance of a replica to the real training images, in the real-only classifier's features."""
    p = _params(root, params)
    from cxrsynth.study.distance import replica_distance

    r = replica_distance(root, p, replica, device=device)
    console.print(f"{r['dataset']}: Fréchet distance {r['fid']:.3f} (two halves of the real set: {r['real_halves']:.3f}; "
                  f"{r['n_synthetic']} synthetic vs {r['n_real']} real images)", highlight=False)


@study_app.command("memorisation")
def memorisation(
    out: Annotated[Path, typer.Option("--out", help="Folder for memorisation.json and the two audits (relative to --root).")]
    = Path("metrics/memorisation"),
    params: Params = PARAMS_FILE,
    device: Device = None,
    root: Root = Path("."),
) -> None:
    """The memorisation audit's positive control: a generator overfitted on a few training images must be flagged far
    above chance, the demo generator's replica at chance (params.yaml `memorisation`)."""
    p = _params(root, params)
    if p.memorisation is None:
        from cxrsynth.study.params import ParamsError

        raise ParamsError("memorisation", "missing: the positive control needs a memorisation section", str(params))
    from cxrsynth.cli.common import err_console
    from cxrsynth.config import given
    from cxrsynth.share.control import ControlConfig
    from cxrsynth.share.control import memorisation as memorisation_lib

    m, g, s = p.memorisation, p.generator, p.generate
    config = ControlConfig(**given(
        images=m.images, steps=m.steps, batch=m.batch, lr=m.lr, warmup=m.warmup, ema=m.ema, replicas=m.replicas,
        alpha=p.share.alpha if p.share else None, seed=p.seed, device=device,
        detector=f"sscd:{p.share.detector}" if p.share and p.share.detector else None,
        detector_align=p.share.detector_align if p.share else None, align_size=p.share.align_size if p.share else None,
        preset=g.preset if g else None, image_size=g.image_size if g else None,
        sampler=s.sampler if s else None, sample_steps=s.steps if s else None, sample_batch=s.batch if s else None))
    real = p.study.real
    doc = memorisation_lib(root, real, f"{real}_{m.replica}", root / out, config,
                           progress=lambda line: err_console.print(line, highlight=False, soft_wrap=True))
    for label in ("control", "demo"):
        r = doc[label]
        console.print(f"{label} ({r['dataset']}): {r['flagged']} of {r['images']} flagged "
                      f"({100 * r['flagged_fraction']:.1f}%; {r['expected_by_chance']:g} expected by chance, one-sided "
                      f"binomial p = {r['p_value']:.3g}); {r['hard_copies']} hard copies; training images copied: "
                      f"{r['copies']}; export gate: {'passed' if r['gate_passed'] else 'refused'}",
                      highlight=False, soft_wrap=True)
    v = doc["verdict"]
    console.print(f"positive control caught: {v['control_caught']}; demo generator at chance: {v['demo_at_chance']}; "
                  f"wrote {out}", highlight=False)


@study_app.command("report")
def report(
    out: Annotated[Path, typer.Option("--out", help="Report folder (index.html).")] = Path("report"),
    params: Params = PARAMS_FILE,
    root: Root = Path("."),
) -> None:
    """Write the study report (a self-contained HTML page), the DVC plot data and headline metrics; print the summary table."""
    p = _params(root, params)
    from cxrsynth.study.report import write_report
    from cxrsynth.study.summary import summary_table

    path = write_report(root, p, root / out)
    console.print(summary_table(root, p))
    console.print(f"wrote {path}", highlight=False)


@study_app.command("plots-template")
def plots_template(
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the page (default: .dvc/plots-template.html "
                                                          "under --root, then named in .dvc/config.local).")] = None,
    root: Root = Path("."),
) -> None:
    """Write the page `dvc plots show` fills, with vega, vega-lite and vega-embed inlined: the plots draw offline
    (at the default place, also name it in .dvc/config.local)."""
    from cxrsynth.study.report.dvc_page import write_page_template

    named = out is None and (root / ".dvc").is_dir()
    path = write_page_template(root, out)
    use = ("named in .dvc/config.local: `dvc plots show` uses it" if named
           else f"`dvc plots show --html-template {path.resolve()}` uses it")
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); {use}", highlight=False)


@study_app.command("summary")
def summary(
    params: Params = PARAMS_FILE,
    root: Root = Path("."),
) -> None:
    """Print every cell's macro AUROC (bootstrap SD) on its tuning split and each test set."""
    p = _params(root, params)
    from cxrsynth.study.summary import summary_table

    console.print(summary_table(root, p))
