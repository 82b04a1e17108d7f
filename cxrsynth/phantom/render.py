"""Vectorized procedural radiograph renderer.

Each image is drawn as an attenuation map ``A`` over a batch grid ``(B, H, W)`` and then
passed through the site's imaging chain (exposure curve, gamma, blur, quantum noise,
collimation, side marker). Geometry lives in isotropic patient units: ``u`` runs
left-right (0 at the midline, the lungs' lateral walls near +-0.73, the patient's left
on the image's right as in a PA display) and ``v`` runs down from the top of the field
(lung apices near 0.15, diaphragm domes near 1.5). One unit is ``W / 2 * zoom`` pixels.

Each image is drawn in its patient's frame: the patient's persistent anatomy
(:mod:`cxrsynth.phantom.anatomy`: proportions, ribs, clavicles, heart, domes, spine, skin
line, vascular pattern, sternal wires and clips) under the study's positioning (shift, an
in-plane rotation, field of view), inspiration and imaging.

Anatomy: body outline with neck and shoulders, lungs with vessel markings, heart,
mediastinum with trachea and aortic knob, diaphragm domes (right higher) with sharp
costophrenic angles and a gastric bubble, posterior and anterior ribs, clavicles, spine,
breast shadows for women. Normal variation that looks like faint disease (soft-tissue
thickness, patchy basal density, ECG electrodes) keeps faint findings from being trivial.
Findings add their signature with a per-image strength in (0, 1] drawn from a per-finding
distribution with a sizeable faint tail (:data:`_STRENGTH`) and a per-image location (see
:func:`_draw_findings`). Uncertain findings are drawn faintly half of the time.

Speed: grids are broadcast as ``(B, 1, W)`` and ``(B, H, 1)`` wherever a term depends on
one axis only, soft edges are linear ramps (no ``exp``), and findings are drawn only on
the images that carry them. Randomness: scene parameters come from the cohort's
generator; textures and noise come from one generator per image seeded from it, so an
image is the same whatever the chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

from cxrsynth.labels import FINDINGS
from cxrsynth.phantom.anatomy import A as ANAT
from cxrsynth.phantom.anatomy import Anatomy
from cxrsynth.phantom.sites import Imaging

F = {name: k for k, name in enumerate(FINDINGS)}

#: Per-finding strength distribution ``(a, b, lo)``: strength = lo + (1 - lo) * Beta(a, b).
#: Beta(1, 1.6) puts about a third of the cases below 0.2 (faint); lesions and fractures are
#: small, so their floor is higher. "" is the default.
_STRENGTH: dict[str, tuple[float, float, float]] = {
    "": (1.1, 1.5, 0.05),
    "Edema": (1.0, 1.7, 0.02),
    "Pleural Effusion": (1.0, 1.7, 0.02),
    "Pneumothorax": (1.0, 1.6, 0.03),
    "Lung Opacity": (1.0, 1.6, 0.03),
    "Consolidation": (1.0, 1.6, 0.03),
    "Pneumonia": (1.3, 1.3, 0.15),
    "Atelectasis": (1.2, 1.3, 0.1),
    "Pleural Other": (1.3, 1.3, 0.2),
    "Support Devices": (1.0, 1.0, 0.0),
    "Lung Lesion": (1.3, 1.3, 0.3),
    "Fracture": (1.3, 1.3, 0.45),
}
CHUNK = 16  # images per vectorized batch; bounds memory at ~16 x H x W x 4 bytes per array


@dataclass
class Scene:
    """Per-image scene parameters; every field is an array with the image axis first.

    ``strength`` is (N, 14): 0 where a finding is not drawn. ``side`` is (N, 14): -1
    for the image's left (patient's right), +1 for the image's right, 0 for both.
    ``where`` is (N, 14, 2): a location inside the lung, as (lateral 0..1, height 0..1).
    """

    seed: np.ndarray  # (N,) uint64, per-image texture/noise seed
    height: np.ndarray  # (N,) native height after cropping
    width: np.ndarray  # (N,) native width after cropping
    crop: np.ndarray  # (N, 2) top, left crop offsets on the site canvas
    zoom: np.ndarray  # (N,)
    shift: np.ndarray  # (N, 2) horizontal, vertical shift in patient units
    rotation: np.ndarray  # (N,) in-plane rotation of the patient (radians)
    inspiration: np.ndarray  # (N,) diaphragm offset (positive = lower, deeper breath)
    ctr: np.ndarray  # (N,) cardiothoracic ratio as drawn (view, age, cardiomegaly)
    mediastinum: np.ndarray  # (N,) mediastinal width factor
    female: np.ndarray  # (N,) bool
    bone: np.ndarray  # (N,) bone density factor (age, sex)
    ap: np.ndarray  # (N,) bool
    strength: np.ndarray  # (N, 14)
    side: np.ndarray  # (N, 14)
    where: np.ndarray  # (N, 14, 2)
    devices: np.ndarray  # (N, 5) bool: ETT, NG tube, central line, pacemaker, ECG leads
    habitus: np.ndarray  # (N, 2) body soft-tissue thickness, normal lung-base density (0..1 each)
    exposure: np.ndarray  # (N,)
    gamma: np.ndarray  # (N,)
    contrast: np.ndarray  # (N,)
    noise: np.ndarray  # (N,)
    blur: np.ndarray  # (N,)
    sharpen: np.ndarray  # (N,) unsharp-mask amount (site post-processing)
    heel: np.ndarray  # (N,) anode-heel brightness gradient, top to bottom
    collimation: np.ndarray  # (N, 4) top, bottom, left, right shutter widths (fraction)
    marker: np.ndarray  # (N,) bool
    anatomy: np.ndarray  # (N, len(ANATOMY)) the patient's persistent anatomy (cxrsynth.phantom.anatomy)
    implants: np.ndarray  # (N, len(IMPLANTS)) bool: the patient's sternal wires, surgical clips
    texture: np.ndarray  # (N,) uint64: seed of the patient's lung vascular pattern

    def __len__(self) -> int:
        return len(self.seed)

    def take(self, index: np.ndarray | slice) -> "Scene":
        """The scenes at ``index`` (a slice or an index array)."""
        return Scene(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def sample_scene(
    labels: np.ndarray,
    sex: np.ndarray,
    age: np.ndarray,
    view: np.ndarray,
    imaging: Imaging,
    rng: np.random.Generator,
    anatomy: Anatomy,
) -> Scene:
    """Draw the scene parameters of ``N`` images around their patients' anatomy.

    What a patient keeps from study to study comes from ``anatomy``; what is drawn here
    varies per image: positioning (shift, rotation, field of view), inspiration,
    exposure and detector, and the findings the labels ask for.

    Args:
        labels: (N, 14) int8 labels (1, 0, -1).
        sex: (N,) "F", "M" or None.
        age: (N,) years, NaN unknown.
        view: (N,) "AP" or "PA".
        imaging: The site's imaging chain.
        rng: The generator.
        anatomy: (N,) rows: each image's patient's anatomy (:meth:`Anatomy.take`).
    """
    n = labels.shape[0]
    anat = anatomy.values
    H, W = imaging.size
    female = np.asarray(sex == "F", dtype=bool)
    age_years = np.where(np.isnan(age.astype(float)), 60.0, age.astype(float))
    ap = np.asarray(view == "AP", dtype=bool)

    def normal(mean_sd: tuple[float, float], size: int | tuple[int, ...] = n) -> np.ndarray:
        return rng.normal(mean_sd[0], mean_sd[1], size)

    # Strength: per finding, lo + (1 - lo) * Beta(a, b) (see _STRENGTH): most findings have a
    # sizeable faint tail; uncertain findings are drawn at half strength, half the time.
    a_, b_, lo_ = (np.array([_STRENGTH.get(f, _STRENGTH[""])[i] for f in FINDINGS]) for i in range(3))
    raw = lo_ + (1.0 - lo_) * rng.beta(np.broadcast_to(a_, labels.shape), np.broadcast_to(b_, labels.shape))
    unc_drawn = rng.random(labels.shape) < 0.5
    strength = np.where(labels == 1, raw, np.where((labels == -1) & unc_drawn, 0.45 * raw, 0.0))
    strength[:, F["No Finding"]] = 0.0
    side = rng.choice(np.array([-1, 1]), labels.shape)
    both = rng.random(labels.shape) < 0.4  # bilateral effusion / edema / opacity
    side = np.where(both & np.isin(np.arange(14), [F["Pleural Effusion"], F["Lung Opacity"]]), 0, side)
    where = rng.random((n, 14, 2))

    cardiomegaly = strength[:, F["Cardiomegaly"]]
    ctr = anat[:, ANAT["ctr"]] + rng.normal(0.0, 0.008, n) + 0.0012 * np.clip(age_years - 50, 0, None)
    ctr = ctr + np.where(cardiomegaly > 0, 0.03 + 0.1 * cardiomegaly, 0.0)
    ctr = ctr * np.where(ap, 1.12, 1.0)  # AP: divergent beam, heart far from the detector
    ecm = strength[:, F["Enlarged Cardiomediastinum"]]
    mediastinum = anat[:, ANAT["mediastinum"]] + rng.normal(0.0, 0.02, n) + np.where(ecm > 0, 0.06 + 0.3 * ecm, 0.0)
    mediastinum = mediastinum * np.where(ap, 1.08, 1.0)

    devices = rng.random((n, 5)) < np.array([0.4, 0.3, 0.55, 0.15, 0.4])
    sd_drawn = strength[:, F["Support Devices"]] > 0
    none = ~devices.any(axis=1)
    devices[none, 2] = True  # at least a central line
    devices &= sd_drawn[:, None]
    # ECG electrodes are external and are not read as support devices: a confounder.
    devices[:, 4] |= rng.random(n) < 0.15

    crop_top = rng.integers(0, imaging.crop_jitter + 1, n)
    crop_bottom = rng.integers(0, imaging.crop_jitter + 1, n)
    crop_left = rng.integers(0, imaging.crop_jitter + 1, n)
    crop_right = rng.integers(0, imaging.crop_jitter + 1, n)
    collimate = rng.random(n) < imaging.collimation
    shutters = rng.uniform(0.02, 0.1, (n, 4)) * collimate[:, None] * (rng.random((n, 4)) < 0.7)

    return Scene(
        seed=rng.integers(0, 2**63, n, dtype=np.uint64),
        height=H - crop_top - crop_bottom,
        width=W - crop_left - crop_right,
        crop=np.stack([crop_top, crop_left], axis=1),
        zoom=normal(imaging.zoom) * np.where(female, 0.96, 1.0),
        shift=np.stack([rng.normal(0, 0.04, n), rng.normal(0, 0.05, n)], axis=1),
        rotation=rng.normal(0.0, 0.03, n),  # about 1.7 degrees
        inspiration=rng.normal(0.0, 0.05, n) - np.where(ap, 0.06, 0.0),  # supine AP: shallower
        ctr=ctr,
        mediastinum=mediastinum,
        female=female,
        bone=np.clip((1.15 - 0.006 * np.clip(age_years - 30, 0, None) - 0.08 * female) * anat[:, ANAT["bone"]], 0.5, 1.3),
        ap=ap,
        strength=strength.astype(np.float32),
        side=side,
        where=where,
        devices=devices,
        habitus=np.clip(anat[:, [ANAT["soft_tissue"], ANAT["basal_density"]]] + rng.normal(0.0, 0.06, (n, 2)), 0.0, 1.0),
        exposure=normal(imaging.exposure),
        gamma=np.clip(normal(imaging.gamma), 0.5, 2.0),
        contrast=np.clip(normal(imaging.contrast), 0.6, 1.5),
        noise=np.clip(normal(imaging.noise), 0.0, None),
        blur=np.clip(normal(imaging.blur), 0.0, None),
        sharpen=np.clip(normal(imaging.sharpen), 0.0, None),
        heel=normal(imaging.heel),
        collimation=shutters,
        marker=rng.random(n) < imaging.marker,
        anatomy=anat.astype(np.float32),
        implants=anatomy.implants,
        texture=anatomy.texture,
    )


# ----------------------------------------------------------------------------- helpers


# Same bytes on every x86 CPU: numpy dispatches float32 sin/cos/exp/power to SIMD kernels
# chosen by the CPU's instruction set (SSE4 / AVX2 / AVX-512), which differ in the last
# bits, and OpenBLAS picks a GEMM kernel per CPU model. So the renderer uses no BLAS, and
# every transcendental function is taken in float64 and rounded to float32: a float64
# kernel's last-bit differences survive that rounding only for values within 2^-29 of a
# float32 rounding boundary, and then move a pixel only at a uint8 boundary. Elementwise
# +, -, *, /, sqrt are exact in IEEE arithmetic on every CPU. tests/test_phantom.py pins
# the bytes of a small render and re-renders with the SIMD levels and BLAS kernels forced
# down (NPY_DISABLE_CPU_FEATURES, OPENBLAS_CORETYPE).


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _sin(x: np.ndarray) -> np.ndarray:
    return _f32(np.sin(np.asarray(x, dtype=np.float64)))


def _cos(x: np.ndarray) -> np.ndarray:
    return _f32(np.cos(np.asarray(x, dtype=np.float64)))


def _exp(x: np.ndarray) -> np.ndarray:
    return _f32(np.exp(np.asarray(x, dtype=np.float64)))


def _arctan2(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _f32(np.arctan2(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)))


def _power(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    return _f32(np.power(np.asarray(x, dtype=np.float64), np.asarray(p, dtype=np.float64)))


def _ramp(x: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Soft step from 0 (x <= -width/2) to 1 (x >= width/2); cheaper than a sigmoid."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _col(a: np.ndarray) -> np.ndarray:
    """(B,) -> (B, 1, 1) for broadcasting against (B, H, W)."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


@lru_cache(maxsize=32)
def _interp_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation from a coarse axis of ``n_in`` to ``n_out`` points: (lower index, weight of the upper)."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    return lo, (pos - lo).astype(np.float32)


def _upsample(coarse: np.ndarray, H: int, W: int) -> np.ndarray:
    """(B, h, w) coarse field -> (B, H, W) by separable linear interpolation (elementwise, no BLAS)."""
    lo, f = _interp_weights(H, coarse.shape[1])
    rows = coarse[:, lo] * (1 - f)[None, :, None] + coarse[:, lo + 1] * f[None, :, None]  # (B, H, w)
    lo, f = _interp_weights(W, coarse.shape[2])
    return rows[:, :, lo] * (1 - f) + rows[:, :, lo + 1] * f  # (B, H, W)


def _upsample2(x: np.ndarray, H: int, W: int) -> np.ndarray:
    """(B, h, w) -> (B, H, W), H <= 2h, W <= 2w, by 2x linear interpolation (slicing only)."""
    B, h, w = x.shape
    rows = np.empty((B, 2 * h, w), dtype=np.float32)
    rows[:, 0::2] = x
    rows[:, 1:-1:2] = 0.5 * (x[:, :-1] + x[:, 1:])
    rows[:, -1] = x[:, -1]
    out = np.empty((B, 2 * h, 2 * w), dtype=np.float32)
    out[:, :, 0::2] = rows
    out[:, :, 1:-1:2] = 0.5 * (rows[:, :, :-1] + rows[:, :, 1:])
    out[:, :, -1] = rows[:, :, -1]
    return out[:, :H, :W]


def _blob(du: np.ndarray, dv: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Smooth bump (1 - d^2/r^2)^2 inside radius r; du, dv broadcast to (B, H, W)."""
    q = np.clip(1.0 - (du * du + dv * dv) / (radius * radius), 0.0, None)
    return q * q


def _curve(u: np.ndarray, v: np.ndarray, coef: np.ndarray, v0: np.ndarray, v1: np.ndarray, width: float) -> np.ndarray:
    """A thin line ``u = c0 + c1 v + c2 v^2`` for ``v0 < v < v1``; coef is (B, 3)."""
    c0, c1, c2 = (_col(coef[:, i]) for i in range(3))
    x = c0 + (c1 + c2 * v) * v  # (B, H, 1)
    line = np.clip(1.0 - np.abs(u - x) / width, 0.0, None)  # (B, H, W)
    return line * (_ramp(v - _col(v0), 0.02) * _ramp(_col(v1) - v, 0.02))


# ----------------------------------------------------------------------------- drawing


def render(scene: Scene, imaging: Imaging, chunk: int = CHUNK) -> list[np.ndarray]:
    """Render every scene; returns ``(height_i, width_i) uint8`` arrays (MONOCHROME2).

    Args:
        scene: Parameters of N images.
        imaging: The site's imaging chain (canvas size).
        chunk: Images per vectorized batch.
    """
    out: list[np.ndarray] = []
    for start in range(0, len(scene), chunk):
        part = scene.take(slice(start, start + chunk))
        canvas = render_canvas(part, imaging)  # (B, H, W) uint8
        for i in range(len(part)):
            top, left = part.crop[i]
            out.append(np.ascontiguousarray(canvas[i, top : top + part.height[i], left : left + part.width[i]]))
    return out


def render_canvas(scene: Scene, imaging: Imaging) -> np.ndarray:
    """Render a batch on the full site canvas: (B, H, W) uint8.

    Anatomy, findings and the exposure curve are computed on a half-resolution grid
    (4x fewer pixels) and upsampled linearly; quantum noise and collimation are added at
    full resolution. Thin structures are at least two native pixels wide, so nothing is
    lost that the site's blur would not remove anyway.
    """
    H, W = imaging.size
    h, w = (H + 1) // 2, (W + 1) // 2
    rngs = [np.random.default_rng(int(s)) for s in scene.seed]
    A = _attenuation(scene, H, W, h, w, rngs)  # (B, h, w)
    return _expose(A, scene, imaging, rngs)


def _attenuation(scene: Scene, H: int, W: int, h: int, w: int, rngs: list[np.random.Generator]) -> np.ndarray:
    """Attenuation map of a batch on an (h, w) grid covering the (H, W) canvas."""
    scale = _col(W / 2.0 * scene.zoom)  # native pixels per patient unit
    x = (np.arange(w, dtype=np.float32) * (W / w) + 0.5 * (W / w - 1))[None, None, :] - W / 2.0
    y = (np.arange(h, dtype=np.float32) * (H / h) + 0.5 * (H / h - 1))[None, :, None]
    u = x / scale - _col(scene.shift[:, 0])  # (B, 1, w)
    v = y / scale - _col(scene.shift[:, 1]) - 0.08  # (B, h, 1)
    # Positioning: the patient turned in-plane about mid-chest; then the patient's own
    # proportions (thorax width and height) map the field into the patient's frame.
    cos, sin = _col(_cos(scene.rotation)), _col(_sin(scene.rotation))
    u, v = cos * u - sin * (v - 1.0), sin * u + cos * (v - 1.0) + 1.0  # (B, h, w) each
    u = u / _anat(scene, "thorax_width")
    v = 0.15 + (v - 0.15) / _anat(scene, "thorax_height")
    a = np.abs(u)  # distance from the midline
    left = u < 0  # image left = patient's right

    # Lung markings: the patient's own vascular pattern (fixed to the anatomy) plus a
    # little per-study variation (on the image grid).
    own = np.stack([np.random.default_rng(int(t)).standard_normal((26, 22), dtype=np.float32) for t in scene.texture])
    vessels = np.stack([r.standard_normal((26, 22), dtype=np.float32) for r in rngs])
    patches = np.stack([r.standard_normal((10, 9), dtype=np.float32) for r in rngs])
    vessels = 0.9 * _sample_field(own, u, v) + 0.45 * _upsample(vessels, h, w)  # (B, h, w)
    patches = _upsample(patches, h, w)  # (B, h, w)

    # Body: elliptical cross-section, neck flaring into shoulders; the patient's habitus
    # and a flank a little wider than the other (the skin line).
    body = _anat(scene, "body_width") * (1.0 + np.where(left, -1.0, 1.0) * _anat(scene, "skin_asymmetry"))
    half = (0.34 + 0.62 * np.clip(v / _anat(scene, "neck"), 0.0, 1.0) - 0.05 * np.clip(v - 1.8, 0.0, None)) * body
    chord = np.sqrt(np.clip(1.0 - (u / half) ** 2, 0.0, None))  # (B, H, W)
    A = 0.36 * chord + 0.2 * _ramp(half - a, 0.06)

    # Diaphragm: right dome higher; atelectasis pulls its side up (volume loss).
    atel = scene.strength[:, F["Atelectasis"]]
    lift = np.where(atel > 0, 0.01 + 0.06 * atel, 0.0)
    lift_left = np.where(scene.side[:, F["Atelectasis"]] < 0, lift, 0.0)
    lift_right = np.where(scene.side[:, F["Atelectasis"]] > 0, lift, 0.0)
    right_dome = scene.anatomy[:, ANAT["dome_right"]]
    left_dome = right_dome + scene.anatomy[:, ANAT["dome_gap"]]
    d0 = np.where(left, _col(right_dome + scene.inspiration - lift_left), _col(left_dome + scene.inspiration - lift_right))
    dome = d0 + _anat(scene, "dome_curve") * (a - 0.36) ** 2
    below = _ramp(v - dome, 0.02)  # (B, H, W) abdomen

    # Lungs: ellipses cut by the domes (sharp costophrenic angles at the lateral walls).
    ell = ((a - 0.40) / 0.33) ** 2 + ((v - 1.5) / 1.35) ** 2  # (B, H, W)
    lung = _ramp(1.0 - ell, 0.1) * (1.0 - below)

    # Heart and mediastinum displace lung.
    hs = _col(scene.ctr * 0.73)  # heart semi-axis
    hv = (v - _anat(scene, "heart_level") - _col(scene.inspiration)) / _anat(scene, "heart_height")
    heart = _ramp(1.0 - ((u - hs * _anat(scene, "heart_offset")) / hs) ** 2 - hv**2, 0.15)
    mwidth = _col(scene.mediastinum) * (0.11 + 0.04 * np.clip(v, 0.0, 1.2))  # (B, H, 1)
    medi = _ramp(mwidth - np.abs(u - 0.02), 0.04) * _ramp(1.35 - v, 0.1)
    knob = _blob(u - 0.13 * _col(scene.mediastinum), v - _anat(scene, "knob_level"),
                 _col(scene.mediastinum) * _anat(scene, "knob_size"))
    soft = np.maximum(np.maximum(heart, medi), np.minimum(knob * 3.0, 1.0)) * (1.0 - below)
    air = lung * (1.0 - soft)

    # Lung markings: vessels radiating from the hila, wiggled by noise, fading outward.
    angle = _arctan2(v - 1.0, a - 0.12)  # (B, H, W)
    rays = np.abs(_sin(11.0 * angle + 2.5 * vessels))
    hilum = np.clip(1.0 - ((a - 0.15) ** 2 + (v - 1.0) ** 2) / 0.55, 0.1, 1.0)
    markings = np.clip(1.0 - rays * 4.0, 0.0, 1.0) * hilum
    ptx_region = _pneumothorax_region(scene, u, v, ell)
    markings *= 1.0 - ptx_region
    A += -0.3 * air + 0.07 * markings * air + 0.08 * soft * chord
    # Normal variation that mimics faint disease: thick soft tissue greys the whole chest;
    # crowded vessels and overlying soft tissue add patchy density at the lung bases.
    A += 0.07 * _col(scene.habitus[:, 0]) * chord
    basal = _ramp(v - 1.0, 0.6) * np.clip(0.6 + 0.6 * patches, 0.0, None)
    A += 0.045 * _col(scene.habitus[:, 1]) * basal * air
    A -= 0.08 * ptx_region * lung  # hyperlucent, no lung tissue

    # Trachea (air) and gastric bubble.
    A -= 0.12 * _ramp(0.045 - np.abs(u - 0.01), 0.02) * _ramp(0.95 - v, 0.05) * _ramp(v - 0.05, 0.05)
    A -= 0.12 * _blob(u - _anat(scene, "bubble"), (v - dome - 0.1) / 0.6, np.float32(0.09)) * (u > 0)

    # Women: breast shadows over the lower lateral lungs.
    if scene.female.any():
        idx = np.flatnonzero(scene.female)
        size = _col(scene.anatomy[idx, ANAT["breast"]])
        breast = _blob((a[idx] - 0.48) / 1.5, (v[idx] - 1.5) / 1.0, size) * _ramp(v[idx] - 1.35, 0.1)
        A[idx] += 0.1 * breast

    # Bones: spine (the patient's slight scoliosis), posterior and anterior ribs, clavicles.
    bone = _col(scene.bone)
    vert = 0.75 + 0.25 * _cos(2 * np.pi * (v / 0.15 - _anat(scene, "vertebra_phase")))  # bodies and discs
    bow = _anat(scene, "scoliosis") * _sin(np.pi * np.clip((v - 0.1) / 1.9, 0.0, 1.0))
    A += 0.15 * bone * _ramp(_anat(scene, "spine_width") - np.abs(u - bow), 0.03) * vert
    A += _ribs(scene, u, v, a, ell, dome) * 0.09 * bone
    clav = _segment_band(a, v, (0.06, _anat(scene, "clavicle_medial")),
                         (_anat(scene, "clavicle_length"), _anat(scene, "clavicle_lateral")), 0.04)
    A += 0.15 * bone * clav

    A += _draw_findings(scene, u, v, a, ell, dome, air, patches, vessels)
    A += _draw_devices(scene, u, v)
    A += _draw_implants(scene, u, v)
    return A


def _anat(scene: Scene, name: str) -> np.ndarray:
    """The anatomy parameter ``name`` of each image, (B, 1, 1)."""
    return _col(scene.anatomy[:, ANAT[name]])


def _sample_field(coarse: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A (B, gh, gw) coarse field laid over the patient (u in -1.2..1.2, v in -0.2..2.4), read at (u, v).

    Bilinear, by gathering (elementwise; no BLAS): the field moves with the patient's
    anatomy, whatever the study's positioning.
    """
    B, gh, gw = coarse.shape
    gx = np.clip((u + 1.2) * ((gw - 1) / 2.4), 0.0, gw - 1.001)
    gy = np.clip((v + 0.2) * ((gh - 1) / 2.6), 0.0, gh - 1.001)
    ix, iy = gx.astype(np.int64), gy.astype(np.int64)
    fx, fy = (gx - ix).astype(np.float32), (gy - iy).astype(np.float32)
    b = np.arange(B)[:, None, None]
    top = coarse[b, iy, ix] * (1 - fx) + coarse[b, iy, ix + 1] * fx
    bottom = coarse[b, iy + 1, ix] * (1 - fx) + coarse[b, iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _draw_implants(scene: Scene, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The patient's long-lived surgical material: sternotomy wires, surgical clips.

    They stay from study to study (the patient's, :mod:`cxrsynth.phantom.anatomy`) and,
    like ECG leads, are not what the labeler reads as support devices.
    """
    shape = np.broadcast_shapes(u.shape, v.shape)
    out = np.zeros(shape, dtype=np.float32)
    wires, clips = (scene.implants[:, k] for k in range(2))
    if wires.any():  # five twisted loops down the sternum
        i = np.flatnonzero(wires)
        for k in range(5):
            r = np.sqrt((u[i] / 0.045) ** 2 + ((v[i] - 0.85 - 0.16 * k) / 0.026) ** 2)
            out[i] += 0.9 * np.clip(1.0 - np.abs(r - 1.0) / 0.45, 0.0, 1.0)
    if clips.any():  # a cluster of small metal clips
        i = np.flatnonzero(clips)
        cu, cv = _col(scene.anatomy[i, ANAT["clips_u"]]), _col(scene.anatomy[i, ANAT["clips_v"]])
        for du, dv in ((0.0, 0.0), (0.035, 0.05), (-0.03, 0.07), (0.05, -0.04)):
            out[i] += 0.9 * _ramp(0.018 - np.abs(u[i] - cu - du), 0.006) * _ramp(0.008 - np.abs(v[i] - cv - dv), 0.006)
    return out


def _segment_band(a: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], w: float) -> np.ndarray:
    """Bony band of half-width ``w`` along the segment p0 -> p1 (mirrored by ``a``)."""
    (ax, ay), (bx, by) = p0, p1
    dx, dy = bx - ax, by - ay
    t = np.clip(((a - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d2 = (a - ax - t * dx) ** 2 + (v - ay - t * dy) ** 2
    q = np.clip(1.0 - d2 / (w * w), 0.0, None)
    return np.sqrt(q) * (0.7 + 0.3 * q)


def _ribs(scene: Scene, u: np.ndarray, v: np.ndarray, a: np.ndarray, ell: np.ndarray, dome: np.ndarray) -> np.ndarray:
    """Posterior ribs (arcs dropping laterally) and fainter anterior ribs; fractures."""
    period = _anat(scene, "rib_period")
    offset = period * (_anat(scene, "rib_phase") + np.where(u < 0, 0.5, -0.5) * _anat(scene, "rib_tilt"))
    phase = (v - 0.25 - offset + 0.25 * a - _anat(scene, "rib_slope") * a * a) / (period + 0.03 * v)  # one rib per unit
    frac = scene.strength[:, F["Fracture"]]
    gap = None
    if (frac > 0).any():
        idx = np.flatnonzero(frac > 0)
        s = _col(frac[idx])
        side = _col(scene.side[idx, F["Fracture"]])
        fx = side * _col(0.3 + 0.35 * scene.where[idx, F["Fracture"], 0])
        fy = _col(0.55 + 0.7 * scene.where[idx, F["Fracture"], 1])
        near_y = _ramp(0.09 - np.abs(v[idx] - fy - 0.55 * fx * fx), 0.03)
        step = _ramp((u[idx] - fx) * side, 0.01) * near_y  # offset one side of the break
        phase[idx] += (0.15 + 0.3 * s) * step
        gap = (idx, np.clip(1.0 - np.abs(u[idx] - fx) / 0.02, 0.0, 1.0) * near_y, s, fx, fy)
    c = _cos(2 * np.pi * phase)
    rib = np.clip((c - 0.25) / 0.75, 0.0, 1.0)
    rib = np.sqrt(rib) * (1.0 - 0.35 * rib)  # brighter cortex than marrow
    anterior = np.clip((_cos(2 * np.pi * (v - 0.3 - offset + 0.5 * a) / (1.6 * period)) - 0.55) / 0.45, 0.0, 1.0)
    cage = _ramp(1.12 - ell, 0.1) * _ramp(dome + 0.1 - v, 0.1)
    ribs = (rib + 0.35 * anterior) * cage
    if gap is not None:
        idx, g, s, fx, fy = gap
        ribs[idx] *= 1.0 - g
        callus = _blob(u[idx] - fx, (v[idx] - fy - 0.55 * fx * fx) * 1.6, 0.08 + 0.05 * s)
        # Marked cases: a second fracture on the rib below.
        callus += (s > 0.6) * _blob(u[idx] - fx, (v[idx] - fy - 0.17 - 0.55 * fx * fx) * 1.6, 0.07 + 0.04 * s)
        ribs[idx] += (1.6 + 1.6 * s) * callus
    return ribs


def _pneumothorax_region(scene: Scene, u: np.ndarray, v: np.ndarray, ell: np.ndarray) -> np.ndarray:
    """(B, H, W) mask of the pleural space beyond a visceral pleural line (0 elsewhere)."""
    out = np.zeros(ell.shape, dtype=np.float32)
    s = scene.strength[:, F["Pneumothorax"]]
    if not (s > 0).any():
        return out
    idx = np.flatnonzero(s > 0)
    side = _col(scene.side[idx, F["Pneumothorax"]])
    on_side = (u[idx] * side) > 0
    rim = _col(1.0 - (0.07 + 0.38 * s[idx]))  # pleural line at ell = rim
    apical = _ramp(0.9 - v[idx] + 0.6 * _col(s[idx]), 0.3)
    out[idx] = _ramp(ell[idx] - rim, 0.03) * _ramp(1.0 - ell[idx], 0.05) * on_side * apical
    return out


def _draw_findings(
    scene: Scene,
    u: np.ndarray,
    v: np.ndarray,
    a: np.ndarray,
    ell: np.ndarray,
    dome: np.ndarray,
    air: np.ndarray,
    patches: np.ndarray,
    vessels: np.ndarray,
) -> np.ndarray:
    """Attenuation added by the findings, (B, H, W); each drawn only where present.

    Airspace and pleural findings are confined to ``air`` (lung not hidden by the heart
    or mediastinum), so they fill air with soft-tissue density and never exceed it.

    - Lung Opacity: ill-defined patchy haze, 1-2 zones.
    - Lung Lesion: a round, sharp-edged nodule or mass.
    - Edema: bilateral perihilar ("bat wing") haze whose centre and extent vary, plus
      Kerley B lines at the bases in marked cases.
    - Consolidation: homogeneous segmental opacity bounded by a fissure (sharp when
      dense, soft when faint) with air bronchograms.
    - Pneumonia: a cluster of small fluffy acinar nodules in one zone.
    - Atelectasis: a plate-like band above an elevated hemidiaphragm.
    - Pneumothorax: visceral pleural line, apical and narrow when small (markings removed
      beyond it, see above).
    - Pleural Effusion: fluid filling the base with a meniscus climbing the lateral wall;
      small ones only blunt the costophrenic angle; on AP (supine) views part of it
      layers as a graded haze.
    - Pleural Other: pleural thickening / calcified plaque along the lateral wall.
    - Enlarged Cardiomediastinum, Cardiomegaly, Fracture: drawn in the anatomy (a
      fracture: offset rib with callus; a second one on the rib below when marked).
    """
    out = np.zeros(ell.shape, dtype=np.float32)
    st, side, where = scene.strength, scene.side, scene.where

    def present(name: str) -> np.ndarray:
        return np.flatnonzero(st[:, F[name]] > 0)

    def spot(idx: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A point inside the lung: (u, v, side) per image, (b, 1, 1) each."""
        k = F[name]
        sgn = np.where(side[idx, k] == 0, np.where(where[idx, k, 0] > 0.5, 1, -1), side[idx, k])
        lu = _col(sgn * (0.22 + 0.4 * where[idx, k, 0]))
        lv = _col(0.5 + 0.95 * where[idx, k, 1])
        return lu, lv, _col(sgn)

    idx = present("Lung Opacity")
    if idx.size:
        s = _col(st[idx, F["Lung Opacity"]])
        lu, lv, sgn = spot(idx, "Lung Opacity")
        haze = _blob(u[idx] - lu, (v[idx] - lv) / 1.3, 0.22 + 0.12 * s)
        both = _col(side[idx, F["Lung Opacity"]] == 0)
        haze += both * _blob(u[idx] + lu, (v[idx] - lv) / 1.3, 0.2 + 0.1 * s)
        out[idx] += (0.06 + 0.22 * s) * haze * (0.55 + 0.45 * np.clip(patches[idx], -1, 1)) * air[idx]

    idx = present("Lung Lesion")
    if idx.size:
        s = _col(st[idx, F["Lung Lesion"]])
        lu, lv, _ = spot(idx, "Lung Lesion")
        r = 0.055 + 0.09 * s
        d = np.sqrt((u[idx] - lu) ** 2 + (v[idx] - lv) ** 2)
        out[idx] += (0.2 + 0.2 * s) * _ramp(r - d, 0.012) * (0.8 + 0.2 * np.clip(1 - d / r, 0, 1))

    idx = present("Edema")
    if idx.size:
        s = _col(st[idx, F["Edema"]])
        ca = _col(0.12 + 0.16 * where[idx, F["Edema"], 0])  # perihilar centre varies
        cv = _col(0.92 + 0.25 * where[idx, F["Edema"], 1])
        bat = np.clip(1.0 - ((a[idx] - ca) ** 2 / (0.08 + 0.1 * s) + (v[idx] - cv) ** 2 / (0.2 + 0.15 * s)), 0.0, 1.0)
        kerley = np.clip((_cos(2 * np.pi * v[idx] / 0.045) - 0.6) / 0.4, 0.0, 1.0)
        kerley = kerley * _ramp(a[idx] - 0.55, 0.05) * _ramp(v[idx] - dome[idx] + 0.35, 0.05)
        reticular = np.clip(1.0 - np.abs(vessels[idx]) * 3.0, 0.0, 1.0)
        heavy = np.clip((s - 0.4) / 0.6, 0.0, 1.0)  # Kerley lines only in marked edema
        out[idx] += (0.11 * s * bat + 0.035 * heavy * kerley + 0.02 * s * reticular) * air[idx]

    idx = present("Consolidation")
    if idx.size:
        s = _col(st[idx, F["Consolidation"]])
        lu, _, sgn = spot(idx, "Consolidation")
        upper = _col(where[idx, F["Consolidation"], 1] < 0.35)  # upper lobe vs lower lobe
        fissure = _col(0.75 + 0.5 * where[idx, F["Consolidation"], 0])
        edge = 0.03 + 0.1 * (1.0 - s)  # faint consolidations have soft borders
        lobe = np.where(upper > 0, _ramp(fissure - v[idx], edge), _ramp(v[idx] - fissure - 0.15, edge))
        lobe = lobe * ((u[idx] * sgn) > 0.1) * _ramp(0.15 + 0.35 * s - np.abs(u[idx] - lu), 0.12)  # segmental
        bronchi = np.clip(1.0 - np.abs(vessels[idx]) * 6.0, 0.0, 1.0)
        out[idx] += (0.03 + 0.17 * s) * lobe * air[idx] * (1.0 - 0.3 * bronchi)

    idx = present("Pneumonia")
    if idx.size:
        s = _col(st[idx, F["Pneumonia"]])
        lu, lv, _ = spot(idx, "Pneumonia")
        cluster = np.zeros((idx.size, *out.shape[1:]), dtype=np.float32)
        offsets = ((0.0, 0.0), (0.09, 0.06), (-0.08, 0.1), (0.05, -0.1), (-0.06, -0.05), (0.1, 0.16))
        for k, (ou, ov) in enumerate(offsets):
            r = (0.05 + 0.03 * s) * (1.0 - 0.08 * k)
            cluster = np.maximum(cluster, _blob(u[idx] - lu - ou * (0.6 + s), v[idx] - lv - ov * (0.6 + s), r))
        out[idx] += (0.14 + 0.22 * s) * cluster * air[idx]

    idx = present("Atelectasis")
    if idx.size:
        s = _col(st[idx, F["Atelectasis"]])
        sgn = _col(np.where(side[idx, F["Atelectasis"]] < 0, -1, 1))
        on = (u[idx] * sgn) > 0.12
        level = dome[idx] - 0.12 - 0.12 * _col(where[idx, F["Atelectasis"], 1])
        tilt = 0.12 * (_col(where[idx, F["Atelectasis"], 0]) - 0.5)
        band = np.clip(1.0 - np.abs(v[idx] - level - tilt * a[idx]) / (0.018 + 0.02 * s), 0.0, 1.0)
        out[idx] += (0.08 + 0.14 * s) * band * on * air[idx]
        out[idx] += 0.05 * s * on * _ramp(v[idx] - level, 0.05) * air[idx]

    idx = present("Pneumothorax")
    if idx.size:
        s = _col(st[idx, F["Pneumothorax"]])
        side_ = _col(side[idx, F["Pneumothorax"]])
        rim = 1.0 - (0.07 + 0.38 * s)
        line = np.clip(1.0 - np.abs(ell[idx] - rim) / 0.018, 0.0, 1.0)
        line = line * ((u[idx] * side_) > 0) * _ramp(0.9 - v[idx] + 0.6 * s, 0.3)
        out[idx] += (0.06 + 0.1 * s) * line

    idx = present("Pleural Effusion")
    if idx.size:
        s = _col(st[idx, F["Pleural Effusion"]])
        side_ = _col(side[idx, F["Pleural Effusion"]])
        on = np.where(side_ == 0, 1.0, (u[idx] * side_) > 0)
        # Costophrenic angle depth, at the patient's own (lower, left) dome and curvature.
        anat = scene.anatomy[idx]
        low = anat[:, ANAT["dome_right"]] + anat[:, ANAT["dome_gap"]] + anat[:, ANAT["dome_curve"]] * 0.37**2
        cpa = _col(low + scene.inspiration[idx])
        depth = 0.02 + 0.33 * s**1.3  # small effusions only blunt the costophrenic angle
        surface = cpa - depth - (0.05 + 0.2 * s) * np.clip((a[idx] - 0.1) / 0.63, 0, 1) ** 2
        fluid = _ramp(v[idx] - surface, 0.05 + 0.1 * (1.0 - s)) * on
        out[idx] += (0.12 + 0.18 * s) * fluid * air[idx]  # fluid replaces air: the dome disappears into it
        # Supine AP: part of the fluid layers behind the lung as a graded haze.
        layer = _col(scene.ap[idx]) * (0.05 * s) * _ramp(v[idx] - 0.5, 1.0) * on
        out[idx] += layer * air[idx]

    idx = present("Pleural Other")
    if idx.size:
        s = _col(st[idx, F["Pleural Other"]])
        side_ = _col(np.where(side[idx, F["Pleural Other"]] < 0, -1, 1))
        lv = _col(0.6 + 0.8 * where[idx, F["Pleural Other"], 1])
        rim = _ramp(ell[idx] - (0.8 - 0.12 * s), 0.05) * _ramp(1.04 - ell[idx], 0.04)
        along = _ramp(0.3 + 0.2 * s - np.abs(v[idx] - lv), 0.08)
        out[idx] += (0.15 + 0.25 * s) * rim * along * ((u[idx] * side_) > 0)

    return out


def _draw_devices(scene: Scene, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Radiopaque support devices: ETT, NG tube, central line, pacemaker, ECG leads."""
    shape = (len(scene), v.shape[1], u.shape[2])
    out = np.zeros(shape, dtype=np.float32)
    d = scene.devices
    jit = scene.where[:, F["Support Devices"], :]  # (N, 2) per-image placement jitter
    amp = 0.5 + 0.5 * scene.strength[:, F["Support Devices"]]  # (N,) radiopacity (tube material)
    if d[:, 0].any():  # endotracheal tube down the trachea, tip above the carina
        i = np.flatnonzero(d[:, 0])
        coef = np.stack([0.01 + 0.02 * jit[i, 0], np.zeros(i.size), np.zeros(i.size)], axis=1)
        out[i] += _col(0.55 * amp[i]) * _curve(u[i], v[i], coef, np.full(i.size, -0.2), 0.6 + 0.2 * jit[i, 1], 0.022)
    if d[:, 1].any():  # nasogastric tube: midline, veers left below the diaphragm
        i = np.flatnonzero(d[:, 1])
        coef = np.stack([np.full(i.size, -0.03), np.full(i.size, 0.02), 0.09 + 0.03 * jit[i, 0]], axis=1)
        out[i] += _col(0.45 * amp[i]) * _curve(u[i], v[i], coef, np.full(i.size, -0.2), 1.95 + 0.2 * jit[i, 1], 0.014)
    if d[:, 2].any():  # central line: from the neck/subclavian into the SVC
        i = np.flatnonzero(d[:, 2])
        sgn = np.where(jit[i, 0] > 0.5, 1.0, -1.0)
        c2 = sgn * (0.5 + 0.3 * jit[i, 1])
        c1 = -2.0 * c2 * 0.95  # vertex (closest to the midline) near v = 0.95
        c0 = 0.06 * sgn - c1 * 0.95 - c2 * 0.95**2
        coef = np.stack([c0, c1, c2], axis=1)
        out[i] += _col(0.5 * amp[i]) * _curve(u[i], v[i], coef, np.full(i.size, 0.3), 1.0 + 0.1 * jit[i, 1], 0.012)
    if d[:, 3].any():  # pacemaker: generator box in the upper chest and a lead to the heart
        i = np.flatnonzero(d[:, 3])
        bu, bv = _col(0.5 + 0.1 * jit[i, 0]), _col(0.45 + 0.1 * jit[i, 1])
        box = _ramp(0.12 - np.abs(u[i] - bu), 0.02) * _ramp(0.09 - np.abs(v[i] - bv), 0.02)
        coef = np.stack([0.5 + 0.1 * jit[i, 0] + 0.3, -0.55 * np.ones(i.size), np.zeros(i.size)], axis=1)
        out[i] += _col(amp[i]) * (0.9 * box + 0.45 * _curve(u[i], v[i], coef, 0.45 + 0.1 * jit[i, 1], np.full(i.size, 1.45), 0.012))
    if d[:, 4].any():  # ECG electrodes: small rings
        i = np.flatnonzero(d[:, 4])
        rings = np.zeros((i.size, *shape[1:]), dtype=np.float32)
        for eu, ev in ((-0.7, 0.45), (0.7, 0.45), (0.75, 1.75)):
            r = np.sqrt((u[i] - eu - 0.05 * _col(jit[i, 0])) ** 2 + (v[i] - ev) ** 2)
            rings = np.maximum(rings, np.clip(1.0 - np.abs(r - 0.045) / 0.014, 0.0, 1.0))
        out[i] += 0.5 * rings
    return out


def _expose(A: np.ndarray, scene: Scene, imaging: Imaging, rngs: list[np.random.Generator]) -> np.ndarray:
    """Imaging chain: exposure curve, gamma, contrast, blur, noise, collimation -> uint8.

    Args:
        A: (B, h, w) attenuation on the half-resolution grid.
    """
    B = A.shape[0]
    H, W = imaging.size
    k = _col(scene.exposure)
    img = 1.0 - _exp(-k * np.clip(A, 0.0, None))  # (B, h, w), 0 air .. ~1 bone/metal
    img /= 1.0 - _exp(-k * 1.3)
    img = _power(np.clip(img, 0.0, 1.0), _col(scene.gamma))
    img = np.clip(0.5 + (img - 0.45) * _col(scene.contrast) + 0.02, 0.0, 1.0)
    for i in range(B):  # blur sigma is per image; half-resolution grid halves it
        if scene.blur[i] > 0.4:
            img[i] = gaussian_filter(img[i], float(scene.blur[i]) / 2.0, truncate=2.5)
        if scene.sharpen[i] > 0.02:  # unsharp mask (edge enhancement), radius ~3 native pixels
            img[i] += float(scene.sharpen[i]) * (img[i] - gaussian_filter(img[i], 1.5, truncate=2.5))
    img += _col(scene.heel) * (np.arange(img.shape[1], dtype=np.float32)[None, :, None] / img.shape[1] - 0.5)
    img = _upsample2(img, H, W)  # (B, H, W)
    for i in range(B):
        img[i] += (scene.noise[i] * (0.5 + 0.5 * img[i])) * rngs[i].standard_normal((H, W), dtype=np.float32)
    # Collimator shutters: unexposed borders with a soft penumbra.
    c = scene.collimation  # (B, 4) top, bottom, left, right
    yy = np.arange(H, dtype=np.float32)[None, :, None] / H
    xx = np.arange(W, dtype=np.float32)[None, None, :] / W
    inside = (
        _ramp(yy - _col(c[:, 0]), 0.01)
        * _ramp(1.0 - _col(c[:, 1]) - yy, 0.01)
        * _ramp(xx - _col(c[:, 2]), 0.01)
        * _ramp(1.0 - _col(c[:, 3]) - xx, 0.01)
    )
    img = img * inside + imaging.collimation_value * (1.0 - inside)
    if scene.marker.any():  # burnt-in side marker: a bright block with a letter-like notch
        i = np.flatnonzero(scene.marker)
        my, mx = int(0.06 * H), int(0.82 * W)
        img[i, my : my + 14, mx : mx + 10] = 0.97
        img[i, my : my + 10, mx + 3 : mx + 10] = 0.2
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
