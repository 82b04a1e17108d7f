"""The conditional generator network: a diffusers ``UNet2DModel`` plus a condition MLP.

As in the paper's code (Mediffusion's ADM ``UNetModel``), the 22-value conditioning
vector goes through ``Linear -> SiLU -> Linear`` to the time-embedding width and is
added to the timestep embedding; a learned null embedding replaces it when the
condition is dropped (probability ``cond_drop_prob`` in training, and for the
unconditional branch of classifier-free guidance). The UNet receives the sum through
``class_embed_type="identity"``, which adds ``class_labels`` to the time embedding.

One ADM detail has no diffusers constructor argument: ADM uses a fixed number of heads
per attention block (``num_heads=4``), so the head width changes with the level's
channel count, while ``UNet2DModel`` takes one ``attention_head_dim`` for all blocks.
:func:`_set_attention_heads` sets ``heads``/``scale`` on each built ``Attention``
module instead, which the attention processors read at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from torch import nn

from cxrsynth.diffusion.presets import GeneratorConfig
from cxrsynth.errors import CxrsynthError

#: Name of the JSON written beside the weights: preset, conditioning layout, data version.
GENERATOR_JSON = "generator.json"


def conditioning_layout() -> list[str]:
    """Names of the 22 conditioning values, in order (labels.conditioning_vectors)."""
    from cxrsynth.labels import FINDING_COLUMNS, RACES, SEXES

    return ["age_decade", *(f"sex={s}" for s in SEXES), *(f"race={r}" for r in RACES), *FINDING_COLUMNS]


def _set_attention_heads(unet: nn.Module, num_heads: int, num_head_channels: int) -> None:
    """Give every attention block ADM's head count (see module docstring)."""
    for module in unet.modules():
        if isinstance(module, Attention):
            width = module.inner_dim
            heads = width // num_head_channels if num_head_channels > 0 else num_heads
            if width % heads:
                raise CxrsynthError(f"attention width {width} is not divisible by {heads} heads")
            module.heads = heads
            module.sliceable_head_dim = heads
            module.scale = (width // heads) ** -0.5


class ConditionalUNet(ModelMixin, ConfigMixin):
    """UNet2DModel + condition MLP + learned null embedding.

    Build with :meth:`build` from a :class:`GeneratorConfig`; save and load with
    ``save_pretrained`` / ``from_pretrained`` (one safetensors file for everything).

    Args:
        generator: ``GeneratorConfig.to_dict()``; stored in the diffusers config.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, generator: dict[str, Any]) -> None:
        super().__init__()
        cfg = GeneratorConfig.from_dict(dict(generator))
        self.gen_config = cfg
        channels = tuple(cfg.model_channels * m for m in cfg.channel_mult)
        attn = cfg.attention_levels
        emb_dim = 4 * cfg.model_channels
        if cfg.channel_mult[0] != 1:
            raise CxrsynthError("channel_mult[0] must be 1 (ADM time embedding width = 4 * model_channels)")
        self.unet = UNet2DModel(
            sample_size=cfg.image_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            block_out_channels=channels,
            layers_per_block=cfg.num_res_blocks,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=None,  # one head of full width; fixed by _set_attention_heads
            norm_num_groups=cfg.norm_groups,
            attn_norm_num_groups=cfg.norm_groups,  # else the mid block drops its GroupNorm with scale_shift
            resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default",
            dropout=cfg.dropout,
            time_embedding_dim=emb_dim,
            flip_sin_to_cos=True,  # ADM's [cos, sin] sinusoidal embedding
            freq_shift=0,
            class_embed_type="identity",
            add_attention=True,
        )
        _set_attention_heads(self.unet, cfg.num_heads, cfg.num_head_channels)
        # The paper's condition encoder: 22 -> emb -> emb (Mediffusion's class_embed).
        self.cond_embed = nn.Sequential(
            nn.Linear(cfg.condition_size, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.null_embed = nn.Parameter(torch.randn(1, emb_dim))
        if cfg.missing_value is not None:
            self.missing_param = nn.Parameter(torch.randn(1))

    @classmethod
    def build(cls, config: GeneratorConfig) -> "ConditionalUNet":
        """A randomly initialised network for ``config`` (uses the global torch RNG)."""
        return cls(generator=config.to_dict())

    def embed_condition(self, cond: torch.Tensor | None, drop: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The (B, emb) condition embedding, the null embedding where ``drop`` is True."""
        if cond is None:
            return self.null_embed.expand(batch, -1)
        if cond.shape != (batch, self.gen_config.condition_size):
            raise CxrsynthError(f"cond must be ({batch}, {self.gen_config.condition_size}), got {tuple(cond.shape)}")
        cond = cond.to(self.null_embed.dtype)
        if self.gen_config.missing_value is not None:
            cond = torch.where(cond == self.gen_config.missing_value, self.missing_param.to(cond.dtype), cond)
        emb = self.cond_embed(cond)  # (B, emb)
        if drop is not None:
            emb = torch.where(drop[:, None], self.null_embed.to(emb.dtype), emb)
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``[v (or eps / x0), variance interpolation]`` for noisy images.

        Args:
            x: (B, C, H, W) noisy images x_t.
            t: (B,) or scalar timesteps in [0, T).
            cond: (B, 22) conditioning vectors, or None for the null embedding.
            drop: (B,) bool, True where the condition is replaced by the null embedding.

        Returns:
            (B, out_channels, H, W) network output.
        """
        emb = self.embed_condition(cond, drop, x.shape[0])
        return self.unet(x, t, class_labels=emb).sample


def save_generator(
    model: ConditionalUNet,
    out: Path,
    *,
    data_version: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``save_pretrained`` plus :data:`GENERATOR_JSON` (preset, layout, data version).

    Args:
        model: The network to save (usually the EMA copy).
        out: Directory; created if missing.
        data_version: Version of the training data (``name@version``, as
            :func:`~cxrsynth.diffusion.train.train_dataset` records it).
        extra: More JSON-ready facts to record (training steps, source checkpoint...).

    Returns:
        ``out``.

    Raises:
        NonFiniteWeights: a weight is NaN or infinite (nothing is written).
    """
    from cxrsynth.safeload import check_finite, writing

    out = Path(out)
    check_finite(model.state_dict(), f"not writing the generator {out}")
    out.mkdir(parents=True, exist_ok=True)
    with writing(out / "diffusion_pytorch_model.safetensors", "the generator's weights"):
        model.save_pretrained(out, safe_serialization=True)
    meta = {
        "format": "cxrsynth-generator/1",
        "preset": model.gen_config.name,
        "config": model.gen_config.to_dict(),
        "conditioning": conditioning_layout(),
        "data_version": data_version,
        **(extra or {}),
    }
    from cxrsynth import cards

    cards.write(out, *generator_card(meta))
    (out / GENERATOR_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def generator_card(meta: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The model card (header, sections) of a generator from its :data:`GENERATOR_JSON` content."""
    from cxrsynth import cards

    config = meta["config"]
    data = meta.get("data_version") or "unknown (imported weights)"
    front = {
        "library_name": "cxrsynth", "pipeline_tag": "unconditional-image-generation",
        "tags": ["chest-x-ray", "diffusion", "synthetic-data", "cxrsynth"],
        **({"datasets": [meta["data_version"]]} if meta.get("data_version") else {}),
        "cxrsynth": {"preset": meta.get("preset"), "trained_on": meta.get("data_version"),
                     "trained_steps": meta.get("trained_steps"), "image_size": config.get("image_size"),
                     "conditioning": meta.get("conditioning"), "source": meta.get("source")},
    }
    sections = [
        ("Model", f"A conditional diffusion UNet (preset `{meta.get('preset')}`, {config.get('image_size')} px, "
                  f"{config.get('prediction_type')}, {config.get('beta_schedule')} schedule of {config.get('num_train_timesteps')} "
                  f"steps, condition dropout {config.get('cond_drop_prob')} for classifier-free guidance) conditioned on "
                  f"{len(meta.get('conditioning') or [])} values: {', '.join(meta.get('conditioning') or [])}. "
                  "Sample with `cxrsynth generate --generator <this folder>`."),
        ("Training data", f"{data}; {meta.get('trained_steps', 'an unrecorded number of')} steps. The generator saw ages "
                          "as decades, sex, race and the 14 findings of each training image."),
        ("Intended use", "Making synthetic chest X-rays with given findings and demographics to supplement or replace "
                         "real training data of classifiers (Khosravi et al., eBioMedicine 2024)."),
        ("Memorisation", "A generator can reproduce training radiographs. Audit every replica before it leaves the "
                         "hospital: `cxrsynth share audit` (and `share export`, which refuses what the audit flags "
                         "beyond chance). These weights were learnt from patients' images: share them only where the "
                         "training data's terms allow."),
        ("Limits", cards.bullet_list(cards.LIMITS)),
    ]
    return front, sections


def load_generator(path: Path, *, device: str | torch.device = "cpu") -> ConditionalUNet:
    """Load a generator written by :func:`save_generator`, in eval mode.

    Weights load from the safetensors file only (:func:`save_generator` writes nothing
    else): a generator folder from another site cannot run code through a pickled ``.bin``.

    Raises:
        CxrsynthError: the folder is not a generator, its files are damaged, or its weights
            hold NaN or infinite values.
    """
    from cxrsynth.errors import CxrsynthError

    path = Path(path)
    generator_info(path)  # a clean error for a missing or damaged generator.json
    try:
        model = ConditionalUNet.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True)  # no accelerate needed
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:  # missing/damaged config.json or weights
        message = " ".join(str(exc).split())[:300]
        raise CxrsynthError(f"cannot load the generator in {path}: {type(exc).__name__}: {message}") from None
    from cxrsynth.safeload import check_finite

    check_finite(model.state_dict(), f"the generator in {path}")
    return model.to(device).eval()


def generator_info(path: Path) -> dict[str, Any]:
    """The :data:`GENERATOR_JSON` of a generator directory.

    Raises:
        CxrsynthError: the file is missing or is not a JSON object.
    """
    from cxrsynth.config import read_json
    from cxrsynth.errors import CxrsynthError

    file = Path(path) / GENERATOR_JSON
    meta = read_json(file, missing=f"{path} is not a cxrsynth generator (no {GENERATOR_JSON})",
                     invalid=f"{file} is not valid JSON")
    if not isinstance(meta, dict) or "config" not in meta:
        raise CxrsynthError(f"{file} is not a cxrsynth generator.json (no config)")
    return meta
