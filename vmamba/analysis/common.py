"""Shared pieces of the analysis tools: building models from a short spec, reading images,
extracting a stage's feature map, and the optional plotting dependency.

A model spec is one of

* a vmamba model name (``vmamba_tiny``), built untrained;
* a timm model name (``convnext_tiny``), built with ``pretrained=False`` (nothing is downloaded);
* ``NAME@PATH``: that model with the weights of a checkpoint file (official or ours);
* ``PATH`` alone: a checkpoint written by ``vmamba train`` (a file or a run directory), which
  says itself which model it holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scanlib.errors import missing_dependency

from ..data.errors import CheckpointError, ConfigError, DataError
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger("vmamba.analysis")

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "check_model_spec",
    "feature_extractor",
    "load_images",
    "load_model",
    "parse_model_arg",
    "parse_model_spec",
    "require_matplotlib",
    "resolve_device",
]

# grey-level statistics of ImageNet, for one-channel models fed with photographs
_GRAY_MEAN = (float(np.mean(IMAGENET_MEAN)),)
_GRAY_STD = (float(np.mean(IMAGENET_STD)),)


def require_matplotlib():
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or MissingDependencyError."""
    try:
        import matplotlib
    except ImportError:
        raise missing_dependency("matplotlib", "plot", "drawing analysis figures") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when torch sees a device, else cpu; ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for, but torch sees no CUDA device")
    return dev


def parse_model_arg(items: Sequence[str] | None) -> dict[str, Any]:
    """``["num_classes=10", "routes='snake'"]`` -> keyword arguments (values read as Python
    literals when they parse, else kept as strings)."""
    import ast

    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


# ------------------------------------------------------------------------------------------------
# models


@dataclass
class ModelSpec:
    """What to build: ``name`` (None when ``checkpoint`` is a training checkpoint that names its
    own model) and an optional checkpoint path."""

    name: str | None
    checkpoint: str | None = None

    @property
    def label(self) -> str:
        if self.checkpoint is None:
            return (
                f"{self.name} (untrained)"
                if _is_vmamba(self.name)
                else f"{self.name} (random init)"
            )
        stem = Path(self.checkpoint).name or str(self.checkpoint)
        return f"{self.name or 'trained'} ({stem})"


@dataclass
class LoadedModel:
    """A built model in eval mode plus what the analysis tools need to feed it."""

    model: nn.Module
    label: str
    kind: str  # "vmamba" | "timm" | "module"
    name: str
    in_chans: int = 3
    img_size: int | None = None  # the training size, when the checkpoint says
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dataset: str | None = None  # "digits" when trained on the embedded digits
    extra: dict[str, Any] = field(default_factory=dict)


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME``, ``NAME@CHECKPOINT`` or a training checkpoint ``PATH`` (file or run directory)."""
    text = text.strip()
    if not text:
        raise ConfigError("empty model spec")
    name, sep, ckpt = text.partition("@")
    if sep:
        if not name or not ckpt:
            raise ConfigError(f"model spec {text!r}: expected NAME@CHECKPOINT")
        return ModelSpec(name, ckpt)
    if os.path.sep in text or os.path.exists(text) or text.endswith((".pt", ".pth", ".ckpt")):
        return ModelSpec(None, text)
    return ModelSpec(text)


def _is_vmamba(name: str | None) -> bool:
    if name is None:
        return False
    import vmamba

    return name in vmamba.list_models()


def check_model_spec(spec: ModelSpec | str) -> ModelSpec:
    """Fail early (ConfigError / CheckpointError) on a spec that names no known model or a
    checkpoint that does not exist; returns the parsed spec."""
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    if spec.checkpoint is not None and not os.path.exists(spec.checkpoint):
        raise CheckpointError(f"checkpoint {spec.checkpoint} does not exist")
    if spec.name is not None and not _is_vmamba(spec.name):
        timm = _timm()
        if timm is None or not timm.is_model(spec.name):
            import vmamba

            hint = (
                ""
                if timm is not None
                else " (timm is not installed: pip install 'scanlib-vmamba[timm]')"
            )
            raise ConfigError(
                f"unknown model {spec.name!r}: not a vmamba model ({', '.join(vmamba.list_models())}) "
                f"nor a timm model{hint}"
            )
    return spec


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def _training_checkpoint(path: str) -> dict[str, Any] | None:
    """The dict of a ``vmamba train`` checkpoint at ``path`` (file or run dir), else None."""
    from ..train import CHECKPOINT_FORMAT, checkpoint_path

    p = checkpoint_path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # official files may pickle other objects: not ours
        return None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj["_path"] = str(p)
        return obj
    return None


def load_model(
    spec: ModelSpec | str,
    *,
    model_args: Mapping[str, Any] | None = None,
    img_size: int | None = None,
    use_ema: bool = False,
) -> LoadedModel:
    """Build the model of ``spec`` in eval mode (weights loaded strictly when a checkpoint is given).

    ``model_args`` go to the vmamba/timm constructor (e.g. ``routes="snake"``). ``img_size`` is
    passed to timm models that fix their input size at construction (ViT, Swin).
    """
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    kwargs = dict(model_args or {})
    if spec.name is None or (spec.checkpoint is not None and _is_vmamba(spec.name)):
        ckpt = _training_checkpoint(spec.checkpoint) if spec.checkpoint else None
        if ckpt is not None:
            return _from_training_checkpoint(spec, ckpt, kwargs, use_ema)
        if spec.name is None:
            raise CheckpointError(
                f"{spec.checkpoint} is not a `vmamba train` checkpoint; name its model: "
                f"NAME@{spec.checkpoint}"
            )
    name = spec.name
    assert name is not None
    if _is_vmamba(name):
        import vmamba

        if spec.checkpoint is not None:
            kwargs = _infer_vmamba_kwargs(spec.checkpoint, kwargs)
        try:
            model = vmamba.create_model(name, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build {name} with {kwargs}: {e}") from e
        if spec.checkpoint is not None:
            try:
                vmamba.load_pretrained(model, spec.checkpoint, use_ema=use_ema)
            except (ValueError, OSError, RuntimeError) as e:
                raise CheckpointError(f"cannot load {spec.checkpoint} into {name}: {e}") from e
        in_chans = int(model.config.in_chans)
        return LoadedModel(
            model.eval(),
            spec.label,
            "vmamba",
            name,
            in_chans=in_chans,
            mean=IMAGENET_MEAN if in_chans == 3 else _GRAY_MEAN,
            std=IMAGENET_STD if in_chans == 3 else _GRAY_STD,
        )
    timm = _timm()
    if timm is not None and timm.is_model(name):
        model = _create_timm(timm, name, kwargs, img_size)
        if spec.checkpoint is not None:
            from timm.models import load_checkpoint

            try:
                load_checkpoint(model, spec.checkpoint, use_ema=use_ema, strict=True)
            except (RuntimeError, OSError, KeyError) as e:
                raise CheckpointError(f"cannot load {spec.checkpoint} into {name}: {e}") from e
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
        return LoadedModel(model.eval(), spec.label, "timm", name, mean=mean, std=std)
    check_model_spec(ModelSpec(name))  # raises: names no known model
    raise AssertionError("unreachable")


def _create_timm(timm, name: str, kwargs: dict[str, Any], img_size: int | None) -> nn.Module:
    kw = dict(kwargs)
    if img_size is not None and "img_size" not in kw:
        try:  # ViT and Swin fix their token grid at construction
            return timm.create_model(name, pretrained=False, img_size=img_size, **kw)
        except TypeError:
            pass
    try:
        return timm.create_model(name, pretrained=False, **kw)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot build timm model {name} with {kw}: {e}") from e


def _infer_vmamba_kwargs(path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """num_classes and in_chans read off the checkpoint's tensors, unless given."""
    import vmamba.checkpoint as ck

    try:
        sd = ck.extract_state_dict(path, weights_only=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    sd, _ = ck.map_legacy_keys(sd)
    kwargs = dict(kwargs)
    head = sd.get("classifier.head.weight")
    if "num_classes" not in kwargs and head is not None:
        kwargs["num_classes"] = int(head.shape[0])
    stem = sd.get("patch_embed.0.weight")
    if "in_chans" not in kwargs and stem is not None and stem.ndim == 4:
        kwargs["in_chans"] = int(stem.shape[1])
    return kwargs


def _from_training_checkpoint(
    spec: ModelSpec, ckpt: dict[str, Any], kwargs: dict[str, Any], use_ema: bool
) -> LoadedModel:
    from ..train import build_model

    mc, info = ckpt["model_config"], ckpt.get("data", {}) or {}
    if spec.name is not None and spec.name != mc["name"]:
        raise ConfigError(f"{ckpt['_path']} holds a {mc['name']} model, not {spec.name}")
    model = build_model(
        mc["name"], mc["num_classes"], mc["in_chans"], None, {**mc["kwargs"], **kwargs}
    )
    state = ckpt["model_ema"] if use_ema else ckpt["model"]
    if state is None:
        raise CheckpointError(f"{ckpt['_path']} has no EMA weights")
    model.load_state_dict(state)
    cfg = ckpt.get("config", {}) or {}
    dataset = "digits" if cfg.get("data") is None else str(cfg["data"])
    label = f"{mc['name']} (trained, {Path(ckpt['_path']).parent.name or ckpt['_path']})"
    return LoadedModel(
        model.eval(),
        label,
        "vmamba",
        mc["name"],
        in_chans=int(mc["in_chans"]),
        img_size=info.get("img_size"),
        mean=tuple(info.get("mean", IMAGENET_MEAN)),
        std=tuple(info.get("std", IMAGENET_STD)),
        dataset=dataset,
        extra={"epochs": len(ckpt.get("history", []) or []), "checkpoint": ckpt["_path"]},
    )


# ------------------------------------------------------------------------------------------------
# feature maps


class _Stop(Exception):
    """Raised by a forward hook once the wanted activation is captured (skips the rest)."""


def _to_nchw(t: torch.Tensor, channels_first: bool) -> torch.Tensor:
    if t.ndim != 4:
        raise ConfigError(f"expected a 4-D feature map, got shape {tuple(t.shape)}")
    return t if channels_first else t.permute(0, 3, 1, 2)


def feature_extractor(
    loaded: LoadedModel, stage: int = -1
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``x [B, C_in, H, W] -> feature map [B, C, h, w]`` of stage ``stage``.

    vmamba models: the output of ``layers[stage].blocks`` (before the stage's downsampling);
    timm models: ``forward_intermediates`` at index ``stage`` (a stage for CNNs and Swin, a block
    for ViTs); other modules: the module's own output (a 4-D map, or the last of a list).
    """
    model = loaded.model
    if loaded.kind == "vmamba":
        n = len(model.layers)
        if not -n <= stage < n:
            raise ConfigError(f"--stage {stage}: {loaded.name} has stages 0..{n - 1}")
        target = model.layers[stage].blocks
        channels_first = bool(model.channels_first)

        def run(x: torch.Tensor) -> torch.Tensor:
            got: list[torch.Tensor] = []

            def hook(_m, _inp, out):
                got.append(out)
                raise _Stop

            handle = target.register_forward_hook(hook)
            try:
                model.forward_features(x)
            except _Stop:
                pass
            finally:
                handle.remove()
            return _to_nchw(got[0], channels_first)

        return run
    if loaded.kind == "timm" and hasattr(model, "forward_intermediates"):

        def run(x: torch.Tensor) -> torch.Tensor:
            try:
                outs = model.forward_intermediates(x, indices=[stage], intermediates_only=True)
            except (IndexError, AssertionError, ValueError) as e:
                raise ConfigError(f"--stage {stage} is not valid for {loaded.name}: {e}") from e
            return _to_nchw(outs[-1], True)

        return run

    def run(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if isinstance(out, (list, tuple)):
            out = out[stage]
        return _to_nchw(out, True)

    return run


# ------------------------------------------------------------------------------------------------
# images


def _resize_center_crop(img, size: int, rng: np.random.Generator | None):
    """PIL image -> size x size: shorter side to ``size`` then a centre crop; with ``rng`` a random
    crop of 50-100% of the shorter side instead."""
    from PIL import Image

    w, h = img.size
    side = min(w, h)
    if rng is None:
        crop = side
        left, top = (w - crop) // 2, (h - crop) // 2
    else:
        crop = int(side * rng.uniform(0.5, 1.0))
        left = int(rng.integers(0, w - crop + 1))
        top = int(rng.integers(0, h - crop + 1))
    img = img.crop((left, top, left + crop, top + crop))
    return img.resize((size, size), Image.Resampling.BICUBIC)


def _sample_photos() -> list[tuple[str, Any]]:
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise missing_dependency("scikit-learn", "train", "the default sample images") from None
    data = load_sample_images()
    return [(Path(f).name, Image.fromarray(a)) for f, a in zip(data.filenames, data.images)]


def _folder_photos(folder: Path) -> list[tuple[str, Any]]:
    from PIL import Image

    from ..data import IMG_EXTENSIONS

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append((p.name, im.convert("RGB")))
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from e
    return out


def load_images(
    source: str | None,
    size: int,
    *,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_images: int | None = None,
    crops_per_image: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Images for the analysis tools.

    ``source``: None or ``"sklearn"`` (scikit-learn's sample photographs), ``"digits"`` (the
    embedded digits test split, one channel), or a folder of images (searched recursively).
    Each photograph gives ``crops_per_image`` square crops (the centre crop first, then random
    crops of 50-100% of the shorter side) resized to ``size``.

    Returns (normalised ``[N, in_chans, size, size]`` float32, the display images ``[N, size,
    size, 3]`` in 0..1, names).
    """
    if size < 8:
        raise ConfigError(f"image size {size} is too small (at least 8)")
    if source == "digits":
        from ..data import DigitsDataset

        ds = DigitsDataset("test", img_size=size)
        n = len(ds) if num_images is None else min(num_images, len(ds))
        gray = ds.images[:n] * ds.std[0] + ds.mean[0]  # back to 0..1 for display
        shown = gray.clamp(0, 1)[:, 0, :, :, None].expand(-1, -1, -1, 3).numpy().copy()
        names = [f"digit #{i} (label {int(ds.labels[i])})" for i in range(n)]
        if in_chans == 1:
            return ds.images[:n].float().contiguous(), shown, names
        x = gray.expand(-1, in_chans, -1, -1)
        m = torch.tensor(mean[:in_chans], dtype=torch.float32)[:, None, None]
        s = torch.tensor(std[:in_chans], dtype=torch.float32)[:, None, None]
        return ((x - m) / s).contiguous(), shown, names
    if source in (None, "sklearn"):
        photos = _sample_photos()
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise DataError(f"--images {source}: not a folder (nor 'sklearn' or 'digits')")
        photos = _folder_photos(folder)
    rng = np.random.default_rng(seed)
    arrays, names = [], []
    for name, img in photos:
        for c in range(max(1, crops_per_image)):
            crop = _resize_center_crop(img, size, None if c == 0 else rng)
            arrays.append(np.asarray(crop, dtype=np.float32) / 255.0)
            names.append(name if c == 0 else f"{name}#crop{c}")
    if num_images is not None:
        arrays, names = arrays[:num_images], names[:num_images]
    shown = np.stack(arrays)  # [N, S, S, 3]
    x = torch.from_numpy(shown).permute(0, 3, 1, 2)
    if in_chans == 1:
        x = x.mean(dim=1, keepdim=True)
    elif in_chans != 3:
        raise ConfigError(f"photographs have 3 channels; the model wants {in_chans}")
    m = torch.tensor(mean, dtype=torch.float32)[:in_chans, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:in_chans, None, None]
    if m.shape[0] != in_chans:  # one-channel statistics from a three-channel model config
        m, s = m.mean(0, keepdim=True), s.mean(0, keepdim=True)
    return ((x - m) / s).contiguous(), shown, names
