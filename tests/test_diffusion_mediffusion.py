"""Mediffusion import: equal outputs to the real ``mediffusion`` package (optional).

Skipped when ``mediffusion`` is not importable; CI installs it with
``pip install -r requirements-mediffusion.txt`` (see that file).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if os.environ.get("CXRSYNTH_REQUIRE_MEDIFFUSION"):  # CI: a missing package is a failure, not a skip
    unet_mod = importlib.import_module("mediffusion.models.unet")
else:
    unet_mod = pytest.importorskip(
        "mediffusion.models.unet", reason="mediffusion not installed (make install-mediffusion)"
    )

from cxrsynth.diffusion.mediffusion import MEDIFFUSION_DEFAULTS, import_mediffusion  # noqa: E402


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the paper's layout (6 levels, attention at ds 8/16/32, 4 heads), narrow
        {"use_new_attention_order": True, "num_head_channels": 16, "missing_class_value": -1.0},
    ],
)
def test_outputs_match_mediffusion(overrides: dict, tmp_path) -> None:
    torch.set_num_threads(1)
    raw = {"model": {"input_size": 64, "num_classes": 22, "model_channels": 32, **overrides}}
    torch.manual_seed(0)
    adm = unet_mod.UNetModel(**{**MEDIFFUSION_DEFAULTS["model"], **raw["model"]}).eval()
    with torch.no_grad():  # randomise every weight, zero-initialised output convs included
        for p in adm.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in adm.state_dict().items()}}
    torch.save(ckpt, tmp_path / "m.ckpt")
    ours = import_mediffusion(tmp_path / "m.ckpt", raw, tmp_path / "gen")
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([3, 870])
    c = torch.randint(0, 2, (2, 22)).float()
    c[0, 0] = -1.0  # exercises missing_class_value when set
    with torch.no_grad():
        ref = adm(x, t, cls=c, drop_cls_prob=0.0)
        got = ours(x, t, c)
        ref_null = adm(x, t, cls=c, drop_cls_prob=1.0)
        got_null = ours(x, t, None)
    assert ref.abs().max() > 0.1  # a non-trivial output
    assert (ref - got).abs().max().item() < 1e-4
    assert (ref_null - got_null).abs().max().item() < 1e-4
