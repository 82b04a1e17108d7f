"""Site specifications of the phantom, registered by name: ``cxp``, ``mimic``, ``emory``.

A :class:`SiteSpec` is pure data: who the patients are (age, sex, race), what their
reports say (per-finding positive and uncertain rates), how they are imaged (view mix,
native size, exposure curve, noise, blur, collimation) and how the site stores its files.

Label rates come from Table 1 of Khosravi et al., "Synthetically enhanced" (eBioMedicine 2024):

- ``cxp``: positives from the CXPTr column. CXPTr excluded every image with an uncertain
  finding, so the uncertain rates come from the CXPTs column (the rest of CheXpert).
- ``mimic``: the MIMIC column (positives and uncertain).
- ``emory``: the ECXR column for positives. Table 1 reports no uncertain counts for
  ECXR; we assume half of MIMIC's uncertain rates (both sites run the CheXpert labeler
  on free-text reports).

Ages are drawn from a normal distribution whose interquartile range is Table 1's; the
female share is Table 1's. Race mixes, view mixes, images per patient and the imaging
chain are plausible values, documented per field, chosen so that testing on another
site is a real distribution shift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cxrsynth.errors import CxrsynthError
from cxrsynth.labels import FINDINGS
from cxrsynth.registry import Registry

# Table 1 (percent of images). Order: FINDINGS. (positive, uncertain).
_CXP_RATES = {
    "No Finding": (11.33, 0.0),
    "Enlarged Cardiomediastinum": (5.24, 6.32),
    "Cardiomegaly": (13.99, 4.71),
    "Lung Opacity": (44.90, 2.88),
    "Lung Lesion": (3.27, 0.71),
    "Edema": (32.52, 9.38),
    "Consolidation": (6.86, 17.66),
    "Pneumonia": (2.22, 11.66),
    "Atelectasis": (18.76, 22.19),
    "Pneumothorax": (12.73, 1.69),
    "Pleural Effusion": (45.62, 6.56),
    "Pleural Other": (0.91, 0.96),
    "Fracture": (4.01, 0.45),
    "Support Devices": (62.50, 0.64),
}
_MIMIC_RATES = {
    "No Finding": (33.34, 0.0),
    "Enlarged Cardiomediastinum": (3.15, 4.11),
    "Cardiomegaly": (19.59, 2.64),
    "Lung Opacity": (22.51, 1.65),
    "Lung Lesion": (2.73, 0.49),
    "Edema": (12.05, 5.85),
    "Consolidation": (4.74, 1.89),
    "Pneumonia": (7.08, 7.99),
    "Atelectasis": (20.05, 4.51),
    "Pneumothorax": (4.62, 0.50),
    "Pleural Effusion": (23.72, 2.55),
    "Pleural Other": (0.86, 0.33),
    "Fracture": (1.96, 0.25),
    "Support Devices": (30.12, 0.11),
}
_ECXR_POS = {
    "No Finding": 47.01,
    "Enlarged Cardiomediastinum": 5.72,
    "Cardiomegaly": 18.27,
    "Lung Opacity": 13.82,
    "Lung Lesion": 4.14,
    "Edema": 5.65,
    "Consolidation": 2.34,
    "Pneumonia": 2.70,
    "Atelectasis": 11.40,
    "Pneumothorax": 3.19,
    "Pleural Effusion": 11.17,
    "Pleural Other": 1.80,
    "Fracture": 1.78,
    "Support Devices": 44.10,
}
_EMORY_RATES = {f: (p, 0.5 * _MIMIC_RATES[f][1]) for f, p in _ECXR_POS.items()}


def _fractions(rates: dict[str, tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    return tuple((rates[f][0] / 100.0, rates[f][1] / 100.0) for f in FINDINGS)


@dataclass(frozen=True)
class Imaging:
    """The imaging chain of a site (all intensities on a 0..1 scale).

    Attributes:
        size: Native canvas ``(H, W)``; each image is then cropped by up to
            ``crop_jitter`` pixels per side, so native sizes vary and are never square.
        crop_jitter: Maximum pixels cropped from each border.
        exposure: Mean and SD of the attenuation gain ``k`` in ``1 - exp(-k * A)``.
        gamma: Mean and SD of the display gamma.
        contrast: Mean and SD of the window contrast.
        noise: Mean and SD of the quantum-noise level.
        blur: Mean and SD of the Gaussian blur (pixels, at native size).
        collimation: Probability of visible collimator shutters.
        collimation_value: Intensity of the shuttered border (1 = white, 0 = black).
        marker: Probability of a burnt-in side marker.
        zoom: Mean and SD of the patient scale in the field of view.
        sharpen: Mean and SD of the unsharp-mask amount of the site's post-processing
            (edge enhancement; 0 = none).
        heel: Mean and SD of the anode-heel gradient (intensity difference, bottom minus
            top, added before noise).
    """

    size: tuple[int, int] = (390, 320)
    crop_jitter: int = 8
    exposure: tuple[float, float] = (1.6, 0.15)
    gamma: tuple[float, float] = (1.0, 0.08)
    contrast: tuple[float, float] = (1.0, 0.08)
    noise: tuple[float, float] = (0.025, 0.008)
    blur: tuple[float, float] = (0.6, 0.2)
    collimation: float = 0.3
    collimation_value: float = 1.0
    marker: float = 0.6
    zoom: tuple[float, float] = (1.0, 0.05)
    sharpen: tuple[float, float] = (0.0, 0.0)
    heel: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class SiteSpec:
    """Everything that distinguishes one phantom site from another.

    Attributes:
        name: Registry name (``cxp``, ``mimic``, ``emory``).
        description: One line for help texts.
        rates: ``(positive, uncertain)`` fractions per finding, in FINDINGS order.
        age_iqr: Interquartile range of age in years (Table 1).
        female: Fraction of female patients (Table 1).
        unknown_sex: Fraction of patients with sex not recorded.
        unknown_age: Fraction of patients with age not recorded.
        races: Race spellings of the site's files and their probabilities.
        studies_per_patient: Mean studies per patient (geometric, at least 1).
        images_per_study: Mean frontal images per study (1 + Poisson).
        ap_fraction: Share of AP views (portable, often supine, magnified heart).
        imaging: The imaging chain.
    """

    name: str
    description: str
    rates: tuple[tuple[float, float], ...]
    age_iqr: tuple[float, float]
    female: float
    unknown_sex: float = 0.0
    unknown_age: float = 0.0
    races: tuple[tuple[str, float], ...] = ()
    studies_per_patient: float = 2.0
    images_per_study: float = 1.05
    ap_fraction: float = 0.5
    imaging: Imaging = field(default_factory=Imaging)

    def rate(self, finding: str) -> tuple[float, float]:
        """``(positive, uncertain)`` fractions of one finding."""
        return self.rates[FINDINGS.index(finding)]


SITES: Registry[SiteSpec] = Registry("phantom site")


def register(spec: SiteSpec) -> SiteSpec:
    """Add a site to :data:`SITES` (names are unique)."""
    if len(spec.rates) != len(FINDINGS):
        raise CxrsynthError(f"site {spec.name!r}: need {len(FINDINGS)} rates, got {len(spec.rates)}")
    return SITES.register(spec.name, spec)


def get_site(name: str) -> SiteSpec:
    """The registered site called ``name``; a loud error lists the known ones."""
    return SITES[name]


register(
    SiteSpec(
        name="cxp",
        description="CheXpert-like: Palo Alto, mostly AP inpatients, CheXpert directory tree",
        rates=_fractions(_CXP_RATES),
        age_iqr=(51.0, 75.0),
        female=0.4602,
        unknown_sex=0.004,
        unknown_age=0.003,
        # CheXpert demographics file spellings; roughly its published mix.
        races=(
            ("White", 0.38),
            ("White, non-Hispanic", 0.18),
            ("Asian", 0.09),
            ("Asian, non-Hispanic", 0.04),
            ("Black or African American", 0.05),
            ("Native Hawaiian or Other Pacific Islander", 0.015),
            ("American Indian or Alaska Native", 0.005),
            ("Other", 0.17),
            ("Unknown", 0.05),
            ("Patient Refused", 0.01),
        ),
        studies_per_patient=2.3,
        images_per_study=1.06,
        ap_fraction=0.85,
        imaging=Imaging(
            size=(390, 320),
            crop_jitter=8,
            exposure=(1.7, 0.15),
            gamma=(1.35, 0.08),
            contrast=(1.0, 0.06),
            noise=(0.02, 0.006),
            blur=(0.5, 0.15),
            collimation=0.2,
            collimation_value=1.0,
            marker=0.7,
            zoom=(1.0, 0.04),
            sharpen=(0.5, 0.15),  # CR/DR edge enhancement
            heel=(0.0, 0.02),
        ),
    )
)

register(
    SiteSpec(
        name="mimic",
        description="MIMIC-CXR-JPG-like: Boston, AP and PA, MIMIC directory tree and tables",
        rates=_fractions(_MIMIC_RATES),
        age_iqr=(52.0, 76.0),
        female=0.4943,
        races=(),  # patients.csv carries no race
        studies_per_patient=3.1,
        images_per_study=1.2,
        ap_fraction=0.605,  # MIMICAP 147,169 vs MIMICPA 96,155 (paper)
        imaging=Imaging(
            size=(400, 336),
            crop_jitter=10,
            exposure=(1.45, 0.15),
            gamma=(1.5, 0.1),
            contrast=(0.95, 0.07),
            noise=(0.03, 0.008),
            blur=(0.8, 0.2),
            collimation=0.35,
            collimation_value=0.0,
            marker=0.5,
            zoom=(0.95, 0.05),
            sharpen=(0.3, 0.1),
            heel=(0.03, 0.03),
        ),
    )
)

register(
    SiteSpec(
        name="emory",
        description="Emory-like in-house set: Atlanta, PNG and DICOM images, one CSV table",
        rates=_fractions(_EMORY_RATES),
        age_iqr=(41.0, 67.0),
        female=0.5415,
        unknown_sex=0.002,
        unknown_age=0.002,
        races=(
            ("African American or Black", 0.50),
            ("Caucasian or White", 0.39),
            ("Asian", 0.04),
            ("Native Hawaiian or Other Pacific Islander", 0.005),
            ("American Indian or Alaskan Native", 0.005),
            ("Unknown", 0.06),
        ),
        studies_per_patient=1.5,
        images_per_study=1.1,
        ap_fraction=0.4,
        imaging=Imaging(
            size=(360, 332),
            crop_jitter=14,
            exposure=(1.2, 0.2),
            gamma=(1.1, 0.12),
            contrast=(1.1, 0.1),
            noise=(0.065, 0.015),
            blur=(2.6, 0.6),  # older CR plates: soft images, no edge enhancement
            collimation=0.5,
            collimation_value=1.0,
            marker=0.4,
            zoom=(0.9, 0.07),
            sharpen=(0.0, 0.0),
            heel=(0.08, 0.04),  # anode heel: brighter towards the feet
        ),
    )
)
