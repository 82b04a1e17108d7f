"""Streaming shards as training batches: selection, determinism, DDP partition."""

import pytest
import torch
from conftest import chexpert_rows, write_chexpert

from cxrsynth import ingest, labels, manifest, splits, stream
from cxrsynth.imaging import Preprocess
from cxrsynth.sources import chexpert


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    rows = chexpert_rows(n_patients=10, studies=3)
    csv = write_chexpert(tmp / "raw", rows)
    ingest.ingest(chexpert.read(csv), root=tmp / "proj", name="cxp", kind="chexpert", inputs={},
                  params=Preprocess(size=32), shard_size=7, workers=1)
    splits.split(tmp / "proj", "cxp", splits.SplitParams(tune=0.2, seed=0))
    return tmp / "proj"


def keys(batches):
    return [k for b in batches for k in b["key"]]


def test_batches_select_split_without_uncertain_and_carry_conditions(project):
    frame = manifest.read(project, "cxp")
    want = frame.loc[(frame["split"] == "train") & ~labels.has_uncertain(frame)]
    got = list(stream.batches(project, "cxp", "train", 4, 16, train=False, seed=0))
    assert sorted(keys(got)) == sorted(want["key"])
    b = got[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (1, 16, 16)
    cond = labels.conditioning_vectors(want.set_index("key").loc[b["key"]].reset_index())
    assert torch.equal(b["cond"], torch.from_numpy(cond))
    with_unc = keys(stream.batches(project, "cxp", "train", 4, 16, train=False, seed=0, exclude_uncertain=False))
    assert len(with_unc) == int((frame["split"] == "train").sum()) > len(want)


def test_train_order_is_seeded_and_ranks_partition(project):
    frame = stream.select(project, "cxp", None, exclude_uncertain=False)
    a = keys(stream.batches(project, "cxp", None, 2, 16, train=True, seed=1, exclude_uncertain=False))
    b = keys(stream.batches(project, "cxp", None, 2, 16, train=True, seed=1, exclude_uncertain=False))
    c = keys(stream.batches(project, "cxp", None, 2, 16, train=True, seed=1, epoch=1, exclude_uncertain=False))
    assert a == b and a != c and len(a) == len(frame) // 2 * 2
    ranks = [keys(stream.batches(project, "cxp", None, 1, 16, train=True, seed=1, rank=r, world=3, exclude_uncertain=False)) for r in range(3)]
    flat = [k for r in ranks for k in r]
    assert len(flat) == len(set(flat)) == len(frame)  # disjoint and complete
