"""Export a generator as a folder that plain diffusers loads (``generator export-diffusers``).

cxrsynth saves a :class:`~cxrsynth.diffusion.model.ConditionalUNet`, whose config only
cxrsynth understands (``UNet2DModel.from_pretrained`` on it builds a default 274M-parameter
model with random weights, with only a warning). This module writes the same network as a
standard diffusers ``UNet2DConditionModel`` plus the sampler's scheduler config::

    OUT/model_index.json            what each subfolder holds (diffusers' layout)
    OUT/unet/                       UNet2DConditionModel: config.json + safetensors
    OUT/unet/null_class_embedding.safetensors   the learned null embedding (guidance)
    OUT/scheduler/scheduler_config.json         DDIMScheduler (or DPMSolverMultistepScheduler)
    OUT/cxrsynth_export.json        conditioning layout, source generator, how to call
    OUT/README.md                   the model card (``library_name: diffusers``)

Why ``UNet2DConditionModel`` and not ``UNet2DModel``: ADM (and so the paper's generator
and every ``import-mediffusion`` output) uses a fixed number of heads per attention block,
so the head width changes with the level, and ``UNet2DModel`` takes one head width for all
blocks (the 0.06 difference of a hand rebuild). ``UNet2DConditionModel`` takes one per block.
The mapping (on the CPU the outputs are bit-identical: micro and tiny presets, the 256 px
``paper`` preset, and the images of a whole guided DDIM run, tests/test_diffusers_export.py):

* condition MLP ``Linear -> SiLU -> Linear`` = ``class_embed_type="projection"``
  (``TimestepEmbedding(22, emb)``; ``class_labels`` takes the 22-value condition);
* ``AttnDownBlock2D`` / ``AttnUpBlock2D`` with ``attention_head_dim`` per block; diffusers
  indexes that tuple by position for the up blocks too (not reversed), so position i
  serves down level i and up level L-1-i (an export that cannot serve both is refused);
* the middle block (resnet, self-attention, resnet) = ``UNetMidBlock2DSimpleCrossAttn``,
  whose attention attends to ``encoder_hidden_states`` tokens *and* the image's own: with
  zero tokens (``encoder_hidden_states`` of shape (B, 0, C)) it is the plain self-attention
  (its ``add_k_proj`` / ``add_v_proj`` are written as zeros and never reached);
* the learned null embedding of classifier-free guidance is not the projection of any
  condition, so it is saved beside the weights; the unconditional branch replaces the
  class embedding's output by it (a forward hook, as the README and
  tests/test_diffusers_export.py show).

A generator with a learned missing-value parameter (``missing_value`` set) has no diffusers
equivalent and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cxrsynth.diffusion.model import ConditionalUNet, conditioning_layout, generator_info, load_generator
from cxrsynth.diffusion.presets import GeneratorConfig
from cxrsynth.errors import CxrsynthError, UnknownNameError

#: File, in ``OUT/unet``, of the learned null embedding (key :data:`NULL_KEY`, shape (1, emb)).
NULL_FILE = "null_class_embedding.safetensors"
NULL_KEY = "null_class_embedding"
#: diffusers' timestep spacings (``timestep_spacing`` of its schedulers).
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
#: cxrsynth's notes in an exported folder.
EXPORT_JSON = "cxrsynth_export.json"


def head_dims(config: GeneratorConfig) -> tuple[int, ...]:
    """Per position, the attention head width ``UNet2DConditionModel`` needs there.

    Position i serves down level i and up level L-1-i; the last one serves the middle
    block too (diffusers reads ``attention_head_dim[-1]`` for it).

    Raises:
        CxrsynthError: a position serves attention blocks of different head widths.
    """
    channels = [config.model_channels * m for m in config.channel_mult]
    attn = config.attention_levels
    levels = len(channels)

    def width(c: int) -> int:
        heads = c // config.num_head_channels if config.num_head_channels > 0 else config.num_heads
        return c // heads

    dims = []
    for i in range(levels):
        need = {width(channels[lv]) for lv in (i, levels - 1 - i) if attn[lv]}
        if i == levels - 1:
            need.add(width(channels[-1]))
        if len(need) > 1:
            raise CxrsynthError(
                f"cannot export: diffusers gives down level {i}, up level {levels - 1 - i}"
                f"{' and the middle block' if i == levels - 1 else ''} one attention head width, and this "
                f"generator needs {sorted(need)} there")
        dims.append(need.pop() if need else channels[i])
    return tuple(dims)


def unet_config(config: GeneratorConfig) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` keyword arguments of the network of ``config``."""
    if config.missing_value is not None:
        raise CxrsynthError("cannot export: the generator replaces missing condition values by a learned "
                            "parameter (missing_value), which diffusers' projection class embedding cannot express")
    channels = tuple(config.model_channels * m for m in config.channel_mult)
    attn = config.attention_levels
    mid = channels[-1]
    return {
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "block_out_channels": channels,
        "layers_per_block": config.num_res_blocks,
        "norm_num_groups": config.norm_groups,
        "norm_eps": 1e-5,
        "dropout": config.dropout,
        "cross_attention_dim": mid,
        "attention_head_dim": head_dims(config),
        "resnet_time_scale_shift": "scale_shift" if config.scale_shift_norm else "default",
        "time_embedding_dim": 4 * config.model_channels,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": config.condition_size,
    }


def convert_state_dict(model: ConditionalUNet) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``UNet2DConditionModel``'s names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("unet."):
            out[key[len("unet."):]] = value
        elif key.startswith("cond_embed.0."):
            out["class_embedding.linear_1." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("cond_embed.2."):
            out["class_embedding.linear_2." + key.rsplit(".", 1)[1]] = value
        elif key not in ("null_embed", "missing_param"):
            raise CxrsynthError(f"cannot export: no diffusers name for the generator weight {key!r}")
    return out


def scheduler_config(config: GeneratorConfig, sampler: str = "ddim", timestep_spacing: str = "trailing") -> tuple[str, dict[str, Any]]:
    """``(diffusers class name, config)`` of the scheduler of cxrsynth's ``sampler``.

    ``ddim`` is cxrsynth's ``FittedDDIM``, which differs from ``DDIMScheduler`` only where
    float32 rounding made ``eta = 1`` NaN (schedule.FittedDDIM): at ``eta = 0`` they agree.
    """
    from cxrsynth.diffusion.schedule import get_sampler

    scheduler = get_sampler(sampler).build(config, timestep_spacing)
    cls = type(scheduler)
    while cls.__module__.startswith("cxrsynth"):
        cls = cls.__base__
    return cls.__name__, dict(scheduler.config)


def export_diffusers(generator_dir: Path, out: Path, *, sampler: str = "ddim",
                     timestep_spacing: str = "trailing") -> dict[str, Any]:
    """Write ``generator_dir``'s generator as a diffusers folder ``out`` (see the module docstring).

    Returns:
        What was written (paths, classes, parameter count).

    Raises:
        CxrsynthError: the generator cannot be expressed in diffusers, or ``out`` exists
            and is not empty.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from cxrsynth import __version__
    from cxrsynth.diffusion.replicas import generator_id

    generator_dir, out = Path(generator_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise CxrsynthError(f"{out} exists and is not empty; export into a new folder")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise UnknownNameError("timestep spacing", timestep_spacing, TIMESTEP_SPACINGS)
    meta = generator_info(generator_dir)
    model = load_generator(generator_dir)
    cfg = model.gen_config
    kwargs = unet_config(cfg)
    scheduler_class, scheduler = scheduler_config(cfg, sampler, timestep_spacing)
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel(**kwargs)
    state = convert_state_dict(model)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    unused = {"mid_block.attentions.0.add_k_proj.weight", "mid_block.attentions.0.add_k_proj.bias",
              "mid_block.attentions.0.add_v_proj.weight", "mid_block.attentions.0.add_v_proj.bias"}
    if unexpected or set(missing) - unused:
        raise CxrsynthError(f"cannot export: the weights do not fit UNet2DConditionModel (missing "
                            f"{sorted(set(missing) - unused)[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key in missing:  # never reached with zero encoder tokens; zeros make that plain
            unet.get_parameter(key).zero_()
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    save_file({NULL_KEY: model.null_embed.detach().contiguous()}, str(out / "unet" / NULL_FILE))
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": scheduler_class, **scheduler}, indent=2, sort_keys=True) + "\n")
    import diffusers

    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "DDIMPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler_class], "unet": ["diffusers", "UNet2DConditionModel"],
    }, indent=2) + "\n")
    info = {
        "format": "cxrsynth-diffusers-export/1",
        "cxrsynth_version": __version__,
        "source": {"folder": generator_dir.name, "generator_id": generator_id(generator_dir)},
        "preset": meta.get("preset"),
        "data_version": meta.get("data_version"),
        "conditioning": conditioning_layout(),
        "sampler": sampler,
        "timestep_spacing": timestep_spacing,
        "unet": {"class": "UNet2DConditionModel", "class_labels": f"(B, {cfg.condition_size}) condition",
                 "encoder_hidden_states": f"zeros (B, 0, {kwargs['cross_attention_dim']})",
                 "prediction_channels": cfg.in_channels, "null_class_embedding": f"unet/{NULL_FILE}"},
        "parameters": sum(p.numel() for p in unet.parameters()),
        "scheduler": scheduler_class,
    }
    (out / EXPORT_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    _write_card(out, meta, info)
    return {**info, "out": str(out)}


def _write_card(out: Path, meta: dict[str, Any], info: dict[str, Any]) -> None:
    """The generator's model card, as a diffusers model (``library_name: diffusers``), with how to call it."""
    from cxrsynth import cards
    from cxrsynth.diffusion.model import generator_card

    front, sections = generator_card(meta)
    front = {**front, "library_name": "diffusers", "tags": [*front["tags"], "diffusers"]}
    use = (f"`UNet2DConditionModel.from_pretrained(DIR, subfolder=\"unet\")` and "
           f"`{info['scheduler']}.from_pretrained(DIR, "
           "subfolder=\"scheduler\")`. Call the UNet with `class_labels` = the (B, "
           f"{len(info['conditioning'])}) condition (layout in `{EXPORT_JSON}`) and `encoder_hidden_states` = "
           f"{info['unet']['encoder_hidden_states']} (no tokens: plain self-attention in the middle block); keep the "
           f"first {info['unet']['prediction_channels']} output channel(s) (v-prediction; the other is the learned "
           "variance). For classifier-free guidance, the unconditional branch replaces the class embedding's output by "
           f"`{NULL_KEY}` of `unet/{NULL_FILE}` (a forward hook on `unet.class_embedding`); cxrsynth's README shows "
           "the loop, whose images equal `cxrsynth generate`'s for the same seeds.")
    model = " Exported by `cxrsynth generator export-diffusers`."
    sections = [(title, text.split(" Sample with")[0] + model if title == "Model" else text) for title, text in sections]
    cards.write(out, front, [*sections, ("Use with diffusers", use)])
