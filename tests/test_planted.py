"""The near-copy transform suite and the planted-copy bench (``cxrsynth bench audit --planted``),
on main's copy criteria (:mod:`cxrsynth.share.copies`) and embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from cxrsynth.bench.planted import bench_planted, split_patients
from cxrsynth.share import copies, transforms
from cxrsynth.share.audit import AuditConfig


def test_the_transforms_keep_the_size_and_type_are_seeded_and_change_the_image():
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    for name, fn in transforms.SUITE.items():
        a, b = fn(image, np.random.default_rng(1)), fn(image, np.random.default_rng(1))
        assert a.shape == image.shape and a.dtype == np.uint8 and np.array_equal(a, b), name
        assert not np.array_equal(a, image), name


def test_a_shift_moves_the_image_by_whole_pixels_and_fills_with_the_edge():
    image = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))  # a horizontal ramp
    moved = transforms.shift(image, np.random.default_rng(4))
    dx = int(np.argmax(np.all(moved[:, 16:17] == image[:, :], axis=0)))  # the source column now at column 16
    assert moved[0].min() >= image.min() and moved[0].max() <= image.max()  # edge fill, no black band
    assert 16 - dx != 0 and abs(16 - dx) <= 8


def test_the_patient_halves_never_share_a_patient():
    ids = np.repeat([f"p{i}" for i in range(7)], 3)
    cal, new = split_patients(ids, 0.5, seed=0)
    assert set(ids[cal]).isdisjoint(ids[new]) and len(cal) + len(new) == len(ids) and len(cal) and len(new)


@pytest.fixture(scope="module")
def phantom_project(tmp_path_factory) -> Path:
    """160 cxp phantom radiographs ingested at 32 px and split by patient (tune 0.1, test 0.3)."""
    root = tmp_path_factory.mktemp("planted") / "proj"
    raw = root / "data/raw/cxp"
    cli(root, "phantom", "cxp", "--n", 160, "--out", raw, "--seed", 3)
    cli(root, "ingest", "chexpert", raw / "CheXpert-v1.0/train.csv", "--demographics", raw / "CHEXPERT DEMO.csv",
        "--name", "cxp", "--size", 32)
    cli(root, "split", "cxp", "--tune", 0.1, "--test", 0.3, "--seed", 0)
    return root


@pytest.mark.slow  # a phantom ingest and a bench: ~6 s
def test_the_planted_bench_reports_every_transform_and_catches_photometric_copies(phantom_project):
    report = bench_planted(phantom_project, "cxp", size=32, per_transform=8, embeddings=("pixels",),
                           config=AuditConfig(quantile=0.05, align=0, detector="none"))
    assert report["transforms"] == list(transforms.SUITE)
    rows = {(r["criterion"], r["transform"]): r for r in report["rows"]}
    assert set(rows) == {(c, t) for c in copies.CRITERIA for t in transforms.SUITE}
    for transform in ("contrast", "gamma", "jpeg50"):
        row = rows["absolute", transform]
        assert row["rate"] >= 0.75 and row["nearest_is_source"] >= 0.75, row
    for c in report["configs"]:
        # the new patients were never calibrated on (about 30 images: a coarse 5% quantile); their false-flag rate is
        # far below the photometric copies' detection
        assert c["new_patient_images"] >= 20 and c["false_flag_rate"] <= 0.3, c
        assert c["false_flag_rate"] < 0.5 * rows[c["criterion"], "contrast"]["rate"], c
    assert report["calibration"]["images"] + report["new_patients"]["images"] > 0


@pytest.mark.slow  # a bench through the CLI, pixels and a 3-step sscd, and the audit's default rules: ~10 s
def test_bench_audit_planted_prints_a_row_per_embedding_and_criterion_and_the_default_union(phantom_project, tmp_path):
    out = cli(phantom_project, "bench", "audit", "--planted", "--data", "cxp", "--size", 32, "--per-transform", 2,
              "--embeddings", "pixels,sscd", "--sscd-steps", 3, "--align", 0, "--out", tmp_path / "planted.json", "--threads", 1)
    report = json.loads((tmp_path / "planted.json").read_text())
    assert {(r["embedding"], r["criterion"], r["transform"]) for r in report["rows"]} == {
        (e, c, t) for e in ("pixels", "sscd") for c in copies.CRITERIA for t in transforms.SUITE} | {
        ("pixels|sscd", "union", t) for t in transforms.SUITE}
    assert len(report["configs"]) == 2 * len(copies.CRITERIA) + 1
    union = report["configs"][-1]
    assert union["align"] == "0+16" and union["rules"] == ["pixels, combined",
                                                           "sscd, registered onto its 16 nearest, absolute"]
    # each rule at half the quantile flags a subset of what it flags at the whole: the union's chance rate is within
    # the sum of the two rules' own
    by = {(c["embedding"], c["criterion"]): c for c in report["configs"]}
    assert union["chance_rate"] <= by["pixels", "combined"]["chance_rate"] + by["sscd", "absolute"]["chance_rate"]
    assert "best:" in out and "mix2" in out and "new patients" in out and "union = pixels, combined or sscd" in out


def _smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` random smooth grey images (blurred noise, standardised to 0-255): anatomy-like texture, all different."""
    import torch

    from cxrsynth.share.align import gaussian_blur

    noise = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, size, size))).float()
    x = gaussian_blur(noise, 2.5).numpy()
    x = (x - x.min(axis=(1, 2), keepdims=True)) / np.ptp(x, axis=(1, 2), keepdims=True)
    return np.rint(40 + 180 * x).astype(np.uint8)


@pytest.mark.slow  # ~1 s of registration, ~5 s with torch's first calls under load
def test_alignment_registers_a_shifted_rotated_or_cropped_copy_back_onto_its_source():
    from cxrsynth.share.align import Aligner

    train = _smooth_images(12, 64, seed=0)
    rng = np.random.default_rng(1)
    copies_ = np.stack([transforms.shift(train[0], rng), transforms.rotate(train[1], rng), transforms.crop(train[2], rng),
                        transforms.scale(train[3], rng)])
    candidates = np.tile(np.arange(12), (4, 1))
    d = Aligner(train, size=64).distances(copies_, candidates)
    own = d[np.arange(4), np.arange(4)]
    others = np.where(np.eye(4, 12, dtype=bool), np.inf, d).min(axis=1)
    assert (own < 0.02).all() and (own < 0.25 * others).all(), (own, others)
    plain = Aligner(train, size=64, iters=0).distances(copies_[:1], candidates[:1])  # the grid alone finds a whole-px shift
    assert plain[0, 0] < 0.01 and plain[0, 0] == plain[0].min()


@pytest.mark.slow  # 1,024 registrations at 64 px: ~8 s on one core
def test_bench_audit_times_the_search_and_the_detector_rule_s_alignment(tmp_path):
    out = cli(tmp_path, "bench", "audit", "--queries", 64, "--bank", 256, "--dim", 64, "--threads", 1, "--json")
    r = json.loads(out.strip().splitlines()[-1])
    assert (r["queries"], r["bank"], r["dim"], r["align_size"], r["align_candidates"]) == (64, 256, 64, 64, 16)
    assert r["seconds_per_million_pairs"] > 0 and r["align_pairs_per_s"] > 0
    # the paper's 720,530 synthetic images onto 16 candidates each, at the measured rate
    assert r["paper_scale_align_hours"] == pytest.approx(720_530 * 16 / r["align_pairs_per_s"] / 3600, rel=1e-9)
