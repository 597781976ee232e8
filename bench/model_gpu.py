"""End-to-end GPU throughput: VMamba-T against timm's Swin-T in the paper's protocol.

    python bench/model_gpu.py [--batch 128] [--res 224] [--budget 180] [--table out.md]
                              [--json out.json] [--scan-backend NAME] [--cpu-smoke]

Per model (VMamba-T, ``swin_tiny_patch4_window7_224``, both untrained, nothing downloaded) and
per mode, on the current CUDA device:

* ``fwd fp32``: forward, float32, ``torch.inference_mode`` (the paper's throughput protocol);
* ``fwd bf16``: forward under ``torch.autocast(dtype=torch.bfloat16)``;
* ``train bf16``: one training step: forward under bf16 autocast, cross-entropy on random labels,
  backward, SGD step (momentum 0.9), ``zero_grad(set_to_none=True)``.

Reported: images/s (median of CUDA-event timings over ``--iters`` timed steps after two warm-up
steps), peak memory (``torch.cuda.max_memory_allocated`` during the model's first two timed
steps, above what stays allocated between steps: weights, input and optimizer state excluded,
activations, gradients and workspaces included), and
the ratios the targets are stated in: VMamba-T / Swin-T fp32 forward, VMamba-T bf16 forward /
Swin-T fp32 forward, VMamba-T / Swin-T bf16 training step.

The two models run alternately within each mode, so a change of clock or load hits both alike.
Every (model, mode) is guarded: an error (out of memory, a backend failing) is recorded and the
run goes on. First calls (kernel compilation, triton tuning, cuDNN autotuning) are warm-up.
Once ``--budget`` seconds have passed, what is left is marked skipped. TF32 stays at PyTorch's
defaults (printed); ``--tf32`` turns it on for matmuls and convolutions of both models.

``--cpu-smoke`` runs the same code on the CPU at a tiny size (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import scanlib
import vmamba

SWIN = "swin_tiny_patch4_window7_224"
MODES = ("fwd fp32", "fwd bf16", "train bf16")
DEADLINE = [float("inf")]
DEV = ["cuda"]


def log(*a) -> None:
    print(*a, flush=True)


def sync() -> None:
    if DEV[0] == "cuda":
        torch.cuda.synchronize()


def over_budget() -> bool:
    return time.monotonic() > DEADLINE[0]


def build(name: str, scan_backend: str | None, num_classes: int, res: int) -> torch.nn.Module:
    if name.startswith("vmamba"):
        kw = {"scan_backend": scan_backend} if scan_backend else {}
        return vmamba.create_model(name, num_classes=num_classes, **kw)
    import timm

    kw = {} if res == 224 else {"img_size": res}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)


class Runner:
    """One (model, mode): a step function, its warm-up, timings and peak memory."""

    def __init__(self, name: str, model: torch.nn.Module, mode: str, x: torch.Tensor, ncls: int):
        self.name, self.model, self.mode, self.x = name, model, mode, x
        self.times_ms: list[float] = []
        self.error = ""
        self.peak_mib: float | None = None
        self.first_call_s: float | None = None
        self.opt = None
        self.labels = torch.randint(0, ncls, (x.shape[0],), device=x.device)
        self.base = 0

    def step(self) -> None:
        amp = self.mode.endswith("bf16")
        with torch.autocast(DEV[0], dtype=torch.bfloat16, enabled=amp):
            if self.mode.startswith("train"):
                loss = F.cross_entropy(self.model(self.x).float(), self.labels)
            else:
                with torch.inference_mode():
                    self.model(self.x)
                return
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def prepare(self) -> None:
        training = self.mode.startswith("train")
        self.model.train(training)
        if training:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        if DEV[0] == "cuda":
            torch.cuda.empty_cache()
        t0 = time.monotonic()
        self.step()  # first call: compilation, tuning (cuDNN's too: its workspaces are not counted)
        sync()
        self.first_call_s = time.monotonic() - t0
        self.step()
        sync()
        # what stays allocated between steps (weights, input, momentum buffers) is the base
        if DEV[0] == "cuda":
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def timed(self) -> None:
        if DEV[0] == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self.step()
            end.record()
            end.synchronize()
            self.times_ms.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            self.step()
            self.times_ms.append((time.perf_counter() - t) * 1e3)

    def record_peak(self) -> None:
        if DEV[0] == "cuda" and not self.error:
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20

    def release(self) -> None:
        self.opt = None
        self.model.zero_grad(set_to_none=True)

    @property
    def images_per_s(self) -> float | None:
        if not self.times_ms:
            return None
        return self.x.shape[0] / (statistics.median(self.times_ms) * 1e-3)


def fail(r: Runner, e: BaseException) -> None:
    r.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    log(f"  {r.name} {r.mode}: {r.error}")
    if not isinstance(e, torch.cuda.OutOfMemoryError):
        traceback.print_exc(limit=3)
    r.release()
    if DEV[0] == "cuda":
        torch.cuda.empty_cache()


def run_mode(mode: str, models: dict, x: torch.Tensor, args) -> list[Runner]:
    runners = [Runner(n, m, mode, x, args.num_classes) for n, m in models.items()]
    for r in runners:
        if over_budget():
            r.error = "skipped: time budget spent"
            continue
        try:
            r.prepare()
            # peak memory is read after each model's own steps, before the other model runs
            for _ in range(2):
                r.timed()
            r.record_peak()
        except Exception as e:  # OOM, a backend failing: record it and go on
            fail(r, e)
    live = [r for r in runners if not r.error]
    # alternate the models: A, B, A, B, ... (after the two timed steps each already has)
    for i in range(max(0, args.iters - 2)):
        if over_budget():
            break
        for r in live if i % 2 == 0 else live[::-1]:
            if r.error:
                continue
            try:
                r.timed()
            except Exception as e:
                fail(r, e)
    for r in runners:
        r.release()
        ips = r.images_per_s
        mem = f"{r.peak_mib:8.0f} MiB" if r.peak_mib is not None else "       - MiB"
        what = f"{ips:9.1f} images/s" if ips else r.error
        log(f"  {mode:10s} {r.name:30s} {what} {mem} ({len(r.times_ms)} timed steps)")
    return runners


def ratio(a: Runner | None, b: Runner | None) -> float | None:
    if a is None or b is None or not a.images_per_s or not b.images_per_s:
        return None
    return a.images_per_s / b.images_per_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--iters", type=int, default=12, help="timed steps per (model, mode)")
    ap.add_argument("--budget", type=float, default=180.0, help="seconds; then stop measuring")
    ap.add_argument("--vmamba", default="vmamba_tiny")
    ap.add_argument("--scan-backend", default=None, help="VMamba's scan backend (default: auto)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--table", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write every timing here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU (no GPU)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    DEADLINE[0] = t_start + args.budget
    if args.cpu_smoke:
        DEV[0] = "cpu"
        args.batch, args.res, args.iters = min(args.batch, 2), min(args.res, 64), min(args.iters, 3)
    elif not torch.cuda.is_available():
        log("no CUDA device: nothing to measure (use --cpu-smoke to check the script on CPU)")
        return 2
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    dev = torch.device(DEV[0])
    name = torch.cuda.get_device_name() if DEV[0] == "cuda" else "cpu (smoke test)"
    log(
        f"device {name} | torch {torch.__version__} | batch {args.batch} at {args.res}x{args.res}"
        f" | TF32 matmul {torch.backends.cuda.matmul.allow_tf32}"
        f" conv {torch.backends.cudnn.allow_tf32}"
    )

    models: dict[str, torch.nn.Module] = {}
    info: dict[str, str] = {}
    for n in (args.vmamba, SWIN):
        try:
            models[n] = build(n, args.scan_backend, args.num_classes, args.res).to(dev)
        except Exception as e:
            info[n] = f"not built: {type(e).__name__}: {e}"[:200]
            log(f"{n}: {info[n]}")
    try:  # which scan backend VMamba's float32 / bf16 scans would get here
        for dt in (torch.float32, torch.bfloat16):
            t = torch.zeros(1, 4, 8, device=dev, dtype=dt)
            a = torch.zeros(4, 1, device=dev)
            sel = scanlib.explain(t, t, a, t[:, :1], t[:, :1]).get("selected", ["?"])[0]
            info[f"scan backend ({dt})"] = args.scan_backend or f"auto: {sel}"
    except Exception as e:
        info["scan backend"] = f"unknown ({type(e).__name__})"
    for k, v in info.items():
        log(f"{k}: {v}")
    x = torch.randn(args.batch, 3, args.res, args.res, device=dev)

    results: dict[str, dict[str, Runner]] = {}
    for mode in args.modes:
        log(f"=== {mode}")
        results[mode] = {r.name: r for r in run_mode(mode, models, x, args)}

    def get(mode: str, n: str) -> Runner | None:
        return results.get(mode, {}).get(n)

    v, s = args.vmamba, SWIN
    ratios = {
        "VMamba-T / Swin-T, fp32 forward (target >= 1.5; paper 1.36)": ratio(
            get("fwd fp32", v), get("fwd fp32", s)
        ),
        "VMamba-T bf16 forward / Swin-T fp32 forward (target >= 2)": ratio(
            get("fwd bf16", v), get("fwd fp32", s)
        ),
        "VMamba-T / Swin-T, bf16 forward": ratio(get("fwd bf16", v), get("fwd bf16", s)),
        "VMamba-T / Swin-T, bf16 training step (target >= 0.8; paper 0.58)": ratio(
            get("train bf16", v), get("train bf16", s)
        ),
    }
    lines = [
        f"End-to-end throughput on {name}, batch {args.batch}, {args.res}x{args.res} "
        f"(torch {torch.__version__}; {info.get(f'scan backend ({torch.bfloat16})', '')}):",
        "",
        "| mode | model | images/s | peak memory (MiB) | timed steps | first call (s) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, rs in results.items():
        for n, r in rs.items():
            ips = f"{r.images_per_s:.1f}" if r.images_per_s else (r.error or "-")
            mem = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
            first = f"{r.first_call_s:.1f}" if r.first_call_s is not None else "-"
            lines.append(f"| {mode} | {n} | {ips} | {mem} | {len(r.times_ms)} | {first} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for k, val in ratios.items():
        lines.append(f"| {k} | {f'{val:.2f}' if val is not None else '-'} |")
    table = "\n".join(lines)
    log("")
    log(table)
    log(f"\n({time.monotonic() - t_start:.0f} s)")
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")
    if args.json:
        out = {
            "device": name,
            "batch": args.batch,
            "res": args.res,
            "info": info,
            "ratios": ratios,
            "runs": [
                {
                    "mode": mode,
                    "model": n,
                    "images_per_s": r.images_per_s,
                    "times_ms": r.times_ms,
                    "peak_mem_mib": r.peak_mib,
                    "first_call_s": r.first_call_s,
                    "error": r.error,
                }
                for mode, rs in results.items()
                for n, r in rs.items()
            ],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
