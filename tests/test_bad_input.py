"""Bad input, CLI level: every row of ``tests/bad_inputs.py`` through typer's CliRunner.

Each row must end as its table says: the exit code, a message naming the problem, no
traceback and, for ingests, the rejects by reason and the rows kept. Beside the table, a
few unit checks of the same defences: a Lightning-style checkpoint still imports,
training checkpoints load without running code, 16-bit decoding stays out of float64.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import CASES, Case, _checkpoint, _Payload, adm_state_dict
from typer.testing import CliRunner

from cxrsynth.cli import app
from cxrsynth.errors import CxrsynthError

runner = CliRunner()


def _run(case: Case, tmp: Path):
    paths = case.setup(tmp)
    args = [a.format(tmp=tmp, **paths) for a in case.args]
    return paths, runner.invoke(app, args, env=case.env)


SLOW = {"ingest-killed"}  # more than 3 s: kills an ingest with two workers mid-run, then runs it again


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] * (c.id in SLOW)) for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    paths, result = _run(case, tmp_path)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{case.id}: traceback instead of a clean message") from result.exception
    assert "Traceback" not in output
    assert result.exit_code == case.exit_code, output
    assert case.message in output, output
    if case.exit_code == 2:
        assert output.count("error:") == 1 and "Usage:" not in output, output  # one clean line, also for parse errors
    if case.rejected is not None or case.kept is not None:
        import pandas as pd

        from cxrsynth import manifest

        rejects = pd.read_parquet(manifest.rejects_path(paths["root"], "cxp"))
        assert dict(Counter(rejects["reason"])) == case.rejected
        assert len(manifest.read(paths["root"], "cxp")) == case.kept
    if case.check is not None:
        case.check(paths, output)


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_readme_table_script_prints_every_case() -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "bad-input-table.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == len(CASES) + 1  # the header + one row per case
    assert all(case.bad in out for case in CASES)


def _lightning_checkpoint(state_dict: dict) -> dict:
    """What a Lightning 2.0 checkpoint of Mediffusion's DiffusionModule holds (keys and types as
    ``trainer.save_checkpoint`` writes them, from a real one): OmegaConf hyper-parameters,
    loop and callback states, optimizer states, bkh_pytorch_utils' EMA weights."""
    from omegaconf import DictConfig, OmegaConf

    hparams = OmegaConf.create({"model": {"input_size": 32, "channel_mult": [1, 2], "missing_class_value": None},
                                "optimizer": {"lr": 1e-5, "type": "bkh_pytorch_utils.Lion"}, "batch_size": 2})
    model = {f"model.{k}": v for k, v in state_dict.items()}
    return {
        "epoch": 1, "global_step": 2, "pytorch-lightning_version": "2.0.0",
        "state_dict": model, "ema_state_dict": {k: v.clone() for k, v in model.items()}, "_ema_state_dict_ready": True,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.batch_progress": {"total": {"ready": 2, "completed": 2}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(0.99, dtype=torch.float64), "best_model_path": "pl/epoch=0-step=2.ckpt",
            "best_k_models": {"pl/epoch=0-step=2.ckpt": torch.tensor(0.99)}, "dirpath": "pl"}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.99), "params": [0]}]}],
        "lr_schedulers": [], "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 1},
        "hparams_name": None, "hyper_parameters": hparams, "hparams_type": DictConfig,
    }


def test_lightning_checkpoint_imports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    paths = _checkpoint(tmp_path, _lightning_checkpoint(adm_state_dict(32)))
    result = runner.invoke(app, ["generator", "import-mediffusion", str(paths["ckpt"]), "--config", str(paths["config"]),
                                 "--out", str(paths["out"])])
    assert result.exit_code == 0, result.output
    assert (paths["out"] / "generator.json").is_file()


def test_training_checkpoint_loads_safely(tmp_path: Path) -> None:
    from cxrsynth.diffusion.train import load_checkpoint

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    state = {"config": {"channel_mult": (1, 2)}, "train": {"lr": 1e-4}, "run": {"world": 1}, "step": 3, "epoch": 0,
             "batch_in_epoch": 3, "model": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}, "optimizer": opt.state_dict(),
             "lr_schedule": sched.state_dict(), "rng": [{"gen": torch.Generator().get_state()}], "data_seen": [(4, ["a", "b"])]}
    torch.save(state, tmp_path / "latest.pt")
    loaded = load_checkpoint(tmp_path / "latest.pt", "cpu")
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    marker = tmp_path / "PWNED"
    torch.save({**state, "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CxrsynthError, match="may be unsafe"):
        load_checkpoint(tmp_path / "evil.pt", "cpu")
    assert not marker.exists()
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(CxrsynthError, match="not a cxrsynth training checkpoint"):
        load_checkpoint(tmp_path / "other.pt", "cpu")


def test_16bit_png_decodes_without_float64_copies(tmp_path: Path) -> None:
    """Peak traced memory of reading a 16-bit PNG stays a few bytes per pixel (float64 copies
    of the whole image cost 8 bytes per pixel each; the old path made three)."""
    import tracemalloc

    from PIL import Image

    from cxrsynth.imaging import read_image

    side = 2048
    pixels = (np.arange(side * side, dtype=np.uint32).reshape(side, side) % 65536).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "big16.png")
    tracemalloc.start()
    image = read_image(tmp_path / "big16.png")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.dtype == np.uint8 and image.shape == (side, side)
    assert peak < 6 * side * side, f"{peak / side / side:.1f} bytes per pixel"
