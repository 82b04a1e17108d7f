"""The study report: one self-contained HTML page of every experiment family's results.

:func:`build_report` reads what the study's stages wrote under the project root and writes
``out/index.html``: figures as embedded PNG data URIs, CSS inline, no script, so the page
opens from disk with no server. It shows what exists and says what is missing (a family
turned off, a k removed, a stage not run yet); it never fails because a result is absent.

Inputs (relative to the root):

* ``metrics/study/<cell>.json``: one per classifier ("cell"): its family, training set,
  classifier ids and its evaluations (``"<dataset>:<split>"`` test sets and ``"tune"``,
  its own tuning split), each with the macro and per-finding AUROC, bootstrap SD and 95% CI;
* ``metrics/compare/<family>.json`` (:mod:`cxrsynth.study.compare`; also read from
  ``metrics/study/compare_<family>.json``): :func:`cxrsynth.evaluate.compare.compare` of the
  family's cells against its baseline, per test set (the paired bootstrap after Bonferroni
  marks significant changes);
* ``metrics/cooccurrence/``: :func:`cxrsynth.evaluate.cooccurrence.cooccurrence` output;
* ``metrics/distance/<replica>.json`` (:mod:`cxrsynth.study.distance`; also read from
  ``metrics/study/fid_<replica>.json``): Fréchet distance of each synthetic replica;
* ``metrics/memorisation/``: the memorisation audit's positive control
  (:mod:`cxrsynth.share.control`: ``memorisation.json`` and each audit's ``distances.png``
  and ``pairs.png``), absent in older projects;
* the manifests and shards (data versions, generator id, the real-vs-synthetic image grid).

Experiment families and their cells (:mod:`cxrsynth.study.plan`; k = synthetic replicas of
the training set, k x 100%):
``supplement_k<k>`` (cxp real + k replicas; k = 0 is the real-only baseline),
``synthetic_k<k>`` (k replicas alone), ``external_k<k>`` (mimic real + k cxp replicas),
``cfg_<replica>_<real|synthetic>`` and ``cfg_real_<replica>`` (the paper's Table 2: which
of the training and tuning sets is synthetic) and ``rebalance_targeted`` (replicas drawn so
rare findings are more frequent) against ``supplement_k<k>`` of the same size.

:func:`write_plot_data` writes the figure data for ``dvc plots``; :func:`summary` returns the
plain-language sentences (also printed by the pipeline).

The parameters are a :class:`~cxrsynth.study.params.StudyParams` (a params.yaml mapping is
parsed and checked first). The package reads in four modules, each using the ones before it:

* :mod:`~cxrsynth.study.report.load` — reading the study into a :class:`Study`, and the
  numbers derived from it;
* :mod:`~cxrsynth.study.report.prose` — the sentences, the glossary and the captions;
* :mod:`~cxrsynth.study.report.plots` — the data of Figures 3 and 4 and the ``dvc plots`` files;
* :mod:`~cxrsynth.study.report.html` — tables, CSS, figures and image grids: the page.

Beside them, :mod:`~cxrsynth.study.report.dvc_page` writes the page ``dvc plots show`` fills
(vega inlined, so the ``dvc plots`` files draw offline).
"""

from pathlib import Path

from cxrsynth import labels
from cxrsynth.study.params import StudyParams
from cxrsynth.study.report.html import FINDING_NAME, build_report, cell_label, esc, render
from cxrsynth.study.report.load import Study, load
from cxrsynth.study.report.plots import curve_panels, plot_points, write_plot_data
from cxrsynth.study.report.prose import summary

__all__ = ["FINDING_NAME", "Study", "build_report", "cell_label", "curve_panels", "esc", "labels", "load", "plot_points",
           "render", "summary", "write_plot_data", "write_report"]


def write_report(root: str | Path, params: StudyParams, out: str | Path) -> Path:
    """Everything ``cxrsynth study report`` writes: the ``dvc plots`` data (:func:`write_plot_data`),
    the headline metrics (:func:`cxrsynth.study.summary.write_headline`) and ``out/index.html``
    (:func:`build_report`); returns the page's path."""
    from cxrsynth.study.summary import write_headline

    write_plot_data(root, params)
    write_headline(root, params)
    return build_report(root, params, out)
