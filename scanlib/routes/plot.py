"""Pictures of route sets: ASCII step grids (no dependency) and PNG paths (matplotlib, optional)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import missing_dependency
from .core import RouteSet, get_route_set


def step_grid(order: np.ndarray, H: int, W: int) -> np.ndarray:
    """``[H, W]`` int array: the step at which ``order`` reads each cell, -1 where it never does."""
    grid = np.full(H * W, -1, dtype=np.int64)
    grid[np.asarray(order)] = np.arange(len(order))
    return grid.reshape(H, W)


def ascii_route(order: np.ndarray, H: int, W: int) -> str:
    """The step numbers of one route laid out on the H x W grid ('.' = not read)."""
    grid = step_grid(order, H, W)
    width = len(str(max(H * W - 1, 0)))
    return "\n".join(
        " ".join(".".rjust(width) if v < 0 else str(v).rjust(width) for v in row) for row in grid
    )


def ascii_route_set(routes: RouteSet | str, H: int, W: int) -> str:
    """Every route of a set as an ASCII step grid, side by side under its name."""
    rs = get_route_set(routes)
    blocks = []
    for r in rs.routes:
        lines = ascii_route(r.order(H, W), H, W).split("\n")
        width = max(len(lines[0]), len(r.name))
        blocks.append([r.name.ljust(width)] + [ln.ljust(width) for ln in lines])
    out = []
    per_line = max(1, 72 // (len(blocks[0][0]) + 4))
    for start in range(0, len(blocks), per_line):
        chunk = blocks[start : start + per_line]
        out.extend("    ".join(b[i] for b in chunk).rstrip() for i in range(H + 1))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def draw_route_set(
    routes: RouteSet | str,
    H: int,
    W: int,
    path: str | Path,
    *,
    columns: int | None = None,
    numbers: bool | None = None,
    dpi: int = 110,
) -> Path:
    """Draw each route of a set as a path over the H x W grid and save a PNG (needs matplotlib).

    The path is coloured from dark (first step) to light (last step); a circle marks the start
    and a square the end. ``numbers`` writes each cell's step (default: for maps of <= 100 cells).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError as e:
        raise missing_dependency("matplotlib", "plot", "drawing routes") from e

    rs = get_route_set(routes)
    K = len(rs)
    cols = columns or min(K, 4)
    rows = math.ceil(K / cols)
    if numbers is None:
        numbers = H * W <= 100
    cell = min(0.42, 3.2 / max(H, W))
    fig = Figure(figsize=(cols * (W * cell + 0.6), rows * (H * cell + 0.8)), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.suptitle(f"route set {rs.name!r}  ({H} x {W}, K={K})", fontsize=11)
    for k, route in enumerate(rs.routes):
        ax = fig.add_subplot(rows, cols, k + 1)
        order = route.order(H, W)
        hh, ww = order // W, order % W
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)  # row 0 at the top, as the map is stored
        ax.set_aspect("equal")
        ax.set_xticks(np.arange(-0.5, W, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, H, 1), minor=True)
        ax.grid(which="minor", color="0.85", linewidth=0.6)
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        ax.set_title(f"{k}: {route.name}", fontsize=9)
        unread = step_grid(order, H, W) < 0
        if unread.any():
            uh, uw = np.nonzero(unread)
            ax.scatter(uw, uh, s=6, color="0.8", marker="x", zorder=1)
        if len(order) > 1:
            pts = np.stack([ww, hh], 1).astype(float)
            segs = np.stack([pts[:-1], pts[1:]], 1)
            lc = LineCollection(segs, cmap="viridis", linewidth=2.0, zorder=2)
            lc.set_array(np.arange(len(segs)))
            ax.add_collection(lc)
        if len(order):
            ax.scatter(
                [ww[0]], [hh[0]], s=40, color="tab:green", zorder=3, edgecolors="k", linewidths=0.5
            )
            ax.scatter(
                [ww[-1]],
                [hh[-1]],
                s=40,
                color="tab:red",
                marker="s",
                zorder=3,
                edgecolors="k",
                linewidths=0.5,
            )
        if numbers:
            for step, (h, w) in enumerate(zip(hh, ww)):
                ax.text(
                    w + 0.28,
                    h - 0.22,
                    str(step),
                    fontsize=5.5,
                    ha="center",
                    va="center",
                    color="0.25",
                    zorder=4,
                )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
