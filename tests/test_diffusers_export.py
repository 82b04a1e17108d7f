"""``generator export-diffusers``: a generator that plain diffusers loads and samples as cxrsynth does.

The sampling loop below uses diffusers, torch and safetensors only (what a partner without
cxrsynth has), as the README shows it; its images are compared with cxrsynth's sampler.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, micro_generator

from cxrsynth.errors import CxrsynthError


def diffusers_sample(folder, cond, seeds, *, steps, guidance, eta=0.0):
    """Classifier-free guided DDIM with diffusers alone (the README's loop)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    null = load_file(f"{folder}/unet/null_class_embedding.safetensors")["null_class_embedding"]
    b, c, size = len(seeds), unet.config.in_channels, unet.config.sample_size
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(c, size, size, generator=g) for g in gens])
    uncond = torch.arange(2 * b) >= b  # second half of the batch: the unconditional branch
    hook = unet.class_embedding.register_forward_hook(lambda m, i, out: torch.where(uncond[:, None], null, out))
    tokens = torch.zeros(2 * b, 0, unet.config.cross_attention_dim)  # no text: plain self-attention
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), t, tokens, class_labels=torch.cat([cond, cond])).sample[:, :c]
            cond_out, uncond_out = out.chunk(2)
            pred = uncond_out + guidance * (cond_out - uncond_out)
            noise = torch.stack([torch.randn(c, size, size, generator=g) for g in gens]) if eta > 0 else None
            x = scheduler.step(pred, t, x, eta=eta, variance_noise=noise).prev_sample
    hook.remove()
    return x


@pytest.mark.slow
def test_diffusers_samples_the_same_images(tmp_path):
    from diffusers import DDPMScheduler, DiffusionPipeline

    from cxrsynth.diffusion.model import load_generator
    from cxrsynth.diffusion.sample import sample_batch, to_uint8

    gen = micro_generator(tmp_path / "gen", seed=3)
    cli(None, "generator", "export-diffusers", str(gen), str(tmp_path / "hf"))
    model = load_generator(gen)
    cond = torch.rand(3, 22, generator=torch.Generator().manual_seed(1)).round()
    seeds = [11, 12, 13]
    ours = sample_batch(model, cond, seeds, steps=4, guidance=2.5)
    theirs = diffusers_sample(tmp_path / "hf", cond, seeds, steps=4, guidance=2.5)
    diff = (ours - theirs).abs().max().item()
    assert ours.std() > 0.1 and diff < 1e-5, diff
    assert torch.equal(to_uint8(ours), to_uint8(theirs))
    # Mediffusion's sampler settings: leading spacing, stochastic DDIM (eta 1) with each image's generator.
    cli(None, "generator", "export-diffusers", str(gen), str(tmp_path / "hf_leading"), "--timestep-spacing", "leading")
    ours = sample_batch(model, cond, seeds, steps=4, guidance=2.5, eta=1.0, timestep_spacing="leading")
    theirs = diffusers_sample(tmp_path / "hf_leading", cond, seeds, steps=4, guidance=2.5, eta=1.0)
    assert (ours - theirs).abs().max().item() < 1e-5
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/null_class_embedding.safetensors"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf_leading" / name).read_bytes(), name
    # The scheduler config loads in any diffusers scheduler class, the folder as a pipeline.
    assert DDPMScheduler.from_pretrained(tmp_path / "hf", subfolder="scheduler").config.prediction_type == "v_prediction"
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "hf")
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    info = json.loads((tmp_path / "hf" / "cxrsynth_export.json").read_text())
    assert len(info["conditioning"]) == 22 and info["unet"]["class"] == "UNet2DConditionModel"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: diffusers" in card and "## Use with diffusers" in card


def test_paper_layout_as_mediffusion_imports_it(tmp_path):
    """ADM's layout (4 heads whatever the width, attention in the middle block), narrow: what
    ``import-mediffusion`` writes; both guidance branches equal cxrsynth's network."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from cxrsynth.diffusion.export import export_diffusers
    from cxrsynth.diffusion.mediffusion import config_from_mediffusion
    from cxrsynth.diffusion.model import ConditionalUNet, save_generator

    config = config_from_mediffusion({"model": {"input_size": 32, "num_classes": 22, "model_channels": 32,
                                                "num_res_blocks": 1}})
    assert config.num_heads == 4 and config.attention_ds == (8, 16, 32)
    torch.manual_seed(0)
    model = ConditionalUNet.build(config).eval()
    with torch.no_grad():  # every weight random (diffusers zero-initialises none, but be sure)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    save_generator(model, tmp_path / "gen")
    export_diffusers(tmp_path / "gen", tmp_path / "hf", timestep_spacing="leading")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "hf", subfolder="unet").eval()
    null = load_file(tmp_path / "hf" / "unet" / "null_class_embedding.safetensors")["null_class_embedding"]
    x, t, c = torch.randn(2, 1, 32, 32), torch.tensor([5, 900]), torch.rand(2, 22)
    tokens = torch.zeros(2, 0, unet.config.cross_attention_dim)
    with torch.no_grad():
        ours, ours_null = model(x, t, c), model(x, t, None)
        theirs = unet(x, t, tokens, class_labels=c).sample
        hook = unet.class_embedding.register_forward_hook(lambda m, i, out: null.expand_as(out))
        theirs_null = unet(x, t, tokens, class_labels=c).sample
        hook.remove()
    assert ours.abs().max() > 0.1 and not torch.allclose(ours, ours_null)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours_null - theirs_null).abs().max().item() < 1e-5
    scheduler = json.loads((tmp_path / "hf" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "leading" and scheduler["rescale_betas_zero_snr"] is True


def test_what_diffusers_cannot_express_is_refused(tmp_path):
    from cxrsynth.diffusion.export import head_dims, unet_config
    from cxrsynth.diffusion.presets import get_preset

    with pytest.raises(CxrsynthError, match="missing_value"):
        unet_config(get_preset("micro", missing_value=-1.0))
    # attention at the first and last level, 2 heads each: widths 4 and 8 share a position
    with pytest.raises(CxrsynthError, match=r"down level 0, up level 2 .*\[4, 8\]"):
        head_dims(get_preset("micro", attention_ds=(1, 4)))
    gen = micro_generator(tmp_path / "gen")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x").write_text("")
    out = cli(None, "generator", "export-diffusers", str(gen), str(tmp_path / "hf"), code=2)
    assert "not empty" in out
