"""Fréchet distances between two image sets, offline: FID and the classifier distance.

* :func:`frechet_distance`: ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` from
  feature means and covariances, as in Heusel et al. 2017 (the trace of the matrix
  square root from symmetric eigenvalues, see :func:`_trace_sqrt_product`).
* FID: features are the 2048-d pool of torchvision's ``inception_v3`` with weights
  loaded from a file the user provides (:func:`inception_extractor`); nothing is
  downloaded. Note: torchvision's ImageNet Inception is not the TF-FID Inception
  (pytorch-fid's ``pt_inception-2015-12-05`` weights differ in a few layers), so
  values are comparable within cxrsynth, not with published FIDs (e.g. the paper's 6.4).
* Classifier Fréchet distance: any feature extractor (:func:`features`), e.g. the pooled
  pre-logits features of a classifier trained on the real data: a ``cxrsynth classifier
  train`` output directory (:func:`cxrsynth.classify.model.trained_classifier_extractor`,
  built on ``Classifier.features``) or a timm state dict (:func:`classifier_extractor`).

Extractors map uint8 grayscale batches ``(B, 1, H, W)`` to ``(B, D)`` features; callers
bring the extractor (this module imports no stage package) and either the batches
(:func:`fid_from_images`) or two datasets, read by the loader (:func:`dataset_fid`,
:func:`dataset_images`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrsynth.errors import CxrsynthError


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set.

    ``factor`` (N, D), kept only when N < D: the centred features / sqrt(N - 1), so that
    ``sigma = factor.T @ factor``; it lets :func:`frechet_distance` work in N x N.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    factor: np.ndarray | None = None

    @classmethod
    def from_features(cls, feats: np.ndarray) -> "FeatureStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise CxrsynthError(f"need (N >= 2, D) features, got {feats.shape}")
        mu = feats.mean(0)
        factor = (feats - mu) / np.sqrt(len(feats) - 1)  # (N, D)
        return cls(mu, factor.T @ factor, len(feats), factor if len(feats) < feats.shape[1] else None)


def _trace_sqrt_product(a: FeatureStats, b: FeatureStats) -> float:
    """Tr((S1 S2)^{1/2}) for PSD covariances, without a (possibly singular) sqrtm.

    The eigenvalues of S1 S2 are those of the symmetric PSD S1^{1/2} S2 S1^{1/2}, so the
    trace is the sum of their square roots (clipped at 0 against round-off). With
    feature factors (S = F^T F, N < D) they are the squared singular values of
    F1 F2^T (N1 x N2), so the trace is its nuclear norm: exact and cheap for few images.
    """
    if a.factor is not None and b.factor is not None:
        return float(np.linalg.svd(a.factor @ b.factor.T, compute_uv=False).sum())
    w, v = np.linalg.eigh(a.sigma)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^{1/2}
    m = root @ b.sigma @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians fitted to features.

    Same value as the usual ``scipy.linalg.sqrtm`` formula (pytorch-fid) where that is
    well conditioned; unlike it, also exact when N < D makes the covariances singular
    (sqrtm then returns large imaginary parts and takes minutes at D = 2048).
    """
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * _trace_sqrt_product(a, b))


class _InceptionPool(torch.nn.Module):
    """uint8 grayscale (B, 1, H, W) -> 2048-d Inception-v3 pool features."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise CxrsynthError(f"expected uint8 images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.float().div(255.0).expand(-1, 3, -1, -1)  # (B, 3, H, W)
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)  # (B, 2048)


def inception_extractor(weights: Path) -> torch.nn.Module:
    """torchvision ``inception_v3`` with weights from a local file (never downloaded).

    Args:
        weights: A state dict of ``torchvision.models.inception_v3`` (e.g. the file
            ``inception_v3_google-0cc3c7bd.pth`` copied from a machine with internet).
    """
    from torchvision.models import inception_v3

    from cxrsynth.safeload import check_finite, load_torch

    weights = Path(weights)
    if not weights.exists():
        raise CxrsynthError(f"Inception weights not found: {weights} (cxrsynth never downloads them)")
    # transform_input=True, as torchvision sets it for these weights: the Google-ported
    # network expects (x - 0.5) / 0.5 inputs and converts from ImageNet normalisation.
    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    state = load_torch(weights, "inception_v3 state dict")
    check_finite(state, str(weights))
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:  # not a dict, wrong keys or shapes
        raise CxrsynthError(f"{weights} is not a torchvision inception_v3 state dict: {str(exc).splitlines()[0]}") from None
    net.fc = torch.nn.Identity()
    net.aux_logits, net.AuxLogits = False, None
    return _InceptionPool(net).eval()


@torch.no_grad()
def features(extractor: torch.nn.Module, batches: Iterable[torch.Tensor], device: str = "cpu") -> np.ndarray:
    """Stack ``extractor(batch)`` over uint8 image batches (B, 1, H, W) -> (N, D)."""
    extractor = extractor.to(device).eval()
    out = [extractor(b.to(device)).flatten(1).double().cpu().numpy() for b in batches]
    return np.concatenate(out) if out else np.zeros((0, 0))


def fid_from_images(
    extractor: torch.nn.Module, real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor], device: str = "cpu"
) -> float:
    """Fréchet distance between the features of two image streams."""
    return feature_distance(features(extractor, real, device), features(extractor, fake, device))


def dataset_images(root: Path, name: str, split: str | None, size: int, batch: int = 64, limit: int | None = None):
    """uint8 image batches (B, 1, size, size) of a dataset's shards (the first ``limit`` keys), in shard order."""
    from cxrsynth import loader

    frame = loader.select(root, name, split, exclude_uncertain=False).sort_values("key")
    if limit is not None:
        frame = frame.iloc[:limit]
    config = loader.LoaderConfig(batch_size=batch, image_size=size, train=False, streams=1, uint8=True)
    for b in loader.ShardLoader(root, frame, config).batches():  # one stream: shards sorted, tar order
        yield b["image"]


def dataset_fid(
    extractor: torch.nn.Module, root: Path, real: str, synthetic: str, *, size: int, real_split: str | None = None,
    limit: int | None = None, device: str = "cpu",
) -> float:
    """Fréchet distance, in ``extractor``'s features, between dataset ``real`` (its ``real_split``)
    and every image of ``synthetic``, each read at ``size`` px (at most ``limit`` images a side)."""
    a = dataset_images(root, real, real_split, size, limit=limit)
    b = dataset_images(root, synthetic, None, size, limit=limit)
    return fid_from_images(extractor, a, b, device=device)


def feature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two feature sets ``(N1, D)`` and ``(N2, D)``."""
    return frechet_distance(FeatureStats.from_features(a), FeatureStats.from_features(b))


class _GrayClassifier(torch.nn.Module):
    """uint8 (B, 1, H, W) → pooled features of a timm classifier (head removed)."""

    def __init__(self, net: torch.nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise CxrsynthError(f"expected (B, 1, H, W) grayscale images, got {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0  # (B, 1, H, W) in [-1, 1]
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)  # (B, D)


def classifier_extractor(model: str, checkpoint: Path, size: int = 256) -> torch.nn.Module:
    """Features of a timm classifier trained on the real data, from a local checkpoint.

    Args:
        model: timm model name (e.g. ``convnext_base``), built with one input channel.
        checkpoint: Its state dict (a plain state dict, or a dict holding one under
            ``state_dict`` / ``model`` / ``ema``); the classification head is dropped.
        size: Input side the classifier was trained at.
    """
    import timm

    from cxrsynth.safeload import check_finite, load_torch

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CxrsynthError(f"classifier checkpoint not found: {checkpoint}")
    state = load_torch(checkpoint, "classifier checkpoint")
    for key in ("ema", "state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CxrsynthError(f"{checkpoint} holds a {type(state).__name__}, not a state dict")
    check_finite(state, str(checkpoint))
    if not timm.is_model(model):
        raise CxrsynthError(f"unknown timm model {model!r} (timm.list_models() lists the names)")
    net = timm.create_model(model, pretrained=False, num_classes=0, in_chans=1)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes of another model
        raise CxrsynthError(f"{checkpoint} does not fit timm model {model}: {str(exc).splitlines()[-1].strip()}") from None
    head = net.default_cfg.get("classifier", "")
    unexpected = [k for k in unexpected if not (head and k.startswith(head))]
    if missing or unexpected:
        raise CxrsynthError(f"{checkpoint} does not fit timm model {model}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return _GrayClassifier(net, size).eval()
