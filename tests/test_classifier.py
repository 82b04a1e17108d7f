"""Classifier training and prediction: best tuning epoch, exact resume, predictions, local weights, phantom learning."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from conftest import chexpert_rows, ingest_site, tiny_classifier
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cxrsynth import labels, loader, manifest
from cxrsynth.classify import get_preset
from cxrsynth.classify.model import build, load_pretrained
from cxrsynth.classify.predict import read as read_predictions
from cxrsynth.classify.train import finished, train
from cxrsynth.cli import app
from cxrsynth.errors import CxrsynthError, UnknownNameError

SMALL = dict(image_size=32, batch_size=4, epochs=3, warmup_steps=2, log_every=1)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "200"})
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """48 images at 32 px (random labels), split train/tune/test; every third patient's second study has an uncertain finding."""
    tmp = tmp_path_factory.mktemp("classifier")
    rows = chexpert_rows(n_patients=24, studies=2, uncertain=False)
    for i, row in enumerate(rows):
        if i % 6 == 1:
            row["Edema"] = "-1.0"
    return tmp, ingest_site(tmp, rows, shard_size=10, split={"tune": 0.25, "test": 0.25, "seed": 0})


@pytest.fixture(scope="module")
def trained(project):
    tmp, root = project
    return tiny_classifier(root, tmp / "cls", epochs=4, warmup=2)


def test_train_keeps_the_epoch_with_the_lowest_tuning_loss(project, trained):
    tmp, root = project
    meta = json.loads((trained / "classifier.json").read_text())
    assert set(meta) >= {"preset", "config", "data", "best", "history", "classifier_id", "cxrsynth"}
    assert meta["preset"] == "small" and meta["config"]["model"] == "resnet10t" and meta["config"]["epochs"] == 4
    assert {"image_size", "lr", "batch_size", "seed", "optimizer", "ema_decay"} <= set(meta["config"])
    history = meta["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and all(h["tune_loss"] > 0 for h in history)
    assert meta["best"]["epoch"] == history[int(np.argmin([h["tune_loss"] for h in history]))]["epoch"]
    assert meta["best"]["tune_loss"] == min(h["tune_loss"] for h in history)
    frame = manifest.read(root, "cxp")
    certain = ~labels.has_uncertain(frame)
    data = meta["data"]
    assert data["name"] == "cxp" and data["version"] == manifest.read_meta(root, "cxp")["version"]
    assert data["split"] == "train" and data["tune_split"] == "tune" and data["datasets"] == {"cxp": data["version"]}
    assert data["train_images"] == int(((frame["split"] == "train") & certain).sum())  # uncertain images excluded
    assert data["tune_images"] == int(((frame["split"] == "tune") & certain).sum())
    weights = (trained / "model.safetensors").read_bytes()
    assert meta["classifier_id"] == hashlib.sha256(weights).hexdigest()[:12]
    best_file = trained / "checkpoints" / f"best-epoch-{meta['best']['epoch']:04d}.safetensors"
    assert best_file.read_bytes() == weights and len(list((trained / "checkpoints").glob("best-*"))) == 1
    net = timm.create_model("resnet10t", pretrained=False, num_classes=14, in_chans=1, **meta["config"]["model_kwargs"])
    net.load_state_dict(load_file(trained / "model.safetensors"))  # a plain timm state dict
    again = invoke("classifier", "train", "--data", "cxp", "--preset", "small", "--epochs", 4, "--batch", 4,
                   "--image-size", 32, "--warmup", 2, "--threads", 1, "--out", trained, "--root", root)
    assert again.exit_code == 0 and (trained / "model.safetensors").read_bytes() == weights  # finished run: same outputs


@pytest.mark.slow
def test_resume_after_a_kill_ends_bit_identical(project):
    tmp, root = project
    config = get_preset("small", **SMALL, checkpoint_every=3)
    torch.set_num_threads(1)
    whole = train(root, "cxp", config, tmp / "whole", resume=False)
    steps = len(loader.ShardLoader(root, loader.select(root, "cxp", "train"), loader.LoaderConfig(batch_size=4)))
    kill_at = steps + 2  # inside epoch 2, after its mid-epoch checkpoint at step 6

    class Killed(Exception):
        pass

    def kill(event):
        if event["event"] == "step" and event["step"] == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train(root, "cxp", config, tmp / "killed", resume=False, callback=kill)
    state = torch.load(tmp / "killed" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["epoch"] == 1 and 0 < state["position"] < steps and not (tmp / "killed" / "model.safetensors").exists()
    resumed = train(root, "cxp", config.replace(workers=2), tmp / "killed", resume=True)  # and with loader workers
    assert (tmp / "killed" / "model.safetensors").read_bytes() == (tmp / "whole" / "model.safetensors").read_bytes()
    assert resumed["history"] == whole["history"] and resumed["best"] == whole["best"]
    # the JSON-lines log: every logged step once, with the same losses as the unbroken run (rates are wall-clock)
    import pandas as pd

    logs = [pd.read_json(tmp / run / "checkpoints" / "log.jsonl", lines=True).drop(columns="images_per_s")
            for run in ("whole", "killed")]
    pd.testing.assert_frame_equal(logs[0], logs[1])
    steps_logged = logs[0].dropna(subset=["loss"])
    assert steps_logged["step"].is_unique and steps_logged["loss"].notna().all() and (steps_logged["lr"] >= 0).all() and steps_logged["lr"].iloc[0] > 0
    per_epoch = logs[0].dropna(subset=["train_loss"])
    assert list(per_epoch["epoch"]) == [h["epoch"] for h in whole["history"]]
    assert list(per_epoch["train_loss"]) == pytest.approx([h["train_loss"] for h in whole["history"]])
    a = torch.load(tmp / "whole" / "checkpoints" / "latest.pt", weights_only=True)["trainer"]
    b = torch.load(tmp / "killed" / "checkpoints" / "latest.pt", weights_only=True)["trainer"]
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])  # the last weights too, not only the best
    # stopped after an epoch, then resumed to the end: the same again
    assert train(root, "cxp", config, tmp / "stopped", resume=False, stop_after=1) is None
    train(root, "cxp", config, tmp / "stopped", resume=True)
    assert (tmp / "stopped" / "model.safetensors").read_bytes() == (tmp / "whole" / "model.safetensors").read_bytes()
    with pytest.raises(CxrsynthError, match="belongs to another run.*lr"):
        train(root, "cxp", config.replace(lr=1e-2), tmp / "stopped", resume=True)


def test_predict_writes_every_test_row_with_the_model_facts(project, trained):
    tmp, root = project
    out = tmp / "pred.parquet"
    result = invoke("classifier", "predict", "--model", trained, "--data", "cxp", "--out", out, "--threads", 1, "--root", root)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.names == ["key", "dataset", *labels.FINDING_COLUMNS]
    assert str(table.schema.field("key").type) == "string" and all(
        str(table.schema.field(c).type) == "float" for c in labels.FINDING_COLUMNS)
    frame, meta = read_predictions(out)
    test = manifest.read(root, "cxp").query("split == 'test'")
    assert labels.has_uncertain(test).any()  # uncertain rows are predicted too
    assert frame["key"].tolist() == sorted(test["key"]) and set(frame["dataset"]) == {"cxp"}
    probs = frame[list(labels.FINDING_COLUMNS)].to_numpy()
    assert ((probs > 0) & (probs < 1)).all()
    assert meta["model"] == json.loads((trained / "classifier.json").read_text()) and meta["rows"] == len(test)
    assert meta["data"] == {"name": "cxp", "version": manifest.read_meta(root, "cxp")["version"], "split": "test"}
    out2 = tmp / "pred2.parquet"
    assert invoke("classifier", "predict", "--model", trained, "--data", "cxp", "--out", out2, "--workers", 2,
                  "--batch", 3, "--threads", 1, "--root", root).exit_code == 0
    other, _ = read_predictions(out2)
    assert other["key"].tolist() == frame["key"].tolist()
    assert np.allclose(other[list(labels.FINDING_COLUMNS)].to_numpy(), probs, atol=1e-5)


def test_features_are_the_heads_input_and_every_user_reads_them(project, trained):
    """Classifier.features: the pooled features the head maps to the logits, on the classifier's own input
    scaling; the study's replica distance and the audit's classifier embedding give exactly those numbers."""
    from cxrsynth.classify.model import load_classifier
    from cxrsynth.share import embed
    from cxrsynth.study.distance import pooled_features

    _, root = project
    model, meta = load_classifier(trained)
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        feats = model.features(images.float() / 255.0)
        assert feats.shape == (3, model.net.num_features)
        np.testing.assert_allclose(model.net.get_classifier()(feats).numpy(), model(images.float() / 255.0).numpy(),
                                   rtol=1e-5, atol=1e-6)
        # the formula each caller wrote before it called Classifier.features, bit for bit
        by_hand = model.net.forward_head(model.net.forward_features(images.float() / 127.5 - 1.0), pre_logits=True)
        assert torch.equal(feats, by_hand)
        audit = embed.classifier(trained, torch.device("cpu"))
        assert torch.equal(audit(images[:, 0]), torch.nn.functional.normalize(by_hand, dim=1))

    rows = loader.select(root, "cxp", "train", exclude_uncertain=False)
    data = loader.ShardLoader(root, rows, loader.LoaderConfig(batch_size=64, image_size=32, train=False, augment=None))
    with torch.no_grad():
        expected = np.concatenate([
            model.net.forward_head(model.net.forward_features(b["image"] * 2.0 - 1.0), pre_logits=True).numpy()
            for b in data.batches(0)])
    np.testing.assert_array_equal(pooled_features(trained, root, "cxp", "train", "cpu"), expected)


def test_local_pretrained_weights_adapt_the_stem_and_drop_the_head(project, tmp_path):
    config = get_preset("small")
    rgb = timm.create_model(config.model, pretrained=False, num_classes=1000, in_chans=3, **config.model_kwargs)
    state = rgb.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "rgb.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "rgb.safetensors"))
    for path in (tmp_path / "rgb.pth", tmp_path / "rgb.safetensors"):
        model = build(config)
        report = load_pretrained(model, path)
        assert report["adapted"] == ["conv1.0.weight"] and sorted(report["dropped"]) == ["fc.bias", "fc.weight"]
        got = model.net.state_dict()
        assert torch.allclose(got["conv1.0.weight"], state["conv1.0.weight"].sum(dim=1, keepdim=True))
        assert torch.equal(got["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
        assert got["fc.weight"].shape == (14, 256)
    other = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=14, in_chans=1)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CxrsynthError, match="does not fit"):
        load_pretrained(build(config), tmp_path / "other.pth")
    _, root = project
    meta = train(root, "cxp", get_preset("small", **{**SMALL, "epochs": 1}), tmp_path / "init", weights=tmp_path / "rgb.pth")
    sha = hashlib.sha256((tmp_path / "rgb.pth").read_bytes()).hexdigest()
    assert meta["init_weights"] == {"file": str(tmp_path / "rgb.pth"), "sha256": sha}


def test_patience_stops_after_epochs_without_a_better_tuning_loss():
    config = get_preset("small", epochs=10, patience=2)
    best = {"epoch": 3, "tune_loss": 0.3}
    assert [finished(n, best, config) for n in (3, 4, 5, 9)] == [False, False, True, True]
    assert not finished(9, best, config.replace(patience=0)) and finished(10, best, config.replace(patience=0))
    assert not finished(9, {"epoch": 3, "tune_loss": None}, config)  # no tuning split: all epochs


def test_presets_and_overrides():
    paper = get_preset("paper")
    assert (paper.model, paper.image_size, paper.optimizer, paper.lr, paper.ema_decay, paper.epochs) == (
        "convnext_base", 256, "lion", 1e-5, 0.9999, 50)
    assert get_preset("small", epochs=None).epochs == get_preset("small").epochs  # None keeps the preset's
    assert get_preset("small", model="mobilenetv3_small_050").model_kwargs == {}  # the preset's widths are its model's
    with pytest.raises(UnknownNameError, match="unknown classifier preset 'nope'; known: paper, small"):
        get_preset("nope")
    result = CliRunner().invoke(app, ["classifier", "train", "--data", "x", "--preset", "nope", "--out", "o"])
    assert result.exit_code == 2 and "unknown classifier preset" in result.output


@pytest.fixture(scope="module")
def phantom_project(tmp_path_factory):
    """400 cxp phantoms written and ingested through the CLI at 48 px, split train/tune/test."""
    tmp = tmp_path_factory.mktemp("phantom_cls")
    root = tmp / "proj"
    for args in (["phantom", "cxp", "--n", 700, "--out", "raw", "--seed", 1],
                 ["ingest", "chexpert", root / "raw/CheXpert-v1.0/train.csv", "--demographics", root / "raw/CHEXPERT DEMO.csv",
                  "--name", "cxp", "--size", 48, "--workers", 1],
                 ["split", "cxp", "--tune", 0.15, "--test", 0.3, "--seed", 0]):
        result = invoke(*args, "--root", root)
        assert result.exit_code == 0, result.output
    return tmp, root


@pytest.mark.slow
def test_small_preset_learns_the_phantoms_visible_findings(phantom_project):
    """The small preset beats chance on held-out phantoms for findings the renderer draws plainly.

    The phantom marks more than half of its images with some uncertain finding (as CheXpert
    does), so 400 phantoms leave ~80 certain training images; to learn in seconds the run
    keeps every training image with its uncertain findings masked out of the loss
    (``--uncertain mask``) and skips augmentation. AUROC by scikit-learn, uncertain masked.
    """
    from sklearn.metrics import roc_auc_score

    tmp, root = phantom_project
    out = tmp / "small"
    result = invoke("classifier", "train", "--data", "cxp", "--preset", "small", "--image-size", 48, "--batch", 16,
                    "--epochs", 10, "--uncertain", "mask", "--no-augment", "--threads", 1, "--out", out, "--root", root)
    assert result.exit_code == 0, result.output
    assert invoke("classifier", "predict", "--model", out, "--data", "cxp", "--out", tmp / "p.parquet", "--threads", 1,
                  "--root", root).exit_code == 0
    pred, _ = read_predictions(tmp / "p.parquet")
    truth = manifest.read(root, "cxp").set_index("key").loc[pred["key"]]
    auroc = {}
    for finding in ("cardiomegaly", "pleural_effusion", "support_devices"):
        y = truth[finding].to_numpy()
        keep = y != labels.UNCERTAIN
        auroc[finding] = roc_auc_score(y[keep], pred[finding].to_numpy()[keep])
    assert min(auroc.values()) > 0.6 and sum(auroc.values()) / 3 > 0.65, auroc


def test_timm_alone_loads_a_trained_classifier_and_predicts_as_cxrsynth(project, trained):
    """``timm.create_model("local-dir:DIR", pretrained=True)`` + timm's own transforms on the shard PNGs
    give the probabilities ``classifier predict`` writes: no cxrsynth needed to use a shared classifier."""
    import io

    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from cxrsynth import shards

    tmp, root = project
    out = tmp / "pred-timm.parquet"
    assert invoke("classifier", "predict", "--model", trained, "--data", "cxp", "--out", out, "--threads", 1,
                  "--root", root).exit_code == 0
    expected, _ = read_predictions(out)
    model = timm.create_model(f"local-dir:{trained}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == list(labels.FINDING_COLUMNS)
    transform = create_transform(**resolve_data_config(model=model))
    test = manifest.read(root, "cxp").query("split == 'test'")
    keys, images = zip(*((k, transform(Image.open(io.BytesIO(png)).convert("L"))) for k, png in shards.images(root, test)))
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.stack(images))).numpy()
    mine = expected.set_index("key").loc[list(keys), list(labels.FINDING_COLUMNS)].to_numpy()
    assert probs.shape == mine.shape and np.abs(probs - mine).max() < 1e-4


def test_a_trained_classifier_carries_a_model_card(project, trained):
    """README.md with a YAML header: the data (name@version), the settings, intended use and limits;
    a study cell adds its evaluation figures (cards.update)."""
    from cxrsynth import cards

    tmp, root = project
    front, body = cards.read(trained)
    meta = json.loads((trained / "classifier.json").read_text())
    version = manifest.read_meta(root, "cxp")["version"]
    assert front["library_name"] == "timm" and front["datasets"] == [f"cxp@{version}"]
    assert front["cxrsynth"]["classifier_id"] == meta["classifier_id"] and front["cxrsynth"]["best_epoch"] == meta["best"]["epoch"]
    titles = [line[3:] for line in body.splitlines() if line.startswith("## ")]
    assert titles == ["Model", "Training data", "Settings", "Intended use", "Limits"]
    assert "not a medical device" in body and f"cxp@{version}" in body
    copy = tmp / "card-copy"
    copy.mkdir(exist_ok=True)
    (copy / cards.CARD).write_text((trained / cards.CARD).read_text())
    cards.update(copy, {"evaluation": {"cxp:test": 0.71}}, ("Evaluation", "- cxp:test: macro AUROC 0.710"))
    front2, body2 = cards.read(copy)
    assert front2["cxrsynth"]["evaluation"] == {"cxp:test": 0.71} and front2["datasets"] == front["datasets"]
    assert body2.count("## ") == 6 and body2.rstrip().endswith("- cxp:test: macro AUROC 0.710")
