"""Typed configuration of the VMamba models.

Every switch the official implementation hides in suffixes of ``forward_type`` strings is a field
here; :func:`vmamba.from_official_kwargs` is the only place that parses those strings.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Activation",
    "DownsampleKind",
    "MLPConfig",
    "NormKind",
    "OutNorm",
    "PatchEmbedKind",
    "RoutesSpec",
    "SSMConfig",
    "VSSMConfig",
]


class Activation(str, enum.Enum):
    """Activation functions used by SS2D and the MLP."""

    SILU = "silu"
    GELU = "gelu"
    RELU = "relu"
    SIGMOID = "sigmoid"


class NormKind(str, enum.Enum):
    """Normalisation layer and, with it, the tensor layout of the whole model.

    ``LN``: LayerNorm over the last dim of channel-last ``[B, H, W, C]`` maps (vanilla VMamba).
    ``LN2D``: LayerNorm over the channels of channel-first ``[B, C, H, W]`` maps (VMamba v2).
    ``BN``: BatchNorm2d on channel-first maps.
    """

    LN = "ln"
    LN2D = "ln2d"
    BN = "bn"

    @property
    def channels_first(self) -> bool:
        return self is not NormKind.LN


class OutNorm(str, enum.Enum):
    """What SS2D applies to the merged scan output before the output projection.

    ``LAYERNORM`` (the default of every released model), ``NONE`` (identity), ``DWCONV3`` (a
    depthwise 3x3 conv), ``CNORM`` (LayerNorm then depthwise 3x3 conv), ``SIGMOID``, ``SOFTMAX``
    (softmax over the spatial positions of each channel).
    """

    LAYERNORM = "layernorm"
    NONE = "none"
    DWCONV3 = "dwconv3"
    CNORM = "cnorm"
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"


class PatchEmbedKind(str, enum.Enum):
    """``V1``: one ``patch_size`` x ``patch_size`` conv with that stride, then norm.
    ``V2``: two 3x3 stride-``patch_size/2`` convs (to ``dim/2``, norm, GELU, to ``dim``, norm)."""

    V1 = "v1"
    V2 = "v2"


class DownsampleKind(str, enum.Enum):
    """Between stages. ``V1``: patch merging (2x2 concat, norm, linear to 2C). ``V2``: 2x2 stride-2
    conv, norm. ``V3``: 3x3 stride-2 conv, norm. ``NONE``: no downsampling (dims must not change)."""

    V1 = "v1"
    V2 = "v2"
    V3 = "v3"
    NONE = "none"


# A route set name registered with scanlib ("cross2d", ...) or a scanlib RouteSet object.
RoutesSpec = str | Any


def _enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{name}: {value!r} is not one of {choices}") from None


@dataclass(frozen=True)
class SSMConfig:
    """The SS2D (2D selective scan) mixer of a VSS block.

    ``d_inner = int(ssm_ratio * d_model)``; ``dt_rank = None`` means ``ceil(d_model / 16)`` (from
    d_model, as the official code). ``d_conv <= 1`` removes the depthwise conv. ``z_gate`` adds the
    gate branch (``in_proj`` doubles; ``y * act(z)``, or ``y * z`` when ``z_act`` is False).
    ``force_fp32`` casts the scan inputs to float32 (the scan itself always accumulates in float32
    and returns float32). ``scan_backend``: None (automatic selection), a backend name or a
    preference list, passed to ``scanlib.selective_scan``. ``routes``: the scan route set.
    """

    d_state: int = 1
    ssm_ratio: float = 1.0
    dt_rank: int | None = None
    act: Activation = Activation.SILU
    d_conv: int = 3
    conv_bias: bool = False
    bias: bool = False
    z_gate: bool = False
    z_act: bool = True
    out_norm: OutNorm = OutNorm.LAYERNORM
    out_act: bool = False
    dropout: float = 0.0
    force_fp32: bool = True
    routes: RoutesSpec = "cross2d"
    scan_backend: str | tuple[str, ...] | None = None
    # parameter initialisation (Mamba's): "v0" S4D-real A, unit D, dt in [dt_min, dt_max];
    # "v1"/"v2" the official simplified alternatives
    init: str = "v0"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4

    def __post_init__(self) -> None:
        object.__setattr__(self, "act", _enum(Activation, self.act, "act"))
        object.__setattr__(self, "out_norm", _enum(OutNorm, self.out_norm, "out_norm"))
        if isinstance(self.scan_backend, list):
            object.__setattr__(self, "scan_backend", tuple(self.scan_backend))
        if self.d_state < 1:
            raise ValueError(f"d_state must be >= 1, got {self.d_state}")
        if self.ssm_ratio < 0:
            raise ValueError(f"ssm_ratio must be >= 0, got {self.ssm_ratio}")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"dt_rank must be >= 1 or None (auto), got {self.dt_rank}")
        if self.init not in ("v0", "v1", "v2"):
            raise ValueError(f"init: {self.init!r} is not one of 'v0', 'v1', 'v2'")
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: {self.dt_init!r} is not one of 'random', 'constant'")

    def d_inner(self, d_model: int) -> int:
        return int(self.ssm_ratio * d_model)

    def rank(self, d_model: int) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(d_model / 16)


@dataclass(frozen=True)
class MLPConfig:
    """The channel MLP of a VSS block: ``ratio = 0`` removes it; ``gated`` is the official gMlp."""

    ratio: float = 4.0
    act: Activation = Activation.GELU
    drop: float = 0.0
    gated: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "act", _enum(Activation, self.act, "act"))
        if self.ratio < 0:
            raise ValueError(f"mlp ratio must be >= 0, got {self.ratio}")


@dataclass(frozen=True)
class VSSMConfig:
    """A whole VMamba model.

    ``dims``: channels per stage (one per entry of ``depths``). ``routes``: the route set of every
    stage, or a tuple with one per stage (overrides ``ssm.routes``). ``out_indices``: when given,
    the model is a backbone returning the normalised feature maps of these stages (strides
    4, 8, 16, 32) instead of logits. ``pos_embed``: a learned absolute position embedding added
    after the patch embedding, sized for ``img_size`` (interpolated for other sizes).
    """

    depths: tuple[int, ...] = (2, 2, 9, 2)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    in_chans: int = 3
    num_classes: int = 1000
    patch_size: int = 4
    patch_embed: PatchEmbedKind = PatchEmbedKind.V2
    patch_norm: bool = True
    downsample: DownsampleKind = DownsampleKind.V3
    norm: NormKind = NormKind.LN2D
    drop_path_rate: float = 0.1
    routes: RoutesSpec | tuple[RoutesSpec, ...] | None = None
    out_indices: tuple[int, ...] | None = None
    use_checkpoint: bool = False
    pos_embed: bool = False
    img_size: int = 224

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("depths", tuple(int(d) for d in self.depths))
        dims = self.dims
        if isinstance(dims, int):  # the official shorthand: the first dim, doubling per stage
            dims = tuple(dims * 2**i for i in range(len(self.depths)))
        set_("dims", tuple(int(d) for d in dims))
        set_("patch_embed", _enum(PatchEmbedKind, self.patch_embed, "patch_embed"))
        set_("downsample", _enum(DownsampleKind, self.downsample, "downsample"))
        set_("norm", _enum(NormKind, self.norm, "norm"))
        if isinstance(self.ssm, dict):
            set_("ssm", SSMConfig(**self.ssm))
        if isinstance(self.mlp, dict):
            set_("mlp", MLPConfig(**self.mlp))
        if isinstance(self.routes, list):
            set_("routes", tuple(self.routes))
        if self.out_indices is not None:
            set_("out_indices", tuple(int(i) for i in self.out_indices))
        n = len(self.depths)
        if n == 0 or any(d < 0 for d in self.depths):
            raise ValueError(
                f"depths must be a non-empty sequence of non-negative ints: {self.depths}"
            )
        if len(self.dims) != n:
            raise ValueError(f"dims {self.dims} needs one entry per stage (depths {self.depths})")
        if isinstance(self.routes, tuple) and len(self.routes) != n:
            raise ValueError(f"routes: {len(self.routes)} route sets given for {n} stages")
        if self.out_indices is not None and any(not 0 <= i < n for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} must lie in [0, {n})")
        if self.downsample is DownsampleKind.NONE and len(set(self.dims)) != 1:
            raise ValueError("downsample='none' needs equal dims in every stage")
        if self.patch_embed is PatchEmbedKind.V2 and self.patch_size % 2:
            raise ValueError(f"patch_embed v2 needs an even patch_size, got {self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def channels_first(self) -> bool:
        return self.norm.channels_first

    def stage_routes(self) -> tuple[RoutesSpec, ...]:
        """The route set of each stage."""
        if self.routes is None:
            return (self.ssm.routes,) * len(self.depths)
        if isinstance(self.routes, tuple):
            return self.routes
        return (self.routes,) * len(self.depths)

    def replace(self, **changes: Any) -> VSSMConfig:
        """A copy with fields changed; ``ssm``/``mlp`` fields may be given as ``ssm_<name>`` /
        ``mlp_<name>`` (``ssm_d_state=4``, ``ssm_ratio=2.0``, ``mlp_ratio=0``)."""
        ssm_fields = {f.name for f in dataclasses.fields(SSMConfig)}
        ssm = {}
        for k in [k for k in changes if k.startswith("ssm_")]:
            # ssm_d_state -> d_state; ssm_ratio is itself an SSMConfig field
            ssm[k if k in ssm_fields else k[4:]] = changes.pop(k)
        mlp = {k[4:]: changes.pop(k) for k in list(changes) if k.startswith("mlp_")}
        base_ssm = changes.pop("ssm", self.ssm)
        base_mlp = changes.pop("mlp", self.mlp)
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown VSSMConfig fields: {', '.join(unknown)}")
        if ssm:
            base_ssm = dataclasses.replace(base_ssm, **ssm)
        if mlp:
            base_mlp = dataclasses.replace(base_mlp, **mlp)
        return dataclasses.replace(self, ssm=base_ssm, mlp=base_mlp, **changes)


def as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)
