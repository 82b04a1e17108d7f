"""Sharing synthetic data with other sites: export, verify, import, and the memorization audit.

* :mod:`.export` — a synthetic dataset → a self-contained package with no real identifier,
  a checksummed index and a datasheet; refused when the audit flags likely copies.
* :mod:`.package` — the package format, :func:`~.package.verify`, and the safe tar reader
  that treats every package as untrusted input.
* :mod:`.importer` — verify, check every member and row, register as a dataset.
* :mod:`.audit` and :mod:`.embed` — nearest real training images of each synthetic image
  under an embedding whose patient re-identification ability is measured, with a
  threshold calibrated on held-out real images.
* :mod:`.datasheet` — the package's ``DATASHEET.md``.
"""
