"""Register the VMamba models with timm, when timm is installed (timm is never required).

After ``import vmamba``, ``timm.create_model("vmamba_tiny", num_classes=10)`` works whatever the
import order: if timm is already imported the models are registered at once, otherwise when timm
is first imported (a one-shot import hook installed only if timm is installed; importing vmamba
never imports timm). ``register_timm_models()`` does it explicitly.

timm's ``pretrained=True`` needs a local file: ``pretrained_cfg_overlay=dict(file="ckpt.pth")``
(official or ours; loaded with :func:`vmamba.load_pretrained`). ``features_only=True`` builds the
backbone (``out_indices``, default all stages).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from .models import _REGISTRY, VSSM

__all__: list[str] = ["install_import_hook", "register_timm_models", "timm_entrypoint"]

log = logging.getLogger(__name__)
_registered = False


def _pretrained_file(pretrained_cfg: Any, overlay: dict[str, Any] | None) -> str | None:
    for source in (overlay or {}, pretrained_cfg):
        if source is None:
            continue
        f = source.get("file") if isinstance(source, dict) else getattr(source, "file", None)
        if f:
            return str(f)
    return None


def timm_entrypoint(name: str) -> Callable[..., VSSM]:
    """A timm-style entrypoint for the registered vmamba model ``name``."""
    build = _REGISTRY[name]

    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        cache_dir: Any = None,
        features_only: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> VSSM:
        kwargs.pop("drop_rate", None)  # timm's generic classifier dropout: VMamba has none
        if features_only and kwargs.get("out_indices") is None:
            kwargs["out_indices"] = (0, 1, 2, 3)
        path = None
        if pretrained:
            path = _pretrained_file(pretrained_cfg, pretrained_cfg_overlay)
            if path is None:
                raise ValueError(
                    f"{name}: pretrained=True needs a local checkpoint, e.g. "
                    f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file='ckpt.pth')); "
                    "weights are not downloaded"
                )
        if device is not None:
            with torch.device(device):
                model = build(**kwargs)
        else:
            model = build(**kwargs)
        if dtype is not None:
            model = model.to(dtype=dtype)
        if path is not None:
            from .checkpoint import load_pretrained

            load_pretrained(model, path, strict=not features_only and model.num_classes == 1000)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = build.__doc__
    return entrypoint


def register_timm_models() -> list[str]:
    """Register every vmamba model with timm; returns the names. Raises ImportError without timm."""
    global _registered
    from timm.models import register_model

    names = sorted(_REGISTRY)
    if not _registered:
        for name in names:
            register_model(timm_entrypoint(name))
        _registered = True
    return names


class _TimmLoader(importlib.abc.Loader):
    """Wraps timm's own loader: runs it, then registers our models (once)."""

    def __init__(self, loader: importlib.abc.Loader, finder: _TimmFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):  # noqa: ANN001
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        try:
            register_timm_models()
        except Exception:  # never break importing timm
            log.warning("could not register the vmamba models with timm", exc_info=True)

    def __getattr__(self, name: str) -> Any:  # is_package, get_resource_reader, ...
        return getattr(self._loader, name)


class _TimmFinder(importlib.abc.MetaPathFinder):
    """Finds ``timm`` with the other finders and wraps its loader (see :class:`_TimmLoader`)."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname != "timm" or self._busy:
            return None
        self._busy = True  # importlib.util.find_spec below asks every finder, this one included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _TimmLoader(spec.loader, self)
        return spec


def install_import_hook() -> None:
    """Register with timm now if it is imported, else when it is first imported (if installed)."""
    if "timm" in sys.modules:
        try:
            register_timm_models()
        except Exception:
            log.warning("could not register the vmamba models with timm", exc_info=True)
        return
    if any(isinstance(f, _TimmFinder) for f in sys.meta_path):
        return
    if importlib.util.find_spec("timm") is not None:
        sys.meta_path.insert(0, _TimmFinder())
