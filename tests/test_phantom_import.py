"""Each phantom site's native format read back, unchanged, by the matching importer."""

import numpy as np
import pandas as pd
import pytest

from cxrsynth import ingest, labels
from cxrsynth.imaging import Preprocess
from cxrsynth.phantom import SITES, sample_site, write_site
from cxrsynth.sources import chexpert, mimic, table

EMORY_MAP = ["ImagePath=path", "AnonPatientID=patient_id", "AnonAccession=study_id", "PatientSex=sex",
             "AgeAtExam=age", "Race=race", "ViewPosition=view"]


def read_site(site, raw):
    if site == "cxp":
        demo = raw / "CHEXPERT DEMO.csv"
        return [chexpert.read(raw / f"CheXpert-v1.0/{f}.csv", demographics=demo) for f in ("train", "valid")]
    if site == "mimic":
        return [mimic.read(raw / "mimic-cxr-2.0.0-metadata.csv.gz", raw / "mimic-cxr-2.0.0-chexpert.csv.gz",
                           raw / "mimic-cxr-2.0.0-split.csv.gz", raw / "patients.csv.gz")]
    return [table.read(raw / "emory.csv", EMORY_MAP)]


@pytest.mark.parametrize("site", sorted(SITES))
def test_site_is_read_back_by_its_importer(site, tmp_path):
    n = 40
    write_site(site, n, tmp_path / "raw", seed=3)
    truth = sample_site(site, n, seed=3).cohort.frame
    sources = read_site(site, tmp_path / "raw")
    records = pd.concat([s.records for s in sources], ignore_index=True)
    assert sum(s.rows_in for s in sources) == len(records) == n and all(len(s.rejects) == 0 for s in sources)
    # the labels survive the trip through each format and the label contract
    got = labels.findings_matrix(records)
    want = truth.loc[:, list(labels.FINDING_COLUMNS)].to_numpy(dtype=np.int8)
    assert (got == labels.POSITIVE).sum(0).tolist() == (want == labels.POSITIVE).sum(0).tolist()
    assert (got == labels.UNCERTAIN).sum(0).tolist() == (want == labels.UNCERTAIN).sum(0).tolist()
    assert records["sex"].value_counts().to_dict() == truth["sex"].value_counts().to_dict()
    assert records["view"].value_counts().to_dict() == truth["view"].value_counts().to_dict()
    assert records["patient_id"].nunique() == truth["patient"].nunique()
    if site != "mimic":  # MIMIC's tables carry no race
        want_race = labels.normalize_race(truth["race"].astype("string")).values
        assert records["race"].value_counts().to_dict() == want_race.value_counts().to_dict()
        assert records["race"].notna().any()
    else:
        assert set(records["split"]) <= {"train", "tune", "test"} and records["split"].notna().all()
    # and the images decode through the one writer
    result = ingest.ingest(sources[0], root=tmp_path / "proj", name=site, kind=site, inputs={},
                           params=Preprocess(size=32), workers=1)
    assert result.rejected == {} and result.kept == sources[0].rows_in
