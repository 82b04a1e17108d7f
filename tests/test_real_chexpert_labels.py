"""The real CheXpert train.csv (223,414 rows, labels only) through the labels-only path.

The file ships inside the torchxrayvision wheel; it is test data, fetched from PyPI into
``.cache/`` by ``make test`` (or by this fixture) and never a runtime dependency.
"""

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from cxrsynth import ingest, labels, manifest, splits
from cxrsynth.sources import chexpert
from cxrsynth.stats import dataset_stats

pytestmark = pytest.mark.slow  # 223,414 rows: ~8-16 s

CACHE = Path(__file__).resolve().parents[1] / ".cache"
CSV = CACHE / "chexpert_train.csv.gz"


@pytest.fixture(scope="module")
def chexpert_csv() -> Path:
    if not CSV.is_file():
        CACHE.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "torchxrayvision==1.5.7", "-d", str(CACHE)], check=True)
        wheel = next(CACHE.glob("torchxrayvision-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            CSV.write_bytes(z.read("torchxrayvision/data/chexpert_train.csv.gz"))
    return CSV


def test_full_chexpert_labels_only_is_fast_and_exact(chexpert_csv, tmp_path):
    start = time.perf_counter()
    result = ingest.ingest(chexpert.read(chexpert_csv), root=tmp_path, name="cxp", kind="chexpert", inputs={}, labels_only=True)
    seconds = time.perf_counter() - start
    assert result.rows_in == 223_414 and result.kept == 223_414 and result.rejected == {}
    assert seconds < 60, f"labels-only ingest took {seconds:.1f}s"

    raw = pd.read_csv(chexpert_csv, dtype=str, keep_default_na=False)
    stats = dataset_stats(tmp_path, "cxp")
    patients = raw["Path"].str.extract(r"(patient\d+)")[0]
    assert stats["images"] == len(raw) and stats["patients"] == patients.nunique() == 64_540
    assert stats["female_patients"] == patients[raw["Sex"] == "Female"].nunique()
    for finding in labels.FINDINGS:
        assert stats["labels"][labels.FINDING_COLUMNS[labels.FINDINGS.index(finding)]] == {"pos": int((raw[finding] == "1.0").sum()), "unc": int((raw[finding] == "-1.0").sum())}, finding
    ages = pd.to_numeric(raw["Age"]).where(lambda a: a > 0).dropna()
    assert stats["age_iqr"] == [ages.quantile(0.25), ages.quantile(0.75)]

    counts = splits.split(tmp_path, "cxp", splits.SplitParams(tune=0.1, test=0.2, view="AP", seed=0))
    frame = manifest.read(tmp_path, "cxp")
    splits.check_disjoint(frame)
    assert counts["none"] == int((frame["view"] != "AP").sum())
