"""Generator presets, registered by name and built from data (timm style).

A preset is a :class:`GeneratorConfig`: the UNet layout (ADM notation: base channels,
channel multipliers, residual blocks per level, attention at given downsampling
factors), the image size and the diffusion process (schedule, prediction type, number
of training steps). Register new presets with :func:`register_preset`.

``paper`` is the ADM layout of Khosravi et al. (Mediffusion 0.6.0 default
config): 128 channels, multipliers 1,1,2,2,4,4, two residual blocks per level,
attention at downsampling 8/16/32 (32/16/8 px at 256 px), 4 heads, scale-shift norm,
1 input and 2 output channels (v and the learned-range variance), v-prediction, cosine
schedule with zero terminal SNR, 1000 steps. ``tiny`` trains on 2 CPU cores in minutes
at 64 px; ``micro`` is for tests (32 px, a few thousand parameters per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cxrsynth.config import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, Config, setting
from cxrsynth.errors import CxrsynthError, UnknownNameError
from cxrsynth.labels import CONDITION_SIZE
from cxrsynth.registry import Registry

#: What the network predicts (diffusers' ``prediction_type``).
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")


@dataclass(frozen=True)
class GeneratorConfig(Config):
    """Everything that defines a generator's network and diffusion process.

    Attributes:
        name: Preset name this configuration came from.
        image_size: Side of the square single-channel image, in pixels.
        in_channels: Image channels (1 for radiographs).
        out_channels: 2 = [prediction, learned-range variance]; 1 = fixed variance.
        model_channels: Base channel count (ADM ``model_channels``).
        channel_mult: Channel multiplier per resolution level.
        num_res_blocks: Residual blocks per level on the way down (up uses one more).
        attention_ds: Downsampling factors (1, 2, 4, ...) with self-attention, as in
            ADM's ``attention_resolutions``.
        num_heads: Attention heads per block (ADM ``num_heads``); ignored when
            ``num_head_channels`` is positive.
        num_head_channels: Channels per head (ADM ``num_head_channels``), -1 = unused.
        norm_groups: GroupNorm groups.
        dropout: Dropout in the residual blocks.
        scale_shift_norm: FiLM-style ``norm(h) * (1 + scale) + shift`` in res blocks.
        condition_size: Length of the conditioning vector (22, labels.CONDITION_SIZE).
        cond_drop_prob: Probability of replacing the condition by the learned null
            embedding in training (classifier-free guidance).
        num_train_timesteps: Diffusion steps T.
        beta_schedule: diffusers name of the beta schedule.
        zero_terminal_snr: Rescale betas so that alpha_bar_T = 0 (Lin et al. 2023).
        prediction_type: ``v_prediction``, ``epsilon`` or ``sample``.
        vlb_weight: Weight of the variational bound term that trains the variance
            channel (improved DDPM's hybrid loss; 0 disables it).
        missing_value: If set, condition entries equal to it are replaced by a learned
            scalar before the MLP (Mediffusion's ``missing_class_value``). cxrsynth's
            own vectors code unknowns as zeros (labels.conditioning_vectors), so None.
    """

    kind = "generator config"  # a class attribute (no annotation): how errors name these settings

    name: str = "custom"
    image_size: int = setting(256, ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE)
    in_channels: int = 1
    out_channels: int = 2
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8, 16, 32)
    num_heads: int = 4
    num_head_channels: int = -1
    norm_groups: int = 32
    dropout: float = setting(0.0, ge=0, lt=1)
    scale_shift_norm: bool = True
    condition_size: int = CONDITION_SIZE
    cond_drop_prob: float = setting(0.1, ge=0, le=1)
    num_train_timesteps: int = setting(1000, ge=1)
    beta_schedule: str = "squaredcos_cap_v2"
    zero_terminal_snr: bool = True
    prediction_type: str = "v_prediction"
    vlb_weight: float = setting(1.0, ge=0)
    missing_value: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # every number finite, and the ranges of setting(...)
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise CxrsynthError(
                f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mult) - 1} "
                f"(one halving per level after the first of channel_mult={self.channel_mult})"
            )
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise CxrsynthError("out_channels must be in_channels (fixed variance) or 2x (learned range)")
        if self.prediction_type not in PREDICTION_TYPES:
            raise UnknownNameError("prediction type", self.prediction_type, PREDICTION_TYPES)

    @property
    def learned_variance(self) -> bool:
        """True when the network also outputs the variance interpolation channel."""
        return self.out_channels == 2 * self.in_channels

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Per level, whether its blocks have self-attention (level i is at ds 2**i)."""
        return tuple(2**i in self.attention_ds for i in range(len(self.channel_mult)))


PRESETS: Registry[GeneratorConfig] = Registry("generator preset")


def register_preset(config: GeneratorConfig) -> GeneratorConfig:
    """Register ``config`` under ``config.name``; names are unique."""
    return PRESETS.register(config.name, config)


def get_preset(name: str, **overrides: Any) -> GeneratorConfig:
    """The preset called ``name``, optionally with some fields overridden."""
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config


def list_presets() -> list[str]:
    """Registered preset names."""
    return PRESETS.names()


# The paper's generator (Mediffusion 0.6.0 default.yaml + Table E1; ~125M parameters).
register_preset(GeneratorConfig(name="paper"))

# Demo generator: 64 px, 4 levels (16/32/32/64 channels at 64/32/16/8 px), one res block
# per level, attention at 8 px (and in the middle block); 0.83M parameters, 0.56 GFLOP
# per forward. Measured on the 2-core CPU machine, one thread, batch 16 (train) / 32
# (dpmpp sampling): ~22 train images/s and ~66 forwards/s (3.3 images/s at 20 steps),
# vs ~4.8 / ~16 for the earlier 32-channel layout with attention also at 16 px (3.4M
# parameters, 2.2 GFLOP). Convolution backward dominates; channels_last was no faster
# on CPU, and the VLB term costs under 10%.
register_preset(
    GeneratorConfig(
        name="tiny",
        image_size=64,
        model_channels=16,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=1,
        attention_ds=(8,),
        num_heads=4,
        norm_groups=8,
    )
)

# Test generator: 32 px, 3 levels, 8 base channels; runs a forward pass in milliseconds.
register_preset(
    GeneratorConfig(
        name="micro",
        image_size=32,
        model_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_ds=(4,),
        num_heads=2,
        norm_groups=4,
        num_train_timesteps=1000,
    )
)

