"""Backend registry and selection.

A backend declares what it supports as class data (devices, dtypes, features, ops) and explains
why it declines a call through ``not_supported_reasons``. Selection precedence, first match wins:

1. per-call ``backend=`` (a name or an ordered list of names);
2. the innermost ``with scanlib.use_backend(...)`` (held in a ContextVar: thread- and task-safe);
3. ``scanlib.set_backend(...)``;
4. the environment variable ``SCANLIB_BACKEND`` (a name or a comma-separated list);
5. automatic: every registered backend in priority order, skipping those that decline.

Named backends that cannot run the call raise :class:`BackendUnavailableError` listing every
candidate's reasons. A named backend that does not implement an op at all (e.g. a scan-only
backend asked for ``cross_scan``) is passed over for that op, which then uses automatic selection.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from .errors import BackendUnavailableError, MissingDependencyError, UnknownBackendError
from .inputs import Feature

ENV_VAR = "SCANLIB_BACKEND"
ENTRY_POINT_GROUP = "scanlib.backends"


class OpInputs(Protocol):
    """What every op's inputs expose to backends (ScanInputs, RouteInputs)."""

    op: str

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def features(self) -> frozenset[Any]: ...


@dataclass(frozen=True)
class Requirement:
    """An optional Python package a backend needs, and the pip extra that brings it."""

    module: str
    extra: str


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already (None: import blocked on purpose)
        return sys.modules[module] is not None
    return _findable(module)


@functools.cache
def _findable(module: str) -> bool:
    # cached: find_spec walks sys.path, and selection asks on every call
    return importlib.util.find_spec(module) is not None


class Backend:
    """Base class of a scanlib backend. Subclasses set the class data and implement the ops."""

    name: ClassVar[str] = ""
    #: higher runs first in automatic selection
    priority: ClassVar[int] = 0
    #: ops this backend implements: "selective_scan", "cross_scan", "cross_merge",
    #: "cross_selective_scan" (fused; scanlib composes it from the others where none implements it)
    ops: ClassVar[frozenset[str]] = frozenset({"selective_scan"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float32})
    features: ClassVar[frozenset[Feature]] = frozenset()
    #: same inputs give bitwise-identical results (forward and backward)
    deterministic: ClassVar[bool] = True
    requires: ClassVar[tuple[Requirement, ...]] = ()
    description: ClassVar[str] = ""

    # ------------------------------------------------------------------ capability checks
    def availability_reasons(self) -> list[str]:
        """Reasons this backend cannot run at all here (missing package, no device...)."""
        out = []
        for req in self.requires:
            if not _installed(req.module):
                out.append(
                    f"the package '{req.module}' is not installed: pip install 'scanlib-vmamba[{req.extra}]'"
                )
        return out

    def device_reasons(self, device: torch.device) -> list[str]:
        if device.type not in self.devices:
            return [f"runs on {'/'.join(sorted(self.devices))} tensors, not {device.type}"]
        return []

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        """Every reason this backend cannot run ``inputs`` (empty list: it can)."""
        if inputs.op not in self.ops:
            return [f"does not implement {inputs.op}"]
        reasons = self.availability_reasons()
        reasons += self.device_reasons(inputs.device)
        if inputs.dtype not in self.dtypes:
            reasons.append(f"does not support dtype {inputs.dtype}")
        missing = [f for f in inputs.features if f not in self.features]
        for f in sorted(missing, key=str):
            reasons.append(f"does not support {f}")
        if not reasons:
            reasons += self.extra_reasons(inputs)
        return reasons

    def extra_reasons(self, inputs: OpInputs) -> list[str]:
        """Hook for limits the class data cannot express (sizes, strides...)."""
        return []

    # ------------------------------------------------------------------ ops
    def selective_scan(self, inputs):  # -> tuple[Tensor, Tensor | None]
        raise NotImplementedError

    def cross_scan(self, inputs):
        raise NotImplementedError

    def cross_merge(self, inputs):
        raise NotImplementedError

    def cross_selective_scan(self, inputs):  # CrossScanInputs -> Tensor (scanlib/cross.py)
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<scanlib backend {self.name!r}>"


# ---------------------------------------------------------------------- the registry
@dataclass
class _Entry:
    name: str
    target: str | type[Backend] | Backend  # "module:attr" for lazy loading
    instance: Backend | None = None
    load_error: BaseException | None = None


_lock = threading.Lock()
_entries: dict[str, _Entry] = {}
_entry_points_loaded = False
#: every built-in name is in _entries (unregistering one clears it: the next use re-adds it)
_builtins_present = False
#: _sorted_entries() while no backend is (un)registered: selection runs on every op call
_order: list[_Entry] | None = None

# the built-in backends, imported only when first used
_BUILTIN = {
    "torch": "scanlib_backends.torch:TorchBackend",
    "reference": "scanlib_backends.torch:ReferenceBackend",
    "numba": "scanlib_backends.numba:NumbaBackend",
    "triton": "scanlib_backends.triton:TritonBackend",
    "cupy": "scanlib_backends.cupy:CupyBackend",
    "cuda": "scanlib_backends.cuda:CudaBackend",
}


def register_backend(
    backend: str | type[Backend] | Backend, name: str | None = None, *, replace: bool = False
) -> None:
    """Register a backend: an instance, a class, or a lazy ``"module:attr"`` path (then give ``name``)."""
    if isinstance(backend, str):
        if name is None:
            raise ValueError("register_backend('module:attr') needs name=")
        key = name
    else:
        key = name or backend.name
        if not key:
            raise ValueError("a backend needs a non-empty name")
    global _order
    with _lock:
        if key in _entries and not replace:
            raise ValueError(f"a backend named {key!r} is already registered (pass replace=True)")
        _entries[key] = _Entry(key, backend)
        _order = None


def unregister_backend(name: str) -> None:
    global _order, _builtins_present
    with _lock:
        _entries.pop(name, None)
        _order = None
        _builtins_present = False


def _ensure_builtin() -> None:
    global _entry_points_loaded, _builtins_present, _order
    if _builtins_present and _entry_points_loaded:  # the common case, on every op call
        return
    with _lock:
        for k, v in _BUILTIN.items():
            if k not in _entries:
                _entries[k] = _Entry(k, v)
                _order = None
        _builtins_present = True
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # pragma: no cover - broken metadata must not break scanlib
        eps = []
    for ep in eps:
        with _lock:
            if ep.name not in _entries:
                _entries[ep.name] = _Entry(ep.name, ep.value)
                _order = None


def _load(entry: _Entry) -> Backend | None:
    if entry.instance is not None or entry.load_error is not None:
        return entry.instance
    target = entry.target
    try:
        if isinstance(target, str):
            mod, _, attr = target.partition(":")
            target = getattr(importlib.import_module(mod), attr)
        inst = target() if isinstance(target, type) else target
        if not isinstance(inst, Backend):
            raise TypeError(f"{entry.target!r} is not a scanlib Backend")
        entry.instance = inst
    except Exception as e:  # a broken backend declines with the reason instead of breaking scanlib
        entry.load_error = e
    return entry.instance


def registered_backends() -> list[str]:
    """Names of every registered backend (loaded or not), in priority order where known."""
    _ensure_builtin()
    return [e.name for e in _sorted_entries()]


def _sorted_entries() -> list[_Entry]:
    """Every entry, loaded (or failed), highest priority first."""
    global _order
    order = _order
    if order is None:
        entries = list(_entries.values())
        for e in entries:
            _load(e)
        order = sorted(entries, key=lambda e: -(e.instance.priority if e.instance else -1000))
        _order = order
    return order


def get_backend(name: str) -> Backend:
    """The backend object registered under ``name`` (raises with the known names)."""
    _ensure_builtin()
    entry = _entries.get(name)
    if entry is None:
        raise UnknownBackendError(
            f"unknown scanlib backend {name!r}; known backends: {', '.join(registered_backends())}"
        )
    inst = _load(entry)
    if inst is None:
        raise MissingDependencyError(f"backend {name!r} failed to load: {entry.load_error}")
    return inst


def _entry_reasons(entry: _Entry, inputs: OpInputs | None) -> list[str]:
    inst = _load(entry)
    if inst is None:
        return [f"failed to load: {type(entry.load_error).__name__}: {entry.load_error}"]
    if inputs is None:
        return inst.availability_reasons()
    return inst.not_supported_reasons(inputs)


def available_backends() -> list[str]:
    """Backends that can run on this machine (their packages import; devices are not probed)."""
    _ensure_builtin()
    return [e.name for e in _sorted_entries() if not _entry_reasons(e, None)]


# ---------------------------------------------------------------------- selection state
_context: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "scanlib_backend", default=None
)
_global: tuple[str, ...] | None = None


def _normalize(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if spec is None:
        return None
    names = tuple(s.strip() for s in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    names = tuple(n for n in names if n)
    if not names or names == ("auto",):
        return None
    _ensure_builtin()
    for n in names:
        if n not in _entries:
            raise UnknownBackendError(
                f"unknown scanlib backend {n!r}; known backends: {', '.join(registered_backends())}"
            )
    return names


def set_backend(spec: str | Sequence[str] | None) -> None:
    """Choose the backend(s) process-wide. ``None`` or ``"auto"`` restores automatic selection."""
    global _global
    _global = _normalize(spec)


@contextlib.contextmanager
def use_backend(spec: str | Sequence[str] | None) -> Iterator[None]:
    """Within the block, use this backend (or the first of this ordered list that can run)."""
    token = _context.set(_normalize(spec) if spec is not None else None)
    try:
        yield
    finally:
        _context.reset(token)


def current_selection(
    backend: str | Sequence[str] | None = None,
) -> tuple[tuple[str, ...] | None, str]:
    """The names in force and where they come from (per-call, context, global, env, auto)."""
    if backend is not None:
        return _normalize(backend), "backend= argument"
    ctx = _context.get()
    if ctx is not None:
        return ctx, "scanlib.use_backend"
    if _global is not None:
        return _global, "scanlib.set_backend"
    env = os.environ.get(ENV_VAR)
    if env:
        return _normalize(env), f"environment variable {ENV_VAR}"
    return None, "automatic"


def select(inputs: OpInputs, backend: str | Sequence[str] | None = None) -> Backend:
    """The backend that runs ``inputs`` under the current selection rules."""
    _ensure_builtin()
    names, source = current_selection(backend)
    if names is not None:
        # a named backend that failed to load stays a candidate, so its load error is reported
        implementing = [
            n for n in names if _load(_entries[n]) is None or inputs.op in _entries[n].instance.ops
        ]
        if implementing:
            reasons: dict[str, list[str]] = {}
            for n in implementing:
                r = _entry_reasons(_entries[n], inputs)
                if not r:
                    return _entries[n].instance  # type: ignore[return-value]
                reasons[n] = r
            raise BackendUnavailableError(_format(inputs, reasons, f"selected by {source}"))
    reasons = {}
    for e in _sorted_entries():
        r = _entry_reasons(e, inputs)
        if not r:
            return e.instance  # type: ignore[return-value]
        reasons[e.name] = r
    raise BackendUnavailableError(_format(inputs, reasons, "automatic selection"))


def explain(inputs: OpInputs, backend: str | Sequence[str] | None = None) -> dict[str, list[str]]:
    """Each registered backend's reasons for declining ``inputs`` (empty list: it can run them)."""
    _ensure_builtin()
    return {e.name: _entry_reasons(e, inputs) for e in _sorted_entries()}


def _format(inputs: OpInputs, reasons: dict[str, list[str]], how: str) -> str:
    desc = inputs.describe() if hasattr(inputs, "describe") else inputs.op
    lines = [f"no scanlib backend can run {inputs.op} ({how}) for {desc}:"]
    for n, rs in reasons.items():
        lines.append(f"  {n}: " + "; ".join(rs))
    return "\n".join(lines)
