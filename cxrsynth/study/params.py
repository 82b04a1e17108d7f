"""The study's parameters (``params.yaml``), typed and checked once.

:class:`StudyParams` is params.yaml as dataclasses, one per section. It is parsed and
checked in one pass (:meth:`StudyParams.load` for a file, :meth:`StudyParams.from_dict` for
a mapping) before anything else runs: every ``cxrsynth study`` command loads it first, and
``cxrsynth study check`` does only that. Every problem is one :class:`ParamsError` naming
the full key (``supplement.k[1]``, ``replicas.w5.guidance``) and what was expected:

* a key given twice in the file, an unknown key at any level (``supplement.kk``), a missing one, a wrong type
  (``supplement.k: two``, ``classifier.epochs: 1.5``) or a value out of range;
* families that do not fit together: a family naming a replica that ``replicas`` does not
  define, a k that needs more replicas than that replica has, a family without its
  baseline cell (``supplement_k0``, ``external_k0``; the rebalance family's plain twin
  ``supplement_k<rebalance.k>``), an empty list of test sets.

Defaults live here, in the dataclasses, or are ``None`` where the library that uses the
value owns its default (the evaluation's bootstrap, seed and alpha); nothing else reads
params.yaml with ``.get``. Parsing imports nothing heavy (no pandas, no torch), so a bad
file fails in well under a second. Whether the test sets have test rows is a property of
the data, not of the file: :func:`cxrsynth.study.plan.check_data` checks it.

The parser is the project's one typed walker over the dataclasses' type hints
(:func:`cxrsynth.config.parse`, which :meth:`cxrsynth.config.Config.from_dict` uses too); a
field's ``metadata`` adds ranges (:func:`cxrsynth.config.setting`). A class here may add
checks across its fields in a ``check(self, key)`` method, called once its fields are
parsed, or parse itself in a ``from_mapping(data, key)`` class method (:class:`Classifier`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrsynth.config import (MAX_BATCH, MAX_BOOTSTRAP, MAX_IMAGE_SIDE, MAX_REPLICAS, MAX_SAMPLER_STEPS, MAX_TRAIN_STEPS,
                             MIN_IMAGE_SIDE, ConfigError, given, mapping, parse, setting, unknown)
from cxrsynth.errors import CxrsynthError, UnknownNameError

#: The experiment families, in the order of the pipeline (cxrsynth.study.plan describes each).
FAMILIES = ("cfg", "supplement", "synthetic", "external", "rebalance")
#: A replica's name becomes the suffix of a dataset name (``<study.real>_<name>``).
REPLICA_NAME = re.compile(r"^[A-Za-z0-9_]+$")
#: Replica names that mean something else in a cell tag (``real-w5``) or a dataset name.
RESERVED_REPLICAS = ("real", "rebalanced")
#: The default parameters file, relative to the project root.
PARAMS_FILE = Path("params.yaml")


class ParamsError(ConfigError):
    """A parameter that is unknown, missing, of the wrong type, out of range or inconsistent.

    Attributes:
        key: Full key path of the problem (``supplement.k[1]``; ``""`` for the whole file).
        problem: What is wrong and what was expected.
        source: Where the parameters came from (``params.yaml``), if a file.
    """

    default_source = "study parameters"


# ------------------------------------------------------------------ the sections


@dataclass(frozen=True)
class ChexpertSource:
    """A CheXpert-format site (``cxrsynth ingest chexpert``): image root, train.csv, demographics table."""

    root: str
    csv: str
    demographics: str


@dataclass(frozen=True)
class MimicSource:
    """MIMIC-CXR-JPG tables (``cxrsynth ingest mimic``) and MIMIC-IV's patients table."""

    root: str
    metadata: str
    labels: str
    split: str
    patients: str


@dataclass(frozen=True)
class TableSource:
    """An in-house site given as one table (``cxrsynth ingest table``)."""

    root: str
    table: str


@dataclass(frozen=True)
class Sources:
    """Where each site's files are (dvc.yaml's three ingest stages)."""

    cxp: ChexpertSource | None = None
    mimic: MimicSource | None = None
    emory: TableSource | None = None


@dataclass(frozen=True)
class Split:
    """Patient-level fractions for the sites without an official split."""

    tune: float = setting(ge=0, le=1)
    test: float = setting(ge=0, le=1)

    def check(self, key: str) -> None:
        if self.tune + self.test > 1:
            raise ParamsError(key, f"tune + test is {self.tune + self.test:g}; the fractions must add up to at most 1")


@dataclass(frozen=True)
class Generator:
    """The conditional diffusion generator (``cxrsynth generator train``)."""

    preset: str
    image_size: int = setting(ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE)
    steps: int = setting(ge=1, le=MAX_TRAIN_STEPS)
    batch: int = setting(ge=1, le=MAX_BATCH)
    lr: float = setting(gt=0)
    warmup: int = setting(ge=0)
    ema: float = setting(ge=0, lt=1)


@dataclass(frozen=True)
class Generate:
    """How every replica is sampled (``cxrsynth generate``)."""

    sampler: str
    steps: int = setting(ge=1, le=MAX_SAMPLER_STEPS)
    batch: int = setting(ge=1, le=MAX_BATCH)


@dataclass(frozen=True)
class Share:
    """The gate in front of the synthetic remote: each replica's ``package`` stage audits and exports it.

    Attributes:
        alpha: Level of the export gate's one-sided binomial test (flagged count above chance).
        detector: Folder of the study's copy detector: the ``detector`` stage trains the audit's
            ``sscd`` network there once, on the real site's training split, and every audit of
            the study uses it in its detector rule (``--detector sscd:DIR``); None: each audit trains its own.
        detector_size: Its input side (px) (None: the audit's).
        detector_steps: Its training steps (None: the audit's).
        detector_align: Candidates each image is registered onto in the detector rule (None: the audit's; 0: none).
        align_size: Side (px) of that registration (None: the audit's).
    """

    alpha: float = setting(0.01, gt=0, lt=1)
    detector: str | None = None
    detector_size: int | None = setting(None, ge=8, le=512)
    detector_steps: int | None = setting(None, ge=1)
    detector_align: int | None = setting(None, ge=0)
    align_size: int | None = setting(None, ge=16)


@dataclass(frozen=True)
class Replica:
    """One synthetic replica set of the real site's training and tuning splits.

    Attributes:
        guidance: Guidance scale w, standard formula (the paper's CFG is w - 1).
        replicas: How many replicas (copies of the training split) to generate.
    """

    guidance: float = setting(ge=0)
    replicas: int = setting(ge=1, le=MAX_REPLICAS)


@dataclass(frozen=True)
class Study:
    """The site whose training split is replicated and the sites every classifier is tested on."""

    real: str
    tests: tuple[str, ...] = setting(nonempty=True, unique=True)


@dataclass(frozen=True)
class Classifier:
    """The study's classifier: a preset (:mod:`cxrsynth.classify.presets`) plus overrides of its fields.

    In params.yaml the overrides sit beside ``preset`` (``{preset: small, epochs: 7}``); each
    must be a field of :class:`~cxrsynth.classify.presets.ClassifierConfig` of its type.
    """

    preset: str = "small"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Any, key: str) -> "Classifier":
        """Parse the section (the walker's hook for a class that is not field-for-key)."""
        from cxrsynth.classify.presets import ClassifierConfig

        data = dict(mapping(data, key, "a mapping: a preset and overrides of its fields"))
        preset = parse(str, data.pop("preset"), f"{key}.preset") if "preset" in data else cls.preset
        hints = {name: hint for name, hint in typing.get_type_hints(ClassifierConfig).items() if name != "name"}
        ranges = {f.name: f.metadata for f in dataclasses.fields(ClassifierConfig)}  # setting(ge=..., le=...)
        for name in data:
            if name not in hints:
                raise unknown(key, name, ["preset", *hints])
        overrides = {name: parse(hints[name], value, f"{key}.{name}", ranges[name]) for name, value in data.items()}
        out = cls(preset, overrides)
        out.config(key)  # the preset exists and the overrides make a valid configuration
        return out

    def config(self, key: str = "classifier"):
        """The resolved :class:`~cxrsynth.classify.presets.ClassifierConfig`."""
        from cxrsynth.classify.presets import get_preset

        try:
            return get_preset(self.preset, **self.overrides)
        except UnknownNameError as exc:
            raise ParamsError(f"{key}.preset", str(exc)) from None
        except CxrsynthError as exc:
            raise ParamsError(key, str(exc)) from None


@dataclass(frozen=True)
class Evaluate:
    """Evaluation and comparison settings; ``None``: the library's default
    (:class:`~cxrsynth.evaluate.metrics.EvaluateConfig`, :class:`~cxrsynth.evaluate.compare.CompareConfig`).

    Attributes:
        bootstrap: Bootstrap replicates of each evaluation.
        seed: Seed of the bootstrap draws.
        alpha: Significance level of the family comparisons (Bonferroni-corrected).
    """

    bootstrap: int | None = setting(None, ge=0, le=MAX_BOOTSTRAP)
    seed: int | None = None
    alpha: float | None = setting(None, gt=0, lt=1)

    def evaluate_config(self, **more: Any):
        """:class:`~cxrsynth.evaluate.metrics.EvaluateConfig` with this section's settings and ``more``."""
        from cxrsynth.evaluate.metrics import EvaluateConfig

        return EvaluateConfig(**given(bootstrap=self.bootstrap, seed=self.seed, **more))

    def compare_config(self):
        """:class:`~cxrsynth.evaluate.compare.CompareConfig` with this section's alpha."""
        from cxrsynth.evaluate.compare import CompareConfig

        return CompareConfig(**given(alpha=self.alpha))


@dataclass(frozen=True)
class Cfg:
    """The guidance study (the paper's Table 2): one set of cells per replica.

    Attributes:
        replicas: Names of ``replicas``.
        enabled: False leaves the family out of the summary and the report.
    """

    replicas: tuple[str, ...] = setting(nonempty=True, unique=True)
    enabled: bool = True


@dataclass(frozen=True)
class Family:
    """A family of k x 100% replica cells (``supplement``: real + synthetic; ``synthetic``: synthetic alone).

    Attributes:
        replica: The replica (a name of ``replicas``) the synthetic images come from.
        k: Replicas of the training split to add, one cell each (0: none, the real-only baseline).
        enabled: False leaves the family out of the summary and the report.
    """

    replica: str
    k: tuple[float, ...] = setting(nonempty=True, unique=True, ge=0)
    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class External(Family):
    """A :class:`Family` on another site's real training split: k x 100% replicas of the real
    site added to it (k = 0: the other site alone, the family's baseline).

    Attributes:
        real: The other site.
    """

    real: str


@dataclass(frozen=True)
class Rebalance:
    """Replicas whose conditions raise rare findings (``<study.real>_rebalanced``), one cell.

    Attributes:
        guidance: Guidance scale w of the rebalanced replicas.
        target: Every finding rarer than this is drawn up to it.
        k: Rebalanced replicas (the cell is compared with ``supplement_k<k>``, plain replicas of the same size).
        enabled: False leaves the family out of the summary and the report.
    """

    guidance: float = setting(ge=0)
    target: float = setting(gt=0, lt=1)
    k: int = setting(ge=1)
    enabled: bool = True


@dataclass(frozen=True)
class Memorisation:
    """The memorisation audit's positive control (``cxrsynth study memorisation``; :mod:`cxrsynth.share.control`):
    a generator of the ``generator`` section's preset overfitted on a few training images, and a replica of the
    demo's generator, both audited against the real training split.

    Attributes:
        replica: The demo generator's replica audited beside the control (a name of ``replicas``).
        images: Training images the control generator overfits (a seeded draw from the training split).
        steps: Its optimizer steps.
        batch: Its images per step.
        lr: Its peak learning rate.
        warmup: Its linear warm-up steps.
        ema: EMA decay of the weights it samples with (short: the last steps' weights).
        replicas: Synthetic images per training image of the control (sampled as ``generate`` says).

    Both are audited as the ``package`` stages audit a replica (the audit's defaults) and judged by the export
    gate at ``share.alpha``. A setting left out (``None``) is :class:`cxrsynth.share.control.ControlConfig`'s.
    """

    replica: str
    images: int | None = setting(None, ge=2)
    steps: int | None = setting(None, ge=1)
    batch: int | None = setting(None, ge=1)
    lr: float | None = setting(None, gt=0)
    warmup: int | None = setting(None, ge=0)
    ema: float | None = setting(None, ge=0, lt=1)
    replicas: int | None = setting(None, ge=1)


@dataclass(frozen=True)
class StudyParams:
    """params.yaml, typed. The study's own sections first; then the sections only dvc.yaml's
    data and generator stages read (``None`` when absent: a parameter set for the study alone
    needs none of them; when present, they are checked like the rest).

    Attributes:
        study: The real site and the test sets.
        replicas: Synthetic replica sets by name (datasets ``<study.real>_<name>``).
        seed: Seed of the mixes (and, in dvc.yaml, of every stage).
        classifier: The classifier every cell trains.
        evaluate: Evaluation and comparison settings.
        cfg, supplement, synthetic, external, rebalance: The experiment families (``None``: not in the study).
        image_size, shard_size, phantom, sources, split, generator, generate, share: dvc.yaml's other stages.
        memorisation: The memorisation audit's positive control (``None``: not run).
        mapping: The mapping this was parsed from (params.yaml as written; not a key of it).
        file: The file it was read from, if any (not a key either).
    """

    study: Study
    replicas: dict[str, Replica] = field(default_factory=dict)
    seed: int = 0
    classifier: Classifier = field(default_factory=Classifier)
    evaluate: Evaluate = field(default_factory=Evaluate)
    cfg: Cfg | None = None
    supplement: Family | None = None
    synthetic: Family | None = None
    external: External | None = None
    rebalance: Rebalance | None = None
    image_size: int | None = setting(None, ge=1, le=MAX_IMAGE_SIDE)
    shard_size: int | None = setting(None, ge=1)
    phantom: dict[str, int] | None = setting(None, ge=1)
    sources: Sources | None = None
    split: Split | None = None
    generator: Generator | None = None
    generate: Generate | None = None
    share: Share | None = None
    memorisation: Memorisation | None = None
    mapping: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False, metadata={"parsed": False})
    file: str | None = field(default=None, compare=False, repr=False, metadata={"parsed": False})

    # -------------------------------------------------------------- building

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], file: str | None = None) -> "StudyParams":
        """Parse and check a params.yaml mapping (read from ``file``, which errors name); a
        :class:`ParamsError` names the first problem."""
        try:
            params = parse(cls, data, "")
        except ConfigError as exc:  # the walker's errors, said of the study's parameters
            raise ParamsError(exc.key, exc.problem, file) from None
        return dataclasses.replace(params, mapping=data, file=file)

    @classmethod
    def load(cls, root: str | Path = ".", path: str | Path = PARAMS_FILE) -> "StudyParams":
        """Read and check ``root/path`` (default ``params.yaml``)."""
        import yaml

        full = Path(root) / path
        if not full.is_file():
            raise CxrsynthError(f"parameters file not found: {full}")
        try:
            data = yaml.load(full.read_text(), Loader=_strict_loader())
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ParamsError("", f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}", str(path)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CxrsynthError(f"cannot read {full}: {exc}") from None
        return cls.from_dict({} if data is None else data, str(path))

    @classmethod
    def of(cls, params: "StudyParams | Mapping[str, Any]") -> "StudyParams":
        """``params`` itself, or parsed from a mapping (for library callers holding a dict)."""
        return params if isinstance(params, cls) else cls.from_dict(params)

    # -------------------------------------------------------------- reading

    def family(self, name: str):
        """The section of experiment family ``name``; a :class:`ParamsError` if params.yaml has none."""
        if name not in FAMILIES:
            raise UnknownNameError("study family", name, FAMILIES)
        section = getattr(self, name)
        if section is None:
            raise ParamsError(name, f"missing: the {name} family is not in these parameters", self.file)
        return section

    def enabled(self, name: str) -> bool:
        """Whether family ``name`` is in the study (its section exists and is not ``enabled: false``)."""
        section = getattr(self, name, None) if name in FAMILIES else None
        return section is not None and section.enabled

    def guidance(self, replica: str) -> float:
        """Guidance scale of a replica of ``replicas`` or of ``rebalanced`` (the rebalance family's)."""
        if replica == "rebalanced":
            return self.family("rebalance").guidance
        if replica not in self.replicas:
            raise UnknownNameError("replica", replica, self.replicas)
        return self.replicas[replica].guidance

    # -------------------------------------------------------------- the checks across sections

    def check(self, key: str) -> None:
        """The checks across sections: replica names, the replicas each family names and needs, the baselines."""
        for name in self.replicas:
            if not REPLICA_NAME.fullmatch(name) or name in RESERVED_REPLICAS:
                raise ParamsError(f"replicas.{name}", "a replica name is letters, digits and underscores, and not "
                                                      f"{' or '.join(map(repr, RESERVED_REPLICAS))} (cell tags and "
                                                      "dataset names are made of it)")
        if self.cfg is not None:
            for i, name in enumerate(self.cfg.replicas):
                self._replica(f"cfg.replicas[{i}]", name)
        for name in ("supplement", "synthetic", "external"):
            section = getattr(self, name)
            if section is None:
                continue
            count = self._replica(f"{name}.replica", section.replica)
            for i, k in enumerate(section.k):  # k = 2.5 needs 3 replicas, as cxrsynth.mix.select_replicas counts
                if math.ceil(k - 1e-9) > count:
                    raise ParamsError(f"{name}.k[{i}]", f"k = {k:g} needs {math.ceil(k - 1e-9)} replicas of "
                                                        f"{section.replica}; replicas.{section.replica}.replicas is {count}")
        if self.memorisation is not None:
            self._replica("memorisation.replica", self.memorisation.replica)
        if self.synthetic is not None:
            for i, k in enumerate(self.synthetic.k):
                if k <= 0:
                    raise ParamsError(f"synthetic.k[{i}]", "a purely synthetic training set needs k > 0")
        self._baselines()

    def _replica(self, key: str, name: str) -> int:
        """The replica count of ``replicas.<name>``; a :class:`ParamsError` at ``key`` if there is none."""
        if name not in self.replicas:
            known = ", ".join(self.replicas) or "none"
            raise ParamsError(key, f"{name!r} is not a replica of `replicas` (known: {known})")
        return self.replicas[name].replicas

    def _baselines(self) -> None:
        """Every family's baseline cell is one the parameters ask for (cxrsynth.study.plan.baseline)."""
        supplement = set(self.supplement.k) if self.supplement is not None else set()
        need = []  # (key, baseline k of the supplement family, who needs it)
        if self.supplement is not None:
            need.append(("supplement.k", 0, "the supplement family's baseline is supplement_k0 (real data alone)"))
        if self.synthetic is not None:
            need.append(("synthetic", 0, "synthetic-only cells are compared with supplement_k0 (real data alone)"))
        if self.cfg is not None:
            need.append(("cfg", 0, "the CFG study's real/real cell is supplement_k0"))
        if self.rebalance is not None:
            need.append(("rebalance.k", self.rebalance.k, f"the rebalance cell is compared with supplement_k{self.rebalance.k:g} "
                                                          "(plain replicas of the same size)"))
        for key, k, why in need:
            if k not in supplement:
                have = "there is no supplement section" if self.supplement is None else \
                    f"supplement.k is [{', '.join(f'{v:g}' for v in self.supplement.k)}]"
                raise ParamsError(key, f"{why}, but {have}")
        if self.external is not None and 0 not in self.external.k:
            raise ParamsError("external.k", f"the external family's baseline is external_k0 ({self.external.real} "
                                            "real data alone); add 0")


def _strict_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (safe_load keeps the last silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping (first on line {seen[key] + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return StrictLoader
