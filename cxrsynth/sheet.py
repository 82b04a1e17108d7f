"""Contact sheets: a grid of radiographs, each captioned with its positive findings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrsynth.errors import CxrsynthError
from cxrsynth.labels import FINDINGS

#: Short names for captions.
ABBREVIATIONS: dict[str, str] = {
    "No Finding": "NoFinding",
    "Enlarged Cardiomediastinum": "EnlCM",
    "Cardiomegaly": "Cardiomeg",
    "Lung Opacity": "Opacity",
    "Lung Lesion": "Lesion",
    "Edema": "Edema",
    "Consolidation": "Consol",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelect",
    "Pneumothorax": "PTX",
    "Pleural Effusion": "Effusion",
    "Pleural Other": "PleurOth",
    "Fracture": "Fracture",
    "Support Devices": "Devices",
}


def caption(labels: np.ndarray, header: str = "") -> list[str]:
    """Caption lines for one image: a header, then positive findings (``?`` = uncertain)."""
    words = [ABBREVIATIONS[f] for f, v in zip(FINDINGS, labels) if v == 1]
    words += [ABBREVIATIONS[f] + "?" for f, v in zip(FINDINGS, labels) if v == -1]
    lines, line = [header] if header else [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > 26:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return lines


def contact_sheet(
    images: list[np.ndarray],
    labels: np.ndarray,
    headers: list[str] | None = None,
    columns: int = 6,
    tile_width: int = 200,
) -> Image.Image:
    """Grid of images with captions below each.

    Args:
        images: ``(H, W) uint8`` images of any (non-square) size.
        labels: (N, 14) int8 labels of the images.
        headers: Optional first caption line per image (e.g. sex, age, view).
        columns: Images per row.
        tile_width: Width of a tile in pixels; images keep their aspect ratio.
    """
    font = ImageFont.load_default()
    n = len(images)
    if n == 0:
        raise CxrsynthError("a contact sheet needs at least one image")
    tile_height = max(int(round(tile_width * im.shape[0] / im.shape[1])) for im in images)
    text_height = 4 * 12 + 4
    rows = (n + columns - 1) // columns
    sheet = Image.new("L", (columns * tile_width, rows * (tile_height + text_height)), color=255)
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        x0, y0 = c * tile_width, r * (tile_height + text_height)
        h = int(round(tile_width * image.shape[0] / image.shape[1]))
        tile = Image.fromarray(image).resize((tile_width, h), Image.Resampling.BILINEAR)
        sheet.paste(tile, (x0, y0))
        lines = caption(labels[i], headers[i] if headers else "")
        for j, line in enumerate(lines[:4]):
            draw.text((x0 + 3, y0 + tile_height + 2 + 12 * j), line, fill=0, font=font)
    return sheet


def write_sheet(path: Path, images: list[np.ndarray], labels: np.ndarray, headers: list[str] | None = None) -> Path:
    """Write a contact sheet PNG (deterministic bytes); a path that cannot be written is a :class:`CxrsynthError`."""
    path = Path(path)
    sheet = contact_sheet(images, labels, headers)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path, format="PNG", optimize=False, compress_level=6)
    except OSError as exc:  # a parent that is a file, no permission, a full disk
        raise CxrsynthError(f"cannot write the sheet {path}: {exc.strerror or exc}") from None
    return path


def header(row) -> str:
    """``F 67 AP`` (+ ``syn r2`` for synthetic rows) from a manifest row."""
    age = "" if row.get("age") is None or row.get("age") != row.get("age") else int(row["age"])
    text = f"{row.get('sex') or '?'} {age} {row.get('view') or ''}".strip()
    if row.get("origin") == "synthetic":
        text += f", syn r{int(row['replica'])}"
    return text


def dataset_sheet(root: str | Path, name: str, out: str | Path, *, n: int = 24, where: str | None = None) -> Path:
    """Contact sheet of the first ``n`` images (by key) of dataset ``name`` from its shards.

    Args:
        root: Project root.
        name: Dataset with shards.
        out: PNG to write.
        n: Images on the sheet.
        where: Optional SQL condition on the manifest, e.g. ``"pleural_effusion = 1"``.
    """
    from cxrsynth import labels, manifest, shards
    from cxrsynth.imaging import decode_png

    condition = f"WHERE shard IS NOT NULL AND ({where})" if where else "WHERE shard IS NOT NULL"
    frame = manifest.query(root, f'SELECT * FROM "{manifest.check_name(name)}" {condition} ORDER BY key LIMIT {int(n)}')
    if frame.empty:
        raise manifest.ManifestError(f"{name}: no images with shards match {where or 'the dataset'}")
    pngs = dict(shards.images(root, frame))  # raises naming a row whose shard lacks its sample
    rows = frame.to_dict("records")
    images = [decode_png(pngs[r["key"]], key=r["key"], shard=r["shard"]) for r in rows]
    return write_sheet(Path(out), images, labels.findings_matrix(frame), [header(r) for r in rows])
