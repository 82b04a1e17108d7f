"""The classifier network: any timm model with 14 outputs and one input channel.

:class:`Classifier` wraps the timm network and maps the loader's [0, 1] pixels to
[-1, 1] (as the paper's code does) before it; it returns one logit per finding of
:data:`cxrsynth.labels.FINDINGS`, and :meth:`Classifier.features` the pooled features
its last linear layer reads (the one definition of a classifier's image features: the
Fréchet distances of :mod:`cxrsynth.evaluate.frechet`, the study's replica distance and
the audit's ``classifier:DIR`` embedding all use it).
The saved weights (``model.safetensors``) are the timm network's plain state dict, so
``timm.create_model(name, num_classes=14, in_chans=1)`` loads them directly.

Pretrained weights come only from a local file (:func:`load_pretrained`): a safetensors
file or a torch state dict (read with ``weights_only=True``), possibly nested under
``state_dict`` / ``model`` / ``ema`` and prefixed ``module.``; a 3-channel stem is
summed to one channel by timm's ``adapt_input_conv`` and a head of another size is
dropped (re-initialised). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from cxrsynth.classify.presets import ClassifierConfig
from cxrsynth.errors import CxrsynthError
from cxrsynth.labels import FINDINGS

WEIGHTS = "model.safetensors"
META = "classifier.json"
#: timm's model config (``timm.create_model("local-dir:DIR", pretrained=True)`` reads it with WEIGHTS).
TIMM_CONFIG = "config.json"


class Classifier(torch.nn.Module):
    """``(B, 1, S, S)`` pixels in [0, 1] → ``(B, 14)`` finding logits."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    @staticmethod
    def scale(images: torch.Tensor) -> torch.Tensor:
        """The classifier's input scaling: pixels in [0, 1] → [-1, 1]."""
        return images * 2.0 - 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.scale(images))  # (B, 14)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S)`` pixels in [0, 1] → ``(B, D)`` pooled pre-head features.

        timm's ``forward_head(forward_features(x), pre_logits=True)``: what the last linear
        layer maps to the 14 logits, on the same input scaling as :meth:`forward`.
        """
        return self.net.forward_head(self.net.forward_features(self.scale(images)), pre_logits=True)  # (B, D)


class ImageFeatures(torch.nn.Module):
    """uint8 ``(B, 1, H, W)`` → :meth:`Classifier.features` at the classifier's side ``size``.

    The feature extractor of a trained classifier for :mod:`cxrsynth.evaluate.frechet`:
    pixels are divided by 255 (as the loader gives them) and resized bilinearly when
    their side is not ``size``.
    """

    def __init__(self, model: Classifier, size: int, classifier_id: str | None = None) -> None:
        super().__init__()
        self.model, self.size, self.classifier_id = model, size, classifier_id

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise CxrsynthError(f"expected (B, 1, H, W) grayscale images, got {tuple(images.shape)}")
        x = images.float() / 255.0  # (B, 1, H, W) in [0, 1], as the classifier's loader gives it
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model.features(x)  # (B, D)


def trained_classifier_extractor(directory: str | Path, size: int | None = None) -> ImageFeatures:
    """Pooled features of a ``cxrsynth classifier train`` output (``model.safetensors`` + ``classifier.json``).

    Args:
        directory: The classifier's output directory.
        size: Input side (default: the side the classifier was trained at); the extractor's
            ``size`` attribute holds the one used (and ``classifier_id`` the weights' id).
    """
    model, meta = load_classifier(directory, "cpu")
    side = int(meta["config"]["image_size"]) if size is None else int(size)
    return ImageFeatures(model, side, meta.get("classifier_id")).eval()


def timm_config(config: ClassifierConfig) -> dict[str, Any]:
    """The ``config.json`` with which timm alone rebuilds a trained classifier from its folder.

    ``timm.create_model("local-dir:DIR", pretrained=True)`` builds ``config.model`` with one
    input channel and 14 outputs and loads ``model.safetensors`` (a plain timm state dict);
    ``timm.data.resolve_data_config(model=m)`` + ``create_transform`` then give the input
    pipeline :class:`Classifier` expects: grayscale pixels resized bilinearly to the
    training side, scaled to [0, 1], normalised with mean 0.5 and std 0.5 (that is, to
    [-1, 1], :meth:`Classifier.scale`). The outputs are logits of :data:`FINDING_COLUMNS`
    in that order (``label_names``); a sigmoid gives the probabilities ``classifier
    predict`` writes.
    """
    from cxrsynth.labels import FINDING_COLUMNS

    side = int(config.image_size)
    return {
        "architecture": config.model,
        "num_classes": len(FINDINGS),
        "num_features": None,
        "label_names": list(FINDING_COLUMNS),
        "model_args": {"in_chans": 1, **config.model_kwargs},
        "pretrained_cfg": {
            "input_size": [1, side, side], "fixed_input_size": False, "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "mean": [0.5], "std": [0.5], "num_classes": len(FINDINGS),
            "label_names": list(FINDING_COLUMNS),
            "description": "cxrsynth 14-finding chest X-ray classifier: multi-label logits, one sigmoid per finding",
            "notes": "trained by cxrsynth on the user's data; classifier.json beside this file records what and how",
        },
    }


def classifier_card(meta: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The model card (header, sections) of a trained classifier from its ``classifier.json``."""
    from cxrsynth import cards
    from cxrsynth.labels import FINDING_COLUMNS

    config, data = meta["config"], meta["data"]
    trained_on = f"{data['name']}@{data['version']}"
    front = {
        "library_name": "timm", "pipeline_tag": "image-classification",
        "tags": ["chest-x-ray", "multi-label", "cxrsynth", config["model"]],
        "datasets": [trained_on],
        "cxrsynth": {"version": meta.get("cxrsynth"), "classifier_id": meta.get("classifier_id"), "preset": meta.get("preset"),
                     "trained_on": trained_on, "split": data.get("split"), "tune_split": data.get("tune_split"),
                     "train_images": data.get("train_images"), "tune_images": data.get("tune_images"),
                     "source_datasets": data.get("datasets"), "best_epoch": meta["best"]["epoch"],
                     "best_tune_loss": meta["best"]["tune_loss"], "trained_steps": meta.get("trained_steps")},
    }
    settings = ", ".join(f"{k} {config[k]}" for k in ("image_size", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
                                                       "schedule", "ema_decay", "exclude_uncertain", "augment", "seed"))
    sections = [
        ("Model", f"A timm `{config['model']}` with one input channel and {len(FINDING_COLUMNS)} sigmoid outputs, one per "
                  f"CheXpert finding, in this order: {', '.join(FINDING_COLUMNS)}. Load it with timm alone: "
                  f"`timm.create_model(\"local-dir:<this folder>\", pretrained=True)` (see config.json)."),
        ("Training data", f"{data.get('train_images')} images of {trained_on} split {data.get('split')!r} (datasets and "
                          f"versions: {data.get('datasets')}); the epoch with the lowest loss on "
                          f"{data.get('tune_images')} images of split {data.get('tune_split')!r} was kept "
                          f"(epoch {meta['best']['epoch']}, tuning loss {meta['best']['tune_loss']})."),
        ("Settings", f"Preset `{meta.get('preset')}`: {settings}. classifier.json records every setting."),
        ("Intended use", "Research on chest X-ray classification and on synthetic training data (Khosravi et al., "
                         "eBioMedicine 2024): comparing training sets by AUROC on held-out and external test sets."),
        ("Limits", cards.bullet_list(cards.LIMITS)),
    ]
    return front, sections


def build(config: ClassifierConfig) -> Classifier:
    """A freshly initialised classifier (seed the global torch RNG around it for repeatable weights)."""
    import timm

    try:
        net = timm.create_model(config.model, pretrained=False, num_classes=len(FINDINGS), in_chans=1, **config.model_kwargs)
    except RuntimeError as exc:  # timm's "Unknown model (...)"
        raise CxrsynthError(f"timm cannot build model {config.model!r}: {exc}") from None
    return Classifier(net)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from cxrsynth.safeload import check_finite, load_torch

    if not path.is_file():
        raise CxrsynthError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state: Any = _load_safetensors(path)
    else:
        state = load_torch(path, "pretrained weights")
    for key in ("ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CxrsynthError(f"{path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    check_finite(state, str(path))
    return state


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged one is a :class:`CxrsynthError`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: truncated, empty or not safetensors
        raise CxrsynthError(f"{path} is not a readable safetensors file: {' '.join(str(exc).split())[:200]}") from None


def load_pretrained(model: Classifier, path: str | Path) -> dict[str, list[str]]:
    """Load local pretrained weights into ``model.net``, adapting stem and head.

    Returns:
        ``{"adapted": [...], "dropped": [...]}``: the stem weights summed to one channel and
        the head weights left at their initialisation (another number of classes).

    Raises:
        CxrsynthError: The file is missing or does not fit the model (names the keys).
    """
    from timm.models import adapt_input_conv

    path = Path(path)
    net = model.net
    state = _read_state(path)
    own = net.state_dict()
    cfg = getattr(net, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv") or ""
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    adapted, dropped = [], []
    for key in list(state):
        value = state[key]
        if key.startswith(first) and key.endswith("weight") and value.ndim == 4 and key in own \
                and value.shape[1] != own[key].shape[1]:
            state[key] = adapt_input_conv(own[key].shape[1], value)
            adapted.append(key)
        elif any(key.startswith(h) for h in heads) and key in own and value.shape != own[key].shape:
            del state[key]
            dropped.append(key)
    check_fits(own, state, path, f"timm model {type(net).__name__}", absent_ok=dropped)
    net.load_state_dict(state, strict=False)  # strict but for the dropped head
    return {"adapted": adapted, "dropped": dropped}


def check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, what: str,
               absent_ok: list[str] = ()) -> None:
    """Refuse ``state`` (read from ``path``) unless it has exactly ``own``'s tensor names and shapes
    (``absent_ok`` may be missing), naming the first differences."""
    bad_shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in absent_ok]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or bad_shapes:
        raise CxrsynthError(f"{path} does not fit the {what}: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                            f"shape mismatch {bad_shapes[:4]}")


def save_weights(model: Classifier, path: str | Path) -> str:
    """Write ``model.net``'s state dict as safetensors atomically; returns :func:`classifier_id`.

    Raises:
        NonFiniteWeights: a weight is NaN or infinite (nothing is written).
    """
    from safetensors.torch import save_file

    from cxrsynth.safeload import check_finite, writing

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.net.state_dict().items()}
    check_finite(state, f"not writing {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, "the classifier's weights", partial=tmp):
        save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return classifier_id(path)


def classifier_id(path: str | Path) -> str:
    """Short sha256 (12 hex digits) of a weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A trained classifier's ``classifier.json``."""
    from cxrsynth.config import read_json

    path = Path(directory) / META
    meta = read_json(path, missing=f"{directory} is not a cxrsynth classifier (no {META})",
                     invalid=f"{path} is not a cxrsynth classifier.json", keys=("config",))
    if not isinstance(meta["config"], dict):
        raise CxrsynthError(f"{path}: 'config' is {type(meta['config']).__name__}, not the classifier's settings")
    return meta


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """The trained classifier of ``directory`` (eval mode) and its ``classifier.json``.

    Raises:
        CxrsynthError: weights missing, unreadable, or holding NaN or infinite values.
    """
    from cxrsynth.safeload import check_finite

    directory = Path(directory)
    meta = read_meta(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CxrsynthError(f"{directory} has no {WEIGHTS}")
    model = build(ClassifierConfig.from_dict(meta["config"]))
    state = _load_safetensors(weights)
    check_fits(model.net.state_dict(), state, weights, f"classifier its {META} describes")
    check_finite(state, str(weights))
    model.net.load_state_dict(state)
    return model.to(device).eval(), meta
