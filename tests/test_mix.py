"""Mixing real and synthetic data is a manifest query (the paper's experiments 2-4)."""

import pytest
from conftest import chexpert_rows, ingest_site, micro_generator, replica
from typer.testing import CliRunner

from cxrsynth import labels, loader, manifest
from cxrsynth.cli import app
from cxrsynth.mix import MixError, MixParams, mix, parse_percent
from cxrsynth.verify import verify_dataset


def make_project(tmp, split: str, name: str, replicas: int):
    """cxp (20 images, 32 px, split) and ``replicas`` micro-generator replicas of its ``split`` rows as ``name``."""
    root = ingest_site(tmp, chexpert_rows(n_patients=10, studies=2, uncertain=False),
                       split={"tune": 0.2, "test": 0.2, "seed": 0})
    replica(root, micro_generator(tmp / "gen"), name, split=split, replicas=replicas, steps=1, shard_size=50)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("mix"), "train", "cxp_syn", replicas=3)


def test_parse_percent():
    assert parse_percent("500%") == 5.0 and parse_percent("250") == 2.5 and parse_percent(100) == 1.0
    with pytest.raises(MixError, match="percentage"):
        parse_percent("lots")


def test_supplementation_adds_whole_replicas_and_keeps_tune_test_real(project):
    real = manifest.read(project, "cxp")
    n_train = int((real["split"] == "train").sum())
    counts = mix(project, "sup200", MixParams(real="cxp", synthetic=2.0, seed=0))
    assert counts == {"train": 3 * n_train, "tune": int((real["split"] == "tune").sum()),
                      "test": int((real["split"] == "test").sum()), "synthetic": 2 * n_train}
    frame = manifest.read(project, "sup200")
    syn = frame.loc[frame["origin"] == "synthetic"]
    assert set(syn["replica"]) == {0, 1} and syn["split"].eq("train").all()
    assert frame.loc[frame["split"].isin(["tune", "test"]), "origin"].eq("real").all()
    # every synthetic row was made from a real *training* row: no tune/test conditions leak in
    train_keys = set(real.loc[real["split"] == "train", "key"])
    assert set(syn["source_key"]) == train_keys
    # the mix streams like any dataset, from the source datasets' shards
    generator = loader.LoaderConfig(batch_size=4, image_size=16, augment=None, order="buffer", cond=True, uint8=True)
    keys = [k for b in loader.ShardLoader(project, loader.select(project, "sup200", "train"), generator) for k in b["key"]]
    assert len(keys) == len(frame.loc[(frame["split"] == "train") & ~labels.has_uncertain(frame)]) // 4 * 4
    assert verify_dataset(project, "sup200")[0] == []


def test_fractional_and_only_synthetic(project):
    n_train = int((manifest.read(project, "cxp")["split"] == "train").sum())
    mix(project, "syn150", MixParams(real="cxp", synthetic=1.5, only_synthetic=True, seed=4))
    frame = manifest.read(project, "syn150")
    train = frame.loc[frame["split"] == "train"]
    assert train["origin"].eq("synthetic").all() and len(train) == n_train + round(0.5 * n_train)
    mix(project, "syn150b", MixParams(real="cxp", synthetic=1.5, only_synthetic=True, seed=4))
    assert manifest.read(project, "syn150b")["key"].tolist() == frame["key"].tolist()  # seeded
    with pytest.raises(MixError, match="needs 4 replica"):
        mix(project, "toomuch", MixParams(real="cxp", synthetic=3.5, seed=0))


def test_mixes_stay_out_of_the_union_view_and_cli(project):
    runner = CliRunner()
    r = runner.invoke(app, ["mix", "--real", "cxp", "--synthetic", "100%", "--seed", "0", "--name", "sup100", "--root", str(project)])
    assert r.exit_code == 0 and "synthetic" in r.output, r.output
    out = manifest.query(project, "SELECT count(*) AS n FROM images")["n"].iloc[0]
    direct = len(manifest.read(project, "cxp")) + len(manifest.read(project, "cxp_syn"))
    assert out == direct  # mixes are not counted twice
    assert manifest.query(project, "SELECT count(*) AS n FROM sup100")["n"].iloc[0] > 0
    r = runner.invoke(app, ["mix", "--real", "cxp", "--synthetic", "100%", "--synthetic-from", "cxp", "--seed", "0",
                            "--name", "bad", "--root", str(project)])
    assert r.exit_code == 2 and "not a synthetic dataset" in r.output


def test_replica_counts_parse_as_x():
    assert parse_percent("2x") == 2.0 and parse_percent("0x") == 0.0 and parse_percent("1.5x") == 1.5


def test_synthetic_tuning_set(tmp_path):
    """The CFG study's mixes: real or synthetic training rows, tuned on the synthetic twin of the tuning split."""
    root = make_project(tmp_path, "train,tune", "twin", replicas=1)
    real = manifest.read(root, "cxp")
    twin = manifest.read(root, "twin")
    assert sorted(twin["split"].unique()) == ["train", "tune"]
    assert len(twin) == int(real["split"].isin(["train", "tune"]).sum())
    # real training rows, synthetic tuning rows
    counts = mix(root, "real_syntune", MixParams(real="cxp", synthetic_from="twin", synthetic_tune=True, seed=0))
    frame = manifest.read(root, "real_syntune")
    assert frame.loc[frame["split"] == "train", "origin"].eq("real").all()
    tune = frame.loc[frame["split"] == "tune"]
    assert tune["origin"].eq("synthetic").all() and counts["tune"] == int((real["split"] == "tune").sum())
    assert set(tune["source_key"]) == set(real.loc[real["split"] == "tune", "key"])
    assert frame.loc[frame["split"] == "test", "origin"].eq("real").all()
    # synthetic training and tuning rows
    mix(root, "syn_syntune", MixParams(real="cxp", synthetic=1.0, synthetic_from="twin", only_synthetic=True,
                                       synthetic_tune=True, seed=0))
    frame = manifest.read(root, "syn_syntune")
    assert frame.loc[frame["split"].isin(["train", "tune"]), "origin"].eq("synthetic").all()
    assert set(frame.loc[frame["split"] == "train", "source_key"]) == set(real.loc[real["split"] == "train", "key"])
    with pytest.raises(MixError, match="synthetic-from"):
        mix(root, "nope", MixParams(real="cxp", synthetic_tune=True, seed=0))
    # a plain mix records no synthetic_tune field: its version is what it always was
    plain = manifest.read_meta(root, "real_syntune")
    assert plain["params"]["synthetic_tune"] is True
    mix(root, "sup", MixParams(real="cxp", synthetic=1.0, synthetic_from="twin", seed=0))
    assert "synthetic_tune" not in manifest.read_meta(root, "sup")["params"]
