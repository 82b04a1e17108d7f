"""The conditional generator on CPU with the ``micro`` preset (32 px, 2-5 steps)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from cxrsynth.diffusion.model import ConditionalUNet, generator_info, load_generator, save_generator
from cxrsynth.diffusion.presets import get_preset, list_presets
from cxrsynth.diffusion.sample import MEDIFFUSION_COMPAT, combine_guidance, guided_output, sample, sample_batch
from cxrsynth.diffusion.schedule import get_sampler, list_samplers
from cxrsynth.diffusion.train import TrainConfig, train
from cxrsynth.evaluate.frechet import FeatureStats, frechet_distance
from cxrsynth.labels import CONDITION_SIZE

MICRO = get_preset("micro")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a loaded 2-core machine
    OpenMP spin-waiting makes 2-thread convolutions ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0) -> ConditionalUNet:
    """A micro network with all weights random (zero-initialised layers too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the same network whatever ran before (the global RNG inits it)
        torch.manual_seed(seed)
        model = ConditionalUNet.build(MICRO)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _data(n: int = 12, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(n, 1, 32, 32, generator=g) * 255).to(torch.uint8)
    conds = (torch.rand(n, CONDITION_SIZE, generator=g) > 0.5).float()
    keys = [f"img{i:02d}" for i in range(n)]
    return lambda epoch: [{"image": images[i : i + batch], "cond": conds[i : i + batch], "key": keys[i : i + batch]}
                          for i in range(0, n, batch)]


def test_presets_registered_and_paper_layout() -> None:
    assert {"paper", "tiny", "micro"} <= set(list_presets())
    paper = get_preset("paper")
    assert paper.channel_mult == (1, 1, 2, 2, 4, 4) and paper.attention_levels == (False, False, False, True, True, True)
    assert paper.prediction_type == "v_prediction" and paper.zero_terminal_snr and paper.out_channels == 2
    with pytest.raises(KeyError) as err:
        get_preset("nope")
    assert str(err.value) == f"unknown generator preset 'nope'; known: {', '.join(sorted(list_presets()))}"  # no stray quotes


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_a_network_on_meta_tensors(name: str) -> None:
    config = get_preset(name)
    assert config.name == name
    with torch.device("meta"):  # shapes only: the paper's 125M-parameter network costs nothing here
        model = ConditionalUNet.build(config)
        out = model(torch.zeros(1, config.in_channels, config.image_size, config.image_size),
                    torch.zeros(1, dtype=torch.long), torch.zeros(1, CONDITION_SIZE))
    assert tuple(out.shape) == (1, config.out_channels, config.image_size, config.image_size)


def _sampling_cases() -> list[dict]:
    """Every registered sampler (a stochastic one with eta 0 and 1), and Mediffusion's settings."""
    cases: list[dict] = []
    for name in list_samplers():
        if get_sampler(name).stochastic:
            cases += [{"sampler": name, "eta": 0.0, "guidance": 3.0}, {"sampler": name, "eta": 1.0, "guidance": 1.0}]
        else:
            cases.append({"sampler": name, "guidance": 2.0})
    return [*cases, {**MEDIFFUSION_COMPAT, "guidance": 4.0}]


def test_sampling_cases_cover_the_registry() -> None:
    assert {c["sampler"] for c in _sampling_cases()} == set(list_samplers()) >= {"ddim", "ddim-unclipped", "dpmpp"}


def test_forward_shapes_and_null_embedding() -> None:
    model = _model()
    x, t, c = torch.randn(3, 1, 32, 32), torch.tensor([0, 500, 999]), torch.rand(3, CONDITION_SIZE)
    with torch.no_grad():
        out = model(x, t, c)
        dropped = model(x, t, c, torch.ones(3, dtype=torch.bool))
        uncond = model(x, t, None)
    assert out.shape == (3, 2, 32, 32)
    torch.testing.assert_close(dropped, uncond)  # drop == learned null embedding
    assert not torch.allclose(out, uncond)


def test_cfg_formulas() -> None:
    cond, uncond = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(combine_guidance(cond, uncond, 3.0, "standard"), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(combine_guidance(cond, uncond, 1.0, "standard"), cond)
    g = cond + 4.0 * (cond - uncond)
    std = lambda a: a.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    expected = 0.7 * g * std(cond) / std(g) + 0.3 * g
    torch.testing.assert_close(combine_guidance(cond, uncond, 4.0, "mediffusion"), expected)
    # The guided output of one batched forward equals separate cond / uncond passes.
    model = _model()
    x, t, c = torch.randn(2, 1, 32, 32), torch.tensor(300), torch.rand(2, CONDITION_SIZE)
    with torch.no_grad():
        both = guided_output(model, x, t, c, 2.5)
        ref = combine_guidance(model(x, t.expand(2), c), model(x, t.expand(2), None), 2.5)
    torch.testing.assert_close(both, ref, atol=1e-5, rtol=1e-5)


def assert_same_images(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same seeds and trajectories; CPU kernels may round differently at another batch
    size, so pixels agree to within one grey level on a small fraction of pixels."""
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("kwargs", _sampling_cases())
def test_sampling_is_seeded_per_image(kwargs: dict) -> None:
    model, cond, seeds = _model(), torch.rand(3, CONDITION_SIZE), [11, 12, 13]
    one = sample(model, cond, seeds, steps=3, batch_size=1, **kwargs)
    three = sample(model, cond, seeds, steps=3, batch_size=3, **kwargs)
    assert one.shape == (3, 1, 32, 32) and one.dtype == torch.uint8
    assert_same_images(one, three)  # batch-size invariant
    assert torch.equal(sample(model, cond, seeds, steps=3, batch_size=3, **kwargs), three)  # deterministic
    assert_same_images(sample(model, cond[1:2], [12], steps=3, **kwargs), one[1:2])  # image alone
    other = sample(model, cond, [21, 12, 13], steps=3, batch_size=3, **kwargs)
    assert torch.equal(other[1:], three[1:])  # a neighbour's seed changes nothing (same batch shape)
    a = sample_batch(model, cond[:1], [11], steps=3, **kwargs)
    b = sample_batch(model, cond[:1], [21], steps=3, **kwargs)
    assert not torch.equal(a, b)  # another seed, another image (before quantisation)


def test_sample_rejects_mismatched_seeds() -> None:
    with pytest.raises(ValueError, match="one seed per condition"):
        sample(_model(), torch.rand(2, CONDITION_SIZE), [1], steps=2)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _model()
    save_generator(model, tmp_path / "g", data_version="demo@abc")
    loaded = load_generator(tmp_path / "g")
    assert loaded.gen_config == MICRO
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    meta = generator_info(tmp_path / "g")
    assert meta["preset"] == "micro" and meta["data_version"] == "demo@abc" and len(meta["conditioning"]) == 22
    c = torch.rand(2, CONDITION_SIZE)
    assert torch.equal(sample(model, c, [1, 2], steps=2), sample(loaded, c, [1, 2], steps=2))
    from cxrsynth import cards

    front, body = cards.read(tmp_path / "g")  # the model card: data, settings, use, memorisation, limits
    assert front["datasets"] == ["demo@abc"] and front["cxrsynth"]["preset"] == "micro"
    assert [line[3:] for line in body.splitlines() if line.startswith("## ")] == \
        ["Model", "Training data", "Intended use", "Memorisation", "Limits"]
    assert "cxrsynth share audit" in body and "22 values" in body


def test_training_runs_and_resume_is_bit_identical(tmp_path: Path) -> None:
    tc = TrainConfig(steps=6, batch_size=4, save_every=3, log_every=1, warmup_steps=2, lr=1e-3)
    losses: list[float] = []
    straight = train(MICRO, tc, _data(), tmp_path / "a", progress=False, on_step=lambda s, v: losses.append(v))
    assert len(losses) == 6 and all(np.isfinite(losses))
    # Half the steps, then raise `steps` and resume to the end (3 batches per epoch, so it
    # crosses an epoch), with the checkpoints outside the output directory.
    ck = tmp_path / "ck-b"
    train(MICRO, dataclasses.replace(tc, steps=3), _data(), tmp_path / "b", checkpoints=ck, progress=False)
    assert (ck / "latest.pt").is_file() and not (tmp_path / "b/checkpoints").exists()
    resumed = train(MICRO, tc, _data(), tmp_path / "b", checkpoints=ck, resume=True, progress=False)
    assert not (tmp_path / "b/checkpoints").exists()
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"EMA {k} differs after resume"
    ca = torch.load(tmp_path / "a/checkpoints/latest.pt", weights_only=False)
    cb = torch.load(ck / "latest.pt", weights_only=False)
    assert ca["step"] == cb["step"] == 6
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert torch.equal(ca["rng"][0]["gen"], cb["rng"][0]["gen"])
    # generator.json too: data_seen is checkpointed, so it covers the whole resumed run.
    assert generator_info(tmp_path / "a") == generator_info(tmp_path / "b")
    assert generator_info(tmp_path / "a")["trained_steps"] == 6
    assert generator_info(tmp_path / "a")["data_seen"] == {
        "images_per_rank": [24], "distinct_keys_per_rank": [12], "distinct_keys": 12}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 2e-3}, "lr 0.001 -> 0.002"),
        ({"batch_size": 2}, "batch_size 4 -> 2"),
        ({"seed": 7}, "seed 0 -> 7"),
        ({"data_version": "demo@v2"}, "data_version 'demo@v1' -> 'demo@v2'"),
    ],
    ids=["lr", "batch_size", "seed", "data_version"],
)
def test_resume_refuses_another_run(tmp_path: Path, change: dict, message: str) -> None:
    tc = TrainConfig(steps=1, batch_size=4, save_every=1, warmup_steps=1, lr=1e-3)
    ck = tmp_path / "ck"
    train(MICRO, tc, _data(), tmp_path / "g", checkpoints=ck, data_version="demo@v1", progress=False)
    change = dict(change)
    data_version = change.pop("data_version", "demo@v1")
    other = dataclasses.replace(tc, steps=2, **change)
    with pytest.raises(ValueError, match="another run") as err:
        train(MICRO, other, _data(), tmp_path / "g", checkpoints=ck, resume=True, data_version=data_version,
              progress=False)
    assert message in str(err.value) and "--checkpoints" in str(err.value) and "--no-resume" in str(err.value)
    assert torch.load(ck / "latest.pt", weights_only=False)["step"] == 1  # left as it was


def test_resume_checks_and_no_resume_replaces(tmp_path: Path) -> None:
    tc = TrainConfig(steps=2, batch_size=4, save_every=1, warmup_steps=1, lr=1e-3, keep_checkpoints=2)
    ck = tmp_path / "ck"
    train(MICRO, tc, _data(), tmp_path / "g", checkpoints=ck, progress=False)
    assert sorted(p.name for p in ck.glob("step-*.pt")) == ["step-00000001.pt", "step-00000002.pt"]
    # Another generator config is refused, whatever the checkpoint's age.
    with pytest.raises(ValueError, match="another generator config"):
        train(MICRO.replace(vlb_weight=0.0), tc, _data(), tmp_path / "g", checkpoints=ck, resume=True, progress=False)
    # A checkpoint from before the run fingerprint is checked on the generator config only.
    state = torch.load(ck / "latest.pt", weights_only=False)
    del state["run"]
    torch.save(state, ck / "latest.pt")
    train(MICRO, dataclasses.replace(tc, steps=3, lr=2e-3), _data(), tmp_path / "g", checkpoints=ck, resume=True,
          progress=False)
    assert torch.load(ck / "latest.pt", weights_only=False)["step"] == 3
    # --no-resume starts over in the same directory; the old run's later step files go.
    train(MICRO, dataclasses.replace(tc, steps=1), _data(), tmp_path / "g", checkpoints=ck, resume=False,
          progress=False)
    assert sorted(p.name for p in ck.glob("step-*.pt")) == ["step-00000001.pt"]
    assert torch.load(ck / "latest.pt", weights_only=False)["run"]["lr"] == 1e-3


def test_training_reduces_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    data = _data(n=4, batch=4)
    tc = TrainConfig(steps=30, batch_size=4, save_every=1000, log_every=10, warmup_steps=1, lr=3e-3, seed=3)
    losses: list[float] = []
    train(MICRO.replace(vlb_weight=0.0), tc, data, tmp_path / "c", progress=False, on_step=lambda s, v: losses.append(v))
    assert losses[-1] < losses[0]


def test_cli_train_checkpoints_outside_out(tmp_path: Path) -> None:
    from conftest import chexpert_rows, write_chexpert

    from cxrsynth.cli import app

    csv = write_chexpert(tmp_path / "raw", chexpert_rows(n_patients=4, studies=2, uncertain=False))
    root, gen, ck = tmp_path / "proj", tmp_path / "gen", tmp_path / "ck"
    runner = CliRunner()

    def cli(*args, ok: bool = True) -> str:
        result = runner.invoke(app, [str(a) for a in args] + ["--root", str(root)], catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    cli("ingest", "chexpert", csv, "--name", "cxp", "--size", 32, "--workers", 1)
    cli("split", "cxp", "--tune", 0.2, "--seed", 0)
    train_args = ("generator", "train", "--data", "cxp", "--preset", "micro", "--batch", 2, "--warmup", 1,
                  "--save-every", 1, "--device", "cpu", "--out", gen, "--checkpoints", ck)
    out = cli(*train_args, "--steps", 1)
    first = generator_info(gen)["run_id"]
    assert f"{ck / first} (new run)" in " ".join(out.split())
    assert (ck / first / "latest.pt").is_file() and not (gen / "checkpoints").exists()
    # Another learning rate is another run: a directory of its own, the first one untouched.
    before = (ck / first / "latest.pt").read_bytes()
    out = cli(*train_args, "--steps", 2, "--lr", 3e-4)
    second = generator_info(gen)["run_id"]
    assert second != first and f"other runs there: {first}" in " ".join(out.split())
    assert torch.load(ck / second / "latest.pt", weights_only=False)["step"] == 2
    assert (ck / first / "latest.pt").read_bytes() == before
    out = cli(*train_args, "--steps", 2)  # the first run, more steps: continues from step 1
    assert f"{ck / first} (resuming)" in " ".join(out.split())
    assert generator_info(gen)["trained_steps"] == 2 and generator_info(gen)["run_id"] == first
    assert torch.load(ck / first / "latest.pt", weights_only=False)["step"] == 2


def test_frechet_distance_closed_form() -> None:
    # Diagonal Gaussians: FD = |mu1-mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    a = FeatureStats(np.array([0.0, 1.0, 2.0]), np.diag([1.0, 4.0, 9.0]), 100)
    b = FeatureStats(np.array([1.0, 1.0, 0.0]), np.diag([4.0, 1.0, 1.0]), 100)
    expected = (1 + 0 + 4) + (1 + 4 - 4) + (4 + 1 - 4) + (9 + 1 - 6)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-8)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8))
    s = FeatureStats.from_features(f)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-6)


def test_cli_info_and_bench(tmp_path: Path) -> None:
    from cxrsynth.cli.bench import bench_generate
    from cxrsynth.cli.generator import generator_app

    app = typer.Typer()
    app.add_typer(generator_app, name="generator")
    app.command("bench-generate")(bench_generate)
    save_generator(_model(), tmp_path / "g", data_version="demo@abc")
    runner = CliRunner()
    result = runner.invoke(app, ["generator", "info", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert "micro" in result.output and "demo@abc" in result.output
    result = runner.invoke(app, ["bench-generate", "--preset", "micro", "--batch", "2", "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert '"images_per_s"' in result.output
    result = runner.invoke(app, ["generator", "info", str(tmp_path)])
    assert result.exit_code != 0


@pytest.mark.slow
def test_dpm_solver_converges_to_the_same_ode_solution_as_ddim() -> None:
    # Both solve the probability-flow ODE from the same x_T (DDIM eta = 0 without its x0
    # clipping): many steps agree, and DPM-Solver++ (2nd order) is closer at few steps.
    model = _model()
    cond, seeds = torch.rand(4, CONDITION_SIZE, generator=torch.Generator().manual_seed(0)), [1, 2, 3, 4]
    x = {(s, n): sample_batch(model, cond, seeds, sampler=s, steps=n)
         for s in ("ddim-unclipped", "dpmpp") for n in (10, 25, 100)}
    ref = x["dpmpp", 100]

    def grey_rmse(a: torch.Tensor) -> float:  # in grey levels of the 8-bit images
        return float((a - ref).pow(2).mean().sqrt() * 127.5)

    assert grey_rmse(x["ddim-unclipped", 100]) < 3  # one ODE, two solvers (measured 1.5)
    assert grey_rmse(x["dpmpp", 25]) < 1  # measured 0.59
    assert grey_rmse(x["dpmpp", 10]) < grey_rmse(x["ddim-unclipped", 10]) / 2  # 3.5 vs 14.9
    assert grey_rmse(x["dpmpp", 25]) < grey_rmse(x["dpmpp", 10]) < grey_rmse(x["ddim-unclipped", 25]) * 2


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_noise_variance_fits_and_is_diffusers_own_wherever_it_did(spacing: str) -> None:
    """At t = T of the zero-SNR schedule diffusers' eta = 1 step took the square root of -6e-8 (every image NaN)."""
    from diffusers import DDIMScheduler

    from cxrsynth.diffusion.schedule import FittedDDIM, get_sampler

    for steps in (2, 3, 50, 200):
        ours = get_sampler("ddim").build(MICRO, spacing)
        assert isinstance(ours, FittedDDIM)
        ours.set_timesteps(steps)
        for t in ours.timesteps.tolist():
            prev = t - ours.config.num_train_timesteps // steps
            alpha_prev = ours.alphas_cumprod[prev] if prev >= 0 else ours.final_alpha_cumprod
            plain, fitted = DDIMScheduler._get_variance(ours, t, prev), ours._get_variance(t, prev)
            assert 1 - alpha_prev - (fitted ** 0.5) ** 2 >= 0
            if 1 - alpha_prev - (plain ** 0.5) ** 2 >= 0:
                assert torch.equal(fitted, plain)  # unchanged where it fitted: the same images
            else:
                assert 0 < plain - fitted < 1e-6
