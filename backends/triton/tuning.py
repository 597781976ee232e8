"""Choosing launch configurations: measured once per problem key on a GPU, fixed elsewhere.

``triton.autotune`` is not used: under the CPU interpreter benchmarking several configurations
fails, and the scan's backward allocates buffers whose shape depends on the configuration. Here a
launcher passes its candidates and a ``run(config)`` callable; on a CUDA device, for problems of at
least ``min_elements``, each candidate is timed with ``triton.testing.do_bench`` and the fastest is
kept for the key. Set ``SCANLIB_TRITON_AUTOTUNE=0`` to always use the first (default) candidate.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

C = TypeVar("C")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_cache: dict[Hashable, object] = {}
_lock = threading.Lock()


@dataclass
class Launch:
    """One kernel launch, ``kernel[grid](*args, **kwargs)``; ``aot_check`` compiles the same."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def enabled(device: torch.device, elements: int, min_elements: int) -> bool:
    """Whether to measure: a real GPU, a big enough problem, not switched off."""
    if INTERPRETED or device.type != "cuda":
        return False
    if os.environ.get("SCANLIB_TRITON_AUTOTUNE", "1") == "0":
        return False
    return elements >= min_elements


def pick(key: Hashable, candidates: Sequence[C], run: Callable[[C], None], measure: bool) -> C:
    """The configuration for ``key``: the first candidate unless ``measure``, else the fastest.

    ``run(config)`` must be idempotent (it is called repeatedly while timing).
    """
    got = _cache.get(key)
    if got is not None:
        return got  # type: ignore[return-value]
    best = candidates[0]
    if measure and len(candidates) > 1:
        from triton.testing import do_bench

        best_t = float("inf")
        for cfg in candidates:
            try:
                t = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20)
            except Exception as e:  # a configuration that fails to compile or launch is skipped
                log.debug("config %s failed: %s", cfg, e)
                continue
            if t < best_t:
                best, best_t = cfg, t
        log.debug("tuned %s -> %s (%.3f ms)", key, best, best_t)
    with _lock:
        _cache.setdefault(key, best)
    return _cache[key]  # type: ignore[return-value]


def clear() -> None:
    """Forget every measured choice."""
    with _lock:
        _cache.clear()
