"""The memorization audit: nearest training images, a threshold calibrated on held-out real images,
the embedding's re-identification AUROC, and the export it blocks."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PLAIN_AUDIT_FLAGS, Project, plain_audit

from cxrsynth import manifest, shards
from cxrsynth.imaging import decode_png, encode_png
from cxrsynth.share import audit as audit_lib
from cxrsynth.share import embed


@pytest.fixture(scope="module")
def built(share_project) -> Project:
    return share_project


def plant_copy(root: Path, synthetic: str = "syn", training: str = "cxp", edit=None) -> tuple[str, str]:
    """Replace one synthetic image by a training image with +-1 grey level of noise (then ``edit(image)`` when
    given); returns (synthetic key, training key)."""
    real = manifest.read(root, training)
    source = real.loc[real["split"] == "train"].sort_values("key").iloc[[3]]
    (train_key, png), = shards.images(root, source)
    noise = np.random.default_rng(0).integers(-1, 2, size=decode_png(png).shape)
    near_copy = np.clip(decode_png(png).astype(int) + noise, 0, 255).astype(np.uint8)
    near_copy = encode_png(near_copy if edit is None else edit(near_copy))
    syn = manifest.read(root, synthetic)
    target = syn.sort_values("key").iloc[5]
    meta = manifest.read_meta(root, synthetic)
    directory = shards.shard_dir(root, synthetic, meta["version"])
    shard = Path(str(target["shard"])).name
    unit = int(shard.rsplit("-", 1)[1].split(".")[0])
    with tarfile.open(directory / shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples: dict[str, dict] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[ext] = near_copy if (key, ext) == (target["key"], "png") else data
    shards.write_shard(directory, synthetic, unit, list(samples.values()))
    units = sorted(int(p.name.rsplit("-", 1)[1].split(".")[0]) for p in directory.glob("*.tar"))
    shards.write_index(directory, synthetic, meta["version"], [shards.finished(directory, synthetic, u) for u in units])
    return str(target["key"]), train_key


@pytest.fixture(scope="module")
def planted(built, tmp_path_factory) -> tuple[Project, str, str]:
    project = built.copy(tmp_path_factory.mktemp("planted") / "proj")
    return (project, *plant_copy(project.root))


@pytest.mark.slow  # a project copy and two audits: ~5 s
def test_test_time_alignment_flags_a_shifted_and_rotated_copy_with_its_source(built, tmp_path):
    from cxrsynth.share import transforms

    project = built.copy(tmp_path / "proj")
    rng = np.random.default_rng(2)
    syn_key, train_key = plant_copy(project.root, edit=lambda image: transforms.rotate(transforms.shift(image, rng, 3), rng))
    aligned = audit_lib.audit(project.root, "syn", "cxp", tmp_path / "aligned", plain_audit(align=8, align_size=32))
    assert aligned["config"]["align"] == 8
    pair = [f for f in aligned["flagged"] if f["synthetic_key"] == syn_key]
    assert pair and pair[0]["training_key"] == train_key and pair[0]["distance"] < aligned["threshold"]["distance"]
    plain = audit_lib.audit(project.root, "syn", "cxp", tmp_path / "plain", plain_audit(k=8))
    moved = pd.read_parquet(tmp_path / "plain/neighbours.parquet").query("synthetic_key == @syn_key")
    # unaligned, the moved copy sits as far from its source as new patients' images sit from theirs
    assert plain["config"]["align"] == 0 and moved.query("training_key == @train_key")["distance"].min() > pair[0]["distance"]


def pixel_vectors(root: Path, frame: pd.DataFrame, size: int = 32) -> np.ndarray:
    """The pixels embedding recomputed by hand (numpy): standardised, unit length, in frame order."""
    pngs = dict(shards.images(root, frame))
    x = np.stack([decode_png(pngs[k], size).astype(np.float64).ravel() for k in frame["key"]])
    x = (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_planted_near_copy_is_flagged_and_the_threshold_is_calibrated_on_heldout_images(planted, tmp_path):
    project, syn_key, train_key = planted
    summary = audit_lib.audit(project.root, "syn", "cxp", tmp_path / "audit", plain_audit())
    assert [(f["synthetic_key"], f["training_key"]) for f in summary["flagged"]] == [(syn_key, train_key)]
    assert summary["flagged"][0]["distance"] < 1e-3 < summary["threshold"]["distance"]
    # the default (combined) criterion: the k-th smallest of the held-out images' nearest distance and of their
    # nearest / mean(next 4) ratio, k = floor(0.005 x (9 + 1)) held at 1 (too few to support the quantile), by brute force
    real = manifest.read(project.root, "cxp")
    train = real.loc[real["split"] == "train"].reset_index(drop=True)
    heldout = real.loc[~real["patient_id"].isin(train["patient_id"])].reset_index(drop=True)
    assert summary["heldout"]["images"] == len(heldout) == 9 and summary["training"]["images"] == len(train)
    dist = np.sort(1 - pixel_vectors(project.root, heldout) @ pixel_vectors(project.root, train).T, axis=1)[:, :5]
    assert summary["threshold"]["distance"] == pytest.approx(dist[:, 0].min(), abs=1e-5)
    assert summary["threshold"]["ratio"] == pytest.approx((dist[:, 0] / dist[:, 1:].mean(1)).min(), abs=1e-4)
    assert summary["threshold"]["rule"]["order"] == {"absolute": 1, "relative": 1}
    assert not summary["threshold"]["rule"]["supported"] and "199 needed" in summary["threshold"]["rule"]["rule"]
    # leave-one-out: a held-out image is flagged by the thresholds fitted without it when it is the smallest of a score
    flagged_new = ((dist[:, 0] <= summary["threshold"]["distance"] + 1e-6)
                   | (dist[:, 0] / dist[:, 1:].mean(1) <= summary["threshold"]["ratio"] + 1e-6)).mean()
    counts = summary["counts"]
    assert counts["chance_rate"] == pytest.approx(flagged_new, abs=1e-6) and flagged_new in (1 / 9, 2 / 9)
    assert (counts["synthetic"], counts["flagged"], counts["copies"]) == (21, 1, 1)  # the near-copy is a hard copy
    assert counts["expected_by_chance"] == pytest.approx(21 * counts["chance_rate"], abs=0.01)
    assert counts["synthetic_flagged_fraction"] == pytest.approx(1 / 21, abs=1e-6)
    assert counts["training_copied_fraction"] == pytest.approx(1 / len(train), abs=1e-6)
    # patient textures repeat across studies: the pixel embedding re-identifies patients
    assert summary["reid"]["training_split"]["auroc"] > 0.9 and summary["reid"]["heldout"]["auroc"] > 0.9
    assert summary["reid"]["training_split"]["positives"] == "images of one patient from different studies"
    written = json.loads((tmp_path / "audit/audit.json").read_text())
    assert written["flagged"][0]["neighbours"][0]["training_key"] == train_key and len(written["flagged"][0]["neighbours"]) == 5
    for png in ("distances.png", "pairs.png"):
        assert (tmp_path / "audit" / png).read_bytes().startswith(b"\x89PNG")
    neighbours = pd.read_parquet(tmp_path / "audit/neighbours.parquet")
    assert len(neighbours) == 21 * 5 and neighbours.groupby("synthetic_key")["distance"].is_monotonic_increasing.all()
    public = audit_lib.public_summary(summary)
    assert train_key not in json.dumps(public) and syn_key not in json.dumps(public) and str(tmp_path) not in json.dumps(public)


def test_flagged_pairs_block_the_export_unless_forced(planted, tmp_path):
    project, syn_key, train_key = planted
    out = project.cli("share", "audit", "syn", "--against", "cxp", "--out", tmp_path / "cli", "--k", 3, *PLAIN_AUDIT_FLAGS)
    assert "1 of 21 flagged" in out and "re-identification AUROC" in out
    assert len(json.loads((tmp_path / "cli/audit.json").read_text())["flagged"][0]["neighbours"]) == 3
    # 1 of 21 flagged is within chance (0.21 expected, p ~ 0.19), but the pair is a copy outright
    out = project.cli("share", "export", "syn", "--out", tmp_path / "pkg", "--audit-out", tmp_path / "a", *PLAIN_AUDIT_FLAGS,
                      code=1)
    assert "export refused: 1 pair(s) closer than the hard copy threshold" in out and f"{syn_key} -> {train_key}" in out
    assert "p = " in out and "--force" in out and not (tmp_path / "pkg").exists()
    assert not (tmp_path / "pkg.partial").exists()
    project.cli("share", "export", "syn", "--out", tmp_path / "forced", "--audit-out", tmp_path / "a", "--force",
                *PLAIN_AUDIT_FLAGS)
    sheet = (tmp_path / "forced/DATASHEET.md").read_text()
    assert "Exported with --force although the gate refused it: 1 pair(s) closer than the hard copy threshold" in sheet
    assert "| decision | refused: 1 pair(s) closer than the hard copy threshold |" in sheet
    assert "| synthetic images flagged as copies (Dar et al.) | 4.76% |" in sheet  # 1 of 21
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(tmp_path / "forced/manifest.parquet").metadata[b"cxrsynth"])
    assert meta["forced"] is True and meta["audit"]["counts"]["flagged"] == 1
    assert meta["audit"]["gate"]["passed"] is False and meta["audit"]["gate"]["training_copied"] == 1
    assert meta["audit"]["training"]["name"] == "cxp" and "generator's training data cxp@" in meta["audit"]["target"]
    assert train_key not in json.dumps(meta)


def test_a_clean_replica_passes_the_gate(built, tmp_path):
    """The unplanted replica: its flagged count is what chance explains, no hard copy; the export passes and says so."""
    project = built.copy(tmp_path / "proj")
    project.cli("share", "export", "syn", "--out", tmp_path / "pkg", "--audit-out", tmp_path / "a", *PLAIN_AUDIT_FLAGS)
    sheet = (tmp_path / "pkg/DATASHEET.md").read_text()
    assert "Passed the gate: one-sided binomial test" in sheet and "| decision | passed |" in sheet
    assert "0 pair(s) below the hard copy threshold" in sheet


@pytest.mark.parametrize("flagged, n, rate, copies, passed", [
    (5, 1000, 0.005, 0, True),     # what chance gives
    (10, 1000, 0.005, 0, True),    # p = 0.032: within chance at alpha 0.01
    (13, 1000, 0.005, 0, False),   # p = 0.0017: more than chance explains
    (0, 1000, 0.005, 1, False),    # one hard copy refuses whatever the count
    (1, 21, 0.0, 0, False),        # a criterion that flags no new patient's image: any flag is significant
])
def test_the_gate_is_a_binomial_test_against_the_criterion_s_chance_rate(flagged, n, rate, copies, passed):
    from scipy.stats import binom

    from cxrsynth.share import gate

    summary = {"counts": {"synthetic": n, "flagged": flagged, "chance_rate": rate, "copies": copies}, "threshold": {},
               "flagged": [{"synthetic_key": f"s{i}", "training_key": f"t{i}", "distance": 0.01 * i, "ratio_to_next": 0.1,
                            "hard_copy": i < copies} for i in range(max(flagged, copies))]}
    decision = gate.decide(summary, gate.GateConfig(alpha=0.01))
    assert decision.passed is passed and decision.expected == pytest.approx(n * rate)
    assert decision.p_value == pytest.approx(binom.sf(flagged - 1, n, rate) if rate > 0 else float(flagged == 0), abs=1e-12)
    if not passed and decision.closest:
        assert "s0 -> t0 (distance 0" in decision.refusal("syn", "audit.json")


def test_nearest_in_chunks_equals_the_full_product():
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(50, 16, generator=gen), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(37, 16, generator=gen), dim=1)
    dist, idx = embed.nearest(q, bank, 4, chunk=7)
    full = 1 - q @ bank.T
    expected, expected_idx = torch.topk(full, 4, dim=1, largest=False)
    assert torch.allclose(dist, expected, atol=1e-6) and torch.equal(idx, expected_idx)


def test_patient_pairs_are_same_patient_other_study_against_other_patients():
    frame = pd.DataFrame({"patient_id": ["a", "a", "a", "b", "b", "c"], "study_id": ["a1", "a1", "a2", "b1", "b2", "c1"]})
    i, j, same, what = audit_lib.patient_pairs(frame, 100, seed=0)
    pos = {tuple(sorted(p)) for p in zip(i[same], j[same])}
    assert pos == {(0, 2), (1, 2), (3, 4)} and what == "images of one patient from different studies"
    assert (~same).sum() == 3 and (frame["patient_id"].to_numpy()[i[~same]] != frame["patient_id"].to_numpy()[j[~same]]).all()


def test_the_reid_embedding_trains_on_training_patients_and_reloads(built, tmp_path):
    config = plain_audit(embedding="reid", reid=embed.ReidConfig(size=32, steps=15, patients=6))
    summary = audit_lib.audit(built.root, "syn", "cxp", tmp_path / "audit", config)
    assert summary["embedding"]["kind"] == "reid" and summary["embedding"]["patients"] == 7
    assert 0.0 <= summary["reid"]["training_split"]["auroc"] <= 1.0 and summary["counts"]["flagged"] == 0
    again = audit_lib.audit(built.root, "syn", "cxp", tmp_path / "again",
                            plain_audit(embedding=f"reid:{tmp_path / 'audit/reid'}"))
    assert again["threshold"]["distance"] == pytest.approx(summary["threshold"]["distance"], abs=1e-6)
    assert again["reid"] == summary["reid"]


def test_audit_refuses_a_training_set_without_heldout_patients(built, tmp_path):
    project = built.copy(tmp_path / "proj")
    frame = manifest.read(project.root, "cxp")
    manifest.write(project.root, "cxp", frame.assign(split="train"), manifest.read_meta(project.root, "cxp"))
    out = project.cli("share", "audit", "syn", "--against", "cxp", "--out", tmp_path / "a", *PLAIN_AUDIT_FLAGS, code=2)
    assert "no held-out real images" in out and "cxrsynth split" in out


@pytest.mark.slow  # a 210-image replica, a detector, two aligned audits: ~40 s
def test_a_clean_replica_passes_the_gate_and_half_a_percent_of_copies_fails_it(built, tmp_path):
    from conftest import replica

    project = built.copy(tmp_path / "proj")
    replica(project.root, project.gen, "big", replicas=10, sampler="ddim", steps=1, seed=6, shard_size=64, batch_size=64)
    assert len(manifest.read(project.root, "big")) == 210
    # the default audit: the pixels rule, and the detector rule with the sscd network trained once (`share detector`;
    # few steps here), each image registered onto its 16 nearest training images, the absolute criterion
    out = project.cli("share", "detector", "cxp", "--out", "data/detector/cxp", "--sscd-steps", 60, "--sscd-size", 32)
    assert "--detector sscd:data/detector/cxp" in out
    about = json.loads((project.root / "data/detector/cxp/detector.json").read_text())
    assert about["dataset"] == "cxp" and about["split"] == "train" and about["images"] > 0
    audit = ("--detector", "sscd:data/detector/cxp", "--align-size", 32)
    project.cli("share", "export", "big", "--out", tmp_path / "clean", "--audit-out", tmp_path / "a_clean", *audit)
    sheet = (tmp_path / "clean/DATASHEET.md").read_text()
    assert "Passed the gate: one-sided binomial test of" in sheet and "| decision | passed |" in sheet
    assert "re-identification AUROC" in sheet and "training images copied at least once (Dar et al.)" in sheet
    clean = json.loads((tmp_path / "a_clean/audit.json").read_text())
    assert [(r["name"], r["embedding"]["name"], r["align"], r["threshold"]["criterion"]) for r in clean["rules"]] == [
        ("first", "pixels", 0, "combined"), ("detector", "sscd:data/detector/cxp", 16, "absolute")]
    assert clean["union"]["per_rule"] == 0.005 and clean["counts"]["chance_rate"] == clean["union"]["chance_rate"] > 0
    assert "first rule: embedding" in sheet and "detector rule: embedding" in sheet
    for path in (tmp_path / "clean").rglob("*"):  # the detector's local folder is named nowhere in the package
        assert not path.is_file() or b"data/detector" not in path.read_bytes(), path

    # a copy shifted by 3 px and rotated: the detector finds its source, the alignment verifies it
    from cxrsynth.share import transforms

    rng = np.random.default_rng(2)
    syn_key, train_key = plant_copy(project.root, synthetic="big",  # 1 of 210: 0.48%
                                    edit=lambda image: transforms.rotate(transforms.shift(image, rng, 3), rng))
    out = project.cli("share", "export", "big", "--out", tmp_path / "planted", "--audit-out", tmp_path / "a_planted",
                      *audit, code=1)
    assert "export refused" in out and f"{syn_key} -> {train_key} (distance" in out and "p = " in out
    assert not (tmp_path / "planted").exists()
    planted = json.loads((tmp_path / "a_planted/audit.json").read_text())
    caught = [p for p in planted["flagged"] if p["synthetic_key"] == syn_key]
    assert caught and caught[0]["flagged_by"] == ["detector"]  # shifted and rotated: the pixels rule misses it


@pytest.mark.slow
@pytest.mark.skipif(__import__("sys").platform != "linux", reason="torchrun + gloo on Linux")
def test_the_audit_split_over_two_ranks_writes_the_single_process_files(built, tmp_path):
    """`share audit` under torchrun (2 ranks, gloo): each rank embeds and searches every other batch; rank 0
    writes the neighbours and the summary one process writes (the run's seconds aside)."""
    from conftest import cli, torchrun

    args = ["share", "audit", "syn", "--against", "cxp", *PLAIN_AUDIT_FLAGS, "--align", 4, "--device", "cpu"]
    output = torchrun(*args, "--out", tmp_path / "ranks", "--root", built.root, cwd=tmp_path, timeout=300)
    assert output.count("syn vs cxp/train:") == 1  # rank 0 alone reports
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as torchrun's ranks
        cli(built.root, *args, "--out", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    two, one = tmp_path / "ranks", tmp_path / "one"
    assert (two / "neighbours.parquet").read_bytes() == (one / "neighbours.parquet").read_bytes()
    a, b = (json.loads((d / "audit.json").read_text()) for d in (two, one))
    assert a.pop("seconds") > 0 and b.pop("seconds") > 0 and a == b
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_the_threshold_is_a_conformal_order_statistic_and_new_images_fall_below_it_at_the_quantile():
    """k = floor(q (n + 1)): a new image exchangeable with the held-out ones is flagged with probability k / (n + 1)
    <= q; the in-sample rate (k - 1 of n) would promise too little, the leave-one-out rate (k of n) is reported."""
    from cxrsynth.share import copies

    rng = np.random.default_rng(0)
    n, q, trials = 999, 0.01, 400
    flagged = 0
    for _ in range(trials):  # held-out and new images drawn from one distribution
        held, new = rng.gamma(4.0, size=(n, 1)), rng.gamma(4.0, size=(n, 1))
        rule = copies.calibrate(held, "absolute", q)
        assert rule.order == {"absolute": 10} and rule.supported and rule.chance_rate == pytest.approx(10 / n)
        assert rule.flag(held).sum() == 9  # in-sample: strictly below the 10th smallest
        flagged += rule.flag(new).sum()
    assert flagged / (trials * n) == pytest.approx(10 / (n + 1), abs=0.0015)  # 1.0%, not the in-sample 0.9%
    small = copies.calibrate(rng.gamma(4.0, size=(50, 1)), "absolute", q)
    assert small.order == {"absolute": 1} and not small.supported and small.chance_rate == pytest.approx(1 / 50)
