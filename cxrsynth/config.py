"""The config mixin of every stage's dataclass: ``to_dict``, strict ``from_dict``, ``replace``, ``override``.

A stage's settings are a dataclass (frozen or not) that inherits :class:`Config`:

* :meth:`Config.to_dict` — a JSON-ready dict (``dataclasses.asdict``), what is written next
  to an output (``generator.json``, ``classifier.json``);
* :meth:`Config.from_dict` — the inverse, strict: a key the dataclass does not have is an
  error naming it (a typo in a stored or hand-written config never passes silently); lists
  become tuples for tuple fields (JSON has no tuples);
* :meth:`Config.replace` — a copy with some fields changed (unknown names refused);
* :meth:`Config.override` — the same, but ``None`` means "not given, keep this value": how
  the CLI passes options it did not receive, so each default lives once, in the dataclass
  (timm's ``create_model`` drops ``None`` keyword arguments the same way).

:func:`given` is that one "drop ``None``" rule, also for keyword arguments of functions;
:func:`read_json` reads a JSON file a stage wrote, failing with one clean error;
:data:`SHARD_SIZE` and :data:`SHUFFLE_BUFFER` are the defaults several modules share.

The typed walker (:func:`parse`) is the one parser of settings from data, for
:meth:`Config.from_dict` and for the study's ``params.yaml``
(:class:`cxrsynth.study.params.StudyParams`): it checks a value against a type hint —
``int``, ``float``, ``str``, ``bool``, ``X | None``, ``Literal[...]``, ``Path``,
``tuple[X, ...]`` (a list), ``dict[str, X]`` (a mapping of names), ``Any`` and nested
dataclasses — and a field's ranges (:func:`setting`), and every problem is one
:class:`ConfigError` naming the full key (``supplement.k[1]``, ``replicas.w5.guidance``)
and what was expected. A dataclass may add checks across its fields in a
``check(self, key)`` method, called once its fields are parsed, or parse itself in a
``from_mapping(data, key)`` class method. It imports nothing heavy.

Numbers are checked where a :class:`Config` is made, whoever makes it: its
``__post_init__`` (:func:`check_numbers`) refuses a NaN or infinite float in any field and
a number outside its field's :func:`setting` ranges, so the CLI (``--lr inf``), the Python
API (``ClassifierConfig(lr=float("inf"))``), ``replace``/``override`` and a stored or
params.yaml mapping all meet the same check and the same :class:`ConfigError` naming the
field. typer's ``min=`` lets ``inf`` through and an option without bounds takes ``nan``
(``--guidance inf``, ``--lr inf``), so the CLI's own bounds are only an earlier message.
:data:`MAX_IMAGE_SIDE` bounds every network input side.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import operator
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

from cxrsynth.errors import CxrsynthError

C = TypeVar("C", bound="Config")

#: Defaults that settings of several modules share, each written once (imported where used).
SHARD_SIZE = 1000  # samples per tar shard: ingest, generate, share export
SHUFFLE_BUFFER = 1000  # samples in each loader stream's shuffle buffer: the loader, the classifier, the generator's batches
#: Smallest and largest side (px) of a network's input images (classifier and generator). The
#: upper bound is a sanity bound, not a hardware one: 8 times the paper's 256 px (64 times its
#: pixels), above what chest X-ray classifiers and generators are trained at; a batch of 32
#: images at 2048 px is already 512 MiB of float32 input before any activation, and a typo such
#: as 100000 is 40 GB per float32 image: the run was killed instead of refused. The lower
#: bound is the CLI's ``--image-size`` minimum: below 8 px a radiograph holds nothing to learn.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 8, 2048
#: Most bootstrap replicates of an evaluation or comparison: 100 times the default (1000). Each
#: replicate keeps one AUROC per finding, model and subgroup; at 10^9 replicates those arrays
#: alone need 112 GB per model (the run ended in a MemoryError), at this bound 11 MB.
MAX_BOOTSTRAP = 100_000
#: Upper bounds of counts a typo can blow up (a batch of 10^9 images, 10^6 replicas of a training
#: split): far above the paper's settings (batch 32-256, 10 replicas, 200 sampler steps, 50
#: epochs), low enough that the refusal comes before the allocation or the week-long run.
MAX_BATCH = 65_536
MAX_REPLICAS = 1_000
MAX_EPOCHS = 100_000
MAX_TRAIN_STEPS = 100_000_000
MAX_SAMPLER_STEPS = 100_000


def read_json(path: str | Path, *, missing: str, invalid: str, error: type[CxrsynthError] = CxrsynthError,
              keys: tuple[str, ...] = ()) -> Any:
    """The value of the JSON file ``path`` (a config or record a stage wrote next to its output).

    Args:
        keys: When given, the value must be an object holding each of these keys.

    Raises:
        error: ``missing`` when ``path`` is not a file; ``"<invalid>: <why>"`` when it is not
            UTF-8 JSON (or nests too deep to parse), or lacks one of ``keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{invalid}: {exc}") from None
    except RecursionError:
        raise error(f"{invalid}: nested too deeply to parse") from None
    if keys:
        if not isinstance(value, dict):
            raise error(f"{invalid}: expected a JSON object, got {type(value).__name__}")
        absent = [k for k in keys if k not in value]
        if absent:
            raise error(f"{invalid}: lacks {', '.join(map(repr, absent))}")
    return value


def given(**options: Any) -> dict[str, Any]:
    """The options that were given (not ``None``), to pass on as keyword arguments."""
    return {k: v for k, v in options.items() if v is not None}


class Record:
    """Mixin for a dataclass written as JSON (a benchmark's result): :meth:`to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nested dataclasses become dicts, tuples stay tuples until JSON makes them lists)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


class Config(Record):
    """Mixin for a settings dataclass (see the module docstring).

    Attributes:
        kind: What the settings are, as an error message names them (``"generator config"``).
    """

    kind: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        """Every number finite and in its field's ranges (:func:`check_numbers`); a subclass
        with its own ``__post_init__`` calls this one."""
        check_numbers(self)

    @classmethod
    def _check_names(cls, names: Any, what: str) -> None:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(names) - known)
        if unknown:
            raise CxrsynthError(f"unknown {cls.kind} {what}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Inverse of :meth:`to_dict`, through the typed walker (:func:`parse`): unknown keys are an
        error naming them, and so is a value of the wrong type (``generator config: image_size:
        expected an integer, got 'x'``); lists become tuples for tuple fields."""
        if not isinstance(data, Mapping):
            raise ConfigError("", f"expected a mapping, got {_show(data)}", cls.kind)
        cls._check_names(data, "keys")
        try:
            return parse(cls, data, "")
        except ConfigError as exc:
            raise exc.within(cls.kind) from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed; unknown names are an error naming them."""
        self._check_names(changes, "settings")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def override(self: C, **options: Any) -> C:
        """:meth:`replace` with the options that were given: ``None`` keeps the current value."""
        return self.replace(**given(**options))


# ------------------------------------------------------------------ the typed walker


class ConfigError(CxrsynthError):
    """A setting that is unknown, missing, of the wrong type, out of range or inconsistent.

    Attributes:
        key: Full key path of the problem (``supplement.k[1]``; ``""`` for the whole mapping).
        problem: What is wrong and what was expected.
        source: What the settings are or where they came from (``generator config``, ``params.yaml``).
    """

    #: How a message names settings whose source is not known.
    default_source: ClassVar[str] = "settings"

    def __init__(self, key: str, problem: str, source: str | None = None):
        self.key, self.problem, self.source = key, problem, source
        super().__init__(": ".join(p for p in (source or self.default_source, key, problem) if p))

    def within(self, source: str) -> "ConfigError":
        """The same error (of the same class), said of ``source``."""
        return type(self)(self.key, self.problem, source)


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None, nonempty: bool = False,
            unique: bool = False) -> Any:
    """A dataclass field with ranges the walker checks.

    Ranges apply to a number, or to each number of a list or of a mapping's values;
    ``nonempty`` and ``unique`` apply to a list.
    """
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, nonempty=nonempty, unique=unique).items()
            if v is not None and v is not False}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def _num(x: float) -> str:
    """An int as written (1000000, not 1e+06), a float compactly."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def parse(hint: Any, value: Any, key: str, meta: Mapping[str, Any] | None = None) -> Any:
    """``value`` (parsed JSON or YAML) checked against the type ``hint`` and converted; ``key`` names it in errors.

    Raises:
        ConfigError: naming ``key`` (or the key inside it) and what was expected.
    """
    meta = meta or {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse(inner, value, key, meta)
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, key)  # type: ignore[arg-type]
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args or type(value) is not type(next(a for a in args if a == value)):
            raise expected(key, hint, value)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise expected(key, hint, value)
        items = tuple(parse(args[0], v, f"{key}[{i}]", meta) for i, v in enumerate(value))
        if meta.get("nonempty") and not items:
            raise ConfigError(key, f"expected {describe(hint)}, got an empty list")
        if meta.get("unique"):
            for i, v in enumerate(items):
                if v in items[:i]:
                    raise ConfigError(f"{key}[{i}]", f"{_show(value[i])} is already in the list")
        return items
    if origin in (dict, Mapping):
        data = mapping(value, key, describe(hint))
        out = {}
        for name, v in data.items():
            if not isinstance(name, str):
                raise ConfigError(key, f"{_show(name)} is not a name (expected {describe(hint)})")
            out[name] = parse(args[1], v, f"{key}.{name}", meta)
        return out
    if hint is bool:
        if type(value) is not bool:
            raise expected(key, hint, value)
        return value
    if hint is int:
        if type(value) is not int:
            raise expected(key, hint, value)
        return _in_range(value, key, meta)
    if hint is float:
        if type(value) not in (int, float):
            raise expected(key, hint, value)
        if not math.isfinite(value):
            raise not_finite(key, value)
        return _in_range(float(value), key, meta)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise expected(key, hint, value)
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise expected(key, hint, value)
        return Path(value)
    raise TypeError(f"{key}: the settings walker has no rule for {hint!r}")


def _dataclass(cls: type, value: Any, key: str) -> Any:
    custom = getattr(cls, "from_mapping", None)
    if callable(custom):
        return custom(value, key)
    data = mapping(value, key, describe(cls))
    fields = [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("parsed", True)]
    names = [f.name for f in fields]
    for name in data:
        if name not in names:
            raise unknown(key, name, names)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields:
        path = f"{key}.{f.name}" if key else f.name
        if f.name in data:
            values[f.name] = parse(hints[f.name], data[f.name], path, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(path, f"missing; expected {describe(hints[f.name])}")
    out = cls(**values)
    check = getattr(out, "check", None)
    if callable(check):
        check(key)
    return out


def mapping(value: Any, key: str, what: str) -> Mapping:
    """``value`` if it is a mapping; else a :class:`ConfigError` at ``key`` expecting ``what``."""
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected {what}, got {_show(value)}")
    return value


def _in_range(value: float, key: str, meta: Mapping[str, Any]) -> float:
    for name, ok, words in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="),
                            ("lt", operator.lt, "<")):
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(key, f"expected a value {words} {_num(meta[name])}, got {_num(value)}")
    return value


def check_numbers(config: Any) -> None:
    """Refuse a dataclass whose numbers are NaN, infinite or outside their fields' ranges.

    Checks every init field whose type is a number (``int``, ``float``, ``X | None``, a
    tuple of numbers or a mapping of names to numbers): floats must be finite, and every
    number within the field's :func:`setting` ranges. Only numbers are checked, not types:
    values built in Python keep their own (a numpy float passes as a float).

    Raises:
        ConfigError: naming the field (``lr``, ``channel_mult[1]``) and, as its source, the
            dataclass's ``kind``.
    """
    cls = type(config)
    hints = _hints(cls)
    try:
        for f in dataclasses.fields(config):
            if f.init and f.name in hints:
                _numbers(hints[f.name], getattr(config, f.name), f.name, f.metadata)
    except ConfigError as exc:
        raise exc.within(getattr(cls, "kind", ConfigError.default_source)) from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _numbers(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            _numbers(inner[0], value, key, meta)
    elif origin is tuple and isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _numbers(args[0], v, f"{key}[{i}]", meta)
    elif origin in (dict, Mapping) and isinstance(value, Mapping) and len(args) == 2:
        for name, v in value.items():
            _numbers(args[1], v, f"{key}.{name}", meta)
    elif hint in (int, float) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise not_finite(key, value)
        _in_range(value, key, meta)


def not_finite(key: str, value: Any) -> ConfigError:
    """The error of a NaN or infinite number at ``key``."""
    return ConfigError(key, f"expected a finite number, got {value}")


def unknown(key: str, name: Any, known: list[str]) -> ConfigError:
    """The error of an unknown key ``name`` inside ``key``, naming the known ones and the closest."""
    path = f"{key}.{name}" if key else str(name)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(path, f"unknown key (known here: {', '.join(known)}){hint}")


def expected(key: str, hint: Any, value: Any) -> ConfigError:
    """The error of a value of the wrong type at ``key``."""
    return ConfigError(key, f"expected {describe(hint)}, got {_show(value)}")


def describe(hint: Any) -> str:
    """``hint`` in words: ``an integer``, ``a list of numbers``, ``a mapping with keys ...``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None)) + " or null"
    if dataclasses.is_dataclass(hint):
        names = [f.name for f in dataclasses.fields(hint) if f.init and f.metadata.get("parsed", True)]
        return f"a mapping with keys {', '.join(names)}"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a list of {_plural(args[0])}"
    if origin in (dict, Mapping):
        return f"a mapping of names to {_plural(args[1])}"
    return {int: "an integer", float: "a number", str: "a non-empty string", bool: "true or false",
            Path: "a path"}.get(hint, str(hint))


def _plural(hint: Any) -> str:
    words = describe(hint)
    return {"an integer": "integers", "a number": "numbers", "a non-empty string": "names"}.get(words, words)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
