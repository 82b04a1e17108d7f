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


def test_config_mixin_round_trips_refuses_unknown_keys_and_override_drops_none():
    import json
    from dataclasses import dataclass

    from cxrsynth.config import Config, given

    @dataclass(frozen=True)
    class Knobs(Config):
        kind = "knob config"

        size: int = 8
        widths: tuple[int, ...] = (1, 2)
        name: str | None = None

    knobs = Knobs(size=4)
    stored = json.loads(json.dumps(knobs.to_dict()))  # tuples become lists on disk
    assert stored == {"size": 4, "widths": [1, 2], "name": None}
    assert Knobs.from_dict(stored) == knobs  # lists come back as tuples
    with pytest.raises(CxrsynthError, match=r"unknown knob config keys: bogus, extra \(known: name, size, widths\)"):
        Knobs.from_dict({**stored, "extra": 1, "bogus": 2})
    assert knobs.override(size=None, name="a") == Knobs(size=4, name="a")  # None keeps the value
    assert knobs.override() == knobs and knobs.replace(name=None) == Knobs(size=4)  # replace keeps None
    with pytest.raises(CxrsynthError, match="unknown knob config settings: sizes"):
        knobs.override(sizes=3)
    assert given(a=None, b=0, c=False) == {"b": 0, "c": False}


def test_stage_configs_share_the_mixin_and_keep_their_json():
    import json

    from cxrsynth.classify.presets import ClassifierConfig
    from cxrsynth.classify.presets import get_preset as classifier_preset
    from cxrsynth.config import Config
    from cxrsynth.diffusion.presets import GeneratorConfig, get_preset
    from cxrsynth.diffusion.train import TrainConfig
    from cxrsynth.evaluate.compare import CompareConfig
    from cxrsynth.evaluate.metrics import EvaluateConfig
    from cxrsynth.diffusion.replicas import GenerateConfig
    from cxrsynth.mix import MixParams
    from cxrsynth.share.audit import AuditConfig
    from cxrsynth.share.export import ExportConfig
    from cxrsynth.splits import SplitParams

    for cls in (GeneratorConfig, ClassifierConfig, TrainConfig, GenerateConfig, AuditConfig, ExportConfig, EvaluateConfig,
                CompareConfig, MixParams, SplitParams):
        assert issubclass(cls, Config), cls
    paper = get_preset("paper")
    assert GeneratorConfig.from_dict(json.loads(json.dumps(paper.to_dict()))) == paper
    with pytest.raises(CxrsynthError, match="unknown generator config keys: colour"):
        GeneratorConfig.from_dict({**paper.to_dict(), "colour": 1})
    with pytest.raises(CxrsynthError, match="unknown classifier config keys: colour"):
        ClassifierConfig.from_dict({**classifier_preset("small").to_dict(), "colour": 1})
    assert classifier_preset("small", lr=None, epochs=2) == classifier_preset("small").replace(epochs=2)
    audit = AuditConfig().override(k=None, quantile=0.5)
    assert audit.k == AuditConfig.k and audit.quantile == 0.5


def test_shared_defaults_are_one_constant_and_help_reads_them():
    import inspect

    from typer.testing import CliRunner

    from cxrsynth import ingest, loader
    from cxrsynth.classify.presets import ClassifierConfig
    from cxrsynth.cli import app
    from cxrsynth.config import SHARD_SIZE, SHUFFLE_BUFFER
    from cxrsynth.evaluate.metrics import EvaluateConfig
    from cxrsynth.diffusion.replicas import GenerateConfig
    from cxrsynth.share.export import ExportConfig

    assert inspect.signature(ingest.ingest).parameters["shard_size"].default == SHARD_SIZE
    assert GenerateConfig.shard_size == ExportConfig.shard_size == SHARD_SIZE
    assert loader.LoaderConfig.shuffle_buffer == ClassifierConfig.shuffle_buffer == SHUFFLE_BUFFER

    def help_of(*command):
        return " ".join(CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300"}).output.split())

    assert f"Bootstrap replicates (default {EvaluateConfig.bootstrap})." in help_of("evaluate")
    assert f"(default {EvaluateConfig.bootstrap}, as `evaluate`)" in help_of("bench", "evaluate")
    assert "Significance level (default 0.05)." in help_of("compare")
    device = "cpu, cuda, cuda:1 (default: cuda if available, else cpu)."
    for command in (("generate",), ("generator", "train"), ("generator", "fid"), ("classifier", "train"),
                    ("classifier", "predict"), ("share", "audit"), ("bench", "classifier")):
        assert device in help_of(*command), command
