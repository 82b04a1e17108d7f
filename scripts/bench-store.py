"""Local disk against an S3-compatible store (moto's server on 127.0.0.1, as in tests/test_store.py).

Times ingest, ``verify``, a loader epoch (0 and 2 DataLoader workers, best of 3) and
``shards.images`` on the same dataset published locally and to the store.

Usage: ``python scripts/bench-store.py OUT_DIR N_IMAGES`` (needs the test extra: moto[server], s3fs).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import S3Server, chexpert_rows, ingest_site  # noqa: E402


def main(base: Path, n: int) -> None:
    import fsspec.config

    from cxrsynth import loader, manifest, shards
    from cxrsynth.verify import verify_dataset

    server = S3Server()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        fsspec.config.conf["s3"] = {"endpoint_url": server.url}
        url = server.bucket("bench") + "/p"
        rows = chexpert_rows(n_patients=40, studies=max(1, n // 40), uncertain=False)
        roots = {}
        for tag, store in (("local", None), ("store", url)):
            start = time.perf_counter()
            roots[tag] = ingest_site(base / tag, rows, size=128, shard_size=64, store=store)
            print(f"ingest {len(rows)} images, {tag}: {time.perf_counter() - start:.2f} s")
        for tag, root in roots.items():
            start = time.perf_counter()
            problems, checked = verify_dataset(root, "cxp")
            print(f"verify {tag}: {time.perf_counter() - start:.2f} s ({checked} shards, {len(problems)} problems)")
        for workers in (0, 2):
            for tag, root in roots.items():
                data = loader.ShardLoader(root, loader.select(root, "cxp", None), loader.LoaderConfig(
                    batch_size=32, image_size=128, workers=workers, streams=4, seed=0))
                best = float("inf")
                for epoch in range(3):
                    start = time.perf_counter()
                    count = sum(len(b["key"]) for b in data.batches(epoch))
                    best = min(best, time.perf_counter() - start)
                print(f"loader epoch, {workers} workers, {tag}: {best:.3f} s ({count} images, {count / best:.0f} images/s)")
        for tag, root in roots.items():
            frame = manifest.read(root, "cxp")
            start = time.perf_counter()
            got = len(dict(shards.images(root, frame)))
            print(f"images() of {got} rows, {tag}: {time.perf_counter() - start:.3f} s")
    finally:
        server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
