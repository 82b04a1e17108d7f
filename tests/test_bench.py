"""The generator's speed tooling: roofline counts, the benchmark, compile readiness."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cxrsynth.cli.common import CleanErrors
from cxrsynth.diffusion.model import ConditionalUNet
from cxrsynth.diffusion.presets import get_preset
from cxrsynth.bench.roofline import roofline, summarize, trace


def test_roofline_counts_a_hand_computed_block() -> None:
    # conv -> group norm -> SiLU -> conv, bf16, on meta tensors: every byte by hand.
    B, C, S = 4, 8, 16
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), nn.GroupNorm(2, C), nn.SiLU(),
                            nn.Conv2d(C, C, 3, padding=1, bias=False)).to(torch.bfloat16)
    x = torch.empty(B, C, S, S, device="meta", dtype=torch.bfloat16)
    costs, y = trace(net, x)
    r = summarize(costs, [y], B, peak_tflops=1.0, bandwidth_tbs=1.0)

    act = B * C * S * S * 2  # one activation tensor, bytes
    w = C * C * 9 * 2  # one conv weight
    conv_flops = 2 * B * C * S * S * C * 9
    assert r.categories["convolution"].ops == 2
    assert r.categories["convolution"].gflop == pytest.approx(2 * conv_flops / B / 1e9)
    assert r.categories["convolution"].mbytes == pytest.approx(2 * (2 * act + w) / B / 1e6)
    # Group norm reads x plus its weight and bias, writes y plus mean and rstd (B x groups).
    norm = r.categories["normalization"]
    assert norm.ops == 1 and norm.gflop == 0
    assert norm.mbytes * 1e6 * B == pytest.approx(2 * act, rel=0.01)  # plus a few hundred bytes of params/stats
    silu = r.categories["elementwise"]
    assert silu.ops == 1 and silu.mbytes * 1e6 * B == pytest.approx(2 * act)
    # Fused: norm + SiLU is one group: read x twice (statistics, then apply), write once.
    assert r.fused_kernels == 1
    gemm_s = 2 * max(conv_flops / 1e12, (2 * act + w) / 1e12)
    fused_s = gemm_s + 3 * act / 1e12
    assert r.fused_ms * B / 1e3 == pytest.approx(fused_s, rel=0.01)
    assert r.eager_ms > r.fused_ms > r.gemm_ms > 0
    assert r.epilogue_ms == r.fused_ms  # conv 1 feeds a norm, conv 2 is the output: no epilogue


def test_roofline_of_the_paper_preset_matches_design_and_an_independent_count() -> None:
    r = roofline("paper", 8)
    assert r.gflop == pytest.approx(505, rel=0.01)  # DESIGN.md: 505 GFLOP per forward at 256 px
    assert r.categories["attention"].ops == 16  # 2 x 3 down levels + 3 x 3 up levels + mid
    assert r.compute_floor_ms < r.gemm_ms <= r.fused_ms < r.eager_ms
    assert 0 < r.mfu_ceiling() < r.mfu_ceiling(fused=True) < 1

    # Independent count on a real CPU forward of the tiny preset: FlopCounterMode sees the
    # same convolutions and matmuls (CPU SDPA is outside its registry, so attention apart).
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = ConditionalUNet.build(cfg).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(2, 1, cfg.image_size, cfg.image_size), torch.tensor([3, 5]), torch.zeros(2, 22))
    tiny = roofline("tiny", 2, dtype="fp32")
    attention = tiny.categories.get("attention")
    expected = counter.get_total_flops() / 2 / 1e9
    assert tiny.gflop - (attention.gflop if attention else 0.0) == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_network_and_guided_step_compile_as_one_graph() -> None:
    # fullgraph=True raises on any graph break: what CUDA graphs and max-autotune need.
    from cxrsynth.diffusion.sample import guided_output

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = ConditionalUNet.build(cfg).eval()
    x = torch.randn(2, 1, cfg.image_size, cfg.image_size)
    cond = torch.rand(2, 22)
    t = torch.tensor(400)
    step = torch.compile(lambda x, t, c: guided_output(model, x, t, c, 3.0), backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(step(x, t, cond), guided_output(model, x, t, cond, 3.0))


def test_bench_generate_reports_and_profiles_on_cpu() -> None:
    from cxrsynth.cli.bench import bench_generate, bench_roofline

    import typer

    app = typer.Typer(cls=CleanErrors)  # the app's group class: library errors become one line and exit code 2
    app.command("generate")(bench_generate)
    app.command("roofline")(bench_roofline)
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--preset", "micro", "--batch", "2", "--steps", "2",
                                 "--guidance", "3", "--profile", "3", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["images_per_s"] > 0 and r["device"] == "cpu" and r["compile_mode"] is None
    assert r["gflop_per_forward_per_image"] == pytest.approx(roofline("micro", 4).gflop)
    assert 0 < r["roofline_mfu_eager"] < r["roofline_mfu_fused"] < 1
    assert len(r["top_kernels"]) == 3 and all(0 < k["share"] <= 1 for k in r["top_kernels"])
    assert any("conv" in k["name"] for k in r["top_kernels"])

    result = runner.invoke(app, ["roofline", "--preset", "paper", "--batch", "4", "--steps", "200,25"])
    assert result.exit_code == 0, result.output
    assert "MFU ceiling" in result.output and "25 steps" in result.output
    result = runner.invoke(app, ["roofline", "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output
    result = runner.invoke(app, ["generate", "--preset", "micro", "--compile", "--compile-mode", "fast"])
    assert result.exit_code == 2 and "compile mode" in result.output


@pytest.mark.slow
def test_bench_imports_only_what_the_gpu_image_has() -> None:
    # The device machine's image has torch, timm, typer, rich, pandas, pyarrow... but not
    # webdataset or duckdb; `make device-kit` carries diffusers. Keep the bench path clear.
    code = ("import sys, cxrsynth.cli, cxrsynth.bench.generator, cxrsynth.bench.roofline; "
            "print([m for m in ('webdataset', 'duckdb', 'dvc', 'pydicom') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_bf16_cast_network_samples_like_fp32() -> None:
    # The `bf16-weights` fast path: the whole network in bf16, no autocast; the sampler's
    # arithmetic stays fp32, so images differ from fp32 only by bf16 rounding.
    from cxrsynth.diffusion.sample import sample_batch

    cfg = get_preset("micro")
    torch.manual_seed(0)
    model = ConditionalUNet.build(cfg).eval()
    cond = torch.rand(3, 22)
    ref = sample_batch(model, cond, [1, 2, 3], sampler="dpmpp", steps=3)
    torch.nn.Module.to(model, torch.bfloat16)
    low = sample_batch(model, cond, [1, 2, 3], sampler="dpmpp", steps=3)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert 0 < (low - ref).norm() / ref.norm() < 2e-2


def test_bench_train_times_the_real_loop() -> None:
    import typer

    from cxrsynth.cli.bench import bench_train

    app = typer.Typer(cls=CleanErrors)  # the app's group class: library errors become one line and exit code 2
    app.command("train")(bench_train)
    app.command("unused")(lambda: None)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--preset", "micro", "--batch", "4", "--steps", "3", "--warmup", "2",
                                 "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["steps"] == 4  # rounded up to whole readout intervals
    assert r["gflop_per_image"] == pytest.approx(3 * roofline("micro", 4).gflop)
    assert r["images_per_s"] == pytest.approx(4 * 4 / r["seconds"]) and r["seconds"] > 0
    result = runner.invoke(app, ["train", "--preset", "micro", "--steps", "0"])
    assert result.exit_code == 2 and "must be >= 1" in result.output


def test_fused_roofline_writes_the_residual_stream_around_a_gemm() -> None:
    # x0 = silu(x); y = x0 + conv(silu(x0)): x0 skips the convolution, so no kernel can
    # hold it from before the conv to the add after it: it is written, then read again.
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x0 = torch.nn.functional.silu(x)
            return x0 + self.conv(torch.nn.functional.silu(x0))

    with torch.device("meta"):
        block = Block().to(torch.bfloat16)
    x = torch.empty(2, 4, 8, 8, device="meta", dtype=torch.bfloat16)
    costs, y = trace(block, x)
    r = summarize(costs, [y], 2, peak_tflops=1.0, bandwidth_tbs=1.0)
    act = 2 * 4 * 8 * 8 * 2
    assert r.fused_kernels == 2
    # group 1 (silu, silu): reads x, writes silu(x0) for the conv and x0 for the add;
    # group 2 (add): reads x0 and the conv output, writes y.
    assert (r.fused_ms - r.gemm_ms) * 2 / 1e3 == pytest.approx(6 * act / 1e12)
    # The add is the conv's only reader: in its epilogue the conv output is never stored.
    assert (r.fused_ms - r.epilogue_ms) * 2 / 1e3 == pytest.approx(2 * act / 1e12)


def test_bench_solvers_measures_few_step_error_against_a_reference(tmp_path) -> None:
    import typer
    from conftest import chexpert_rows, ingest_site, micro_generator

    from cxrsynth import labels
    from cxrsynth.cli.bench import bench_solvers

    rows = chexpert_rows(n_patients=4, studies=1)
    for row in rows:  # no uncertain labels: every row is a condition
        for f in labels.FINDINGS:
            row[f] = row[f].replace("-1.0", "1.0")
    root = ingest_site(tmp_path, rows, images=False, labels_only=True, split={"tune": 0.0, "seed": 0})
    gen = micro_generator(tmp_path / "gen")

    app = typer.Typer(cls=CleanErrors)  # the app's group class: library errors become one line and exit code 2
    app.command("solvers")(bench_solvers)
    app.command("unused")(lambda: None)
    runner = CliRunner()
    args = ["solvers", "--generator", str(gen), "--conditions", "cxp", "--n", "3", "--root", str(root),
            "--threads", "1"]
    result = runner.invoke(app, [*args, "--runs", "dpmpp:8,ddim-unclipped:8", "--reference", "dpmpp:40", "--json"])
    assert result.exit_code == 0, result.output
    ref, dpmpp, ddim = json.loads(result.output.strip().splitlines()[-1])
    assert (ref["sampler"], ref["steps"], ref["rmse_grey"]) == ("dpmpp", 40, 0.0)
    assert 0 < dpmpp["rmse_grey"] < ddim["rmse_grey"]  # second order beats first at 8 steps
    assert dpmpp["mean_abs_grey"] <= dpmpp["rmse_grey"] and dpmpp["images_per_s"] > 0
    result = runner.invoke(app, [*args, "--runs", "dpmpp"])
    assert result.exit_code == 2 and "sampler:steps" in result.output


@pytest.mark.slow
def test_bench_phantom_reports_the_project_classifier_and_evaluation(tmp_path) -> None:
    """`bench phantom`: imported phantoms, the `small` classifier, AUROCs that are `cxrsynth.evaluate`'s."""
    import typer

    from cxrsynth import loader, manifest
    from cxrsynth.cli.bench import bench_phantom
    from cxrsynth.evaluate import metrics
    from cxrsynth.labels import FINDING_COLUMNS, FINDINGS

    app = typer.Typer(cls=CleanErrors)
    app.command("phantom")(bench_phantom)
    app.command("unused")(lambda: None)
    runner = CliRunner()
    work, out = tmp_path / "work", tmp_path / "figures.json"
    result = runner.invoke(app, ["phantom", "--train", "100", "--test", "30", "--external", "30", "--size", "32",
                                 "--epochs", "1", "--uncertain", "exclude", "--threads", "1", "--work", str(work),
                                 "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    root = work / "project"
    # The sites went through the importers and a patient-level split.
    cxp, emory = manifest.read(root, "cxp"), manifest.read(root, "emory")
    assert r["images"] == {"cxp_train": int((cxp["split"] == "train").sum()), "cxp_test": int((cxp["split"] == "test").sum()),
                           "emory_test": len(emory)}
    assert r["images"]["cxp_test"] > 0 and set(emory["split"]) == {"test"}
    train_patients = set(cxp.loc[cxp["split"] == "train", "patient_id"])
    assert train_patients and not train_patients & set(cxp.loc[cxp["split"] == "test", "patient_id"])
    # The classifier is the small preset at the bench's size, trained by the real loop with the uncertain rule asked for.
    model = json.loads((root / "classifier" / "classifier.json").read_text())
    assert model["preset"] == "small" and model["config"]["image_size"] == 32 and model["config"]["exclude_uncertain"]
    certain = loader.select(root, "cxp", "train", exclude_uncertain=True)
    assert model["data"]["train_images"] == len(certain) < r["images"]["cxp_train"]
    assert r["epochs"] == len(model["history"]) == 1
    # Every figure is cxrsynth.evaluate's on the kept predictions.
    for name in ("cxp", "emory"):
        m = metrics.evaluate(root, root / "predictions" / f"{name}.parquet", metrics.EvaluateConfig(bootstrap=0)).metrics
        assert list(r[name]) == list(FINDINGS)
        assert [r[name][f] for f in FINDINGS] == [m["findings"][c]["auroc"] for c in FINDING_COLUMNS]
        assert r[f"macro_{name}"] == m["macro"]["auroc"] and m["macro"]["auroc"] is not None
        assert m["test"]["images"] == (r["images"]["cxp_test"] if name == "cxp" else r["images"]["emory_test"])
    # The printed table and the render-speed line.
    lines = result.output.splitlines()
    for finding in FINDINGS:
        assert any(finding in line for line in lines)
    assert any("macro" in line and f"{r['macro_cxp']:.3f}" in line and f"{r['macro_emory']:.3f}" in line for line in lines)
    assert f"render {r['render_images_per_second_per_core']:.1f} images/s per core" in result.output
    assert r["render_images_per_second_per_core"] > 0 and r["passed"] in (True, False)
    bad = runner.invoke(app, ["phantom", "--uncertain", "drop"])
    assert bad.exit_code == 2 and "exclude or mask" in bad.output


def test_fabricated_chexpert_has_the_real_label_marginals_and_reads_as_chexpert(tmp_path) -> None:
    from cxrsynth import labels
    from cxrsynth.bench.scale import IMAGES_PER_PATIENT, MARGINALS, fabricate_chexpert
    from cxrsynth.sources import chexpert

    csv = fabricate_chexpert(tmp_path / "CheXpert-v1.0" / "train.csv", 20_000)
    source = chexpert.read(csv)
    records = source.records
    assert len(records) == 20_000 and records["key"].is_unique
    assert abs(records["patient_id"].nunique() - 20_000 / IMAGES_PER_PATIENT) < 0.02 * 20_000 / IMAGES_PER_PATIENT
    for finding, (pos, unc, _) in MARGINALS.items():
        column = records[labels.COLUMN_OF[finding]]
        assert abs((column == 1).mean() - pos) < 0.012 and abs((column == -1).mean() - unc) < 0.012, finding


@pytest.mark.slow
def test_bench_scale_times_every_stage_beside_its_plain_equivalent(tmp_path) -> None:
    from conftest import cli

    from cxrsynth import manifest
    from cxrsynth.bench.scale import PAPER

    out = tmp_path / "scale.json"
    text = cli(None, "bench", "scale", "--scale", "0.002", "--threads", "1", "--work", tmp_path / "work", "--out", out)
    assert "cohort query" in text and "ratio" in text
    result = json.loads(out.read_text())
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["labels-only ingest", "split", "mix 1000%", "cohort query", "evaluate, image bootstrap",
                            "evaluate, patient bootstrap", "compare, 11 cells", "co-occurrence", "report, 30 cells",
                            "neighbours, dim 256", "neighbours, dim 1024", "image ingest"]
    try:
        import faiss  # noqa: F401
        has_faiss = True
    except ImportError:
        has_faiss = False
    for name, s in stages.items():
        assert s["seconds"] > 0 and s["peak_rss_gib"] > 0, name
        if name.startswith("neighbours") and not has_faiss:
            assert s["ratio"] is None and "faiss not installed" in s["note"]
            continue
        assert s["plain_seconds"] > 0 and s["ratio"] == pytest.approx(s["seconds"] / s["plain_seconds"]), name
    if has_faiss:  # the same search: the same nearest bank row (random unit vectors have no ties)
        assert all(stages[f"neighbours, dim {d}"]["note"].startswith("top-1 agrees with faiss on 100.0%") for d in (256, 1024))
    # The sizes are the paper's times the scale, and the rows are what the library calls wrote.
    root = tmp_path / "work" / "proj"
    assert stages["labels-only ingest"]["rows"] == round(PAPER["chexpert"] * 0.002) == len(manifest.read(root, "cxp"))
    assert len(manifest.read(root, "cxp_w1")) == 10 * round(PAPER["replica"] * 0.002)
    assert stages["mix 1000%"]["rows"] == len(manifest.read(root, "cxp_k10"))
    assert stages["cohort query"]["rows"] == sum(len(manifest.read(root, n)) for n in ("cxp", "mimic", "cxp_w1", "cxp_k10"))
    assert stages["evaluate, image bootstrap"]["rows"] == int((manifest.read(root, "mimic")["split"] == "test").sum())
    assert len(json.loads((root / "metrics" / "compare" / "supplement.json").read_text())["cells"]) == 10
    assert len(list((root / "metrics" / "study").glob("*.json"))) == 30 and (root / "report" / "index.html").is_file()
    assert stages["neighbours, dim 256"]["rows"] == round(PAPER["queries"] * 0.002) * round(PAPER["bank"] * 0.002)
    t = result["total"]
    assert t["seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()))
    assert t["ratio"] > 0 and result["setup_seconds"] > 0
