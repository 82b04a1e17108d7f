"""``cxrsynth share export | verify | import | audit``: thin commands over :mod:`cxrsynth.share`.

Options that only override a config default (:class:`~cxrsynth.share.audit.AuditConfig`,
:class:`~cxrsynth.share.export.ExportConfig`) default to None here and are dropped when not
given, so each default lives once, in the dataclass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrsynth.cli.common import Device, Root, Store, console, err_console
from cxrsynth.cli.options import LazyHelp

share_app = typer.Typer(no_args_is_help=True, help="Share synthetic data with other sites: export, verify, import, audit.")

Embedding = Annotated[Optional[str], typer.Option("--embedding", help="The first rule's embedding: {embeddings} (default "
                                                  "{AuditConfig.embedding}).")]
K = Annotated[Optional[int], typer.Option("--k", min=1, help="Nearest training images kept per synthetic image.")]
Quantile = Annotated[Optional[float], typer.Option("--quantile", min=0.0, max=1.0,
                                                   help="The criterion's false-flag rate on held-out new patients' images "
                                                        "(default {AuditConfig.quantile}).")]
Criterion = Annotated[Optional[str], typer.Option("--criterion", help="The first rule's criterion, {criteria}: when a "
                                                  "nearest training image is a copy (default {AuditConfig.criterion}).")]
Split = Annotated[Optional[str], typer.Option("--split", help="Training split of the real dataset.")]
ExportSplit = Annotated[Optional[str], typer.Option("--split", help="Training split of the real dataset (default: the split the "
                                                                   "replicas were conditioned on, else train).")]
Heldout = Annotated[Optional[str], typer.Option("--heldout-split", help="Split calibrating the threshold (default: every image "
                                                                       "whose patient is outside the training split).")]
Align = Annotated[Optional[int], typer.Option("--align", min=0, help="Candidates each image is registered onto and re-scored "
                                              "by test-time alignment in the first rule; 0: none (default {AuditConfig.align}).")]
AlignSize = Annotated[Optional[int], typer.Option("--align-size", min=16, help="Side (px) of the alignment's registration "
                                                   "(default {AuditConfig.align_size}; 128 keeps the texture of 256 px images).")]
Detector = Annotated[Optional[str], typer.Option("--detector", help="The second rule's embedding, the copy detector: "
                                                "sscd trains one, sscd:DIR reads one (`share detector`), none: the "
                                                "first rule alone (default {AuditConfig.detector}).")]
DetectorAlign = Annotated[Optional[int], typer.Option("--detector-align", min=0, help="Candidates each image is registered "
                                                      "onto in the detector rule (default {AuditConfig.detector_align}).")]
ReidSteps = Annotated[Optional[int], typer.Option("--reid-steps", min=1, help="Training steps of the reid network.")]
SscdSteps = Annotated[Optional[int], typer.Option("--sscd-steps", min=1, help="Training steps of the sscd copy detector "
                                                  "(default {SscdConfig.steps}).")]
SscdSize = Annotated[Optional[int], typer.Option("--sscd-size", min=8, max=512, help="Input side (px) of the sscd copy "
                                                 "detector (default {SscdConfig.size}).")]


def _audit_config(**options):
    from cxrsynth.share.audit import AuditConfig

    reid_steps = options.pop("reid_steps", None)
    sscd = {"steps": options.pop("sscd_steps", None), "size": options.pop("sscd_size", None)}
    config = AuditConfig().override(**options)
    return config.override(reid=config.reid.override(steps=reid_steps), sscd=config.sscd.override(**sscd))


def _say(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


@share_app.command("audit", cls=LazyHelp)
def audit(
    name: Annotated[str, typer.Argument(help="Synthetic dataset to audit.")],
    against: Annotated[str, typer.Option("--against", help="Real dataset the generator learnt from.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for audit.json, neighbours.parquet, distances.png, pairs.png "
                                                    "(relative to --root).")],
    split: Split = None,
    heldout_split: Heldout = None,
    embedding: Embedding = None,
    criterion: Criterion = None,
    k: K = None,
    quantile: Quantile = None,
    align: Align = None,
    detector: Detector = None,
    detector_align: DetectorAlign = None,
    align_size: AlignSize = None,
    reid_steps: ReidSteps = None,
    sscd_steps: SscdSteps = None,
    sscd_size: SscdSize = None,
    device: Device = None,
    root: Root = Path("."),
) -> None:
    """Nearest real training images of every synthetic image; flags likely copies by two rules.

    The first rule: --embedding and --criterion (pixels, combined). The detector rule: --detector registered onto its
    --detector-align nearest (sscd, 16, absolute). An image is flagged when either rule flags it; each rule's threshold
    is calibrated on held-out real images at half the quantile; each embedding's patient re-identification AUROC is
    reported.
    Under ``torchrun --nproc-per-node N -m cxrsynth.cli share audit ...`` the embedding and the search are split over
    the ranks (the same files as one process).
    """
    from cxrsynth.share.audit import audit as audit_lib

    config = _audit_config(split=split, heldout_split=heldout_split, embedding=embedding, criterion=criterion, k=k,
                           quantile=quantile, align=align, detector=detector, detector_align=detector_align,
                           align_size=align_size, reid_steps=reid_steps, sscd_steps=sscd_steps, sscd_size=sscd_size,
                           device=device)
    from cxrsynth import runtime

    summary = audit_lib(root, name, against, root / out, config, progress=_say)
    if not runtime.distributed(join=False).is_main:
        return
    c = summary["counts"]
    rules = "; ".join(
        f"{r['name']} rule {r['embedding']['name']}{' aligned onto %d' % r['align'] if r['align'] else ''}, "
        f"{r['threshold']['criterion']}: {c['by_rule'][r['name']]} flagged, re-identification AUROC "
        f"{r['reid']['training_split'].get('auroc')} (training pairs) / {r['reid']['heldout'].get('auroc')} (held-out)"
        for r in summary["rules"])
    console.print(
        f"{name} vs {against}/{summary['training']['split']}: {c['flagged']} of {c['synthetic']} flagged, {c['copies']} "
        f"hard cop{'y' if c['copies'] == 1 else 'ies'} ({c['expected_by_chance']} expected by chance: the rules flag "
        f"{100 * c['chance_rate']:.2f}% of {summary['heldout']['images']} held-out new patients' images); {rules}; "
        f"{summary['seconds']:.1f} s; wrote {out}",
        highlight=False, soft_wrap=True)


@share_app.command("detector", cls=LazyHelp)
def detector(
    against: Annotated[str, typer.Argument(help="Real dataset whose training split the detector learns.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for sscd.json, sscd.safetensors and detector.json "
                                                    "(relative to --root): audits use it as --detector sscd:OUT.")],
    split: Split = None,
    sscd_steps: SscdSteps = None,
    sscd_size: SscdSize = None,
    device: Device = None,
    root: Root = Path("."),
) -> None:
    """Train the audit's sscd copy detector once, for every audit against this dataset (--detector sscd:OUT).

    Without it, every audit trains its own (minutes each); with it, --detector sscd:OUT.
    """
    from cxrsynth.share.audit import train_detector

    config = _audit_config(split=split, sscd_steps=sscd_steps, sscd_size=sscd_size, device=device)
    emb = train_detector(root, against, root / out, config, progress=_say)
    console.print(f"sscd copy detector of {against}/{config.split}: {emb.info['images']} images, "
                  f"{config.sscd.steps} steps at {config.sscd.size} px, final loss {emb.info['final_loss']:.3f}; "
                  f"wrote {out} (--detector sscd:{out})", highlight=False, soft_wrap=True)


@share_app.command("export", cls=LazyHelp)
def export(
    name: Annotated[str, typer.Argument(help="Synthetic dataset to export.")],
    out: Annotated[Path, typer.Option("--out", help="Package folder to create (must not exist; relative to --root).")],
    force: Annotated[bool, typer.Option("--force", help="Export even if the gate refuses (more flagged than chance "
                                                        "explains, or a copy) or the audit cannot run; the datasheet "
                                                        "records it.")] = False,
    audit_against: Annotated[Optional[str], typer.Option("--audit-against", help="Real dataset the generator learnt from "
                                                         "(default: the generator's recorded training data).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", min=0.0, max=1.0, help="Level of the one-sided binomial test "
                                                   "of the flagged count against chance (default {GateConfig.alpha}).")] = None,
    max_flagged: Annotated[Optional[int], typer.Option("--max-flagged", min=0, help="Optional extra cap on the flagged "
                                                       "count (default: the binomial test alone).")] = None,
    key_secret: Annotated[Optional[Path], typer.Option("--key-secret", help="File with the key-renumbering secret, for "
                                                       "repeatable exports (default: a random secret, kept nowhere).")] = None,
    keymap: Annotated[Optional[Path], typer.Option("--keymap",
                                                   help="Also write exported → original keys here (local only).")] = None,
    audit_out: Annotated[Optional[Path], typer.Option("--audit-out", help="Folder for the audit's files (default "
                                                      "data/audits/NAME; relative to --root).")] = None,
    split: ExportSplit = None,
    embedding: Embedding = None,
    quantile: Quantile = None,
    criterion: Criterion = None,
    align: Align = None,
    detector: Detector = None,
    detector_align: DetectorAlign = None,
    align_size: AlignSize = None,
    reid_steps: ReidSteps = None,
    sscd_steps: SscdSteps = None,
    sscd_size: SscdSize = None,
    device: Device = None,
    root: Root = Path("."),
) -> None:
    """Package a synthetic dataset for another site: shards, a manifest without real identifiers, sha256 index, DATASHEET.md."""
    from cxrsynth.share.export import ExportConfig
    from cxrsynth.share.export import export as export_lib
    from cxrsynth.share.gate import GateConfig

    audit_config = _audit_config(embedding=embedding, quantile=quantile, criterion=criterion, align=align,
                                 detector=detector, detector_align=detector_align, align_size=align_size,
                                 reid_steps=reid_steps, sscd_steps=sscd_steps, sscd_size=sscd_size, device=device)
    gate = GateConfig().override(alpha=alpha, max_flagged=max_flagged)
    config = ExportConfig().override(audit_against=audit_against, gate=gate, force=force or None,
                                     secret_file=key_secret, keymap=keymap, audit_out=root / audit_out if audit_out else None,
                                     audit_split=split, audit=audit_config)
    result = export_lib(root, name, root / out, config, progress=_say)
    console.print(f"{result['out']}: {result['images']:,} images in {result['shards']} shard(s), version {result['version']}; "
                  f"{result['decision']}" + (f" Audit files: {result['audit_dir']}" if result["audit_dir"] else ""),
                  highlight=False, soft_wrap=True)


@share_app.command("secret")
def secret(path: Annotated[Path, typer.Argument(help="Secret file (relative to --root); left as it is when it exists.")],
           root: Root = Path(".")) -> None:
    """Draw the key-renumbering secret once (for `share export --key-secret`): repeatable exports, never exported."""
    from cxrsynth.share.export import ensure_secret

    created = ensure_secret(root / path)
    console.print(f"{root / path}: {'a new secret' if created else 'the existing secret kept'}", highlight=False)


@share_app.command("verify")
def verify(package: Annotated[Path, typer.Argument(help="Package folder (relative to --root).")], root: Root = Path(".")) -> None:
    """Re-hash every file of a package against its index.json; exit 1 on any mismatch, missing or extra file."""
    from cxrsynth.errors import CheckFailed
    from cxrsynth.share import package as package_lib

    package = root / package
    problems = package_lib.verify(package)
    for problem in problems:
        console.print(f"[red]✗[/red] {problem}", highlight=False, soft_wrap=True)
    if problems:
        raise CheckFailed(f"{package}: {len(problems)} problem(s)")
    index = package_lib.read_index(package)
    console.print(f"[green]✓[/green] {package}: {len(index['files'])} file(s) match index.json "
                  f"({index.get('name')} version {index.get('version')}, {index.get('images')} images)", highlight=False)


@share_app.command("import")
def import_(
    package: Annotated[Path, typer.Argument(help="Package folder (from `share export`; relative to --root).")],
    name: Annotated[str, typer.Option("--name", help="Dataset name to register it as.")],
    copy: Annotated[bool, typer.Option("--copy", help="Copy the shards under data/shards/NAME/<version>/ "
                                                      "(default: use them where they are).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing dataset NAME.")] = False,
    store: Store = None,
    root: Root = Path("."),
) -> None:
    """Verify a package, check every tar member and manifest row, and register it as a synthetic dataset."""
    from cxrsynth.share.importer import import_package

    result = import_package(root, root / package, name, copy=copy, force=force, store=store if copy else None)
    console.print(f"{name} @ {result['version']}: {result['images']:,} synthetic images in {result['shards']} shard(s) "
                  f"({'copied to ' if copy else 'in place at '}{result['shard_dir']}); manifest {result['manifest']}",
                  highlight=False, soft_wrap=True)
