"""Synthetic replicas written as a new shard version by the project's one shard writer."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import chexpert_rows, ingest_site, micro_generator, write_chexpert

from cxrsynth import labels, manifest, shards
from cxrsynth.diffusion import replicas as generate
from cxrsynth.errors import CxrsynthError
from cxrsynth.imaging import decode_png
from cxrsynth.publish import RESERVED
from cxrsynth.verify import verify_dataset


@pytest.fixture
def project(tmp_path):
    rows = chexpert_rows(n_patients=6, studies=1)
    for row in rows:  # no uncertain labels, so every row is a condition
        for f in labels.FINDINGS:
            row[f] = row[f].replace("-1.0", "1.0")
    root = ingest_site(tmp_path, rows, images=False, labels_only=True, split={"tune": 0.34, "seed": 0})
    return root, micro_generator(tmp_path / "gen")


def run(root, gen, name="syn", **kw):
    config = generate.GenerateConfig(replicas=2, steps=2, guidance=2.0, seed=5, shard_size=3, **kw)
    return generate.generate(root=root, generator_dir=gen, conditions="cxp", split="train", name=name, config=config, device="cpu")


def test_replicas_carry_conditions_and_provenance_not_identities(project):
    root, gen = project
    summary = run(root, gen)
    assert summary["complete"] and summary["images"] == 8  # 4 train rows x 2 replicas
    syn = manifest.read(root, "syn")
    real = manifest.read(root, "cxp").set_index("key")
    assert syn["origin"].eq("synthetic").all() and syn["replica"].tolist() == [0] * 4 + [1] * 4
    assert syn["patient_id"].isna().all() and syn["source_path"].isna().all() and syn["study_id"].isna().all()
    assert (syn["generator_id"] == generate.generator_id(gen)).all() and syn["steps"].eq(2).all()
    src = real.loc[syn["source_key"].astype(str)]
    for col in ("sex", "age", "race", "view", "split", *labels.FINDING_COLUMNS):
        assert syn[col].astype(str).tolist() == src[col].astype(str).tolist(), col
    assert syn["seed"].nunique() == 8
    assert verify_dataset(root, "syn") == ([], 3)
    with tarfile.open(root / syn["shard"].iloc[0]) as tar:
        meta = json.loads(tar.extractfile(f"{syn['key'].iloc[0]}.json").read())
    assert meta["source_key"] == syn["source_key"].iloc[0] and meta["patient_id"] is None


def pngs(directory):
    """{(replica, row): png bytes} over all shards of a version folder."""
    out = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    _, replica, row = m.name[: -len(".png")].rsplit("-", 2)
                    out[(replica, row)] = tar.extractfile(m).read()
    return out


def test_batch_size_parts_and_resume_give_identical_bytes(project):
    root, gen = project
    whole = run(root, gen, batch_size=8)
    d = shards.shard_dir(root, "syn", whole["version"])
    reference = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    # a job array of two parts: the same bytes
    config = generate.GenerateConfig(replicas=2, steps=2, guidance=2.0, seed=5, shard_size=3, batch_size=8)
    kw = dict(root=root, generator_dir=gen, conditions="cxp", split="train", config=config, device="cpu")
    a = generate.generate(name="syn2", part="0/2", **kw)
    assert not a["complete"] and a["written"] == 2 and not manifest.manifest_path(root, "syn2").exists()
    b = generate.generate(name="syn2", part="1/2", **kw)
    assert b["complete"] and b["written"] == 1
    assert pngs(shards.shard_dir(root, "syn2", b["version"])) == pngs(d)
    # one image per network call: the same seeds and trajectories; CPU kernels may round
    # differently at another batch size, so pixels agree to within one grey level
    single = generate.generate(name="syn3", **{**kw, "config": generate.GenerateConfig(**{**config.__dict__, "batch_size": 1})})
    assert single["version"] != whole["version"]  # another batch size may round differently: another version
    ref, one = pngs(d), pngs(shards.shard_dir(root, "syn3", single["version"]))
    assert ref.keys() == one.keys()
    for k in ref:
        diff = np.abs(decode_png(ref[k]).astype(int) - decode_png(one[k]).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, k
    # a killed run: a finished shard lost, a half-written one left; the same command again
    (d / "syn-000001.tar").unlink()
    (d / "syn-000002.tar.partial").write_bytes(b"half")
    again = run(root, gen, batch_size=8)
    assert again["written"] == 1
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == reference


def test_a_failed_shard_write_stops_the_run_and_a_rerun_completes_it(project, monkeypatch):
    # Shards are written by a background thread while the next is sampled: its error
    # must reach the caller, and what was finished before it must stay.
    root, gen = project
    write = shards.write_shard
    written = []

    def failing(directory, name, unit, samples, *args):
        if unit == 1:
            raise OSError("disk full")
        written.append(unit)
        return write(directory, name, unit, samples, *args)

    monkeypatch.setattr(shards, "write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        run(root, gen)
    assert written == [0] and not manifest.manifest_path(root, "syn").exists()
    monkeypatch.setattr(shards, "write_shard", write)
    seen = []
    again = generate.generate(root=root, generator_dir=gen, conditions="cxp", split="train", name="syn",
                              config=generate.GenerateConfig(replicas=2, steps=2, guidance=2.0, seed=5, shard_size=3),
                              device="cpu", progress=seen.append)
    assert again["complete"] and again["written"] == 2 and seen == [3, 2]
    fresh = run(root, gen, name="fresh")
    assert pngs(shards.shard_dir(root, "syn", again["version"])) == pngs(shards.shard_dir(root, "fresh", fresh["version"]))


def test_version_records_what_the_bytes_depend_on(project):
    """CPU kernels round by thread count: another count is another version, recorded in the metadata."""
    root, gen = project
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(root, gen, name="t1")
        torch.set_num_threads(2)
        two = run(root, gen, name="t2")
    finally:
        torch.set_num_threads(threads)
    assert one["version"] != two["version"]
    numerics = manifest.read_meta(root, "t1")["numerics"]
    assert numerics["device"] == "cpu" and numerics["threads"] == 1 and numerics["torch"] == torch.__version__
    assert numerics["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert manifest.read_meta(root, "t2")["numerics"]["threads"] == 2


def test_image_seed_is_stable():
    assert generate.image_seed(0, 1, "a") == generate.image_seed(0, 1, "a")
    assert len({generate.image_seed(0, r, k) for r in range(3) for k in "abc"}) == 9
    assert 0 <= generate.image_seed(2**40, 9, "x") < 2**63


def test_cli_train_then_generate_then_verify(tmp_path):
    from typer.testing import CliRunner

    from cxrsynth.cli import app

    rows = chexpert_rows(n_patients=6, studies=2, uncertain=False)
    csv = write_chexpert(tmp_path / "raw", rows)
    root = tmp_path / "proj"
    runner = CliRunner()

    def cli(*args):
        result = runner.invoke(app, [str(a) for a in args] + ["--root", str(root)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    cli("ingest", "chexpert", csv, "--name", "cxp", "--size", 32, "--workers", 1)
    cli("split", "cxp", "--tune", 0.2, "--seed", 0)
    cli("generator", "train", "--data", "cxp", "--preset", "micro", "--steps", 3, "--batch", 2, "--save-every", 2,
        "--warmup", 1, "--out", tmp_path / "gen", "--device", "cpu")
    assert (tmp_path / "gen/generator.json").is_file()
    out = cli("generate", "--generator", tmp_path / "gen", "--conditions", "cxp", "--name", "syn", "--replicas", 2,
              "--sampler", "dpmpp", "--steps", 2, "--shard-size", 5, "--device", "cpu")
    assert "complete" in out
    assert "shard(s) match" in cli("verify", "syn")
    counts = cli("query", "SELECT origin, count(*) AS n FROM images GROUP BY origin ORDER BY origin", "--format", "csv")
    n_train = int(manifest.query(root, "SELECT count(*) AS n FROM cxp WHERE split = 'train'")["n"].iloc[0])
    assert counts.splitlines() == ["origin,n", "real,12", f"synthetic,{2 * n_train}"]


def test_rebalanced_replicas_raise_rare_findings(project):
    """Targeted synthesis: each replica draws its conditions so rarer findings reach the target."""
    root, gen = project
    config = generate.GenerateConfig(replicas=2, steps=1, seed=5, shard_size=50, rebalance=0.4)
    summary = generate.generate(root=root, generator_dir=gen, conditions="cxp", split="train", name="reb",
                                config=config, device="cpu")
    syn = manifest.read(root, "reb")
    src = generate.condition_rows(root, "cxp", "train")
    assert summary["complete"] and len(syn) == 2 * len(src)  # same size as plain replicas
    assert set(syn["source_key"]) <= set(src["key"]) and syn["seed"].nunique() == len(syn)
    before = (labels.findings_matrix(src) == 1).mean(axis=0)
    after = (labels.findings_matrix(syn) == 1).mean(axis=0)
    rare = (before > 0) & (before < 0.4)
    assert rare.any() and np.all(after[rare] >= before[rare])  # tiny source: raised, as far as 4 rows allow
    assert manifest.read_meta(root, "reb")["rebalance"] == 0.4
    plain = run(root, gen, name="plain")  # a plain replica set records no rebalance field
    assert "rebalance" not in manifest.read_meta(root, "plain")
    assert plain["version"] == run(root, gen, name="plain")["version"]


def test_a_split_the_conditions_lack_is_refused(project):
    root, gen = project
    with pytest.raises(CxrsynthError, match="no rows in split"):
        generate.condition_rows(root, "cxp", "train,nope")


def test_a_shard_whose_recorded_inputs_differ_is_redone(project):
    """Each receipt records what its unit was made from; resume reuses a shard only when that is unchanged."""
    root, gen = project
    first = run(root, gen)
    d = shards.shard_dir(root, "syn", first["version"])
    reference = {p.name: p.read_bytes() for p in d.glob("*.tar")}
    rows = manifest.read(root, "syn")
    params = {k: v for k, v in manifest.read_meta(root, "syn").items() if k not in (*RESERVED, "generator")}
    receipts = [json.loads((d / shards.PROGRESS_DIR / f"syn-{u:06d}.tar.json").read_text()) for u in range(3)]
    for u, receipt in enumerate(receipts):
        assert receipt["inputs"] == generate.unit_inputs(shards.sample_records(rows.iloc[3 * u : 3 * u + 3]), params)
    assert len({r["inputs"] for r in receipts}) == 3
    # a shard made from other inputs (another plan under this version): redone, not reused
    path = d / shards.PROGRESS_DIR / "syn-000001.tar.json"
    path.write_text(json.dumps({**receipts[1], "inputs": "0" * 64}))
    again = run(root, gen)
    assert again["version"] == first["version"] and again["written"] == 1 and again["complete"]
    assert {p.name: p.read_bytes() for p in d.glob("*.tar")} == reference
    assert json.loads(path.read_text())["inputs"] == receipts[1]["inputs"]
    assert run(root, gen)["written"] == 0


@pytest.mark.slow  # ~10 s: two CLI processes
def test_the_slurm_array_script_writes_the_same_bytes_as_one_run(project):
    """scripts/generate-array.slurm as two array tasks (SLURM_ARRAY_TASK_ID 0 and 1 of 2) gives the replica
    set one `generate` run writes."""
    import os
    import subprocess
    import sys

    root, gen = project
    whole = run(root, gen, batch_size=8)
    script = Path(__file__).resolve().parents[1] / "scripts" / "generate-array.slurm"
    env = {**os.environ, "PROJECT": str(root), "GENERATOR": str(gen), "CONDITIONS": "cxp", "SPLIT": "train", "NAME": "arr",
           "REPLICAS": "2", "GUIDANCE": "2", "STEPS": "2", "BATCH": "8", "SEED": "5", "SHARD_SIZE": "3",
           "SLURM_ARRAY_TASK_COUNT": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for task in ("0", "1"):
        done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": task}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    assert "complete" in done.stdout
    arr = manifest.read_meta(root, "arr")
    assert pngs(shards.shard_dir(root, "arr", arr["version"])) == pngs(shards.shard_dir(root, "syn", whole["version"]))
