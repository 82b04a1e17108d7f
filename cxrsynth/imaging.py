"""Image preprocessing and encoding: the paper's pipeline, in one place.

Khosravi et al.: pad to square keeping the aspect ratio, resize to 256x256, equalize the
histogram with 256 bins. Everything works on 8-bit grayscale arrays ``(H, W) uint8``.
DICOM input honours MONOCHROME1 (inverted) and the VOI LUT / windowing.

Input images are untrusted: a PNG of a few hundred KB can claim 13000 x 13000 16-bit
pixels. :func:`read_image` checks the size in the header against a pixel limit before it
decodes anything (:data:`MAX_PIXELS`, 8192 x 8192 by default; ``Preprocess.max_pixels``,
whose default the environment variable ``CXRSYNTH_MAX_PIXELS`` overrides) and treats
PIL's decompression-bomb warning as an error too; such an image is an :class:`ImageError`
with reason ``too_large`` (a reject of that row, not of the ingest). 16-bit pixels are
rescaled to 8 bits in blocks of rows, so no float64 copy of a whole image is ever made.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cxrsynth.config import MAX_IMAGE_SIDE, check_numbers, setting
from cxrsynth.errors import CxrsynthError

DICOM_SUFFIXES = (".dcm", ".dicom")

#: Default limit of an input image's width x height: 8192 x 8192 = 67,108,864 pixels, twice
#: the side of the largest radiograph detectors (43 cm at 0.1 mm is 4300 px). PIL's own
#: limit (``Image.MAX_IMAGE_PIXELS``, 89,478,485) still applies above it, as a reject too.
MAX_PIXELS = 8192 * 8192
#: Environment variable that overrides :data:`MAX_PIXELS` as the default of ``Preprocess.max_pixels``.
MAX_PIXELS_ENV = "CXRSYNTH_MAX_PIXELS"
_BLOCK_PIXELS = 1 << 18  # float64 work per block of rows in to_uint8: 2 MiB per temporary


def default_max_pixels() -> int:
    """:data:`MAX_PIXELS`, or the value of ``CXRSYNTH_MAX_PIXELS`` when that is set."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or raw.strip() == "":
        return MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise CxrsynthError(f"{MAX_PIXELS_ENV}={raw!r} must be a positive whole number of pixels")
    return value


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing parameters; recorded with every dataset version.

    Attributes:
        size: Output side in pixels (square), at most :data:`cxrsynth.config.MAX_IMAGE_SIDE`
            (``--size 100000`` would make every image 10 GB).
        equalize: Histogram equalization with 256 bins after resizing.
        max_pixels: Largest input width x height; a larger image is rejected (``too_large``)
            before it is decoded. Default :data:`MAX_PIXELS` or ``$CXRSYNTH_MAX_PIXELS``.
    """

    kind = "preprocessing"  # how errors name these settings (a class attribute, not a field)

    size: int = setting(256, ge=1, le=MAX_IMAGE_SIDE)
    equalize: bool = True
    max_pixels: int = field(default_factory=default_max_pixels)

    def __post_init__(self) -> None:
        check_numbers(self)  # the configs' one check of numbers (cxrsynth.config)

    def as_dict(self) -> dict:
        return asdict(self)


class ImageError(CxrsynthError):
    """An image that is missing, unreadable, corrupt or too large.

    Attributes:
        reason: Its reason in a rejects ledger: ``missing_image``, ``corrupt_image`` or
            ``too_large``.
    """

    def __init__(self, message: str, reason: str = "corrupt_image") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.reason))


def _check_pixels(path: Path, width: int, height: int, limit: int, frames: int = 1) -> None:
    if width * height * frames > limit:
        what = f"{width} x {height}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageError(f"too large: {path}: {what} = {width * height * frames:,} pixels, over the limit of {limit:,} "
                         f"(Preprocess.max_pixels, ${MAX_PIXELS_ENV})", reason="too_large")


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a PNG, JPEG or DICOM file as an ``(H, W) uint8`` grayscale array.

    Args:
        path: The image file.
        max_pixels: Largest width x height to decode (default :func:`default_max_pixels`);
            checked on the header, before any pixel is decoded.

    Raises:
        ImageError: the file is missing (reason ``missing_image``), larger than the limit or
            a decompression bomb by PIL's measure (``too_large``), or not a decodable
            image (``corrupt_image``).
    """
    path = Path(path)
    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    if not path.is_file():
        raise ImageError(f"missing image: {path}", reason="missing_image")
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return read_dicom(path, max_pixels=limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            _check_pixels(path, im.width, im.height, limit)
            im.load()
            gray = _to_gray(im)
            pixels = np.asarray(gray)  # (H, W) uint8, uint16 or int32: the file's own depth
        del im, gray  # free PIL's copy before rescaling
        return to_uint8(pixels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"too large: {path}: {exc}", reason="too_large") from None
    except Exception as exc:  # PIL and pydicom raise many types for corrupt files
        raise ImageError(f"corrupt image: {path}: {type(exc).__name__}: {exc}") from exc


def _to_gray(im: Image.Image) -> Image.Image:
    if im.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
        return im
    return im.convert("L")


def read_dicom(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a DICOM radiograph: apply the modality and VOI LUT, invert MONOCHROME1.

    The size in the header is checked against ``max_pixels`` before the pixel data is
    decoded; the LUTs run on blocks of rows (they act pixel by pixel), so the float64
    values they produce never exist for the whole image at once.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    ds = pydicom.dcmread(str(path))
    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_pixels(path, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), limit, frames)
    pixels = ds.pixel_array
    image = to_uint8(pixels, lut=lambda block: apply_voi_lut(apply_modality_lut(block, ds), ds, index=0))
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        image = 255 - image
    return image


def to_uint8(pixels: np.ndarray, lut: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Rescale any grayscale array to uint8 (min-max), passing uint8 through unchanged.

    The arithmetic is float64, as ever, but on blocks of rows (:data:`_BLOCK_PIXELS`
    each), so a 16-bit image costs its own 2 bytes and the 1-byte output per pixel, not
    three float64 copies (24 bytes) of the whole image; the result is the same.

    Args:
        pixels: ``(H, W)`` array of any numeric dtype.
        lut: Optional pixel-wise map applied first, block by block (DICOM modality/VOI LUT).
    """
    if pixels.ndim != 2:
        raise ImageError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
    if pixels.dtype == np.uint8 and lut is None:
        return pixels
    step = max(1, _BLOCK_PIXELS // max(pixels.shape[1], 1))
    blocks = [slice(i, i + step) for i in range(0, pixels.shape[0], step)]

    def values(block: slice) -> np.ndarray:
        return np.asarray(lut(pixels[block]) if lut is not None else pixels[block], dtype=np.float64)

    if lut is None:
        lo, hi = float(pixels.min()), float(pixels.max())  # in the input's dtype: no copy
    else:
        extremes = [(float(v.min()), float(v.max())) for v in map(values, blocks)]
        lo, hi = min(e[0] for e in extremes), max(e[1] for e in extremes)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageError("image has non-finite pixel values (NaN or infinity)")
    out = np.zeros(pixels.shape, dtype=np.uint8)
    if hi <= lo:
        return out
    scale = 255.0 / (hi - lo)
    for block in blocks:
        out[block] = np.round((values(block) - lo) * scale).astype(np.uint8)
    return out


def pad_to_square(image: np.ndarray, fill: int = 0) -> np.ndarray:
    """Pad ``(H, W)`` to ``(S, S)``, ``S = max(H, W)``, centring the image."""
    h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.full((side, side), fill, dtype=image.dtype)
    out[top : top + h, left : left + w] = image
    return out


def preprocess(image: np.ndarray, params: Preprocess = Preprocess()) -> np.ndarray:
    """The paper's preprocessing: pad to square, resize, 256-bin histogram equalization.

    Args:
        image: ``(H, W) uint8``.
        params: Size and equalization switch.

    Returns:
        ``(size, size) uint8``.
    """
    square = Image.fromarray(pad_to_square(image))
    if square.size != (params.size, params.size):
        square = square.resize((params.size, params.size), Image.Resampling.BILINEAR, reducing_gap=None)
    if params.equalize:
        square = ImageOps.equalize(square)
    return np.asarray(square, dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """Encode ``(H, W) uint8`` as an 8-bit grayscale PNG (deterministic bytes).

    zlib level 1: measured on 256 px radiographs, 2.3 ms and 33 KiB per image against
    6.6 ms and 28 KiB at the default level 6 — encoding was most of the ingest time.
    """
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


@dataclass(frozen=True)
class PngHeader:
    """What a PNG's IHDR chunk says: size, bit depth and colour type (0 is grayscale)."""

    width: int
    height: int
    depth: int
    colour: int


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(data: bytes) -> PngHeader:
    """The IHDR of PNG bytes, read without decoding (a figure's width, a shard's image side).

    Raises:
        ImageError: ``data`` does not start with a PNG signature and an IHDR chunk.
    """
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ImageError("not a PNG (no PNG signature and IHDR chunk)")
    return PngHeader(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), data[24], data[25])


def png_chunks(data: bytes) -> tuple[list[tuple[bytes, int, int]], int]:
    """Walk a PNG's chunks: ``([(type, start, end), ...] up to and including IEND, end of IEND)``.

    Every chunk's length and CRC are checked; what follows IEND is not read (a caller that
    must refuse trailing bytes compares the returned end with ``len(data)``).

    Raises:
        ImageError: no PNG signature, a chunk cut short, a CRC that fails, or no IEND.
    """
    import zlib

    if not data.startswith(PNG_SIGNATURE):
        raise ImageError("not a PNG (bad signature)")
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise ImageError("truncated PNG chunk")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ImageError(f"truncated PNG chunk {kind!r}")
        if zlib.crc32(data[pos + 4 : end - 4]).to_bytes(4, "big") != data[end - 4 : end]:
            raise ImageError(f"PNG chunk {kind!r} fails its CRC")
        chunks.append((kind, pos, end))
        pos = end
        if kind == b"IEND":
            return chunks, end
    raise ImageError("PNG without IEND (cut short)")


def decode_png(data: bytes, size: int | None = None, *, key: str | None = None,
               shard: str | None = None) -> np.ndarray:
    """Decode PNG bytes to ``(H, W) uint8`` grayscale: the one decoder of stored images.

    Every reader of shard pixels (the loader for the classifier and the generator, the
    FID and audit embeddings, contact sheets) decodes here, so the same bytes give the
    same pixels everywhere.

    Args:
        data: The PNG bytes (a shard member).
        size: Side to resize to (bilinear, to ``(size, size)``) when the image's size
            differs; None keeps the stored size.
        key, shard: Named in the error message when given (the sample and its shard).

    Returns:
        A writable ``(H, W)`` (or ``(size, size)``) uint8 array.

    Raises:
        ImageError: the bytes are not a decodable image (or a decompression bomb); the
            message names ``key`` and ``shard`` when given.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            im = im.convert("L")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on a read-only view)
    except Exception as exc:  # PIL raises many types for corrupt data
        detail = " ".join(str(exc).replace(" <_io.BytesIO object", "").split(" at 0x")[0].split())[:120]
        where = "" if key is None else f"sample {key!r}" + (f" in {shard}" if shard else "") + ": "
        advice = "; `cxrsynth verify` names every damaged shard" if key is not None else ""
        raise ImageError(f"{where}corrupt PNG: {type(exc).__name__}: {detail}{advice}") from exc
