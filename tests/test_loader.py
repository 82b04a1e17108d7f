"""The classifier loader: reproducible order whatever the workers, rank x worker coverage, fixed epochs, masks."""

from __future__ import annotations

import io
import json
import tarfile
from itertools import islice

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import chexpert_rows, ingest_site
from typer.testing import CliRunner

from cxrsynth import labels, loader, manifest, shards, sheet
from cxrsynth.cli import app
from cxrsynth.errors import CxrsynthError
from cxrsynth.imaging import ImageError, decode_png


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two sites (24 + 12 images with uncertain labels, 32 px, shards of 5 and 4 rows) and a mix of both.

    Site A is split train/tune, so its shards hold rows of two splits; the mix ``both``
    holds every row of both sites as ``train`` and points into both sites' shards.
    """
    tmp = tmp_path_factory.mktemp("loader")
    rows_b = [dict(r, Path=r["Path"].replace("/patient", "/patient9")) for r in chexpert_rows(n_patients=6, studies=2)]
    root = ingest_site(tmp, chexpert_rows(n_patients=12, studies=2), name="siteA", shard_size=5, raw="raw_siteA",
                       split={"tune": 0.3, "seed": 0})
    ingest_site(tmp, rows_b, name="siteB", shard_size=4, raw="raw_siteB")
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
            want = torch.from_numpy(decode_png(pngs[key])).float() / 255
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
    import webdataset as wds

    shard = sorted((project / "data" / "shards" / "siteA").rglob("*.tar"))[0]
    with open(shard, "rb") as stream:
        expanded = wds.tariterators.tar_file_expander([{"url": str(shard), "stream": stream}], eof_value=None)
        expected = [(m["fname"], m["data"]) for m in expanded]
    assert list(shards.members(shard)) == expected == list(shards.members(shard, untrusted=True))
    assert [(m.name, m.size) for m in shards.headers(shard)] == [(n, len(d)) for n, d in expected]
    # A GNU tar with a long member name (an 'L' header): read by webdataset's expander, past what was yielded.
    long_key = "k" * 120
    members = [("a.png", b"A"), ("a.json", b"{}"), (f"{long_key}.png", b"L"), ("b.png", b"B"), ("c.png", b"C")]
    path = tmp_path / "gnu.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(shards.members(path)) == members
    assert [m.name for m in shards.headers(path)] == [n for n, _ in members]
    for skip, want in ((0, ["a", long_key, "b"]), (1, [long_key, "b", "c"])):  # "a" comes before the 'L' header
        span = loader.Span("gnu.tar", skip=skip, take=3)
        got = list(loader.read_spans([(str(path), span)], {str(path): {"a", long_key, "b", "c"}}))
        assert [s["__key__"] for s in got] == want and got[-1]["png"] == {"b": b"B", "c": b"C"}[want[-1]]
    with pytest.raises(loader.LoaderError, match="holds 4 of the 5 selected rows"):
        list(loader.read_spans([(str(path), loader.Span("gnu.tar", skip=0, take=5))], {str(path): {"a", long_key, "b", "c"}}))
    with pytest.raises(shards.ShardNotFound, match="missing shard"):
        list(shards.members(tmp_path / "nope.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(shards.ShardError, match="not a readable tar"):
        list(shards.members(tmp_path / "junk.tar"))


def test_images_for_rows_by_key_and_refuses_rows_without_their_sample(project):
    rows = loader.select(project, "both", None, exclude_uncertain=False)
    pngs = dict(shards.images(project, rows))
    assert set(pngs) == set(rows["key"])
    for shard in rows["shard"].unique()[:2]:
        with tarfile.open(project / shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    assert pngs[m.name[:-4]] == tar.extractfile(m).read()
    moved = rows.head(3).assign(shard=rows.loc[rows["dataset"] == "siteB", "shard"].iloc[0])  # siteA keys, a siteB shard
    with pytest.raises(shards.ShardError, match="holds no sample"):
        list(shards.images(project, moved))
    assert list(shards.images(project, moved, strict=False)) == []
    with pytest.raises(shards.ShardError, match="have no shard"):
        list(shards.images(project, rows.assign(shard=pd.NA)))


def test_one_select_for_loaders_and_conditions(project):
    labels_only = manifest.read(project, "siteA").assign(shard=pd.NA)
    manifest.write(project, "siteA_labels", labels_only, {"version": "y"})
    with pytest.raises(loader.LoaderError, match="rows have no shard"):
        loader.select(project, "siteA_labels", "train")  # a loader never drops a row silently
    conditions = loader.select(project, "siteA_labels", "train,tune", images=False)  # generate's conditions: labels only
    assert len(conditions) == int((~labels.has_uncertain(labels_only)).sum())
    with pytest.raises(loader.LoaderError, match="no rows in split 'nope'"):
        loader.select(project, "siteA", "train,nope")


# Recorded from cxrsynth.stream.batches (the generator's batches before stream.py folded into this
# loader) on the `project` fixture: (name, split, batch_size, image_size, train, seed, epoch, rank,
# world) -> (batches, sha256 of every batch's keys, uint8 pixels, conditioning vectors and shape).
STREAM_BATCHES = [
    (("both", None, 4, 32, True, 1, 0, 0, 1), (9, "ae8e21c8e127d219")),
    (("both", None, 4, 32, True, 1, 1, 0, 1), (9, "aedd6be1129b56a2")),
    (("both", None, 3, 16, True, 2, 0, 0, 2), (6, "ca9282fbe9a984f6")),
    (("both", None, 3, 16, True, 2, 0, 1, 2), (6, "83ffba4449e9815b")),
    (("siteA", "train", 2, 32, True, 0, 0, 0, 1), (8, "105a234fe68263a2")),
    (("siteA", "train", 5, 32, False, 0, 0, 0, 1), (4, "8d58bf20570a875a")),
]
# stream.samples(frame by key, train=True, seed=3, epoch=2, stream=s, streams=2, shuffle_buffer=5): the
# shuffle buffer's eviction path, which the 1000-sample default never reaches on 36 rows.
STREAM_BUFFER5 = [(18, "7f76908c9ec349ea"), (18, "3422757cd3b3ace6")]
# evaluate.frechet.dataset_images(root, "both", None, 24, batch=5) through stream.batches.
FID_IMAGES = (8, "32bca0b6441b0b47")


def _digest(batches, cond=True):
    import hashlib

    h, n = hashlib.sha256(), 0
    for b in batches:
        h.update(" ".join(b["key"]).encode())
        h.update(b["image"].numpy().tobytes())
        if cond:
            h.update(b["cond"].numpy().tobytes())
        h.update(str(tuple(b["image"].shape)).encode())
        n += 1
    return n, h.hexdigest()[:16]


def test_generator_batches_are_the_old_stream_batches_byte_for_byte(project):
    import hashlib

    from cxrsynth.evaluate import frechet as fid

    for (name, split, batch_size, size, train, seed, epoch, rank, world), want in STREAM_BATCHES:
        rows = loader.select(project, name, split, exclude_uncertain=False)
        config = loader.LoaderConfig(batch_size=batch_size, image_size=size, train=train, augment=None, seed=seed,
                                     order="buffer", cond=True, uint8=True)
        got = list(loader.ShardLoader(project, rows, config, rank=rank, world=world).batches(epoch))
        assert all(b["image"].dtype == torch.uint8 for b in got)
        assert _digest(got) == want, (name, split, rank, world)
    rows = loader.select(project, "both", None, exclude_uncertain=False).sort_values("key")
    data = loader.ShardLoader(project, rows, loader.LoaderConfig(batch_size=1, seed=3, shuffle_buffer=5, order="buffer",
                                                                  augment=None))
    for s, want in enumerate(STREAM_BUFFER5):
        got = [x["__key__"] for x in islice(loader.buffer_samples(project, data.rows, data.config, 2), s, None, 2)]
        assert (len(got), hashlib.sha256(" ".join(got).encode()).hexdigest()[:16]) == want
    inference = loader.LoaderConfig(batch_size=5, image_size=24, train=False, streams=1, cond=True, uint8=True)
    got = list(loader.ShardLoader(project, rows, inference).batches())
    assert _digest(got) == FID_IMAGES
    fid_images = fid.dataset_images(project, "both", None, 24, batch=5)
    assert all(torch.equal(a, b["image"]) for a, b in zip(fid_images, got, strict=True))


@pytest.fixture
def corrupt(project, tmp_path):
    """A copy of the project whose first siteA shard holds a PNG overwritten with zeros (the tar stays valid)."""
    import shutil

    root = tmp_path / "proj"
    shutil.copytree(project, root)
    shard = sorted((root / "data" / "shards" / "siteA").rglob("*.tar"))[0]
    member = next(m for m in shards.headers(shard) if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[member.offset : member.offset + member.size] = bytes(member.size)
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    return root, member.name[: -len(".png")], shard.name


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_png_is_a_clean_error_naming_key_and_shard(corrupt, workers, tmp_path):
    root, key, shard = corrupt
    rows = loader.select(root, "siteA", None, exclude_uncertain=False)
    classifier = loader.LoaderConfig(batch_size=4, train=False, workers=workers, streams=2)
    with pytest.raises(ImageError, match="corrupt PNG") as caught:
        list(loader.ShardLoader(root, rows, classifier).batches())
    assert key in str(caught.value) and shard in str(caught.value)
    assert str(caught.value).startswith(f"sample {key!r} in ") and "Traceback" not in str(caught.value)  # one clean line
    if workers:
        return
    generator = loader.LoaderConfig(batch_size=4, image_size=16, augment=None, order="buffer", cond=True, uint8=True)
    with pytest.raises(ImageError, match="corrupt PNG") as caught:
        list(loader.ShardLoader(root, rows, generator).batches())
    assert key in str(caught.value) and shard in str(caught.value)
    with pytest.raises(ImageError, match="corrupt PNG") as caught:
        sheet.dataset_sheet(root, "siteA", tmp_path / "sheet.png", n=40)
    assert key in str(caught.value) and shard in str(caught.value)
