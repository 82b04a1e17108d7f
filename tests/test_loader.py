"""The classifier loader: reproducible order whatever the workers, rank x worker coverage, fixed epochs, masks."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import chexpert_rows, write_chexpert
from typer.testing import CliRunner

from cxrsynth import ingest, labels, loader, manifest, splits
from cxrsynth.cli import app
from cxrsynth.errors import CxrsynthError
from cxrsynth.imaging import Preprocess
from cxrsynth.sources import chexpert


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two sites (24 + 12 images with uncertain labels, 32 px, shards of 5 and 4 rows) and a mix of both.

    Site A is split train/tune, so its shards hold rows of two splits; the mix ``both``
    holds every row of both sites as ``train`` and points into both sites' shards.
    """
    tmp = tmp_path_factory.mktemp("loader")
    root = tmp / "proj"
    rows_b = [dict(r, Path=r["Path"].replace("/patient", "/patient9")) for r in chexpert_rows(n_patients=6, studies=2)]
    for name, rows, shard_size in (("siteA", chexpert_rows(n_patients=12, studies=2), 5), ("siteB", rows_b, 4)):
        csv = write_chexpert(tmp / f"raw_{name}", rows)
        ingest.ingest(chexpert.read(csv), root=root, name=name, kind="chexpert", inputs={}, params=Preprocess(size=32),
                      shard_size=shard_size, workers=1)
    splits.split(root, "siteA", splits.SplitParams(tune=0.3, seed=0))
    both = pd.concat([manifest.read(root, "siteA"), manifest.read(root, "siteB")], ignore_index=True)
    both["split"] = "train"
    manifest.write(root, "both", both, {"kind": "mix", "version": "testmix"})
    return root


def run(root, rows, epoch=0, start=0, rank=0, world=1, **config):
    return list(loader.ShardLoader(root, rows, loader.LoaderConfig(**config), rank=rank, world=world).batches(epoch, start))


def flat_keys(batches):
    return [k for b in batches for k in b["key"]]


def assert_same(a, b):
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["labels"], y["labels"]) and torch.equal(x["mask"], y["mask"])
        assert x["dataset"] == y["dataset"]


def test_same_batches_for_0_1_2_workers(project):
    rows = loader.select(project, "both", None, exclude_uncertain=False)
    config = dict(batch_size=4, streams=4, train=True, seed=3)  # augmentation on (the default)
    runs = {w: run(project, rows, epoch=1, workers=w, **config) for w in (0, 1, 2)}
    assert len(runs[0]) == len(rows) // 4 == 9
    assert_same(runs[0], runs[1])
    assert_same(runs[0], runs[2])
    again = run(project, rows, epoch=1, workers=2, **config)
    assert_same(runs[0], again)  # a second pass, same seed and epoch: the same bytes
    other = run(project, rows, epoch=2, workers=0, **config)
    assert flat_keys(other) != flat_keys(runs[0])  # each epoch its own order
    image = runs[0][0]["image"]
    assert image.dtype == torch.float32 and image.shape == (4, 1, 32, 32) and 0 <= image.min() and image.max() <= 1
    plain = run(project, rows, epoch=1, workers=0, augment=None, **config)
    assert flat_keys(plain) == flat_keys(runs[0]) and not torch.equal(plain[0]["image"], image)  # augmented
    # Unaugmented batches leave a worker as uint8 and are divided in the main process: the same float32 bytes.
    for w in (1, 2):
        shipped = run(project, rows, epoch=1, workers=w, augment=None, **config)
        assert_same(plain, shipped)
        assert shipped[0]["image"].dtype == torch.float32
    assert torch.equal(plain[0]["image"] * 255, (plain[0]["image"] * 255).round())  # uint8 / 255 exactly


def test_two_ranks_two_workers_read_disjoint_shares_covering_every_row(project):
    rows = loader.select(project, "both", None, exclude_uncertain=False)
    assert len(rows) == 36 and set(rows["dataset"]) == {"siteA", "siteB"}
    shares = [run(project, rows, epoch=0, rank=r, world=2, workers=2, batch_size=3, streams=4) for r in (0, 1)]
    assert [len(s) for s in shares] == [6, 6]  # 36 // (2 x 3) on each rank
    keys = [flat_keys(s) for s in shares]
    assert not set(keys[0]) & set(keys[1])  # disjoint
    assert sorted(keys[0] + keys[1]) == sorted(rows["key"])  # complete, no duplicates
    by_key = rows.set_index("key")["dataset"]
    for share in shares:
        for b in share:
            assert b["dataset"] == by_key.loc[b["key"]].tolist()  # each row's own dataset (a mix of two sites)


def test_fixed_epoch_length_is_equal_across_ranks(project):
    rows = loader.select(project, "both", None, exclude_uncertain=False)
    for world in (2, 3):
        expected = len(rows) // (world * 5)
        for epoch in (0, 1):
            shares = [run(project, rows, epoch=epoch, rank=r, world=world, batch_size=5, streams=2) for r in range(world)]
            assert [len(s) for s in shares] == [expected] * world
            assert all(len(b["key"]) == 5 for s in shares for b in s)
            keys = [k for s in shares for k in flat_keys(s)]
            assert len(keys) == len(set(keys))  # disjoint within an epoch, even with rows left over
        ld = loader.ShardLoader(project, rows, loader.LoaderConfig(batch_size=5, streams=2), rank=world - 1, world=world)
        assert len(ld) == expected


def test_uncertain_findings_are_masked_and_excluded_for_training(project):
    every = loader.select(project, "siteA", None, exclude_uncertain=False)
    certain = loader.select(project, "siteA", None)
    codes = labels.findings_matrix(every)
    assert (codes == -1).any() and len(certain) == int((~(codes == -1).any(axis=1)).sum()) < len(every)
    assert not (labels.findings_matrix(certain) == -1).any()
    by_key = dict(zip(every["key"], codes))
    seen = 0
    for b in run(project, every, train=False, batch_size=4, workers=2, streams=2):
        for key, y, m in zip(b["key"], b["labels"].numpy(), b["mask"].numpy()):
            c = by_key[key]
            assert np.array_equal(m, (c != -1).astype(np.float32)) and np.array_equal(y, (c == 1).astype(np.float32))
            seen += 1
    assert seen == len(every)


def test_inference_reads_every_row_once_unaugmented_and_skips_other_splits(project):
    tune = loader.select(project, "siteA", "tune", exclude_uncertain=False)
    frame = manifest.read(project, "siteA")
    assert set(frame.loc[frame["split"] == "train", "shard"]) & set(tune["shard"])  # shards shared with train rows
    batches = [b for r in (0, 1) for b in run(project, tune, rank=r, world=2, train=False, batch_size=3, workers=1, streams=1)]
    assert sorted(flat_keys(batches)) == sorted(tune["key"])  # every tune row once, no train row
    pngs = {}
    for shard in tune["shard"].unique():
        with tarfile.open(project / shard) as tar:
            pngs.update({m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")})
    for b in batches:
        for key, image in zip(b["key"], b["image"]):
            want = torch.from_numpy(loader.decode_png(pngs[key], None)).float() / 255
            assert torch.equal(image[0], want)
    resized = run(project, tune, train=False, batch_size=3, image_size=16)
    assert resized[0]["image"].shape[1:] == (1, 16, 16)


def test_resume_inside_an_epoch_gives_the_rest_of_it(project):
    rows = loader.select(project, "both", None, exclude_uncertain=False)
    config = dict(batch_size=3, streams=4, seed=1)
    whole = run(project, rows, epoch=2, workers=2, **config)
    for start in (1, 3, 6):
        assert_same(run(project, rows, epoch=2, start=start, workers=2, **config), whole[start:])
    assert run(project, rows, epoch=2, start=len(whole), **config) == []


def test_plan_lays_streams_end_to_end():
    counts = [("b", 3), ("a", 5), ("c", 4)]
    streams = loader.plan(counts, batch_size=2, world=2, streams=2, train=False)
    assert [(s.rank, s.index) for s in streams] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert sum(s.samples for s in streams) == 12
    spans = [sp for s in streams for sp in s.spans]  # contiguous over a, b, c (sorted when not training)
    per_shard = {}
    for sp in spans:
        assert sp.skip == per_shard.get(sp.shard, 0)
        per_shard[sp.shard] = sp.skip + sp.take
    assert per_shard == {"a": 5, "b": 3, "c": 4}
    train = loader.plan(counts, batch_size=2, world=2, streams=2, train=True, seed=0, epoch=0)
    assert [s.batches for s in train] == [(2, 2), (2, 2), (2,), (2,)]  # 12 // (2 x 2) = 3 batches per rank


def test_errors_name_the_problem(project):
    rows = loader.select(project, "both", None, exclude_uncertain=False)
    with pytest.raises(loader.LoaderError, match="must divide streams"):
        loader.ShardLoader(project, rows, loader.LoaderConfig(batch_size=2, workers=3, streams=4))
    with pytest.raises(loader.LoaderError, match="fewer than one global batch"):
        loader.ShardLoader(project, rows.head(5), loader.LoaderConfig(batch_size=3), world=2)
    with pytest.raises(loader.LoaderError, match="no rows in split 'test'"):
        loader.select(project, "siteA", "test")
    with pytest.raises(CxrsynthError, match="no manifest named"):
        loader.select(project, "nope", None)
    labels_only = manifest.read(project, "siteB").assign(shard=pd.NA)
    manifest.write(project, "labelsonly", labels_only, {"version": "x"})
    with pytest.raises(loader.LoaderError, match="have no shard"):
        loader.select(project, "labelsonly", None)
    wrong = rows.copy()
    a_shards = sorted(wrong.loc[wrong["dataset"] == "siteA", "shard"].unique())
    wrong.loc[wrong["dataset"] == "siteB", "shard"] = a_shards[0]  # siteB's rows are not in that shard
    with pytest.raises(loader.LoaderError, match="selected rows the manifest places in it"):
        run(project, wrong, train=False, batch_size=4)


def test_bench_load_reports_ceiling_and_each_worker_count(project):
    result = CliRunner().invoke(app, ["bench", "load", "--data", "both", "--split", "all", "--workers", "0,2",
                                      "--batch", "4", "--json", "--root", str(project)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["images"] == 36 and r["image_side"] == 32 and r["ceiling"]["images"] == 36 and r["ceiling"]["images_per_s"] > 0
    assert [x["workers"] for x in r["loader"]] == [0, 2] and all(x["images"] == 36 and x["images_per_s"] > 0 for x in r["loader"])
    table = CliRunner().invoke(app, ["bench", "load", "--data", "both", "--split", "all", "--workers", "1",
                                     "--root", str(project)], catch_exceptions=False, env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "PIL decode ceiling" in table.output
    bad = CliRunner().invoke(app, ["bench", "load", "--data", "both", "--workers", "x", "--root", str(project)])
    assert bad.exit_code == 2




def test_tar_reader_matches_webdataset_and_falls_back_for_other_tars(project, tmp_path):
    shard = sorted((project / "data" / "shards" / "siteA").rglob("*.tar"))[0]
    every = lambda name: True  # noqa: E731
    with open(shard, "rb") as a, open(shard, "rb") as b:
        assert list(loader.plain_tar_members(a, str(shard), every)) == list(loader._webdataset_members(b, str(shard), every))
    # A GNU tar with a long member name (an 'L' header): read by webdataset's expander, past what was yielded.
    long_key = "k" * 120
    members = [("a.png", b"A"), ("a.json", b"{}"), (f"{long_key}.png", b"L"), ("b.png", b"B"), ("c.png", b"C")]
    path = tmp_path / "gnu.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for skip, want in ((0, ["a", long_key, "b"]), (1, [long_key, "b", "c"])):  # "a" comes before the 'L' header
        span = loader.Span("gnu.tar", skip=skip, take=3)
        got = list(loader.read_spans([(str(path), span)], {str(path): {"a", long_key, "b", "c"}}))
        assert [s["__key__"] for s in got] == want and got[-1]["png"] == {"b": b"B", "c": b"C"}[want[-1]]
    with pytest.raises(loader.LoaderError, match="holds 4 of the 5 selected rows"):
        list(loader.read_spans([(str(path), loader.Span("gnu.tar", skip=0, take=5))], {str(path): {"a", long_key, "b", "c"}}))
