"""The study's cells, as params.yaml defines them."""

from pathlib import Path

import pytest
import yaml

from cxrsynth.errors import CxrsynthError, UnknownNameError
from cxrsynth.study import plan

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def test_every_family_has_its_cells_with_the_paper_definitions():
    names = {f: [c.name for c in plan.family_cells(PARAMS, f)] for f in plan.FAMILIES}
    assert names["supplement"] == [f"supplement_k{k}" for k in PARAMS["supplement"]["k"]]
    assert names["synthetic"] == [f"synthetic_k{k}" for k in PARAMS["synthetic"]["k"]]
    assert names["external"] == [f"external_k{k}" for k in PARAMS["external"]["k"]]
    reps = PARAMS["cfg"]["replicas"]
    assert sorted(names["cfg"]) == sorted([f"cfg_{r}_{t}" for r in reps for t in ("real", "synthetic")]
                                          + [f"cfg_real_{r}" for r in reps])
    assert names["rebalance"] == ["rebalance_targeted"]


def test_mixes_follow_the_experiments():
    s2 = plan.cell(PARAMS, "supplement", "k2").mix
    assert (s2.real, s2.synthetic, s2.only_synthetic, s2.synthetic_tune) == ("cxp", 2.0, False, False)
    assert s2.synthetic_from == "cxp_" + PARAMS["supplement"]["replica"]
    assert plan.cell(PARAMS, "supplement", "k0").mix.synthetic_from is None  # the real-only baseline
    only = plan.cell(PARAMS, "synthetic", "k1").mix
    assert only.only_synthetic and only.synthetic == 1.0 and not only.synthetic_tune
    ext = plan.cell(PARAMS, "external", "k1").mix
    assert ext.real == PARAMS["external"]["real"] and ext.synthetic_from.startswith("cxp_")
    cfg = plan.cell(PARAMS, "cfg", "w5-synthetic")
    assert cfg.mix.only_synthetic and cfg.mix.synthetic_tune and cfg.guidance == 5.0 and cfg.tune == "synthetic"
    real_tuned = plan.cell(PARAMS, "cfg", "real-w5")
    assert not real_tuned.mix.only_synthetic and real_tuned.mix.synthetic == 0 and real_tuned.mix.synthetic_tune
    reb = plan.cell(PARAMS, "rebalance", "targeted")
    assert reb.mix.synthetic_from == "cxp_rebalanced" and reb.k == PARAMS["rebalance"]["k"]


def test_baselines():
    assert plan.baseline(PARAMS, "supplement").name == "supplement_k0"
    assert plan.baseline(PARAMS, "synthetic").name == "supplement_k0"
    assert plan.baseline(PARAMS, "external").name == "external_k0"
    assert plan.baseline(PARAMS, "rebalance").name == f"supplement_k{PARAMS['rebalance']['k']}"  # plain, same size


@pytest.mark.parametrize("family, tag, error", [
    ("supplement", "two", CxrsynthError), ("cfg", "w5", CxrsynthError), ("cfg", "nope-real", UnknownNameError),
    ("synthetic", "k0", CxrsynthError), ("bogus", "k1", UnknownNameError), ("rebalance", "k1", CxrsynthError),
])
def test_bad_cells_are_refused(family, tag, error):
    with pytest.raises(error):
        plan.cell(PARAMS, family, tag)


def test_dvc_yaml_runs_every_cell_of_params():
    """Each cell of every family is one stage of dvc.yaml (foreach/matrix over params), and no other."""
    dvc = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    for family in ("supplement", "synthetic", "external"):
        assert dvc[family]["foreach"] == f"${{{family}.k}}"
        assert dvc[family]["do"]["cmd"] == f"cxrsynth study cell {family} k${{item}}"
    assert dvc["cfg"]["matrix"] == {"replica": "${cfg.replicas}", "tune": ["real", "synthetic"]}
    assert dvc["cfg_real"]["foreach"] == "${cfg.replicas}" and dvc["replica"]["foreach"] == "${replicas}"
