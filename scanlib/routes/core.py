"""Routes and route sets: the orders in which a 2D map is read as 1D sequences.

A *route* is a named rule ``(H, W) -> positions``: the flat positions ``h * W + w`` of an
``H x W`` map in the order they are read. A full route reads every position once (a
permutation); a *sub-grid* route (``subset=True``) reads some positions once each. A *route
set* is a named, ordered tuple of K routes whose positions, together, cover the whole map.

Orders are computed once per (route, H, W) with numpy and cached; the torch index tables a
backend reads (:meth:`RouteSet.indices`, :meth:`RouteSet.inverse_indices`) are cached once
per (H, W, device). Those tables are the single source of truth for every backend.
"""

from __future__ import annotations

import itertools
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ..errors import ScanlibError

#: sizes on which ``register_route``/``register_route_set`` try a rule before accepting it
CHECK_SIZES: tuple[tuple[int, int], ...] = (
    (1, 1),
    (1, 5),
    (5, 1),
    (2, 3),
    (3, 2),
    (4, 4),
    (5, 7),
    (8, 6),
)

RouteFn = Callable[[int, int], Any]  # (H, W) -> 1-D ints: list, tuple, numpy array or tensor
RouteLike = Union["Route", str]


class RouteError(ScanlibError, ValueError):
    """A route or route set is ill-defined (a position missing, repeated or out of range...)."""


class UnknownRouteError(RouteError, KeyError):
    """A route or route-set name that nothing registered carries."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


def _hw(p: int, W: int) -> str:
    return f"(h={p // W}, w={p % W})"


def _as_positions(raw: Any, what: str, H: int, W: int) -> np.ndarray:
    """Any 1-D integer sequence -> int64 numpy array (a copy)."""
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    try:
        arr = np.asarray(raw)
    except Exception as e:  # ragged lists and the like
        raise RouteError(f"{what} at H={H}, W={W}: could not read the positions: {e}") from e
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise RouteError(
            f"{what} at H={H}, W={W}: must give a 1-D sequence of flat positions h*W + w, got shape {arr.shape}"
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise RouteError(
            f"{what} at H={H}, W={W}: positions must be integers, got dtype {arr.dtype}"
        )
    return arr.astype(np.int64, copy=True)


def check_positions(
    positions: np.ndarray, H: int, W: int, *, subset: bool, what: str = "route"
) -> None:
    """Raise :class:`RouteError` naming the first out-of-range, repeated or (full routes) missing position."""
    n = H * W
    bad = positions[(positions < 0) | (positions >= n)]
    if bad.size:
        p = int(bad[0])
        step = int(np.flatnonzero(positions == p)[0])
        raise RouteError(
            f"{what} at H={H}, W={W}: position {p} (at step {step}) is outside the map; "
            f"positions are h*W + w in 0..{n - 1}"
        )
    counts = np.bincount(positions, minlength=n)
    repeated = np.flatnonzero(counts > 1)
    if repeated.size:
        p = int(repeated[0])
        steps = ", ".join(str(int(s)) for s in np.flatnonzero(positions == p))
        more = f" ({repeated.size} positions are repeated in all)" if repeated.size > 1 else ""
        raise RouteError(
            f"{what} at H={H}, W={W}: position {p} {_hw(p, W)} is repeated (read at steps {steps}){more}"
        )
    if not subset:
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            p = int(missing[0])
            more = f" ({missing.size} positions are missing in all)" if missing.size > 1 else ""
            raise RouteError(
                f"{what} at H={H}, W={W}: position {p} {_hw(p, W)} is missing{more}; a full route reads "
                f"each of the {n} positions once (pass subset=True for a sub-grid route)"
            )


class Route:
    """A named rule ``fn(H, W) -> positions`` (flat ``h * W + w``, in reading order).

    ``subset=False``: every position exactly once (a permutation of ``0..H*W-1``).
    ``subset=True``: a sub-grid route; each position it reads, once (it may read none).
    """

    def __init__(
        self, name: str, fn: RouteFn, *, subset: bool = False, description: str = ""
    ) -> None:
        if not isinstance(name, str) or not name:
            raise RouteError(f"a route needs a non-empty string name, got {name!r}")
        if not callable(fn):
            raise RouteError(
                f"route {name!r}: the rule must be callable as fn(H, W), got {type(fn).__name__}"
            )
        self.name = name
        self.fn = fn
        self.subset = bool(subset)
        self.description = description
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def order(self, H: int, W: int) -> np.ndarray:
        """Positions read at steps 0, 1, ... on an ``H x W`` map: int64 ``[L_route]`` (read-only, cached)."""
        key = (int(H), int(W))
        got = self._cache.get(key)
        if got is not None:
            return got
        H, W = key
        if H < 1 or W < 1:
            raise RouteError(f"route {self.name!r}: H and W must be >= 1, got H={H}, W={W}")
        what = f"{'sub-grid ' if self.subset else ''}route {self.name!r}"
        try:
            raw = self.fn(H, W)
        except RouteError:
            raise
        except Exception as e:
            raise RouteError(f"{what} failed at H={H}, W={W}: {type(e).__name__}: {e}") from e
        pos = _as_positions(raw, what, H, W)
        check_positions(pos, H, W, subset=self.subset, what=what)
        pos.setflags(write=False)
        with self._lock:
            self._cache.setdefault(key, pos)
        return self._cache[key]

    # ------------------------------------------------------------------ derived routes
    def reversed(self, name: str | None = None) -> Route:
        """The same positions read in the opposite order."""
        return Route(
            name or f"{self.name}_rev", lambda H, W: self.order(H, W)[::-1], subset=self.subset
        )

    def flipped(self, axis: str, name: str | None = None) -> Route:
        """The mirror image: ``axis="lr"`` (w -> W-1-w), ``"ud"`` (h -> H-1-h) or ``"both"``."""
        if axis not in ("lr", "ud", "both"):
            raise RouteError(f"flipped(axis=...): expected 'lr', 'ud' or 'both', got {axis!r}")

        def fn(H: int, W: int) -> np.ndarray:
            p = self.order(H, W)
            h, w = p // W, p % W
            if axis in ("ud", "both"):
                h = H - 1 - h
            if axis in ("lr", "both"):
                w = W - 1 - w
            return h * W + w

        return Route(name or f"{self.name}_{axis}", fn, subset=self.subset)

    def transposed(self, name: str | None = None) -> Route:
        """The rule applied to the transposed ``W x H`` map, mapped back: rows become columns."""

        def fn(H: int, W: int) -> np.ndarray:
            p = self.order(W, H)  # positions on the W x H map: h' * H + w', with h' = w, w' = h
            return (p % H) * W + p // H

        return Route(name or f"{self.name}_t", fn, subset=self.subset)

    def __repr__(self) -> str:
        kind = "sub-grid route" if self.subset else "route"
        return f"<scanlib {kind} {self.name!r}>"


@dataclass(frozen=True)
class GatherTables:
    """Index tables in the form the torch reference gathers with (one cached set per H, W, device).

    scan: ``[K, L]`` positions, padding pointing at the extra zero position ``H*W`` when
    ``scan_padded``; merge: ``[K, H*W]`` steps, "not read" pointing at the extra zero step ``L``
    when ``merge_padded``.
    """

    scan: torch.Tensor
    merge: torch.Tensor
    scan_padded: bool
    merge_padded: bool


_anon_counter = itertools.count(1)
# unregistered sets by key, for the custom ops; weak, so sets made on the fly do not pile up
_anon_sets: weakref.WeakValueDictionary[str, RouteSet] = weakref.WeakValueDictionary()


class RouteSet:
    """A named, ordered tuple of K routes; together they read every position of the map.

    ``indices(H, W, device)`` -> LongTensor ``[K, L]``: row k lists the positions route k reads
    (L = the longest route; shorter sub-grid routes are padded at the END with -1).
    """

    def __init__(
        self,
        name: str,
        routes: Iterable[RouteLike],
        *,
        description: str = "",
        _key: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise RouteError(f"a route set needs a non-empty string name, got {name!r}")
        if isinstance(routes, (str, Route)):
            routes = [routes]
        resolved = tuple(get_route(r) if isinstance(r, str) else r for r in routes)
        if not resolved:
            raise RouteError(f"route set {name!r}: needs at least one route")
        for r in resolved:
            if not isinstance(r, Route):
                raise RouteError(
                    f"route set {name!r}: expected Route objects or route names, got {type(r).__name__}"
                )
        self.name = name
        self.routes: tuple[Route, ...] = resolved
        self.description = description
        #: every route reads every position: merge(scan(x)) == K * x
        self.is_permutation = not any(r.subset for r in resolved)
        self._tables: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._device_tables: dict[
            tuple[int, int, str], tuple[torch.Tensor, torch.Tensor, GatherTables]
        ] = {}
        self._lock = threading.Lock()
        if _key is None:  # anonymous sets get a unique key so custom ops can find them by string
            _key = f"{name}#{next(_anon_counter)}"
            _anon_sets[_key] = self
        self.key = _key

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self.routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __getitem__(self, k: int) -> Route:
        return self.routes[k]

    @property
    def route_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.routes)

    def length(self, H: Any, W: Any) -> Any:
        """L, the length of the index table rows (H*W for permutation sets; works on SymInts)."""
        if self.is_permutation:
            return H * W
        return int(self._numpy_tables(int(H), int(W))[0].shape[1])

    # ------------------------------------------------------------------ tables
    def _numpy_tables(self, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
        key = (H, W)
        got = self._tables.get(key)
        if got is not None:
            return got
        orders = [r.order(H, W) for r in self.routes]
        n = H * W
        L = max(len(o) for o in orders)
        idx = np.full((len(orders), max(L, 1)), -1, dtype=np.int64)
        inv = np.full((len(orders), n), -1, dtype=np.int64)
        for k, o in enumerate(orders):
            idx[k, : len(o)] = o
            inv[k, o] = np.arange(len(o), dtype=np.int64)
        if not self.is_permutation:
            unread = np.flatnonzero((inv >= 0).sum(0) == 0)
            if unread.size:
                p = int(unread[0])
                more = f" ({unread.size} positions in all)" if unread.size > 1 else ""
                raise RouteError(
                    f"route set {self.name!r} at H={H}, W={W}: position {p} {_hw(p, W)} is read by no "
                    f"route{more}; the routes of a set must cover the whole map"
                )
        idx.setflags(write=False)
        inv.setflags(write=False)
        with self._lock:
            self._tables.setdefault(key, (idx, inv))
        return self._tables[key]

    def _device(self, H: int, W: int, device: torch.device | str | None):
        H, W = int(H), int(W)
        dev = torch.device("cpu" if device is None else device)
        key = (H, W, str(dev))
        got = self._device_tables.get(key)
        if got is not None:
            return got
        idx, inv = self._numpy_tables(H, W)
        # cached tensors must stay ordinary tensors even when first built under inference_mode
        with torch.inference_mode(False), torch.no_grad():
            t_idx = torch.from_numpy(idx.copy()).to(dev)
            t_inv = torch.from_numpy(inv.copy()).to(dev)
            scan_padded = bool((idx < 0).any())
            merge_padded = bool((inv < 0).any())
            n, L = H * W, idx.shape[1]
            g_scan = (
                torch.where(t_idx < 0, torch.full_like(t_idx, n), t_idx) if scan_padded else t_idx
            )
            g_merge = (
                torch.where(t_inv < 0, torch.full_like(t_inv, L), t_inv) if merge_padded else t_inv
            )
        entry = (t_idx, t_inv, GatherTables(g_scan, g_merge, scan_padded, merge_padded))
        with self._lock:
            self._device_tables.setdefault(key, entry)
        return self._device_tables[key]

    def indices(self, H: int, W: int, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor ``[K, L]``: entry (k, l) = flat position ``h*W + w`` route k reads at step l;
        -1 pads the end of routes shorter than L. Cached per (H, W, device): do not modify it."""
        return self._device(H, W, device)[0]

    def inverse_indices(
        self, H: int, W: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """LongTensor ``[K, H*W]``: entry (k, p) = the step at which route k reads position p, or -1
        if it never does. Cached per (H, W, device): do not modify it."""
        return self._device(H, W, device)[1]

    def gather_tables(
        self, H: int, W: int, device: torch.device | str | None = None
    ) -> GatherTables:
        """The tables of :meth:`indices`/:meth:`inverse_indices` with padding pointing at an extra zero slot."""
        return self._device(H, W, device)[2]

    def validate(self, sizes: Iterable[tuple[int, int]] = CHECK_SIZES) -> None:
        """Build the tables for each (H, W) in ``sizes``: raises :class:`RouteError` on a bad route."""
        for H, W in sizes:
            self._numpy_tables(H, W)

    def __repr__(self) -> str:
        return f"<scanlib RouteSet {self.name!r} K={len(self)}: {', '.join(self.route_names)}>"


# ---------------------------------------------------------------------- registries
_lock = threading.RLock()
_routes: dict[str, Route] = {}
_sets: dict[str, RouteSet] = {}


@dataclass
class _Family:
    prefix: str
    factory: Callable[[int], RouteSet]
    description: str
    example: int
    made: dict[int, RouteSet]


_families: dict[str, _Family] = {}


def register_route(
    name: str,
    fn: RouteFn | Route,
    *,
    subset: bool = False,
    description: str = "",
    replace: bool = False,
    check_sizes: Iterable[tuple[int, int]] = CHECK_SIZES,
) -> Route:
    """Register the rule ``fn(H, W) -> positions`` (or a ready :class:`Route`) under ``name``.

    The rule is tried on ``check_sizes`` first; a missing, repeated or out-of-range position
    raises :class:`RouteError` naming it. Pass ``check_sizes=()`` for rules defined only on
    some sizes (they are still checked on each size they are used with).
    """
    if isinstance(fn, Route):
        route = (
            fn
            if fn.name == name
            else Route(name, fn.fn, subset=fn.subset, description=fn.description)
        )
    else:
        route = Route(name, fn, subset=subset, description=description)
    for H, W in check_sizes:
        route.order(H, W)
    with _lock:
        if name in _routes and not replace:
            raise RouteError(f"a route named {name!r} is already registered (pass replace=True)")
        _routes[name] = route
    return route


def get_route(name: str) -> Route:
    """The route registered under ``name``."""
    route = _routes.get(name)
    if route is None:
        raise UnknownRouteError(
            f"unknown route {name!r}; known routes: {', '.join(sorted(_routes))}"
        )
    return route


def list_routes() -> list[str]:
    """Names of every registered route, sorted."""
    return sorted(_routes)


def register_route_set(
    name: str,
    routes: RouteSet | Sequence[RouteLike],
    *,
    description: str = "",
    replace: bool = False,
    check_sizes: Iterable[tuple[int, int]] = CHECK_SIZES,
) -> RouteSet:
    """Register an ordered route set under ``name`` (routes: Route objects or registered route
    names). It is checked on ``check_sizes``: the routes together must cover every position."""
    if isinstance(routes, RouteSet):
        description = description or routes.description
        routes = routes.routes
    if _family_match(name) is not None:
        raise RouteError(
            f"route-set name {name!r} is taken by the family {_family_match(name)[0].prefix}<w>"
        )
    rs = RouteSet(name, routes, description=description, _key=name)
    rs.validate(check_sizes)
    with _lock:
        if name in _sets and not replace:
            raise RouteError(
                f"a route set named {name!r} is already registered (pass replace=True)"
            )
        _sets[name] = rs
    return rs


def register_route_set_family(
    prefix: str,
    factory: Callable[[int], RouteSet | Sequence[RouteLike]],
    *,
    description: str = "",
    example: int = 2,
    replace: bool = False,
) -> None:
    """Register a parameterized family: ``get_route_set(f"{prefix}{w}")`` returns ``factory(w)``
    (made once per w) for every integer w >= 1, e.g. ``local7`` from the ``local`` family."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*[A-Za-z_]|[A-Za-z_]", prefix):
        raise RouteError(
            f"a family prefix must be an identifier not ending in a digit, got {prefix!r}"
        )
    with _lock:
        if prefix in _families and not replace:
            raise RouteError(
                f"a route-set family {prefix!r} is already registered (pass replace=True)"
            )
        _families[prefix] = _Family(prefix, factory, description, example, {})  # type: ignore[arg-type]
    get_route_set(f"{prefix}{example}").validate()


def _family_match(name: str) -> tuple[_Family, int] | None:
    m = re.fullmatch(r"(.*?)(\d+)", name)
    if m is None or m.group(1) not in _families:
        return None
    return _families[m.group(1)], int(m.group(2))


def get_route_set(name: str | RouteSet) -> RouteSet:
    """The route set registered under ``name`` (a RouteSet is returned as is).

    Names of a family (``local5``) are made on first use; unknown names raise
    :class:`UnknownRouteError` listing the known ones.
    """
    if isinstance(name, RouteSet):
        return name
    if not isinstance(name, str):
        raise RouteError(
            f"routes: expected a RouteSet or a route-set name, got {type(name).__name__}"
        )
    rs = _sets.get(name)
    if rs is not None:
        return rs
    fam = _family_match(name)
    if fam is not None:
        family, w = fam
        rs = family.made.get(w)
        if rs is None:
            if w < 1:
                raise RouteError(f"route set {name!r}: the {family.prefix}<w> family needs w >= 1")
            made = family.factory(w)
            routes = made.routes if isinstance(made, RouteSet) else made
            desc = made.description if isinstance(made, RouteSet) else family.description
            rs = RouteSet(name, routes, description=desc, _key=name)
            with _lock:
                rs = family.made.setdefault(w, rs)
        return rs
    anon = _anon_sets.get(name)
    if anon is not None:
        return anon
    raise UnknownRouteError(
        f"unknown route set {name!r}; known route sets: {', '.join(list_route_sets())}"
    )


def list_route_sets() -> list[str]:
    """Names of the registered route sets, the family members made so far (``local2``), and each
    family as ``prefix<w>`` (any w >= 1)."""
    made = [rs.name for f in _families.values() for rs in f.made.values()]
    return sorted({*_sets, *made, *(f"{p}<w>" for p in _families)})


def route_set_description(name: str) -> str:
    """One line saying what a registered set or family is."""
    if name.endswith("<w>") and name[:-3] in _families:
        return _families[name[:-3]].description
    return get_route_set(name).description
