"""Imports point down the floors of cxrsynth.LAYERS, never up and never sideways between stage packages."""

import ast
from pathlib import Path

import cxrsynth

PACKAGE = Path(cxrsynth.__file__).parent
FLOOR = {unit: (i, name, mixes) for i, (name, units, mixes) in enumerate(cxrsynth.LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The top-level module or package of ``cxrsynth.<unit>...`` (``cxrsynth`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cxrsynth"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(me: str, is_package: bool, text: str) -> list[tuple[int, str]]:
    """(line, module) of every cxrsynth import in module ``me``'s ``text``, lazy ones inside functions included."""
    package = me if is_package else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "cxrsynth"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "cxrsynth":
                continue
            if base == "cxrsynth":  # ``from cxrsynth import labels``: each name may be a module
                out += [(node.lineno, f"cxrsynth.{a.name}" if (PACKAGE / a.name).exists()
                         or (PACKAGE / f"{a.name}.py").exists() else "cxrsynth") for a in node.names]
            else:
                out.append((node.lineno, base))
    return sorted(out)


def modules() -> list[tuple[str, str, bool, str]]:
    """(shown path, module name, is a package, source text) of every module of cxrsynth."""
    return [(str(p.relative_to(PACKAGE.parent)), module_name(p), p.name == "__init__.py", p.read_text())
            for p in sorted(PACKAGE.rglob("*.py"))]


def violations(files: list[tuple[str, str, bool, str]]) -> list[str]:
    found = []
    for shown, me, is_package, text in files:
        source = unit_of(me)
        if source not in FLOOR:
            found.append(f"{shown}: {source} is on no floor of cxrsynth.LAYERS")
            continue
        mine, floor, mixes = FLOOR[source]
        for line, target_module in imported(me, is_package, text):
            target = unit_of(target_module)
            if target not in FLOOR:
                found.append(f"{shown}:{line}: imports {target_module}, on no floor")
                continue
            theirs, their_floor, _ = FLOOR[target]
            if theirs > mine:
                found.append(f"{shown}:{line}: {floor} imports upward: {target_module} ({their_floor})")
            elif theirs == mine and target != source and not mixes:
                found.append(f"{shown}:{line}: {floor} import sideways: {target_module}")
    return found


def test_every_import_points_down_the_floors():
    assert violations(modules()) == []


def test_the_floors_name_every_module_once_and_the_checker_sees_a_sideways_import():
    units = [u for _, names, _ in cxrsynth.LAYERS for u in names]
    assert len(units) == len(set(units))
    on_disk = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert on_disk - {"__init__"} <= set(units), on_disk - set(units)
    # the checker itself: a lazy sideways import, a relative upward one, a module on no floor
    probe = "def f():\n    from cxrsynth.classify import model\n\nfrom ..study import plan\nfrom cxrsynth import labels\n"
    found = violations([("probe.py", "cxrsynth.diffusion.probe", False, probe),
                        ("lost.py", "cxrsynth.lost", False, "")])
    assert found == ["probe.py:2: stages import sideways: cxrsynth.classify",
                     "probe.py:4: stages imports upward: cxrsynth.study (consumers)",
                     "lost.py: lost is on no floor of cxrsynth.LAYERS"]
