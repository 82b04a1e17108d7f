"""Wrong answers reported as right: what verify, compare and evaluate pass must be what they say.

The CLI rows of this class are in ``tests/bad_inputs.py``; here are the checks that do not
fit a row: a mix's rows against its recorded sources, an in-place import made before shard
hashes were recorded, compare's other findings, scores on the edge of [0, 1], and every
name or key check against a trailing newline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from bad_inputs import _evaluation_project, _imported_in_place, _metrics_pair, _with_mix
from conftest import model_dict, scores_for, write_predictions

from cxrsynth import ingest, manifest, shards
from cxrsynth.errors import CxrsynthError
from cxrsynth.evaluate import metrics
from cxrsynth.evaluate.compare import compare
from cxrsynth.manifest import ManifestError
from cxrsynth.study.params import ParamsError, StudyParams
from cxrsynth.verify import verify_dataset

REPO = Path(__file__).resolve().parents[1]


def _rewrite(root: Path, name: str, frame, **meta_changes) -> None:
    """Rewrite a manifest through manifest.write (so its checksum is right for the new rows)."""
    meta = {k: v for k, v in manifest.read_meta(root, name).items() if k != manifest.CHECKSUM_KEY}
    manifest.write(root, name, frame, {**meta, **meta_changes})


def test_a_mix_verifies_and_its_rows_must_be_of_its_recorded_sources(tmp_path: Path) -> None:
    paths = _with_mix(tmp_path)
    root = paths["root"]
    assert verify_dataset(root, "m")[0] == []
    frame = manifest.read(root, "m")
    frame.loc[0, "version"] = "elsewhere"  # a row of another version of cxp than the one mixed, checksum recomputed
    _rewrite(root, "m", frame)
    (problem,) = verify_dataset(root, "m")[0]
    assert "1 row(s) are not a mixed version of one of its recorded sources cxp@" in problem
    assert f"e.g. {frame.loc[0, 'key']} of cxp@elsewhere" in problem


def test_rows_of_another_version_than_recorded(tmp_path: Path) -> None:
    paths = _with_mix(tmp_path)
    root = paths["root"]
    version = manifest.read_meta(root, "cxp")["version"]
    _rewrite(root, "cxp", manifest.read(root, "cxp"), version="v2")  # the metadata claims another version
    problems = verify_dataset(root, "cxp")[0]
    assert any("3 row(s) are not cxp@v2, the dataset and version it records, e.g." in p and f"cxp@{version}" in p
               for p in problems), problems


def test_in_place_import_without_recorded_hashes_is_reported(tmp_path: Path) -> None:
    """An import made before shard hashes were recorded at import can only be checked against
    the sender's index: verify says so rather than passing it."""
    root = _imported_in_place(tmp_path)["root"]
    assert verify_dataset(root, "imp")[0] == []
    meta = manifest.read_meta(root, "imp")
    assert [e["name"] for e in meta["imported"]["package"]["shards"]] == ["syn-000000.tar"]
    del meta["imported"]["package"]["shards"]
    _rewrite(root, "imp", manifest.read(root, "imp"), imported=meta["imported"])
    (problem,) = verify_dataset(root, "imp")[0]
    assert "imported in place before cxrsynth recorded a package's shard hashes" in problem


def test_compare_refuses_metrics_of_other_findings(tmp_path: Path) -> None:
    paths = _metrics_pair()(tmp_path)
    other = json.loads(paths["other"].read_text())
    other["findings"].pop("fracture")
    paths["other"].write_text(json.dumps(other))
    with pytest.raises(CxrsynthError, match="other.json has metrics of other findings .* than this cxrsynth's"):
        compare(paths["root"], paths["base"], [paths["other"]])
    assert compare(paths["root"], paths["base"], [paths["base"]])["comparisons"]  # the same file: comparable


def test_scores_of_exactly_0_and_1_are_probabilities(tmp_path: Path) -> None:
    paths = _evaluation_project(tmp_path)
    scores = scores_for(paths["test"])
    scores[0, :], scores[1, :] = 0.0, 1.0
    write_predictions(paths["pred"], paths["test"], scores, model=model_dict())
    ev = metrics.evaluate(paths["root"], paths["pred"], metrics.EvaluateConfig(bootstrap=0))
    assert ev.metrics["macro"]["auroc"] is not None
    scores[2, 0] = np.nextafter(np.float32(1), np.float32(2))
    write_predictions(paths["pred"], paths["test"], scores, model=model_dict())
    with pytest.raises(CxrsynthError, match=r"1 score\(s\) in 1 column\(s\).*no_finding \(1 outside \[0, 1\]"):
        metrics.evaluate(paths["root"], paths["pred"], metrics.EvaluateConfig(bootstrap=0))


@pytest.mark.parametrize("name", ["cxp\n", "cxp\r\n", "\ncxp"])
def test_names_are_matched_whole(name: str) -> None:
    with pytest.raises(ManifestError, match="must match"):
        manifest.check_name(name)
    with pytest.raises(CxrsynthError, match="must match"):
        ingest.check_version(name)


def test_tar_member_keys_are_matched_whole() -> None:
    assert shards.refusal(shards.Member("k1.png", b"0", 10, 512)) is None
    assert "not named <key>.<ext>" in shards.refusal(shards.Member("k1\n.png", b"0", 10, 512))


def test_replica_names_are_matched_whole() -> None:
    mapping = yaml.safe_load((REPO / "params.yaml").read_text())
    mapping["replicas"]["w1\n"] = mapping["replicas"].pop("w1")
    with pytest.raises(ParamsError, match="replicas.w1"):
        StudyParams.from_dict(mapping)
