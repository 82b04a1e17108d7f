"""Generator batches through the one loader (``order="buffer"``): selection, conditions, determinism, DDP partition.

(``cxrsynth.stream`` folded into :mod:`cxrsynth.loader`; these are its tests on the new API.)
"""

import pytest
import torch
from conftest import chexpert_rows, ingest_site

from cxrsynth import labels, loader, manifest


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    return ingest_site(tmp, chexpert_rows(n_patients=10, studies=3), shard_size=7, split={"tune": 0.2, "seed": 0})


def batches(root, split, batch_size, size, *, train, seed, rank=0, world=1, exclude_uncertain=True, epoch=0):
    rows = loader.select(root, "cxp", split, exclude_uncertain=exclude_uncertain)
    config = loader.LoaderConfig(batch_size=batch_size, image_size=size, train=train, augment=None, seed=seed,
                                 order="buffer", cond=True, uint8=True)
    return list(loader.ShardLoader(root, rows, config, rank=rank, world=world).batches(epoch))


def keys(batches):
    return [k for b in batches for k in b["key"]]


def test_batches_select_split_without_uncertain_and_carry_conditions(project):
    frame = manifest.read(project, "cxp")
    want = frame.loc[(frame["split"] == "train") & ~labels.has_uncertain(frame)]
    got = batches(project, "train", 4, 16, train=False, seed=0)
    assert sorted(keys(got)) == sorted(want["key"])
    b = got[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (1, 16, 16)
    cond = labels.conditioning_vectors(want.set_index("key").loc[b["key"]].reset_index())
    assert torch.equal(b["cond"], torch.from_numpy(cond))
    with_unc = keys(batches(project, "train", 4, 16, train=False, seed=0, exclude_uncertain=False))
    assert len(with_unc) == int((frame["split"] == "train").sum()) > len(want)


def test_train_order_is_seeded_and_ranks_partition(project):
    frame = loader.select(project, "cxp", None, exclude_uncertain=False)
    a = keys(batches(project, None, 2, 16, train=True, seed=1, exclude_uncertain=False))
    b = keys(batches(project, None, 2, 16, train=True, seed=1, exclude_uncertain=False))
    c = keys(batches(project, None, 2, 16, train=True, seed=1, epoch=1, exclude_uncertain=False))
    assert a == b and a != c and len(a) == len(frame) // 2 * 2
    ranks = [keys(batches(project, None, 1, 16, train=True, seed=1, rank=r, world=3, exclude_uncertain=False)) for r in range(3)]
    flat = [k for r in ranks for k in r]
    assert len(flat) == len(set(flat)) == len(frame) // 3 * 3  # disjoint; every rank the same number of batches
    assert len({len(r) for r in ranks}) == 1


def test_buffer_order_refuses_workers_and_augmented_uint8(project):
    rows = loader.select(project, "cxp", None, exclude_uncertain=False)
    with pytest.raises(loader.LoaderError, match="workers must be 0"):
        loader.ShardLoader(project, rows, loader.LoaderConfig(batch_size=2, order="buffer", workers=2, streams=2))
    with pytest.raises(loader.LoaderError, match="uint8 needs augment=None"):
        loader.ShardLoader(project, rows, loader.LoaderConfig(batch_size=2, uint8=True))
    with pytest.raises(loader.LoaderError, match="unknown loader order"):
        loader.ShardLoader(project, rows, loader.LoaderConfig(batch_size=2, order="random"))
