"""Classifier presets, registered by name and built from data (timm style).

A preset is a :class:`ClassifierConfig`: the timm model and its input size, the
optimisation (optimizer, learning rate and schedule, EMA, clipping), the epochs and the
data rules (uncertain images, augmentation). ``classifier train`` records the resolved
config in ``classifier.json``; any field can be overridden (``--epochs``, ``--lr`` ...).

* ``paper`` — Khosravi et al., Methods "Pathology classification": ConvNeXt-base at
  256 x 256, Lion, learning rate 1e-5, EMA 0.9999, at most 50 epochs, the best epoch by
  the lowest tuning loss. Table E1 is not in the text we have; the batch (32 per GPU),
  the Lion weight decay (3e-4, biases and norms exempt), gradient clipping at norm 1, the
  constant learning rate and the early stop after 5 epochs without a lower tuning loss
  follow the authors' published training script
  (``classifier_train/classifier_training.py``), which ran 4-GPU DDP, i.e. 128 images per
  step. That script also used mixup/cutmix, which the paper does not mention and which
  cxrsynth leaves out.
* ``small`` — a CPU-sized ResNet-10-T from timm with a quarter of its widths
  (channels 32/64/128/256, stem 16; 1.3M parameters) at 64 px, AdamW with a cosine
  schedule; learns the phantom's visible findings in about a minute on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxrsynth.config import MAX_BATCH, MAX_EPOCHS, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, SHUFFLE_BUFFER, Config, setting
from cxrsynth.errors import CxrsynthError, UnknownNameError
from cxrsynth.registry import Registry

#: Optimizers a config may name (timm.optim.create_optimizer_v2 names).
OPTIMIZERS = ("lion", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ClassifierConfig(Config):
    """Everything that defines a classifier's network and its training.

    Attributes:
        name: Preset name this configuration came from.
        model: timm model name (built with ``pretrained=False``, 14 classes, 1 channel).
        model_kwargs: Extra keyword arguments of ``timm.create_model`` (widths, depths,
            ``drop_path_rate`` ...).
        image_size: Input side in pixels (images are resized to it), 8 to 2048
            (:data:`cxrsynth.config.MAX_IMAGE_SIDE` says why).
        epochs: Epochs to train at most (the paper's maximum, 50); the best one is kept.
        patience: Stop after this many epochs without a lower tuning loss (0: never; the
            authors' script stopped after 5).
        batch_size: Images per step per process.
        optimizer: ``lion`` | ``adamw`` | ``sgd`` (timm's optimizer factory).
        lr: Peak learning rate.
        weight_decay: Weight decay (biases and norm weights exempt).
        schedule: ``constant`` or ``cosine`` (per step, to 0 at the last epoch's end).
        warmup_steps: Linear learning-rate warm-up steps.
        ema_decay: EMA decay of the weights (paper 0.9999); 0 disables the EMA. The
            tuning loss, the best epoch and the saved weights are the EMA's.
        ema_warmup: timm's EMA warm-up (decay ``min(ema_decay, 1 - (1 + step)^-2/3)``),
            so that a short run's EMA is not its random initialisation.
        grad_clip: Max gradient norm (0: off).
        exclude_uncertain: Train and tune only on images without an uncertain finding
            (the paper). False keeps them and masks their uncertain findings out of the loss.
        augment: Training augmentations (:class:`cxrsynth.loader.Augment` defaults).
        seed: Seed of the initial weights, the data order and the augmentations.
        shuffle_buffer: Samples per loader stream shuffle buffer.
        streams: Loader streams per process (the data order depends on it, not on workers).
        workers: DataLoader workers per process (does not change the result; must divide
            ``streams``).
        checkpoint_every: Also checkpoint every N steps inside an epoch (0: at epoch ends only).
        log_every: Progress readout every N steps (a GPU sync).
    """

    kind = "classifier config"  # a class attribute (no annotation): how errors name these settings

    name: str = "custom"
    model: str = "convnext_base"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = setting(256, ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE)
    epochs: int = setting(50, ge=1, le=MAX_EPOCHS)
    patience: int = 0
    batch_size: int = setting(32, ge=1, le=MAX_BATCH)
    optimizer: str = "lion"
    lr: float = setting(1e-5, gt=0)
    weight_decay: float = setting(3e-4, ge=0)
    schedule: str = "constant"
    warmup_steps: int = setting(0, ge=0)
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    grad_clip: float = setting(1.0, ge=0)
    exclude_uncertain: bool = True
    augment: bool = True
    seed: int = 0
    shuffle_buffer: int = SHUFFLE_BUFFER
    streams: int = 8
    workers: int = 0
    checkpoint_every: int = setting(0, ge=0)
    log_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()  # every number finite, and the ranges of setting(...)
        if self.optimizer not in OPTIMIZERS:
            raise UnknownNameError("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise UnknownNameError("learning-rate schedule", self.schedule, SCHEDULES)
        if self.patience < 0:
            raise CxrsynthError(f"classifier config: patience must be >= 0, got {self.patience}")
        for name in ("epochs", "batch_size", "streams", "log_every"):
            if getattr(self, name) < 1:
                raise CxrsynthError(f"classifier config: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise CxrsynthError(f"classifier config: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.workers < 0 or (self.workers and self.streams % self.workers):
            raise CxrsynthError(f"classifier config: workers ({self.workers}) must divide streams ({self.streams})")


PRESETS: Registry[ClassifierConfig] = Registry("classifier preset")


def register_preset(config: ClassifierConfig) -> ClassifierConfig:
    """Register ``config`` under ``config.name``; names are unique."""
    return PRESETS.register(config.name, config)


def get_preset(name: str, **overrides: Any) -> ClassifierConfig:
    """The preset called ``name`` with the given fields overridden (``None``: keep the preset's).

    Another ``model`` than the preset's drops the preset's ``model_kwargs`` (its widths
    belong to its own model) unless ``model_kwargs`` is given too.
    """
    preset = PRESETS[name]
    if overrides.get("model") not in (None, preset.model) and overrides.get("model_kwargs") is None:
        overrides = {**overrides, "model_kwargs": {}}
    return preset.override(**overrides)


register_preset(ClassifierConfig(name="paper", patience=5))

# Measured on the 2-core development machine (one thread, batch 32, 64 px): ~235 training
# images/s, vs ~78 for the full-width resnet10t and ~15 for convnext_atto.
register_preset(ClassifierConfig(
    name="small",
    model="resnet10t",
    model_kwargs={"channels": [32, 64, 128, 256], "stem_width": 16},
    image_size=64,
    epochs=8,
    batch_size=32,
    optimizer="adamw",
    lr=2e-3,
    weight_decay=1e-4,
    schedule="cosine",
    warmup_steps=20,
    ema_decay=0.99,
    streams=2,
))
