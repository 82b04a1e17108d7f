"""Can the audit's embeddings recognise a phantom patient? Patient-verification AUROC on held-out patients.

Renders ``--n`` images of a phantom site, trains the audit's ``reid`` network on 70% of the
patients and prints, as one JSON object, the verification AUROC of ``reid`` and ``pixels`` on the
other 30% (:func:`cxrsynth.bench.reid.phantom_reid`, which says how):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/reid-phantom.py --site cxp --n 2400

The phantom's patients carry persistent anatomy (cxrsynth.phantom.anatomy), so ``reid`` should
reach >= 0.95 while ``pixels`` stays clearly lower (issue 17; the figures are in the README).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    from cxrsynth.bench.reid import phantom_reid

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", default="cxp")
    ap.add_argument("--n", type=int, default=2400, help="images rendered (params.yaml's phantom: cxp is 2400)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--held-out", type=float, default=0.3, help="fraction of patients held out of training")
    ap.add_argument("--pairs", type=int, default=20000, help="most same-patient pairs per AUROC (the audit's default)")
    ap.add_argument("--pixel-size", type=int, default=32, help="side of the pixels embedding (the audit's default)")
    ap.add_argument("--seed", type=int, default=0)
    names = (("steps", int), ("width", int), ("dim", int), ("patients", int), ("lr", float), ("shift", int), ("pool", int))
    for name, kind in names:
        ap.add_argument(f"--{name}", type=kind, default=None, help=f"ReidConfig.{name} (default: the audit's)")
    args = ap.parse_args()
    reid = {k: getattr(args, k) for k, _ in names if getattr(args, k) is not None}
    print(json.dumps(phantom_reid(args.site, args.n, args.size, args.seed, args.held_out, args.pairs, args.pixel_size,
                                  **reid), indent=1))


if __name__ == "__main__":
    main()
