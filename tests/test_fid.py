"""FID from a local Inception-v3 file: no download, grayscale uint8 input, FID(a, a) = 0."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from cxrsynth.classify.model import trained_classifier_extractor
from cxrsynth.evaluate import frechet as fid


@pytest.fixture
def no_network(monkeypatch):
    """Every way torchvision could fetch weights raises instead."""
    import torch.hub
    import torchvision.models._api

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _images(seed: int, n: int, bright: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 64, 64, generator=g) * 80 + bright).to(torch.uint8)  # (n, 1, 64, 64)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a few small batches; 2 threads on a shared 2-core box only spin
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_fid_from_local_inception_file(tmp_path, no_network, one_thread):
    from torchvision.models import inception_v3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    weights = tmp_path / "inception_v3_random.pth"
    torch.save(random_net.state_dict(), weights)

    extractor = fid.inception_extractor(weights)
    a, b = _images(0, 4, 40), _images(1, 4, 150)
    feats_a = fid.features(extractor, [a[:1], a[1:]])  # batches of 64-px grayscale uint8
    assert feats_a.shape == (4, 2048) and np.isfinite(feats_a).all()
    np.testing.assert_allclose(fid.features(extractor, [a]), feats_a, rtol=1e-4, atol=1e-5)  # batching-independent

    stats_a = fid.FeatureStats.from_features(feats_a)
    same = fid.frechet_distance(stats_a, stats_a)
    other = fid.frechet_distance(stats_a, fid.FeatureStats.from_features(fid.features(extractor, [b])))
    assert same == pytest.approx(0.0, abs=1e-6 * max(1.0, other))
    assert other > 0 and other > 1e3 * abs(same)

def test_missing_inception_file_is_an_error_not_a_download(tmp_path, no_network):
    from cxrsynth.errors import CxrsynthError

    with pytest.raises(CxrsynthError, match="never downloads"):
        fid.inception_extractor(tmp_path / "missing.pth")


def test_frechet_distance_matches_sqrtm_and_handles_few_samples():
    from scipy import linalg

    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) * 1.3 + 0.2
    a, b = fid.FeatureStats.from_features(f1), fid.FeatureStats.from_features(f2)
    diff = a.mu - b.mu
    reference = diff @ diff + np.trace(a.sigma + b.sigma) - 2 * np.trace(linalg.sqrtm(a.sigma @ b.sigma).real)
    assert fid.frechet_distance(a, b) == pytest.approx(reference, rel=1e-9)
    # N < D: singular covariances; the factor path and the covariance path agree.
    a, b = fid.FeatureStats.from_features(f1[:5]), fid.FeatureStats.from_features(f2[:7])
    assert a.factor is not None
    no_factor = fid.frechet_distance(fid.FeatureStats(a.mu, a.sigma, a.n), fid.FeatureStats(b.mu, b.sigma, b.n))
    assert fid.frechet_distance(a, b) == pytest.approx(no_factor, rel=1e-6)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_classifier_frechet_distance_cli(tmp_path):
    """`generator fid --classifier`: a timm classifier from a local file, on two datasets' shards."""
    import timm
    from conftest import chexpert_rows, write_chexpert
    from typer.testing import CliRunner

    from cxrsynth.cli import app

    csv = write_chexpert(tmp_path / "raw", chexpert_rows(n_patients=6, studies=2))
    root = tmp_path / "proj"
    runner = CliRunner()

    def cli(*args):
        result = runner.invoke(app, [str(a) for a in args] + ["--root", str(root)], catch_exceptions=False)
        return result

    assert cli("ingest", "chexpert", csv, "--name", "a", "--size", 32, "--workers", 1).exit_code == 0
    assert cli("ingest", "chexpert", csv, "--name", "b", "--size", 32, "--no-equalize", "--workers", 1).exit_code == 0
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "clf.pt")
    common = ["--classifier", "resnet18", "--checkpoint", tmp_path / "clf.pt", "--size", 32, "--device", "cpu"]
    same = cli("generator", "fid", "--real", "a", "--synthetic", "a", *common)
    other = cli("generator", "fid", "--real", "a", "--synthetic", "b", *common)
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    value = lambda r: float(r.output.strip().split()[-1])  # noqa: E731
    assert abs(value(same)) < 1e-6 and value(other) > 1e-3
    bad = cli("generator", "fid", "--real", "a", "--synthetic", "b", "--classifier", "resnet34",
              "--checkpoint", tmp_path / "clf.pt", "--size", 32)
    assert bad.exit_code == 2 and "does not fit" in bad.output


def test_classifier_frechet_distance_from_a_trained_classifier_directory(tmp_path, one_thread):
    """`generator fid --classifier DIR`: a `classifier train` output; features are the net's pre-logits on [-1, 1] input."""
    from conftest import chexpert_rows, write_chexpert
    from typer.testing import CliRunner

    from cxrsynth.classify.model import load_classifier
    from cxrsynth.cli import app

    csv = write_chexpert(tmp_path / "raw", chexpert_rows(n_patients=6, studies=2, uncertain=False))
    root = tmp_path / "proj"
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args] + ["--root", str(root)], catch_exceptions=False)

    assert cli("ingest", "chexpert", csv, "--name", "a", "--size", 32, "--workers", 1).exit_code == 0
    assert cli("ingest", "chexpert", csv, "--name", "b", "--size", 32, "--no-equalize", "--workers", 1).exit_code == 0
    model_dir = tmp_path / "cls"
    assert cli("split", "a", "--tune", 0, "--seed", 0).exit_code == 0  # every image in train
    trained = cli("classifier", "train", "--data", "a", "--tune-split", "none", "--preset", "small",
                  "--image-size", 24, "--epochs", 1, "--batch", 4, "--warmup", 1, "--out", model_dir)
    assert trained.exit_code == 0, trained.output

    # The extractor: the pooled features that the classifier's last linear layer maps to its logits.
    extractor = trained_classifier_extractor(model_dir)
    model, meta = load_classifier(model_dir)
    assert extractor.size == 24 == meta["config"]["image_size"] and extractor.classifier_id == meta["classifier_id"]
    images = _images(2, 3, 60)[..., :24, :24].contiguous()  # (3, 1, 24, 24) uint8
    feats = fid.features(extractor, [images])
    assert feats.shape == (3, model.net.num_features) == (3, 256)  # the small preset's last stage width, not 14 logits
    with torch.no_grad():
        logits = model(images.float() / 255.0)  # the Classifier maps [0, 1] to [-1, 1] itself
        head = model.net.get_classifier()(torch.from_numpy(feats).float())
        direct = model.net.forward_head(model.net.forward_features(images.float() / 127.5 - 1.0), pre_logits=True)
    np.testing.assert_allclose(head.numpy(), logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats, direct.double().numpy(), rtol=1e-4, atol=1e-5)
    assert trained_classifier_extractor(model_dir, size=32).size == 32

    # The CLI: same data -> 0, other preprocessing -> > 0; the directory carries its weights and its size.
    same = cli("generator", "fid", "--real", "a", "--synthetic", "a", "--classifier", model_dir, "--device", "cpu")
    other = cli("generator", "fid", "--real", "a", "--synthetic", "b", "--classifier", model_dir, "--device", "cpu")
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    assert meta["classifier_id"] in same.output and "24 px" in same.output
    value = lambda r: float(r.output.strip().split()[-1])  # noqa: E731
    assert abs(value(same)) < 1e-6 and value(other) > 1e-3
    both = cli("generator", "fid", "--real", "a", "--synthetic", "b", "--classifier", model_dir, "--checkpoint", csv)
    assert both.exit_code == 2 and "drop --checkpoint" in both.output
    missing = cli("generator", "fid", "--real", "a", "--synthetic", "b", "--classifier", tmp_path / "nope")
    assert missing.exit_code == 2 and "is not a cxrsynth classifier" in missing.output
