"""cxrsynth: versioned real and synthetic chest X-ray datasets and the experiments of
Khosravi et al., "Synthetically enhanced" (eBioMedicine 2024).

The package is built in floors (:data:`LAYERS`); a module imports only from its own floor
or the floors below it, lazy imports inside functions included (``tests/test_layers.py``
checks every import):

1. contracts — ``errors``, ``labels``, ``registry``, ``config``, ``runtime``,
   ``progress``: what every
   other module may rely on.
2. data — the datasets and their plumbing: ``imaging``, ``shards``, ``manifest``,
   ``publish``, ``sources/``, ``ingest``, ``splits``, ``stats``, ``mix``, ``loader``,
   ``checkpoints``, ``digests``, ``safeload``, ``sheet``, ``verify``, ``cards`` (model cards),
   ``store`` (shards on an object store: fsspec URLs).
3. stages — ``phantom/``, ``diffusion/``, ``classify/``, ``evaluate/``: each over the data
   floor, never importing another stage (sideways).
4. consumers — ``share/`` (its audit embeds images with a trained classifier's
   ``features()``) and ``study/`` (trains and evaluates classifiers): they use the stages,
   never each other.
5. benchmarks — ``bench/`` measures every floor below, consumers included (``bench audit``).
6. the command line — ``cli/`` (and ``__main__``): parses and calls, nothing more.

Inside the contracts and data floors, modules import each other freely (acyclic); on the
stage and consumer floors, a package imports only itself and lower floors.
"""

__version__ = "0.1.0"

#: The floors, bottom first: (name, the top-level modules and packages on it, whether
#: packages on it may import each other). ``cxrsynth`` itself (``__version__``) is a contract.
LAYERS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("contracts", ("cxrsynth", "errors", "labels", "registry", "config", "runtime", "progress"), True),
    ("data", ("imaging", "shards", "manifest", "publish", "sources", "ingest", "splits", "stats", "mix", "loader",
              "checkpoints", "digests", "safeload", "sheet", "verify", "cards", "store"), True),
    ("stages", ("phantom", "diffusion", "classify", "evaluate"), False),
    ("consumers", ("share", "study"), False),
    ("benchmarks", ("bench",), False),
    ("cli", ("cli", "__main__"), True),
)
