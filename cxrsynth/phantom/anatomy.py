"""Persistent anatomy of phantom patients: what makes two radiographs of one patient recognisable.

A real patient brings the same body to every study: thorax width and height, the slope and
spacing of the ribs, the clavicles, the heart's and mediastinum's shape, the domes of the
diaphragm, the spine (a slight scoliosis), the skin line, the lung's vascular pattern and
long-lived surgical material (sternotomy wires, surgical clips). Packhäuser et
al. (Sci Rep 2022) re-identify patients across radiographs from exactly such cues, and the
memorisation audit's re-identification figure (issue 17) can only be validated on a phantom
whose patients carry them.

:func:`sample_anatomy` draws one row of :data:`ANATOMY` parameters per patient, each from
the patient's own generator (seeded by the phantom's seed, the site and the patient's
index), so a patient's anatomy does not depend on how many images or patients are drawn
around it. Each study then varies around it (:func:`cxrsynth.phantom.render.sample_scene`:
positioning shift and rotation, inspiration, exposure, detector, findings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Per-patient anatomy parameters (columns of :attr:`Anatomy.values`), in patient units
#: (see :mod:`cxrsynth.phantom.render`) or as factors around 1.
ANATOMY: tuple[str, ...] = (
    "thorax_width",  # lateral scale of the lungs and chest wall (factor)
    "thorax_height",  # vertical scale below the apices (factor)
    "body_width",  # soft-tissue outline beyond the rib cage (factor): habitus
    "neck",  # where the neck flares into the shoulders (v)
    "soft_tissue",  # soft-tissue thickness greying the chest (0..1)
    "basal_density",  # normal patchy density at the lung bases (0..1)
    "rib_period",  # spacing of the posterior ribs
    "rib_slope",  # how steeply the posterior ribs drop laterally
    "rib_phase",  # vertical offset of the rib pattern (fraction of a period)
    "rib_tilt",  # left-right difference of the rib offset
    "clavicle_medial",  # height of the clavicles' medial ends
    "clavicle_lateral",  # height of their lateral ends
    "clavicle_length",  # lateral reach
    "ctr",  # cardiothoracic ratio at 50 years, no cardiomegaly
    "heart_height",  # vertical semi-axis of the heart
    "heart_offset",  # share of the heart left of the midline
    "heart_level",  # vertical position of the heart
    "mediastinum",  # mediastinal width factor
    "knob_level",  # height of the aortic knob
    "knob_size",  # size of the aortic knob
    "dome_right",  # right hemidiaphragm at rest (v)
    "dome_gap",  # how much lower the left dome sits
    "dome_curve",  # curvature of the domes
    "scoliosis",  # lateral bow of the spine (u at mid-chest)
    "spine_width",  # half-width of the vertebral bodies
    "vertebra_phase",  # vertical offset of the vertebrae (fraction of a level)
    "bone",  # bone density factor
    "skin_asymmetry",  # one flank's outline wider than the other (factor - 1)
    "bubble",  # lateral position of the gastric bubble
    "breast",  # breast shadow size (drawn for women)
    "clips_u",  # surgical clips position (lateral, signed) ...
    "clips_v",  # ... and height
)
A = {name: k for k, name in enumerate(ANATOMY)}
#: Long-lived surgical material (columns of :attr:`Anatomy.implants`): not read as support
#: devices by the labeler (like ECG leads, a confounder), so the labels are unchanged. (A
#: chest port would be: reports name it and the labeler reads it as a support device.)
IMPLANTS: tuple[str, ...] = ("sternal_wires", "clips")
#: Prevalence of each implant among patients.
IMPLANT_RATE = (0.08, 0.1)


@dataclass
class Anatomy:
    """Per-patient (or, after :meth:`take`, per-image) anatomy.

    Attributes:
        values: (P, len(ANATOMY)) float32, columns :data:`ANATOMY`.
        implants: (P, len(IMPLANTS)) bool, columns :data:`IMPLANTS`.
        texture: (P,) uint64 seeds of the patient's own lung vascular pattern.
    """

    values: np.ndarray
    implants: np.ndarray
    texture: np.ndarray

    def take(self, index: np.ndarray) -> "Anatomy":
        """The rows at ``index`` (e.g. each image's patient)."""
        return Anatomy(self.values[index], self.implants[index], self.texture[index])

    def __len__(self) -> int:
        return len(self.texture)


def _one_patient(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """One patient's anatomy row, implant flags and texture seed."""
    z = rng.standard_normal(len(ANATOMY))
    u = rng.random(len(ANATOMY))
    row = {
        "thorax_width": 1.0 + 0.09 * z[0],
        "thorax_height": 1.0 + 0.08 * z[1],
        "body_width": 1.0 + 0.08 * z[2],
        "neck": 0.3 + 0.04 * z[3],
        "soft_tissue": u[4],
        "basal_density": u[5],
        "rib_period": 0.15 * (1.0 + 0.07 * z[6]),
        "rib_slope": 0.85 * (1.0 + 0.2 * z[7]),
        "rib_phase": u[8],
        "rib_tilt": 0.12 * z[9],
        "clavicle_medial": 0.45 + 0.05 * z[10],
        "clavicle_lateral": 0.3 + 0.08 * z[11],
        "clavicle_length": 0.7 + 0.05 * z[12],
        "ctr": 0.44 + 0.03 * z[13],
        "heart_height": 0.4 * (1.0 + 0.1 * z[14]),
        "heart_offset": 0.33 + 0.08 * z[15],
        "heart_level": 1.52 + 0.06 * z[16],
        "mediastinum": 1.0 + 0.08 * z[17],
        "knob_level": 0.72 + 0.05 * z[18],
        "knob_size": 0.085 * (1.0 + 0.15 * z[19]),
        "dome_right": 1.48 + 0.06 * z[20],
        "dome_gap": 0.07 + 0.04 * z[21],
        "dome_curve": 2.4 * (1.0 + 0.2 * z[22]),
        "scoliosis": 0.05 * z[23],
        "spine_width": 0.085 * (1.0 + 0.1 * z[24]),
        "vertebra_phase": u[25],
        "bone": 1.0 + 0.07 * z[26],
        "skin_asymmetry": 0.04 * z[27],
        "bubble": 0.32 + 0.05 * z[28],
        "breast": 0.2 * (1.0 + 0.2 * z[29]),
        "clips_u": np.where(u[30] < 0.5, -1.0, 1.0) * (0.1 + 0.4 * rng.random()),
        "clips_v": 0.7 + 0.8 * rng.random(),
    }
    implants = rng.random(len(IMPLANTS)) < np.array(IMPLANT_RATE)
    texture = int(rng.integers(0, 2**63, dtype=np.uint64))
    return np.array([row[name] for name in ANATOMY], dtype=np.float64), implants, texture


def sample_anatomy(n_patients: int, entropy: tuple[int, ...]) -> Anatomy:
    """Draw ``n_patients`` patients' anatomy, patient ``p`` from ``default_rng((*entropy, p))``.

    Args:
        n_patients: Number of patients.
        entropy: The phantom's seed material (seed and site); patient ``p``'s generator
            is seeded with it and ``p``, so its anatomy does not depend on ``n_patients``.
    """
    rows = [_one_patient(np.random.default_rng([*map(int, entropy), p])) for p in range(n_patients)]
    if not rows:
        return Anatomy(np.zeros((0, len(ANATOMY)), np.float32), np.zeros((0, len(IMPLANTS)), bool), np.zeros(0, np.uint64))
    values, implants, texture = zip(*rows)
    return Anatomy(np.stack(values).astype(np.float32), np.stack(implants), np.array(texture, dtype=np.uint64))
