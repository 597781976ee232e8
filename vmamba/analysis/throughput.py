"""Throughput and resolution scaling: images/s, latency per image and peak memory of any models at
a list of resolutions and batch sizes, on CPU or GPU.

Timing: ``warmup`` untimed runs, then ``repeats`` timed runs (``time.perf_counter``, with
``torch.cuda.synchronize`` on GPU); the median is reported. GPU runs use bf16 autocast unless
told otherwise; CPU runs use float32.

Peak memory is the growth over what the model and its input already hold:

* GPU: ``torch.cuda.max_memory_allocated()`` minus the allocated memory before the first run
  (tensor memory, exact).
* CPU: torch has no allocator statistics for the CPU, and ``tracemalloc`` does not see torch's
  allocations, so the resident set size is used: ``VmHWM`` (peak RSS, reset through
  ``/proc/self/clear_refs``) minus ``VmRSS`` before the first run. Each (model, resolution,
  batch) is measured in a fresh process by default (``isolate``), since memory freed by an
  earlier configuration stays resident and would be reused unseen. This counts pages touched
  (activations, workspace, allocator slack), so it is approximate; on other systems than Linux
  it is not measured.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("vmamba.analysis.throughput")

__all__ = [
    "BASELINES",
    "BenchResult",
    "default_models",
    "measure",
    "plot_scaling",
    "run_throughput",
    "scaling_summary",
    "write_csv",
]

#: timm baselines: a hierarchical transformer, a CNN and a plain ViT (quadratic attention)
BASELINES = ("swin_tiny_patch4_window7_224", "convnext_tiny", "deit_small_patch16_224")
DEFAULT_RESOLUTIONS = (224, 384, 512, 768, 1024)

CSV_FIELDS = (
    "model",
    "label",
    "params_m",
    "device",
    "mode",
    "dtype",
    "resolution",
    "batch",
    "pixels",
    "threads",
    "warmup",
    "repeats",
    "median_s",
    "min_s",
    "ms_per_image",
    "images_per_s",
    "peak_mem_mib",
    "mem_method",
    "scan_backend",
    "error",
)


@dataclass
class BenchResult:
    model: str
    label: str
    device: str
    mode: str  # "forward" | "forward+backward"
    dtype: str
    resolution: int
    batch: int
    params_m: float = float("nan")
    threads: int = 0
    warmup: int = 0
    repeats: int = 0
    median_s: float = float("nan")
    min_s: float = float("nan")
    peak_mem_mib: float | None = None
    mem_method: str = ""
    scan_backend: str = ""
    error: str = ""
    times_s: list[float] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return self.resolution * self.resolution

    @property
    def ms_per_image(self) -> float:
        return 1e3 * self.median_s / self.batch

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s if self.median_s > 0 else float("nan")

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("times_s")
        d.update(pixels=self.pixels, ms_per_image=self.ms_per_image, images_per_s=self.images_per_s)
        return {k: d[k] for k in CSV_FIELDS}


def default_models() -> list[str]:
    """VMamba-T plus the timm baselines when timm is installed."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return ["vmamba_tiny"]
    return ["vmamba_tiny", *BASELINES]


# ------------------------------------------------------------------------------------------------
# memory probes


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# timing one configuration


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(
    model: nn.Module,
    batch: int,
    resolution: int,
    device: torch.device,
    backward: bool,
    amp_dtype: torch.dtype | None,
    in_chans: int,
):
    """One timed run of ``model`` on a fixed random input: forward under ``inference_mode``, or
    forward + backward (the model in train mode: dropout and drop-path count there)."""
    model.train(backward)
    x = torch.randn(batch, in_chans, resolution, resolution, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if backward:
                out = model(x)
                loss = (
                    sum(o.float().sum() for o in out)
                    if isinstance(out, (list, tuple))
                    else out.float().sum()
                )
            else:
                with torch.inference_mode():
                    out = model(x)
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=True)
        del out

    return step


def _prime(
    model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, in_chans: int
) -> None:
    """One-time costs (JIT compilation of a scan backend, oneDNN primitive caches) on a small
    input, so they land neither in the timings nor in the peak memory."""
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            model(torch.randn(1, in_chans, 64, 64, device=device))
    except (RuntimeError, ValueError, AssertionError):
        pass  # a model with a fixed input size: its warm-up runs do the job


def measure(
    model: nn.Module,
    resolution: int,
    batch: int,
    *,
    device: torch.device | str = "cpu",
    backward: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    amp_dtype: torch.dtype | None = None,
    in_chans: int = 3,
    isolated: bool = False,
    prime: bool = True,
) -> dict[str, Any]:
    """Time ``model`` on random ``[batch, in_chans, resolution, resolution]`` inputs.

    Returns ``times_s`` (the timed runs), ``median_s``, ``min_s`` and ``peak_mem_mib`` /
    ``mem_method`` (see the module docstring; None when it cannot be measured). ``prime`` runs
    the model once on a 64x64 input first, outside the measurements.
    """
    device = torch.device(device)
    model = model.to(device)
    step = _make_step(model, batch, resolution, device, backward, amp_dtype, in_chans)
    if prime:
        _prime(model, device, amp_dtype, in_chans)
    mem_method = ""
    base = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        mem_method = "cuda max_memory_allocated"
    elif _proc_status_kib("VmRSS") is not None and _reset_peak_rss():
        base = _proc_status_kib("VmRSS") or 0
        mem_method = "peak RSS growth" + ("" if isolated else " (in-process: may undercount)")
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = None
    if mem_method.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    elif mem_method:
        peak = max(0, (_proc_status_kib("VmHWM") or 0) - base) / 1024
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_mem_mib": peak,
        "mem_method": mem_method,
    }


def _limit_threads(n: int) -> None:
    """n CPU threads for torch and for the numba scan backend (whose thread pool is separate)."""
    torch.set_num_threads(n)
    os.environ["NUMBA_NUM_THREADS"] = str(n)  # read when numba is first imported
    numba = sys.modules.get("numba")
    if numba is not None:  # already running: shrink its pool
        try:
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        except (ValueError, AttributeError):
            pass


def _amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _new_result(spec: dict[str, Any], device: torch.device) -> BenchResult:
    amp_dtype = _amp(spec["amp"], device)
    return BenchResult(
        model=spec["model"],
        label=spec["model"],
        device=str(device),
        mode="forward+backward" if spec["backward"] else "forward",
        dtype=str(amp_dtype or torch.float32).replace("torch.", ""),
        resolution=int(spec["resolution"]),
        batch=int(spec["batch"]),
        threads=torch.get_num_threads(),
        warmup=int(spec["warmup"]),
        repeats=int(spec["repeats"]),
    )


def _load(spec: dict[str, Any], res: BenchResult, device: torch.device):
    """Load the model of ``spec`` and fill in ``res``'s label, scan backend and size."""
    from .common import load_model

    loaded = load_model(spec["model"], model_args=spec.get("model_args"), img_size=res.resolution)
    res.label = loaded.name
    if loaded.kind == "vmamba":
        res.scan_backend = _scan_backend(spec.get("model_args") or {}, device)
        res.label = f"{loaded.name} [{res.scan_backend.removeprefix('auto: ')}]"
    res.params_m = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    return loaded


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _run_one(spec: dict[str, Any]) -> BenchResult:
    """Build the model of ``spec`` and measure one configuration (in this process)."""
    from .common import resolve_device

    device = resolve_device(spec["device"])
    if spec.get("threads"):
        _limit_threads(int(spec["threads"]))
    res = _new_result(spec, device)
    torch.manual_seed(0)
    try:
        loaded = _load(spec, res, device)
        got = measure(
            loaded.model,
            res.resolution,
            res.batch,
            device=device,
            backward=bool(spec["backward"]),
            warmup=res.warmup,
            repeats=res.repeats,
            amp_dtype=_amp(spec["amp"], device),
            in_chans=loaded.in_chans,
            isolated=bool(spec.get("isolated")),
        )
    except (RuntimeError, ValueError, MemoryError) as e:  # OOM, unsupported size: record, go on
        res.error = _error(e)
        return res
    res.times_s = got["times_s"]
    res.median_s, res.min_s = got["median_s"], got["min_s"]
    res.peak_mem_mib, res.mem_method = got["peak_mem_mib"], got["mem_method"]
    return res


def _run_interleaved(specs: Sequence[dict[str, Any]], rounds: int) -> list[BenchResult]:
    """Every configuration of ``specs`` in this process: build and warm them all, then
    ``rounds`` rounds that time each configuration once, in an order rotated between rounds, so
    a change in a shared machine's load hits all of them alike and the i-th times of two
    configurations form a pair (:func:`paired_ratios`). Peak memory is not measured."""
    from .common import resolve_device

    if not specs:
        return []
    device = resolve_device(specs[0]["device"])  # one device and thread count for the sweep
    if specs[0].get("threads"):
        _limit_threads(int(specs[0]["threads"]))
    loaded: dict[tuple, Any] = {}
    entries: list[tuple[BenchResult, Any]] = []
    for spec in specs:
        res = _new_result(spec, device)
        res.repeats = rounds
        res.mem_method = "not measured (interleaved rounds)"
        key = (spec["model"], json.dumps(spec.get("model_args") or {}, sort_keys=True))
        key += (res.resolution,)
        torch.manual_seed(0)
        try:
            if key not in loaded:
                loaded[key] = (_load(spec, res, device), res)
            else:  # the same model at another batch size: same label, backend, size
                first = loaded[key][1]
                res.label, res.scan_backend = first.label, first.scan_backend
                res.params_m = first.params_m
            lm = loaded[key][0]
            model = lm.model.to(device)
            amp_dtype = _amp(spec["amp"], device)
            step = _make_step(
                model, res.batch, res.resolution, device, bool(spec["backward"]), amp_dtype,
                lm.in_chans,
            )  # fmt: skip
            _prime(model, device, amp_dtype, lm.in_chans)
            for _ in range(res.warmup):
                step()
            _sync(device)
        except (RuntimeError, ValueError, MemoryError) as e:
            res.error = _error(e)
            step = None
        entries.append((res, step))
    live = [e for e in entries if e[1] is not None]
    for i in range(rounds if live else 0):
        k = i % len(live)
        for res, step in live[k:] + live[:k]:
            t0 = time.perf_counter()
            step()
            _sync(device)
            res.times_s.append(time.perf_counter() - t0)
    for res, _ in live:
        res.median_s, res.min_s = statistics.median(res.times_s), min(res.times_s)
    return [res for res, _ in entries]


def paired_ratios(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """For results of interleaved rounds: at each (resolution, batch), every other model's
    latency over the first model's, the median of the per-round ratios (> 1: the first model is
    faster). Pairing by round makes the ratio robust to a drifting machine load."""
    out = []
    groups: dict[tuple[int, int], list[BenchResult]] = {}
    for r in _ok(results):
        groups.setdefault((r.resolution, r.batch), []).append(r)
    for (res, batch), rs in groups.items():
        ref = rs[0]
        for r in rs[1:]:
            n = min(len(r.times_s), len(ref.times_s))
            if n == 0:
                continue
            ratios = [a / b for a, b in zip(r.times_s[:n], ref.times_s[:n])]
            out.append(
                dict(
                    resolution=res, batch=batch, model=r.label, reference=ref.label,
                    ratio=statistics.median(ratios), rounds=n,
                )
            )  # fmt: skip
    return out


def _scan_backend(model_args: dict[str, Any], device: torch.device) -> str:
    """The scan backend a vmamba model uses: the one asked for, or what automatic selection
    picks for float32 inputs on ``device``."""
    import scanlib

    asked = model_args.get("scan_backend")
    if asked:
        return str(asked)
    t = torch.zeros(1, 2, 4, device=device)
    try:
        picked = scanlib.explain(t, t, torch.zeros(2, 1, device=device), t[:, :1], t[:, :1]).get(
            "selected"
        )
    except Exception:  # explain is informative only
        return "auto"
    return f"auto: {picked[0]}" if picked else "auto"


_RESULT_TAG = "VMAMBA_BENCH_RESULT "


def _run_isolated(spec: dict[str, Any], timeout: float | None) -> BenchResult:
    """Measure one configuration in a fresh Python process (honest peak memory on CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "vmamba.analysis._worker",
        json.dumps({**spec, "isolated": True}),
    ]
    env = dict(os.environ)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return _failed(spec, f"timed out after {timeout:g} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            d = json.loads(line[len(_RESULT_TAG) :])
            return BenchResult(**d)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [
        f"exit status {proc.returncode}"
    ]
    return _failed(spec, f"worker failed: {tail[0]}"[:300])


def _failed(spec: dict[str, Any], error: str) -> BenchResult:
    return BenchResult(
        model=spec["model"],
        label=spec["model"],
        device=spec["device"],
        mode="forward+backward" if spec["backward"] else "forward",
        dtype="",
        resolution=int(spec["resolution"]),
        batch=int(spec["batch"]),
        error=error,
    )


# ------------------------------------------------------------------------------------------------
# sweep, outputs


def run_throughput(
    models: Sequence[str] | None = None,
    *,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    batch_sizes: Sequence[int] = (1,),
    device: str = "auto",
    backward: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    amp: str = "auto",
    threads: int | None = None,
    isolate: bool | None = None,
    model_args: dict[str, Any] | None = None,
    out_csv: str | Path | None = "throughput.csv",
    out_png: str | Path | None = "throughput.png",
    timeout: float | None = None,
    scan_backends: Sequence[str | None] = (None,),
    rounds: int = 0,
) -> list[BenchResult]:
    """Measure every (model, resolution, batch size); write the CSV and the log-log plot.

    ``models``: specs as in :mod:`vmamba.analysis.common` (default: :func:`default_models`).
    ``isolate`` (default: on CPU) runs each configuration in a fresh process. ``model_args``
    go to vmamba models only. Each vmamba model is measured once per entry of
    ``scan_backends`` (None: automatic selection); its label names the backend it ran
    (``vmamba_tiny [numba]``). ``timeout`` bounds each isolated run. ``rounds`` > 0 runs every
    configuration in this process in interleaved rounds instead (:func:`_run_interleaved`;
    ``repeats`` and ``isolate`` are then unused, peak memory is not measured) and adds the
    paired ratios against the first model (:func:`paired_ratios`) to the JSON summary.
    """
    from ..data.errors import ConfigError
    from .common import _is_vmamba, check_model_spec, parse_model_spec, resolve_device

    models = list(models) if models else default_models()
    if not resolutions or any(int(r) < 32 for r in resolutions):
        raise ConfigError(f"resolutions must be >= 32, got {list(resolutions)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if amp not in ("auto", "none", "bf16", "fp16"):
        raise ConfigError(f"--amp {amp}: expected auto, none, bf16 or fp16")
    dev = resolve_device(device)
    if rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {rounds}")
    if isolate is None:
        isolate = dev.type == "cpu" and not rounds
    for name in models:
        check_model_spec(name)
    runs: list[tuple[str, dict[str, Any]]] = []
    for name in models:
        parsed = parse_model_spec(name)
        if parsed.name is None or _is_vmamba(parsed.name):  # a training checkpoint is vmamba too
            for backend in scan_backends or (None,):
                extra = {"scan_backend": backend} if backend else {}
                runs.append((name, {**(model_args or {}), **extra}))
        else:
            runs.append((name, {}))
    specs = [
        dict(
            model=name,
            model_args=spec_args,
            resolution=r,
            batch=b,
            device=str(dev),
            backward=backward,
            warmup=warmup,
            repeats=repeats,
            amp=amp,
            threads=threads,
        )
        for name, spec_args in runs
        for r in sorted(int(r) for r in resolutions)
        for b in sorted(int(b) for b in batch_sizes)
    ]
    if rounds:
        results = _run_interleaved(specs, rounds)
        for res in results:
            _log(res)
    else:
        results = []
        for spec in specs:
            results.append(_run_isolated(spec, timeout) if isolate else _run_one(spec))
            _log(results[-1])
    if out_csv is not None:
        write_csv(results, out_csv)
    if out_png is not None:
        plot_scaling(results, out_png)
    if out_csv is not None:
        summary = {
            "device": str(dev),
            "mode": "forward+backward" if backward else "forward",
            "threads": threads or torch.get_num_threads(),
            "torch": torch.__version__,
            "scaling": scaling_summary(results),
            **({"rounds": rounds, "paired_ratios": paired_ratios(results)} if rounds else {}),
            "runs": [{**r.row(), "times_s": r.times_s} for r in results],
        }
        Path(out_csv).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def _log(res: BenchResult) -> None:
    if res.error:
        logger.warning(
            "%s %dx%d batch %d: %s", res.model, res.resolution, res.resolution, res.batch,
            res.error,
        )  # fmt: skip
        return
    mem = f", peak +{res.peak_mem_mib:.0f} MiB" if res.peak_mem_mib is not None else ""
    logger.info(
        "%-30s %4dx%-4d batch %-3d %9.1f ms/image %8.2f images/s%s",
        res.label, res.resolution, res.resolution, res.batch, res.ms_per_image,
        res.images_per_s, mem,
    )  # fmt: skip


def write_csv(results: Sequence[BenchResult], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            row = r.row()
            for k, v in row.items():
                if isinstance(v, float):
                    row[k] = "" if math.isnan(v) else f"{v:.6g}"
                elif v is None:
                    row[k] = ""
            w.writerow(row)


def _ok(results: Sequence[BenchResult]) -> list[BenchResult]:
    return [r for r in results if not r.error and r.median_s > 0]


def scaling_summary(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """Per (model, batch): latency per image at the smallest and largest resolution measured,
    their ratio against the pixel-count ratio, and the log-log slope of a least-squares fit
    (1 = linear in the pixel count, 2 = quadratic)."""
    import numpy as np

    groups: dict[tuple[str, int], list[BenchResult]] = {}
    for r in _ok(results):
        groups.setdefault((r.label, r.batch), []).append(r)
    out = []
    for (label, batch), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.resolution)
        if len(rs) < 2:
            continue
        lo, hi = rs[0], rs[-1]
        px = np.log([r.pixels for r in rs])
        ms = np.log([r.ms_per_image for r in rs])
        slope = float(np.polyfit(px, ms, 1)[0])
        out.append(
            {
                "model": label,
                "batch": batch,
                "from": lo.resolution,
                "to": hi.resolution,
                "ms_per_image_from": lo.ms_per_image,
                "ms_per_image_to": hi.ms_per_image,
                "latency_ratio": hi.ms_per_image / lo.ms_per_image,
                "pixel_ratio": hi.pixels / lo.pixels,
                "loglog_slope": slope,
            }
        )
    return out


def plot_scaling(results: Sequence[BenchResult], path: str | Path, *, title: str = "") -> None:
    """Log-log plot of latency per image against the pixel count, one line per (model, batch),
    with slope-1 (linear) and slope-2 (quadratic) reference lines through the first model's
    smallest measurement."""
    from .common import require_matplotlib

    plt = require_matplotlib()
    ok = _ok(results)
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    labels = list(dict.fromkeys(r.label for r in ok))
    batches = sorted({r.batch for r in ok})
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        for j, b in enumerate(batches):
            rs = sorted(
                (r for r in ok if r.label == label and r.batch == b), key=lambda r: r.pixels
            )
            if not rs:
                continue
            ax.plot(
                [r.pixels for r in rs],
                [r.ms_per_image for r in rs],
                marker="o",
                linestyle=styles[j % len(styles)],
                color=colors[i % len(colors)],
                label=label if len(batches) == 1 else f"{label}, batch {b}",
            )
    if ok:
        anchor = min((r for r in ok if r.label == labels[0]), key=lambda r: (r.batch, r.pixels))
        x0 = anchor.pixels
        x1 = max(r.pixels for r in ok)
        xs = [x0, x1]
        y0 = anchor.ms_per_image
        ax.plot(
            xs,
            [y0, y0 * x1 / x0],
            color="0.45",
            linestyle=(0, (4, 3)),
            lw=1.2,
            label="∝ pixels (slope 1)",
        )
        ax.plot(
            xs,
            [y0, y0 * (x1 / x0) ** 2],
            color="0.2",
            linestyle=(0, (1, 2)),
            lw=1.4,
            label="∝ pixels² (slope 2)",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        res = sorted({r.resolution for r in ok})
        ax.set_xticks([r * r for r in res])
        ax.set_xticklabels([f"{r}²" for r in res])
        ax.minorticks_off()
        ax.set_ylim(min(r.ms_per_image for r in ok) / 1.5, max(r.ms_per_image for r in ok) * 2.5)
        dev = ok[0].device
        mode = ok[0].mode
        dtype = ok[0].dtype
        threads = f", {ok[0].threads} threads" if dev == "cpu" else ""
        ax.set_title(
            title or f"Latency per image vs pixel count ({dev}{threads}, {mode}, {dtype})",
            fontsize=10,
        )
    ax.set_xlabel("input pixels (H x W)")
    ax.set_ylabel("latency per image (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _worker_main(argv: Sequence[str]) -> int:
    """``python -m vmamba.analysis._worker JSON``: one isolated measurement, printed as a tagged
    JSON line on stdout."""
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m vmamba.analysis._worker JSON (internal)", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    res = _run_one(spec)
    print(_RESULT_TAG + json.dumps(asdict(res)), flush=True)
    return 0
