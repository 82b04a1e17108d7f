"""Option plumbing shared by the commands: "not given" options, and help filled in lazily.

* :func:`given` (:func:`cxrsynth.config.given`, the one "``None`` means not given" rule)
  drops the options a user did not give, so the library's default applies and lives in
  one place, its config dataclass (:meth:`cxrsynth.config.Config.override`) or function
  (timm's ``create_model`` does the same).
* :class:`LazyHelp`: the registries (samplers, generator and classifier presets, phantom sites, embeddings, guidance
  formulas, compile modes) and the configs' defaults live in modules that import torch,
  diffusers or pandas. Reading them when the CLI loads would make every command, and
  ``--help``, wait for those imports; copying them into the CLI would keep a second copy to
  go stale. So an option's help says ``{samplers}`` (the registered names, ``a | b | c``)
  or ``{GenerateConfig.steps}`` (a default), and :class:`LazyHelp`, the class of every
  command whose help does, fills them in only when the help is shown.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable

from typer.core import TyperCommand

from cxrsynth.config import given
from cxrsynth.registry import Registry

__all__ = ["LazyHelp", "default", "fill", "given", "names"]


def _names(module: str, attribute: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        value = getattr(importlib.import_module(module), attribute)
        return value.labels() if isinstance(value, Registry) else list(value)

    return load


#: Placeholder → the names registered there (a :class:`cxrsynth.registry.Registry`, or a tuple of choices).
REGISTRIES: dict[str, Callable[[], list[str]]] = {
    "samplers": _names("cxrsynth.diffusion.schedule", "SAMPLERS"),
    "presets": _names("cxrsynth.diffusion.presets", "PRESETS"),
    "classifier_presets": _names("cxrsynth.classify.presets", "PRESETS"),
    "sites": _names("cxrsynth.phantom.sites", "SITES"),
    "embeddings": _names("cxrsynth.share.embed", "EMBEDDINGS"),
    "criteria": _names("cxrsynth.share.copies", "CRITERIA"),
    "cfg_formulas": _names("cxrsynth.diffusion.sample", "CFG_FORMULAS"),
    "compile_modes": _names("cxrsynth.diffusion.sample", "COMPILE_MODES"),
    "optimizers": _names("cxrsynth.classify.presets", "OPTIMIZERS"),
    "schedules": _names("cxrsynth.classify.presets", "SCHEDULES"),
    "clusters": _names("cxrsynth.evaluate.metrics", "CLUSTERS"),
}

#: Placeholder prefix → where the defaults live (a dataclass, or a function's keyword defaults).
DEFAULTS: dict[str, tuple[str, str]] = {
    "GenerateConfig": ("cxrsynth.diffusion.replicas", "GenerateConfig"),
    "TrainConfig": ("cxrsynth.diffusion.train", "TrainConfig"),
    "Preprocess": ("cxrsynth.imaging", "Preprocess"),
    "SplitParams": ("cxrsynth.splits", "SplitParams"),
    "MixParams": ("cxrsynth.mix", "MixParams"),
    "ingest": ("cxrsynth.ingest", "ingest"),
    "AuditConfig": ("cxrsynth.share.audit", "AuditConfig"),
    "SscdConfig": ("cxrsynth.share.embed", "SscdConfig"),
    "GateConfig": ("cxrsynth.share.gate", "GateConfig"),
    "EvaluateConfig": ("cxrsynth.evaluate.metrics", "EvaluateConfig"),
    "CompareConfig": ("cxrsynth.evaluate.compare", "CompareConfig"),
}

_PLACEHOLDER = re.compile(r"\{(" + "|".join(REGISTRIES) + r")\}|\{(" + "|".join(DEFAULTS) + r")\.(\w+)\}")


def names(registry: str) -> str:
    """The names registered in ``registry`` (a key of :data:`REGISTRIES`), as ``a | b | c``."""
    return " | ".join(REGISTRIES[registry]())


def default(owner: str, field: str) -> str:
    """The default of ``owner.field`` (``owner`` a key of :data:`DEFAULTS`), as help shows it."""
    module, attribute = DEFAULTS[owner]
    obj = getattr(importlib.import_module(module), attribute)
    if dataclasses.is_dataclass(obj):
        spec = {f.name: f for f in dataclasses.fields(obj)}[field]
        value = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    else:
        value = inspect.signature(obj).parameters[field].default
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def fill(text: str) -> str:
    """``text`` with every ``{registry}`` and ``{Owner.field}`` placeholder replaced."""
    return _PLACEHOLDER.sub(lambda m: names(m[1]) if m[1] else default(m[2], m[3]), text)


class LazyHelp(TyperCommand):
    """A command whose parameters' help may hold placeholders (see the module docstring)."""

    def format_help(self, ctx, formatter) -> None:
        for param in self.get_params(ctx):
            text = getattr(param, "help", None)
            if text and "{" in text:
                param.help = fill(text)
        return super().format_help(ctx, formatter)
