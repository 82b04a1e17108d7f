"""The command line through typer's CliRunner, as a user would drive it."""

import json
import subprocess
import sys

import pandas as pd
from conftest import chexpert_rows, write_chexpert
from typer.testing import CliRunner

import cxrsynth
from cxrsynth.cli import app

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def test_help_is_instant_no_heavy_imports():
    code = "import sys, cxrsynth.cli; print(','.join(m for m in ('torch','pandas','duckdb','diffusers','pyarrow','numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
    for args in (["--help"], ["ingest", "--help"], ["ingest", "chexpert", "--help"], ["generate", "--help"], ["bench", "--help"]):
        assert cli(*args).exit_code == 0


def test_ingest_stats_split_query_verify(chexpert_tree, tmp_path):
    root = tmp_path / "proj"
    r = cli("ingest", "chexpert", chexpert_tree, "--name", "cxp", "--size", 32, "--shard-size", 3, "--workers", 1, "--root", root)
    assert r.exit_code == 0, r.output
    assert "kept" in r.output and "8" in r.output
    r = cli("stats", "cxp", "--json", "--root", root)
    stats = json.loads(r.output)
    assert set(stats) == {"images", "patients", "female_patients", "age_iqr", "labels", "dataset", "version", "split",
                          "cxrsynth"}
    assert stats["dataset"] == "cxp" and stats["version"] and stats["cxrsynth"] == cxrsynth.__version__
    assert (stats["images"], stats["patients"], stats["female_patients"]) == (8, 4, 2)
    r = cli("stats", "cxp", "--root", root)
    assert "Number of patients" in r.output and "Pleural Effusion" in r.output
    assert cli("split", "cxp", "--tune", 0.25, "--test", 0.25, "--seed", 3, "--root", root).exit_code == 0
    r = cli("query", "SELECT split, count(DISTINCT patient_id) AS p FROM images GROUP BY split ORDER BY split", "--format", "csv", "--root", root)
    assert r.output.splitlines() == ["split,p", "test,1", "train,2", "tune,1"]
    out = tmp_path / "q.json"
    cli("query", "SELECT key FROM cxp ORDER BY key LIMIT 2", "--format", "json", "--out", out, "--root", root)
    assert [json.loads(l)["key"] for l in out.read_text().splitlines()] == ["train_patient00001_study1_view1_frontal", "train_patient00001_study2_view1_frontal"]
    r = cli("verify", "cxp", "--root", root)
    assert r.exit_code == 0 and "3 shard(s)" in r.output
    r = cli("sheet", "cxp", "--out", tmp_path / "sheet.png", "--n", 4, "--where", "sex = 'F'", "--root", root)
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as im:
        assert r.exit_code == 0 and im.size[0] == 6 * 200 and im.mode == "L"
    r = cli("sheet", "cxp", "--out", tmp_path / "x.png", "--where", "no_such_column = 1", "--root", root)
    assert r.exit_code == 2 and "no_such_column" in r.output
    shard = next((root / "data/shards/cxp").rglob("cxp-000000.tar"))
    shard.write_bytes(shard.read_bytes()[:-1024])
    r = cli("verify", "cxp", "--root", root)
    assert r.exit_code == 1 and "cxp-000000.tar" in r.output


def test_errors_are_short_and_named(tmp_path):
    csv = write_chexpert(tmp_path / "raw", chexpert_rows(1, 1), images=False)
    pd.read_csv(csv).drop(columns=["Pneumothorax"]).to_csv(csv, index=False)
    r = cli("ingest", "chexpert", csv, "--name", "cxp", "--root", tmp_path)
    assert r.exit_code == 2 and "Pneumothorax" in r.output and "Traceback" not in r.output
    r = cli("stats", "nope", "--root", tmp_path)
    assert r.exit_code == 2 and "no manifest named 'nope'" in r.output
    r = cli("ingest", "chexpert", csv, "--name", "bad-name", "--root", tmp_path)
    assert r.exit_code == 2 and "bad-name" in r.output
    r = cli("query", "SELECT * FROM nowhere", "--root", tmp_path)
    assert r.exit_code == 2 and "nowhere" in r.output


def test_views_sql_for_the_duckdb_cli(chexpert_tree, tmp_path, monkeypatch):
    import duckdb

    root = tmp_path / "proj"
    cli("ingest", "chexpert", chexpert_tree, "--name", "cxp", "--labels-only", "--root", root)
    sql = cli("query", "--views", "--root", root).output
    assert str((root / "manifests" / "cxp.parquet").resolve()) in sql  # absolute: works from any folder
    monkeypatch.chdir(tmp_path)
    con = duckdb.connect()
    con.execute(sql)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 8
    relative = cli("query", "--views", "--relative", "--root", root).output
    assert "'manifests/cxp.parquet'" in relative and str(tmp_path) not in relative  # for a DuckDB CLI started in root
    monkeypatch.chdir(root)
    con = duckdb.connect()
    con.execute(relative)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 8


def test_version_prints_the_package_version():
    from cxrsynth import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"cxrsynth {__version__}"
