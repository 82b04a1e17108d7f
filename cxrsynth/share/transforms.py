"""The near-copy transform suite: what a memorised training image may look like when a generator emits it.

A copy is rarely pixel-identical: it is shifted, cropped, rotated, rescaled, brighter or
darker, noisier, blurred, re-encoded or resampled. Each transform here maps a ``(S, S)
uint8`` image and a numpy ``Generator`` to a ``(S, S) uint8`` near-copy with parameters
drawn from the ranges below (issue 17's suite). The planted-copy bench
(:mod:`cxrsynth.bench.planted`) plants copies of training images under each transform to
measure what an audit catches; the ``sscd`` embedding trains on the same family, drawn in
torch (:func:`cxrsynth.share.embed.copy_augment`, its shift range ``SscdConfig.shift``).

Geometric transforms fill the pixels they bring in with the image's edge.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))


def _affine(image: np.ndarray, angle: float = 0.0, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Rotate by ``angle`` degrees and scale by ``scale`` about the centre, then translate by ``(dx, dy)`` px.

    Pixels brought in from outside the image repeat its edge (a generator's copy fills its
    canvas; a black band would be a give-away no memorised image has).
    """
    size = image.shape[0]
    margin = int(np.ceil(abs(dx) + abs(dy) + size * (abs(np.sin(np.deg2rad(angle))) + abs(1 - 1 / scale)))) + 2
    image = np.pad(image, margin, mode="edge")
    s = image.shape[0]
    c = (s - 1) / 2
    a = np.deg2rad(angle)
    cos, sin = np.cos(a) / scale, np.sin(a) / scale
    # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f)
    x0, y0 = c + dx, c + dy
    coeffs = (cos, sin, c - cos * x0 - sin * y0, -sin, cos, c + sin * x0 - cos * y0)
    out = _pil(image).transform((s, s), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(out, dtype=np.uint8)[margin : margin + size, margin : margin + size]


def shift(image: np.ndarray, rng: np.random.Generator, most: int = 8) -> np.ndarray:
    """Translate by up to ``most`` (8) px on each axis, at least 2 px on one (a quarter of ``most`` when smaller)."""
    least = min(2, max(1, most // 4))
    while True:
        dx, dy = rng.integers(-most, most + 1, size=2)
        if max(abs(dx), abs(dy)) >= least:
            return _affine(image, dx=float(dx), dy=float(dy))


def crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of 85-95% of the side, resized back (bilinear)."""
    s = image.shape[0]
    side = int(round(s * rng.uniform(0.85, 0.95)))
    top, left = rng.integers(0, s - side + 1, size=2)
    region = _pil(image).crop((int(left), int(top), int(left) + side, int(top) + side))
    return np.asarray(region.resize((s, s), Image.Resampling.BILINEAR), dtype=np.uint8)


def rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate by 2-7 degrees either way about the centre."""
    return _affine(image, angle=float(rng.choice([-1, 1]) * rng.uniform(2.0, 7.0)))


def scale(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zoom by 0.9-1.1 (at least 3% either way) about the centre."""
    return _affine(image, scale=float(1.0 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.10)))


def _levels(image: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.clip(np.rint(fn(image.astype(np.float64) / 255.0) * 255.0), 0, 255).astype(np.uint8)


def brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add 3-10% of the grey range, either way."""
    delta = float(rng.choice([-1, 1]) * rng.uniform(0.03, 0.10))
    return _levels(image, lambda x: x + delta)


def contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stretch or squeeze the grey levels about their mean by 3-10%."""
    factor = float(1.0 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.10))
    return _levels(image, lambda x: (x - x.mean()) * factor + x.mean())


def gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A gamma curve of 0.9-1.1 (at least 3% from 1)."""
    g = float(1.0 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.10))
    return _levels(image, lambda x: x ** g)


def noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, standard deviation 2-8 grey levels."""
    sigma = rng.uniform(2.0, 8.0)
    return np.clip(np.rint(image + rng.normal(0.0, sigma, image.shape)), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of radius 0.5-1.5% of the side (1.3-3.8 px at 256 px)."""
    radius = image.shape[0] * rng.uniform(0.005, 0.015)
    return np.asarray(_pil(image).filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)


def jpeg(image: np.ndarray, rng: np.random.Generator, quality: int = 50) -> np.ndarray:
    """JPEG re-encoding at quality 50."""
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), dtype=np.uint8)


def resample(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down-sampling to 40-60% of the side and back up (bilinear)."""
    s = image.shape[0]
    small = max(2, int(round(s * rng.uniform(0.4, 0.6))))
    down = _pil(image).resize((small, small), Image.Resampling.BILINEAR)
    return np.asarray(down.resize((s, s), Image.Resampling.BILINEAR), dtype=np.uint8)


def preprocess_twice(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The project's own preprocessing (:func:`cxrsynth.imaging.preprocess`: pad, resize, equalise) applied twice.

    As a generated image would be were it re-ingested, twice; the resize goes through a
    side 3-20% off the image's own and back, so it is not the identity.
    """
    from cxrsynth.imaging import Preprocess, preprocess

    s = image.shape[0]
    other = int(round(s * (1.0 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.20))))
    return preprocess(preprocess(image, Preprocess(size=other)), Preprocess(size=s))


#: The suite, by name (the planted-copy bench's rows).
SINGLE: dict[str, Transform] = {
    "shift": shift, "crop": crop, "rotate": rotate, "scale": scale, "brightness": brightness, "contrast": contrast,
    "gamma": gamma, "noise": noise, "blur": blur, "jpeg50": jpeg, "resample": resample, "preprocess_twice": preprocess_twice,
}


def mix(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two different transforms of :data:`SINGLE`, drawn at random, one after the other."""
    first, second = rng.choice(sorted(SINGLE), size=2, replace=False)
    return SINGLE[str(second)](SINGLE[str(first)](image, rng), rng)


#: Every transform the bench plants: the single ones and mixtures of two.
SUITE: dict[str, Transform] = {**SINGLE, "mix2": mix}
