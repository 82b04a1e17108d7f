"""Sample a phantom cohort: patients -> studies -> images, demographics and the 14 labels.

Labels come from a Gaussian latent-factor model, one latent score per finding and study::

    z_k = a * s + b_k * g_k + sqrt(1 - a^2 - b_k^2) * e_k

where ``s`` is a shared "how sick" factor (older patients are sicker), ``g_k`` one of
three group factors (cardiac/fluid: enlarged cardiomediastinum, cardiomegaly, edema,
effusion; airspace: opacity, consolidation, pneumonia, atelectasis; none) and ``e_k``
noise. Factors are part patient, part study, so a patient's studies resemble each other.
A finding is positive above ``Phi^-1(1 - pos)`` and uncertain in the band of mass ``unc``
just below it, which reproduces Table 1's marginals by construction. The rules:

- Consolidation and Pneumonia are positive only with Lung Opacity positive (their
  thresholds are recalibrated so the marginals still hold).
- No Finding is positive exactly when the 12 pathologies are all negative (not
  positive, not uncertain); Support Devices may co-occur with it. The shared loading
  ``a`` is calibrated so that No Finding hits its Table 1 rate.
- Edema co-occurs with cardiomegaly and effusion through the cardiac/fluid factor.

All randomness flows from one ``numpy.random.Generator``; the calibration uses its own
fixed-seed generator and is cached per site.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.special import ndtri

from cxrsynth.labels import FINDING_COLUMNS, FINDINGS
from cxrsynth.phantom.sites import SiteSpec, get_site

NF = FINDINGS.index("No Finding")
SD = FINDINGS.index("Support Devices")
OPACITY = FINDINGS.index("Lung Opacity")
NEEDS_OPACITY = (FINDINGS.index("Consolidation"), FINDINGS.index("Pneumonia"))
PATHOLOGIES = tuple(i for i in range(len(FINDINGS)) if i not in (NF, SD))

# Group-factor loadings: (group, b_k); groups 0 = cardiac/fluid, 1 = airspace, -1 = none.
_GROUP = {
    "Enlarged Cardiomediastinum": (0, 0.5),
    "Cardiomegaly": (0, 0.6),
    "Edema": (0, 0.6),
    "Pleural Effusion": (0, 0.45),
    "Lung Opacity": (1, 0.6),
    "Consolidation": (1, 0.7),
    "Pneumonia": (1, 0.7),
    "Atelectasis": (1, 0.3),
}
# Share of the shared loading ``a`` each finding takes (focal findings are less systemic).
_SHARED = {"Lung Lesion": 0.5, "Pneumothorax": 0.7, "Pleural Other": 0.3, "Fracture": 0.3}
# Fraction of negatives written as an explicit 0.0 rather than blank (CheXpert style).
EXPLICIT_NEGATIVE = {
    "No Finding": 0.0,
    "Pneumothorax": 0.35,
    "Pleural Effusion": 0.3,
    "Edema": 0.2,
    "Consolidation": 0.2,
    "Pneumonia": 0.15,
    "Support Devices": 0.05,
}
_DEFAULT_EXPLICIT = 0.1
PATIENT_SHARE = 0.6  # variance share of the latent factors that is per patient
AGE_ON_SICKNESS = 0.35  # correlation of age with the shared factor


@dataclass(frozen=True)
class LabelModel:
    """Calibrated latent thresholds of one site (see module docstring)."""

    shared: float  # the loading ``a``
    t_pos: np.ndarray  # (14,) positive thresholds
    t_unc: np.ndarray  # (14,) uncertain thresholds (<= t_pos)

    def loadings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _loadings(self.shared)


def _loadings(a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-finding ``(shared, group index, group loading)`` arrays, shape (14,)."""
    shared = np.array([a * _SHARED.get(f, 1.0) for f in FINDINGS])
    group = np.array([_GROUP.get(f, (-1, 0.0))[0] for f in FINDINGS])
    load = np.array([_GROUP.get(f, (-1, 0.0))[1] for f in FINDINGS])
    return shared, group, load


def _latents(a: float, s: np.ndarray, g: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Latent scores (N, 14) from the shared (N,), group (N, 2) and noise (N, 14) draws."""
    shared, group, load = _loadings(a)
    gz = np.where(group >= 0, g[:, np.clip(group, 0, None)], 0.0)  # (N, 14)
    rest = np.sqrt(np.clip(1.0 - shared**2 - load**2, 0.0, None))
    return shared * s[:, None] + load * gz + rest * e


def _threshold(z: np.ndarray, t_pos: np.ndarray, t_unc: np.ndarray) -> np.ndarray:
    """Apply thresholds and the rules; returns (N, 14) int8 labels."""
    labels = np.where(z >= t_pos, 1, np.where(z >= t_unc, -1, 0)).astype(np.int8)
    for k in NEEDS_OPACITY:  # positive only with Lung Opacity; otherwise negative
        labels[(labels[:, k] == 1) & (labels[:, OPACITY] != 1), k] = 0
    labels[:, NF] = np.all(labels[:, PATHOLOGIES] == 0, axis=1)
    return labels


def _thresholds(site: SiteSpec, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rates = np.array(site.rates)  # (14, 2)
    pos, unc = rates[:, 0], rates[:, 1]
    t_pos = ndtri(np.clip(1.0 - pos, 1e-9, 1 - 1e-9))
    opacity_pos = z[:, OPACITY] >= t_pos[OPACITY]
    for k in NEEDS_OPACITY:  # P(z_k >= t and opacity positive) = pos_k, empirically
        inside = z[opacity_pos, k]
        share = min(pos[k] / max(opacity_pos.mean(), 1e-9), 1.0)
        t_pos[k] = np.quantile(inside, 1.0 - share) if inside.size else np.inf
    below = np.clip(_ndtr(t_pos) - unc, 1e-9, 1 - 1e-9)
    t_unc = np.minimum(ndtri(below), t_pos)
    return t_pos, t_unc


def _ndtr(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(x)


@lru_cache(maxsize=None)
def label_model(site_name: str, samples: int = 100_000) -> LabelModel:
    """Calibrate the shared loading of a site so No Finding matches Table 1 (cached)."""
    site = get_site(site_name)
    rng = np.random.default_rng(20240101)  # calibration only; fixed so models are stable
    s = rng.standard_normal(samples)
    g = rng.standard_normal((samples, 2))
    e = rng.standard_normal((samples, len(FINDINGS)))
    target = site.rates[NF][0]

    def no_finding_rate(a: float) -> tuple[float, np.ndarray, np.ndarray]:
        z = _latents(a, s, g, e)
        t_pos, t_unc = _thresholds(site, z)
        return float(_threshold(z, t_pos, t_unc)[:, NF].mean()), t_pos, t_unc

    lo, hi = 0.0, 0.66  # more shared loading -> findings cluster -> more No Finding
    for _ in range(22):
        mid = 0.5 * (lo + hi)
        rate, _, _ = no_finding_rate(mid)
        lo, hi = (mid, hi) if rate < target else (lo, mid)
    a = 0.5 * (lo + hi)
    _, t_pos, t_unc = no_finding_rate(a)
    return LabelModel(shared=a, t_pos=t_pos, t_unc=t_unc)


@dataclass
class Cohort:
    """A sampled cohort, one row per image.

    Attributes:
        site: Site name.
        frame: One row per image with columns ``patient`` (0-based), ``study``
            (0-based, global), ``study_of_patient`` (0-based), ``image_of_study``,
            ``split``, ``sex`` ("F", "M" or None), ``age`` (years at the study, NaN
            unknown), ``race`` (the site's spelling, None unknown), ``view`` ("AP"/"PA"),
            ``years_since_first`` and the 14 finding columns (int8, FINDING_COLUMNS).
        explicit: (N, 14) bool, negatives written as an explicit 0.0 (not blank).
    """

    site: str
    frame: pd.DataFrame
    explicit: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """(N, 14) int8 labels in FINDINGS order."""
        return self.frame.loc[:, list(FINDING_COLUMNS)].to_numpy(dtype=np.int8)

    def __len__(self) -> int:
        return len(self.frame)


def _structure(
    site: SiteSpec, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patient, study-of-patient and image-of-study indices of ``n`` images, shape (n,)."""
    per_patient = site.studies_per_patient * site.images_per_study
    guess = int(np.ceil(n / per_patient * 1.5)) + 8
    studies = rng.geometric(1.0 / site.studies_per_patient, size=guess)  # (P,)
    study_patient = np.repeat(np.arange(guess), studies)  # (S,)
    images = 1 + rng.poisson(site.images_per_study - 1.0, size=study_patient.size)  # (S,)
    study = np.repeat(np.arange(study_patient.size), images)[:n]  # (n,)
    if study.size < n:  # vanishingly rare; grow loudly rather than return fewer images
        raise RuntimeError("cohort sampler drew too few images; increase the guess factor")
    first_study = np.concatenate([[0], np.cumsum(studies)[:-1]])
    patient = study_patient[study]
    study_of_patient = study - first_study[patient]
    first_image = np.concatenate([[0], np.cumsum(images)[:-1]])
    image_of_study = np.arange(n) - first_image[study]
    return patient, study, study_of_patient, image_of_study


def _factor(rng: np.random.Generator, patient: np.ndarray, n_patients: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal per-study factor that is part per-patient: shape (S, *shape)."""
    per_patient = rng.standard_normal((n_patients, *shape))[patient]
    own = rng.standard_normal((patient.size, *shape))
    return np.sqrt(PATIENT_SHARE) * per_patient + np.sqrt(1.0 - PATIENT_SHARE) * own


def sample_labels(
    site: SiteSpec, study_patient: np.ndarray, age_z: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Labels per study, (S, 14) int8, from the site's calibrated latent model.

    Args:
        site: The site.
        study_patient: (S,) patient index of each study.
        age_z: (S,) standardized age of each study (0 where unknown).
        rng: The generator.
    """
    model = label_model(site.name)
    n_patients = int(study_patient.max()) + 1 if study_patient.size else 0
    s = _factor(rng, study_patient, n_patients, ())
    s = AGE_ON_SICKNESS * np.clip(age_z, -3, 3) + np.sqrt(1 - AGE_ON_SICKNESS**2) * s
    g = _factor(rng, study_patient, n_patients, (2,))
    e = _factor(rng, study_patient, n_patients, (len(FINDINGS),))
    z = _latents(model.shared, s, g, e)
    return _threshold(z, model.t_pos, model.t_unc)


def sample_cohort(site: SiteSpec | str, n: int, rng: np.random.Generator) -> Cohort:
    """Sample ``n`` images of a site with their patients, studies, demographics and labels.

    Args:
        site: A :class:`SiteSpec` or a registered site name.
        n: Number of images.
        rng: The only source of randomness.

    Returns:
        The cohort (labels per study; all images of a study share them).
    """
    site = get_site(site) if isinstance(site, str) else site
    if n < 1:
        raise ValueError(f"need at least one image, got n={n}")
    patient, study, study_of_patient, image_of_study = _structure(site, n, rng)
    n_patients = int(patient.max()) + 1
    n_studies = int(study.max()) + 1
    study_patient = np.zeros(n_studies, dtype=np.int64)
    study_patient[study] = patient
    study_rank = np.zeros(n_studies, dtype=np.int64)
    study_rank[study] = study_of_patient

    # Demographics per patient; age grows by 0-2 years per follow-up study.
    q1, q3 = site.age_iqr
    mu, sd = 0.5 * (q1 + q3), (q3 - q1) / 1.349
    base_age = np.clip(np.round(rng.normal(mu, sd, n_patients)), 18, 95)
    age_known = rng.random(n_patients) >= site.unknown_age
    female = rng.random(n_patients) < site.female
    sex_known = rng.random(n_patients) >= site.unknown_sex
    if site.races:
        names, probs = zip(*site.races)
        p = np.array(probs) / np.sum(probs)
        race = np.array(names, dtype=object)[rng.choice(len(names), n_patients, p=p)]
    else:
        race = np.full(n_patients, None, dtype=object)
    gaps = rng.exponential(0.5, n_studies)
    gaps[study_rank == 0] = 0.0
    years = _cumsum_by_group(gaps, study_patient)  # (S,) years since the first study
    study_age = base_age[study_patient] + np.floor(years)
    age_z = np.where(age_known[study_patient], (study_age - mu) / sd, 0.0)

    labels = sample_labels(site, study_patient, age_z, rng)  # (S, 14)
    explicit_rate = np.array([EXPLICIT_NEGATIVE.get(f, _DEFAULT_EXPLICIT) for f in FINDINGS])
    explicit = rng.random(labels.shape) < explicit_rate  # (S, 14)

    # View per study: devices (ICU, portable) make AP more likely, keeping the mix.
    has_sd = labels[:, SD] == 1
    q = has_sd.mean()
    p_ap_sd = min(0.98, site.ap_fraction + 0.5 * (1.0 - site.ap_fraction))
    p_ap_rest = float(np.clip((site.ap_fraction - p_ap_sd * q) / max(1.0 - q, 1e-9), 0.02, 1.0))
    view = np.where(rng.random(n_studies) < np.where(has_sd, p_ap_sd, p_ap_rest), "AP", "PA")

    split = _split(site, n_patients, rng)  # (P,)
    study_split = split[study_patient]
    valid = study_split == "valid"
    if valid.any():  # CheXpert's valid.csv: radiologist labels, 0/1 only, no blanks
        resolve = rng.random(labels.shape) < 0.35
        v = labels[valid]
        v[v == -1] = np.where(resolve[valid][v == -1], 1, 0)
        for k in NEEDS_OPACITY:
            v[(v[:, k] == 1) & (v[:, OPACITY] != 1), OPACITY] = 1
        v[:, NF] = np.all(v[:, PATHOLOGIES] == 0, axis=1)
        labels[valid] = v
        explicit[valid] = True

    frame = pd.DataFrame(
        {
            "patient": patient,
            "study": study,
            "study_of_patient": study_of_patient,
            "image_of_study": image_of_study,
            "split": study_split[study],
            "sex": np.where(sex_known, np.where(female, "F", "M"), None)[patient],
            "age": np.where(age_known[patient], study_age[study], np.nan),
            "race": race[patient],
            "view": view[study],
            "years_since_first": years[study],
        }
    )
    for k, column in enumerate(FINDING_COLUMNS):
        frame[column] = labels[study, k].astype(np.int8)
    return Cohort(site=site.name, frame=frame, explicit=explicit[study])


def _cumsum_by_group(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``values`` restarting at each new (sorted, contiguous) group."""
    total = np.cumsum(values)
    start = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    offset = np.repeat(total[start] - values[start], np.diff(np.r_[start, group.size]))
    return total - offset


def _split(site: SiteSpec, n_patients: int, rng: np.random.Generator) -> np.ndarray:
    """Patient-level split: CheXpert's train/valid, MIMIC's train/validate/test, else none."""
    u = rng.random(n_patients)
    if site.name == "cxp":  # valid patients come last, numbering continues (as CheXpert)
        n_valid = int(round(0.05 * n_patients)) if n_patients >= 4 else 0
        split = np.full(n_patients, "train", dtype=object)
        if n_valid:
            split[-n_valid:] = "valid"
        return split
    if site.name == "mimic":
        return np.where(u < 0.9, "train", np.where(u < 0.95, "validate", "test")).astype(object)
    return np.full(n_patients, None, dtype=object)
