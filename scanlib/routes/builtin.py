"""The built-in routes and route sets (each one is drawn and defined in docs/routes.md).

Every rule maps (H, W) to flat positions ``h * W + w`` in reading order, computed with numpy on
the position grid ``G[h, w] = h * W + w``.
"""

from __future__ import annotations

import numpy as np

from .core import (
    Route,
    RouteSet,
    get_route_set,
    register_route,
    register_route_set,
    register_route_set_family,
)


def _grid(H: int, W: int) -> np.ndarray:
    return np.arange(H * W, dtype=np.int64).reshape(H, W)


def _snake_rows(g: np.ndarray) -> np.ndarray:
    """Read the rows of ``g`` alternately left-to-right and right-to-left (boustrophedon)."""
    g = g.copy()
    g[1::2] = g[1::2, ::-1]
    return g.ravel()


# ---------------------------------------------------------------------- VMamba's four routes
def row_major(H: int, W: int) -> np.ndarray:
    return _grid(H, W).ravel()


def col_major(H: int, W: int) -> np.ndarray:
    return _grid(H, W).T.ravel()


def rotated(k: int):
    """The map rotated k * 90 degrees counter-clockwise (as ``torch.rot90(x, k, (-2, -1))``), read row-major."""

    def fn(H: int, W: int) -> np.ndarray:
        return np.rot90(_grid(H, W), k).ravel()

    return fn


# ---------------------------------------------------------------------- boustrophedons
def zigzag_rule(corner: str, axis: str):
    """Boustrophedon from ``corner`` (tl, tr, bl, br) sweeping along ``axis`` (row, col) first."""

    def fn(H: int, W: int) -> np.ndarray:
        g = _grid(H, W)
        if corner in ("tr", "br"):
            g = g[:, ::-1]
        if corner in ("bl", "br"):
            g = g[::-1]
        if axis == "col":
            g = g.T
        return _snake_rows(g)

    return fn


# ---------------------------------------------------------------------- LocalMamba windows
def window_rule(w: int, axis: str):
    """w x w windows (the last ones cut short when w does not divide H or W), visited row-major
    and read row-major inside (``axis="row"``), or both column-major (``axis="col"``)."""

    def fn(H: int, W: int) -> np.ndarray:
        g = _grid(H, W)
        hh, ww = np.divmod(g, W)
        if axis == "row":
            keys = (ww % w, hh % w, ww // w, hh // w)  # np.lexsort: the LAST key is the primary one
        else:
            keys = (hh % w, ww % w, hh // w, ww // w)
        return g.ravel()[np.lexsort([k.ravel() for k in keys])]

    return fn


def local_windows(w: int) -> RouteSet:
    """The ``local{w}`` set: w x w windows row-major, column-major, and both reversed."""
    if int(w) != w or w < 1:
        raise ValueError(f"local_windows: w must be an integer >= 1, got {w!r}")
    w = int(w)
    row = Route(f"local{w}_row", window_rule(w, "row"))
    col = Route(f"local{w}_col", window_rule(w, "col"))
    return RouteSet(
        f"local{w}",
        (row, col, row.reversed(), col.reversed()),
        description=f"LocalMamba: {w}x{w} windows, row-major / column-major and reversed",
    )


# ---------------------------------------------------------------------- EfficientVMamba
def subgrid_rule(dh: int, dw: int, axis: str):
    """The stride-2 sub-grid of positions with h % 2 == dh and w % 2 == dw, read row- or column-major."""

    def fn(H: int, W: int) -> np.ndarray:
        sub = _grid(H, W)[dh::2, dw::2]
        return (sub if axis == "row" else sub.T).ravel()

    return fn


# ---------------------------------------------------------------------- generalized Hilbert
def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def gilbert(H: int, W: int, *, major: str = "long") -> np.ndarray:
    """A generalized Hilbert curve ("gilbert", after J. Cerveny) over any H x W map.

    Starts at (0, 0) and ends at the other end of its major axis: the longer axis
    (``major="long"``; along w when W >= H, ending at (0, W-1)) or the shorter one
    (``major="short"``). Each step moves to a neighbouring cell, except for at most one diagonal
    step when the map's sizes force it (some odd sizes).
    """
    out: list[int] = []

    # (x, y): current cell (x = w, y = h); a = (ax, ay): the major direction and its length;
    # b = (bx, by): the orthogonal direction and its length. Splits the rectangle a x b in two
    # (long and thin) or three (the Hilbert "U") sub-rectangles, each with a curve joined to the next.
    def walk(x: int, y: int, ax: int, ay: int, bx: int, by: int) -> None:
        wlen, hlen = abs(ax + ay), abs(bx + by)
        dax, day, dbx, dby = _sign(ax), _sign(ay), _sign(bx), _sign(by)
        if hlen == 1 or wlen == 1:  # a straight line along whichever side is longer than 1
            sx, sy, n = (dax, day, wlen) if hlen == 1 else (dbx, dby, hlen)
            for _ in range(n):
                out.append(y * W + x)
                x, y = x + sx, y + sy
            return
        ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
        if 2 * wlen > 3 * hlen:  # long and thin: two halves along a
            # an even first half keeps the two halves' curves joined by a unit step
            if abs(ax2 + ay2) % 2 and wlen > 2:
                ax2, ay2 = ax2 + dax, ay2 + day
            walk(x, y, ax2, ay2, bx, by)
            walk(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
            return
        if abs(bx2 + by2) % 2 and hlen > 2:
            bx2, by2 = bx2 + dbx, by2 + dby
        walk(x, y, bx2, by2, ax2, ay2)  # up the left side (a and b swap roles)
        walk(x + bx2, y + by2, ax, ay, bx - bx2, by - by2)  # across the top
        walk(  # down the right side, back towards the a axis
            x + (ax - dax) + (bx2 - dbx),
            y + (ay - day) + (by2 - dby),
            -bx2,
            -by2,
            -(ax - ax2),
            -(ay - ay2),
        )

    along_w = (W >= H) == (major == "long")
    if along_w:
        walk(0, 0, W, 0, 0, H)
    else:
        walk(0, 0, 0, H, W, 0)
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------- registration
def _register() -> None:
    R = register_route
    row = R("row", row_major, description="row-major: rows top to bottom, each left to right")
    col = R("col", col_major, description="column-major: columns left to right, each top to bottom")
    row_rev = R("row_rev", row.reversed(), description="row-major reversed")
    col_rev = R("col_rev", col.reversed(), description="column-major reversed")
    register_route_set(
        "cross2d",
        (row, col, row_rev, col_rev),
        description="VMamba: row, column, and both reversed",
    )
    register_route_set("unidi", (row,) * 4, description="VMamba ablation: row-major four times")
    register_route_set(
        "bidi",
        (row, row, row_rev, row_rev),
        description="VMamba ablation: row, row, reversed, reversed",
    )

    rots = [row] + [
        R(f"rot{90 * k}", rotated(k), description=f"rotated {90 * k} deg CCW, row-major")
        for k in (1, 2, 3)
    ]
    register_route_set("rot90", rots, description="the four 90-degree rotations, read row-major")

    snake_row = R(
        "snake_row", zigzag_rule("tl", "row"), description="boustrophedon by rows from the top-left"
    )
    snake_col = R(
        "snake_col",
        zigzag_rule("tl", "col"),
        description="boustrophedon by columns from the top-left",
    )
    register_route_set(
        "snake",
        (
            snake_row,
            R("snake_row_rev", snake_row.reversed()),
            snake_col,
            R("snake_col_rev", snake_col.reversed()),
        ),
        description="PlainMamba: row and column boustrophedons from the top-left, and both reversed",
    )

    zz = [
        R(
            f"zigzag_{c}_{a}",
            zigzag_rule(c, a),
            description=f"boustrophedon from the {c} corner, along {a}s",
        )
        for c in ("tl", "tr", "bl", "br")
        for a in ("row", "col")
    ]
    register_route_set(
        "zigzag", zz, description="ZigMa: boustrophedons from each corner, along rows and columns"
    )

    atrous = [
        R(
            f"atrous_{dh}{dw}_{a}",
            subgrid_rule(dh, dw, a),
            subset=True,
            description=f"sub-grid h%2={dh}, w%2={dw}, {a}-major",
        )
        for dh, dw, a in ((0, 0, "row"), (1, 0, "col"), (0, 1, "row"), (1, 1, "col"))
    ]
    register_route_set("atrous", atrous, description="EfficientVMamba: four stride-2 sub-grids")

    h_long = R(
        "hilbert",
        lambda H, W: gilbert(H, W),
        description="generalized Hilbert curve along the longer axis",
    )
    h_short = R(
        "hilbert_s",
        lambda H, W: gilbert(H, W, major="short"),
        description="generalized Hilbert curve along the shorter axis",
    )
    hil = []
    for base in (h_long, h_short):
        hil.append(base)
        for axis, suffix in (("lr", "lr"), ("ud", "ud"), ("both", "rot180")):
            hil.append(R(f"{base.name}_{suffix}", base.flipped(axis)))
    register_route_set(
        "hilbert",
        hil,
        description="generalized Hilbert curves (both first axes) and their mirror images",
    )

    register_route_set_family(
        "local",
        local_windows,
        description="LocalMamba: w x w windows, row-major / column-major and reversed",
    )
    for w in (2, 4, 7):  # LocalMamba's window sizes, listed by list_route_sets()
        get_route_set(f"local{w}")


_register()
