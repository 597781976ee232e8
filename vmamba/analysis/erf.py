"""Effective receptive field (ERF): how strongly each input pixel moves the central output.

For a feature map ``f = F(x)`` of a chosen stage (``[B, C, h, w]``), the ERF of an image is the
input gradient of the central position's features summed over channels,
``g = d(sum_c f[:, c, h // 2, w // 2]) / dx``, rectified (``max(g, 0)``), summed over the input
channels and averaged over the images (the measure of Luo et al. 2016, as used by RepLKNet and
VMamba). It is a ``[H, W]`` map; a model with a global ERF has mass far from the centre.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("vmamba.analysis.erf")

__all__ = ["ERFResult", "compute_erf", "erf_area_ratios", "plot_erfs", "run_erf"]

#: fractions of the total ERF mass for which :func:`erf_area_ratios` reports the area
DEFAULT_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def compute_erf(
    features: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ERF ``[H, W]`` (float64, on the CPU) of ``features`` over ``images [N, C, H, W]``.

    ``features`` maps ``[B, C, H, W]`` to a channel-first map ``[B, C', h, w]``; images must
    not interact within a batch (eval mode), so the batch size only trades memory for speed.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected [N, C, H, W] with N >= 1, got {tuple(images.shape)}")
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    for start in range(0, images.shape[0], max(1, batch_size)):
        x = images[start : start + batch_size].to(device).requires_grad_(True)
        f = features(x)
        centre = f[:, :, f.shape[2] // 2, f.shape[3] // 2].sum()
        (grad,) = torch.autograd.grad(centre, x)
        total += grad.detach().clamp(min=0).sum(dim=(0, 1)).double().cpu()
    return total / images.shape[0]


def erf_area_ratios(
    erf: torch.Tensor | np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, float]:
    """For each threshold t, the area (as a fraction of the map) of the smallest centred square
    (clipped at the borders) holding at least t of the ERF's total mass. Near 0: a local ERF;
    a large value at t = 0.99: mass spread over the whole image."""
    e = np.asarray(erf, dtype=np.float64)
    H, W = e.shape
    total = e.sum()
    ch, cw = H // 2, W // 2
    out: dict[str, float] = {}
    if total <= 0:
        return {f"{t:g}": float("nan") for t in thresholds}
    # mass inside the square of half-width r, for every r (cumulative 2D sums)
    cs = np.zeros((H + 1, W + 1))
    cs[1:, 1:] = e.cumsum(0).cumsum(1)
    radii = np.arange(max(H, W))
    t0, b0 = np.maximum(ch - radii, 0), np.minimum(ch + radii + 1, H)
    l0, r0 = np.maximum(cw - radii, 0), np.minimum(cw + radii + 1, W)
    mass = cs[b0, r0] - cs[t0, r0] - cs[b0, l0] + cs[t0, l0]
    area = (b0 - t0) * (r0 - l0)
    for t in thresholds:
        i = int(np.argmax(mass >= t * total - 1e-12 * total))
        out[f"{t:g}"] = float(area[i]) / (H * W)
    return out


@dataclass
class ERFResult:
    label: str
    erf: np.ndarray  # [H, W]
    area_ratios: dict[str, float]
    stage: int
    num_images: int
    extra: dict[str, Any] = field(default_factory=dict)


def plot_erfs(
    results: Sequence[ERFResult], path: str | Path, *, decades: float = 3.0, title: str = ""
) -> None:
    """One heatmap per model, side by side: ERF / max on a log colour scale spanning ``decades``
    powers of ten (so both a compact and a global ERF are visible)."""
    from matplotlib.colors import LogNorm

    from .common import require_matplotlib

    plt = require_matplotlib()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.8, 3.9), squeeze=False)
    vmin = 10.0**-decades
    im = None
    for ax, r in zip(axes[0], results):
        e = r.erf / max(float(r.erf.max()), 1e-30)
        im = ax.imshow(np.clip(e, vmin, 1.0), cmap="RdYlGn", norm=LogNorm(vmin=vmin, vmax=1.0))
        a = r.area_ratios
        ax.set_title(r.label.replace(" (", "\n(", 1) + f", stage {r.stage}", fontsize=9)
        ax.set_xlabel(
            "area for 20/50/99% mass: "
            + "/".join(f"{100 * a.get(k, float('nan')):.1f}%" for k in ("0.2", "0.5", "0.99")),
            fontsize=7.5,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="ERF / max (log scale)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run_erf(
    models: Sequence[str],
    *,
    out: str | Path = "erf.png",
    images: str | None = None,
    img_size: int | None = None,
    num_images: int | None = None,
    crops_per_image: int = 1,
    stage: int = -1,
    batch_size: int = 1,
    model_args: dict[str, Any] | None = None,
    device: str = "cpu",
    seed: int = 0,
    use_ema: bool = False,
) -> list[ERFResult]:
    """Compute and draw the ERFs of ``models`` (specs, see :mod:`vmamba.analysis.common`).

    Writes ``out`` (PNG), ``<out stem>.json`` (area ratios and settings) and ``<out stem>.npz``
    (the raw maps). A training checkpoint brings its own image size and, for the digits demo,
    its own images, unless ``img_size`` / ``images`` say otherwise.
    """
    from .common import feature_extractor, load_images, load_model, resolve_device

    if not models:
        raise ValueError("run_erf: give at least one model")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    results: list[ERFResult] = []
    for spec in models:
        size0 = img_size or 224
        loaded = load_model(spec, model_args=model_args, img_size=size0, use_ema=use_ema)
        size = img_size or loaded.img_size or 224
        if size != size0 and loaded.kind == "timm":
            loaded = load_model(spec, model_args=model_args, img_size=size, use_ema=use_ema)
        source = (
            images
            if images is not None
            else (loaded.dataset if loaded.dataset == "digits" else None)
        )
        x, _, names = load_images(
            source,
            size,
            in_chans=loaded.in_chans,
            mean=loaded.mean,
            std=loaded.std,
            num_images=num_images
            if num_images is not None
            else (32 if source == "digits" else None),
            crops_per_image=crops_per_image,
            seed=seed,
        )
        loaded.model.to(dev)
        logger.info("ERF of %s at %dx%d over %d images", loaded.label, size, size, x.shape[0])
        erf = compute_erf(feature_extractor(loaded, stage), x, batch_size=batch_size, device=dev)
        e = erf.numpy()
        if loaded.kind == "vmamba":
            n_stages = len(loaded.model.layers)
        else:  # timm: stages of CNNs and Swin, blocks of ViTs
            n_stages = len(getattr(loaded.model, "feature_info", None) or []) or None
        shown_stage = stage % n_stages if n_stages else stage
        results.append(
            ERFResult(
                loaded.label,
                e,
                erf_area_ratios(e),
                shown_stage,
                int(x.shape[0]),
                {
                    "model": loaded.name,
                    "img_size": size,
                    "images": source or "sklearn",
                    "names": names,
                },
            )
        )
        loaded.model.cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_erfs(results, out, title="Effective receptive field (gradient of the central output)")
    summary = [
        {
            "label": r.label,
            "stage": r.stage,
            "num_images": r.num_images,
            "area_ratios": r.area_ratios,
            **r.extra,
        }
        for r in results
    ]
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    np.savez_compressed(
        out.with_suffix(".npz"), **{f"erf{i}": r.erf for i, r in enumerate(results)}
    )
    return results
