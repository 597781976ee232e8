"""Checkpoints: official VMamba files, bare state dicts, our own files; official constructor
keyword arguments (``from_official_kwargs``).

Official checkpoints store the weights under ``"model"`` (EMA weights under ``"model_ema"``);
older releases used other parameter names, mapped here (:func:`map_legacy_keys`).
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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

__all__ = [
    "CheckpointError",
    "LoadResult",
    "checkpoint_filter_fn",
    "config_from_dict",
    "config_to_dict",
    "extract_state_dict",
    "from_official_kwargs",
    "load_model",
    "load_pretrained",
    "map_legacy_keys",
    "parse_forward_type",
    "save_pretrained",
]

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped entries) or cannot be
    read."""


@dataclass
class LoadResult:
    """What :func:`load_pretrained` did: keys the checkpoint lacked, keys the model lacks, entries
    skipped for a shape mismatch (``key: (checkpoint shape, model shape)``; only when not strict)
    and the legacy names it renamed (``old -> new``)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# reading


class _Inert(dict):
    """Stands in for a class or function a checkpoint pickled beside its weights (the official
    training files pickle their yacs config): takes whatever it is given, runs no code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


class _InertUnpickler(pickle.Unpickler):
    """Resolves the globals torch's weights-only loader allows (tensor rebuilding, containers);
    every other global becomes an :class:`_Inert` stand-in, so nothing from the file runs."""

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = _get_allowed_globals()
        full = f"{module}.{name}"
        if full in allowed:
            return allowed[full]
        return type(name, (_Inert,), {"__module__": module})


class _InertPickleModule:
    Unpickler = _InertUnpickler
    __name__ = "vmamba_inert_pickle"


def _read_file(path: str | Path, weights_only: bool) -> Any:
    """``torch.load`` on CPU. With ``weights_only``, a file that also pickles Python objects
    (configs, numpy scalars) is read with those objects replaced by inert stand-ins."""
    if not weights_only:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            return torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_InertPickleModule
            )
        except Exception as second:
            raise CheckpointError(
                f"{path}: cannot read it without running code from the file ({first}; then {second}). "
                "If you trust the file, pass weights_only=False."
            ) from second


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def extract_state_dict(
    checkpoint: str | Path | Mapping[str, Any], use_ema: bool = False, weights_only: bool = True
) -> StateDict:
    """The weights of a checkpoint file or loaded object.

    Accepts ``{"model": sd, "model_ema": sd, ...}`` (official and ours), ``{"state_dict": sd}`` and
    a bare state dict. ``use_ema`` selects ``"model_ema"`` (an error if absent). A ``module.``
    prefix (DistributedDataParallel) is removed.
    """
    obj = (
        _read_file(checkpoint, weights_only) if isinstance(checkpoint, (str, Path)) else checkpoint
    )
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a checkpoint dict or state dict, got {type(obj).__name__}")
    if use_ema:
        if "model_ema" not in obj:
            raise CheckpointError(
                f"use_ema=True but the checkpoint has no 'model_ema' (keys: {sorted(obj)[:10]})"
            )
        sd = obj["model_ema"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
    else:
        sd = obj
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    if not _is_state_dict(sd):
        raise CheckpointError(
            "found no state dict: expected a mapping of names to tensors under 'model', "
            f"'model_ema', 'state_dict' or at the top level (top-level keys: {sorted(obj)[:10]})"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


# ------------------------------------------------------------------------------------------------
# legacy names

# (pattern, replacement) applied in order to each key; anchored at the start of the key
_LEGACY_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^patch_embed\.proj\.", "patch_embed.0."),
        (r"^patch_embed\.norm\.", "patch_embed.2."),
        (r"^(layers\.\d+\.blocks\.\d+\.)ln_1\.", r"\1norm."),
        (r"^(layers\.\d+\.blocks\.\d+\.)self_attention\.", r"\1op."),
        (r"^norm\.", "classifier.norm."),
        (r"^head\.", "classifier.head."),
        (r"^(.*\.op\.)x_proj\.weight$", r"\1x_proj_weight"),
        (r"^(.*\.op\.)dt_projs\.weight$", r"\1dt_projs_weight"),
        (r"^(.*\.op\.)dt_projs\.bias$", r"\1dt_projs_bias"),
    )
)
# per-route lists of Linear layers, stacked into one [K, ...] parameter
_STACKED = re.compile(r"^(.*\.op\.)(x_proj|dt_projs)\.(\d+)\.(weight|bias)$")


def map_legacy_keys(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> tuple[StateDict, dict[str, str]]:
    """Rename official legacy parameter names to the current ones.

    ``patch_embed.proj/norm`` -> ``patch_embed.0/2``; ``ln_1`` -> ``norm``; ``self_attention`` ->
    ``op``; top-level ``norm``/``head`` -> ``classifier.norm/head``; ``x_proj.weight`` /
    ``dt_projs.weight`` / ``dt_projs.bias`` -> ``x_proj_weight`` / ``dt_projs_weight`` /
    ``dt_projs_bias``; per-route ``x_proj.{k}.weight`` (and ``dt_projs.{k}.*``) lists are stacked.
    Keys the model already has are never renamed. With ``model``, a renamed tensor whose element
    count matches the model's entry is reshaped to it (flattened ``[K*E, C]`` projections).
    Returns (new state dict, {old name: new name}).
    """
    own = model.state_dict() if model is not None else {}
    out: StateDict = {}
    renamed: dict[str, str] = {}
    stacks: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        if key in own:
            out[key] = value
            continue
        new = key
        for pattern, repl in _LEGACY_RENAMES:
            new = pattern.sub(repl, new)
        m = _STACKED.match(new)
        if m:
            prefix, name, k, kind = m.groups()
            new = f"{prefix}{name}_{kind}"  # x_proj.{k}.weight -> x_proj_weight, ...
            stacks.setdefault(new, {})[int(k)] = (key, value)
            continue
        if new != key:
            renamed[key] = new
        if new in out:
            raise CheckpointError(
                f"legacy name {key!r} maps to {new!r}, which the checkpoint also holds"
            )
        out[new] = value
    for new, parts in stacks.items():
        ks = sorted(parts)
        if ks != list(range(len(ks))):
            raise CheckpointError(f"{new}: per-route entries {ks} are not numbered 0..K-1")
        out[new] = torch.stack([parts[k][1] for k in ks])
        for k in ks:
            renamed[parts[k][0]] = new
    if own:
        for new in set(renamed.values()):
            if new in own and new in out:
                t, ref = out[new], own[new]
                if t.shape != ref.shape and t.numel() == ref.numel():
                    out[new] = t.reshape(ref.shape)
    return out, renamed


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> StateDict:
    """timm-style filter: any accepted checkpoint form -> a state dict with the model's names."""
    sd = extract_state_dict(state_dict)
    return map_legacy_keys(sd, model)[0]


# ------------------------------------------------------------------------------------------------
# loading


def _fmt_list(title: str, items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {shown}{more}"


def load_pretrained(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, Any],
    use_ema: bool = False,
    strict: bool = True,
    prefix: str = "",
    weights_only: bool = True,
) -> LoadResult:
    """Load weights into ``model`` from an official VMamba checkpoint, a bare state dict or our own
    checkpoint, mapping legacy names.

    ``strict=True``: any missing or unexpected key or shape mismatch raises :class:`CheckpointError`
    listing them all. ``strict=False``: loads what fits and reports the rest in the returned
    :class:`LoadResult` (e.g. an ImageNet head into a 10-class model, or a classifier checkpoint
    into a backbone). ``prefix`` selects and strips the keys under it (e.g. ``"backbone."`` in
    detection checkpoints). Files are read without running code from them: Python objects pickled
    beside the weights (the official files' training config) come back as inert stand-ins;
    ``weights_only=False`` reads them with plain ``pickle`` (only for files you trust).
    """
    sd = extract_state_dict(checkpoint, use_ema=use_ema, weights_only=weights_only)
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"no checkpoint key starts with prefix {prefix!r}")
    sd, renamed = map_legacy_keys(sd, model)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = {
        k: (tuple(sd[k].shape), tuple(own[k].shape))
        for k in own
        if k in sd and _reshaped_for(model, k, sd[k]).shape != own[k].shape
    }
    if strict and (missing or unexpected or mismatched):
        parts = ["checkpoint does not match the model"]
        if missing:
            parts.append(_fmt_list("missing keys", missing))
        if unexpected:
            parts.append(_fmt_list("unexpected keys", unexpected))
        if mismatched:
            parts.append(
                _fmt_list(
                    "shape mismatches",
                    [
                        f"{k}: checkpoint {list(a)} vs model {list(b)}"
                        for k, (a, b) in mismatched.items()
                    ],
                )
            )
        raise CheckpointError("\n  ".join(parts))
    load = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    model.load_state_dict(load, strict=False)
    return LoadResult(
        missing=missing, unexpected=unexpected, mismatched=mismatched, renamed=renamed
    )


def _reshaped_for(model: nn.Module, key: str, t: torch.Tensor) -> torch.Tensor:
    # 1x1-conv weights [out, in, 1, 1] load into Linear2d's [out, in] (Linear2d reshapes them)
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        mod_name, _, pname = key.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            return t
        from .layers import Linear2d

        if isinstance(mod, Linear2d) and pname == "weight":
            return t.reshape(t.shape[:2])
    return t


# ------------------------------------------------------------------------------------------------
# our own files: weights plus the configuration that rebuilds the model


def _plain(x: Any) -> Any:
    if isinstance(x, enum.Enum):
        return x.value
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    name = getattr(x, "name", None)  # a scanlib RouteSet: stored by name
    if isinstance(name, str):
        return name
    raise TypeError(f"cannot store config value of type {type(x).__name__}")


def config_to_dict(config: VSSMConfig) -> dict[str, Any]:
    """A plain (JSON- and ``weights_only``-safe) dict of a :class:`VSSMConfig`; route sets are
    stored by name."""
    return _plain(config)


def config_from_dict(d: Mapping[str, Any]) -> VSSMConfig:
    """The inverse of :func:`config_to_dict`."""
    d = dict(d)
    ssm = d.pop("ssm", {}) or {}
    mlp = d.pop("mlp", {}) or {}
    if isinstance(ssm.get("scan_backend"), list):
        ssm["scan_backend"] = tuple(ssm["scan_backend"])
    for k in ("depths", "dims", "out_indices", "routes"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    return VSSMConfig(ssm=SSMConfig(**ssm), mlp=MLPConfig(**mlp), **d)


def save_pretrained(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """Save ``{"model": state_dict, "config": plain config dict, **extra}`` (readable with
    ``weights_only=True``; :func:`load_model` rebuilds the model from it)."""
    payload: dict[str, Any] = {"model": model.state_dict(), **extra}
    cfg = getattr(model, "config", None)
    if isinstance(cfg, VSSMConfig):
        payload["config"] = config_to_dict(cfg)
    torch.save(payload, path)


def load_model(path: str | Path, use_ema: bool = False, **overrides: Any) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained` and load its weights (strictly)."""
    from .models import VSSM

    obj = _read_file(path, weights_only=True)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("config"), Mapping):
        raise CheckpointError(
            f"{path}: no 'config' entry; build the model yourself and use load_pretrained"
        )
    cfg = config_from_dict(obj["config"])
    if overrides:
        cfg = cfg.replace(**overrides)
    model = VSSM(cfg)
    load_pretrained(model, obj, use_ema=use_ema)
    return model


# ------------------------------------------------------------------------------------------------
# official constructor keyword arguments

_OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    patch_size=4,
    in_chans=3,
    num_classes=1000,
    depths=(2, 2, 9, 2),
    dims=(96, 192, 384, 768),
    ssm_d_state=16,
    ssm_ratio=2.0,
    ssm_dt_rank="auto",
    ssm_act_layer="silu",
    ssm_conv=3,
    ssm_conv_bias=True,
    ssm_drop_rate=0.0,
    ssm_init="v0",
    forward_type="v2",
    mlp_ratio=4.0,
    mlp_act_layer="gelu",
    mlp_drop_rate=0.0,
    gmlp=False,
    drop_path_rate=0.1,
    patch_norm=True,
    norm_layer="ln",
    downsample_version="v2",
    patchembed_version="v1",
    use_checkpoint=False,
    posembed=False,
    imgsize=224,
)
# keyword arguments that are ours (not the official VSSM's) but accepted alongside
_EXTRA_KWARGS = ("routes", "scan_backend", "out_indices")

# base forward types of the official SS2D v2: (force_fp32 follows "_no32", route set)
_V2_BASES: dict[str, tuple[bool, str]] = {
    "v01": (True, "cross2d"),
    "v02": (True, "cross2d"),
    "v03": (True, "cross2d"),
    "v2": (True, "cross2d"),
    "v04": (False, "cross2d"),
    "v05": (False, "cross2d"),
    "v3": (False, "cross2d"),
    "v051d": (False, "unidi"),
    "v052d": (False, "bidi"),
}
_OUT_NORMS = {
    "_onnone": OutNorm.NONE,
    "_ondwconv3": OutNorm.DWCONV3,
    "_oncnorm": OutNorm.CNORM,
    "_onsoftmax": OutNorm.SOFTMAX,
    "_onsigmoid": OutNorm.SIGMOID,
}


def _strip(tag: str, value: str) -> tuple[bool, str]:
    if value.endswith(tag):
        return True, value[: -len(tag)]
    return False, value


def parse_forward_type(forward_type: str) -> dict[str, Any]:
    """Map an official ``forward_type`` string to :class:`SSMConfig` fields.

    ``"v0"``/``"v0seq"``: vanilla SS2D (z gate, float32 scan inputs, LayerNorm out-norm; the conv
    is always 3x3 with bias and the activation SiLU). The v2 family: a base (``v01 v02 v03 v04 v05
    v2 v3``: four cross routes; ``v051d``: one route four times; ``v052d``: bidirectional) followed
    by postfixes, parsed from the end as the official code does: ``_no32`` (no float32 cast),
    ``_oact`` (GELU after the out-norm), ``_noz`` (no z gate), ``_nozact`` (no activation on z),
    out-norm ``_onnone _ondwconv3 _oncnorm _onsoftmax _onsigmoid``. Anything else (e.g. the
    ``xv*`` and ``m0`` mixers, ``v052dc`` cascade scanning) raises ``ValueError``.
    """
    if not isinstance(forward_type, str):
        raise ValueError(f"forward_type must be a string, got {type(forward_type).__name__}")
    if forward_type in ("v0", "v0seq"):
        return dict(
            z_gate=True,
            z_act=True,
            force_fp32=True,
            out_norm=OutNorm.LAYERNORM,
            out_act=False,
            routes="cross2d",
            _vanilla=True,
        )
    rest = forward_type
    no32, rest = _strip("_no32", rest)
    oact, rest = _strip("_oact", rest)
    noz, rest = _strip("_noz", rest)
    nozact, rest = _strip("_nozact", rest)
    out_norm = OutNorm.LAYERNORM
    for tag, kind in _OUT_NORMS.items():
        hit, rest = _strip(tag, rest)
        if hit:
            out_norm = kind
            break
    if rest not in _V2_BASES:
        hint = ""
        if rest.startswith("xv") or rest.startswith("m0"):
            hint = " (the SS2Dv3 'xv*' and Mamba2-style 'm0' mixers are not implemented)"
        elif rest == "v052dc":
            hint = " (cascade2d scanning is not implemented)"
        supported = ", ".join(["v0", "v0seq", *_V2_BASES])
        raise ValueError(
            f"unsupported forward_type {forward_type!r}: base {rest!r} is not one of {supported}{hint}; "
            f"postfixes: _no32 _oact _noz _nozact {' '.join(_OUT_NORMS)}"
        )
    fp32_by_default, routes = _V2_BASES[rest]
    return dict(
        z_gate=not noz,
        z_act=not nozact,
        force_fp32=fp32_by_default and not no32,
        out_norm=out_norm,
        out_act=oact,
        routes=routes,
    )


def _act_name(value: Any, what: str) -> Activation:
    if isinstance(value, type) and issubclass(value, nn.Module):
        names = {nn.SiLU: "silu", nn.GELU: "gelu", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}
        if value not in names:
            raise ValueError(f"{what}: unsupported activation class {value.__name__}")
        value = names[value]
    return Activation(str(value).lower())


def from_official_kwargs(**kwargs: Any) -> nn.Module:
    """Build a model from the official ``VSSM(...)`` (or ``Backbone_VSSM``, via ``out_indices``)
    keyword arguments, with the official defaults for those not given.

    Also accepts ``routes`` and ``scan_backend`` (ours). Unknown arguments raise ``TypeError``;
    unsupported ``forward_type`` values raise ``ValueError`` (see :func:`parse_forward_type`).
    """
    from .models import VSSM

    unknown = sorted(set(kwargs) - set(_OFFICIAL_DEFAULTS) - set(_EXTRA_KWARGS))
    if unknown:
        raise TypeError(f"from_official_kwargs: unknown keyword arguments {unknown}")
    a = {**_OFFICIAL_DEFAULTS, **kwargs}
    ssm_fields = parse_forward_type(a["forward_type"])
    vanilla = ssm_fields.pop("_vanilla", False)
    if a.get("routes") is not None:
        ssm_fields.pop("routes")
    dt_rank = a["ssm_dt_rank"]
    dt_rank = None if dt_rank == "auto" else int(dt_rank)
    norm = NormKind(str(a["norm_layer"]).lower())
    if vanilla:
        # the official v0 mixer ignores the conv/activation/init arguments
        ssm = SSMConfig(
            d_state=int(a["ssm_d_state"]),
            ssm_ratio=float(a["ssm_ratio"]),
            dt_rank=dt_rank,
            act=Activation.SILU,
            d_conv=3,
            conv_bias=True,
            dropout=float(a["ssm_drop_rate"]),
            init="v0",
            scan_backend=a.get("scan_backend"),
            **ssm_fields,
        )
    else:
        ssm = SSMConfig(
            d_state=int(a["ssm_d_state"]),
            ssm_ratio=float(a["ssm_ratio"]),
            dt_rank=dt_rank,
            act=_act_name(a["ssm_act_layer"], "ssm_act_layer"),
            d_conv=int(a["ssm_conv"]),
            conv_bias=bool(a["ssm_conv_bias"]),
            dropout=float(a["ssm_drop_rate"]),
            init=str(a["ssm_init"]),
            scan_backend=a.get("scan_backend"),
            **ssm_fields,
        )
    mlp = MLPConfig(
        ratio=float(a["mlp_ratio"]),
        act=_act_name(a["mlp_act_layer"], "mlp_act_layer"),
        drop=float(a["mlp_drop_rate"]),
        gated=bool(a["gmlp"]),
    )
    dims = a["dims"]
    cfg = VSSMConfig(
        depths=tuple(a["depths"]),
        dims=dims if isinstance(dims, int) else tuple(dims),
        ssm=ssm,
        mlp=mlp,
        in_chans=int(a["in_chans"]),
        num_classes=int(a["num_classes"]),
        patch_size=int(a["patch_size"]),
        patch_embed=PatchEmbedKind(a["patchembed_version"]),
        patch_norm=bool(a["patch_norm"]),
        downsample=DownsampleKind(a["downsample_version"]),
        norm=norm,
        drop_path_rate=float(a["drop_path_rate"]),
        routes=a.get("routes"),
        out_indices=tuple(a["out_indices"]) if a.get("out_indices") is not None else None,
        use_checkpoint=bool(a["use_checkpoint"]),
        pos_embed=bool(a["posembed"]),
        img_size=int(a["imgsize"]),
    )
    return VSSM(cfg)
