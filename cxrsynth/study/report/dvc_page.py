"""The HTML page template for ``dvc plots show`` with Vega inlined, so the plots draw offline.

DVC's own page (dvc_render's ``PAGE_HTML``) fills its ``{scripts}`` placeholder with three
``<script src="https://cdn.jsdelivr.net/...">`` tags (vega, vega-lite, vega-embed): without
network the page is blank. DVC takes another page (``dvc plots show --html-template PATH``,
or ``plots.html_template`` in ``.dvc/config``, relative to ``.dvc/``); a template needs only
``{plot_divs}``, where DVC puts one ``<div>`` per plot, each an inline script calling
``vegaEmbed``. The page :func:`page_template` writes has no ``{scripts}`` (so no CDN tag) and
inlines, in ``<head>`` before those divs run, the JavaScript bundle of ``vl-convert-python``
(:func:`vl_convert.javascript_bundle`: vega, vega-lite and vega-embed with their dependencies,
one classic script that sets ``window.vegaEmbed``; about 0.9 MB).

The page is generated, not committed (``make install`` writes ``.dvc/plots-template.html``,
ignored by git; ``cxrsynth study plots-template`` writes it again) and named in
``.dvc/config.local`` (per machine, ignored by git) when written there: a fresh clone without it
keeps DVC's own page rather than a setting that points at a missing file (DVC then fails with
"HTML template has to contain '{plot_divs}'"). The same vl-convert version writes the same bytes. Vega-Lite is pinned to :data:`VEGA_LITE`, the v5 line the plot
templates' ``$schema`` (DVC's and ``.dvc/plots/test_sets.json``) names.
"""

from __future__ import annotations

from pathlib import Path

from cxrsynth.errors import CxrsynthError

#: Where the page goes, relative to the project root (named in ``.dvc/config.local``: ``plots.html_template``).
PAGE_TEMPLATE = Path(".dvc/plots-template.html")

#: The Vega-Lite version bundled: the newest 5.x vl-convert ships (the specs say ``v5.json``).
VEGA_LITE = "5.21"

#: What dvc_render's page has and this one keeps: the refresh tag (``--refresh``) and the table style.
_PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- vega {vega}, vega-lite {vega_lite}, vega-embed {embed}: inlined from vl-convert-python {vlc}, no network -->
    <script type="text/javascript">
(function () {{
{bundle}
}})();
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def page_template() -> str:
    """The page: dvc_render's placeholders ``{plot_divs}`` and ``{refresh_tag}`` and the inlined bundle.

    The bundle runs inside a function so its top-level names (``const`` and ``let`` in a classic
    script share one global scope) cannot clash with the ``var spec`` of DVC's plot divs."""
    try:
        import vl_convert
    except ImportError as e:
        raise CxrsynthError("the offline plots page needs vl-convert-python (the 'plots' extra): "
                            "pip install 'cxrsynth[plots]' (make install does)") from e
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
        if placeholder in bundle:  # dvc_render str.replace()s its placeholders over the whole page
            raise CxrsynthError(f"vl-convert {vl_convert.__version__}'s bundle contains {placeholder!r}: "
                                "it cannot be inlined into DVC's page as is")
    return _PAGE.format(vega=vl_convert.get_vega_version(), vega_lite=VEGA_LITE, embed=vl_convert.get_vega_embed_version(),
                        vlc=vl_convert.__version__, bundle=bundle)


def write_page_template(root: str | Path = ".", out: str | Path | None = None) -> Path:
    """Write :func:`page_template` to ``out`` (default ``root/.dvc/plots-template.html``); return its path.

    At the default place in a DVC project, also set ``plots.html_template`` in ``.dvc/config.local``
    (:func:`use_page_template`), so a plain ``dvc plots show`` uses it."""
    path = Path(out) if out is not None else Path(root) / PAGE_TEMPLATE
    dvc_project = (Path(root) / ".dvc").is_dir()  # before the page makes .dvc/
    text = page_template()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if out is None and dvc_project:
        use_page_template(root)
    return path


def use_page_template(root: str | Path = ".") -> None:
    """Name :data:`PAGE_TEMPLATE` as ``plots.html_template`` in ``root/.dvc/config.local`` (DVC's own
    config API, so the file's other settings stay; the path is relative to ``.dvc/``, as DVC reads it)."""
    from dvc.config import Config

    with Config(dvc_dir=str(Path(root) / ".dvc")).edit("local") as conf:
        conf["plots"]["html_template"] = PAGE_TEMPLATE.name
