import numpy as np
import pandas as pd

from cxrsynth import labels


def test_findings_in_chexpert_order_and_snake_columns():
    assert labels.FINDINGS[0] == "No Finding" and labels.FINDINGS[-1] == "Support Devices"
    assert len(labels.FINDINGS) == 14
    assert labels.COLUMN_OF["Pleural Effusion"] == "pleural_effusion"
    assert labels.COLUMN_OF["Enlarged Cardiomediastinum"] == "enlarged_cardiomediastinum"


def test_encode_findings_maps_chexpert_values_and_blank_to_negative():
    raw = pd.Series(["1.0", "0.0", "-1.0", "", None, "1", "-1", " 0.0 "])
    codes, bad = labels.encode_findings(raw)
    assert codes.dtype == np.int8
    assert codes.tolist() == [1, 0, -1, 0, 0, 1, -1, 0]
    assert not bad.any()


def test_encode_findings_flags_out_of_domain_values():
    codes, bad = labels.encode_findings(pd.Series(["2.0", "yes", "1.0", "0.5"]))
    assert bad.tolist() == [True, True, False, True]
    assert codes[2] == 1


def test_numeric_input_is_accepted():
    codes, bad = labels.encode_findings(pd.Series([1.0, np.nan, -1.0, 0.0]))
    assert codes.tolist() == [1, 0, -1, 0] and not bad.any()


def test_demographic_normalisation():
    sex = labels.normalize_sex(pd.Series(["Female", "male", "Unknown", None, "X"]))
    assert sex.values.tolist()[:2] == ["F", "M"] and sex.values.iloc[2:].isna().all()
    assert sex.bad.tolist() == [False, False, False, False, True] and sex.changed == {"sex Unknown -> unknown": 1}
    age = labels.normalize_age(pd.Series(["68", "0", "", "abc", "90", "-5", "300", "45.5"]))
    assert age.values.iloc[0] == 68 and age.values.iloc[4] == 90 and age.values.iloc[7] == 45.5
    assert age.values.iloc[1:4].isna().all() and age.values.iloc[5:7].isna().all()
    assert age.bad.tolist() == [False, False, False, True, False, True, True, False]
    assert age.changed == {"age 0 -> unknown": 1}
    race = labels.normalize_race(pd.Series(["White, non-Hispanic", "Black or African American", "African American or Black",
                                            "Asian, Hispanic", "Native Hawaiian or Other Pacific Islander",
                                            "American Indian or Alaska Native", "Other", "Unknown", "Caucasian or White"]))
    values = race.values
    r = labels.RACES
    assert values.tolist()[:6] == [r[2], r[1], r[1], r[4], r[3], r[0]]
    assert values.iloc[6:8].isna().all() and values.iloc[8] == labels.RACES[2]
    assert not race.bad.any() and race.changed == {"race outside the 5 categories -> unknown": 2}
    split = labels.normalize_split(pd.Series(["train", "Training", "validate", "TEST", None, "banana"]))
    assert split.values.tolist()[:4] == ["train", "train", "tune", "test"] and split.values.iloc[4:].isna().all()
    assert split.bad.tolist() == [False] * 5 + [True]
    assert split.changed == {"split training -> train": 1, "split validate -> tune": 1}


def test_conditioning_vector_layout():
    frame = pd.DataFrame({"age": [68.0, None], "sex": ["F", None], "race": [labels.RACES[1], None],
                          **{c: [1 if c == "edema" else 0, 0] for c in labels.FINDING_COLUMNS}})
    vec = labels.conditioning_vectors(frame)
    assert vec.shape == (2, 22) and labels.CONDITION_SIZE == 22
    assert vec[0, 0] == 6  # age decade
    assert vec[0, 1:3].tolist() == [1, 0]  # F
    assert vec[0, 3:8].tolist() == [0, 1, 0, 0, 0]  # Black
    assert vec[0, 8 + labels.FINDING_COLUMNS.index("edema")] == 1 and vec[0, 8:].sum() == 1
    assert not vec[1].any()  # unknowns are zeros


def test_has_uncertain():
    frame = pd.DataFrame({c: [0, -1 if c == "fracture" else 1] for c in labels.FINDING_COLUMNS})
    assert labels.has_uncertain(frame).tolist() == [False, True]
