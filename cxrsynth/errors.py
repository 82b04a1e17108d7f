"""The package's one base error.

Every error that bad input, a bad name or a bad file can cause is a :class:`CxrsynthError`
(a ``ValueError``, so library callers' ``except ValueError`` keeps working, as DVC's
``InvalidArgumentError`` mixes in the builtin). The CLI catches this base once and prints
one clean line; any other exception reaching a user is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable


class CxrsynthError(ValueError):
    """Bad input, a bad name, a bad or missing file: a message a user can act on."""

    #: Process exit code the CLI uses for this error (2: the input or arguments are wrong).
    exit_code = 2


class UnknownNameError(CxrsynthError, KeyError):
    """A name that a registry (presets, samplers, sites, datasets...) does not hold.

    The message lists the known names. ``KeyError`` is mixed in so ``except KeyError``
    around a registry lookup still works; ``str()`` is the plain message (a bare
    ``KeyError`` would print it inside quotes).
    """

    def __init__(self, kind: str, name: object, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:
        return self.args[0]


class CheckFailed(CxrsynthError):
    """A verification found the data not as recorded (exit code 1: the data is wrong, not the call)."""

    exit_code = 1


class CxrsynthWarning(UserWarning):
    """Something a user should know that does not stop the command (e.g. a manifest skipped
    because it cannot be read). The CLI prints each as one line ``warning: ...``."""
