"""Roofline of one generator forward: FLOPs and bytes of every aten op, on meta tensors.

"Two numbers first": before timing anything on a GPU, count what a forward must do.
The network runs once on the ``meta`` device (shapes only, nothing computed: the
``paper`` preset at batch 64 takes about a second on a CPU) under a dispatch mode that
records, for every aten op the eager network runs,

* its FLOPs, from torch's own ``flop_counter`` registry (convolutions, matmuls), and
* the bytes it reads and writes: inputs plus outputs; view ops move nothing.

With a device's peak rate P (TFLOP/s) and memory bandwidth W (TB/s), an op takes at
least ``max(flops / P, bytes / W)``. The sum over ops is the *eager roofline*: the time
of an eager forward whose every kernel ran at its roof. ``compute floor / eager
roofline`` is then the highest MFU an eager forward can reach, and the share of the
roofline spent in memory-bound ops (group norm, SiLU, the scale-shift, residual adds,
casts, concatenations) is what operator fusion (``torch.compile``) can win back: the
:class:`Roofline` also gives the ideally fused time, the time with GEMM epilogues and
the GEMMs alone.

Attention: on the meta device ``scaled_dot_product_attention`` takes its math path
(batched matmuls and a softmax over the N x N scores). A fused (flash) kernel on the
GPU never writes the scores, so each SDPA call is counted as one op: the FLOPs of its
two matmuls, and the bytes of q, k, v and the output.

Defaults are one H100 as measured on this project's device machines: 790 TFLOP/s
dense bf16 (an 8192^3 matmul) and 3.0 TB/s (a device-to-device copy, bytes read plus
written).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from cxrsynth.diffusion.model import ConditionalUNet
from cxrsynth.diffusion.presets import get_preset
from cxrsynth.errors import CxrsynthError, UnknownNameError

#: Dense bf16 TFLOP/s and copy bandwidth TB/s of one H100 measured here (module docstring).
H100_PEAK_TFLOPS = 790.0
H100_BANDWIDTH_TBS = 3.0

#: Ops that only re-describe memory (not flagged ``is_view`` by their schema).
_NO_TRAFFIC = {"aten._unsafe_view", "aten.alias", "aten.detach", "aten.lift_fresh"}
_CATEGORY = {
    "aten.convolution": "convolution",
    "aten.mm": "matmul",
    "aten.addmm": "matmul",
    "aten.bmm": "matmul",
    "aten.baddbmm": "matmul",
    "aten.native_group_norm": "normalization",
    "aten.native_layer_norm": "normalization",
}
#: Row order of the report.
CATEGORIES = ("convolution", "matmul", "attention", "normalization", "elementwise")
#: Categories run by cuDNN / cuBLAS / flash kernels, which compilers do not fuse into.
GEMM_CATEGORIES = ("convolution", "matmul", "attention")


@dataclass
class CategoryCost:
    """FLOPs, bytes and eager roofline time of one category of ops, per image."""

    ops: int = 0
    gflop: float = 0.0
    mbytes: float = 0.0
    roof_ms: float = 0.0
    memory_bound_ops: int = 0


@dataclass
class Roofline:
    """The roofline of one forward (see module docstring); times are per image.

    Attributes:
        categories: Eager cost per category of ops (:data:`CATEGORIES`).
        by_op: Eager cost per aten op, most roofline time first.
        fused_ms: The roofline if every connected run of memory-bound ops (everything
            but convolutions, matmuls and attention) between two GEMMs were one kernel
            that reads its inputs once and writes only what another kernel reads, plus
            one more read of each normalization's input for its statistics
            (:meth:`_Costs.fused_groups`): what ``torch.compile`` can reach at best
            around cuDNN / cuBLAS kernels.
        fused_kernels: Number of such fused groups.
        epilogue_ms: ``fused_ms`` when, besides, every GEMM output read by a single
            elementwise op (a residual add after a convolution, say) is finished in the
            GEMM's epilogue: what ``max-autotune`` can reach with Triton convolutions
            and matmuls, if they ran as fast as cuDNN's.
    """

    preset: str
    image_size: int
    batch: int
    dtype: str
    peak_tflops: float
    bandwidth_tbs: float
    categories: dict[str, CategoryCost] = field(default_factory=dict)
    by_op: dict[str, CategoryCost] = field(default_factory=dict)
    fused_ms: float = 0.0
    fused_kernels: int = 0
    epilogue_ms: float = 0.0

    @property
    def gflop(self) -> float:
        return sum(c.gflop for c in self.categories.values())

    @property
    def compute_floor_ms(self) -> float:
        """All FLOPs at the peak rate: the fastest any implementation could be."""
        return self.gflop / self.peak_tflops

    @property
    def eager_ms(self) -> float:
        """Sum over ops of max(compute time, memory time)."""
        return sum(c.roof_ms for c in self.categories.values())

    @property
    def gemm_ms(self) -> float:
        """Convolutions, matmuls and attention alone: the roofline if every normalization,
        activation and residual add were folded into a GEMM's prologue or epilogue."""
        return sum(c.roof_ms for k, c in self.categories.items() if k in GEMM_CATEGORIES)

    def mfu_ceiling(self, fused: bool = False, epilogue: bool = False) -> float:
        """The best MFU of an eager (or ideally fused, or epilogue-fused) forward: compute floor / roofline."""
        ms = self.epilogue_ms if epilogue else self.fused_ms if fused else self.eager_ms
        return self.compute_floor_ms / ms if ms else 0.0

    def images_per_s(self, steps: int, passes: int = 1, fused: bool = False, epilogue: bool = False) -> float:
        """Images/s at the roofline for ``steps`` sampler steps of ``passes`` forwards."""
        ms = self.epilogue_ms if epilogue else self.fused_ms if fused else self.eager_ms
        return 1e3 / (ms * steps * passes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(gflop=self.gflop, compute_floor_ms=self.compute_floor_ms, eager_ms=self.eager_ms, gemm_ms=self.gemm_ms,
                 mfu_ceiling_eager=self.mfu_ceiling(), mfu_ceiling_fused=self.mfu_ceiling(fused=True),
                 mfu_ceiling_epilogue=self.mfu_ceiling(epilogue=True))
        return d


@dataclass
class _Op:
    """One op of the forward: its cost and the buffers (alias roots) it reads and writes."""

    name: str  # aten op (``aten.native_group_norm``) or ``sdpa``
    category: str
    flops: float
    nbytes: float  # eager traffic: every tensor argument and result
    reads: list[int]
    writes: list[int]


class _InSdpa(TorchFunctionMode):
    """Records each ``scaled_dot_product_attention`` call as one fused op (module docstring)."""

    def __init__(self, graph: "_Costs") -> None:
        super().__init__()
        self.graph = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        g = self.graph
        g.in_sdpa, g.sdpa_flops = True, 0.0
        try:
            out = func(*args, **kwargs)
        finally:
            g.in_sdpa = False
        g.record("sdpa", "attention", g.sdpa_flops, list(args[:3]), [out])
        return out


class _Costs(TorchDispatchMode):
    """Records every aten op (see module docstring): category, FLOPs, bytes, buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.in_sdpa = False
        self.sdpa_flops = 0.0
        self._root: dict[int, int] = {}  # id(tensor) -> id of the buffer it aliases
        self.size: dict[int, float] = {}  # buffer id -> bytes
        self._keep: list[torch.Tensor] = []  # keeps ids unique for the whole trace

    def root(self, t: torch.Tensor) -> int:
        """The buffer ``t`` lives in (views resolve to the tensor they view)."""
        if id(t) not in self._root:
            self._root[id(t)] = id(t)
            self._keep.append(t)
        r = self._root[id(t)]
        self.size[r] = max(self.size.get(r, 0.0), float(t.numel() * t.element_size()))
        return r

    def record(self, name: str, category: str, flops: float, inputs: list, outputs: list) -> None:
        ins = [a for a in inputs if isinstance(a, torch.Tensor)]
        outs = [a for a in outputs if isinstance(a, torch.Tensor)]
        nbytes = float(sum(t.numel() * t.element_size() for t in ins + outs))
        self.ops.append(_Op(name, category, flops, nbytes, [self.root(t) for t in ins], [self.root(t) for t in outs]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name = str(packet)
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0.0
        if self.in_sdpa:  # the math path's ops: counted as one attention op by _InSdpa
            self.sdpa_flops += flops
            return out
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
        if func.is_view or name in _NO_TRAFFIC:
            base = self.root(inputs[0])
            for o in outputs:
                self._root[id(o)] = base
                self._keep.append(o)
            return out
        self.record(name, _CATEGORY.get(name, "elementwise"), flops, inputs, outputs)
        return out

    def fused_groups(self, final: list[int]) -> list[float]:
        """Bytes of each fused group of memory-bound ops (Roofline.fused_ms).

        A group is a connected set of normalization / elementwise ops between the same two
        GEMMs in execution order: a kernel cannot hold a tensor across a GEMM that runs
        after it, so the residual stream, which skips a block's convolutions, is written
        before them and read again after. A group reads each outside tensor once, writes
        each tensor that an op outside it reads, and reads each normalization's input once
        more for its statistics.
        """
        fusible = {i for i, op in enumerate(self.ops) if op.category not in GEMM_CATEGORIES}
        segment, seg = [], 0
        for op in self.ops:
            seg += op.category in GEMM_CATEGORIES
            segment.append(seg)
        parent = {i: i for i in fusible}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        producer: dict[int, int] = {}
        sources: list[list[tuple[int, int | None]]] = []  # per op: (buffer, op that wrote it)
        for i, op in enumerate(self.ops):
            sources.append([(r, producer.get(r)) for r in op.reads])
            for r, j in sources[-1]:
                if i in fusible and j in fusible and segment[i] == segment[j]:
                    parent[find(i)] = find(j)
            for w in op.writes:
                producer[w] = i
        group = {i: find(i) for i in fusible}
        reads: dict[int, set[tuple[int, int | None]]] = defaultdict(set)
        kept: dict[int, set[tuple[int, int]]] = defaultdict(set)
        stats: dict[int, float] = defaultdict(float)
        for i, op in enumerate(self.ops):
            for r, j in sources[i]:
                if i in fusible and (j is None or group.get(j) != group[i]):
                    reads[group[i]].add((r, j))
                if j in fusible and group.get(i) != group[j]:
                    kept[group[j]].add((r, j))
            if op.category == "normalization":
                stats[group[i]] += self.size[op.reads[0]]
        for r in final:
            j = producer.get(r)
            if j in fusible:
                kept[group[j]].add((r, j))
        return [sum(self.size[r] for r, _ in reads[g]) + sum(self.size[r] for r, _ in kept[g]) + stats[g]
                for g in sorted(set(group.values()))]


    def epilogue_savings(self, final: list[int]) -> float:
        """Bytes saved if each GEMM output read by exactly one elementwise op were
        finished in the GEMM's epilogue (written once, as the elementwise result)."""
        consumers: dict[int, list[int]] = defaultdict(list)
        for i, op in enumerate(self.ops):
            for r in set(op.reads):
                consumers[r].append(i)
        saved = 0.0
        for op in self.ops:
            if op.category not in GEMM_CATEGORIES:
                continue
            for w in op.writes:
                readers = consumers[w]
                if w not in final and len(readers) == 1 and self.ops[readers[0]].category == "elementwise":
                    saved += 2 * self.size[w]  # the GEMM's write and the elementwise op's read
        return saved


def trace(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[_Costs, Any]:
    """Run ``fn(*args, **kwargs)`` (on meta tensors) recording every op; returns (costs, result)."""
    costs = _Costs()
    with torch.no_grad(), _InSdpa(costs), costs:
        result = fn(*args, **kwargs)
    return costs, result


def summarize(
    costs: _Costs,
    outputs: list[torch.Tensor],
    batch: int,
    *,
    peak_tflops: float = H100_PEAK_TFLOPS,
    bandwidth_tbs: float = H100_BANDWIDTH_TBS,
    **facts: Any,
) -> Roofline:
    """The :class:`Roofline` of a trace, per image of ``batch``; ``facts`` fill its labels."""
    peak, bw = peak_tflops * 1e12, bandwidth_tbs * 1e12
    cats: dict[str, CategoryCost] = defaultdict(CategoryCost)
    by_op: dict[str, CategoryCost] = defaultdict(CategoryCost)
    extern_ms = 0.0
    for op in costs.ops:
        compute, memory = op.flops / peak, op.nbytes / bw
        for cc in (cats[op.category], by_op[op.name]):
            cc.ops += 1
            cc.gflop += op.flops / batch / 1e9
            cc.mbytes += op.nbytes / batch / 1e6
            cc.roof_ms += max(compute, memory) / batch * 1e3
            cc.memory_bound_ops += int(memory > compute)
        if op.category in GEMM_CATEGORIES:
            extern_ms += max(compute, memory) / batch * 1e3
    final = [costs.root(t) for t in outputs]
    groups = costs.fused_groups(final)
    fused_ms = extern_ms + sum(groups) / bw / batch * 1e3
    labels = {"preset": "custom", "image_size": 0, "dtype": "bf16"} | facts
    return Roofline(
        **labels, batch=batch, peak_tflops=peak_tflops, bandwidth_tbs=bandwidth_tbs,
        categories={k: cats[k] for k in CATEGORIES if k in cats},
        by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1].roof_ms)),
        fused_ms=fused_ms, fused_kernels=len(groups),
        epilogue_ms=fused_ms - costs.epilogue_savings(final) / bw / batch * 1e3,
    )


def roofline(
    preset: str = "paper",
    batch: int = 64,
    *,
    dtype: str = "bf16",
    image_size: int | None = None,
    peak_tflops: float = H100_PEAK_TFLOPS,
    bandwidth_tbs: float = H100_BANDWIDTH_TBS,
) -> Roofline:
    """Count one conditional forward of ``preset`` at ``batch`` (see module docstring).

    Args:
        preset: Generator preset.
        batch: Images per forward (the benchmark's batch x guidance passes).
        dtype: ``bf16`` or ``fp32``: the element size of weights and activations.
        image_size: Override the preset's size.
        peak_tflops: Peak rate for the compute time of each op.
        bandwidth_tbs: Memory bandwidth for the memory time of each op.
    """
    if batch < 1:
        raise CxrsynthError(f"batch must be >= 1, got {batch}")
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise UnknownNameError("dtype", dtype, ("bf16", "fp32"))
    cfg = get_preset(preset, **({"image_size": image_size} if image_size else {}))
    with torch.device("meta"):
        model = ConditionalUNet.build(cfg).eval()
    for p in model.parameters():  # cast on meta: nothing to keep in fp32, no warning
        p.data = p.data.to(torch_dtype)
    s = cfg.image_size
    x = torch.empty(batch, cfg.in_channels, s, s, device="meta", dtype=torch_dtype)
    t = torch.empty(batch, device="meta", dtype=torch.long)
    c = torch.empty(batch, cfg.condition_size, device="meta", dtype=torch_dtype)
    costs, y = trace(model, x, t, c)
    return summarize(costs, [y], batch, peak_tflops=peak_tflops, bandwidth_tbs=bandwidth_tbs,
                     preset=preset, image_size=s, dtype=dtype)
