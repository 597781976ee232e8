"""Validated inputs of one ``cross_scan`` / ``cross_merge`` call, as backends receive them.

Letters: B batch, C channels, H x W map, K routes, L route length (H*W for permutation sets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ScanInputError
from .core import GatherTables, RouteSet, get_route_set

OPS = ("cross_scan", "cross_merge")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


@dataclass
class RouteInputs:
    """One route op call.

    op="cross_scan": ``tensor`` is x, ``[B, C, H, W]`` (``[B, H, W, C]`` when channels_last);
    the result is ``[B, K, C, L]``.
    op="cross_merge": ``tensor`` is y, ``[B, K, C, L]``; the result is ``[B, C, H, W]``
    (``[B, H, W, C]`` when channels_last).

    ``features`` is empty: every backend implementing a route op handles both layouts and
    padded (sub-grid) sets; a backend with narrower limits declines in ``extra_reasons``
    using ``channels_last`` / ``padded``.
    """

    op: str
    tensor: torch.Tensor
    routes: RouteSet
    H: int
    W: int
    channels_last: bool = False
    batch: int = field(init=False, default=0)
    channels: int = field(init=False, default=0)
    K: int = field(init=False, default=0)
    L: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ScanInputError(f"RouteInputs: op must be one of {OPS}, got {self.op!r}")
        self.routes = get_route_set(self.routes)
        t = self.tensor
        if not isinstance(t, torch.Tensor):
            raise ScanInputError(f"{self.op}: expected a torch.Tensor, got {type(t).__name__}")
        if self.H < 1 or self.W < 1:
            raise ScanInputError(f"{self.op}: H and W must be >= 1, got H={self.H}, W={self.W}")
        self.K = len(self.routes)
        self.L = self.routes.length(self.H, self.W)
        if t.dim() != 4:
            exp = self._expected()
            raise ScanInputError(f"{self.op}: expected {exp} (4 dims), got {_shape(t)}")
        if self.op == "cross_scan":
            self.batch = t.shape[0]
            self.channels = t.shape[3] if self.channels_last else t.shape[1]
        else:
            b, k, c, L = t.shape
            if k != self.K or L != self.L:
                raise ScanInputError(
                    f"cross_merge: y must be [B, K={self.K}, C, L={self.L}] for route set "
                    f"{self.routes.name!r} at H={self.H}, W={self.W}, got {_shape(t)}"
                )
            self.batch, self.channels = b, c

    def _expected(self) -> str:
        if self.op == "cross_merge":
            return f"y [B, K={self.K}, C, L={self.L}]"
        return "x [B, H, W, C] (channels_last=True)" if self.channels_last else "x [B, C, H, W]"

    @classmethod
    def for_scan(
        cls, x: torch.Tensor, routes: RouteSet | str, channels_last: bool = False
    ) -> RouteInputs:
        if not isinstance(x, torch.Tensor):
            raise ScanInputError(f"cross_scan: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            want = "[B, H, W, C]" if channels_last else "[B, C, H, W]"
            raise ScanInputError(f"cross_scan: x must be {want} (4 dims), got {_shape(x)}")
        H, W = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
        return cls("cross_scan", x, get_route_set(routes), H, W, channels_last)

    @classmethod
    def for_merge(
        cls, y: torch.Tensor, routes: RouteSet | str, H: int, W: int, channels_last: bool = False
    ) -> RouteInputs:
        return cls("cross_merge", y, get_route_set(routes), H, W, channels_last)

    # ---------------------------------------------------------------- what backends look at
    @property
    def x(self) -> torch.Tensor:
        return self.tensor

    @property
    def y(self) -> torch.Tensor:
        return self.tensor

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def features(self) -> frozenset[Any]:
        return frozenset()

    @property
    def padded(self) -> bool:
        """The set has sub-grid routes: the index table has -1 entries and/or positions some route skips."""
        return not self.routes.is_permutation

    def indices(self) -> torch.Tensor:
        """``[K, L]`` positions read at each step (-1: end padding), on this call's device."""
        return self.routes.indices(self.H, self.W, self.device)

    def inverse_indices(self) -> torch.Tensor:
        """``[K, H*W]`` step at which each route reads each position (-1: never), on this device."""
        return self.routes.inverse_indices(self.H, self.W, self.device)

    def gather_tables(self) -> GatherTables:
        return self.routes.gather_tables(self.H, self.W, self.device)

    def out_shape(self) -> tuple[int, ...]:
        B, C, H, W = self.batch, self.channels, self.H, self.W
        if self.op == "cross_scan":
            return (B, self.K, C, self.L)
        return (B, H, W, C) if self.channels_last else (B, C, H, W)

    def describe(self) -> str:
        name = "x" if self.op == "cross_scan" else "y"
        layout = ", channels_last" if self.channels_last else ""
        return (
            f"{self.op} of {name} {_shape(self.tensor)}{layout} over route set {self.routes.name!r} "
            f"(K={self.K}, H={self.H}, W={self.W}, L={self.L}), {self.dtype} on {self.device}"
        )
