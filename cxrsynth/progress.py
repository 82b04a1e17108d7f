"""Progress a batch job can read, and training histories as JSON lines.

* :class:`Ticker` — plain progress lines (``what: 40/100 (40%) 12.3/s ETA 0:00:05``) for a
  stderr that is not a terminal (a log file, a pipe, a batch scheduler): the first update,
  one every :func:`log_every_seconds` (``CXRSYNTH_LOG_EVERY``, default 10 s) and the last,
  each flushed at once. A rich bar redirected to a file prints nothing until it ends.
* :class:`JsonlLog` — a training history (``log.jsonl``), one JSON object per line,
  appended on resume; lines past the resumed step (written after the checkpoint that the
  run resumes from) are dropped first, so no step appears twice.

On the contracts floor: the stages (training) and the command line both use it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from cxrsynth.errors import CxrsynthError

#: Seconds between plain progress lines (a float; the first and last line always print).
LOG_EVERY_ENV = "CXRSYNTH_LOG_EVERY"
DEFAULT_LOG_EVERY = 10.0
#: The history file training writes beside its checkpoints.
LOG_FILE = "log.jsonl"


def log_every_seconds() -> float:
    """``CXRSYNTH_LOG_EVERY`` as seconds (default 10); a value that is not a number >= 0 is named."""
    raw = os.environ.get(LOG_EVERY_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_LOG_EVERY
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise CxrsynthError(f"{LOG_EVERY_ENV}={raw!r}: expected seconds, a number >= 0")
    return value


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (rich bars) or not (plain lines)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Ticker:
    """Plain progress lines on ``stream`` (stderr by default): count/total, rate, ETA, extra fields."""

    def __init__(self, description: str, total: int | None, *, done: int = 0, unit: str = "/s",
                 every: float | None = None, stream: IO[str] | None = None) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.every = log_every_seconds() if every is None else every
        self.stream = stream
        self.start_done = self.done = done
        self.fields: dict[str, str] = {}
        self.t0 = time.monotonic()
        self.last_print: float | None = None
        self.printed_at: int | None = None

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int, **fields: Any) -> None:
        """Set the count (and any ``name=value`` shown after it); print when a line is due."""
        self.done = done
        self.fields.update({k: str(v) for k, v in fields.items()})
        now = time.monotonic()
        if self.last_print is None or now - self.last_print >= self.every:
            self._print(now)

    def close(self) -> None:
        """The last line (unless the last update printed it already)."""
        if self.printed_at != self.done or self.last_print is None:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        elapsed = now - self.t0
        made = self.done - self.start_done
        rate = made / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else f"{self.done}"
        parts = [f"{self.description}: {count}", f"{rate:.1f}{self.unit}"]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        stream = self.stream if self.stream is not None else sys.stderr
        print(", ".join(parts), file=stream, flush=True)
        self.last_print, self.printed_at = now, self.done


class JsonlLog:
    """Append-only JSON lines keyed by ``step``; ``resume_from`` keeps the lines up to that step.

    A fresh run (``resume_from=None``) starts the file over; a resumed run keeps what the
    checkpoint covers and appends, so each step is written once however often it is killed.
    Only rank 0 should write (the caller decides).
    """

    def __init__(self, path: str | Path, resume_from: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_from is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: after the checkpoint anyway
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_from:
                    kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, **record: Any) -> None:
        """One line, flushed (floats that are not finite become null: JSON has no NaN)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, sort_keys=False) + "\n")
