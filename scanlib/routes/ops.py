"""The public route ops, ``cross_scan`` and ``cross_merge``, and their ``torch.library`` custom ops.

Eager calls validate, pick a backend through the registry and run it; the backend returns a
differentiable tensor. While ``torch.compile`` traces (or inside ``scanlib.through_custom_op()``)
the calls go through ``torch.ops.scanlib.cross_scan`` / ``cross_merge`` instead: one opaque node
each, no graph break, backend selection at run time. Those ops name the route set by a string
key (a registered name, or the unique key an unregistered RouteSet gets), so dynamo never traces
route code or index-table construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops as _scan_ops
from .. import registry
from ..errors import ScanInputError
from .core import RouteSet, get_route_set
from .inputs import RouteInputs

BackendSpec = str | Sequence[str] | None


def _use_op() -> bool:
    return torch.compiler.is_compiling() or _scan_ops.use_custom_op()


def _key(routes: RouteSet | str) -> str:
    if isinstance(routes, str):
        return routes
    if isinstance(routes, RouteSet):
        return routes.key
    raise ScanInputError(
        f"routes: expected a RouteSet or a route-set name, got {type(routes).__name__}"
    )


def _backend_str(backend: BackendSpec) -> str | None:
    return None if backend is None else (backend if isinstance(backend, str) else ",".join(backend))


def cross_scan(
    x: torch.Tensor,
    routes: RouteSet | str,
    *,
    channels_last: bool = False,
    backend: BackendSpec = None,
) -> torch.Tensor:
    """Read a 2D map along each route of a set: x ``[B, C, H, W]`` -> ``[B, K, C, L]`` (contiguous).

    ``channels_last=True`` takes x as ``[B, H, W, C]`` (no transpose needed). ``out[:, k, :, l]``
    is the map at the position route k reads at step l (0 for end padding of sub-grid routes).
    ``routes``: a :class:`RouteSet` or a registered name (``"cross2d"``...). Differentiable; the
    backward is ``cross_merge``. ``backend`` overrides the backend selection for this call.
    """
    if _use_op():
        return cross_scan_op(x, _key(routes), channels_last, _backend_str(backend))
    inputs = RouteInputs.for_scan(x, routes, channels_last)
    return registry.select(inputs, backend).cross_scan(inputs)


def cross_merge(
    y: torch.Tensor,
    routes: RouteSet | str,
    H: int,
    W: int,
    *,
    channels_last: bool = False,
    backend: BackendSpec = None,
) -> torch.Tensor:
    """Put each route's sequence back where it was read and sum the routes: y ``[B, K, C, L]`` ->
    ``[B, C, H, W]`` (``[B, H, W, C]`` when ``channels_last``), contiguous.

    The adjoint of :func:`cross_scan`: ``<cross_scan(x), y> == <x, cross_merge(y)>``; padding
    entries of y are ignored. Differentiable; the backward is ``cross_scan``.
    """
    if _use_op():
        return cross_merge_op(y, _key(routes), H, W, channels_last, _backend_str(backend))
    inputs = RouteInputs.for_merge(y, routes, H, W, channels_last)
    return registry.select(inputs, backend).cross_merge(inputs)


def explain_routes(
    tensor: torch.Tensor,
    routes: RouteSet | str,
    op: str = "cross_scan",
    H: int | None = None,
    W: int | None = None,
    *,
    channels_last: bool = False,
    backend: BackendSpec = None,
) -> dict[str, list[str]]:
    """Each backend's reasons for declining this route op (empty: it can), plus ``"selected"``."""
    if op == "cross_scan":
        inputs = RouteInputs.for_scan(tensor, routes, channels_last)
    else:
        if H is None or W is None:
            raise ScanInputError("explain_routes(op='cross_merge') needs H and W")
        inputs = RouteInputs.for_merge(tensor, routes, H, W, channels_last)
    result = registry.explain(inputs)
    try:
        result["selected"] = [registry.select(inputs, backend).name]
    except Exception as e:  # the explanation itself must not raise
        result["selected"] = [f"none: {e}"]
    return result


# ---------------------------------------------------------------------- custom ops
def _spec(backend: str | None):
    return None if backend is None else backend.split(",")


def _scan_hw(x: torch.Tensor, channels_last: bool):
    if x.dim() != 4:
        want = "[B, H, W, C]" if channels_last else "[B, C, H, W]"
        raise ScanInputError(f"cross_scan: x must be {want} (4 dims), got {list(x.shape)}")
    return (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])


@torch.library.custom_op("scanlib::cross_scan", mutates_args=())
def cross_scan_op(
    x: torch.Tensor, routes: str, channels_last: bool, backend: str | None
) -> torch.Tensor:
    """``cross_scan`` as one op: ``routes`` is a route-set name or key, ``backend`` None or comma-separated names."""
    inputs = RouteInputs.for_scan(x, get_route_set(routes), channels_last)
    with torch.no_grad():
        out = registry.select(inputs, _spec(backend)).cross_scan(inputs)
    return out.contiguous()


@cross_scan_op.register_fake
def _(x, routes, channels_last, backend):
    rs = get_route_set(routes)
    H, W = _scan_hw(x, channels_last)
    C = x.shape[3] if channels_last else x.shape[1]
    return x.new_empty((x.shape[0], len(rs), C, rs.length(H, W)))


@torch.library.custom_op("scanlib::cross_merge", mutates_args=())
def cross_merge_op(
    y: torch.Tensor, routes: str, H: int, W: int, channels_last: bool, backend: str | None
) -> torch.Tensor:
    """``cross_merge`` as one op (see :func:`cross_scan_op` for the string arguments)."""
    inputs = RouteInputs.for_merge(y, get_route_set(routes), H, W, channels_last)
    with torch.no_grad():
        out = registry.select(inputs, _spec(backend)).cross_merge(inputs)
    return out.contiguous()


@cross_merge_op.register_fake
def _(y, routes, H, W, channels_last, backend):
    rs = get_route_set(routes)
    if y.dim() != 4 or y.shape[1] != len(rs):
        raise ScanInputError(f"cross_merge: y must be [B, K={len(rs)}, C, L], got {list(y.shape)}")
    B, _, C, _ = y.shape
    return y.new_empty((B, H, W, C) if channels_last else (B, C, H, W))


def _scan_setup(ctx, inputs, output):
    x, routes, channels_last, backend = inputs
    ctx.args = (routes, *_scan_hw(x, channels_last), channels_last, backend)


def _scan_backward(ctx, dout):
    routes, H, W, channels_last, backend = ctx.args
    return cross_merge_op(dout.contiguous(), routes, H, W, channels_last, backend), None, None, None


def _merge_setup(ctx, inputs, output):
    _, routes, H, W, channels_last, backend = inputs
    ctx.args = (routes, channels_last, backend)


def _merge_backward(ctx, dout):
    routes, channels_last, backend = ctx.args
    return (
        cross_scan_op(dout.contiguous(), routes, channels_last, backend),
        None,
        None,
        None,
        None,
        None,
    )


cross_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)
cross_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)
