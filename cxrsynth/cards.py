"""Model cards: the ``README.md`` with a YAML header that a trained model's folder carries.

A model leaves the hospital as a folder (a partner receives a generator as the paper
published its own; a classifier is shared with timm's ``config.json``). Its card says what
it is without cxrsynth: what data it learnt from (dataset name and version, images), how
(the settings), what it is for and not for, and the figures known when it was written
(tuning loss; evaluation AUROCs and the memorisation audit when a later step adds them
with :func:`update`). The header follows the Hugging Face model-card layout (``tags``,
``library_name``, ``datasets``, ``model-index``-free free-form ``cxrsynth`` facts), so hubs
and ``huggingface_hub.ModelCard.load`` read it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"

#: What every card says a model made from these datasets is not for.
LIMITS = (
    "Research use only: not a medical device, not validated for diagnosis or triage.",
    "Learnt from the dataset named above; performance on other hospitals, scanners, views and populations is unknown "
    "until measured there (the study's external test sets are the first such measure).",
    "Labels come from radiology reports (CheXpert labeller style): uncertain and missed findings are in the data.",
)


def render(front: dict[str, Any], sections: list[tuple[str, str]]) -> str:
    """The card's text: ``---`` YAML header ``---``, then ``## title`` + text per section."""
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=120).strip()
    body = "\n\n".join(f"## {title}\n\n{text.strip()}" for title, text in sections)
    return f"---\n{header}\n---\n\n{body}\n"


def write(directory: str | Path, front: dict[str, Any], sections: list[tuple[str, str]]) -> Path:
    """Write ``directory/README.md`` atomically."""
    path = Path(directory) / CARD
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(render(front, sections))
    os.replace(tmp, path)
    return path


def read(directory: str | Path) -> tuple[dict[str, Any], str]:
    """``(header, body)`` of a card (an empty header when the folder has none)."""
    path = Path(directory) / CARD
    if not path.is_file():
        return {}, ""
    text = path.read_text()
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return {}, text
    head, body = text[4:].split("\n---\n", 1)
    front = yaml.safe_load(head)
    return (front if isinstance(front, dict) else {}), body.lstrip("\n")


def update(directory: str | Path, facts: dict[str, Any], section: tuple[str, str]) -> Path | None:
    """Add ``facts`` under the header's ``cxrsynth`` entry and replace or append ``section``.

    Returns None (and writes nothing) when the folder has no card.
    """
    front, body = read(directory)
    if not front:
        return None
    front.setdefault("cxrsynth", {}).update(facts)
    sections = _sections(body)
    sections = [s for s in sections if s[0] != section[0]] + [section]
    return write(directory, front, sections)


def _sections(body: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for part in ("\n" + body).split("\n## ")[1:]:
        title, _, text = part.partition("\n")
        out.append((title.strip(), text.strip()))
    return out


def bullet_list(items: list[str] | tuple[str, ...]) -> str:
    return "\n".join(f"- {item}" for item in items)
