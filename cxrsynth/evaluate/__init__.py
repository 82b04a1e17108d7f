"""Evaluation with the paper's statistics: reads predictions and manifests, never the generator code.

* :mod:`.auroc` — AUROC point estimates (scikit-learn) and the vectorised, optionally
  patient-clustered bootstrap (weighted Mann-Whitney on multiplicities, exact integers);
* :mod:`.metrics` — ``cxrsynth evaluate``: join predictions to labels, per-finding / macro /
  subgroup AUROC, metrics JSON + replicate vectors;
* :mod:`.leakage` — the guard refusing test patients the classifier or the generator of its
  synthetic training data learnt from;
* :mod:`.compare` — ``cxrsynth compare``: the paper's t-test on bootstrap replicates and a
  paired bootstrap of AUROC differences, Bonferroni-corrected;
* :mod:`.cooccurrence` — label co-occurrence matrices and their Pearson correlation;
* :mod:`.frechet` — Fréchet distances between image sets: FID (a local Inception file) and
  the distance in a classifier's pooled features.
"""
