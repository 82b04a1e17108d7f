"""Logs a batch job can read: plain progress lines off a terminal, --quiet, and the JSON-lines history (issue 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrsynth.progress import JsonlLog, Ticker

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CXRSYNTH_LOG_EVERY="0")
    return subprocess.run([sys.executable, "-m", "cxrsynth", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_progress_to_a_pipe_is_plain_lines_and_quiet_prints_only_the_result(tmp_path):
    run = _cli(["phantom", "cxp", "--n", "12", "--out", "a"], tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("phantom cxp:")]
    assert lines and lines[-1].startswith("phantom cxp: 12/12 (100%)"), run.stderr
    assert all("/s" in line for line in lines)
    assert "\x1b" not in run.stderr
    quiet = _cli(["--quiet", "phantom", "cxp", "--n", "12", "--out", "b"], tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.split("->")[0] == run.stdout.split("->")[0]


def test_ticker_prints_first_and_last_with_rate_and_eta(tmp_path):
    out = tmp_path / "log.txt"
    with out.open("w") as stream:
        ticker = Ticker("job", 5, every=3600, stream=stream)
        for _ in range(5):
            ticker.advance()
        ticker.close()
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("job: 1/5 (20%)") and "ETA" in lines[0]
    assert lines[1].startswith("job: 5/5 (100%)")


def test_jsonl_log_keeps_steps_up_to_the_resumed_one(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(path)
    for step in (10, 20, 30):
        log.write(step=step, loss=float("nan") if step == 30 else 1.0 / step)
    JsonlLog(path, resume_from=20).write(step=30, loss=0.5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[-1]["loss"] == 0.5
    JsonlLog(path)  # a fresh run starts over
    assert path.read_text() == ""
