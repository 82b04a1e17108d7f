"""Mixing real and synthetic data: a manifest query, saved as a manifest (no new shards).

The paper's experiments differ only in their training set:

* supplementation — a real training split + k x 100% synthetic replicas of it;
* purely synthetic (``only_synthetic``) — the k x 100% replicas alone;
* external mixing — another site's real training split + replicas made from the first
  site (``synthetic_from``).

The tuning and test splits always stay real. ``k x 100%`` counts replicas of the
synthetic dataset's source split: 300% is replicas 0, 1 and 2; a fraction (250%) adds a
seeded random subset of the next replica's rows. Rows keep their own ``dataset`` and
``shard`` (they point at the source datasets' shards); ``split`` is their role in the
mix. A mix is published (:func:`cxrsynth.publish.publish`) with ``kind = "mix"`` in its
metadata and is left out of the union view ``images``, which would otherwise count its
rows twice.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import manifest, shards
from cxrsynth.config import MAX_REPLICAS, Config, setting
from cxrsynth.errors import CxrsynthError
from cxrsynth.publish import Metadata, check_target, publish

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|x)?\s*$")


class MixError(CxrsynthError):
    """A mix that cannot be built as asked."""


def parse_percent(text: str | float) -> float:
    """``"500%"`` / ``"500"`` / ``500`` / ``"5x"`` → 5.0 replicas."""
    match = _PERCENT.fullmatch(str(text))
    if not match:
        raise MixError(f"--synthetic expects a percentage such as 500% (or a count of replicas such as 5x), got {text!r}")
    return float(match.group(1)) if match.group(2) == "x" else float(match.group(1)) / 100.0


@dataclass(frozen=True)
class MixParams(Config):
    """What a mix is made of (recorded in its metadata)."""

    kind = "mix"  # how errors name these settings (a class attribute, not a field)

    real: str
    synthetic: float = setting(0.0, ge=0, le=MAX_REPLICAS)  # replicas, e.g. 5.0 for 500%
    synthetic_from: str | None = None
    only_synthetic: bool = False
    real_split: str = "train"
    seed: int = 0
    synthetic_tune: bool = False  # tune on the synthetic replica (replica 0) of the tuning split

    def recorded(self) -> dict:
        """What the version hashes and records (``synthetic_tune`` only when set, so other
        mixes keep the versions they always had)."""
        out = self.to_dict()
        if not out["synthetic_tune"]:
            del out["synthetic_tune"]
        return out


def find_synthetic(root: str | Path, real: str) -> str:
    """The one synthetic dataset whose conditions came from ``real``."""
    candidates = []
    for name in manifest.list_names(root):
        meta = manifest.read_meta(root, name)
        if meta.get("kind") == "synthetic" and meta.get("conditions") == real:
            candidates.append(name)
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise MixError(f"name the synthetic dataset with --synthetic-from (replicas of {real!r} found: {found})")
    return candidates[0]


def select_replicas(synthetic: pd.DataFrame, replicas: float, seed: int) -> pd.DataFrame:
    """Rows of ``floor(replicas)`` whole replicas plus a seeded subset of the next one."""
    whole = int(np.floor(replicas + 1e-9))
    available = int(synthetic["replica"].max()) + 1 if len(synthetic) else 0
    needed = whole + (1 if replicas - whole > 1e-9 else 0)
    if needed > available:
        raise MixError(f"{replicas * 100:g}% needs {needed} replica(s); the synthetic dataset has {available}")
    replica = synthetic["replica"].astype(int)
    out = synthetic.loc[replica < whole]
    fraction = replicas - whole
    if fraction > 1e-9:
        nxt = synthetic.loc[replica == whole].sort_values("key")
        take = int(round(fraction * len(nxt)))
        pick = np.random.default_rng([seed, whole]).choice(len(nxt), size=take, replace=False)
        out = pd.concat([out, nxt.iloc[np.sort(pick)]])
    return out


def mix(root: str | Path, name: str, params: MixParams, force: bool = False) -> dict[str, int]:
    """Build mix ``name``; returns images per split (and the synthetic count).

    ``force``: write it over an existing dataset of another kind (never over one of its sources).
    """
    manifest.check_name(name)
    check_target(root, name, "mix", tuple(s for s in (params.real, params.synthetic_from) if s), force)
    real = manifest.read(root, params.real)
    synthetic_name = params.synthetic_from or (find_synthetic(root, params.real) if params.synthetic > 0 else None)
    parts = []
    real_train = real.loc[(real["split"] == params.real_split).fillna(False).to_numpy(dtype=bool)]
    if real["split"].isna().all():
        raise MixError(f"{params.real} has no splits yet: run `cxrsynth split {params.real} ...` first")
    if not params.only_synthetic:
        parts.append(real_train.assign(split="train"))
    for split in ("tune", "test") if not params.synthetic_tune else ("test",):
        parts.append(real.loc[(real["split"] == split).fillna(False).to_numpy(dtype=bool)])
    synthetic_rows = 0
    versions = {params.real: manifest.read_meta(root, params.real).get("version")}
    if params.synthetic_tune:
        if params.synthetic_from is None:
            raise MixError("--synthetic-tune needs --synthetic-from (replicas of the tuning split)")
        syn = manifest.read(root, params.synthetic_from)
        tune = syn.loc[(syn["split"] == "tune").fillna(False).to_numpy(dtype=bool) & (syn["replica"] == 0).to_numpy(dtype=bool)]
        if tune.empty:
            raise MixError(f"{params.synthetic_from} has no replica of the tuning split: generate it with --split train,tune")
        parts.append(tune.assign(split="tune"))
        versions[params.synthetic_from] = manifest.read_meta(root, params.synthetic_from).get("version")
    if synthetic_name is not None and params.synthetic > 0:
        syn = manifest.read(root, synthetic_name)
        syn_meta = manifest.read_meta(root, synthetic_name)
        if syn_meta.get("kind") != "synthetic":
            raise MixError(f"{synthetic_name} is not a synthetic dataset")
        # Replicas of the source's training split only: tuning/test conditions never leak in.
        syn = syn.loc[(syn["split"] == params.real_split).fillna(False).to_numpy(dtype=bool)]
        chosen = select_replicas(syn, params.synthetic, params.seed).assign(split="train")
        synthetic_rows = len(chosen)
        parts.append(chosen)
        versions[synthetic_name] = syn_meta.get("version")
    rows = pd.concat(parts, ignore_index=True)
    if rows["key"].duplicated().any():
        raise MixError(f"keys collide between {params.real} and {synthetic_name}; rename one dataset")
    if rows.loc[rows["split"] == "train"].empty:
        raise MixError("the mix has no training rows")
    record = {**params.recorded(), "synthetic_from": synthetic_name}
    version = hashlib.sha256(shards.json_bytes({"params": record, "versions": versions})).hexdigest()[:10]
    publish(root, Metadata(name, version, "mix", {"params": record, "sources": versions}), rows, force=force)
    counts = rows["split"].value_counts().to_dict()
    return {"train": int(counts.get("train", 0)), "tune": int(counts.get("tune", 0)),
            "test": int(counts.get("test", 0)), "synthetic": synthetic_rows}
