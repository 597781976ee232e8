"""The VMamba network (VSSM), the model family and a small name registry.

``create_model("vmamba_tiny", num_classes=10)`` builds a model by name; ``list_models()`` lists
the names. Every constructor accepts ``num_classes``, ``in_chans``, ``drop_path_rate``,
``routes`` (a route set name or RouteSet, or one per stage), ``scan_backend``, ``out_indices``
(backbone mode), ``use_checkpoint``, ``pretrained`` (a checkpoint path or state dict, loaded
strictly with :func:`vmamba.load_pretrained`) and any :class:`VSSMConfig` field, with SSM and MLP
fields spelled ``ssm_<field>`` / ``mlp_<field>``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import (
    DownsampleKind,
    MLPConfig,
    NormKind,
    PatchEmbedKind,
    SSMConfig,
    VSSMConfig,
)
from .layers import (
    SS2D,
    Permute,
    VSSBlock,
    make_downsample,
    make_norm,
    make_patch_embed,
    routes_key,
)

__all__ = ["VSSM", "create_model", "list_models", "model_config", "register_model"]


class VSSM(nn.Module):
    """VMamba: patch embedding, stages of VSS blocks with downsampling in between, classifier.

    ``x``: ``[B, in_chans, H, W]`` (any H, W; see ``docs/models.md`` for sizes that are not
    multiples of 32) -> logits ``[B, num_classes]``, or in backbone mode (``out_indices`` set) a
    list of channel-first feature maps ``[B, dims[i], ~H / 2^(i+2), ~W / 2^(i+2)]``, each passed
    through its own norm ``outnorm{i}``.
    """

    def __init__(self, config: VSSMConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = config if config is not None else VSSMConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        specs = cfg.stage_routes()
        if not all(isinstance(r, str) for r in specs):  # RouteSet objects -> their string keys
            cfg = dataclasses.replace(
                cfg,
                routes=tuple(routes_key(r) for r in specs),
                ssm=dataclasses.replace(cfg.ssm, routes="cross2d"),
            )
        self.config = cfg
        self.channels_first = cfg.channels_first
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dims[-1]
        self.dims = cfg.dims
        norm = cfg.norm

        if cfg.pos_embed:
            n = cfg.img_size // cfg.patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.dims[0], n, n))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        self.patch_embed = make_patch_embed(
            cfg.patch_embed.value,
            cfg.in_chans,
            cfg.dims[0],
            cfg.patch_size,
            norm if cfg.patch_norm else None,
            cfg.channels_first,
        )

        # drop-path rate rising linearly over the blocks (plain floats: meta-safe)
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        routes = cfg.stage_routes()
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(cfg.depths):
            ssm = dataclasses.replace(cfg.ssm, routes=routes[i])
            blocks = nn.Sequential(
                *[
                    VSSBlock(cfg.dims[i], ssm, cfg.mlp, norm, rates[start + j], cfg.use_checkpoint)
                    for j in range(depth)
                ]
            )
            start += depth
            last = i == len(cfg.depths) - 1
            down = (
                nn.Identity()
                if last
                else make_downsample(cfg.downsample, cfg.dims[i], cfg.dims[i + 1], norm)
            )
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=down)))

        self.out_indices = cfg.out_indices
        if cfg.out_indices is None:
            self.classifier = nn.Sequential(
                OrderedDict(
                    norm=make_norm(norm, self.num_features),
                    permute=nn.Identity() if cfg.channels_first else Permute(0, 3, 1, 2),
                    avgpool=nn.AdaptiveAvgPool2d(1),
                    flatten=nn.Flatten(1),
                    head=nn.Linear(self.num_features, cfg.num_classes)
                    if cfg.num_classes > 0
                    else nn.Identity(),
                )
            )
        else:
            for i in cfg.out_indices:
                self.add_module(f"outnorm{i}", make_norm(norm, cfg.dims[i]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the official scheme: truncated-normal linears, unit LayerNorms; the SSM parameters keep
        # their own (Mamba) initialisation from SS2D
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ information
    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """Channels and stride of each stage's output (before its downsampling)."""
        return [
            {"num_chs": d, "reduction": self.config.patch_size * 2**i, "module": f"layers.{i}"}
            for i, d in enumerate(self.dims)
        ]

    def no_weight_decay(self) -> set[str]:
        """Names of parameters conventionally trained without weight decay (A_logs, Ds, pos_embed)."""
        return {
            n
            for n, p in self.named_parameters()
            if getattr(p, "_no_weight_decay", False) or n == "pos_embed"
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each VSS block in the backward pass (saves activation memory)."""
        for m in self.modules():
            if isinstance(m, VSSBlock):
                m.use_checkpoint = enable

    def set_scan_backend(self, backend: str | tuple[str, ...] | None) -> None:
        """Run every selective scan of the model with ``backend`` (a name, a preference list, or
        None for automatic selection); weights are untouched."""
        if isinstance(backend, list):
            backend = tuple(backend)
        for m in self.modules():
            if isinstance(m, SS2D):
                m.cfg = dataclasses.replace(m.cfg, scan_backend=backend)
        self.config = dataclasses.replace(
            self.config, ssm=dataclasses.replace(self.config.ssm, scan_backend=backend)
        )

    def get_classifier(self) -> nn.Module:
        self._need_classifier()
        return self.classifier.head

    def _need_classifier(self) -> None:
        if self.out_indices is not None:
            raise RuntimeError("a backbone (built with out_indices) has no classifier")

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: identity, features out)."""
        self._need_classifier()
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            self._init_weights(head)
        p = next(self.parameters())
        self.classifier.head = head.to(device=p.device, dtype=p.dtype)

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(
                f"expected input [B, {self.config.in_chans}, H, W], got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            size = x.shape[2:] if self.channels_first else x.shape[1:3]
            pos = self.pos_embed
            if tuple(pos.shape[2:]) != tuple(size):
                pos = F.interpolate(pos, size=tuple(size), mode="bicubic", align_corners=False)
            x = x + (pos if self.channels_first else pos.permute(0, 2, 3, 1))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> the last stage's map (channel-first or -last as the model)."""
        x = self._embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Norm, global average pool, [head]: the last stage's map -> ``[B, num_classes]``."""
        self._need_classifier()
        c = self.classifier
        x = c.flatten(c.avgpool(c.permute(c.norm(x))))
        return x if pre_logits else c.head(x)

    def forward_backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The normalised outputs of the stages in ``out_indices`` (channel-first, before each
        stage's downsampling)."""
        if self.out_indices is None:
            raise RuntimeError("forward_backbone needs a model built with out_indices")
        x = self._embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            y = layer.blocks(x)
            x = layer.downsample(y)
            if i in self.out_indices:
                y = getattr(self, f"outnorm{i}")(y)
                if not self.channels_first:
                    y = y.permute(0, 3, 1, 2)
                outs.append(y.contiguous())
            if i >= max(self.out_indices):
                break
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.out_indices is not None:
            return self.forward_backbone(x)
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, Callable[..., VSSM]] = {}
_CONFIGS: dict[str, VSSMConfig] = {}


def register_model(fn: Callable[..., VSSM]) -> Callable[..., VSSM]:
    """Register a model constructor under its function name (for :func:`create_model`)."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` filters with shell wildcards (``"*tiny*"``)."""
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_model(name: str, **kwargs: Any) -> VSSM:
    """Build a registered model: ``create_model("vmamba_nano", num_classes=10, in_chans=1)``."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return fn(**kwargs)


def model_config(name: str, **kwargs: Any) -> VSSMConfig:
    """The configuration ``create_model(name, **kwargs)`` would build (nothing is allocated)."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_CONFIGS))}")
    kwargs.pop("pretrained", None)
    return _configure(_CONFIGS[name], kwargs)


def _configure(base: VSSMConfig, kwargs: dict[str, Any]) -> VSSMConfig:
    kwargs = dict(kwargs)
    if "scan_backend" in kwargs:
        kwargs["ssm_scan_backend"] = kwargs.pop("scan_backend")
    return base.replace(**kwargs)


def _build(base: VSSMConfig, pretrained: str | Path | dict | None = None, **kwargs: Any) -> VSSM:
    model = VSSM(_configure(base, kwargs))
    if pretrained is not None:
        from .checkpoint import load_pretrained

        load_pretrained(model, pretrained)
    return model


def _family(name: str, cfg: VSSMConfig, doc: str) -> Callable[..., VSSM]:
    _CONFIGS[name] = cfg

    def constructor(*, pretrained: str | Path | dict | None = None, **kwargs: Any) -> VSSM:
        return _build(cfg, pretrained=pretrained, **kwargs)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = doc + "\n\nKeyword arguments: see :mod:`vmamba.models`."
    return register_model(constructor)


# VMamba v2: channel-first LayerNorm, stem v2, strided-conv downsampling, no z gate, d_state 1
_V2 = VSSMConfig(
    depths=(2, 2, 8, 2),
    dims=(96, 192, 384, 768),
    ssm=SSMConfig(
        d_state=1, ssm_ratio=1.0, d_conv=3, conv_bias=False, z_gate=False, force_fp32=False
    ),
    mlp=MLPConfig(ratio=4.0),
    patch_embed=PatchEmbedKind.V2,
    downsample=DownsampleKind.V3,
    norm=NormKind.LN2D,
    drop_path_rate=0.2,
)
_S1 = dataclasses.replace(_V2.ssm, ssm_ratio=1.0)
_S2 = dataclasses.replace(_V2.ssm, ssm_ratio=2.0)
_D128 = (128, 256, 512, 1024)

# vanilla VMamba (v0): channel-last LayerNorm, stem v1, patch merging, z gate, d_state 16, no MLP
_V0 = VSSMConfig(
    depths=(2, 2, 9, 2),
    dims=(96, 192, 384, 768),
    ssm=SSMConfig(
        d_state=16, ssm_ratio=2.0, d_conv=3, conv_bias=True, z_gate=True, force_fp32=True
    ),
    mlp=MLPConfig(ratio=0.0),
    patch_embed=PatchEmbedKind.V1,
    downsample=DownsampleKind.V1,
    norm=NormKind.LN,
    drop_path_rate=0.2,
)

vmamba_tiny = _family(
    "vmamba_tiny", dataclasses.replace(_V2, ssm=_S1), "VMamba-T (s1l8), 30.2M params, 4.91 GFLOPs."
)
vmamba_small = _family(
    "vmamba_small",
    dataclasses.replace(_V2, depths=(2, 2, 15, 2), ssm=_S2, drop_path_rate=0.3),
    "VMamba-S (s2l15), 50.1M params, 8.72 GFLOPs.",
)
vmamba_base = _family(
    "vmamba_base",
    dataclasses.replace(_V2, depths=(2, 2, 15, 2), dims=_D128, ssm=_S2, drop_path_rate=0.6),
    "VMamba-B (s2l15), 88.6M params, 15.36 GFLOPs.",
)
vmamba_tiny_s2l5 = _family(
    "vmamba_tiny_s2l5",
    dataclasses.replace(_V2, depths=(2, 2, 5, 2), ssm=_S2),
    "VMamba-T s2l5 (the official vmambav2_tiny_224 config), 30.7M params.",
)
vmamba_small_s1l20 = _family(
    "vmamba_small_s1l20",
    dataclasses.replace(_V2, depths=(2, 2, 20, 2), ssm=_S1, drop_path_rate=0.3),
    "VMamba-S s1l20 (vmambav2v_small_224), 49.0M params.",
)
vmamba_base_s1l20 = _family(
    "vmamba_base_s1l20",
    dataclasses.replace(_V2, depths=(2, 2, 20, 2), dims=_D128, ssm=_S1, drop_path_rate=0.6),
    "VMamba-B s1l20 (vmambav2v_base_224), 86.6M params.",
)
vanilla_vmamba_tiny = _family(
    "vanilla_vmamba_tiny", _V0, "Vanilla VMamba-T (v0), 22.9M params, 5.63 GFLOPs."
)
vanilla_vmamba_small = _family(
    "vanilla_vmamba_small",
    dataclasses.replace(_V0, depths=(2, 2, 27, 2), drop_path_rate=0.3),
    "Vanilla VMamba-S (v0), 44.4M params.",
)
vanilla_vmamba_base = _family(
    "vanilla_vmamba_base",
    dataclasses.replace(_V0, depths=(2, 2, 27, 2), dims=_D128, drop_path_rate=0.5),
    "Vanilla VMamba-B (v0), 76.3M params.",
)
vmamba_nano = _family(
    "vmamba_nano",
    dataclasses.replace(
        _V2,
        depths=(1, 1, 2, 1),
        dims=(32, 64, 128, 256),
        ssm=dataclasses.replace(_S1, force_fp32=True),
        mlp=MLPConfig(ratio=2.0),
        drop_path_rate=0.05,
    ),
    "A small v2-style VMamba for quick experiments and CPU training demos (e.g. 32x32 inputs).",
)
