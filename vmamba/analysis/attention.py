"""The selective scan as attention: the matrix that SS2D's scan applies to its input.

For one channel with input u, the scan ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``,
``y_t = C_t . h_t + D u_t`` (from h = 0) unrolls to ``y_t - D u_t = sum_{s <= t} M[t, s] u_s`` with

    M[t, s] = sum_n C_t[n] * exp(A[n] * sum_{s < r <= t} delta_r) * delta_s * B_s[n]

(delta after the bias and softplus). M is lower triangular: token t "attends" to the tokens read
before it. SS2D runs one scan per route k over the same feature map, so mapping each route's
steps back to image positions (``RouteSet.indices``) and summing over routes gives the linear
map from the scan input to the merged output, position by position; averaged over channels it
is the attention map drawn by ``vmamba analyze attention``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import scanlib

logger = logging.getLogger("vmamba.analysis.attention")

__all__ = [
    "AttentionMaps",
    "SS2DScanInputs",
    "capture_scan_input",
    "find_ss2d_layers",
    "run_attention",
    "scan_attention_matrix",
    "scan_attention_mean",
    "ss2d_attention",
    "ss2d_scan_inputs",
]

# bytes of one [b, c, T, L] working block; channels are processed in chunks below this
_BLOCK_BYTES = 64 * 2**20


# ------------------------------------------------------------------------------------------------
# the matrix


def _grouped(t: torch.Tensor, name: str) -> torch.Tensor:
    """B or C as ``[Bt, G, N, L]`` (a ``[Bt, N, L]`` sequence is one group)."""
    if t.ndim == 3:
        return t[:, None]
    if t.ndim == 4:
        return t
    raise ValueError(f"{name}: expected [B, N, L] or [B, G, N, L], got shape {tuple(t.shape)}")


def _check(
    delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[int, int, int, int, int]:
    if delta.ndim != 3:
        raise ValueError(f"delta: expected [B, D, L], got shape {tuple(delta.shape)}")
    bt, d, L = delta.shape
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A: expected [D, N] with D={d}, got shape {tuple(A.shape)}")
    n = A.shape[1]
    g = B.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (bt, g, n, L):
            raise ValueError(f"{name}: expected [{bt}, G, {n}, {L}], got shape {tuple(t.shape)}")
    if d % g:
        raise ValueError(f"D={d} channels cannot be split into {g} groups of B/C")
    return bt, d, L, n, g


def _rows(
    S: torch.Tensor,
    dlt: torch.Tensor,
    A: torch.Tensor,
    Bg: torch.Tensor,
    Cg: torch.Tensor,
    q: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``q`` of M for a chunk of c channels sharing one B/C group.

    S: cumulative delta ``[b, c, L]`` (float64); dlt: delta ``[b, c, L]``; A: ``[c, N]``;
    Bg, Cg: ``[b, N, L]``; q: query steps ``[T]`` -> ``[b, c, T, L]`` in ``dtype``.
    """
    L = S.shape[-1]
    # sum_{s<r<=t} delta_r = S_t - S_s; clamped at 0 above the diagonal (masked out below)
    decay = (S[:, :, q, None] - S[:, :, None, :]).clamp_(min=0).to(dtype)  # [b, c, T, L]
    causal = (q[:, None] >= torch.arange(L, device=q.device)[None, :]).to(dtype)  # [T, L]
    out = torch.zeros_like(decay)
    for n in range(A.shape[1]):
        w = torch.exp(decay * A[None, :, n, None, None])
        w.mul_(Cg[:, None, n, q, None]).mul_((dlt * Bg[:, None, n, :])[:, :, None, :])
        out.add_(w)
    return out.mul_(causal)


def _prepare(delta, A, B, C, delta_bias, delta_softplus):
    B, C = _grouped(B, "B"), _grouped(C, "C")
    dims = _check(delta, A, B, C)
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    dlt = delta.to(dtype)
    if delta_bias is not None:
        dlt = dlt + delta_bias.to(dtype)[None, :, None]
    if delta_softplus:
        dlt = F.softplus(dlt)
    S = dlt.double().cumsum(-1)
    return B.to(dtype), C.to(dtype), A.to(dtype), dlt, S, dtype, dims


def scan_attention_matrix(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The per-channel attention matrix ``M [Bt, D, L, L]`` of a selective scan.

    delta: ``[Bt, D, L]``; A: ``[D, N]``; B, C: ``[Bt, N, L]`` or grouped ``[Bt, G, N, L]``
    (channel d uses group ``d // (D / G)``); ``delta_bias [D]`` / ``delta_softplus`` as in
    :func:`scanlib.selective_scan`. ``einsum("bdts,bds->bdt", M, u)`` equals the scan's output
    minus ``D * u``. Memory is ``Bt * D * L^2``: meant for small layers and tests.
    """
    B, C, A, dlt, S, dtype, (bt, d, L, n, g) = _prepare(delta, A, B, C, delta_bias, delta_softplus)
    per = d // g
    q = torch.arange(L, device=delta.device)
    out = torch.empty(bt, d, L, L, dtype=dtype, device=delta.device)
    for gi in range(g):
        sl = slice(gi * per, (gi + 1) * per)
        out[:, sl] = _rows(S[:, sl], dlt[:, sl], A[sl], B[:, gi], C[:, gi], q, dtype)
    return out


def scan_attention_mean(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    queries: torch.Tensor | None = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """The attention matrix averaged over the channels of each B/C group: ``[Bt, G, T, L]``.

    ``queries``: LongTensor ``[G, T]`` of query steps per group (rows of M to compute), or None
    for every row (T = L). ``reduce``: "mean" averages the signed weights, "absmean" their
    magnitudes. Channels are processed in chunks so memory stays ``O(Bt * T * L)``.
    """
    if reduce not in ("mean", "absmean"):
        raise ValueError(f"reduce: expected 'mean' or 'absmean', got {reduce!r}")
    B, C, A, dlt, S, dtype, (bt, d, L, n, g) = _prepare(delta, A, B, C, delta_bias, delta_softplus)
    per = d // g
    if queries is None:
        queries = torch.arange(L, device=delta.device).expand(g, L)
    queries = torch.as_tensor(queries, device=delta.device).long()
    if queries.ndim != 2 or queries.shape[0] != g:
        raise ValueError(f"queries: expected [G={g}, T], got shape {tuple(queries.shape)}")
    if queries.numel() and (int(queries.min()) < 0 or int(queries.max()) >= L):
        raise ValueError(f"queries: steps must lie in 0..{L - 1}")
    T = queries.shape[1]
    chunk = max(1, min(per, _BLOCK_BYTES // max(1, bt * T * L * 8)))
    out = torch.zeros(bt, g, T, L, dtype=dtype, device=delta.device)
    for gi in range(g):
        for c0 in range(gi * per, (gi + 1) * per, chunk):
            sl = slice(c0, min(c0 + chunk, (gi + 1) * per))
            m = _rows(S[:, sl], dlt[:, sl], A[sl], B[:, gi], C[:, gi], queries[gi], dtype)
            out[:, gi] += (m.abs() if reduce == "absmean" else m).sum(1)
    return out / per


# ------------------------------------------------------------------------------------------------
# SS2D


@dataclass
class SS2DScanInputs:
    """What one SS2D layer passes to ``selective_scan``, plus where each step reads from.

    u, delta: ``[Bt, K*Di, L]`` (delta before bias and softplus); A: ``[K*Di, N]``;
    B, C: ``[Bt, K, N, L]`` (shared by the Di channels of a route); D, delta_bias: ``[K*Di]``;
    ``routes`` the layer's RouteSet on an ``H x W`` map (``routes.indices(H, W)``: ``[K, L]``).
    """

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    delta_bias: torch.Tensor
    routes: Any
    H: int
    W: int

    @property
    def K(self) -> int:
        return int(self.B.shape[1])

    def scan_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`scanlib.selective_scan` reproducing the layer's scan."""
        return dict(
            u=self.u,
            delta=self.delta,
            A=self.A,
            B=self.B,
            C=self.C,
            D=self.D,
            delta_bias=self.delta_bias,
            delta_softplus=True,
        )


def find_ss2d_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every SS2D layer of ``model``, in forward order."""
    from ..layers import SS2D

    return [(n, m) for n, m in model.named_modules() if isinstance(m, SS2D)]


class _Captured(Exception):
    pass


def capture_scan_input(
    model: nn.Module, layer: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """Run ``model(x)`` until ``layer`` (an SS2D inside it, or the model itself) calls its scan;
    return what the scan received: ``(x_scan, channels_last)``, x_scan ``[Bt, Di, H, W]`` or
    ``[Bt, H, W, Di]``. The rest of the forward pass is skipped."""
    got: list[tuple[torch.Tensor, bool]] = []

    def spy(xs: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        got.append((xs.detach(), bool(channels_last)))
        raise _Captured

    layer.scan = spy  # an instance attribute shadows the method for this call only
    try:
        with torch.no_grad():
            model(x)
    except _Captured:
        pass
    finally:
        del layer.scan
    if not got:
        raise RuntimeError("the model's forward pass never reached the chosen SS2D layer")
    return got[0]


def ss2d_scan_inputs(
    layer: nn.Module, x: torch.Tensor, channels_last: bool = False, dtype: torch.dtype | None = None
) -> SS2DScanInputs:
    """The selective-scan inputs of SS2D ``layer`` for the scan input ``x`` (``[Bt, Di, H, W]``,
    or ``[Bt, H, W, Di]`` when ``channels_last``), computed as ``SS2D.scan`` does: cross scan
    over the routes, per-route x projection to (dt, B, C), dt projection. ``dtype`` (default:
    x's floating type, at least float32) is used for every tensor."""
    dtype = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        x = x.to(dtype)
        if channels_last:
            b, h, w, c = x.shape
        else:
            b, c, h, w = x.shape
        k, n, r = layer.k_group, layer.d_state, layer.dt_rank
        xs = scanlib.cross_scan(x, layer.routes, channels_last=channels_last)  # [Bt, K, Di, L]
        length = xs.shape[-1]
        x_dbl = torch.einsum("bkcl,kec->bkel", xs, layer.x_proj_weight.detach().to(dtype))
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kcr->bkcl", dts, layer.dt_projs_weight.detach().to(dtype))
        return SS2DScanInputs(
            u=xs.reshape(b, k * c, length).contiguous(),
            delta=dts.reshape(b, k * c, length).contiguous(),
            A=-torch.exp(layer.A_logs.detach().to(dtype)),
            B=bs.contiguous(),
            C=cs.contiguous(),
            D=layer.Ds.detach().to(dtype),
            delta_bias=layer.dt_projs_bias.reshape(-1).detach().to(dtype),
            routes=layer.routes,
            H=h,
            W=w,
        )


@dataclass
class AttentionMaps:
    """The attention of one query position over the map, for image ``batch_index``.

    per_route: ``[K, H, W]`` channel-averaged weights of the query's row of each route's M, at
    the image positions the steps read (0 where a route never reads the query or a position);
    combined: ``[H, W]``, their sum (the merged output sums the routes). matrices: optional
    ``[K, L, L]`` channel-averaged M of each route in route order.
    """

    query: tuple[int, int]
    per_route: np.ndarray
    combined: np.ndarray
    route_names: list[str]
    matrices: np.ndarray | None = None


def ss2d_attention(
    inputs: SS2DScanInputs,
    query: tuple[int, int],
    *,
    batch_index: int = 0,
    full_matrix: bool = False,
    reduce: str = "mean",
) -> AttentionMaps:
    """The attention map of ``query`` = (row, col) on the layer's ``H x W`` map, combined over
    the routes (see :class:`AttentionMaps`)."""
    H, W, K = inputs.H, inputs.W, inputs.K
    qr, qc = query
    if not (0 <= qr < H and 0 <= qc < W):
        raise ValueError(f"query {query} is outside the {H}x{W} map")
    p = qr * W + qc
    dev = inputs.u.device
    idx = inputs.routes.indices(H, W, dev)  # [K, L]
    inv = inputs.routes.inverse_indices(H, W, dev)  # [K, H*W]
    sl = slice(batch_index, batch_index + 1)
    args = dict(delta_bias=inputs.delta_bias, delta_softplus=True, reduce=reduce)
    steps = inv[:, p]  # the step at which route k reads the query (-1: never)
    rows = scan_attention_mean(
        inputs.delta[sl],
        inputs.A,
        inputs.B[sl],
        inputs.C[sl],
        queries=steps.clamp(min=0)[:, None],
        **args,
    )[0, :, 0]  # [K, L]
    per_route = torch.zeros(K, H * W, dtype=rows.dtype, device=dev)
    for k in range(K):
        if int(steps[k]) < 0:
            continue
        valid = idx[k] >= 0
        per_route[k, idx[k][valid]] = rows[k][valid]
    matrices = None
    if full_matrix:
        matrices = scan_attention_mean(
            inputs.delta[sl], inputs.A, inputs.B[sl], inputs.C[sl], **args
        )[0]
        matrices = matrices.float().cpu().numpy()
    names = list(getattr(inputs.routes, "route_names", [f"route{k}" for k in range(K)]))
    per_route = per_route.reshape(K, H, W)
    return AttentionMaps(
        (qr, qc),
        per_route.float().cpu().numpy(),
        per_route.sum(0).float().cpu().numpy(),
        names,
        matrices,
    )


# ------------------------------------------------------------------------------------------------
# figure and command


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def plot_attention(
    maps: AttentionMaps,
    image: np.ndarray,
    path: str | Path,
    *,
    title: str = "",
    decades: float = 2.0,
) -> None:
    """Image with the query marked, the combined map as an overlay, and one panel per route
    (|weight| / max on a log scale spanning ``decades``)."""
    from matplotlib.colors import LogNorm

    from .common import require_matplotlib

    plt = require_matplotlib()
    K = len(maps.per_route)
    H, W = maps.combined.shape
    S0, S1 = image.shape[:2]
    qy, qx = (maps.query[0] + 0.5) * S0 / H, (maps.query[1] + 0.5) * S1 / W
    ncols = min(2 + K, 6)
    nrows = math.ceil((2 + K) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.7 * ncols, 2.9 * nrows + 0.4), squeeze=False)
    flat = list(axes.ravel())
    vmin = 10.0**-decades
    norm = LogNorm(vmin=vmin, vmax=1.0)

    def mag(m: np.ndarray) -> np.ndarray:
        a = np.abs(m)
        return np.clip(a / max(float(a.max()), 1e-30), vmin, 1.0)

    flat[0].imshow(image)
    flat[0].plot([qx], [qy], marker="+", color="red", markersize=14, mew=2)
    flat[0].set_title("input, query +", fontsize=9)
    flat[1].imshow(image.mean(-1), cmap="gray")
    im = flat[1].imshow(mag(_upsample(maps.combined, (S0, S1))), cmap="jet", norm=norm, alpha=0.55)
    flat[1].plot([qx], [qy], marker="+", color="white", markersize=14, mew=2)
    flat[1].set_title("combined over routes", fontsize=9)
    for k in range(K):
        ax = flat[2 + k]
        ax.imshow(mag(maps.per_route[k]), cmap="jet", norm=norm, interpolation="nearest")
        ax.plot([maps.query[1]], [maps.query[0]], marker="+", color="white", markersize=10, mew=1.5)
        ax.set_title(f"route {k}: {maps.route_names[k]}", fontsize=8)
    for ax in flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in flat[2 + K :]:
        ax.axis("off")
    fig.colorbar(im, ax=flat[: 2 + K], shrink=0.7, label="|weight| / max (log)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_matrices(
    maps: AttentionMaps, path: str | Path, *, title: str = "", decades: float = 3.0
) -> None:
    """The channel-averaged attention matrix of each route in route order (|M| / max, log)."""
    from matplotlib.colors import LogNorm

    from .common import require_matplotlib

    plt = require_matplotlib()
    assert maps.matrices is not None
    K = len(maps.matrices)
    ncols = min(K, 4)
    nrows = math.ceil(K / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows + 0.4), squeeze=False)
    vmin = 10.0**-decades
    im = None
    for k, ax in enumerate(axes.ravel()):
        if k >= K:
            ax.axis("off")
            continue
        a = np.abs(maps.matrices[k])
        a = np.clip(a / max(float(a.max()), 1e-30), vmin, 1.0)
        im = ax.imshow(a, cmap="magma", norm=LogNorm(vmin=vmin, vmax=1.0), interpolation="nearest")
        ax.set_title(f"route {k}: {maps.route_names[k]}", fontsize=8)
        ax.set_xlabel("s (key step)", fontsize=7)
        if k % ncols == 0:
            ax.set_ylabel("t (query step)", fontsize=7)
        ax.tick_params(labelsize=6)
    if im is not None:
        fig.colorbar(im, ax=list(axes.ravel()), shrink=0.7, label="|M| / max (log)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pick_layer(
    model: nn.Module, layer: str | None, stage: int, block: int
) -> tuple[str, nn.Module]:
    from ..data.errors import ConfigError

    found = find_ss2d_layers(model)
    if not found:
        raise ConfigError("the model has no SS2D layer")
    if layer is not None:
        for name, m in found:
            if name == layer:
                return name, m
        raise ConfigError(
            f"--layer {layer}: no SS2D layer of that name; SS2D layers: {', '.join(n for n, _ in found)}"
        )
    n_stages = len(model.layers)
    if not -n_stages <= stage < n_stages:
        raise ConfigError(f"--stage {stage}: the model has stages 0..{n_stages - 1}")
    s = stage % n_stages
    in_stage = [(n, m) for n, m in found if n.startswith(f"layers.{s}.")]
    if not in_stage:
        raise ConfigError(f"stage {s} has no SS2D layer")
    if not -len(in_stage) <= block < len(in_stage):
        raise ConfigError(f"--block {block}: stage {s} has SS2D blocks 0..{len(in_stage) - 1}")
    return in_stage[block]


def run_attention(
    model: str = "vmamba_tiny",
    *,
    out: str | Path = "attention.png",
    images: str | None = None,
    image_index: int = 0,
    img_size: int | None = None,
    layer: str | None = None,
    stage: int = 0,
    block: int = -1,
    query: Sequence[float] | None = None,
    routes: str | None = None,
    model_args: dict[str, Any] | None = None,
    matrix: bool = False,
    reduce: str = "mean",
    device: str = "cpu",
    use_ema: bool = False,
) -> AttentionMaps:
    """Draw the attention map of one query pixel for one SS2D layer of ``model``.

    ``query`` = (y, x) in input-image pixels (default: the centre). ``routes`` rebuilds the model
    with another route set (the weights do not depend on the routes, only on their number K).
    Writes ``out`` (PNG), ``<stem>.json`` (settings) and ``<stem>.npz`` (the maps); with
    ``matrix`` also ``<stem>_matrix.png`` (each route's channel-averaged matrix).
    """
    from ..data.errors import ConfigError
    from .common import load_images, load_model, resolve_device

    kwargs = dict(model_args or {})
    if routes is not None:
        kwargs["routes"] = routes
    loaded = load_model(model, model_args=kwargs, use_ema=use_ema)
    if loaded.kind != "vmamba":
        raise ConfigError(f"{loaded.name} is not a VMamba model (attention maps need SS2D layers)")
    dev = resolve_device(device)
    size = img_size or loaded.img_size or 224
    source = (
        images if images is not None else (loaded.dataset if loaded.dataset == "digits" else None)
    )
    x, shown, names = load_images(
        source, size, in_chans=loaded.in_chans, mean=loaded.mean, std=loaded.std
    )
    if not 0 <= image_index < x.shape[0]:
        raise ConfigError(f"--image-index {image_index}: there are {x.shape[0]} images")
    x, shown = x[image_index : image_index + 1].to(dev), shown[image_index]
    net = loaded.model.to(dev)
    name, ss2d = _pick_layer(net, layer, stage, block)
    xs, channels_last = capture_scan_input(net, ss2d, x)
    inputs = ss2d_scan_inputs(ss2d, xs, channels_last)
    qy, qx = (size / 2, size / 2) if query is None else (float(query[0]), float(query[1]))
    if not (0 <= qy < size and 0 <= qx < size):
        raise ConfigError(f"--query {qy:g} {qx:g} is outside the {size}x{size} image")
    q = (min(int(qy * inputs.H / size), inputs.H - 1), min(int(qx * inputs.W / size), inputs.W - 1))
    logger.info(
        "attention of %s, layer %s (%dx%d map, K=%d), query %s",
        loaded.label,
        name,
        inputs.H,
        inputs.W,
        inputs.K,
        q,
    )
    maps = ss2d_attention(inputs, q, full_matrix=matrix, reduce=reduce)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    routes_name = getattr(inputs.routes, "name", str(inputs.routes))
    title = f"{loaded.label}: {name} ({inputs.H}x{inputs.W}, routes {routes_name}), image {names[image_index]}"
    plot_attention(maps, shown, out, title=title)
    if matrix:
        plot_matrices(maps, out.with_name(out.stem + "_matrix.png"), title=title)
    meta = {
        "model": loaded.name,
        "label": loaded.label,
        "layer": name,
        "map_size": [inputs.H, inputs.W],
        "routes": routes_name,
        "route_names": maps.route_names,
        "query_image_px": [qy, qx],
        "query_map": list(q),
        "image": names[image_index],
        "img_size": size,
        "reduce": reduce,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    arrays = {"per_route": maps.per_route, "combined": maps.combined}
    if maps.matrices is not None:
        arrays["matrices"] = maps.matrices
    np.savez_compressed(out.with_suffix(".npz"), **arrays)
    return maps
