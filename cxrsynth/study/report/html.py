"""The report page: HTML tables, CSS, embedded figures and image grids, and :func:`build_report`.

Everything a reader sees is rendered here from a :class:`~cxrsynth.study.report.load.Study`
and the sentences of :mod:`~cxrsynth.study.report.prose`: figures as embedded PNG data
URIs (:mod:`cxrsynth.study.figures`), CSS inline, no script, so the page opens from disk
with no server.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrsynth import imaging, labels
from cxrsynth.errors import CxrsynthError
from cxrsynth.study import figures
from cxrsynth.study.params import StudyParams
from cxrsynth.study.report.load import (
    COOCCURRENCE_DIR,
    FAMILIES,
    MEMORISATION_DIR,
    RARE,
    Study,
    cas_rows,
    cfg_replicas,
    dataset_meta,
    external_site,
    k_of,
    k_text,
    load,
    prevalence,
    read_json,
    real_site,
    train_shares,
)
from cxrsynth.study.report.plots import curve_panels
from cxrsynth.study.report.prose import (
    CURVES,
    FAMILY_TEXT,
    FAMILY_TITLE,
    GLOSSARY,
    MEMORISATION_TEXT,
    f3,
    p_text,
    pct,
    signed,
    sites,
    memorisation_sentences,
    summary,
    test_label,
)

#: The paper's Pearson correlations of the sites' co-occurrence matrices (Results).
PAPER_CORRELATIONS = {frozenset(("mimic", "emory")): 0.862, frozenset(("mimic", "cxp")): 0.846,
                      frozenset(("cxp", "emory")): 0.789}
FINDING_NAME = dict(zip(labels.FINDING_COLUMNS, labels.FINDINGS))
#: Short finding names for figure axes (spelled out in the tables).
SHORT = {"No Finding": "No Finding", "Enlarged Cardiomediastinum": "Enl. Cardiomed.", "Lung Opacity": "Lung Opacity",
         "Support Devices": "Support Devices", "Pleural Effusion": "Pl. Effusion", "Pleural Other": "Pleural Other"}


CSS = """
body{font-family:"DejaVu Sans",system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;margin:0;
background:#fafafa;line-height:1.45}
main{max-width:1320px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 8px;border-bottom:2px solid #e3e3e3;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}p{max-width:980px}.sub{color:#555;margin-top:0}
nav{font-size:14px;margin:12px 0 8px;display:flex;flex-wrap:wrap;gap:4px 16px}nav a{color:#0b5cad;text-decoration:none}
ul.summary li{margin:4px 0;max-width:1100px}
figure{margin:12px 0 20px}figcaption{font-size:13px;color:#333;max-width:1100px;margin-top:4px}
img.figure{width:100%;height:auto;display:block}
table.grid{border-collapse:collapse;font-size:13px;margin:8px 0 16px;font-variant-numeric:tabular-nums}
table.grid th,table.grid td{border:1px solid #d4d4d4;padding:2px 7px;text-align:right;vertical-align:top;line-height:1.25}
table.facts td,table.facts tbody th{text-align:left}table.facts td.num{text-align:right}
table.grid thead th{background:#f0f3f7;text-align:center;font-weight:600}
table.grid tbody th{text-align:left;font-weight:normal;white-space:nowrap}
table.grid tr.macro{background:#f7f7f7;border-bottom:2px solid #bbb}
table.grid tr.rare{background:#fffbe6}
td .delta{display:block;font-size:11px;color:#666;line-height:1.1}
td.sig-up{background:#d9ecfb;font-weight:600}td.sig-down{background:#fde2d4;font-weight:600}
td.base{color:#333;background:#fafafa}td.na{color:#999;text-align:center}
.badge{display:inline-block;font-size:10px;background:#ffe08a;color:#5a4500;border-radius:3px;padding:0 4px;margin-left:4px}
.legend{font-size:12px;color:#444}.legend span{display:inline-block;padding:1px 6px;margin:0 4px;border:1px solid #ccc}
details{margin:6px 0}summary{cursor:pointer;font-weight:600;font-size:14px;margin:6px 0}
.notice{background:#fff6e5;border:1px solid #f0c36d;padding:8px 14px;margin:16px 0;font-size:14px}
.notice ul{margin:4px 0 0 0;padding-left:20px}p.missing{color:#8a5a00;background:#fff6e5;padding:6px 10px;display:inline-block}
p.note{font-size:12px;color:#555}
dl.glossary{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;font-size:13px;max-width:1150px}
dl.glossary dt{font-weight:600}dl.glossary dd{margin:0}
.pairs{display:grid;grid-template-columns:repeat(4,1fr);gap:14px}
figure.pair{margin:0;border:1px solid #e0e0e0;padding:6px;background:#fcfcfc}
.pair-images{display:flex;gap:4px}.pair-images>div{flex:1;text-align:center;font-size:11px;color:#555}
.xray{width:100%;aspect-ratio:1;display:block;image-rendering:auto;background:#000}
.placeholder{color:#ddd;font-size:11px;display:flex;align-items:center;justify-content:center;text-align:center}
figure.pair figcaption{font-size:12px;line-height:1.3}
pre{background:#f5f5f5;padding:10px;font-size:12px;overflow:auto;max-height:520px}
.wide figure img{max-width:900px;width:100%}
.side{display:grid;grid-template-columns:1fr 1fr;gap:16px}.side figure{margin:4px 0}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, css: str = "figure") -> str:
    """An embedded PNG; a figure is shown at most at its size at 96 CSS px per inch (matplotlib draws at 120 dpi)."""
    width = imaging.png_header(png).width
    return (f'<img class="{css}" alt="{esc(alt)}" style="max-width:{round(width * 96 / figures.DPI)}px" '
            f'src="{data_uri(png)}">')


def cell_label(name: str, family: str | None = None) -> str:
    """Short column heading of a cell: ``k = 2 (200%)``, ``train w1 / tune real``, ``targeted replicas``
    (in the CFG study, its real/real baseline is ``train real / tune real``)."""
    if family == "cfg" and name.startswith("supplement_"):
        return "train real / tune real"
    k = k_of(name)
    if k is not None:
        return f"k = {k_text(k)} ({figures.percent(k)})"
    m = re.fullmatch(r"cfg_real_(.+)", name)
    if m:
        return f"train real / tune {m.group(1)}"
    m = re.fullmatch(r"cfg_(.+)_(real|synthetic)", name)
    if m:
        return f"train {m.group(1)} / tune {'real' if m.group(2) == 'real' else m.group(1)}"
    if name == "rebalance_targeted":
        return "targeted replicas"
    return name


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def _legend() -> str:
    return ('<p class="legend">Each cell: AUROC and, below it, the change against the baseline column. '
            '<span class="sig-up" style="background:#d9ecfb">0.812▲</span> significantly higher, '
            '<span style="background:#fde2d4">0.790▼</span> significantly lower (paired bootstrap after Bonferroni); '
            'unmarked: not significant or not compared; – no result. <span class="badge">rare</span> under '
            f"{RARE:.0%} prevalence. Hover a cell for SD, CI and p-values.</p>")


def _details_tables(tables: list[tuple[str, str]]) -> str:
    return "".join(f'<details{" open" if i == 0 else ""}><summary>{esc(test_label(t))}</summary>{html_table}</details>'
                   for i, (t, html_table) in enumerate(tables))


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _auroc_cell(study: Study, family: str, test: str, cell: str, column: str, base: str) -> str:
    entry = study.macro(cell, test) if column == "macro" else None
    if column == "macro":
        value, sd = entry
        reason = None
    else:
        f = study.finding(cell, test, column)
        value, sd, reason = f.get("auroc"), f.get("sd"), f.get("reason")
    if cell not in study.cells:
        return '<td class="na" title="no metrics for this classifier">–</td>'
    if value is None:
        return f'<td class="na" title="{esc(reason or "not defined on this test set")}">n/a</td>'
    title = [f"AUROC {value:.4f}" + (f", SD {sd:.4f}" if sd is not None else "")]
    if cell == base:
        return f'<td class="base" title="{esc(title[0])}">{value:.3f}</td>'
    row = study.row(family, test, cell, column)
    b = study.macro(base, test)[0] if column == "macro" else study.finding(base, test, column).get("auroc")
    delta = row["delta"] if row is not None else (value - b if b is not None else None)
    css, mark = "", ""
    if row is not None:
        title.append(f"change {delta:+.4f}" + (f", paired 95% CI [{row['delta_ci95'][0]:+.4f}, {row['delta_ci95'][1]:+.4f}]"
                                               if row.get("delta_ci95") else ""))
        title.append(f"paired bootstrap p {p_text(row.get('p_paired'))}, "
                     f"Bonferroni-adjusted {p_text(row.get('p_paired_bonferroni'))}")
        if row.get("significant_paired"):
            css, mark = ("sig-up", "▲") if delta > 0 else ("sig-down", "▼")
    else:
        title.append("not compared (no paired bootstrap)")
    d = f'<span class="delta">{signed(delta)}</span>' if delta is not None else ""
    return f'<td class="{css}" title="{esc("; ".join(title))}">{value:.3f}{mark}{d}</td>'


def finding_table(study: Study, family: str, test: str, cells: list[str], base: str) -> str:
    """Per-finding AUROC of a family's cells on one test set, changes against the baseline, significance marked."""
    heads = "".join(f"<th>{esc(cell_label(c, family))}{' <small>(baseline)</small>' if c == base else ''}</th>"
                    for c in cells)
    rows = []
    for column in ("macro", *labels.FINDING_COLUMNS):
        if column == "macro":
            name, prev = "<b>Macro mean</b>", "<td></td>"
        else:
            share, n_pos = prevalence(study, test, column, [base, *cells])
            rare = share is not None and share < RARE
            name = esc(FINDING_NAME[column]) + (' <span class="badge">rare</span>' if rare else "")
            prev = f'<td class="num">{pct(share)}' + (f" <small>({n_pos})</small>" if n_pos is not None else "") + "</td>"
        tds = "".join(_auroc_cell(study, family, test, c, column, base) for c in cells)
        rows.append(f'<tr{" class=macro" if column == "macro" else ""}><th scope="row">{name}</th>{prev}{tds}</tr>')
    return (f'<table class="grid findings" data-family="{esc(family)}" data-test="{esc(test)}"><thead><tr><th>Finding</th>'
            f"<th>Prevalence in {esc(test_label(test))} <small>(positives)</small></th>{heads}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def family_tables(study: Study, family: str) -> str:
    cells = study.expected.get(family, [])
    if not cells:
        return f'<p class="missing">The {esc(family)} family is not in params.yaml.</p>'
    base = study.baseline(family)
    cells = [base, *[c for c in cells if c != base]]
    if not any(c in study.cells for c in cells):
        return f'<p class="missing">No classifier of the {esc(family)} family has results yet.</p>'
    tables = [(t, finding_table(study, family, t, cells, base)) for t in study.tests]
    return _legend() + _details_tables(tables)


def curve_figure(study: Study, family: str) -> str:
    """Figure 3 (``supplement``) or Figure 4 (``external``) with its caption, or a note when nothing ran yet."""
    panels = curve_panels(study, family)
    if not any(p.lines or any(s.points for s in p.series) for p in panels):
        return '<p class="missing">No classifier of this figure has results on any test set yet.</p>'
    xlabel, name, caption = (sites(study.params, t) for t in CURVES[family])
    png = figures.curves(panels, xlabel)
    return f"<figure>{img(png, f'{name}: macro AUROC against k')}<figcaption><b>{name}.</b> {esc(caption)}</figcaption></figure>"


def table2(study: Study) -> str:
    """The paper's Table 2: AUROC on the tuning set by training set (rows) and tuning set (columns)."""
    replicas = cfg_replicas(study.params)

    def head(r: str | None) -> str:
        if r is None:
            return "Real"
        g = study.guidance(r)
        return f"{esc(r)}<br><small>w = {g:g} (paper's CFG {g - 1:g})</small>" if g is not None else esc(r)

    def cell(train: str | None, tune: str | None) -> str:
        if train is None and tune is None:
            name = "supplement_k0"
        elif train is None:
            name = f"cfg_real_{tune}"
        elif tune is None:
            name = f"cfg_{train}_real"
        elif train == tune:
            name = f"cfg_{train}_synthetic"
        else:
            return '<td class="na" title="not part of the study (as in the paper)">–</td>'
        a, sd = study.macro(name, "tune")
        if a is None:
            why = "expected, no metrics yet" if name in study.expected.get("cfg", []) else "not run"
            return f'<td class="na" title="{esc(name)}: {why}">–{"<sup>†</sup>" if "expected" in why else ""}</td>'
        return f'<td title="{esc(name)}">{a:.4f}<span class="delta">SD {f3(sd)}</span></td>'

    cols = [None, *replicas]
    thead = "<tr><th rowspan=2>Training set</th><th colspan={}>Tuning set</th></tr><tr>{}</tr>".format(
        len(cols), "".join(f"<th>{head(c)}</th>" for c in cols))
    body = "".join(f"<tr><th scope=row>{head(t)}</th>{''.join(cell(t, u) for u in cols)}</tr>" for t in cols)
    return f'<table class="grid table2"><thead>{thead}</thead><tbody>{body}</tbody></table>'


def rebalance_section(study: Study) -> str:
    base, other = study.baseline("rebalance"), "rebalance_targeted"
    if other not in study.cells or base not in study.cells:
        return '<p class="missing">No rebalancing result: ' + ", ".join(
            c for c in (other, base) if c not in study.cells) + " missing.</p>"
    target = study.params.rebalance.target if study.params.rebalance is not None else None
    shares = {c: train_shares(study, c) for c in (base, other)}
    panels, tables = [], []
    order = {}
    for test in study.tests:
        rows, bars = [], []
        columns = sorted(labels.FINDING_COLUMNS, key=lambda c: (prevalence(study, test, c, [base, other])[0] or 0))
        order[test] = columns
        for column in ("macro", *columns):
            share, n_pos = (None, None) if column == "macro" else prevalence(study, test, column, [base, other])
            rare = share is not None and share < RARE
            name = "<b>Macro mean</b>" if column == "macro" else esc(FINDING_NAME[column]) + (
                ' <span class="badge">rare</span>' if rare else "")
            trains = "".join(f'<td class="num">{pct((shares[c] or {}).get(column)) if column != "macro" else ""}</td>'
                             for c in (base, other))
            tds = "".join(_auroc_cell(study, "rebalance", test, c, column, base) for c in (base, other))
            rows.append(f'<tr class="{"macro" if column == "macro" else "rare" if rare else ""}"><th scope=row>{name}</th>'
                        f'<td class="num">{pct(share)}</td>{trains}{tds}</tr>')
            if column != "macro":
                a = study.finding(base, test, column).get("auroc")
                b = study.finding(other, test, column).get("auroc")
                row = study.row("rebalance", test, other, column)
                bars.append({"value": None if a is None or b is None else b - a,
                             "ci": row.get("delta_ci95") if row else None,
                             "significant": bool(row and row.get("significant_paired"))})
        panels.append((test_label(test), bars))
        tables.append((test, f'<table class="grid findings" data-family="rebalance" data-test="{esc(test)}"><thead><tr>'
                       f"<th>Finding <small>(rarest first)</small></th><th>Prevalence in {esc(test_label(test))}</th>"
                       f"<th>Positive share, plain training set</th><th>Positive share, targeted training set</th>"
                       f"<th>AUROC, plain replicas <small>(baseline)</small></th><th>AUROC, targeted replicas</th>"
                       f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"))
    first = order[study.tests[0]] if study.tests else list(labels.FINDING_COLUMNS)
    rare_names = [SHORT.get(FINDING_NAME[c], FINDING_NAME[c]) for c in first
                  if (prevalence(study, study.tests[0], c, [base, other])[0] or 1) < RARE] if study.tests else []
    # one row order for every panel: the first test set's prevalence order
    panels = [(title, [dict(zip(order[t], bars))[c] for c in first]) for (title, bars), t in
              zip(panels, study.tests)] if study.tests else []
    png = figures.finding_bars([SHORT.get(FINDING_NAME[c], FINDING_NAME[c]) for c in first], [
        (title, [b for b in bars]) for title, bars in panels], "AUROC change, targeted − plain", marks=rare_names)
    size = figures.percent(float(study.params.rebalance.k)) if study.params.rebalance is not None else "k x 100%"
    intro = (f"<p>Both classifiers train on the real {esc(real_site(study.params))} training set plus {size} "
             f"synthetic images: plain replicas (<code>{esc(base)}</code>) or replicas whose conditions were drawn so that "
             f"every finding rarer than {pct(target, 0) if target is not None else 'the target'} reaches it "
             f"(<code>rebalance_targeted</code>). The paper found the rarest findings (under {RARE:.0%} prevalence) gained "
             f"most from synthetic data and proposed this as future work.</p>")
    fig = (f"<figure>{img(png, 'AUROC change per finding, targeted minus plain replicas', 'figure')}<figcaption>"
           f"<b>Targeted vs plain synthesis.</b> AUROC change per finding (targeted − plain) on each test set, findings "
           f"ordered by prevalence in {esc(test_label(study.tests[0]))} (rarest at the top; rare ones, under "
           f"{RARE:.0%}, in bold). "
           "Whiskers: paired-bootstrap 95% CI of the change; solid bar and *: significant after Bonferroni, pale bar: not "
           "significant (blue: targeted better, orange: plain better)."
           "</figcaption></figure>")
    return intro + fig + _details_tables(tables)


def cas_section(study: Study) -> str:
    cas = cas_rows(study)
    if cas is None:
        return ('<p class="missing">No CAS: the classifier trained on 100% synthetic images alone '
                "(<code>synthetic_k1</code>) has no result on the internal test set.</p>")
    findings = [c for c in labels.FINDING_COLUMNS]
    bars = [{"value": cas["findings"][c]["cas"], "sd": cas["findings"][c]["sd"], "reference": cas["findings"][c]["real"]}
            for c in findings]
    png = figures.finding_bars([SHORT.get(FINDING_NAME[c], FINDING_NAME[c]) for c in findings],
                               [(f"trained on synthetic only, tested on {test_label(cas['test'])}", bars)],
                               "AUROC (bars start at 0.5 = chance)", zero=0.5, significance=False,
                               marks=[SHORT.get(FINDING_NAME[c], FINDING_NAME[c]) for c in findings
                                      if (cas["findings"][c]["prevalence"] or 1) < RARE])
    rows = []
    m = cas["macro"]
    rows.append(f'<tr class="macro"><th scope=row><b>Macro mean</b></th><td></td><td class="num">{f3(m["cas"])}'
                f'<span class="delta">SD {f3(m["sd"])}</span></td><td class="num">{f3(m["real"])}</td>'
                f'<td class="num">{signed(_minus(m["cas"], m["real"]))}</td></tr>')
    for c in findings:
        f = cas["findings"][c]
        rare = f["prevalence"] is not None and f["prevalence"] < RARE
        value = (f'{f3(f["cas"])}<span class="delta">SD {f3(f["sd"])}</span>' if f["cas"] is not None
                 else f'<span title="{esc(f["reason"] or "")}">n/a</span>')
        rows.append(f'<tr class="{"rare" if rare else ""}"><th scope=row>{esc(FINDING_NAME[c])}'
                    f'{" <span class=badge>rare</span>" if rare else ""}</th><td class="num">{pct(f["prevalence"])}</td>'
                    f'<td class="num">{value}</td><td class="num">{f3(f["real"])}</td>'
                    f'<td class="num">{signed(_minus(f["cas"], f["real"]))}</td></tr>')
    table = ('<table class="grid cas"><thead><tr><th>Finding</th>'
             f"<th>Prevalence in {esc(test_label(cas['test']))}</th>"
             "<th>CAS: AUROC, synthetic-only training</th>"
             f"<th>AUROC, real training</th><th>CAS − real</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return ("<p>The Classification Accuracy Score (Ravuri &amp; Vinyals, 2019) measures how useful a conditional generator "
            "is: a classifier trained on its images alone (one replica of the training set, <code>synthetic_k1</code>) is "
            f"tested on real images ({esc(test_label(cas['test']))}). 0.5 is chance; the real-only classifier "
            "(black tick) is the reference.</p>"
            f"<figure>{img(png, 'Classification Accuracy Score per finding')}<figcaption><b>CAS per finding.</b> Bars: "
            "AUROC of the synthetic-only classifier (whiskers ±1 bootstrap SD), starting at chance (0.5); black ticks: "
            f"the real-only classifier; findings under {RARE:.0%} prevalence in bold.</figcaption></figure>{table}")


def fid_section(study: Study) -> str:
    expected = list(study.params.replicas)
    names = list(dict.fromkeys([*expected, *study.fid]))
    if not names:
        return '<p class="missing">No replicas in params.yaml and no Fréchet distances (metrics/distance/) yet.</p>'
    rows = []
    for r in names:
        d = study.fid.get(r)
        g = d.get("guidance") if d and d.get("guidance") is not None else study.guidance(r)
        w = (f"<td class=num>{'–' if g is None else f'{g:g}'}</td>"
             f"<td class=num>{'–' if g is None else f'{g - 1:g}'}</td>")
        if d is None:
            rows.append(f'<tr><th scope=row>{esc(r)}</th>{w}<td class="na" colspan=5>not measured yet '
                        f"(no metrics/distance/{esc(r)}.json)</td></tr>")
            continue
        rows.append(f"<tr><th scope=row>{esc(r)}</th>{w}<td>{esc(d.get('feature', '?'))}</td>"
                    f"<td class=num><b>{f3(d.get('fid'))}</b></td><td class=num>{f3(d.get('real_halves'))}</td>"
                    f"<td class=num>{d.get('n_real', '–')}</td><td class=num>{d.get('n_synthetic', '–')}</td></tr>")
    return ('<table class="grid fid"><thead><tr><th>Replica</th><th>Guidance w<br><small>(standard)</small></th>'
            "<th>Paper's CFG<br><small>(= w − 1)</small></th><th>Features</th><th>Fréchet distance<br><small>replica to real"
            "</small></th><th>Floor<br><small>real half to real half</small></th><th>Real images</th>"
            f"<th>Synthetic images</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            "<p class=note>Lower is closer to the real training images; the floor is the distance between two halves of "
            "the real images, what sampling noise alone gives at this size. <i>classifier</i> features are the pooled "
            "features of the study's real-only classifier; <i>inception</i>, torchvision's Inception. Both are comparable "
            "between replicas of this run, not with the paper's TF-Inception FIDs (6.4 / 7.4 / 13.9 at CFG 0 / 4 / 7.5).</p>")


def _caption(row: dict) -> str:
    sex = {"F": "female", "M": "male"}.get(str(row.get("sex")), "sex unknown")
    age = row.get("age")
    age = f"{int(age)} y" if age is not None and age == age else "age unknown"
    view = row.get("view") if row.get("view") is not None and row.get("view") == row.get("view") else "view unknown"
    findings = [FINDING_NAME[c] + ("?" if row.get(c) == labels.UNCERTAIN else "") for c in labels.FINDING_COLUMNS
                if row.get(c) in (labels.POSITIVE, labels.UNCERTAIN)]
    race = row.get("race") if isinstance(row.get("race"), str) else None
    return (f"{sex}, {age}, {esc(view)}" + (f", {esc(race)}" if race else "")
            + f"<br><b>{esc(', '.join(findings) or 'no positive finding')}</b>")


def _pick(frame, n: int):
    """Up to ``n`` rows (by key) chosen so that together they show as many different findings as possible."""
    frame = frame.sort_values("key", kind="stable")
    y = labels.findings_matrix(frame) == labels.POSITIVE
    chosen, covered = [], set()
    for i in range(len(frame)):
        new = set(np.flatnonzero(y[i]).tolist()) - covered
        if new:
            chosen.append(i)
            covered |= new
        if len(chosen) == n:
            break
    rest = [i for i in range(len(frame)) if i not in chosen]
    return frame.iloc[sorted(chosen + rest[: n - len(chosen)])]


def image_grid(study: Study, n: int = 8) -> str:
    """Synthetic images of the supplementation replica beside the real images whose conditions they copy."""
    from cxrsynth import manifest, shards

    supplement = study.params.supplement
    replica = supplement.replica if supplement is not None else (study.replicas()[:1] or [None])[0]
    if replica is None:
        return '<p class="missing">No replica named in params.yaml (supplement.replica): no image grid.</p>'
    name = f"{real_site(study.params)}_{replica}"
    try:
        syn = manifest.read(study.root, name)
        source = str(manifest.read_meta(study.root, name).get("conditions") or real_site(study.params))
        syn = syn.loc[syn["shard"].notna().to_numpy(dtype=bool)]
        if "split" in syn and (syn["split"] == "train").any():
            syn = syn.loc[(syn["split"] == "train").fillna(False).to_numpy(dtype=bool)]
        if syn.empty:
            return f'<p class="missing">{esc(name)} has no images with shards: no image grid.</p>'
        syn = syn.loc[syn["replica"] == syn["replica"].min()] if "replica" in syn else syn
        picked = _pick(syn, n)
        real = manifest.read(study.root, source).set_index("key", drop=False)
        real_rows = real.loc[real.index.intersection(picked["source_key"].astype(str))]
        real_rows = real_rows.loc[real_rows["shard"].notna().to_numpy(dtype=bool)]
        syn_png = dict(shards.images(study.root, picked, strict=False))
        real_png = dict(shards.images(study.root, real_rows, strict=False)) if len(real_rows) else {}
    except (CxrsynthError, OSError, KeyError) as exc:
        return f'<p class="missing">No image grid: {esc(exc)}</p>'
    pairs = []
    for row in picked.to_dict("records"):
        key, src = str(row["key"]), str(row.get("source_key"))
        left = (f'<img class="xray" alt="real {esc(src)}" src="{data_uri(real_png[src])}">' if src in real_png
                else '<div class="xray placeholder">real image<br>not available</div>')
        right = (f'<img class="xray" alt="synthetic {esc(key)}" src="{data_uri(syn_png[key])}">' if key in syn_png
                 else '<div class="xray placeholder">synthetic image<br>not in its shard</div>')
        pairs.append(f'<figure class="pair"><div class="pair-images"><div>{left}<span>real</span></div>'
                     f'<div>{right}<span>synthetic</span></div></div><figcaption>{_caption(row)}'
                     f'<br><small>{esc(src)} → {esc(key)}</small></figcaption></figure>')
    g = study.guidance(str(replica))
    return (f"<p>Each pair: a real {esc(source)} training image (left) and the synthetic image of replica "
            f"<code>{esc(name)}</code> (right" + (f", guidance w = {g:g}" if g is not None else "") + ") generated "
            "from the same conditions — sex, age, view and findings (the caption; <i>?</i> = uncertain). The synthetic "
            "image copies the conditions, not the patient.</p>"
            f'<div class="pairs">{"".join(pairs)}</div>')


def cooccurrence_section(study: Study) -> str:
    folder = study.root / COOCCURRENCE_DIR
    path = folder / "correlations.json"
    if not path.is_file():
        return '<p class="missing">No label co-occurrence results (<code>metrics/cooccurrence/correlations.json</code>) yet.</p>'
    doc = read_json(path, study.problems) or {}
    matrices, originals = [], []
    for name in doc.get("datasets") or []:
        m = read_json(folder / f"{name}.json", study.problems) if (folder / f"{name}.json").is_file() else None
        if m and m.get("normalized") is not None:
            matrices.append((f"{name} ({m.get('images', '?'):,} images)", np.array(m["normalized"], dtype=float)))
        png_path = folder / f"{name}.png"
        if png_path.is_file():
            originals.append(f"<figure>{img(png_path.read_bytes(), f'co-occurrence heat map of {name} with counts')}"
                             f"<figcaption>{esc(name)}: share and count of images positive for both findings."
                             "</figcaption></figure>")
    parts = []
    if matrices:
        names = [SHORT.get(f, f) for f in labels.FINDINGS]
        parts.append(f"<figure>{img(figures.heatmaps(matrices, names), 'label co-occurrence matrices')}<figcaption>"
                     "<b>Label co-occurrence</b> (the paper's Figures E1–E3): share of images positive for both findings "
                     "(the diagonal is each finding's prevalence), on one colour scale for all sites"
                     + (f", split {esc(doc['split'])}" if doc.get("split") else "") + ".</figcaption></figure>")
    rows = []
    for p in doc.get("pairs") or []:
        paper = PAPER_CORRELATIONS.get(frozenset((p["a"], p["b"])))
        rows.append(f"<tr><th scope=row>{esc(p['a'])} – {esc(p['b'])}</th>"
                    f"<td class=num><b>{f3((p.get('pearson') or {}).get('r'))}</b></td>"
                    f"<td class=num>{f3((p.get('pearson_upper') or {}).get('r'))}</td>"
                    f"<td class=num>{'–' if paper is None else f'{paper:.3f}'}</td></tr>")
    parts.append('<table class="grid cooccurrence"><thead><tr><th>Sites</th><th>Pearson r<br><small>all 196 entries</small></th>'
                 "<th>Pearson r<br><small>105 distinct entries</small></th><th>Paper<br><small>(real data)</small></th>"
                 "</tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table>"
                 "<p class=note>Pearson's r of two sites' 14 × 14 co-occurrence matrices: how alike their label "
                 "distributions are. The paper's values are for the real CheXpert, MIMIC-CXR and Emory data.</p>")
    if originals:
        parts.append(f'<details><summary>Full-size heat maps with counts</summary><div class="wide">{"".join(originals)}</div>'
                     "</details>")
    return "".join(parts)


MEMORISATION_LABELS = {"control": "Positive control (overfitted)", "demo": "Demo generator"}


def _memorisation_row(label: str, r: dict) -> str:
    n, k = r.get("images"), r.get("flagged")
    gen = r.get("generator") or {}
    if label == "control":
        made = f"{gen.get('preset', '?')}, {gen.get('steps', '?')} steps on {r.get('training_subset', '?')} images"
    else:
        made = "w = " + (f"{gen['guidance']:g}" if gen.get("guidance") is not None else "?")
    beyond = r.get("beyond_chance")
    verdict = "–" if beyond is None else ("beyond chance" if beyond else "at chance")
    css = "" if beyond is None else ' class="sig-up"' if beyond else ""
    near = (r.get("nearest") or {}).get("median")
    chance = r.get("expected_by_chance")
    return (f"<tr><th scope=row>{esc(MEMORISATION_LABELS.get(label, label))}<br><small>{esc(made)}</small></th>"
            f"<td>{esc(r.get('dataset') or '?')}</td><td class=num>{'–' if n is None else f'{n:,}'}</td>"
            f"<td class=num>{'–' if k is None else f'{k:,}'}</td>"
            f"<td class=num>{'–' if chance is None else f'{chance:g}'}</td>"
            f"<td class=num>{pct(r.get('flagged_fraction'))}</td><td class=num>{p_text(r.get('p_value'))}</td>"
            f"<td{css}>{verdict}</td><td class=num>{'–' if r.get('copies') is None else r['copies']}</td>"
            f"<td class=num>{'–' if near is None else f'{near:.4f}'}</td></tr>")


def memorisation_section(study: Study) -> str:
    """The positive control and the demo generator under the memorisation audit: the table, the sentences, the
    distance histograms and the closest pairs side by side; a note when the stage has not run."""
    doc = study.memorisation
    if not doc:
        return (f"<p>{MEMORISATION_TEXT}</p>"
                '<p class="missing">No memorisation results (<code>metrics/memorisation/memorisation.json</code>): the '
                "positive control has not run in this project (an older project, or the <code>memorisation</code> stage "
                "is not in its dvc.yaml).</p>")
    generators = [(label, doc[label]) for label in ("control", "demo") if isinstance(doc.get(label), dict)]
    rows = "".join(_memorisation_row(label, r) for label, r in generators)
    threshold = next((r.get("threshold") for _, r in generators if r.get("threshold") is not None), None)
    embedding = next((r.get("embedding") for _, r in generators if r.get("embedding")), None)
    rules = next((r.get("rules") for _, r in generators if r.get("rules")), None)
    if rules and len(rules) > 1:  # the union of the audit's rules, each with its flagged count per generator
        embedding = " or ".join(f"the {u['name']} rule ({u['embedding']}" + (f" aligned onto {u['align']}" if u.get("align")
                                else "") + f", {u['criterion']})" for u in rules)
        embedding += "; flagged by each rule: " + "; ".join(
            f"{MEMORISATION_LABELS.get(label, label)} " + ", ".join(f"{u['name']} {u['flagged']}" for u in r.get("rules", []))
            for label, r in generators)
    table = ('<table class="grid facts memorisation"><thead><tr><th>Generator</th><th>Replica</th><th>Images audited</th>'
             "<th>Flagged</th><th>Expected by chance</th><th>Fraction flagged</th><th>p <small>(vs chance)</small></th>"
             "<th>Verdict</th><th>Copies <small>(training images)</small></th><th>Median nearest distance</th>"
             f"</tr></thead><tbody>{rows}</tbody></table>")
    note = ("<p class=note>" + esc(f"Audited against {(doc.get('real') or {}).get('name', '?')}/"
                                   f"{(doc.get('real') or {}).get('split', '?')}")
            + (esc(f" by {embedding}") if rules and len(rules) > 1 else
               esc(f" with the {embedding} embedding") if embedding else "")
            + (esc(f"; threshold {threshold:.4f}") if isinstance(threshold, (int, float)) and not (rules and len(rules) > 1)
               else "")
            + (esc(f"; α = {doc['alpha']:g}") if doc.get("alpha") is not None else "") + ".</p>")
    sentences = "".join(f"<li>{esc(t)}</li>" for t in memorisation_sentences(study))
    folder = study.root / MEMORISATION_DIR

    def figure(label: str, r: dict, name: str, what: str) -> str:
        rel = (r.get("files") or {}).get(name)
        path = folder / rel if rel else folder / label / name
        if not path.is_file():
            return f'<figure><p class="missing">{esc(MEMORISATION_LABELS.get(label, label))}: no {esc(name)}.</p></figure>'
        return (f"<figure>{img(path.read_bytes(), f'{label} {what}')}<figcaption><b>"
                f"{esc(MEMORISATION_LABELS.get(label, label))}</b> ({esc(r.get('dataset') or '?')}): {esc(what)}."
                "</figcaption></figure>")

    hist = "".join(figure(label, r, "distances.png", "distance of each synthetic image (and of each held-out real image) "
                                                      "to its nearest training image, with the threshold")
                   for label, r in generators)
    pairs = "".join(figure(label, r, "pairs.png", "flagged pairs, or the closest pairs when none is flagged (synthetic "
                                                  "left, its nearest training image right)")
                    for label, r in generators)
    return (f"<p>{MEMORISATION_TEXT}</p>" + (f'<ul class="summary">{sentences}</ul>' if sentences else "") + table + note
            + f'<h3>Distances to the nearest training image</h3><div class="side">{hist}</div>'
            + f'<h3>Closest pairs</h3><div class="side">{pairs}</div>')


def _yaml(params: StudyParams) -> str:
    """params.yaml as written (the mapping it was parsed from)."""
    import yaml

    return yaml.safe_dump(dict(params.mapping), sort_keys=False, default_flow_style=None, width=110)


def facts_section(study: Study) -> str:
    from cxrsynth import manifest

    parts = []
    metas = {}
    try:
        names = manifest.list_names(study.root)
    except OSError:
        names = []
    for name in names:
        m = dataset_meta(study.root, name)
        if m is not None:
            metas[name] = m
    rows = []
    for name, m in metas.items():
        if m.get("kind") == "mix":
            continue
        g = m.get("guidance")
        rows.append(f"<tr><th scope=row>{esc(name)}</th><td>{esc(m.get('kind', '?'))}</td><td><code>{esc(m.get('version', '?'))}"
                    f"</code></td><td class=num>{m.get('kept', '–')}</td><td>{'' if g is None else f'{g:g}'}</td>"
                    f"<td><code>{esc(m.get('generator_id') or '')}</code></td></tr>")
    parts.append("<h3>Data versions</h3>" + (
        '<table class="grid facts"><thead><tr><th>Dataset</th><th>Kind</th><th>Version</th><th>Images</th>'
        f"<th>Guidance w</th><th>Generator id</th></tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows
        else '<p class="missing">No manifests under this root.</p>'))
    rows, seen = [], set()
    for family, cells in study.expected.items():
        for cell in cells:
            c = study.cells.get(cell)
            if c is None or cell in seen:
                continue
            seen.add(cell)
            t, k = c.get("train") or {}, c.get("classifier") or {}
            mix = metas.get(str(t.get("name")), {}).get("version")
            rows.append(f"<tr><th scope=row>{esc(cell)}</th><td>{esc(c.get('family', family))}</td>"
                        f"<td>{esc(t.get('name', '?'))}{f' <code>{esc(mix)}</code>' if mix else ''}</td>"
                        f"<td class=num>{t.get('real_images', '–')}</td><td class=num>{t.get('synthetic_images', '–')}</td>"
                        f"<td>{esc(c.get('tune', 'real'))}</td><td>{esc(k.get('preset', '?'))}</td>"
                        f"<td><code>{esc(k.get('classifier_id', '?'))}</code></td>"
                        f"<td class=num>{(k.get('best') or {}).get('epoch', '–')}</td></tr>")
    parts.append("<h3>Classifiers</h3>" + (
        '<table class="grid facts"><thead><tr><th>Cell</th><th>Family</th><th>Training set <small>(version)</small></th>'
        "<th>Real images</th><th>Synthetic images</th><th>Tuning set</th><th>Preset</th><th>Classifier id</th>"
        f"<th>Best epoch</th></tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows
        else '<p class="missing">No classifier results yet.</p>'))
    parts.append(f"<h3>Parameters (params.yaml)</h3><pre>{esc(_yaml(study.params))}</pre>")
    return "".join(parts)


def missing_section(study: Study) -> str:
    items = [f"<li><code>{esc(cell)}</code> ({esc(family)}): no <code>metrics/study/{esc(cell)}.json</code></li>"
             for family, cell in study.missing()]
    off = [f for f in FAMILIES if f not in study.expected]
    if off:
        items.append(f"<li>families not in params.yaml (turned off): {esc(', '.join(off))}</li>")
    for family in study.expected:
        if family not in study.compares:
            items.append(f"<li>no comparison of the {esc(family)} family (<code>metrics/compare/{esc(family)}.json</code>): "
                         "its changes are shown without significance</li>")
        for test, doc in ((study.compares.get(family) or {}).get("tests") or {}).items():
            for w in doc.get("warnings") or []:
                items.append(f"<li>the {esc(family)} comparison on {esc(test_label(test))}: {esc(w)}</li>")
    if study.memorisation is None and study.params.memorisation is not None:
        items.append(f"<li>no memorisation results (<code>{esc(MEMORISATION_DIR)}/memorisation.json</code>): the "
                     "memorisation stage has not run</li>")
    extra = sorted(set(study.cells) - {c for cells in study.expected.values() for c in cells})
    if extra:
        items.append(f"<li>results not named by params.yaml, not shown: {esc(', '.join(extra))}</li>")
    items += [f"<li>{esc(p)}</li>" for p in study.problems]
    if not items:
        return ""
    return f'<div class="notice"><b>Missing from this run</b><ul>{"".join(items)}</ul></div>'


def render(study: Study) -> str:
    """The report page as an HTML string."""
    from cxrsynth import __version__

    sections = []
    s = lambda text: sites(study.params, text)  # noqa: E731
    real, ext = real_site(study.params), external_site(study.params)
    others = [t.split(":")[0] for t in study.tests if t.split(":")[0] not in (real, ext)]
    glossary = [*GLOSSARY, ("Sites", esc(f"{real}: the internal site (the generator and its replicas are made from its "
                                         "training split)" + (f"; {ext}: a second site with its own training set" if ext else ""))
                            + (esc(f"; {', '.join(others)}: external, used only for testing") if others else "") + ".")]
    sentences = summary(study)
    sections.append(_section("summary", "Summary", ('<ul class="summary">' + "".join(f"<li>{esc(s)}</li>" for s in sentences)
                                                    + "</ul>") if sentences else '<p class="missing">No results yet.</p>')
                    + missing_section(study))
    sections.append(_section("reading", "How to read this report", '<dl class="glossary">' + "".join(
        f"<dt>{esc(t)}</dt><dd>{d}</dd>" for t, d in glossary) + "</dl>"))
    if "supplement" in study.expected or "synthetic" in study.expected:
        sections.append(_section("figure3", "Figure 3 — supplementation and synthetic-only training",
                                 curve_figure(study, "supplement")))
    if "external" in study.expected:
        sections.append(_section("figure4", "Figure 4 — another site's real data + synthetic data",
                                 curve_figure(study, "external")))
    if "cfg" in study.expected:
        sections.append(_section("table2", "Table 2 — guidance scale of the training and tuning sets", (
            s("<p>Macro AUROC on the <b>tuning set</b> (as in the paper's Table 2) of classifiers whose training set (rows) "
            "and tuning set (columns) are real or a synthetic replica of cxp made at guidance w. Guidance is given in the "
            "standard formula (w = 1: the conditional model alone); the paper's CFG values are w − 1. "
            "– : not part of the study; –<sup>†</sup>: expected but not run yet.</p>") + table2(study))))
    per = "".join(f"<h3>{esc(s(FAMILY_TITLE[f]))}</h3><p>{esc(s(FAMILY_TEXT[f]))}</p>{family_tables(study, f)}"
                  for f in ("supplement", "synthetic", "external", "cfg") if f in study.expected)
    if per:
        sections.append(_section("findings", "Per-finding AUROC", per))
    if "rebalance" in study.expected:
        sections.append(_section("rebalance", "Targeted synthesis for rare findings", rebalance_section(study)))
    sections.append(_section("cas", "Classification Accuracy Score (CAS)", cas_section(study)))
    sections.append(_section("quality", "Synthetic images: Fréchet distance and real-vs-synthetic pairs",
                             "<h3>Fréchet distance</h3>" + fid_section(study) + "<h3>Real and synthetic images</h3>"
                             + image_grid(study)))
    if study.memorisation is not None or study.params.memorisation is not None:  # a study without the stage: no section
        sections.append(_section("memorisation", "Memorisation: the audit's positive control", memorisation_section(study)))
    sections.append(_section("cooccurrence", "Label co-occurrence across sites", cooccurrence_section(study)))
    sections.append(_section("facts", "Run facts", facts_section(study)))
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in re.findall(r'<section id="([^"]+)"><h2>([^<]+)</h2>', "".join(sections)))
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width\">"
            f"<title>cxrsynth study report</title><style>{CSS}</style></head><body><main>"
            "<h1>Synthetic supplementation study</h1>"
            "<p class=sub>A reproduction of Khosravi et al., <i>Synthetically enhanced</i> (eBioMedicine 2024), made by "
            f"cxrsynth {esc(__version__)} from this project's metrics. Test sets: "
            f"{esc(', '.join(test_label(t) for t in study.tests) or 'none')}.</p>"
            f"<nav>{nav}</nav>{''.join(sections)}</main></body></html>\n")


def build_report(root: Path, params: StudyParams | Mapping[str, Any], out: Path) -> Path:
    """Write the study report ``out/index.html`` (self-contained) and return its path.

    Args:
        root: Project root (``metrics/``, ``manifests/``, ``data/`` under it).
        params: The study's parameters (a params.yaml mapping is parsed and checked first).
        out: Output folder (created).
    """
    study = load(root, params)
    page = render(study)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    tmp = path.with_suffix(".html.partial")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
