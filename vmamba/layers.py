"""VMamba building blocks: SS2D (2D selective scan), the VSS block, patch embeddings, downsampling,
MLPs, norms and drop path.

Layouts: channel-first modules take and return ``[B, C, H, W]``; channel-last ones ``[B, H, W, C]``.
Module and parameter names follow the official VMamba checkpoints so ``state_dict`` keys match.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

import scanlib

from .config import Activation, DownsampleKind, MLPConfig, NormKind, OutNorm, RoutesSpec, SSMConfig

__all__ = [
    "SS2D",
    "DropPath",
    "GatedMlp",
    "LayerNorm2d",
    "Linear2d",
    "Mlp",
    "PatchEmbedV1",
    "PatchMerging2D",
    "Permute",
    "VSSBlock",
    "make_act",
    "make_downsample",
    "make_norm",
    "make_patch_embed",
    "resolve_routes",
]


_CL = torch.channels_last


def _cl_weight(conv: nn.Conv2d) -> nn.Conv2d:
    """Store ``conv``'s weight in channels-last memory order (same values, same state_dict).

    The activations of these models are channels-last in memory (a LayerNorm over channels
    leaves them so); oneDNN then wants an [out, kh, kw, in] weight and would reorder a
    channel-first one on every call."""
    conv.weight.data = conv.weight.data.contiguous(memory_format=_CL)
    return conv


def _conv(*args, **kwargs) -> nn.Conv2d:
    """``nn.Conv2d(*args, **kwargs)`` with a channels-last weight (see :func:`_cl_weight`)."""
    return _cl_weight(nn.Conv2d(*args, **kwargs))


def make_act(kind: Activation) -> nn.Module:
    return {
        Activation.SILU: nn.SiLU,
        Activation.GELU: nn.GELU,
        Activation.RELU: nn.ReLU,
        Activation.SIGMOID: nn.Sigmoid,
    }[Activation(kind)]()


class DropPath(nn.Module):
    """Stochastic depth: drops whole samples of a residual branch with probability ``p`` while
    training and rescales the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channel-first ``[B, C, H, W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A per-pixel linear map on channel-first ``[B, C, H, W]`` maps (a 1x1 conv whose weight is
    stored as the ``[out, in]`` matrix of ``nn.Linear``; ``[out, in, 1, 1]`` weights load too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=_CL):
            # channels-last in memory (the usual case: LayerNorm2d leaves maps so): a plain GEMM
            # over the pixels, no layout reorders; the result is channels-last again
            return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        w = state_dict.get(prefix + "weight")
        if w is not None and w.ndim == 4 and w.shape[2:] == (1, 1):
            state_dict[prefix + "weight"] = w.reshape(w.shape[:2])
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SoftmaxSpatial(nn.Module):
    """Softmax over the spatial positions of each channel (``[B, C, H, W]`` or ``[B, H, W, C]``)."""

    def __init__(self, channels_first: bool) -> None:
        super().__init__()
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return x.flatten(2).softmax(-1).view_as(x)
        return x.flatten(1, 2).softmax(1).view_as(x)


def make_norm(kind: NormKind, dim: int) -> nn.Module:
    """The normalisation of ``kind`` for ``dim`` channels (in the layout ``kind`` implies)."""
    kind = NormKind(kind)
    if kind is NormKind.LN:
        return nn.LayerNorm(dim)
    if kind is NormKind.LN2D:
        return LayerNorm2d(dim)
    return nn.BatchNorm2d(dim)


def resolve_routes(spec: RoutesSpec) -> scanlib.RouteSet:
    """A scanlib ``RouteSet`` from a registered name (or key) or a RouteSet."""
    if not isinstance(spec, (str, scanlib.RouteSet)):
        raise TypeError(
            f"routes: expected a route set name or a scanlib RouteSet, got {type(spec).__name__}"
        )
    return scanlib.get_route_set(spec)


def routes_key(spec: RoutesSpec) -> str:
    """The string scanlib knows a route set by (its name, or an unregistered set's unique key).

    Modules keep this string rather than the RouteSet, so models deep-copy and pickle (EMA copies,
    DataParallel) and the route ops receive a plain string under ``torch.compile``."""
    return resolve_routes(spec).key


# ------------------------------------------------------------------------------------------------
# SS2D

#: elements of one chunk's [b, K, Di, L] scan intermediates on CPU (4 MiB in float32: ~L2/L3-sized)
_CPU_SCAN_CHUNK = 1 << 20
_CPU_BLOCK_CHUNK = 1 << 21  # elements of a VSS block's widest activation per sample group


def _dt_bias_init(n: int, cfg: SSMConfig) -> torch.Tensor:
    # dt ~ log-uniform in [dt_min, dt_max]; store softplus^-1(dt) so softplus(bias) = dt
    lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dt = torch.exp(torch.rand(n) * (hi - lo) + lo).clamp(min=cfg.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class SS2D(nn.Module):
    """The 2D selective scan mixer.

    ``x``: ``[B, C, H, W]`` (``channels_first``) or ``[B, H, W, C]`` -> same layout and shape.

    in_proj (d_model -> d_inner, or 2 d_inner with the z gate) -> depthwise conv -> act -> cross
    scan over the K routes -> per-route projection to (dt [R], B [N], C [N]) -> dt projection
    [R -> d_inner] -> selective scan of the K*d_inner channels (delta_softplus, bias
    ``dt_projs_bias``, A = -exp(A_logs), D = Ds; B and C shared by the channels of a route) ->
    cross merge (sum over routes) -> out_norm -> [out_act] -> [* z] -> out_proj.

    Parameters (K routes, Di = d_inner, R = dt_rank, N = d_state): ``x_proj_weight [K, R+2N, Di]``,
    ``A_logs [K*Di, N]``, ``Ds [K*Di]``, ``dt_projs_weight [K, Di, R]``, ``dt_projs_bias [K, Di]``.
    """

    def __init__(self, d_model: int, cfg: SSMConfig, channels_first: bool) -> None:
        super().__init__()
        self.channels_first = channels_first
        self.d_model = d_model
        self.d_inner = di = cfg.d_inner(d_model)
        self.d_state = n = cfg.d_state
        self.dt_rank = r = cfg.rank(d_model)
        routes = resolve_routes(cfg.routes)
        self.routes_key = routes.key
        self.k_group = k = len(routes)
        # routes that each read every pixel: the whole scan path is one cross_selective_scan
        self._fused = routes.is_permutation
        cfg = dataclasses.replace(cfg, routes=routes.key)
        self.cfg = cfg
        if di < 1:
            raise ValueError(
                f"SS2D needs d_inner >= 1 (ssm_ratio={cfg.ssm_ratio}, d_model={d_model})"
            )
        Linear = Linear2d if channels_first else nn.Linear

        # Parameters first: state_dict lists a module's own parameters before its children.
        x_proj = torch.empty(k, r + 2 * n, di)
        for i in range(k):  # nn.Linear's default init, one route at a time
            nn.init.kaiming_uniform_(x_proj[i], a=math.sqrt(5))
        self.x_proj_weight = nn.Parameter(x_proj)
        if cfg.init == "v0":
            a_logs = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(k * di, 1)
            ds = torch.ones(k * di)
            std = r**-0.5 * cfg.dt_scale
            if cfg.dt_init == "constant":
                dt_w = torch.full((k, di, r), std)
            else:
                dt_w = torch.empty(k, di, r).uniform_(-std, std)
            dt_b = torch.stack([_dt_bias_init(di, cfg) for _ in range(k)])
        elif cfg.init == "v1":
            a_logs = torch.randn(k * di, n)
            ds = torch.ones(k * di)
            dt_w = 0.1 * torch.randn(k, di, r)
            dt_b = 0.1 * torch.randn(k, di)
        else:  # "v2"
            a_logs = torch.zeros(k * di, n)
            ds = torch.ones(k * di)
            dt_w = 0.1 * torch.rand(k, di, r)
            dt_b = 0.1 * torch.rand(k, di)
        self.A_logs = nn.Parameter(a_logs)
        self.Ds = nn.Parameter(ds)
        self.dt_projs_weight = nn.Parameter(dt_w)
        self.dt_projs_bias = nn.Parameter(dt_b)
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True  # read by optimiser param-group helpers

        out_norm = self._make_out_norm(cfg.out_norm, di, channels_first)
        if channels_first:  # the v2 checkpoints register out_norm first, the v0 ones after conv2d
            self.out_norm = out_norm
        self.in_proj = Linear(d_model, 2 * di if cfg.z_gate else di, bias=cfg.bias)
        self.act = make_act(cfg.act)
        if cfg.d_conv > 1:
            self.conv2d = _conv(
                di, di, cfg.d_conv, padding=(cfg.d_conv - 1) // 2, groups=di, bias=cfg.conv_bias
            )
        else:
            self.conv2d = None
        if not channels_first:
            self.out_norm = out_norm
        self.out_act = nn.GELU() if cfg.out_act else nn.Identity()
        self.out_proj = Linear(di, d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @property
    def routes(self) -> scanlib.RouteSet:
        """The route set (K routes) this layer scans along."""
        return scanlib.get_route_set(self.routes_key)

    @staticmethod
    def _make_out_norm(kind: OutNorm, di: int, channels_first: bool) -> nn.Module:
        # channel-last dwconv variants permute around the conv; the Sequential indices keep the
        # official key names (out_norm.0 = norm, out_norm.1 / .2 = conv)
        to_cf = nn.Identity() if channels_first else Permute(0, 3, 1, 2)
        to_cl = nn.Identity() if channels_first else Permute(0, 2, 3, 1)
        ln = LayerNorm2d(di) if channels_first else nn.LayerNorm(di)
        if kind is OutNorm.LAYERNORM:
            return ln
        if kind is OutNorm.NONE:
            return nn.Identity()
        if kind is OutNorm.DWCONV3:
            return nn.Sequential(to_cf, _conv(di, di, 3, padding=1, groups=di, bias=False), to_cl)
        if kind is OutNorm.CNORM:
            return nn.Sequential(
                ln, to_cf, _conv(di, di, 3, padding=1, groups=di, bias=False), to_cl
            )
        if kind is OutNorm.SIGMOID:
            return nn.Sigmoid()
        return SoftmaxSpatial(channels_first)

    def scan(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """The SSM core: ``x [B, Di, H, W]`` (or ``[B, H, W, Di]`` when ``channels_last``) ->
        merged scan output in float32, ``[B, Di, H, W]`` if the block is channel-first else
        ``[B, H, W, Di]``.

        Route sets whose routes each read every pixel run as one ``cross_selective_scan``
        (:meth:`_scan_fused`); the others as cross_scan, projections, selective_scan and
        cross_merge, where on CPU (eager) a large batch is cut into chunks of samples whose
        ``[b, K, Di, L]`` intermediates stay cache-sized: the K-fold expanded tensors of a whole
        batch would stream through memory several times (and, above malloc's mmap threshold, be
        page-faulted in afresh on every call). Each sample is independent: the same result.
        """
        if self._fused:
            return self._scan_fused(x, channels_last)
        b = x.shape[0]
        if b > 1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
            per_sample = self.k_group * self.d_inner * h * w
            step = max(1, _CPU_SCAN_CHUNK // per_sample)
            if step < b:
                return torch.cat([self._scan(xc, channels_last) for xc in x.split(step)])
        return self._scan(x, channels_last)

    def _scan_args(self, cdt: torch.dtype) -> tuple[torch.Tensor, dict]:
        """A = -exp(A_logs) ``[K*Di, N]`` and the scan arguments both scan paths share (D skip,
        dt bias + softplus, float32 out)."""
        a, d, bias = self._constants(cdt)
        return a, dict(
            D=d, delta_bias=bias, delta_softplus=True, out_dtype=cdt, backend=self.cfg.scan_backend
        )

    def _constants(self, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A = -exp(A_logs) [K*Di, N], D [K*Di], delta_bias [K*Di]) in ``cdt``.

        Without gradients they are made once and kept while the parameters are unchanged (their
        version counters and storage): the same tensors on every call, so a backend's cache of
        its host-side copies (keyed by tensor) hits, and batch-1 inference skips three ops a
        call. Kept as normal tensors (not inference tensors), whose version counters backends
        can check."""
        a, d, bias = self.A_logs, self.Ds, self.dt_projs_bias
        if (
            torch.is_grad_enabled() and (a.requires_grad or d.requires_grad or bias.requires_grad)
        ) or torch.compiler.is_compiling():
            return self._make_constants(cdt)
        if a.is_inference() or d.is_inference() or bias.is_inference():
            return self._make_constants(cdt)
        key = (cdt, a._version, d._version, bias._version, a.data_ptr(), d.data_ptr(),
               bias.data_ptr(), a.device)  # fmt: skip
        got = getattr(self, "_constants_cache", None)  # absent in modules pickled before it
        if got is None or got[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                got = (key, self._make_constants(cdt))
            self._constants_cache = got
        return got[1]

    def _make_constants(self, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            -torch.exp(self.A_logs.to(cdt)),
            self.Ds.to(cdt),
            self.dt_projs_bias.reshape(-1).to(cdt),
        )

    def _scan_fused(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """The scan path as ONE ``scanlib.cross_selective_scan`` (route sets whose routes each
        read every pixel): the per-route projections are per pixel, so they run on the map in
        its natural order, as one GEMM ``[B, H, W, Di] -> [B, H, W, K*(R+2N)]``, and the dt
        projection is passed as the low-rank ``delta_proj`` (applied inside a fused kernel, or
        as a batched matmul after reading the ranks along the routes). No K-fold copies of the
        map are made by the model."""
        k, n, r = self.k_group, self.d_state, self.dt_rank
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        a, opts = self._scan_args(cdt)
        xl = x if channels_last else x.permute(0, 2, 3, 1)  # [B, H, W, Di]: a view when x is
        b, h, w, di = xl.shape  # channels-last in memory, as in_proj/conv2d leave it
        x_dbl = F.linear(xl, self.x_proj_weight.to(xl.dtype).view(k * (r + 2 * n), di))
        x_dbl = x_dbl.view(b, h, w, k, r + 2 * n).permute(0, 3, 4, 1, 2)  # [B, K, R+2N, H, W]
        if self.cfg.force_fp32:
            x, x_dbl = x.to(cdt), x_dbl.to(cdt)
        else:
            x_dbl = x_dbl.to(x.dtype)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        y = scanlib.cross_selective_scan(
            x, dts, a, bs, cs, **opts,
            routes=self.routes_key, delta_proj=self.dt_projs_weight, channels_last=channels_last,
        )  # fmt: skip
        if channels_last == self.channels_first:  # the block's layout, as a view
            y = y.permute(0, 3, 1, 2) if channels_last else y.permute(0, 2, 3, 1)
        return y

    def _scan(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        if channels_last:
            b, h, w, c = x.shape
        else:
            b, c, h, w = x.shape
        k, n, r = self.k_group, self.d_state, self.dt_rank
        xs = scanlib.cross_scan(x, self.routes_key, channels_last=channels_last)  # [B, K, Di, L]
        length = xs.shape[-1]  # H*W, or the longest route of a sub-grid route set
        # the per-route projections as batched matmuls over the K routes (no permuted copies):
        # [K, R+2N, Di] @ [B, K, Di, L] -> [B, K, R+2N, L]; then [K, Di, R] @ [B, K, R, L]
        x_dbl = torch.matmul(self.x_proj_weight.to(xs.dtype), xs)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.matmul(self.dt_projs_weight.to(xs.dtype), dts)
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        u = xs.reshape(b, k * c, length)
        delta = dts.reshape(b, k * c, length)
        bs, cs = bs.contiguous(), cs.contiguous()
        if self.cfg.force_fp32:
            u, delta, bs, cs = (t.to(cdt) for t in (u, delta, bs, cs))
        else:
            delta, bs, cs = (t.to(u.dtype) for t in (delta, bs, cs))
        a, opts = self._scan_args(cdt)
        ys = scanlib.selective_scan(u, delta, a, bs, cs, **opts)
        ys = ys.view(b, k, c, length)
        return scanlib.cross_merge(ys, self.routes_key, h, w, channels_last=not self.channels_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdim = 1 if self.channels_first else -1
        x = self.in_proj(x)
        z = None
        if self.cfg.z_gate:
            x, z = x.chunk(2, dim=cdim)
            if self.cfg.z_act:
                z = self.act(z)
        channels_last = False
        if self.conv2d is not None:
            if not self.channels_first:
                x = x.permute(0, 3, 1, 2)
            x = _act_fresh(self.act, self.conv2d(x), self.conv2d)
        else:
            channels_last = not self.channels_first
            x = self.act(x)
        y = self.out_norm(self.scan(x, channels_last=channels_last)).to(x.dtype)
        y = self.out_act(y)
        if z is not None:
            y = y * z
        return self.dropout(self.out_proj(y))

    def extra_repr(self) -> str:
        routes = self.routes_key
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
            f"dt_rank={self.dt_rank}, routes={routes!r} (K={self.k_group}), "
            f"z_gate={self.cfg.z_gate}, backend={self.cfg.scan_backend!r}"
        )


# ------------------------------------------------------------------------------------------------
# MLP and the VSS block


def _hooked(*modules: nn.Module) -> bool:
    """Whether forward hooks (on these modules, or global ones) may see their tensors."""
    from torch.nn.modules import module as m

    if getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None):
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks for mod in modules)


def _act_fresh(act: nn.Module, x: torch.Tensor, source: nn.Module) -> torch.Tensor:
    """``act(x)`` for the fresh output ``x`` of ``source`` (a conv or linear): in place when no
    gradient needs x and no forward hook can see x or the activation (a hook that kept
    ``source``'s output must not find it overwritten; a hook on ``act`` must run). A second
    multi-MB tensor per call is page-faulted in afresh on CPU: SS2D's conv + SiLU at stage 1,
    batch 8, took 16.6 ms out of place and 3.7 ms in place; the MLP's GELU in place made a
    VMamba-T forward at batch 8 1.8 % faster (2 threads)."""
    if (torch.is_grad_enabled() and x.requires_grad) or _hooked(act, source):
        return act(x)
    kind = type(act)
    if kind is nn.SiLU:
        return F.silu(x, inplace=True)
    if kind is nn.ReLU:
        return F.relu(x, inplace=True)
    if kind is nn.GELU and hasattr(torch.ops.aten, "gelu_"):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop (per pixel; channel-first uses :class:`Linear2d`)."""

    def __init__(self, dim: int, hidden: int, cfg: MLPConfig, channels_first: bool) -> None:
        super().__init__()
        Linear = Linear2d if channels_first else nn.Linear
        self.fc1 = Linear(dim, hidden)
        self.act = make_act(cfg.act)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(cfg.drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(_act_fresh(self.act, self.fc1(x), self.fc1))))


class GatedMlp(nn.Module):
    """fc1 to 2 x hidden, split into (x, z), fc2(x * act(z)) -> drop (the official gMlp)."""

    def __init__(self, dim: int, hidden: int, cfg: MLPConfig, channels_first: bool) -> None:
        super().__init__()
        Linear = Linear2d if channels_first else nn.Linear
        self.channels_first = channels_first
        self.fc1 = Linear(dim, 2 * hidden)
        self.act = make_act(cfg.act)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(cfg.drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.fc1(x).chunk(2, dim=1 if self.channels_first else -1)
        return self.drop(self.fc2(x * self.act(z)))


class VSSBlock(nn.Module):
    """``x = x + drop_path(SS2D(norm(x)))``, then ``x = x + drop_path(MLP(norm2(x)))``.

    The SS2D branch is absent when ``ssm_ratio == 0``, the MLP branch when ``mlp.ratio == 0``.
    ``use_checkpoint`` recomputes the block in the backward pass (activation checkpointing).
    """

    def __init__(
        self,
        dim: int,
        ssm: SSMConfig,
        mlp: MLPConfig,
        norm: NormKind,
        drop_path: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        channels_first = NormKind(norm).channels_first
        self.use_checkpoint = use_checkpoint
        self.ssm_branch = ssm.ssm_ratio > 0
        self.mlp_branch = mlp.ratio > 0
        if self.ssm_branch:
            self.norm = make_norm(norm, dim)
            self.op = SS2D(dim, ssm, channels_first)
        self.drop_path = DropPath(drop_path)
        if self.mlp_branch:
            self.norm2 = make_norm(norm, dim)
            mlp_cls = GatedMlp if mlp.gated else Mlp
            self.mlp = mlp_cls(dim, int(dim * mlp.ratio), mlp, channels_first)
        # widest activation of the block relative to its input (for CPU batch chunking)
        self._widening = max(
            1.0,
            (2 if mlp.gated else 1) * mlp.ratio if self.mlp_branch else 1.0,
            2 * ssm.ssm_ratio if self.ssm_branch else 1.0,
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ssm_branch:
            x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp_branch:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, use_reentrant=False)
        b = x.shape[0]
        if (
            b > 1
            and not self.training
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
        ):
            # CPU inference: run the block over groups of samples whose widest activation (the
            # MLP's hidden layer) stays cache-sized and below malloc's mmap threshold; a whole
            # batch's 4x-wide hidden tensor is fresh memory, page-faulted in on every call
            # (stage 1 MLP at batch 8: 59 -> 33 ms on 2 threads). Samples are independent.
            step = max(1, int(_CPU_BLOCK_CHUNK // (x[0].numel() * self._widening)))
            if step < b:
                return torch.cat([self._forward(xc) for xc in x.split(step)])
        return self._forward(x)


# ------------------------------------------------------------------------------------------------
# Patch embeddings and downsampling (nn.Sequential so the official indices name the parameters)


class PatchEmbedV1(nn.Sequential):
    """``patch_size`` x ``patch_size`` conv with that stride (keys ``.0``), [permute], norm (``.2``).

    Inputs whose size is not a multiple of ``patch_size`` are zero-padded at the bottom/right, so
    the output is ``ceil(H / patch_size)`` x ``ceil(W / patch_size)``.
    """

    def __init__(
        self, in_chans: int, dim: int, patch_size: int, norm: NormKind | None, channels_first: bool
    ) -> None:
        super().__init__(
            _conv(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            nn.Identity() if channels_first else Permute(0, 2, 3, 1),
            make_norm(norm, dim) if norm is not None else nn.Identity(),
        )
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        ph, pw = -x.shape[-2] % p, -x.shape[-1] % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return super().forward(x)


def _patch_embed_v2(
    in_chans: int, dim: int, patch_size: int, norm: NormKind | None, channels_first: bool
) -> nn.Sequential:
    # two 3x3 convs of stride patch_size/2 with padding 1: output ceil(H / patch_size) for any H
    stride = patch_size // 2
    k = stride + 1
    to_cl = nn.Identity() if channels_first else Permute(0, 2, 3, 1)
    to_cf = nn.Identity() if channels_first else Permute(0, 3, 1, 2)
    has_norm = norm is not None
    return nn.Sequential(
        _conv(in_chans, dim // 2, kernel_size=k, stride=stride, padding=1),
        to_cl if has_norm else nn.Identity(),
        make_norm(norm, dim // 2) if has_norm else nn.Identity(),
        to_cf if has_norm else nn.Identity(),
        nn.GELU(),
        _conv(dim // 2, dim, kernel_size=k, stride=stride, padding=1),
        nn.Identity() if channels_first else Permute(0, 2, 3, 1),
        make_norm(norm, dim) if has_norm else nn.Identity(),
    )


def make_patch_embed(
    kind: str, in_chans: int, dim: int, patch_size: int, norm: NormKind | None, channels_first: bool
) -> nn.Module:
    """The stem: ``[B, in_chans, H, W]`` -> ``[B, dim, H/p, W/p]`` (or channel-last)."""
    if kind == "v1":
        return PatchEmbedV1(in_chans, dim, patch_size, norm, channels_first)
    if kind == "v2":
        return _patch_embed_v2(in_chans, dim, patch_size, norm, channels_first)
    raise ValueError(f"patch_embed: unknown kind {kind!r}")


class PatchMerging2D(nn.Module):
    """Downsample v1: concatenate each 2x2 neighbourhood (order (0,0), (1,0), (0,1), (1,1)),
    normalise the 4C channels, project to ``out_dim`` (``reduction``, no bias). Odd sizes are
    zero-padded at the bottom/right."""

    def __init__(self, dim: int, out_dim: int, norm: NormKind) -> None:
        super().__init__()
        self.channels_first = NormKind(norm).channels_first
        Linear = Linear2d if self.channels_first else nn.Linear
        self.reduction = Linear(4 * dim, out_dim, bias=False)
        self.norm = make_norm(norm, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            h, w = x.shape[-2:]
            if h % 2 or w % 2:
                x = F.pad(x, (0, w % 2, 0, h % 2))
            parts = [x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]]
            x = torch.cat(parts, dim=1)
        else:
            h, w = x.shape[-3:-1]
            if h % 2 or w % 2:
                x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            parts = [
                x[..., 0::2, 0::2, :],
                x[..., 1::2, 0::2, :],
                x[..., 0::2, 1::2, :],
                x[..., 1::2, 1::2, :],
            ]
            x = torch.cat(parts, dim=-1)
        return self.reduction(self.norm(x))


def make_downsample(kind: DownsampleKind, dim: int, out_dim: int, norm: NormKind) -> nn.Module:
    """Halve the resolution (ceil for odd sizes) and map ``dim`` -> ``out_dim`` channels."""
    kind = DownsampleKind(kind)
    channels_first = NormKind(norm).channels_first
    if kind is DownsampleKind.NONE:
        return nn.Identity()
    if kind is DownsampleKind.V1:
        return PatchMerging2D(dim, out_dim, norm)
    to_cf = nn.Identity() if channels_first else Permute(0, 3, 1, 2)
    to_cl = nn.Identity() if channels_first else Permute(0, 2, 3, 1)
    if kind is DownsampleKind.V2:
        conv = _PaddedConv2x2(dim, out_dim)
    else:
        conv = _conv(dim, out_dim, kernel_size=3, stride=2, padding=1)
    return nn.Sequential(to_cf, conv, to_cl, make_norm(norm, out_dim))


class _PaddedConv2x2(nn.Conv2d):
    """A 2x2 stride-2 conv that zero-pads odd sizes (so the output is ceil(H/2))."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(dim, out_dim, kernel_size=2, stride=2)
        _cl_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2))
        return super().forward(x)
