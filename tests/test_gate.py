"""The export gate on numbers: a one-sided binomial test of the flagged count against the chance
rate, a hard refusal for any copy, and Dar et al.'s two fractions."""

from __future__ import annotations

import pytest
from scipy.stats import binom

from cxrsynth.share.gate import GateConfig, decide


def audit_json(flagged: int, synthetic: int, *, rate: float | None = 0.01, copies: int | None = None,
               distances: list[float] | None = None, training_images: int = 500) -> dict:
    """An audit.json summary: ``flagged`` pairs (``distances``, default 0.002 each, training keys t0, t1, t0, t1...)."""
    counts = {"flagged": flagged, "synthetic": synthetic, "expected_by_chance": round(0.01 * synthetic, 2)}
    if rate is not None:
        counts["chance_rate"] = rate
    if copies is not None:
        counts["copies"] = copies
    distances = distances or [0.002] * flagged
    pairs = [{"synthetic_key": f"s{i}", "training_key": f"t{i % 2}", "distance": d} for i, d in enumerate(distances)]
    return {"counts": counts, "flagged": pairs, "threshold": {"quantile": 0.01, "distance": 0.003},
            "training": {"images": training_images}}


def test_as_many_flagged_as_chance_predicts_pass_and_far_more_fail():
    even = decide(audit_json(10, 1000))
    assert even.passed and even.expected == pytest.approx(10) and even.reasons == ()
    assert even.p_value == pytest.approx(binom.sf(9, 1000, 0.01))  # P(X >= 10)
    far = decide(audit_json(30, 1000))
    assert not far.passed and far.p_value == pytest.approx(binom.sf(29, 1000, 0.01)) and far.p_value < 1e-6
    assert "more than chance explains" in far.reasons[0] and "10.00 expected" in far.reasons[0]
    # the level decides: 17 of 1000 (p ~ 0.03) passes at 0.01 and fails at 0.05
    assert decide(audit_json(17, 1000)).passed and not decide(audit_json(17, 1000), GateConfig(alpha=0.05)).passed


def test_a_single_copy_refuses_whatever_the_count_and_the_refusal_names_the_closest_pairs():
    one = decide(audit_json(3, 1000, copies=1, distances=[0.002, 0.00001, 0.0025]))
    assert not one.passed and one.p_value > 0.5 and one.reasons == ("1 pair(s) closer than the hard copy threshold",)
    message = one.refusal("syn", "audit/")
    assert message.index("s1 -> t1 (distance 1e-05)") < message.index("s0 -> t0 (distance 0.002)")
    assert "p = " in message and "--force" in message
    # an audit that records no copies: a flagged pair at or below copy_distance is one
    assert decide(audit_json(2, 1000, distances=[0.0005, 0.002])).copies == 1
    assert decide(audit_json(2, 1000, distances=[0.0005, 0.002]), GateConfig(copy_distance=1e-4)).passed


def test_the_refusal_orders_pairs_of_two_rules_by_evidence_not_by_their_incomparable_distances():
    summary = audit_json(2, 100, copies=1, distances=[0.004, 0.0008])
    summary["flagged"][0].update(rule="detector", heldout_below=0.0)   # 1 - NCC 0.004: no new patient's image as close
    summary["flagged"][1].update(rule="first", heldout_below=0.003)    # cosine 0.0008: 0.3% of new patients as close
    message = decide(summary).refusal("syn", "audit/")
    assert message.index("s0 -> t0 (distance 0.004, detector rule)") < message.index("s1 -> t1 (distance 0.0008, first rule)")


def test_the_chance_rate_falls_back_to_the_threshold_quantile_and_the_cap_is_optional():
    fallback = decide(audit_json(8, 200, rate=None))  # p ~ 0.001 at 0.01, ~0.8 at 0.05
    assert fallback.chance_rate == 0.01 and fallback.expected == pytest.approx(2.0)
    assert decide(audit_json(8, 200, rate=0.05)).passed and not fallback.passed
    assert not decide(audit_json(1, 1000), GateConfig(max_flagged=0)).passed


def test_dar_fractions_synthetic_copies_and_training_images_copied_at_least_once():
    d = decide(audit_json(4, 200, training_images=50))
    assert d.synthetic_copied_fraction == pytest.approx(4 / 200)
    assert d.training_copied == 2 and d.training_copied_fraction == pytest.approx(2 / 50)  # t0 and t1
    assert d.public()["training_copied_fraction"] == pytest.approx(0.04)


def test_in_dvc_yaml_only_the_gated_packages_are_pushed():
    """Every cached output of dvc.yaml is `push: false` except the package stages' exports, which
    `cxrsynth share export` writes only after the gate (or a recorded --force)."""
    from pathlib import Path

    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    pushed = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for out in body.get("outs", []):
            path, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if options.get("cache", True) and options.get("push", True):
                pushed[name] = (path, body["cmd"])
    assert set(pushed) == {"package", "package_rebalanced"}, pushed
    for path, cmd in pushed.values():
        assert path.startswith("data/packages/") and "share export" in cmd and f"--out {path}" in cmd
        assert "--force" not in cmd and "--key-secret data/.cxrsynth/" in cmd
