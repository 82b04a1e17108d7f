"""The one typed walker: Config.from_dict and the study's params.yaml parse through it."""

import json
from dataclasses import dataclass
from typing import Literal

import pytest

from cxrsynth.config import Config, ConfigError, parse, setting
from cxrsynth.errors import CxrsynthError


@dataclass(frozen=True)
class Inner(Config):
    kind = "inner config"

    steps: int = setting(3, ge=1)


@dataclass(frozen=True)
class Knobs(Config):
    kind = "knob config"

    size: int = 8
    rate: float = 0.5
    widths: tuple[int, ...] = (1, 2)
    mode: Literal["fast", "slow"] = "fast"
    name: str | None = None
    inner: Inner = Inner()


def test_from_dict_checks_types_naming_the_key():
    stored = json.loads(json.dumps(Knobs(size=4, inner=Inner(steps=5)).to_dict()))
    assert Knobs.from_dict(stored) == Knobs(size=4, inner=Inner(steps=5))
    cases = [
        ({"size": "4"}, "knob config: size: expected an integer, got '4'"),
        ({"size": True}, "knob config: size: expected an integer, got True"),
        ({"rate": "fast"}, "knob config: rate: expected a number, got 'fast'"),
        ({"widths": [1, "x"]}, "knob config: widths[1]: expected an integer, got 'x'"),
        ({"mode": "medium"}, "knob config: mode: expected one of 'fast', 'slow', got 'medium'"),
        ({"name": 3}, "knob config: name: expected a non-empty string, got 3"),
        ({"inner": {"steps": 0}}, "knob config: inner.steps: expected a value >= 1, got 0"),
        ({"inner": {"step": 2}}, "knob config: inner.step: unknown key (known here: steps); did you mean 'steps'?"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError) as err:
            Knobs.from_dict({**stored, **change})
        assert str(err.value) == message
        assert isinstance(err.value, CxrsynthError)
    assert Knobs.from_dict({"rate": 1}).rate == 1.0 and isinstance(Knobs.from_dict({"rate": 1}).rate, float)
    with pytest.raises(ConfigError, match="knob config: expected a mapping, got"):
        Knobs.from_dict([1, 2])  # type: ignore[arg-type]


def test_stored_generator_config_with_a_wrong_type_names_the_key():
    from cxrsynth.diffusion.presets import GeneratorConfig, get_preset

    stored = get_preset("micro").to_dict()
    with pytest.raises(CxrsynthError, match=r"^generator config: channel_mult\[0\]: expected an integer, got 'one'$"):
        GeneratorConfig.from_dict({**stored, "channel_mult": ["one"]})


def test_study_params_errors_come_from_the_same_walker():
    from cxrsynth.study.params import ParamsError, StudyParams

    assert issubclass(ParamsError, ConfigError)
    with pytest.raises(ParamsError, match=r"^study parameters: study.tests: expected a list of names, got 'cxp'$"):
        StudyParams.from_dict({"study": {"real": "cxp", "tests": "cxp"}})
    with pytest.raises(ConfigError, match="^settings: x: expected an integer, got 1.5$"):
        parse(int, 1.5, "x")


@dataclass(frozen=True)
class Ranged(Config):
    kind = "ranged config"

    rate: float = setting(0.5, gt=0)
    widths: tuple[int, ...] = setting((1, 2), ge=1)
    sizes: dict[str, int] = setting(factory=dict, ge=1)
    scale: float | None = None
    free: float = -3.0  # no range: only finite


def test_a_config_refuses_non_finite_and_out_of_range_numbers_however_it_is_made():
    import numpy as np

    nan, inf = float("nan"), float("inf")
    made = [  # (how, message): the Python API, replace/override (the CLI's path) and from_dict
        (lambda: Ranged(rate=inf), "ranged config: rate: expected a finite number, got inf"),
        (lambda: Ranged(free=nan), "ranged config: free: expected a finite number, got nan"),
        (lambda: Ranged(scale=-inf), "ranged config: scale: expected a finite number, got -inf"),
        (lambda: Ranged().replace(rate=0.0), "ranged config: rate: expected a value > 0, got 0"),
        (lambda: Ranged().override(rate=None, widths=(1, 0)), "ranged config: widths[1]: expected a value >= 1, got 0"),
        (lambda: Ranged(sizes={"a": 2, "b": 0}), "ranged config: sizes.b: expected a value >= 1, got 0"),
        (lambda: Ranged.from_dict({"rate": inf}), "ranged config: rate: expected a finite number, got inf"),
        (lambda: Ranged(rate=np.float32("nan")), "ranged config: rate: expected a finite number, got nan"),
    ]
    for make, message in made:
        with pytest.raises(ConfigError) as err:
            make()
        assert str(err.value) == message and isinstance(err.value, ValueError)
    assert Ranged(rate=np.float64(0.25), scale=2, free=-1e300).rate == 0.25  # numpy numbers and any finite value pass
    assert Ranged().override(rate=None) == Ranged()


def test_every_stage_config_refuses_what_made_garbage():
    """The examples of issue 18, through the library's own configs (the CLI rows are in tests/bad_inputs.py)."""
    from cxrsynth.classify.presets import ClassifierConfig, get_preset
    from cxrsynth.diffusion.presets import get_preset as generator_preset
    from cxrsynth.diffusion.replicas import GenerateConfig
    from cxrsynth.diffusion.train import TrainConfig
    from cxrsynth.evaluate.compare import CompareConfig
    from cxrsynth.evaluate.metrics import EvaluateConfig

    inf = float("inf")
    refused = [
        (lambda: GenerateConfig(guidance=inf), "generate config: guidance: expected a finite number"),
        (lambda: GenerateConfig(guidance=-0.5), "generate config: guidance: expected a value >= 0"),
        (lambda: get_preset("small", lr=inf), "classifier config: lr: expected a finite number"),
        (lambda: get_preset("paper", weight_decay=inf), "classifier config: weight_decay: expected a finite number"),
        (lambda: get_preset("small", lr=0.0), "classifier config: lr: expected a value > 0"),
        (lambda: get_preset("small", image_size=100_000), "classifier config: image_size: expected a value <= 2048"),
        (lambda: ClassifierConfig(image_size=4), "classifier config: image_size: expected a value >= 8"),
        (lambda: TrainConfig(lr=float("nan")), "generator training config: lr: expected a finite number"),
        (lambda: TrainConfig(weight_decay=-1.0), "generator training config: weight_decay: expected a value >= 0"),
        (lambda: generator_preset("micro").replace(image_size=4096), "generator config: image_size: expected a value <= 2048"),
        (lambda: EvaluateConfig(bootstrap=10**9), "evaluate config: bootstrap: expected a value <= 100000"),
        (lambda: CompareConfig(alpha=inf), "compare config: alpha: expected a finite number"),
    ]
    for make, words in refused:
        with pytest.raises(ConfigError, match=f"^{words}"):
            make()
    assert get_preset("small", image_size=2048, lr=1e-3).image_size == 2048  # the bounds themselves are valid
