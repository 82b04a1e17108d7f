"""Test-time alignment: re-score an image's candidate training images after registering it onto each.

An embedding finds candidates; whether a candidate is the *source* of a near-copy is then
decided in pixels, the way copy detection verifies a match geometrically: the query is
registered onto the candidate by a similarity transform (rotation, scale, translation) and
the two are compared by normalised cross-correlation (NCC) of their central regions,
low-passed so that resampling and interpolation do not count. A copy shifted by 8 px,
cropped to 85% or rotated by 7 degrees registers back onto its source almost exactly; a
new patient's radiograph registers onto a look-alike training image only approximately.

Registration, per (query, candidate) pair, batched:

1. a grid of rotations (:data:`ANGLES`) x scales (:data:`SCALES`) of the query; for each,
   the NCC of its central ``(S - 2M)²`` region at every translation up to ``M`` px
   (:data:`MARGIN` of the side) by FFT, normalised by the candidate's local energy (box
   sums): exact template matching;
2. from the best grid point, ``iters`` Adam steps on (angle, log scale, shift) maximising
   the NCC (bilinear warps, differentiable);
3. the distance: ``1 - NCC`` of the registered query and the candidate, both low-passed
   (Gaussian, :data:`SIGMA` px).

Cost: ``len(ANGLES) x len(SCALES)`` FFT correlations and ``iters`` warps per pair, about
2-4 ms per pair on one CPU core at 64 px: a re-ranking of a few candidates, not a search.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: Rotations (degrees) and scales of the grid search; the suite's are within ±7° and 0.85-1.18.
ANGLES = (-6.0, -3.0, 0.0, 3.0, 6.0)
SCALES = (0.9, 0.95, 1.0, 1.06, 1.12, 1.18)
#: Largest translation searched, as a share of the side (10 px at 64 px; the suite shifts up to 8).
MARGIN = 10 / 64
#: Gaussian low-pass (px at the registration's side) of both images before the final NCC: at 64 px it
#: forgives resampling; at 128 px it keeps the fine texture that tells two look-alike patients apart.
SIGMA = 1.0
#: Adam step of the refinement (radians, log scale and normalised shift alike).
LR = 0.003


def _standardise(x: "torch.Tensor") -> "torch.Tensor":
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def _unit(x: "torch.Tensor") -> "torch.Tensor":
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def gaussian_blur(x: "torch.Tensor", sigma: float) -> "torch.Tensor":
    """``(B, S, S)`` blurred by a separable Gaussian of ``sigma`` px (edges replicated)."""
    import torch
    import torch.nn.functional as F

    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma * sigma))
    k = k / k.sum()
    y = F.pad(x[:, None], (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, k[None, None, None, :]), k[None, None, :, None])
    return y[:, 0]


def _ncc(x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
    return (_unit(x) * _unit(y)).sum(dim=(-2, -1))


class Aligner:
    """Registers query images onto training images and scores each pair (:meth:`distances`).

    Args:
        train_images: ``(N, S, S) uint8`` training images (any side; resized to ``size``).
        size: Side (px) the registration works at.
        iters: Refinement steps per pair (0: the grid's best NCC, unfiltered).
        chunk: Queries registered at a time.
        device: Torch device.
    """

    def __init__(self, train_images: np.ndarray, size: int = 64, iters: int = 30, chunk: int = 32, device=None) -> None:
        import torch
        import torch.nn.functional as F

        self.size, self.iters, self.chunk = size, iters, chunk
        self.device = torch.device("cpu") if device is None else device
        self.margin = max(1, int(round(MARGIN * size)))
        self.inner = size - 2 * self.margin
        self.sigma = SIGMA
        self.train = self._prepare(train_images)  # (N, S, S) standardised
        self.train_fft = torch.fft.rfft2(self.train)
        m, n = self.inner, self.inner * self.inner
        sums = []
        for y in (self.train, self.train * self.train):  # box sums of every m x m window: the local energy
            ii = F.pad(y.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
            sums.append(ii[:, m:, m:] - ii[:, :-m, m:] - ii[:, m:, :-m] + ii[:, :-m, :-m])
        self.train_energy = (sums[1] - sums[0] ** 2 / n).clamp_min(1e-6).sqrt()  # (N, 2M+1, 2M+1)

    def _prepare(self, images: np.ndarray) -> "torch.Tensor":
        import torch

        from cxrsynth.share.embed import resize_images

        return _standardise(torch.from_numpy(resize_images(images, self.size)).float().to(self.device))

    def _warp(self, images: "torch.Tensor", angle: "torch.Tensor", log_scale: "torch.Tensor", dx: "torch.Tensor",
              dy: "torch.Tensor") -> "torch.Tensor":
        """``(B, S, S)`` rotated by ``angle`` (radians), zoomed by ``exp(log_scale)``, then moved by ``(dx, dy)``
        (normalised coordinates): the query as it would sit on the candidate."""
        import torch
        import torch.nn.functional as F

        inv = torch.exp(-log_scale)
        cos, sin = torch.cos(angle) * inv, torch.sin(angle) * inv
        rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
        shift = -(rot @ torch.stack([dx, dy], 1)[:, :, None])
        grid = F.affine_grid(torch.cat([rot, shift], 2), [len(images), 1, self.size, self.size], align_corners=False)
        return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]

    def _grid(self, query: "torch.Tensor", cand: "torch.Tensor") -> tuple["torch.Tensor", ...]:
        """Best grid point of each pair: ``(angle, log scale, dx, dy)``, each ``(Q * K,)``."""
        import torch
        import torch.nn.functional as F

        q, k = cand.shape
        s, mg, m = self.size, self.margin, self.inner
        angles = torch.tensor(ANGLES, device=self.device).repeat_interleave(len(SCALES)) * math.pi / 180
        logs = torch.log(torch.tensor(SCALES, device=self.device)).repeat(len(ANGLES))
        w = len(angles)
        warped = self._warp(query.repeat_interleave(w, 0), angles.repeat(q), logs.repeat(q),
                            torch.zeros(q * w, device=self.device), torch.zeros(q * w, device=self.device))
        t = _unit(warped[:, mg : mg + m, mg : mg + m]).reshape(q, w, m, m)
        t_fft = torch.fft.rfft2(F.pad(t, (0, 2 * mg, 0, 2 * mg))).conj()
        side = 2 * mg + 1
        best = []
        for j in range(k):
            c = cand[:, j]
            corr = torch.fft.irfft2(self.train_fft[c][:, None] * t_fft, s=(s, s))[:, :, :side, :side]
            best.append((corr / self.train_energy[c][:, None]).reshape(q, -1).argmax(dim=1))
        arg = torch.stack(best, 1).reshape(-1)  # (Q * K,) over (warp, row, col)
        which, rest = arg // (side * side), arg % (side * side)
        dy = ((rest // side) - mg).float() * 2 / s
        dx = ((rest % side) - mg).float() * 2 / s
        return angles[which], logs[which], dx, dy

    def _score(self, query: "torch.Tensor", cand: "torch.Tensor") -> "torch.Tensor":
        """``(Q, K)`` NCC of each query registered onto each of its candidates (low-passed)."""
        import torch

        q, k = cand.shape
        mg, m = self.margin, self.inner
        with torch.no_grad():
            start = self._grid(query, cand)
        images = query.repeat_interleave(k, 0)
        target = self.train[cand.reshape(-1)]
        params = torch.stack(start, 1).clone().requires_grad_(True)
        first, second = torch.zeros_like(params), torch.zeros_like(params)  # Adam's moments, by hand (torch.optim
        for step in range(1, self.iters + 1):  # imports torch._dynamo: seconds for a few dozen small steps)
            moved = self._warp(images, *params.unbind(1))[:, mg : mg + m, mg : mg + m]
            (grad,) = torch.autograd.grad(-_ncc(moved, target[:, mg : mg + m, mg : mg + m]).sum(), params)
            with torch.no_grad():
                first.mul_(0.9).add_(grad, alpha=0.1)
                second.mul_(0.999).addcmul_(grad, grad, value=0.001)
                params -= LR * (first / (1 - 0.9**step)) / ((second / (1 - 0.999**step)).sqrt() + 1e-8)
        with torch.no_grad():
            moved = self._warp(images, *params.unbind(1))
            if self.iters:
                moved, target = gaussian_blur(moved, self.sigma), gaussian_blur(target, self.sigma)
            return _ncc(moved[:, mg : mg + m, mg : mg + m], target[:, mg : mg + m, mg : mg + m]).reshape(q, k)

    def distances(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``(Q, K)`` distances ``1 - NCC`` of ``(Q, S, S) uint8`` queries registered onto training rows ``candidates``."""
        import torch

        out = []
        for start in range(0, len(queries), self.chunk):
            query = self._prepare(queries[start : start + self.chunk])
            cand = torch.from_numpy(np.asarray(candidates[start : start + self.chunk], dtype=np.int64)).to(self.device)
            out.append((1.0 - self._score(query, cand)).clamp_min(0.0).detach().cpu().numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros((0, candidates.shape[1] if candidates.ndim == 2 else 0))
