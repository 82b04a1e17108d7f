"""Rebalanced conditions: rare findings raised to a target prevalence, the rest held."""

import numpy as np
import pytest

from cxrsynth.diffusion import rebalance
from cxrsynth.errors import CxrsynthError


def labels_matrix(n=2000, seed=0):
    """Correlated findings with prevalences from 1% to 60%; some uncertain (-1) entries."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, 1))
    prev = np.linspace(0.01, 0.6, 14)
    y = (0.7 * rng.random((n, 14)) + 0.3 * base < prev * 1.0).astype(np.int8)
    y[rng.random((n, 14)) < 0.02] = -1
    return y


def test_rare_findings_reach_the_target_and_common_ones_hold():
    y = labels_matrix()
    w = rebalance.rebalance_weights(y, 0.2)
    assert w.shape == (len(y),) and np.isclose(w.sum(), 1.0) and (w >= 0).all()
    src = (y == 1).mean(axis=0)
    got = (y == 1).T.astype(float) @ w
    rare = src < 0.2
    assert rare.sum() >= 3 and np.allclose(got[rare], 0.2, atol=1e-3)
    assert np.allclose(got[~rare], src[~rare], atol=1e-4)


def test_systematic_draw_follows_the_weights_and_repeats_for_a_seed():
    y = labels_matrix()
    w = rebalance.rebalance_weights(y, 0.2)
    a, b = rebalance.systematic_draw(w, 1000, seed=3), rebalance.systematic_draw(w, 1000, seed=3)
    assert len(a) == 1000 and np.array_equal(a, b) and np.all(np.diff(a) >= 0)
    assert not np.array_equal(a, rebalance.systematic_draw(w, 1000, seed=4))
    drawn = (y[a] == 1).mean(axis=0)
    rare = (y == 1).mean(axis=0) < 0.2
    assert np.all(np.abs(drawn[rare] - 0.2) < 0.02)
    counts = np.bincount(a, minlength=len(w))  # each row floor or ceil of its expected count
    assert np.all(np.abs(counts - 1000 * w) < 1.0 + 1e-9)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_target_must_be_a_prevalence(target):
    with pytest.raises(CxrsynthError, match="prevalence"):
        rebalance.rebalance_weights(labels_matrix(50), target)


def test_a_finding_nobody_has_is_left_alone():
    y = labels_matrix()
    y[:, 13] = 0
    got = (y == 1).T.astype(float) @ rebalance.rebalance_weights(y, 0.2)
    assert got[13] == 0.0
