"""FLOPs with the VMamba paper's convention, measured with PyTorch's flop counter.

Convention (fvcore's, which the paper used): one multiply-add = one FLOP for matmuls, einsums
and convolutions (bias additions not counted); LayerNorm = 5 FLOPs per element (4 without
affine); average pooling = 1 per input element; each selective scan = 9·B·L·D·N + B·D·L
(+ B·D·L with a z gate), D = channels over all routes, N = d_state; other elementwise ops
(activations, residual additions, softplus, route gathers) are not counted.

``torch.utils.flop_counter.FlopCounterMode`` sees aten ops: its matmul/conv formulas count a
multiply-add as 2, so they are halved here; formulas are added for layer norm, pooling and the
scan. The scan is counted on ONE op, ``torch.ops.scanlib.selective_scan`` (the custom op scanlib
runs the scan through inside ``scanlib.through_custom_op()``), so whatever backend computes it,
its internal arithmetic is not seen and the count is the paper's closed form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import scanlib

__all__ = ["FlopCount", "count_flops", "selective_scan_flops"]

aten = torch.ops.aten


def selective_scan_flops(
    batch: int, dim: int, seqlen: int, dstate: int, with_d: bool = True, with_z: bool = False
) -> int:
    """The paper's count for one selective scan: ``9·B·L·D·N + B·D·L`` (D skip) ``+ B·D·L`` (z)."""
    flops = 9 * batch * seqlen * dim * dstate
    if with_d:
        flops += batch * dim * seqlen
    if with_z:
        flops += batch * dim * seqlen
    return flops


def _raw(fn: Callable[..., int]) -> Callable[..., int]:
    fn._get_raw = True  # FlopCounterMode: call with the real arguments, not their shapes
    return fn


def _halved(formula: Callable[..., int]) -> Callable[..., int]:
    @_raw
    def f(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return formula(*args, out_val=out_val, **kwargs) // 2

    return f


@_raw
def _layer_norm(
    x: torch.Tensor,
    normalized_shape: Any,
    weight: Any = None,
    bias: Any = None,
    *args: Any,
    out_val: Any = None,
    **kwargs: Any,
) -> int:
    return x.numel() * (5 if weight is not None else 4)


@_raw
def _input_numel(x: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return x.numel()


@_raw
def _scan(
    u: torch.Tensor,
    delta: Any,
    A: torch.Tensor,
    B: Any,
    C: Any,
    D: Any = None,
    z: Any = None,
    *args: Any,
    out_val: Any = None,
    **kwargs: Any,
) -> int:
    b, d, length = u.shape
    return selective_scan_flops(
        b, d, length, A.shape[1], with_d=D is not None, with_z=z is not None
    )


def _mapping() -> dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry  # imported lazily: it pulls in triton

    mapping: dict[Any, Callable[..., int]] = {op: _halved(f) for op, f in flop_registry.items()}
    mapping[aten.native_layer_norm] = _layer_norm
    # AdaptiveAvgPool2d(1) reaches the dispatcher as mean over H, W
    mapping[aten._adaptive_avg_pool2d] = _input_numel
    mapping[aten.mean] = _input_numel
    mapping[torch.ops.scanlib.selective_scan] = _scan
    return mapping


@dataclass
class FlopCount:
    """``total`` FLOPs (paper convention) and the split by operator name."""

    total: int
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def count_flops(
    model: nn.Module,
    img_size: int | tuple[int, int] = 224,
    batch_size: int = 1,
    in_chans: int | None = None,
    detailed: bool = False,
) -> int | FlopCount:
    """FLOPs of one forward pass of ``model`` on ``[batch_size, in_chans, H, W]`` (paper convention).

    The input is created on the model's device with its dtype. Build the model on the meta device
    (``with torch.device("meta"): m = vmamba.vmamba_tiny()``) to count without computing anything.
    Returns the total as an int, or a :class:`FlopCount` with the split by operator when
    ``detailed``.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if in_chans is None:
        in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    x = torch.zeros(batch_size, in_chans, h, w, device=device, dtype=dtype)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_mapping())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), scanlib.through_custom_op(), counter:
            model(x)
    finally:
        model.train(was_training)
    total = counter.get_total_flops()
    if not detailed:
        return total
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        by_op[str(op)] = by_op.get(str(op), 0) + int(n)
    return FlopCount(total=total, by_op=by_op)
