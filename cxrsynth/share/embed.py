"""Image embeddings for the memorization audit, and chunked nearest-neighbour search.

Every embedding maps ``(B, S, S) uint8`` images to ``(B, D)`` float32 rows of unit L2 norm,
so the cosine distance of two images is ``1 - a @ b``. Registered by name
(:func:`build`):

* ``pixels`` — the image downsampled to ``size`` px, each standardised to mean 0 and
  variance 1 (so the cosine is the Pearson correlation of the pixels). A baseline: it sees
  near-copies, but little of what makes a patient recognisable in another radiograph.
* ``classifier:DIR`` — the pooled (pre-logits) features of a cxrsynth classifier trained on
  the real data (``classifier.json`` + ``model.safetensors``; loaded from local files only).
* ``reid`` — a small siamese network trained on the training set's patients to tell
  whether two radiographs show the same patient (the idea of Packhäuser et al., Sci Rep
  2022): :func:`train_reid`. ``reid:DIR`` reuses a saved one (``reid.json`` + ``reid.safetensors``).
* ``sscd`` — a small copy-detection network trained on the training images in the manner of
  SSCD (Pizzi et al., CVPR 2022): two copy-style edits of each image embed together, every
  other image apart (InfoNCE + KoLeo): :func:`train_sscd`. ``sscd:DIR`` reuses a saved one.

:func:`nearest` finds each query's ``k`` nearest bank rows by chunked matrix products on
the embeddings' device (a GPU when there is one): memory is ``chunk x bank`` similarities.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from cxrsynth import __version__
from cxrsynth.config import Config, setting
from cxrsynth.errors import CxrsynthError, UnknownNameError
from cxrsynth.registry import Registry

if TYPE_CHECKING:
    import torch


class EmbeddingError(CxrsynthError):
    """An embedding that cannot be built or used as asked."""


@dataclass
class Embedding:
    """A named image embedding.

    Attributes:
        name: As given on the command line (``pixels``, ``classifier:DIR``, ``reid``).
        size: Side (px) the images are decoded at before ``fn``.
        fn: ``(B, size, size) uint8 tensor on device → (B, D) float32``, unit rows.
        info: What it is, recorded in ``audit.json``.
    """

    name: str
    size: int
    fn: Callable[["torch.Tensor"], "torch.Tensor"]
    info: dict

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        import torch

        with torch.no_grad():
            return torch.nn.functional.normalize(self.fn(images).float(), dim=1)


def standardise(x: "torch.Tensor") -> "torch.Tensor":
    """``(B, ...)`` → per-image zero mean, unit variance, flattened to ``(B, D)``."""
    flat = x.reshape(x.shape[0], -1).float()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-6)


def pixels(size: int = 32) -> Embedding:
    """Downsampled, standardised pixels (a baseline)."""
    return Embedding("pixels", size, standardise, {"kind": "pixels", "size": size, "dim": size * size})


def classifier(directory: str | Path, device: "torch.device") -> Embedding:
    """Pooled (pre-logits) features of a cxrsynth classifier (``classifier.json`` + ``model.safetensors``)."""
    directory = Path(directory)
    try:
        from cxrsynth.classify import model as classify_model
    except ImportError:
        raise EmbeddingError("classifier embeddings need cxrsynth.classify, which this install lacks") from None
    model, meta = classify_model.load_classifier(directory, device=device)
    size = int(meta["config"]["image_size"])

    def fn(images: "torch.Tensor") -> "torch.Tensor":
        return model.features(images[:, None].float() / 255.0)  # (B, S, S) uint8 → [0, 1] (B, 1, S, S) → (B, D)

    info = {"kind": "classifier", "directory": str(directory), "model": meta["config"].get("model"), "size": size,
            "classifier_id": meta.get("classifier_id")}
    return Embedding(f"classifier:{directory}", size, fn, info)


def _trained(kind: str):
    """Builder of a network embedding trained on the audit's training images (``kind``) or loaded (``kind:DIR``)."""
    def build_(arg: str, device: "torch.device", train: Callable[[str], Any] | None, pixel_size: int) -> Embedding:
        if arg:
            return load_network(arg, kind, device)
        if train is None:
            raise EmbeddingError(f"the {kind} embedding is trained on the training images; no training data given")
        return train(kind)
    return build_


#: ``kind`` of ``kind[:ARG]`` → ``builder(arg, device, train, pixel_size)``; the label says which take an argument.
EMBEDDINGS: Registry[Callable[[str, "torch.device", Callable[[], Any] | None, int], Embedding]] = Registry("embedding")
EMBEDDINGS.register("pixels", lambda arg, device, train, pixel_size: pixels(pixel_size))
EMBEDDINGS.register("classifier", lambda arg, device, train, pixel_size: classifier(arg, device), label="classifier:DIR")
EMBEDDINGS.register("reid", _trained("reid"), label="reid[:DIR]")
EMBEDDINGS.register("sscd", _trained("sscd"), label="sscd[:DIR]")
_NEEDS_ARG, _NO_ARG = {"classifier"}, {"pixels"}


def build(spec: str, *, device: "torch.device", train: Callable[[str], Any] | None = None, pixel_size: int = 32,
          root: str | Path | None = None) -> Embedding:
    """The embedding named by ``spec``: ``pixels``, ``classifier:DIR``, ``reid[:DIR]`` or ``sscd[:DIR]`` (:data:`EMBEDDINGS`).

    Args:
        spec: The name (and directory) of the embedding.
        device: Where it runs.
        train: For ``reid`` and ``sscd``: ``train(kind)`` trains that network and returns the embedding.
        pixel_size: Side of the ``pixels`` embedding.
        root: Project root a relative ``DIR`` is read from (None: the working directory).
    """
    kind, _, arg = spec.partition(":")
    if kind not in EMBEDDINGS or (kind in _NEEDS_ARG and not arg) or (kind in _NO_ARG and arg):
        raise UnknownNameError(EMBEDDINGS.kind, spec, EMBEDDINGS.labels())
    if not (arg and root is not None and not Path(arg).is_absolute()):
        return EMBEDDINGS[kind](arg, device, train, pixel_size)
    # a network's folder, relative to the project root like every other path; named as given (no local path recorded)
    emb = EMBEDDINGS[kind](str(Path(root) / arg), device, train, pixel_size)
    emb.name = spec
    if "directory" in emb.info:
        emb.info["directory"] = arg
    return emb


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """``(N, S, S) uint8`` → ``(N, size, size)``, bilinear like :func:`cxrsynth.imaging.decode_png`."""
    from PIL import Image

    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
                     for im in images])


def iter_images(root: str | Path, frame: pd.DataFrame, size: int, batch: int, share: tuple[int, int] = (0, 1),
                ) -> Iterator[tuple[list[str], np.ndarray | None]]:
    """``(keys, (B, size, size) uint8)`` of the rows of ``frame``, in shard order, ``batch`` at a time.

    ``share=(rank, world)``: batch ``b`` is decoded only when ``b % world == rank``; the other
    batches come with their keys and ``None`` (every rank sees every key, in the same order,
    and the batches are those of one process, so results do not depend on the world size).
    """
    from cxrsynth import shards
    from cxrsynth.imaging import decode_png

    rank, world = share
    keys: list[str] = []
    pngs: list[tuple[str, bytes]] = []
    shard_of = dict(zip(frame["key"].astype(str), frame["shard"].astype(str)))

    def done(b: int) -> tuple[list[str], np.ndarray | None]:
        if b % world != rank:
            return keys, None
        return keys, np.stack([decode_png(png, size, key=key, shard=shard_of[key]) for key, png in pngs])

    b = 0
    for key, png in shards.images(root, frame):
        keys.append(key)
        pngs.append((key, png))
        if len(keys) == batch:
            yield done(b)
            keys, pngs, b = [], [], b + 1
    if keys:
        yield done(b)


def gather_batches(mine: dict[int, Any], world: int) -> dict[int, Any]:
    """Every rank's ``{batch index: result}`` merged, on every rank (``torch.distributed``'s
    ``all_gather_object``; tensors travel as CPU numpy arrays). ``world`` 1: ``mine`` itself."""
    if world <= 1:
        return mine
    import torch
    import torch.distributed as dist

    def cpu(value):
        if isinstance(value, torch.Tensor):
            return value.cpu().numpy()
        return tuple(cpu(v) for v in value) if isinstance(value, tuple) else value

    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, {b: cpu(v) for b, v in mine.items()})
    return {b: v for share in shares for b, v in share.items()}


def embed_rows(root: str | Path, frame: pd.DataFrame, embedding: Embedding, device: "torch.device",
               batch: int = 256, share: tuple[int, int] = (0, 1)) -> tuple[list[str], "torch.Tensor"]:
    """Embed every row of ``frame``: ``(keys in frame order, (N, D) tensor on device)``.

    ``share=(rank, world)`` under torchrun: each rank embeds every ``world``-th batch and
    every rank gets all the vectors (:func:`gather_batches`).

    Raises :class:`EmbeddingError` when a row's image is not in its shard.
    """
    import torch

    found: dict[str, int] = {}
    mine = {}
    for b, (keys, images) in enumerate(iter_images(root, frame, embedding.size, batch, share)):
        for k in keys:
            found[k] = len(found)
        if images is not None:
            mine[b] = embedding(torch.from_numpy(images).to(device))
    parts = gather_batches(mine, share[1])
    wanted = frame["key"].astype(str).tolist()
    missing = [k for k in wanted if k not in found]
    if missing:
        raise EmbeddingError(f"{len(missing)} image(s) not found in their shards, e.g. {missing[:3]}")
    if not parts:
        return [], torch.zeros((0, 1), device=device)
    order = torch.tensor([found[k] for k in wanted], device=device)
    return wanted, torch.cat([torch.as_tensor(parts[b], device=device) for b in sorted(parts)])[order]


def nearest(queries: "torch.Tensor", bank: "torch.Tensor", k: int, chunk: int = 4096) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The ``k`` nearest bank rows of each query by cosine distance: ``(distance, index)``, each ``(Q, k)``.

    Rows must be unit vectors. Queries are taken ``chunk`` at a time (a ``chunk x N``
    similarity block); both tensors stay on their device.
    """
    import torch

    k = min(k, bank.shape[0])
    dist, index = [], []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ bank.T  # (q, N)
        top, idx = torch.topk(sims, k, dim=1)  # largest similarity = smallest distance
        dist.append((1.0 - top).clamp_min(0.0))
        index.append(idx)
    if not dist:
        return torch.zeros((0, k), device=bank.device), torch.zeros((0, k), dtype=torch.long, device=bank.device)
    return torch.cat(dist), torch.cat(index)


# --- the re-identification network -------------------------------------------------------


@dataclass(frozen=True)
class ReidConfig(Config):
    """A small siamese re-identification network and its training (recorded in ``reid.json``).

    Attributes:
        size: Input side (px).
        width: Channels of the first convolution (doubling twice).
        dim: Embedding size.
        steps: Optimizer steps.
        patients: Patients per batch (two radiographs each).
        lr: Adam learning rate.
        temperature: Of the supervised contrastive loss.
        shift: Largest random translation (px) of the augmentation.
        pool: Side of the average-pooled feature map the projection reads: ``pool x pool``
            cells keep the chest's layout (where the heart's border, the domes, the
            clavicles lie), which a global average (``pool=1``) of 17-px receptive fields
            throws away; a patient is recognised by that layout.
        seed: Seeds the initial weights, the batches and the augmentation.
    """

    kind = "reid config"  # how errors name these settings (a class attribute, not a field)

    size: int = setting(64, ge=1)
    width: int = setting(16, ge=1)
    dim: int = setting(64, ge=1)
    steps: int = setting(700, ge=1)
    patients: int = setting(32, ge=1)
    lr: float = setting(2e-3, gt=0)
    temperature: float = setting(0.1, gt=0)
    shift: int = setting(4, ge=0)
    pool: int = setting(4, ge=1)
    seed: int = 0


def reid_network(config: ReidConfig) -> "torch.nn.Module":
    """Four strided convolutions, average pooling to ``pool x pool``, a linear projection: ``(B, 1, S, S) → (B, dim)``."""
    from torch import nn

    w = config.width

    def block(cin: int, cout: int, stride: int) -> list:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(4, cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 2),
                         nn.AdaptiveAvgPool2d(config.pool), nn.Flatten(), nn.Linear(4 * w * config.pool**2, config.dim))


def _as_input(images: "torch.Tensor") -> "torch.Tensor":
    return images[:, None].float() / 127.5 - 1.0  # (B, 1, S, S) in [-1, 1]


def _augment(x: "torch.Tensor", shift: int, gen: "torch.Generator") -> "torch.Tensor":
    """Random translation (reflect-padded crop), contrast and brightness per image: ``(B, 1, S, S)``."""
    import torch

    b, _, s, _ = x.shape
    if shift:
        padded = torch.nn.functional.pad(x, (shift,) * 4, mode="reflect")
        dy, dx = (torch.randint(0, 2 * shift + 1, (b,), generator=gen).tolist() for _ in range(2))
        x = torch.stack([padded[i, :, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(b)])
    scale = 1.0 + 0.2 * (torch.rand((b, 1, 1, 1), generator=gen) - 0.5)
    offset = 0.2 * (torch.rand((b, 1, 1, 1), generator=gen) - 0.5)
    return x * scale + offset


def supcon_loss(z: "torch.Tensor", patient: "torch.Tensor", temperature: float) -> "torch.Tensor":
    """Supervised contrastive loss (Khosla et al. 2020): each image's other images of its patient are its positives."""
    import torch

    z = torch.nn.functional.normalize(z, dim=1)
    logits = z @ z.T / temperature  # (B, B)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    positive = (patient[:, None] == patient[None, :]) & ~eye
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp_min(1)).mean()


def warmup_cosine(step: int, steps: int, warmup: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over the first ``warmup`` of the steps, then cosine decay to 0.

    The warm-up keeps the contrastive loss from collapsing every embedding onto one point
    early on (which a constant 2e-3 did on the phantom: the loss stuck at log(2P - 1)).
    """
    import math

    first = max(1, int(warmup * steps))
    if step < first:
        return (step + 1) / first
    return 0.5 * (1.0 + math.cos(math.pi * (step - first) / max(1, steps - first)))


def _pair_pool(patient: np.ndarray) -> dict[int, np.ndarray]:
    """Row indices of each patient with two or more images."""
    order = np.argsort(patient, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(patient[order])) + 1) if len(order) else []
    return {int(patient[g[0]]): g for g in groups if len(g) >= 2}


def train_reid(images: np.ndarray, patient_ids: pd.Series, config: ReidConfig, device: "torch.device",
               out: Path | None = None, progress: Callable[[int], None] | None = None) -> Embedding:
    """Train the re-identification network on real images of known patients.

    Args:
        images: ``(N, size, size) uint8`` training images.
        patient_ids: ``(N,)`` their patients.
        config: Network and training settings.
        device: Where to train.
        out: Where to save ``reid.json`` + ``reid.safetensors`` (``reid:OUT`` reloads it).
        progress: Optional ``progress(steps)``.

    Each step takes ``config.patients`` patients with at least two images and two of
    their images each, augments both, and minimises the supervised contrastive loss.
    """
    import torch

    codes = pd.factorize(patient_ids.astype(str))[0]
    pool = _pair_pool(codes)
    if len(pool) < 2:
        raise EmbeddingError(f"the reid network needs patients with two or more images; the training set has {len(pool)}")
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the global RNG left as it was
        torch.manual_seed(config.seed)
        net = reid_network(config)
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, config.steps))
    data = torch.from_numpy(images)  # (N, S, S) uint8, CPU
    patients = np.array(sorted(pool))
    per_batch = min(config.patients, len(patients))
    for step in range(config.steps):
        chosen = patients[torch.randperm(len(patients), generator=gen)[:per_batch].numpy()]
        rows = []
        for p in chosen:
            group = pool[int(p)]
            pick = torch.randperm(len(group), generator=gen)[:2].numpy()
            rows += group[pick].tolist()
        x = _augment(_as_input(data[rows]), config.shift, gen).to(device)  # (2P, 1, S, S)
        labels_ = torch.from_numpy(codes[rows]).to(device)
        loss = supcon_loss(net(x), labels_, config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(1)
    net.eval()
    info = {"kind": "reid", "size": config.size, "dim": config.dim, "config": config.to_dict(),
            "patients": int(len(pool)), "images": int(len(images)), "final_loss": float(loss.detach())}
    if out is not None:
        save_reid(net, info, Path(out))
        info["directory"] = str(out)
    return Embedding("reid", config.size, lambda im: net(_as_input(im)), info)


def save_reid(net: "torch.nn.Module", info: dict, out: Path) -> Path:
    """Write ``reid.safetensors`` and ``reid.json`` (its config and training facts)."""
    return save_network(net, info, out, "reid")


def load_reid(directory: str | Path, device: "torch.device") -> Embedding:
    """A re-identification network saved by :func:`train_reid`."""
    return load_network(directory, "reid", device)


# --- the copy-detection network (SSCD-style) ----------------------------------------------


@dataclass(frozen=True)
class SscdConfig(Config):
    """A small copy-detection network trained in the manner of SSCD (Pizzi et al., CVPR 2022).

    Contrastive (InfoNCE) training between two strongly augmented views of the same training
    image, with the KoLeo entropy regulariser spreading the embeddings apart, so that an
    image and its edited copies (shifted, cropped, rotated, rescaled, re-exposed, noisy,
    blurred, re-sampled) embed together and other images, even of the same patient, do not.
    The augmentations are the family the planted-copy bench tests (``bench audit --planted``).

    Attributes:
        size: Input side (px).
        width: Channels of the first convolution (doubling twice).
        dim: Embedding size.
        steps: Optimizer steps.
        batch: Images per step (two views each).
        lr: Adam learning rate.
        temperature: Of the InfoNCE loss.
        koleo: Weight of the KoLeo (entropy) regulariser.
        shift: Largest translation of the augmentation, as a share of the side each way.
        seed: Seeds the initial weights, the batches and the augmentation.
    """

    kind = "sscd config"  # how errors name these settings (a class attribute, not a field)

    size: int = setting(64, ge=8, le=512)
    width: int = setting(16, ge=1)
    dim: int = setting(128, ge=1)
    steps: int = setting(800, ge=1)
    batch: int = setting(64, ge=2)
    lr: float = setting(2e-3, gt=0)
    temperature: float = setting(0.1, gt=0)
    koleo: float = setting(0.1, ge=0)
    shift: float = setting(0.125, ge=0, le=0.5)
    seed: int = 0


def copy_augment(x: "torch.Tensor", gen: "torch.Generator", shift: float = 1 / 32) -> "torch.Tensor":
    """Strong copy-style edits of ``(B, 1, S, S)`` images in [-1, 1], one draw per image.

    Geometry in one resampling (shift up to ``shift`` of the side each way, scale 0.85-1.15,
    rotation +-8 degrees, a crop of 85-100% resized back), then brightness, contrast and gamma
    +-12%, a blur (half of the images), down- and up-sampling by 2 (a quarter), Gaussian noise.
    """
    import math

    import torch
    import torch.nn.functional as F

    b, _, s, _ = x.shape

    def u(lo: float, hi: float) -> "torch.Tensor":
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    angle = u(-8, 8) * math.pi / 180
    zoom = u(0.85, 1.0) / u(0.87, 1.15)  # crop then rescale, in one factor
    tx, ty = u(-2 * shift, 2 * shift), u(-2 * shift, 2 * shift)  # normalised coordinates: 2 units span the image
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = (x + 1) / 2  # [0, 1]
    y = y.clamp(0, 1) ** u(0.88, 1.12).to(x)[:, None, None, None]
    y = (y - 0.5) * u(0.88, 1.12).to(x)[:, None, None, None] + 0.5 + u(-0.12, 0.12).to(x)[:, None, None, None]
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=x.device) / 16
        kernel = (k[:, None] * k[None, :])[None, None]
        y = torch.where(blur.to(x.device)[:, None, None, None], F.conv2d(F.pad(y, (2, 2, 2, 2), mode="replicate"), kernel), y)
    resample = torch.rand(b, generator=gen) < 0.25
    if resample.any():
        small = F.interpolate(y, scale_factor=0.5, mode="bilinear", align_corners=False)
        y = torch.where(resample.to(x.device)[:, None, None, None],
                        F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False), y)
    y = y + u(0.0, 0.04).to(x)[:, None, None, None] * torch.randn(y.shape, generator=gen).to(x)
    return y * 2 - 1


def koleo_loss(z: "torch.Tensor") -> "torch.Tensor":
    """KoLeo entropy regulariser (Sablayrolles et al. 2019, SSCD's): ``-mean log(distance to the nearest other row)``."""
    import torch

    with torch.no_grad():
        sims = z @ z.T
        sims.fill_diagonal_(-2.0)
        nearest = sims.argmax(dim=1)
    return -torch.log((z - z[nearest]).norm(dim=1) + 1e-8).mean()


def info_nce(a: "torch.Tensor", b: "torch.Tensor", temperature: float) -> "torch.Tensor":
    """Symmetric InfoNCE: each view's positive is the other view of its image; every other view a negative."""
    import torch

    z = torch.cat([a, b])  # (2B, D), unit rows
    n = len(a)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return torch.nn.functional.cross_entropy(logits, target)


def train_sscd(images: np.ndarray, config: SscdConfig, device: "torch.device", out: Path | None = None,
               progress: Callable[[int], None] | None = None) -> Embedding:
    """Train the copy-detection network on ``(N, size, size) uint8`` images (the training split's).

    Each step draws ``config.batch`` images, two :func:`copy_augment` views of each, and
    minimises InfoNCE + ``koleo`` x KoLeo. Seeded: the same images and config give the same
    weights on one device type. ``out``: ``sscd.json`` + ``sscd.safetensors`` (``sscd:OUT``).
    """
    import torch

    if len(images) < 2:
        raise EmbeddingError(f"the sscd network needs at least 2 training images, got {len(images)}")
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = reid_network(ReidConfig(size=config.size, width=config.width, dim=config.dim, pool=1))
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    data = torch.from_numpy(images)
    per = min(config.batch, len(images))
    for _ in range(config.steps):
        rows = torch.randperm(len(images), generator=gen)[:per]
        x = _as_input(data[rows])
        views = [torch.nn.functional.normalize(net(copy_augment(x, gen, config.shift).to(device)), dim=1) for _ in range(2)]
        loss = info_nce(*views, config.temperature) + config.koleo * koleo_loss(torch.cat(views))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(1)
    net.eval()
    info = {"kind": "sscd", "size": config.size, "dim": config.dim, "config": config.to_dict(), "images": int(len(images)),
            "final_loss": float(loss.detach())}
    if out is not None:
        save_network(net, info, Path(out), "sscd")
        info["directory"] = str(out)
    return Embedding("sscd", config.size, lambda im: net(_as_input(im)), info)


def save_network(net: "torch.nn.Module", info: dict, out: Path, kind: str) -> Path:
    """Write ``<kind>.safetensors`` and ``<kind>.json`` (its config and training facts)."""
    import json

    from safetensors.torch import save_file

    from cxrsynth.safeload import writing

    out.mkdir(parents=True, exist_ok=True)
    with writing(out / f"{kind}.safetensors", f"the {kind} network's weights"):
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / f"{kind}.safetensors"))
    (out / f"{kind}.json").write_text(json.dumps({**info, "cxrsynth": __version__}, indent=1, sort_keys=True) + "\n")
    return out


def load_network(directory: str | Path, kind: str, device: "torch.device") -> Embedding:
    """A ``reid`` or ``sscd`` network saved by :func:`train_reid` / :func:`train_sscd`."""
    from safetensors.torch import load_file

    from cxrsynth.config import read_json
    from cxrsynth.safeload import check_finite

    directory = Path(directory)
    weights = directory / f"{kind}.safetensors"
    if not weights.is_file():
        raise EmbeddingError(f"{directory}: no {kind}.json + {kind}.safetensors (save one with `share audit --embedding {kind}`)")
    info = read_json(directory / f"{kind}.json", missing=f"{directory}: no {kind}.json", invalid=f"{directory / f'{kind}.json'}",
                     error=EmbeddingError, keys=("config",))
    if kind == "sscd":
        c = SscdConfig.from_dict(info["config"])
        net = reid_network(ReidConfig(size=c.size, width=c.width, dim=c.dim, pool=1))
    else:
        c = ReidConfig.from_dict(info["config"])
        net = reid_network(c)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # SafetensorError: truncated, empty or not safetensors
        raise EmbeddingError(f"{weights} is not a readable safetensors file: {' '.join(str(exc).split())[:200]}") from None
    check_finite(state, str(weights))
    own = net.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise EmbeddingError(f"{weights} does not fit the {kind} network its {kind}.json describes")
    net.load_state_dict(state)
    net = net.to(device).eval()
    return Embedding(f"{kind}:{directory}", c.size, lambda im: net(_as_input(im)), {**info, "directory": str(directory)})
