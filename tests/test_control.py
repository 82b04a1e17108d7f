"""The memorisation audit's positive control: a generator overfitted on a few training images is
flagged far beyond chance and refused by the export gate; a replica that copied nothing passes;
the report's Memorisation section shows both (the numbers, the histograms, the closest pairs)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from conftest import PLAIN_AUDIT, Project

from cxrsynth import manifest
from cxrsynth.share.control import MEMORISATION_JSON, ControlConfig, memorisation
from cxrsynth.study import report
from cxrsynth.study.report.html import memorisation_section
from cxrsynth.study.report.prose import memorisation_sentences

PARAMS = {"seed": 0, "replicas": {"w1": {"guidance": 1.0, "replicas": 1}}, "study": {"real": "cxp", "tests": ["cxp"]},
          "memorisation": {"replica": "w1", "images": 12}}


@pytest.fixture(scope="module")
def controlled(share_project, tmp_path_factory) -> tuple[Project, dict]:
    """The share project (cxp: 10 patients x 3 studies at 32 px; ``syn``: an untrained generator's replica) with
    the positive control run: a micro generator overfitted on 12 training images for 300 steps."""
    project = share_project.copy(tmp_path_factory.mktemp("control") / "proj")
    config = ControlConfig(images=12, steps=300, batch=12, lr=3e-3, warmup=10, ema=0.9, preset="micro", image_size=32,
                           replicas=2, sample_steps=10, device="cpu", **PLAIN_AUDIT)
    doc = memorisation(project.root, "cxp", "syn", project.root / "metrics" / "memorisation", config)
    return project, doc


@pytest.mark.slow  # ~25 s: 300 training steps, a replica and two audits
def test_the_overfitted_generator_is_caught_and_refused_and_a_clean_replica_passes(controlled):
    project, doc = controlled
    root = project.root
    assert json.loads((root / "metrics" / "memorisation" / MEMORISATION_JSON).read_text()) == json.loads(
        json.dumps(doc, default=str))
    control, clean = doc["control"], doc["demo"]
    # The control: conditioned on the 12 images it learnt (2 samples each), its images sit on them.
    assert control["images"] == 24 and control["training_subset"] == 12
    assert control["nearest_in_subset"] >= 0.75
    assert control["flagged"] >= 0.75 * control["images"] > 4 * control["expected_by_chance"]
    assert control["beyond_chance"] and not control["gate_passed"] and control["p_value"] < 1e-6
    assert 1 <= control["copies"] <= 12  # training images copied at least once: only the ones it saw
    subset = set(manifest.read(root, "cxp_control_train")["key"])
    assert len(subset) == 12 and {p["training_key"] for p in control["closest"]} <= subset
    assert control["nearest"]["median"] < control["heldout_nearest"]["median"]
    # The untrained generator's replica copied nothing: at (or below) chance, through the gate.
    assert clean["images"] == len(manifest.read(root, "syn")) and not clean["beyond_chance"] and clean["gate_passed"]
    assert clean["flagged"] <= clean["expected_by_chance"] + 1 and clean["hard_copies"] == 0
    assert doc["verdict"] == {"control_caught": True, "demo_at_chance": True}
    for label in ("control", "demo"):
        assert {"audit.json", "distances.png", "pairs.png"} <= set(doc[label]["files"])
    # The control is a copy machine of real images: its data are a version like any other, kept local by dvc.yaml.
    assert manifest.read_meta(root, "cxp_control")["kind"] == "synthetic"


@pytest.mark.slow
def test_the_report_section_shows_both_generators_with_their_figures(controlled):
    project, doc = controlled
    study = report.load(project.root, PARAMS)
    sentences = memorisation_sentences(study)
    assert len(sentences) == 2
    assert "caught: flagged far beyond chance" in sentences[0] and f"{doc['control']['flagged']} of 24" in sentences[0]
    assert "demo generator" in sentences[1] and "MORE than chance" not in sentences[1]
    html = memorisation_section(study)

    class Images(HTMLParser):
        count = 0

        def handle_starttag(self, tag, attrs):
            self.count += tag == "img" and dict(attrs).get("src", "").startswith("data:image/png;base64,")

    page = Images()
    page.feed(html)
    assert page.count == 4  # two histograms, two closest-pairs panels, embedded
    assert "beyond chance" in html and "at chance" in html and "cxp_control" in html


def test_the_control_refuses_more_images_than_the_training_split_has(share_project, tmp_path):
    from cxrsynth.share.control import ControlError

    with pytest.raises(ControlError, match="fewer than the 500"):
        memorisation(share_project.root, "cxp", "syn", tmp_path / "m", ControlConfig(images=500, device="cpu"))
