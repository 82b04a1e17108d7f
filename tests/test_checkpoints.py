"""The checkpoint kit both trainers share: atomic save, safe load, one RNG policy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cxrsynth import checkpoints
from cxrsynth.diffusion.presets import get_preset
from cxrsynth.diffusion.train import TrainConfig, train
from cxrsynth.errors import CxrsynthError
from cxrsynth.labels import CONDITION_SIZE


def test_save_is_atomic_and_load_names_what_is_missing(tmp_path: Path) -> None:
    path = checkpoints.save({"step": 3, "w": torch.ones(2)}, tmp_path / "deep" / "latest.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert checkpoints.load(path, ("step",))["step"] == 3
    with pytest.raises(CxrsynthError, match="not a cxrsynth training checkpoint .lacks epoch, rng."):
        checkpoints.load(path, ("step", "epoch", "rng"))


def test_rng_state_round_trips_the_global_and_the_runs_generator() -> None:
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(5)
    with checkpoints.forked_rng(cpu):
        checkpoints.seed_run(7, rank=1)
        state = checkpoints.rng_state(cpu, gen)
        first = (torch.rand(3), torch.rand(3, generator=gen))
        checkpoints.set_rng_state(state, cpu, gen)
        assert all(torch.equal(a, b) for a, b in zip(first, (torch.rand(3), torch.rand(3, generator=gen))))
        checkpoints.seed_run(7, rank=0)
        assert not torch.equal(torch.rand(3), first[0])  # each rank its own stream


def test_generator_training_with_dropout_resumes_bit_identical_and_leaves_the_callers_rng(tmp_path: Path) -> None:
    """The network's own draws (dropout) come from the run's seeded global generator, checkpointed with the rest."""
    config = get_preset("micro").replace(dropout=0.3)
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(8, 1, 32, 32, generator=g) * 255).to(torch.uint8)
    conds = (torch.rand(8, CONDITION_SIZE, generator=g) > 0.5).float()
    data = lambda epoch: [{"image": images[i : i + 4], "cond": conds[i : i + 4]} for i in (0, 4)]  # noqa: E731
    tc = TrainConfig(steps=4, batch_size=4, save_every=2, warmup_steps=1, lr=1e-3)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    straight = train(config, tc, data, tmp_path / "a", progress=False, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator as it was
    torch.rand(5)  # whatever the process draws between the two calls changes nothing
    train(config, dataclasses.replace(tc, steps=2), data, tmp_path / "b", progress=False, device="cpu")
    torch.rand(7)
    resumed = train(config, tc, data, tmp_path / "b", resume=True, progress=False, device="cpu")
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"EMA {k} differs after resume"
    state = checkpoints.load(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert set(state["rng"][0]) == {"cpu", "gen"}


def test_a_state_with_nan_or_inf_is_neither_saved_nor_loaded(tmp_path: Path) -> None:
    from cxrsynth.safeload import NonFiniteWeights

    state = {"step": 3, "trainer": {"model": {"w": torch.ones(2), "b": torch.tensor([0.0, float("nan")])},
                                    "optimizer": {"state": {0: {"exp_avg": torch.full((2,), float("inf"))}}}},
             "rng": [{"cpu": torch.get_rng_state()}]}  # uint8: not a number to check
    with pytest.raises(NonFiniteWeights, match=r"not writing the checkpoint .*: NaN or infinite values in 2 of 3 tensor\(s\) "
                                               r"\(trainer.model.b, trainer.optimizer.state.0.exp_avg\)"):
        checkpoints.save(state, tmp_path / "latest.pt")
    assert not list(tmp_path.iterdir())  # nothing written, not even the temporary file
    torch.save(state, tmp_path / "latest.pt")  # as another tool (or an older cxrsynth) would have
    with pytest.raises(NonFiniteWeights, match="latest.pt: NaN or infinite values in 2 of 3"):
        checkpoints.load(tmp_path / "latest.pt", ("step",))


def test_check_loss_stops_a_run_on_any_ranks_nan_or_inf() -> None:
    checkpoints.check_loss([0.5, 0.25], "epoch 1", lr=1e-3)
    for losses in ([0.5, float("nan")], [float("inf")]):
        with pytest.raises(checkpoints.Diverged, match=r"training diverged: the loss is (nan|inf) at epoch 1; .*it is 0.001"):
            checkpoints.check_loss(losses, "epoch 1", lr=1e-3)


def test_generator_training_that_diverges_stops_before_writing(tmp_path: Path) -> None:
    """lr 1e30 is a finite value the config accepts; the loss is NaN by the second step."""
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(4, 1, 32, 32, generator=g) * 255).to(torch.uint8)
    conds = (torch.rand(4, CONDITION_SIZE, generator=g) > 0.5).float()
    tc = TrainConfig(steps=6, batch_size=4, save_every=3, log_every=6, warmup_steps=1, lr=1e30)  # no readout before the checkpoint
    with pytest.raises(checkpoints.Diverged, match="at step 3 or before"):
        train(get_preset("micro"), tc, lambda epoch: [{"image": images, "cond": conds}], tmp_path / "g", progress=False,
              device="cpu")
    assert not (tmp_path / "g" / "checkpoints" / "latest.pt").exists()
    assert not list((tmp_path / "g").glob("*.safetensors"))


_UNDER_FSIZE_LIMIT = """
import resource, sys, torch
from pathlib import Path
from cxrsynth import checkpoints
from cxrsynth.classify.model import build, save_weights
from cxrsynth.classify.presets import get_preset
from cxrsynth.errors import CxrsynthError
out = Path(sys.argv[1])
checkpoints.save({"w": torch.zeros(4)}, out / "latest.pt")  # a small good checkpoint first
before = (out / "latest.pt").read_bytes()
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # Python ignores SIGXFSZ: writes fail with EFBIG
for what, write in (("checkpoint", lambda: checkpoints.save({"w": torch.zeros(100_000)}, out / "latest.pt")),
                    ("classifier", lambda: save_weights(build(get_preset("small", image_size=32)), out / "model.safetensors"))):
    try:
        write()
        print(what, "WROTE")
    except CxrsynthError as exc:
        print(what, type(exc).__name__, exc.exit_code, exc)
assert (out / "latest.pt").read_bytes() == before, "the previous checkpoint changed"
print("leftovers", sorted(p.name for p in out.iterdir()))
"""


@pytest.mark.slow  # ~10 s: a subprocess importing torch and timm
def test_a_write_cut_short_by_a_full_disk_is_a_clean_error_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """torch.save and safetensors report a full disk (here: a file-size limit) as RuntimeError / SafetensorError
    without an errno; the writers turn it into WriteFailed naming the file, remove the partial file and leave
    the previous checkpoint as it was."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _UNDER_FSIZE_LIMIT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("checkpoint WriteFailed 1 could not write the checkpoint") and "latest.pt" in lines[0]
    assert lines[1].startswith("classifier WriteFailed 1 could not write the classifier's weights")
    assert lines[2] == "leftovers ['latest.pt']"  # no .tmp left behind
