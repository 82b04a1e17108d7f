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
:data:`SHARD_SIZE` and :data:`SHUFFLE_BUFFER` are the defaults several modules share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from cxrsynth.errors import CxrsynthError

C = TypeVar("C", bound="Config")

#: Defaults that settings of several modules share, each written once (imported where used).
SHARD_SIZE = 1000  # samples per tar shard: ingest, generate, share export
SHUFFLE_BUFFER = 1000  # samples in each loader stream's shuffle buffer: the loader, the classifier, the generator's batches


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

    @classmethod
    def _check_names(cls, names: Any, what: str) -> None:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(names) - known)
        if unknown:
            raise CxrsynthError(f"unknown {cls.kind} {what}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        cls._check_names(data, "keys")
        tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}  # type: ignore[arg-type]
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()})

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed; unknown names are an error naming them."""
        self._check_names(changes, "settings")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def override(self: C, **options: Any) -> C:
        """:meth:`replace` with the options that were given: ``None`` keeps the current value."""
        return self.replace(**given(**options))
