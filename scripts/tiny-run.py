"""Run the study's `dvc repro` on a tiny parameter set and print the sha256 of everything it published.

A refactor's check: run it on the commit before and after, and compare the two JSON files.
Every published file (shards, manifests, models, metrics, the report's data) is listed by its
path under one fixed temporary folder, so two runs compare file by file.

    python scripts/tiny-run.py --out before.json            # this working tree (git-tracked files)
    git stash; python scripts/tiny-run.py --out after.json   # ...
    python scripts/tiny-run.py --compare before.json after.json

The code that runs is the tree's own: PYTHONPATH points at the copy, so the installed
editable package does not shadow it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

#: The published trees of a study run (DVC outputs), hashed file by file.
PUBLISHED = ("data", "manifests", "metrics", "report/metrics.json", "report/plots")
#: Working state under data/ that is not published (resume checkpoints, digest caches, locks).
UNPUBLISHED = ("data/checkpoints/", "data/.cxrsynth/")
#: The export secret of dvc.yaml's package stages (local state, never pushed).
TINY_SECRET = "data/.cxrsynth/export-secret"
#: Files whose bytes legitimately carry the run's time or machine (left out of the comparison).
VOLATILE = ("report/index.html",)
#: File names whose bytes carry the run's time wherever they are (an audit records its seconds).
VOLATILE_NAMES = ("audit.json",)


def tiny_params(params: dict) -> dict:
    """Every stage of the study, a few seconds each (also tests/test_pipeline.py's parameters)."""
    params.update(image_size=32, shard_size=40)
    params["phantom"] = {"cxp": 120, "mimic": 60, "emory": 40}
    params["generator"].update(preset="micro", steps=4, batch=4, warmup=1)
    params["generate"].update(steps=2, batch=16)
    params["replicas"] = {"w1": {"guidance": 1.0, "replicas": 2}}
    params["cfg"]["replicas"] = ["w1"]
    for family in ("supplement", "synthetic", "external"):
        params[family]["replica"] = "w1"
    params["supplement"]["k"] = [0, 1]
    params["synthetic"]["k"] = [1]
    params["external"]["k"] = [0, 1]
    params["classifier"].update(image_size=16, epochs=1, exclude_uncertain=False)
    params["evaluate"]["bootstrap"] = 20
    params["memorisation"].update(images=8, steps=20, batch=8)
    params["share"].update(detector_steps=30, detector_align=4)
    return params


def tiny_project(tree: Path, clone: Path) -> dict:
    """Copy the project's files from ``tree`` (git's view: no tests, data, manifests, metrics or
    dvc.lock) to ``clone`` with the tiny parameters; returns them."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=tree,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (tree / name).is_file() and not name.startswith(("tests/", "manifests/", "metrics/")) and name != "dvc.lock":
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree / name, clone / name)
    (clone / "manifests").mkdir(exist_ok=True)
    (clone / "metrics").mkdir(exist_ok=True)
    params = tiny_params(yaml.safe_load((clone / "params.yaml").read_text()))
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    # the package stages' key-renumbering secret, fixed so that two runs' packages compare byte for byte
    # (a real project draws a random one once: `cxrsynth share secret`)
    secret = clone / TINY_SECRET
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("tiny-run: a fixed export secret, for comparing runs only\n")
    return params


def run(tree: Path, work: Path) -> dict[str, str]:
    clone = work / "clone"
    tiny_project(tree, clone)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": str(clone), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    subprocess.run([*git, "add", "-A"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], cwd=clone, check=True)
    done = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"dvc repro failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    hashes = {}
    for top in PUBLISHED:
        base = clone / top
        for path in sorted([base] if base.is_file() else base.rglob("*") if base.is_dir() else []):
            rel = path.relative_to(clone).as_posix()
            if (path.is_file() and rel not in VOLATILE and path.name not in VOLATILE_NAMES and "/.progress/" not in f"/{rel}"
                    and not rel.startswith(UNPUBLISHED)):
                hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def compare(a: dict[str, str], b: dict[str, str]) -> int:
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    for title, names in (("differ", differ), ("only in the first", only_a), ("only in the second", only_b)):
        for name in names:
            print(f"{title}: {name}")
    same = len(a.keys() & b.keys()) - len(differ)
    print(f"{same} files byte-identical, {len(differ)} differ, {len(only_a)} + {len(only_b)} unmatched")
    return 1 if differ or only_a or only_b else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="working tree to run (default: this one)")
    parser.add_argument("--out", type=Path, help="write the hashes here as JSON")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two hash files")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*(json.loads(p.read_text()) for p in args.compare)))
    work = Path(tempfile.gettempdir()) / "cxrsynth-tiny"  # one fixed folder: recorded paths compare equal
    shutil.rmtree(work, ignore_errors=True)
    try:
        hashes = run(args.tree.resolve(), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(hashes, indent=1, sort_keys=True)
    (args.out.write_text(text + "\n") if args.out else print(text))
    print(f"{len(hashes)} published files hashed", file=sys.stderr)


if __name__ == "__main__":
    main()
