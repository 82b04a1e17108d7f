#!/usr/bin/env python3
"""Print the README's "what happens to bad input" table from tests/bad_inputs.py.

The rows are the ones tests/test_bad_input.py runs, so the README says what the tests
check. The table module is loaded by its path (it lives with the tests, not in the
package); it imports nothing heavy until a case is built.

    python scripts/bad-input-table.py > /tmp/table.md
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "tests" / "bad_inputs.py"


def load_cases():
    spec = importlib.util.spec_from_file_location("bad_inputs", TABLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module.CASES


def outcome(case) -> str:
    """``exit 2: <words>`` or, for an ingest that rejects rows, what was rejected and kept."""
    text = f"exit {case.exit_code}: {case.outcome}"
    if case.rejected:
        text += " (" + ", ".join(f"`{r}` {n}" for r, n in case.rejected.items()) + f"; {case.kept} kept)"
    return text


def main() -> None:
    print("| Bad input | Command | Outcome |")
    print("|---|---|---|")
    for case in load_cases():
        command = case.command().replace("|", "\\|")
        if len(command) > 80:
            command = command[:77] + "..."
        print(f"| {case.bad} | `{command}` | {outcome(case)} |")


if __name__ == "__main__":
    main()
