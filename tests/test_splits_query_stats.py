
import pandas as pd
import pytest
from conftest import chexpert_rows, ingest_site

from cxrsynth import labels, manifest, splits
from cxrsynth.stats import cohort_stats


def labels_only(tmp_path, n_patients=60, studies=3, name="cxp"):
    return ingest_site(tmp_path, chexpert_rows(n_patients, studies), name=name, images=False, labels_only=True)


def test_split_is_patient_disjoint_deterministic_and_sized(tmp_path):
    root = labels_only(tmp_path)
    counts = splits.split(root, "cxp", splits.SplitParams(tune=0.1, test=0.2, seed=7))
    frame = manifest.read(root, "cxp")
    splits.check_disjoint(frame)
    per_patient = frame.groupby("patient_id")["split"].nunique()
    assert per_patient.max() == 1
    patients = frame.drop_duplicates("patient_id")["split"].value_counts().to_dict()
    assert patients == {"train": 42, "test": 12, "tune": 6}
    assert counts == {"train": 126, "tune": 18, "test": 36, "none": 0}
    again = splits.assign(frame.sample(frac=1, random_state=3), splits.SplitParams(tune=0.1, test=0.2, seed=7))
    assert again.sort_index().tolist() == frame["split"].tolist()  # row order does not matter
    other = splits.assign(frame, splits.SplitParams(tune=0.1, test=0.2, seed=8))
    assert other.tolist() != frame["split"].tolist()
    assert manifest.read_meta(root, "cxp")["split"] == {"tune": 0.1, "test": 0.2, "view": None, "seed": 7}


def test_split_view_filter_leaves_other_views_unsplit(tmp_path):
    root = labels_only(tmp_path)
    splits.split(root, "cxp", splits.SplitParams(tune=0.2, view="ap", seed=0))
    frame = manifest.read(root, "cxp")
    assert frame.loc[frame["view"] == "PA", "split"].isna().all()
    assert frame.loc[frame["view"] == "AP", "split"].notna().all()


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="--tune"):
        splits.SplitParams(tune=0.6, test=0.5)


def test_check_disjoint_catches_leaks():
    frame = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "test", "train"]})
    with pytest.raises(AssertionError, match="a"):
        splits.check_disjoint(frame)


def test_query_sees_a_view_per_dataset_and_the_union(tmp_path):
    root = labels_only(tmp_path, 5, 2, name="cxp")
    labels_only(tmp_path / "other", 3, 1, name="mimic")
    (root / "manifests").joinpath("mimic.parquet").write_bytes((tmp_path / "other/proj/manifests/mimic.parquet").read_bytes())
    out = manifest.query(root, "SELECT dataset, count(*) AS n FROM images GROUP BY dataset ORDER BY dataset")
    assert out.to_dict("list") == {"dataset": ["cxp", "mimic"], "n": [10, 3]}
    assert manifest.query(root, "SELECT count(*) AS n FROM cxp WHERE edema = 1")["n"].iloc[0] == int(
        (manifest.read(root, "cxp")["edema"] == 1).sum())


def test_cohort_stats_table1_fields():
    frame = pd.DataFrame({
        "patient_id": ["p1", "p1", "p2", "p3"], "sex": ["F", "F", "M", "F"], "age": [20.0, 30.0, 40.0, None],
        **{c: [0, 0, 0, 0] for c in labels.FINDING_COLUMNS},
    })
    frame["edema"] = [1, -1, 1, 0]
    s = cohort_stats(frame)
    assert (s["images"], s["patients"], s["female_patients"]) == (4, 3, 2)
    assert s["age_iqr"] == [25.0, 35.0]
    assert s["labels"]["edema"] == {"pos": 2, "unc": 1} and s["labels"]["fracture"] == {"pos": 0, "unc": 0}
    assert list(s["labels"]) == list(labels.FINDING_COLUMNS)  # the manifest's columns, as every other output
