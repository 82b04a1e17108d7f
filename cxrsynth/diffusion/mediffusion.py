"""Import a Mediffusion checkpoint (the paper's published DDPM format) into cxrsynth.

Mediffusion (0.6.0 in the paper, 0.7.1 on PyPI) trains an ADM-style ``UNetModel``
(guided-diffusion layout) with a ``class_embed`` MLP and a ``null_cls_embed``. Every
part maps exactly onto :class:`~cxrsynth.diffusion.model.ConditionalUNet`:

=============================================  ==========================================
Mediffusion (ADM) key                          cxrsynth key
=============================================  ==========================================
``time_embed.{0,2}``                           ``unet.time_embedding.linear_{1,2}``
``class_embed.{0,2}``, ``null_cls_embed``      ``cond_embed.{0,2}``, ``null_embed``
``missing_class_param``                        ``missing_param``
``input_blocks.0.0``                           ``unet.conv_in``
``input_blocks.k.0`` (ResBlock)                ``unet.down_blocks.L.resnets.j``
``input_blocks.k.1`` (AttentionBlock)          ``unet.down_blocks.L.attentions.j``
``input_blocks.k.0.op`` (Downsample)           ``unet.down_blocks.L.downsamplers.0.conv``
``middle_block.{0,1,2}``                       ``unet.mid_block.{resnets.0,attentions.0,resnets.1}``
``output_blocks.k.{0,1,2}``                    ``unet.up_blocks.U.{resnets,attentions,upsamplers}``
``out.{0,2}``                                  ``unet.conv_norm_out``, ``unet.conv_out``
=============================================  ==========================================

ResBlock: ``in_layers.{0,2}`` -> ``norm1``/``conv1``, ``emb_layers.1`` -> ``time_emb_proj``,
``out_layers.{0,3}`` -> ``norm2``/``conv2``, ``skip_connection`` -> ``conv_shortcut``.
Attention: ``norm`` -> ``group_norm``; the fused 1-d conv ``qkv`` (3C, C, 1) is split
into ``to_q/to_k/to_v`` (C, C): the legacy order (``use_new_attention_order: false``,
the default) interleaves per head ``[q_h, k_h, v_h]``; the new order is ``[q, k, v]``.
``proj_out`` -> ``to_out.0``. ADM scales q and k by d^-1/4 each; diffusers scales the
product by d^-1/2: the same.

Not supported (a loud error): ``resblock_updown``, ``concat_channels``,
``scale_skip_connection``, unequal ``num_res_blocks`` per level, ``dims != 2``.

A checkpoint from another site is untrusted input: it is loaded with
``torch.load(weights_only=True)`` through :func:`cxrsynth.safeload.load_torch`, which
allows only tensors, plain data and the OmegaConf hyper-parameters of a Lightning
checkpoint (as inert stand-ins, :data:`cxrsynth.safeload.LIGHTNING`); a file that needs
anything else is refused, naming what it needed. Every fault of the file (empty, not a
checkpoint, no weights, missing weights, shapes of another layout) is one
:class:`MediffusionImportError` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cxrsynth.diffusion.model import ConditionalUNet, save_generator
from cxrsynth.diffusion.presets import GeneratorConfig
from cxrsynth.errors import CxrsynthError
from cxrsynth.safeload import check_finite

_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
_PREDICTIONS = {"VELOCITY": "v_prediction", "EPSILON": "epsilon", "START_X": "sample"}
#: Mediffusion's defaults (default_config/default.yaml of 0.7.1, same as 0.6.0's).
MEDIFFUSION_DEFAULTS: dict[str, Any] = {
    "diffusion": {
        "timesteps": 1000,
        "schedule_name": "cosine",
        "enforce_zero_terminal_snr": True,
        "mean_type": "VELOCITY",
        "var_type": "LEARNED_RANGE",
    },
    "model": {
        "input_size": 256, "dims": 2, "attention_resolutions": [8, 16, 32],
        "channel_mult": [1, 1, 2, 2, 4, 4], "dropout": 0.0, "in_channels": 1, "out_channels": 2,
        "model_channels": 128, "num_head_channels": -1, "num_heads": 4, "num_heads_upsample": -1,
        "num_res_blocks": [2, 2, 2, 2, 2, 2], "resblock_updown": False, "use_new_attention_order": False,
        "use_scale_shift_norm": True, "scale_skip_connection": False, "num_classes": 0,
        "concat_channels": 0, "guidance_drop_prob": 0.1, "missing_class_value": None,
    },
}


class MediffusionImportError(CxrsynthError):
    """A Mediffusion configuration or checkpoint this importer cannot map exactly."""


def config_from_mediffusion(raw: dict[str, Any], *, name: str = "mediffusion") -> GeneratorConfig:
    """Translate a Mediffusion YAML config (as a dict) to a :class:`GeneratorConfig`.

    Missing keys take Mediffusion's defaults, as ``DiffusionModule`` merges them.
    """
    if not isinstance(raw, dict):
        raise MediffusionImportError(f"the config must be a mapping with model: and diffusion: sections, "
                                     f"not a {type(raw).__name__}")
    for section in ("model", "diffusion"):
        if not isinstance(raw.get(section) or {}, dict):
            raise MediffusionImportError(f"the config's {section}: section must be a mapping, not {raw[section]!r}")
    model = {**MEDIFFUSION_DEFAULTS["model"], **(raw.get("model") or {})}
    diff = {**MEDIFFUSION_DEFAULTS["diffusion"], **(raw.get("diffusion") or {})}
    nrb = model["num_res_blocks"]
    nrb = [nrb] * len(model["channel_mult"]) if isinstance(nrb, int) else list(nrb)
    problems = []
    if model["dims"] != 2:
        problems.append("dims must be 2")
    if len(set(nrb)) != 1:
        problems.append(f"num_res_blocks must be equal per level, got {nrb}")
    if model["resblock_updown"]:
        problems.append("resblock_updown=true is not supported")
    if model["concat_channels"]:
        problems.append("concat_channels is not supported")
    if model["scale_skip_connection"]:
        problems.append("scale_skip_connection=true is not supported")
    if model["num_heads_upsample"] not in (-1, model["num_heads"]):
        problems.append("num_heads_upsample must equal num_heads")
    if model["num_classes"] <= 0:
        problems.append("num_classes must be > 0 (a conditional model)")
    if diff["schedule_name"] not in _SCHEDULES:
        problems.append(f"schedule {diff['schedule_name']!r} is not supported")
    if diff.get("timestep_respacing"):
        problems.append("timestep_respacing in training is not supported")
    if problems:
        raise MediffusionImportError("; ".join(problems))
    learned = diff["var_type"] in ("LEARNED_RANGE", "LEARNED")
    if diff["var_type"] == "LEARNED":
        raise MediffusionImportError("var_type LEARNED (not LEARNED_RANGE) is not supported")
    return GeneratorConfig(
        name=name,
        image_size=int(model["input_size"]),
        in_channels=int(model["in_channels"]),
        out_channels=int(model["out_channels"]),
        model_channels=int(model["model_channels"]),
        channel_mult=tuple(int(m) for m in model["channel_mult"]),
        num_res_blocks=int(nrb[0]),
        attention_ds=tuple(int(a) for a in model["attention_resolutions"]),
        num_heads=int(model["num_heads"]),
        num_head_channels=int(model["num_head_channels"]),
        norm_groups=32,  # ADM's normalization() is always GroupNorm32(32, C)
        dropout=float(model["dropout"]),
        scale_shift_norm=bool(model["use_scale_shift_norm"]),
        condition_size=int(model["num_classes"]),
        cond_drop_prob=float(model["guidance_drop_prob"]),
        num_train_timesteps=int(diff["timesteps"]),
        beta_schedule=_SCHEDULES[diff["schedule_name"]],
        zero_terminal_snr=bool(diff["enforce_zero_terminal_snr"]),
        prediction_type=_PREDICTIONS[diff["mean_type"]],
        vlb_weight=1.0 if learned else 0.0,
        missing_value=None if model["missing_class_value"] is None else float(model["missing_class_value"]),
    )


def _resblock(src: str, dst: str) -> dict[str, str]:
    pairs = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return {f"{src}.{a}": f"{dst}.{b}" for a, b in pairs.items()}


def key_map(config: GeneratorConfig) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Module-prefix map ADM -> cxrsynth, and the (ADM attention, cxrsynth attention) pairs."""
    m: dict[str, str] = {
        "time_embed.0": "unet.time_embedding.linear_1",
        "time_embed.2": "unet.time_embedding.linear_2",
        "class_embed.0": "cond_embed.0",
        "class_embed.2": "cond_embed.2",
        "input_blocks.0.0": "unet.conv_in",
        "out.0": "unet.conv_norm_out",
        "out.2": "unet.conv_out",
    }
    attn: list[tuple[str, str]] = []
    levels = len(config.channel_mult)
    k = 1
    for level, has_attn in enumerate(config.attention_levels):
        for j in range(config.num_res_blocks):
            m.update(_resblock(f"input_blocks.{k}.0", f"unet.down_blocks.{level}.resnets.{j}"))
            if has_attn:
                attn.append((f"input_blocks.{k}.1", f"unet.down_blocks.{level}.attentions.{j}"))
            k += 1
        if level != levels - 1:
            m[f"input_blocks.{k}.0.op"] = f"unet.down_blocks.{level}.downsamplers.0.conv"
            k += 1
    m.update(_resblock("middle_block.0", "unet.mid_block.resnets.0"))
    attn.append(("middle_block.1", "unet.mid_block.attentions.0"))
    m.update(_resblock("middle_block.2", "unet.mid_block.resnets.1"))
    k = 0
    for up, (level, has_attn) in enumerate(reversed(list(enumerate(config.attention_levels)))):
        for j in range(config.num_res_blocks + 1):
            m.update(_resblock(f"output_blocks.{k}.0", f"unet.up_blocks.{up}.resnets.{j}"))
            if has_attn:
                attn.append((f"output_blocks.{k}.1", f"unet.up_blocks.{up}.attentions.{j}"))
            if level and j == config.num_res_blocks:
                m[f"output_blocks.{k}.{2 if has_attn else 1}.conv"] = f"unet.up_blocks.{up}.upsamplers.0.conv"
            k += 1
    return m, attn


def convert_state_dict(
    adm: dict[str, torch.Tensor], config: GeneratorConfig, *, new_attention_order: bool = False
) -> dict[str, torch.Tensor]:
    """Map an ADM ``UNetModel`` state dict to a :class:`ConditionalUNet` state dict.

    Raises:
        MediffusionImportError: on any ADM key left unmapped, an attention weight the
            config needs that is missing, or one of another shape.
    """
    prefixes, attn = key_map(config)
    needed = [f"{src}.{p}" for src, _ in attn for p in ("qkv.weight", "qkv.bias", "norm.weight", "norm.bias",
                                                         "proj_out.weight", "proj_out.bias")]
    lacking = [k for k in needed if k not in adm]
    if lacking:
        raise MediffusionImportError(f"the checkpoint lacks {len(lacking)} weights this config needs, e.g. "
                                     f"{', '.join(lacking[:3])}: it is of another layout than the config")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in adm.items():
        if key == "null_cls_embed":
            out["null_embed"] = value
            used.add(key)
        elif key == "missing_class_param":
            out["missing_param"] = value
            used.add(key)
        else:
            module, _, leaf = key.rpartition(".")
            if module in prefixes:
                out[f"{prefixes[module]}.{leaf}"] = value
                used.add(key)
    heads_of = {}
    for src, dst in attn:
        w, b = adm[f"{src}.qkv.weight"], adm[f"{src}.qkv.bias"]
        c = w.shape[1] if w.ndim == 3 else -1
        heads = c // config.num_head_channels if config.num_head_channels > 0 else config.num_heads
        if w.ndim != 3 or w.shape[0] != 3 * c or w.shape[2] != 1 or b.shape != (3 * c,) or heads < 1 or c % heads:
            raise MediffusionImportError(f"the checkpoint does not fit the config: {src}.qkv is {tuple(w.shape)} "
                                         f"(bias {tuple(b.shape)}), not (3C, C, 1) for {heads} heads")
        w = w[..., 0]  # (3C, C); b: (3C,)
        d = c // heads
        if new_attention_order:  # [q | k | v], each (H*d)
            wq, wk, wv = w.chunk(3, 0)
            bq, bk, bv = b.chunk(3, 0)
        else:  # legacy: per head [q_h | k_h | v_h]
            w4 = w.reshape(heads, 3, d, c)  # (H, 3, d, C)
            b3 = b.reshape(heads, 3, d)  # (H, 3, d)
            wq, wk, wv = (w4[:, i].reshape(c, c) for i in range(3))
            bq, bk, bv = (b3[:, i].reshape(c) for i in range(3))
        out.update({
            f"{dst}.group_norm.weight": adm[f"{src}.norm.weight"],
            f"{dst}.group_norm.bias": adm[f"{src}.norm.bias"],
            f"{dst}.to_q.weight": wq, f"{dst}.to_q.bias": bq,
            f"{dst}.to_k.weight": wk, f"{dst}.to_k.bias": bk,
            f"{dst}.to_v.weight": wv, f"{dst}.to_v.bias": bv,
            f"{dst}.to_out.0.weight": adm[f"{src}.proj_out.weight"][..., 0],
            f"{dst}.to_out.0.bias": adm[f"{src}.proj_out.bias"],
        })
        heads_of[dst] = heads
        used.update(f"{src}.{p}" for p in ("qkv.weight", "qkv.bias", "norm.weight", "norm.bias",
                                           "proj_out.weight", "proj_out.bias"))
    left = sorted(set(adm) - used)
    if left:
        raise MediffusionImportError(f"{len(left)} checkpoint keys have no counterpart, e.g. {left[:5]}")
    return out


def extract_unet_state(checkpoint: dict[str, Any], *, ema: bool = True) -> dict[str, torch.Tensor]:
    """The ADM ``UNetModel`` weights of a Mediffusion/Lightning checkpoint.

    Prefers ``ema_state_dict`` (bkh_pytorch_utils' EMA callback) when ``ema``; strips
    the ``model.`` prefix of ``DiffusionModule`` and ``_orig_mod.`` of compiled models.
    A bare ``UNetModel`` state dict is accepted too.

    Raises:
        MediffusionImportError: the checkpoint is not a dict, or holds no weights.
    """
    if not isinstance(checkpoint, dict):
        raise MediffusionImportError(f"it holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict with "
                                     "state_dict) or a UNetModel state dict")
    if ema and "ema_state_dict" in checkpoint:
        sd = checkpoint["ema_state_dict"]
    elif "state_dict" in checkpoint:
        sd = checkpoint["state_dict"]
    else:
        sd = checkpoint
    if not isinstance(sd, dict):
        raise MediffusionImportError(f"its state dict is a {type(sd).__name__}, not a dict of tensors")
    out = {}
    for key, value in sd.items():
        if not torch.is_tensor(value):
            continue
        key = key.removeprefix("model.").removeprefix("_orig_mod.")
        out[key] = value
    if not out:
        raise MediffusionImportError("it has no state_dict or ema_state_dict and no weights "
                                     f"(keys: {', '.join(map(str, list(checkpoint)[:6]))})")
    return out


def import_mediffusion(
    checkpoint: Path | dict[str, Any],
    config: Path | dict[str, Any],
    out: Path | None = None,
    *,
    ema: bool = True,
) -> ConditionalUNet:
    """Convert a Mediffusion checkpoint + YAML config into a cxrsynth generator.

    Args:
        checkpoint: Path of the ``.ckpt``/``.pt`` (or the loaded dict).
        config: Path of Mediffusion's YAML config (or the loaded dict).
        out: If given, the generator is saved there (:func:`save_generator`).
        ema: Use the EMA weights when the checkpoint has them.

    Returns:
        The converted network (eval mode, fp32).

    Raises:
        MediffusionImportError: a fault of the config or the checkpoint, named, with its
            file. The checkpoint is loaded without running code in it (module docstring).
        NonFiniteWeights: the weights hold NaN or infinite values (nothing is written).
    """
    raw = config if isinstance(config, dict) else _load_config(config)
    try:
        gen_config = config_from_mediffusion(raw)  # type: ignore[arg-type]
    except MediffusionImportError as exc:
        raise MediffusionImportError(f"config{'' if isinstance(config, dict) else ' ' + str(config)}: {exc}") from None
    if not isinstance(checkpoint, dict):
        from cxrsynth.safeload import LIGHTNING, load_torch

        ckpt_path = Path(checkpoint)
        checkpoint = load_torch(ckpt_path, "Mediffusion checkpoint", allow=LIGHTNING)
    else:
        ckpt_path = None
    try:
        adm = extract_unet_state(checkpoint, ema=ema)
        check_finite(adm, f"{ckpt_path or 'the checkpoint'} ({'EMA ' if ema and 'ema_state_dict' in checkpoint else ''}"
                          "weights)")
        new_order = bool({**MEDIFFUSION_DEFAULTS["model"], **(raw.get("model") or {})}["use_new_attention_order"])
        state = convert_state_dict(adm, gen_config, new_attention_order=new_order)
        model = ConditionalUNet.build(gen_config)
        _check_fits(model, state)
    except MediffusionImportError as exc:
        raise MediffusionImportError(f"cannot import {ckpt_path or 'the checkpoint'}: {exc}") from None
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    if out is not None:
        save_generator(model, Path(out), data_version=None,
                       extra={"imported_from": str(ckpt_path) if ckpt_path else "mediffusion", "ema": ema})
    return model


def _load_config(path: Path | str) -> dict[str, Any]:
    """A Mediffusion YAML config as a plain dict; a clean error when it is missing or not YAML."""
    import yaml
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise MediffusionImportError(f"Mediffusion config not found: {path}")
    try:
        loaded = OmegaConf.load(str(path))
    except yaml.YAMLError as exc:
        raise MediffusionImportError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return OmegaConf.to_container(loaded, resolve=True)  # type: ignore[return-value]


def _check_fits(model: ConditionalUNet, state: dict[str, torch.Tensor]) -> None:
    """Every weight of ``model`` is in ``state`` with its shape, and nothing else is."""
    ours = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(ours[k].shape)) for k, v in state.items() if k in ours and v.shape != ours[k].shape]
    if wrong:
        key, got, want = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise MediffusionImportError(f"the checkpoint does not fit the config: {key} is {got} in the checkpoint, "
                                     f"{want} for the config{more}")
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise MediffusionImportError(f"the checkpoint does not fit the config: lacks {missing[:3]}, has extra {unexpected[:3]}")
