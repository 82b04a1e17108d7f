"""``cxrsynth study report`` is one library call (cxrsynth.study.report.write_report) and a print."""

import json

import yaml
from typer.testing import CliRunner

from cxrsynth.cli import app
from cxrsynth.study.params import StudyParams
from cxrsynth.study.report import write_report
from cxrsynth.study.report.plots import PLOTS_DIR
from cxrsynth.study.summary import HEADLINE

PARAMS = {"study": {"real": "cxp", "tests": ["cxp"]}, "replicas": {"w1": {"guidance": 1.0, "replicas": 1}},
          "supplement": {"k": [0, 1], "replica": "w1"}}


def test_study_report_writes_plots_headline_and_page_and_the_cli_prints_them(tmp_path):
    lib, cli = tmp_path / "lib", tmp_path / "cli"
    for root in (lib, cli):
        (root / "metrics" / "study").mkdir(parents=True)
        (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    page = write_report(lib, StudyParams.from_dict(PARAMS), lib / "report")
    assert page == lib / "report" / "index.html" and "<code>supplement_k1</code>" in page.read_text()
    assert (lib / PLOTS_DIR / "supplement.json").read_text() == "[]\n"
    assert isinstance(json.loads((lib / HEADLINE).read_text()), dict)

    result = CliRunner().invoke(app, ["study", "report", "--root", str(cli)])
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())
    assert "Study:macroAUROC" in flat and flat.endswith(f"wrote{cli / 'report' / 'index.html'}")
    assert (cli / "report" / "index.html").is_file()
    for name in (PLOTS_DIR / "supplement.json", PLOTS_DIR / "external.json", HEADLINE):
        assert (cli / name).read_bytes() == (lib / name).read_bytes(), name
