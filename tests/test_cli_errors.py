"""Every command group, given a bad name, a bad path and a bad value, ends with one clean line.

The table below drives the CLI through typer's ``CliRunner``. A library error must come
out as exactly one ``error: ...`` line (the last line of the output) and exit code 2, or 1
for a failed check; no traceback, and the runner's exception is the ``SystemExit`` of that
exit, never the error itself. Values that typer refuses while parsing (an option range)
come out the same way, as one ``error:`` line (naming the command's ``--help``), exit code 2. Nothing
here trains or samples: every case fails before the work starts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import chexpert_rows, ingest_site, micro_generator
from typer.testing import CliRunner

from cxrsynth.cli import app

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    """One bad call: the group it exercises, what is bad, its arguments, what must come out.

    ``args`` may name ``{root}`` (a project with ``cxp``: shards, splits), ``{empty}`` (a
    project without manifests), ``{gen}`` (an untrained micro generator), ``{csv}`` (a
    CheXpert train.csv), ``{file}`` (a plain file), ``{dir}`` (an empty folder),
    ``{ckpt}`` (a torch file holding an empty dict), ``{yaml_ok}`` / ``{yaml_dims}`` /
    ``{yaml_schedule}`` (Mediffusion configs) and ``{bad_json}`` (a generator folder whose
    generator.json is not JSON). ``usage``: typer refuses the value while parsing.
    """

    group: str
    bad: str  # name | path | value
    args: tuple[str, ...]
    message: str
    code: int = 2
    usage: bool = False


def _case(group: str, bad: str, args: str, message: str, code: int = 2, usage: bool = False) -> Case:
    return Case(group, bad, tuple(args.split("\x1f")) if "\x1f" in args else tuple(args.split()), message, code, usage)


CASES: tuple[Case, ...] = (
    _case("phantom", "name", "phantom nope --n 2 --out {dir}/ph", "unknown phantom site 'nope'; known: cxp, emory, mimic"),
    _case("phantom", "path", "phantom cxp --n 2 --out {file}", "is a file, not a folder"),
    _case("phantom", "value", "phantom cxp --n 0 --out {dir}/ph", "Invalid value for '--n'", usage=True),
    _case("ingest chexpert", "name", "ingest chexpert {csv} --name 1cxp --root {empty}", "dataset name '1cxp' must match"),
    _case("ingest chexpert", "path", "ingest chexpert {dir}/train.csv --name cxp --root {empty}", "not found"),
    _case("ingest chexpert", "value", "ingest chexpert {csv} --name cxp --version a/b --root {empty}",
          "version name 'a/b' must match"),
    _case("ingest mimic", "name", "ingest mimic --metadata {file} --labels {file} --name images --root {empty}", "reserved"),
    _case("ingest mimic", "path", "ingest mimic --metadata {dir}/meta.csv.gz --labels {dir}/l.csv.gz --name m --root {empty}",
          "not found"),
    _case("ingest mimic", "value", "ingest mimic --metadata {file} --labels {file} --name m --version ../up --root {empty}",
          "version name '../up' must match"),
    _case("ingest table", "name", "ingest table {csv} --map Path=colour --name t --root {empty}", "unknown field 'colour'"),
    _case("ingest table", "path", "ingest table {dir}/t.csv --map Path=path --name t --root {empty}", "not found"),
    _case("ingest table", "value", "ingest table {csv} --map Path --name t --root {empty}", "--map expects COLUMN=FIELD"),
    _case("stats", "name", "stats nope --root {root}", "no manifest named 'nope'"),
    _case("stats", "path", "stats cxp --root {empty}", "no manifest named 'cxp'"),
    _case("stats", "value", "stats cxp --split nope --root {root}", "unknown split 'nope'; known: test, train, tune"),
    _case("split", "name", "split nope --seed 0 --root {root}", "no manifest named 'nope'"),
    _case("split", "path", "split cxp --seed 0 --root {empty}", "no manifest named 'cxp'"),
    _case("split", "value", "split cxp --seed 0 --tune 2 --root {root}", "must be in [0, 1]"),
    _case("query", "name", "query\x1fSELECT * FROM nope\x1f--root\x1f{root}", "nope"),
    _case("query", "path", "query\x1fSELECT 1 AS one\x1f--out\x1f{dir}\x1f--root\x1f{root}", "it is a folder; name a file to write"),
    _case("query", "value", "query\x1fSELECT 1 AS one\x1f--format\x1fxml\x1f--root\x1f{root}",
          "--format must be table, csv or json"),
    _case("verify", "name", "verify nope --root {root}", "no manifest named 'nope'"),
    _case("verify", "path", "verify cxp --root {empty}", "no manifest named 'cxp'"),
    _case("verify", "value", "verify cxp --root {corrupt}", "problem(s)", code=1),
    _case("sheet", "name", "sheet nope --out {dir}/s.png --root {root}", "nope"),
    _case("sheet", "path", "sheet cxp --out {file}/s.png --root {root}", "cannot write the sheet"),
    _case("sheet", "value", "sheet\x1fcxp\x1f--out\x1f{dir}/s.png\x1f--where\x1fno_such_column = 1\x1f--root\x1f{root}",
          "no_such_column"),
    _case("mix", "name", "mix --real nope --name m --seed 0 --root {root}", "no manifest named 'nope'"),
    _case("mix", "path", "mix --real cxp --name m --seed 0 --root {empty}", "no manifest named 'cxp'"),
    _case("mix", "value", "mix --real cxp --name m --seed 0 --synthetic abc --root {root}", "percentage"),
    _case("generator train", "name", "generator train --data cxp --out {dir}/g --preset nope --root {root}",
          "unknown generator preset 'nope'; known: micro, paper, tiny"),
    _case("generator train", "path", "generator train --data cxp --out {file} --preset micro --batch 2 --steps 1 --root {root}",
          "is a file, not a generator folder"),
    _case("generator train", "value", "generator train --data cxp --out {dir}/g --preset micro --image-size 30 --root {root}",
          "image_size 30 is not divisible"),
    _case("generator info", "name", "generator info {root}", "is not a cxrsynth generator"),
    _case("generator info", "path", "generator info {dir}/nope", "is not a cxrsynth generator"),
    _case("generator info", "value", "generator info {bad_json}", "not valid JSON"),
    _case("generator fid", "name",
          "generator fid --real cxp --synthetic cxp --classifier nope_model --checkpoint {ckpt} --root {root}",
          "unknown timm model 'nope_model'"),
    _case("generator fid", "path", "generator fid --real cxp --synthetic cxp --inception {dir}/nope.pth --root {root}",
          "not found"),
    _case("generator fid", "value",
          "generator fid --real cxp --synthetic cxp --inception {ckpt} --classifier resnet18 --root {root}",
          "give exactly one of"),
    _case("generator import-mediffusion", "name", "generator import-mediffusion {ckpt} --config {yaml_schedule} --out {dir}/m",
          "schedule 'nope' is not supported"),
    _case("generator import-mediffusion", "path", "generator import-mediffusion {dir}/nope.ckpt --config {yaml_ok} --out {dir}/m",
          "not found"),
    _case("generator import-mediffusion", "value", "generator import-mediffusion {ckpt} --config {yaml_dims} --out {dir}/m",
          "dims must be 2"),
    _case("generator export-diffusers", "name", "generator export-diffusers {gen} {dir}/hf --sampler nope",
          "unknown sampler 'nope'"),
    _case("generator export-diffusers", "path", "generator export-diffusers {dir}/nope {dir}/hf", "not a cxrsynth generator"),
    _case("generator export-diffusers", "value", "generator export-diffusers {gen} {gen}", "exists and is not empty"),
    _case("generate", "name", "generate --generator {gen} --conditions cxp --name s --sampler nope --root {root}",
          "unknown sampler 'nope'; known: ddim, ddim-unclipped, dpmpp"),
    _case("generate", "path", "generate --generator {dir}/nope --conditions cxp --name s --root {root}",
          "holds no generator weights"),
    _case("generate", "value", "generate --generator {gen} --conditions cxp --name s --part 5/2 --root {root}",
          "--part 5/2: need 0 <= i < N"),
    _case("bench generate", "name", "bench generate --preset nope", "unknown generator preset 'nope'"),
    _case("bench generate", "value", "bench generate --preset micro --dtype nope",
          "unknown dtype 'nope'; known: bf16, bf16-weights, fp32"),
    _case("bench generate", "value", "bench generate --preset micro --device nope", "unknown device 'nope'"),
    _case("bench roofline", "name", "bench roofline --preset nope", "unknown generator preset 'nope'"),
    _case("bench roofline", "value", "bench roofline --preset micro --steps a,b", "--steps must be positive integers"),
    _case("bench train", "name", "bench train --preset nope", "unknown generator preset 'nope'"),
    _case("bench train", "value", "bench train --preset micro --steps 0", "batch, steps and warmup steps must be >= 1"),
    _case("bench solvers", "name",
          "bench solvers --generator {gen} --conditions cxp --runs nope:2 --reference ddim:2 --n 2 --root {root}",
          "unknown sampler 'nope'"),
    _case("bench solvers", "path", "bench solvers --generator {dir}/nope --conditions cxp --root {root}",
          "is not a cxrsynth generator"),
    _case("bench solvers", "value", "bench solvers --generator {gen} --conditions cxp --runs ddim --root {root}",
          "expected sampler:steps"),
    _case("bench ingest", "path", "bench ingest --n 1 --chexpert-csv {dir}/nope.csv", "CheXpert CSV not found"),
    _case("bench ingest", "value", "bench ingest --n 0", "Invalid value for '--n'", usage=True),
    _case("bench phantom", "value", "bench phantom --train 1", "Invalid value for '--train'", usage=True),
)


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """The files and folders the cases name, built once (an ingest of 8 images at 16 px, no training)."""
    import torch

    base = tmp_path_factory.mktemp("cli-errors")
    root = ingest_site(base, chexpert_rows(uncertain=False), size=16, shard_size=4, split={"tune": 0.25, "test": 0.25, "seed": 0})
    csv = base / "raw" / "CheXpert-v1.0" / "train.csv"
    corrupt = base / "corrupt"
    shutil.copytree(root, corrupt)
    shard = next((corrupt / "data/shards/cxp").rglob("cxp-000000.tar"))
    shard.write_bytes(shard.read_bytes()[:-512])
    gen = micro_generator(base / "gen")
    bad_json = base / "bad_gen"
    bad_json.mkdir()
    (bad_json / "generator.json").write_text("{not json")
    (base / "empty").mkdir()
    (base / "dir").mkdir()
    (base / "file").write_text("a plain file\n")
    torch.save({}, base / "empty.pt")
    configs = {"yaml_ok": "model:\n  num_classes: 22\n", "yaml_dims": "model:\n  num_classes: 22\n  dims: 3\n",
               "yaml_schedule": "model:\n  num_classes: 22\ndiffusion:\n  schedule_name: nope\n"}
    for key, text in configs.items():
        (base / f"{key}.yaml").write_text(text)
    return {"root": root, "empty": base / "empty", "corrupt": corrupt, "gen": gen, "csv": csv, "file": base / "file",
            "dir": base / "dir", "ckpt": base / "empty.pt", "bad_json": bad_json,
            **{key: base / f"{key}.yaml" for key in configs}}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}-{c.bad}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clean_line(case: Case, places: dict[str, Path]) -> None:
    args = [a.format(**places) for a in case.args]
    result = runner.invoke(app, args)
    output = result.output
    assert isinstance(result.exception, SystemExit), f"{args}: {result.exception!r} reached the user"
    assert "Traceback" not in output
    assert result.exit_code == case.code, output
    assert case.message in " ".join(output.split()), output
    if case.usage:
        assert "Usage:" not in output and "--help)" in output  # one line, pointing at the help
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output


def test_every_command_group_is_covered() -> None:
    """A new command group must add its rows: every top-level command and sub-command here has one."""
    import typer.main

    command = typer.main.get_command(app)
    groups = set()
    for name, sub in command.commands.items():
        if hasattr(sub, "commands") and name in ("ingest", "generator", "bench"):
            groups |= {f"{name} {child}" for child in sub.commands}
        elif not hasattr(sub, "commands"):
            groups.add(name)
    mine = {"phantom", "stats", "split", "query", "verify", "sheet", "mix", "generate"}
    mine |= {g for g in groups if g.startswith(("ingest ", "generator "))}
    mine |= {f"bench {b}" for b in ("generate", "roofline", "train", "solvers", "ingest", "phantom")}
    covered = {c.group for c in CASES}
    assert mine <= groups, mine - groups
    assert mine <= covered, sorted(mine - covered)
    for group in covered:
        kinds = {c.bad for c in CASES if c.group == group}
        assert "value" in kinds, group


def test_a_file_size_limit_is_one_clean_line_and_no_truncated_image_is_left(tmp_path: Path) -> None:
    """What the machine refuses (EFBIG here; a full disk, a read-only folder alike) is one line naming
    the file, exit 1, no traceback; the phantom's JPEGs, which PIL's encoder truncated silently, fail too."""
    import resource
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "cxrsynth", "phantom", "cxp", "--n", "3", "--out", "ph", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "cannot access" in run.stderr and "File too large" in run.stderr
    assert "a file size limit was reached" in run.stderr and ".jpg" in run.stderr
