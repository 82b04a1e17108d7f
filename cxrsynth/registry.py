"""One generic name registry: generator presets, samplers, classifier presets, phantom sites, audit embeddings.

A :class:`Registry` is a read-only mapping from names to values (configs, builders,
specs) with three things every registry of the project needs, written once:

* :meth:`Registry.register` adds a value under a unique name (a second one is an error);
* ``registry[name]`` is the value, or an :class:`~cxrsynth.errors.UnknownNameError` whose
  message lists the known names (``unknown sampler 'x'; known: ddim, dpmpp``);
* :meth:`Registry.names` and :meth:`Registry.help` list the names for help text, so the CLI
  never writes them again (``{samplers}`` in an option's help, see :mod:`cxrsynth.cli.options`).

Example:
    >>> SAMPLERS = Registry("sampler")
    >>> SAMPLERS.register("ddim", 1)
    1
    >>> SAMPLERS.help()
    'ddim'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from cxrsynth.errors import CxrsynthError, UnknownNameError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named values of one kind (``kind`` names them in errors: ``"generator preset"``).

    Iteration follows registration order; :meth:`names` is sorted.

    Args:
        kind: What the values are, as an error message says it.
        labels: Optional display names for :meth:`help` (``{"classifier": "classifier:DIR"}``)
            where a name takes an argument.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._labels: dict[str, str] = {}

    def register(self, name: str, value: T, label: str | None = None) -> T:
        """Add ``value`` under ``name`` (unique) and return it; ``label`` is how :meth:`help` shows it."""
        if name in self._items:
            raise CxrsynthError(f"{self.kind} {name!r} is already registered")
        self._items[name] = value
        if label is not None:
            self._labels[name] = label
        return value

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise UnknownNameError(self.kind, name, self.labels()) from None

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def labels(self) -> list[str]:
        """The names as help shows them (a name's label where it has one), sorted."""
        return sorted(self._labels.get(name, name) for name in self._items)

    def help(self, sep: str = " | ") -> str:
        """The names for help text: ``a | b | c``."""
        return sep.join(self.labels())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
