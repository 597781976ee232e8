"""``torch.library`` custom ops wrapping the dispatching selective scan.

``torch.compile`` (and any torch dispatch mode, e.g. FlopCounterMode) then sees the scan as ONE
opaque node, ``torch.ops.scanlib.selective_scan``, whatever backend runs inside it. Backend
selection happens when the op runs, so ``use_backend``/``set_backend`` keep working in compiled code.

Eager calls do not go through these ops (the backward here recomputes the forward, which the
backends' own autograd avoids); ``selective_scan`` uses them while compiling, or inside
``with scanlib.through_custom_op():``.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import torch

from . import registry
from .inputs import ScanInputs

_through_op: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "scanlib_through_op", default=False
)


@contextlib.contextmanager
def through_custom_op(enabled: bool = True) -> Iterator[None]:
    """Route ``selective_scan`` calls in this block through ``torch.ops.scanlib.selective_scan``."""
    token = _through_op.set(enabled)
    try:
        yield
    finally:
        _through_op.reset(token)


def use_custom_op() -> bool:
    return _through_op.get() or torch.compiler.is_compiling()


def _inputs(
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, out_dtype
) -> ScanInputs:
    return ScanInputs(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state, out_dtype
    )


def _spec(backend: str | None):
    return None if backend is None else backend.split(",")


@torch.library.custom_op("scanlib::selective_scan", mutates_args=())
def selective_scan_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    delta_softplus: bool,
    out_dtype: torch.dtype | None,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, D, L], last_state [B, D, N]); ``backend``: None or comma-separated names."""
    inputs = _inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, out_dtype)
    impl = registry.select(inputs, _spec(backend))
    with torch.no_grad():
        out, last = impl.selective_scan(inputs)
    # op outputs must be fresh dense tensors (the fake impl promises that)
    return tuple(
        t if t.is_contiguous() and t.storage_offset() == 0 else t.contiguous().clone()
        for t in (out, last)
    )


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, out_dtype, backend):
    b, d, L = u.shape
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    out = u.new_empty((b, d, L), dtype=out_dtype if out_dtype is not None else u.dtype)
    return out, u.new_empty((b, d, A.shape[1]), dtype=cdt)


@torch.library.custom_op("scanlib::selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    delta_softplus: bool,
    out_dtype: torch.dtype | None,
    backend: str | None,
    dout: torch.Tensor,
    dlast: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradients of the 9 tensor inputs (size-0 tensors for absent ones)."""
    given = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    leaves = [None if t is None else t.detach().requires_grad_() for t in given]

    def vjp() -> list:
        with torch.enable_grad():
            inputs = _inputs(*leaves, delta_softplus, out_dtype)
            out, last = registry.select(inputs, _spec(backend)).selective_scan(inputs)
            if not (out.requires_grad or last.requires_grad):
                return []  # plain aten ops record no graph below the autograd key
            present = [t for t in leaves if t is not None]
            return list(torch.autograd.grad((out, last), present, (dout, dlast), allow_unused=True))

    grad_list = vjp()
    if not grad_list:
        # A backend built from plain differentiable ops (the reference) records no graph inside a
        # custom op (dispatch runs below autograd here); that exclusion is thread-local, so
        # differentiate it on a helper thread.
        box: list = []
        context = contextvars.copy_context()  # keeps use_backend() selections on that thread
        worker = threading.Thread(target=lambda: box.append(context.run(vjp)))
        worker.start()
        worker.join()
        grad_list = box[0] if box else []
        if not grad_list:
            raise RuntimeError("scanlib::selective_scan_bwd: the backend recorded no graph")
    grads = iter(grad_list)
    result = []
    for t in leaves:
        if t is None:
            result.append(u.new_empty(0))
        else:
            g = next(grads)
            result.append(torch.zeros_like(t) if g is None else g)
    return result


@selective_scan_bwd_op.register_fake
def _(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    initial_state,
    delta_softplus,
    out_dtype,
    backend,
    dout,
    dlast,
):
    return [
        u.new_empty(0) if t is None else torch.empty_like(t)
        for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    ]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs[:9] if t is not None])
    ctx.present = [t is not None for t in inputs[:9]]
    ctx.options = inputs[9:]


def _backward(ctx, dout, dlast):
    it = iter(ctx.saved_tensors)
    tensors = [next(it) if p else None for p in ctx.present]
    u = next(t for t in tensors if t is not None)
    b, d, L = u.shape
    n = tensors[2].shape[1]
    out_dtype = ctx.options[1] if ctx.options[1] is not None else u.dtype
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    if dout is None:
        dout = u.new_zeros((b, d, L), dtype=out_dtype)
    if dlast is None:
        dlast = u.new_zeros((b, d, n), dtype=cdt)
    grads = selective_scan_bwd_op(*tensors, *ctx.options, dout, dlast)
    return tuple(None if not p else g for p, g in zip(ctx.present, grads)) + (None, None, None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def backend_spec(backend) -> str | None:
    """A per-call ``backend=`` (name or list) as the op's string argument."""
    return None if backend is None else (backend if isinstance(backend, str) else ",".join(backend))
