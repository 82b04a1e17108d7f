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
