"""``cross_selective_scan``: cross scan, per-route selective scan and cross merge as one op.

Letters: B batch, Di channels of the map, H x W map, L = H*W, K routes, N state size,
R rank of a low-rank delta.

The op computes exactly what VMamba's SS2D computes with three calls::

    xs = cross_scan(x, routes)                                    # [B, K, Di, L]
    ys = selective_scan(xs as [B, K*Di, L], delta of route k read along route k,
                        A, B/C of route k read along route k (grouped [B, K, N, L]),
                        D, delta_bias, delta_softplus)
    out = cross_merge(ys as [B, K, Di, L], routes, H, W)          # sum over the routes

but takes the per-route inputs (delta, B, C) in the map's NATURAL pixel order, ``[B, K, *, H, W]``:
per-pixel projections commute with the route permutation, so a model can project the map once
and never materialise the K reordered copies. A backend may implement the op as one fused kernel
(registry op ``"cross_selective_scan"``); otherwise, and whenever gradients are needed from a
backend that declares no backward, the composition above runs through the public ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops as _ops
from . import registry
from .errors import BackendUnavailableError, ScanInputError, ScanlibError
from .inputs import INPUT_DTYPES, Feature
from .routes.core import RouteSet, get_route_set

__all__ = ["CrossScanInputs", "cross_selective_scan"]

OP = "cross_selective_scan"

BackendSpec = str | Sequence[str] | None


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _expect(name: str, t: Any, expected: tuple[int, ...], letters: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ScanInputError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != expected:
        exp = "[" + ", ".join(f"{c}={n}" for c, n in zip(letters.split(","), expected)) + "]"
        raise ScanInputError(f"{OP}: {name}: expected shape {exp}, got {_shape(t)}")


@dataclass
class CrossScanInputs:
    """Validated inputs of one ``cross_selective_scan`` call, as backends receive them.

    x: ``[B, Di, H, W]`` (``[B, H, W, Di]`` when ``channels_last``); delta: ``[B, K, Di, H, W]``,
    or ``[B, K, R, H, W]`` with ``delta_proj [K, Di, R]`` (low-rank: route k's delta is
    ``delta_proj[k] @ delta[:, k]`` per pixel); A: ``[K*Di, N]``; B, C: ``[B, K, N, H, W]``;
    D, delta_bias: ``[K*Di]`` (route-major: channel ``k*Di + d`` is channel d of route k).
    Every route of ``routes`` reads every pixel exactly once (``routes.is_permutation``).
    """

    x: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None
    delta_bias: torch.Tensor | None
    delta_softplus: bool
    routes: RouteSet
    channels_last: bool = False
    out_dtype: torch.dtype | None = None
    delta_proj: torch.Tensor | None = None
    batch: int = field(init=False, default=0)
    dim: int = field(init=False, default=0)
    H: int = field(init=False, default=0)
    W: int = field(init=False, default=0)
    K: int = field(init=False, default=0)
    dstate: int = field(init=False, default=0)
    rank: int = field(init=False, default=0)

    op = OP

    def __post_init__(self) -> None:
        self.routes = get_route_set(self.routes)
        rs = self.routes
        if not rs.is_permutation:
            raise ScanInputError(
                f"{OP}: route set {rs.name!r} has sub-grid routes (some route skips pixels); the "
                "op needs routes that each read every pixel once. Use cross_scan, selective_scan "
                "and cross_merge for such sets."
            )
        x = self.x
        if not isinstance(x, torch.Tensor):
            raise ScanInputError(f"{OP}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            want = "[B, H, W, Di]" if self.channels_last else "[B, Di, H, W]"
            raise ScanInputError(f"{OP}: x must be {want} (4 dims), got {_shape(x)}")
        if self.channels_last:
            b, h, w, di = x.shape
        else:
            b, di, h, w = x.shape
        if min(b, di, h, w) < 1:
            raise ScanInputError(f"{OP}: x: every size must be >= 1, got {_shape(x)}")
        k = len(rs)
        self.batch, self.dim, self.H, self.W, self.K = b, di, h, w, k
        if self.delta_proj is not None:
            p = self.delta_proj
            if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[:2] != (k, di):
                got = _shape(p) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ScanInputError(
                    f"{OP}: delta_proj: expected shape [K={k}, Di={di}, R], got {got}"
                )
            self.rank = p.shape[2]
            if self.rank < 1:
                raise ScanInputError(f"{OP}: delta_proj: R must be >= 1, got {_shape(p)}")
            _expect("delta (low-rank, with delta_proj)", self.delta, (b, k, self.rank, h, w),
                    "B,K,R,H,W")  # fmt: skip
        else:
            _expect("delta", self.delta, (b, k, di, h, w), "B,K,Di,H,W")
        if not isinstance(self.A, torch.Tensor) or self.A.dim() != 2 or self.A.shape[0] != k * di:
            got = _shape(self.A) if isinstance(self.A, torch.Tensor) else type(self.A).__name__
            raise ScanInputError(f"{OP}: A: expected shape [K*Di={k * di}, N], got {got}")
        n = self.A.shape[1]
        if n < 1:
            raise ScanInputError(f"{OP}: A: N must be >= 1, got {_shape(self.A)}")
        self.dstate = n
        _expect("B", self.B, (b, k, n, h, w), "B,K,N,H,W")
        _expect("C", self.C, (b, k, n, h, w), "B,K,N,H,W")
        for name in ("D", "delta_bias"):
            t = getattr(self, name)
            if t is not None:
                _expect(name, t, (k * di,), "K*Di")
        self._check_dtypes_devices()

    def _check_dtypes_devices(self) -> None:
        dt = self.x.dtype
        if dt not in INPUT_DTYPES:
            raise ScanInputError(
                f"{OP}: x: dtype {dt} is not supported; use float32, float16, bfloat16 or float64"
            )
        for name in ("delta", "B", "C"):
            t = getattr(self, name)
            if t.dtype != dt:
                raise ScanInputError(
                    f"{OP}: {name}: dtype {t.dtype} differs from x's {dt}; x, delta, B and C "
                    "share one dtype"
                )
        ok = (torch.float32, torch.float64) if dt == torch.float64 else (torch.float32,)
        for name in ("A", "D", "delta_bias"):
            t = getattr(self, name)
            if t is not None and t.dtype not in ok:
                raise ScanInputError(
                    f"{OP}: {name}: dtype {t.dtype} is not allowed with {dt} inputs; expected "
                    + " or ".join(str(o) for o in ok)
                )
        if self.delta_proj is not None and self.delta_proj.dtype not in (dt, *ok):
            raise ScanInputError(
                f"{OP}: delta_proj: dtype {self.delta_proj.dtype} must be {dt} or float32"
            )
        if self.out_dtype is not None and self.out_dtype not in (dt, torch.float32, torch.float64):
            raise ScanInputError(
                f"{OP}: out_dtype: {self.out_dtype} is not allowed with {dt} inputs; use None, "
                f"{dt} or torch.float32"
            )
        dev = self.x.device
        for name in ("delta", "A", "B", "C", "D", "delta_bias", "delta_proj"):
            t = getattr(self, name)
            if t is not None and t.device != dev:
                raise ScanInputError(
                    f"{OP}: {name}: on device {t.device}, but x is on {dev}; all tensors must "
                    "share one device"
                )

    # ---------------------------------------------------------------- what backends look at
    @property
    def L(self) -> int:
        return self.H * self.W

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.x.dtype == torch.float64 else torch.float32

    @property
    def result_dtype(self) -> torch.dtype:
        return self.out_dtype if self.out_dtype is not None else self.x.dtype

    @property
    def low_rank(self) -> bool:
        """delta is ``[B, K, R, H, W]`` and route k's delta is ``delta_proj[k] @ delta[:, k]``."""
        return self.delta_proj is not None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.x, self.delta, self.A, self.B, self.C, self.D, self.delta_bias,
                self.delta_proj)  # fmt: skip

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in self.tensors()
        )

    @property
    def features(self) -> frozenset[Feature]:
        """The selective-scan features the call uses (B/C count as grouped, one group a route)."""
        f = {Feature.GROUPED_BC}
        if self.D is not None:
            f.add(Feature.D_SKIP)
        if self.delta_bias is not None:
            f.add(Feature.DELTA_BIAS)
        if self.delta_softplus:
            f.add(Feature.DELTA_SOFTPLUS)
        if self.needs_grad:
            f.add(Feature.BACKWARD)
        if self.result_dtype != self.dtype:
            f.add(Feature.OUT_FLOAT32)
        return frozenset(f)

    def indices(self) -> torch.Tensor:
        """``[K, L]`` pixel (``h*W + w``) route k reads at step l, on this call's device (cached)."""
        return self.routes.indices(self.H, self.W, self.device)

    def out_shape(self) -> tuple[int, int, int, int]:
        b, di, h, w = self.batch, self.dim, self.H, self.W
        return (b, h, w, di) if self.channels_last else (b, di, h, w)

    def describe(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        rank = f", low-rank delta R={self.rank}" if self.low_rank else ""
        return (
            f"{OP} of x {_shape(self.x)}{layout} over route set {self.routes.name!r} "
            f"(K={self.K}, H={self.H}, W={self.W}), N={self.dstate}{rank}, {self.dtype} on "
            f"{self.device}"
        )


# ---------------------------------------------------------------------- the composition
def _along_routes(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-route maps ``[B, K, C, H, W]`` read along their routes: ``[B, K, C, L]``."""
    b, k, c = t.shape[:3]
    flat = t.reshape(b, k, c, -1)
    L = idx.shape[1]
    return torch.gather(flat, 3, idx.view(1, k, 1, L).expand(b, k, c, L))


#: elements of one chunk's [b, K, Di, L] intermediates of the composition on CPU (4 MiB float32)
_CPU_CHUNK = 1 << 20


def compose(inputs: CrossScanInputs, backend: BackendSpec = None) -> torch.Tensor:
    """The op through the public ``cross_scan``, ``selective_scan`` and ``cross_merge``
    (differentiable, any device and backend). Returns ``out_shape()`` in the result dtype.

    On CPU (eager) a batch runs in chunks of samples whose K-fold ``[b, K, Di, L]``
    intermediates stay cache-sized (and below malloc's mmap threshold, so they are not
    page-faulted in afresh on every call); samples are independent, so the result is the same.
    """
    b = inputs.batch
    if b > 1 and inputs.device.type == "cpu" and not torch.compiler.is_compiling():
        step = max(1, _CPU_CHUNK // (inputs.K * inputs.dim * inputs.L))
        if step < b:
            parts = []
            for s in range(0, b, step):
                part = [t[s : s + step] for t in (inputs.x, inputs.delta, inputs.B, inputs.C)]
                sub = CrossScanInputs(part[0], part[1], inputs.A, part[2], part[3], inputs.D,
                                      inputs.delta_bias, inputs.delta_softplus, inputs.routes,
                                      inputs.channels_last, inputs.out_dtype, inputs.delta_proj)  # fmt: skip
                parts.append(_compose(sub, backend))
            return torch.cat(parts)
    return _compose(inputs, backend)


def _compose(inputs: CrossScanInputs, backend: BackendSpec) -> torch.Tensor:
    import scanlib  # the package's attributes, so wrappers of the public ops (profilers) see them

    b, di, k, L = inputs.batch, inputs.dim, inputs.K, inputs.L
    idx = inputs.indices()
    xs = scanlib.cross_scan(
        inputs.x, inputs.routes, channels_last=inputs.channels_last, backend=backend
    )
    delta = _along_routes(inputs.delta, idx)
    if inputs.delta_proj is not None:  # [K, Di, R] @ [B, K, R, L] -> [B, K, Di, L]
        # (back in the inputs' dtype: under autocast the matmul may return another one)
        delta = torch.matmul(inputs.delta_proj.to(delta.dtype), delta).to(inputs.dtype)
    ys = scanlib.selective_scan(
        xs.reshape(b, k * di, L),
        delta.reshape(b, k * di, L),
        inputs.A,
        _along_routes(inputs.B, idx),
        _along_routes(inputs.C, idx),
        D=inputs.D,
        delta_bias=inputs.delta_bias,
        delta_softplus=inputs.delta_softplus,
        out_dtype=inputs.out_dtype,
        backend=backend,
    )
    return scanlib.cross_merge(
        ys.view(b, k, di, L),
        inputs.routes,
        inputs.H,
        inputs.W,
        channels_last=inputs.channels_last,
        backend=backend,
    )


# ---------------------------------------------------------------------- dispatch
def _implements(name: str) -> bool:
    try:
        return OP in registry.get_backend(name).ops
    except ScanlibError:  # fails to load: the composition reports it through the public ops
        return False


def fused_backend(inputs: CrossScanInputs, backend: BackendSpec = None) -> registry.Backend | None:
    """The backend that runs ``inputs`` as one fused op under the selection rules, or None when
    the composition runs (no backend implements the op for this call).

    With names in force (per call, ``use_backend``, ``set_backend``, ``SCANLIB_BACKEND``) only
    those of them that implement the op are considered, so the composition's scan still runs
    on the named backend when none of them fuses; automatic selection takes the first backend
    in priority order that can run the op."""
    names, _ = registry.current_selection(backend)
    if names is not None:
        names = tuple(n for n in names if _implements(n))
        if not names:
            return None
    try:
        return registry.select(inputs, names)
    except BackendUnavailableError:
        return None


def _run(inputs: CrossScanInputs, backend: BackendSpec) -> torch.Tensor:
    impl = fused_backend(inputs, backend)
    if impl is None:
        return compose(inputs, backend)
    return impl.cross_selective_scan(inputs)


def cross_selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    routes: RouteSet | str,
    delta_proj: torch.Tensor | None = None,
    channels_last: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: BackendSpec = None,
) -> torch.Tensor:
    """Cross scan, selective scan of every route and cross merge, in one call.

    Shapes (K routes of ``routes``, L = H*W; per-route tensors in NATURAL pixel order):
        x: [B, Di, H, W] ([B, H, W, Di] when ``channels_last``)
        delta: [B, K, Di, H, W], or [B, K, R, H, W] with ``delta_proj`` [K, Di, R]
        A: [K*Di, N]      B, C: [B, K, N, H, W]      D, delta_bias: [K*Di]
        returns [B, Di, H, W] ([B, H, W, Di] when ``channels_last``)

    Equals ``cross_merge(selective_scan(cross_scan(x) as [B, K*Di, L], delta, A, B, C, D,
    delta_bias=delta_bias, delta_softplus=delta_softplus, out_dtype=out_dtype), routes, H, W)``
    where route k's delta, B and C are read along route k (B/C grouped, one group a route) and
    route k's delta is ``delta_proj[k] @ delta[:, k]`` per pixel when ``delta_proj`` is given.
    ``routes``: a RouteSet or registered name whose routes each read every pixel once (sub-grid
    sets raise :class:`ScanInputError`). Any strides are accepted; the result's memory layout is
    not specified (a fused CPU kernel returns a channels-last one). Arithmetic is float32 (float64
    for float64 inputs); the result has ``out_dtype`` or x's dtype.

    A backend implementing the op runs it as one kernel; otherwise, or when gradients are needed
    and that backend has no backward, the composition runs (differentiable, every backend).
    """
    rs = routes if isinstance(routes, RouteSet) else get_route_set(routes)
    if _ops.use_custom_op():
        if torch.compiler.is_compiling():
            return cross_selective_scan_op(
                x, delta, A, B, C, D, delta_bias, delta_proj, delta_softplus, rs.key,
                channels_last, out_dtype, _ops.backend_spec(backend),
            )  # fmt: skip
        # inside through_custom_op() (e.g. FLOP counting): the composition, whose scan and route
        # ops then run as their own custom ops
        inputs = CrossScanInputs(x, delta, A, B, C, D, delta_bias, delta_softplus, rs,
                                 channels_last, out_dtype, delta_proj)  # fmt: skip
        return compose(inputs, backend)
    inputs = CrossScanInputs(x, delta, A, B, C, D, delta_bias, delta_softplus, rs, channels_last,
                             out_dtype, delta_proj)  # fmt: skip
    return _run(inputs, backend)


def explain_cross(*args: Any, backend: BackendSpec = None, **kwargs: Any) -> dict[str, list[str]]:
    """For ``cross_selective_scan``'s arguments, each backend's reasons for declining the fused op,
    plus ``"selected"``: the fused backend, or ``"composition"``."""
    kwargs.pop("backend", None)
    inputs = _inputs_from_args(*args, **kwargs)
    result = registry.explain(inputs)
    impl = fused_backend(inputs, backend)
    result["selected"] = [impl.name if impl is not None else "composition"]
    return result


def _inputs_from_args(
    x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *, routes,
    delta_proj=None, channels_last=False, out_dtype=None,
) -> CrossScanInputs:  # fmt: skip
    return CrossScanInputs(x, delta, A, B, C, D, delta_bias, delta_softplus, routes,
                           channels_last, out_dtype, delta_proj)  # fmt: skip


# ---------------------------------------------------------------------- torch.compile
def _spec(backend: str | None):
    return None if backend is None else backend.split(",")


def _cl_dense(out: torch.Tensor, channels_last: bool) -> torch.Tensor:
    # the op's promised layout: [B, H, W, Di] memory for either shape, fresh and dense
    if channels_last:
        return out.contiguous()
    return out.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("scanlib::cross_selective_scan", mutates_args=())
def cross_selective_scan_op(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_proj: torch.Tensor | None,
    delta_softplus: bool,
    routes: str,
    channels_last: bool,
    out_dtype: torch.dtype | None,
    backend: str | None,
) -> torch.Tensor:
    """``cross_selective_scan`` as one opaque op (route set by name/key, backend as a string);
    the result is channels-last in memory."""
    inputs = CrossScanInputs(x, delta, A, B, C, D, delta_bias, delta_softplus,
                             get_route_set(routes), channels_last, out_dtype, delta_proj)  # fmt: skip
    with torch.no_grad():
        out = _run(inputs, _spec(backend))
    return _cl_dense(out, channels_last)


@cross_selective_scan_op.register_fake
def _(x, delta, A, B, C, D, delta_bias, delta_proj, delta_softplus, routes, channels_last,
      out_dtype, backend):  # fmt: skip
    if channels_last:
        b, h, w, di = x.shape
    else:
        b, di, h, w = x.shape
    dt = out_dtype if out_dtype is not None else x.dtype
    out = x.new_empty((b, h, w, di), dtype=dt)
    return out if channels_last else out.permute(0, 3, 1, 2)


_GRAD_NAMES = ("x", "delta", "A", "B", "C", "D", "delta_bias", "delta_proj")


@torch.library.custom_op("scanlib::cross_selective_scan_bwd", mutates_args=())
def cross_selective_scan_bwd_op(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_proj: torch.Tensor | None,
    delta_softplus: bool,
    routes: str,
    channels_last: bool,
    out_dtype: torch.dtype | None,
    backend: str | None,
    dout: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradients of the 8 tensor inputs (size-0 tensors for absent ones): the adjoint of the
    composition, op by op (an op's implementation runs below autograd, so it cannot record a
    graph of aten ops and differentiate it): cross_scan of dout, the scan's backward op,
    cross_merge of du, and the inverse route permutation for delta, B and C."""
    from .routes.ops import cross_merge, cross_scan

    spec = _spec(backend)
    rs = get_route_set(routes)
    inputs = CrossScanInputs(x, delta, A, B, C, D, delta_bias, delta_softplus, rs,
                             channels_last, out_dtype, delta_proj)  # fmt: skip
    b, di, k, L, n = inputs.batch, inputs.dim, inputs.K, inputs.L, inputs.dstate
    idx = inputs.indices()
    inv = rs.inverse_indices(inputs.H, inputs.W, x.device)  # a permutation: no -1 entries
    xs = cross_scan(x, rs, channels_last=channels_last, backend=spec)
    ranks = _along_routes(delta, idx)
    delta_r = ranks
    if delta_proj is not None:
        delta_r = torch.matmul(delta_proj.to(ranks.dtype), ranks).to(x.dtype)
    dy = cross_scan(dout.to(inputs.result_dtype), rs, channels_last=channels_last, backend=spec)
    g = _ops.selective_scan_bwd_op(
        xs.reshape(b, k * di, L), delta_r.reshape(b, k * di, L), A,
        _along_routes(B, idx), _along_routes(C, idx), D, None, delta_bias, None, delta_softplus,
        out_dtype, backend, dy.reshape(b, k * di, L),
        x.new_zeros((b, k * di, n), dtype=inputs.compute_dtype),
    )  # fmt: skip
    gu, gdelta, gA, gB, gC, gD, _, gbias, _ = g
    gx = cross_merge(gu.view(b, k, di, L), rs, inputs.H, inputs.W, channels_last=channels_last,
                     backend=spec)  # fmt: skip
    gdelta = gdelta.view(b, k, di, L)
    gproj = x.new_empty(0)
    if delta_proj is not None:  # delta_r = P @ ranks
        gproj = torch.matmul(gdelta, ranks.to(gdelta.dtype).transpose(-1, -2)).sum(0)
        gdelta = torch.matmul(delta_proj.to(gdelta.dtype).transpose(1, 2), gdelta)

    def natural(gr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        c = gr.shape[2]
        gn = torch.gather(gr, 3, inv.view(1, k, 1, L).expand(b, k, c, L))
        return gn.view(like.shape).to(like.dtype)

    result = [
        gx.to(x.dtype),
        natural(gdelta, delta),
        gA.to(A.dtype),
        natural(gB.view(b, k, n, L), B),
        natural(gC.view(b, k, n, L), C),
        gD.to(D.dtype) if D is not None else x.new_empty(0),
        gbias.to(delta_bias.dtype) if delta_bias is not None else x.new_empty(0),
        gproj.to(delta_proj.dtype) if delta_proj is not None else gproj,
    ]
    return [t.contiguous() for t in result]


@cross_selective_scan_bwd_op.register_fake
def _(x, delta, A, B, C, D, delta_bias, delta_proj, delta_softplus, routes, channels_last,
      out_dtype, backend, dout):  # fmt: skip
    return [
        x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (x, delta, A, B, C, D, delta_bias, delta_proj)
    ]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs[:8] if t is not None])
    ctx.present = [t is not None for t in inputs[:8]]
    ctx.options = inputs[8:]


def _backward(ctx, dout):
    it = iter(ctx.saved_tensors)
    tensors = [next(it) if p else None for p in ctx.present]
    grads = cross_selective_scan_bwd_op(*tensors, *ctx.options, dout)
    return tuple(g if p else None for p, g in zip(ctx.present, grads)) + (None,) * 5


cross_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
