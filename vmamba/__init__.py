"""VMamba visual state-space models on top of scanlib.

``vmamba.create_model("vmamba_tiny")`` (or ``vmamba.vmamba_tiny()``) builds a model;
``vmamba.load_pretrained(model, "vssm_tiny.pth")`` loads official weights; ``vmamba.count_flops``
counts FLOPs with the paper's convention. Importing vmamba does not import timm; models are
registered with timm by ``vmamba.timm_compat.register_timm_models()`` (done on import when timm is
installed).
"""

from __future__ import annotations

from .checkpoint import (
    CheckpointError,
    LoadResult,
    checkpoint_filter_fn,
    from_official_kwargs,
    load_model,
    load_pretrained,
    map_legacy_keys,
    parse_forward_type,
    save_pretrained,
)
from .config import (
    Activation,
    DownsampleKind,
    MLPConfig,
    NormKind,
    OutNorm,
    PatchEmbedKind,
    SSMConfig,
    VSSMConfig,
)
from .flops import FlopCount, count_flops, selective_scan_flops
from .layers import SS2D, VSSBlock
from .models import (
    VSSM,
    create_model,
    list_models,
    model_config,
    register_model,
    vanilla_vmamba_base,
    vanilla_vmamba_small,
    vanilla_vmamba_tiny,
    vmamba_base,
    vmamba_base_s1l20,
    vmamba_nano,
    vmamba_small,
    vmamba_small_s1l20,
    vmamba_tiny,
    vmamba_tiny_s2l5,
)
from .timm_compat import install_import_hook as _install_timm_hook

_install_timm_hook()

__all__ = [
    "SS2D",
    "VSSM",
    "Activation",
    "CheckpointError",
    "DownsampleKind",
    "FlopCount",
    "LoadResult",
    "MLPConfig",
    "NormKind",
    "OutNorm",
    "PatchEmbedKind",
    "SSMConfig",
    "VSSBlock",
    "VSSMConfig",
    "checkpoint_filter_fn",
    "count_flops",
    "create_model",
    "from_official_kwargs",
    "list_models",
    "load_model",
    "load_pretrained",
    "map_legacy_keys",
    "model_config",
    "parse_forward_type",
    "register_model",
    "save_pretrained",
    "selective_scan_flops",
    "vanilla_vmamba_base",
    "vanilla_vmamba_small",
    "vanilla_vmamba_tiny",
    "vmamba_base",
    "vmamba_base_s1l20",
    "vmamba_nano",
    "vmamba_small",
    "vmamba_small_s1l20",
    "vmamba_tiny",
    "vmamba_tiny_s2l5",
]
