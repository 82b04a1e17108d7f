"""Load torch files that someone else may have made, without running any of their code.

``torch.load`` unpickles, and a pickle may call any importable function while it loads:
a checkpoint from another site could run code on the machine that opens it, before any
check. Every torch file cxrsynth reads goes through :func:`load_torch`, which uses
``weights_only=True``: torch's restricted unpickler builds tensors, containers and plain
values only, plus the globals a format needs and the caller names.

Classes of other libraries that a known format carries are replaced, not trusted: a
Lightning checkpoint of Mediffusion keeps its hyper-parameters as OmegaConf containers,
and :data:`LIGHTNING` maps each OmegaConf class to an :class:`Opaque` stand-in. The
unpickler builds the stand-in instead, so no OmegaConf code runs (OmegaConf need not
even be installed), and the state is kept as plain data that nothing interprets.

A refused file raises :class:`~cxrsynth.errors.CxrsynthError` naming the global that was
refused and saying that the file may be unsafe; a damaged or empty file raises one too.

Weights must also be numbers: :func:`check_finite` refuses a state (weights, a training
checkpoint) holding NaN or infinite values, naming the tensors. Every place that loads or
saves weights calls it once (:func:`cxrsynth.checkpoints.load` and ``save``, the
classifier's and the generator's load and save functions, the Mediffusion import), so NaN
weights neither come in from a file nor go out of a diverged run: a network with them
outputs NaN, which becomes black images and constant probabilities downstream.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from cxrsynth.errors import CxrsynthError


class Opaque:
    """Stand-in for an allow-listed class of another library: keeps the arguments and state
    it was pickled with as plain data and runs none of the replaced class's code."""

    replaces = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.replaces}>"


def opaque(name: str) -> tuple[type, str]:
    """An allow-list entry that makes the unpickler build an :class:`Opaque` for ``name``."""
    return type(f"Opaque_{name.replace('.', '_')}", (Opaque,), {"replaces": name}), name


#: What a PyTorch Lightning checkpoint of Mediffusion's ``DiffusionModule`` needs beyond
#: tensors and containers (found by saving one with ``trainer.save_checkpoint`` and loading
#: it with ``weights_only=True``): ``hyper_parameters`` is an OmegaConf ``DictConfig`` (and
#: ``hparams_type`` the class itself), whose metadata refers to ``typing.Any``, ``dict``,
#: ``list``, ``int`` and an empty ``collections.defaultdict``. The OmegaConf value nodes of
#: other types, and the builtin types their metadata may name, are listed too (a config
#: merged from a typed schema holds them); calling any of those builtins runs no user code.
LIGHTNING: tuple[Any, ...] = (
    *(opaque(f"omegaconf.{n}") for n in (
        "dictconfig.DictConfig", "listconfig.ListConfig", "base.ContainerMetadata", "base.Metadata",
        "nodes.AnyNode", "nodes.StringNode", "nodes.IntegerNode", "nodes.FloatNode", "nodes.BooleanNode",
        "nodes.BytesNode", "nodes.PathNode",
    )),
    opaque("typing.Any"),
    dict, list, int, float, str, bool, tuple,
    defaultdict,
)

_REFUSED = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs|$)"),
    re.compile(r"Can only (?:build|create new object|SETITEMS?|append).*?got (.+)$"),
)


class NonFiniteWeights(CxrsynthError):
    """Weights (or a training state) holding NaN or infinite values."""


#: Why a state with NaN or infinite values is refused, for messages.
NONFINITE_WHY = ("weights like these come from a diverged training run or a damaged file, and a network "
                 "with them outputs NaN")


def nonfinite(state: Any, prefix: str = "") -> tuple[list[str], int]:
    """``(names, count)``: the floating-point tensors in ``state`` (a tensor, or mappings and
    lists of them, as a state dict or a checkpoint) that hold NaN or infinite values, and how
    many floating-point tensors there are."""
    import torch

    if torch.is_tensor(state):
        if not state.is_floating_point() and not state.is_complex():
            return [], 0
        return ([prefix or "tensor"] if not bool(torch.isfinite(state).all()) else []), 1
    bad, count = [], 0
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return [], 0
    for key, value in items:
        more, n = nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        bad += more
        count += n
    return bad, count


def check_finite(state: Any, what: str, why: str = NONFINITE_WHY) -> None:
    """Refuse ``state`` (see :func:`nonfinite`) if any of its tensors holds NaN or an infinity.

    Args:
        state: A tensor, a state dict or a checkpoint (nested mappings and lists).
        what: What it is, for the message (``/x/model.safetensors``, ``not writing /x/y``).
        why: The rest of the message.

    Raises:
        NonFiniteWeights: naming the first tensors and how many of all there are.
    """
    bad, count = nonfinite(state)
    if bad:
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise NonFiniteWeights(f"{what}: NaN or infinite values in {len(bad)} of {count} tensor(s) ({names}); {why}")


def _unpickler_message(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    return (found.group(1) if found else text.strip().splitlines()[0] if text.strip() else type(exc).__name__).strip()


def load_torch(path: str | Path, what: str, *, allow: tuple = (), map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with ``allow`` added to the allow-list.

    Args:
        path: The file.
        what: What the file should be, for messages ("Mediffusion checkpoint").
        allow: Extra globals: classes/functions, or ``(stand-in, "module.Name")`` pairs
            such as :func:`opaque` returns (e.g. :data:`LIGHTNING`).
        map_location: As for ``torch.load``.

    Raises:
        CxrsynthError: the file is missing, empty, not a torch file, or needs a global
            outside the allow-list (then the message names it and warns the file may be unsafe).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CxrsynthError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CxrsynthError(f"{what} {path} is empty (0 bytes)")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = _unpickler_message(exc)
        for pattern in _REFUSED:
            found = pattern.search(message)
            if found:
                raise CxrsynthError(
                    f"{path}: refused to load {found.group(1).strip()} from this {what}: it is not on the allow-list of "
                    "tensors and plain data, so the file may be unsafe (a pickle can run code while it loads); "
                    "load only files you trust, or re-save the weights alone (torch.save(model.state_dict(), ...))"
                ) from None
        raise CxrsynthError(f"{path} is not a PyTorch checkpoint ({what}): {message}") from None
    except Exception as exc:  # torch raises many types for damaged files (zip, EOF, struct, runtime)
        raise CxrsynthError(f"{path} is not a PyTorch checkpoint ({what}): {_unpickler_message(exc)}") from None


class WriteFailed(CxrsynthError):
    """Writing weights or a checkpoint failed (a full disk, a file-size limit, a read-only folder)."""

    exit_code = 1


@contextlib.contextmanager
def writing(path: str | Path, what: str, partial: str | Path | None = None) -> Iterator[None]:
    """Around a library's write of ``path``: its failure becomes a :class:`WriteFailed` naming the file.

    ``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]
    ... unexpected pos``, safetensors as ``SafetensorError: ... I/O error``, neither with an
    errno; both leave a partial file. ``partial`` (the temporary file being written, default
    ``path``) is removed; a file renamed into place only after the write keeps the previous one.
    """
    try:
        yield
    except Exception as exc:  # torch's RuntimeError, SafetensorError, OSError: whatever the writer raises
        if not isinstance(exc, (RuntimeError, OSError)) and type(exc).__name__ != "SafetensorError":
            raise
        Path(partial or path).unlink(missing_ok=True)
        why = " ".join(str(exc).split())[:160]
        kept = "nothing was replaced (a previous file there is kept)" if partial else "the partial file was removed"
        raise WriteFailed(f"could not write {what} {path}: {why}. The disk may be full, a file-size limit reached or "
                          f"the folder read-only; {kept}") from None
