"""The study report's figures, drawn with matplotlib (Agg) and returned as PNG bytes.

Each function takes plain numbers (already read from the study's metrics) and returns the
bytes of one PNG, so the report embeds them as data URIs and the same inputs give the same
bytes (no version string in the PNG metadata).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Resolution of every figure (the report shows them at 96 CSS px per inch).
DPI = 120
#: Series colours (colour-blind safe, Okabe-Ito); the baseline is red as in the paper's Figure 3.
COLORS = {"real+synthetic": "#0072B2", "synthetic only": "#E69F00", "external": "#009E73", "baseline": "#D55E00",
          "reference": "#777777", "up": "#0072B2", "down": "#D55E00", "flat": "#999999"}


@dataclass(frozen=True)
class Point:
    """One classifier's macro AUROC at supplementation ``k`` (SD None: no bootstrap)."""

    k: float
    auroc: float
    sd: float | None


@dataclass(frozen=True)
class Series:
    """A curve of one panel: its legend label, colour, marker and points (sorted by k)."""

    label: str
    color: str
    points: Sequence[Point]
    marker: str = "o"
    linestyle: str = "-"


@dataclass(frozen=True)
class Line:
    """A horizontal reference line (a baseline's AUROC), with its SD drawn as a band."""

    label: str
    color: str
    value: float
    sd: float | None = None
    linestyle: str = "-"


@dataclass(frozen=True)
class Panel:
    """One panel of a curve figure: a title, its curves and reference lines."""

    title: str
    series: Sequence[Series]
    lines: Sequence[Line] = ()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes (no software string: the same figure gives the same bytes); closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def percent(k: float) -> str:
    """``k`` replicas as the paper's supplementation percentage: 2 -> ``200%``."""
    return f"{k * 100:g}%"


def curves(panels: Sequence[Panel], xlabel: str, ylabel: str = "macro AUROC", dpi: int = DPI) -> bytes:
    """Figure 3/4 style: one panel per test set, macro AUROC (±SD error bars) against k.

    Every panel gets its own y range (the test sets differ in level), padded so error bars
    and the baseline band stay inside; x ticks are the k values that exist, labelled as
    percentages. A panel with nothing to draw says so instead of staying blank.
    """
    plt = _plt()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.3 * n, 4.3), dpi=dpi, squeeze=False, layout="constrained")
    handles = {}
    for ax, panel in zip(axes[0], panels):
        ks: set[float] = set()
        lows, highs = [], []
        for line in panel.lines:
            sd = line.sd or 0.0
            h = ax.axhline(line.value, color=line.color, linestyle=line.linestyle, linewidth=1.4, zorder=1)
            if line.sd:
                ax.axhspan(line.value - sd, line.value + sd, color=line.color, alpha=0.10, linewidth=0, zorder=0)
            lows.append(line.value - sd)
            highs.append(line.value + sd)
            handles.setdefault(line.label, h)
        drawn = [s for s in panel.series if s.points]
        for i, s in enumerate(drawn):
            dodge = (i - (len(drawn) - 1) / 2) * 5.0  # in % of k: curves at the same k keep their error bars apart
            x = np.array([p.k for p in s.points], dtype=float)
            y = np.array([p.auroc for p in s.points], dtype=float)
            err = np.array([p.sd if p.sd is not None else 0.0 for p in s.points], dtype=float)
            h = ax.errorbar(x * 100 + dodge, y, yerr=err, color=s.color, marker=s.marker, linestyle=s.linestyle, linewidth=1.6,
                            markersize=5, capsize=3, elinewidth=1, zorder=3)
            handles.setdefault(s.label, h)
            ks.update(x.tolist())
            lows.append(float(np.min(y - err)))
            highs.append(float(np.max(y + err)))
        ax.set_title(panel.title)
        ax.grid(True, axis="y", alpha=0.3)
        if not ks and not panel.lines:
            ax.text(0.5, 0.5, "no classifiers evaluated\non this test set yet", ha="center", va="center",
                    transform=ax.transAxes, color="#666666")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if ks:
            ticks = sorted(ks)
            step = max(1, int(np.ceil(len(ticks) / 8)))  # at most ~8 labels: 0%..1000% stays readable
            ax.set_xticks([t * 100 for t in ticks[::step]], [percent(t) for t in ticks[::step]])
            ax.set_xlim(min(ticks) * 100 - 40, max(ticks) * 100 + 40)
        lo, hi = min(lows), max(highs)
        pad = max(0.1 * (hi - lo), 0.005)
        ax.set_ylim(lo - pad, hi + pad)
    axes[0][0].set_ylabel(ylabel)
    fig.supxlabel(xlabel, fontsize=10)  # once for all panels: a long label per panel would run into the next one
    labels = list(handles)
    if handles:
        fig.legend([handles[k] for k in labels], labels, loc="outside upper center", ncol=min(4, len(labels)), frameon=False)
    return png(fig)


def finding_bars(findings: Sequence[str], panels: Sequence[tuple[str, Sequence[dict]]], xlabel: str,
                 zero: float = 0.0, dpi: int = DPI, marks: Sequence[str] = (), significance: bool = True) -> bytes:
    """Horizontal bars per finding (one panel per test set), for per-finding differences or AUROCs.

    Args:
        findings: Row labels, top to bottom.
        panels: ``(title, bars)`` with one bar dict per finding: ``value`` (None: not defined),
            optional ``ci`` ``[lo, hi]`` drawn as a whisker, ``sd`` drawn as a whisker when no
            ``ci``, ``significant`` (solid bar and a ``*``; other bars are pale), ``reference``
            (a black tick, e.g. the real baseline's AUROC beside a synthetic-only one).
        xlabel: Axis label.
        zero: Where bars start (0 for differences, 0.5 = chance for AUROCs).
        marks: Findings to flag in the row labels (e.g. low prevalence), drawn in bold.
        significance: Whether bars carry significance (False: every bar solid).
    """
    plt = _plt()
    n = max(1, len(panels))
    height = 0.32 * len(findings) + 1.4
    fig, axes = plt.subplots(1, n, figsize=(4.3 * n + 1.6, height), dpi=dpi, squeeze=False, sharey=True,
                             layout="constrained")
    y = np.arange(len(findings))
    for i, (ax, (title, bars)) in enumerate(zip(axes[0], panels)):
        values = np.array([np.nan if b.get("value") is None else b["value"] for b in bars], dtype=float)
        colors = [COLORS["flat"] if np.isnan(v) else COLORS["up"] if v >= zero else COLORS["down"] for v in values]
        drawn = ax.barh(y, np.nan_to_num(values - zero), left=zero, color=colors, height=0.6, linewidth=0)
        for patch, b in zip(drawn, bars):
            patch.set_alpha(0.9 if b.get("significant") or not significance else 0.35)
        for j, b in enumerate(bars):
            if b.get("value") is None:
                ax.text(zero, j, "  n/a", va="center", ha="left", fontsize=8, color="#666666")
                continue
            ci = b.get("ci")
            if ci is None and b.get("sd") is not None:
                ci = [b["value"] - b["sd"], b["value"] + b["sd"]]
            if ci is not None:
                ax.plot(ci, [j, j], color="black", linewidth=1)
            if b.get("reference") is not None:
                ax.plot([b["reference"]] * 2, [j - 0.38, j + 0.38], color="black", linewidth=2.2)
            if b.get("significant"):
                right = max(b["value"], ci[1] if ci else b["value"])
                left = min(b["value"], ci[0] if ci else b["value"])
                x, ha = (right, "left") if b["value"] >= zero else (left, "right")
                ax.text(x, j, " *", va="center", ha=ha, fontsize=11, fontweight="bold")
        ax.axvline(zero, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
        ax.margins(x=0.15)
        if i == 0:
            ax.set_yticks(y, findings)
            for tick, name in zip(ax.get_yticklabels(), findings):
                if name in marks:
                    tick.set_fontweight("bold")
        if i == 0:
            ax.invert_yaxis()  # the first finding on top (the axes share y)
    return png(fig)


def heatmaps(matrices: Sequence[tuple[str, np.ndarray]], names: Sequence[str], dpi: int = DPI) -> bytes:
    """Co-occurrence matrices side by side on one colour scale (share of images positive for both)."""
    plt = _plt()
    n = max(1, len(matrices))
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n + 1.2, 5.0), dpi=dpi, squeeze=False, layout="constrained")
    vmax = max([float(np.max(m)) for _, m in matrices] + [1e-9])
    image = None
    for i, (ax, (title, m)) in enumerate(zip(axes[0], matrices)):
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_yticks(range(len(names)), names if i == 0 else [""] * len(names), fontsize=8)
        ax.set_title(title)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of images positive for both")
    return png(fig)
