"""The shared kits: one name registry, one config mixin."""

from __future__ import annotations

import pytest

from cxrsynth.errors import CxrsynthError, UnknownNameError
from cxrsynth.registry import Registry


def test_registry_lookup_names_the_known_ones_and_lists_them_for_help():
    reg: Registry[int] = Registry("widget")
    assert reg.register("b", 2) == 2 and reg.register("a", 1) == 1 and reg.register("c", 3, label="c:DIR") == 3
    assert reg["a"] == 1 and "b" in reg and "z" not in reg and [] not in reg
    assert list(reg) == ["b", "a", "c"] and len(reg) == 3  # registration order
    assert reg.names() == ["a", "b", "c"] and reg.help() == "a | b | c:DIR"
    with pytest.raises(UnknownNameError) as err:
        reg["nope"]
    assert str(err.value) == "unknown widget 'nope'; known: a, b, c:DIR"
    with pytest.raises(KeyError):  # a KeyError too, so Mapping.get works
        reg[["unhashable"]]
    assert reg.get("nope", 0) == 0
    with pytest.raises(CxrsynthError, match="widget 'a' is already registered"):
        reg.register("a", 5)
    assert reg["a"] == 1


def test_every_registry_of_the_project_is_one_registry():
    from cxrsynth.classify.presets import PRESETS as CLASSIFIER_PRESETS
    from cxrsynth.diffusion.presets import PRESETS, get_preset
    from cxrsynth.diffusion.schedule import SAMPLERS, get_sampler
    from cxrsynth.phantom.sites import SITES, get_site
    from cxrsynth.share.embed import EMBEDDINGS, build

    for reg in (PRESETS, CLASSIFIER_PRESETS, SAMPLERS, SITES, EMBEDDINGS):
        assert isinstance(reg, Registry)
    with pytest.raises(UnknownNameError, match="unknown sampler 'x'; known: ddim, ddim-unclipped, dpmpp"):
        get_sampler("x")
    with pytest.raises(UnknownNameError, match="unknown phantom site 'x'; known: cxp, emory, mimic"):
        get_site("x")
    with pytest.raises(UnknownNameError, match="unknown generator preset 'x'; known: micro, paper, tiny"):
        get_preset("x")
    for spec in ("x", "classifier", "pixels:foo"):
        with pytest.raises(UnknownNameError, match=f"unknown embedding '{spec}'; known: classifier:DIR, pixels, reid\\[:DIR\\]"):
            build(spec, device="cpu")
    assert build("pixels", device="cpu", pixel_size=8).size == 8


def test_help_text_reads_the_registries():
    from typer.testing import CliRunner

    from cxrsynth.cli import app

    def help_of(*command):
        return CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300"}).output

    assert "Classifier preset: paper | small." in help_of("classifier", "train")
    assert "Classifier preset: paper | small." in help_of("bench", "classifier")
    assert "classifier:DIR | pixels | reid[:DIR]" in help_of("share", "audit")
    assert "Generator preset: micro | paper | tiny." in help_of("generator", "train")
