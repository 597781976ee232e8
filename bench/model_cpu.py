"""End-to-end CPU latency: VMamba-T against timm's Swin-T, interleaved, in one process.

    python bench/model_cpu.py                       # batch 1 and 8 at 224, 2 threads
    python bench/model_cpu.py --scaling             # + VMamba-T at 224, 384, 512, 768 (batch 1)
    python bench/model_cpu.py --json out.json       # also write every timing
    python bench/model_cpu.py --stages --batches 1  # + where each model's time goes, per part

Forward only, float32, ``torch.inference_mode``, ``torch.set_num_threads(--threads)``. Each
round runs every (model, batch) configuration once, in a rotating order, so a change in the load
of a shared machine hits all of them alike; medians over the rounds are reported, with the
median of the per-round Swin/VMamba ratios (paired, so robust to drifting load). Besides the
wall clock the process CPU time is recorded: on an oversubscribed machine it tracks the work
done much more steadily than the wall clock (at 2 threads it also counts spin-waits).

``--stages`` also times the parts of both models in the same rounds (forward hooks: the stem, the
blocks and the downsampling of each stage, and inside the blocks the MLPs and the token mixers,
SS2D or window attention), so the per-block costs of the two architectures can be compared.

numba compiles its kernels on the first call in a process (seconds with a cold cache): every
model runs once untimed first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import scanlib
import vmamba

SWIN = "swin_tiny_patch4_window7_224"


def build(name: str, res: int, backend: str | None) -> torch.nn.Module:
    if name.startswith("vmamba"):
        kw = {"scan_backend": backend} if backend else {}
        return vmamba.create_model(name, **kw).eval()
    import timm

    kw = {} if res == 224 else {"img_size": res}
    return timm.create_model(name, pretrained=False, **kw).eval()


#: the token mixers ``--stages`` times inside each block: attribute -> label. VMamba (VSSM) and
#: timm's Swin share the rest of the structure: ``patch_embed``, ``layers[i].blocks`` (each with
#: ``.mlp``) and ``layers[i].downsample`` (VMamba downsamples after a stage, Swin before it)
MIXERS = {"op": "SS2D", "attn": "window attention"}


class PartTimer:
    """Wall time of a model's parts per forward, from forward pre-/post-hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.now: dict[str, float] = {}
        self.rounds: dict[tuple, list[dict[str, float]]] = {}  # per configuration
        self.blocks: dict[str, int] = {}
        self._start: dict[int, float] = {}
        self._hook(model.patch_embed, "stem")
        for i, layer in enumerate(model.layers):
            self._hook(layer.blocks, f"stage {i + 1} blocks")
            self.blocks[f"stage {i + 1} blocks"] = len(layer.blocks)
            if not isinstance(layer.downsample, torch.nn.Identity):
                self._hook(layer.downsample, "downsampling")
            for blk in layer.blocks:
                self._hook(blk.mlp, "  MLPs")
                for attr, label in MIXERS.items():
                    if hasattr(blk, attr):
                        self._hook(getattr(blk, attr), f"  token mixers ({label})")

    def _hook(self, mod: torch.nn.Module, label: str) -> None:
        key = id(mod)

        def pre(m, a) -> None:  # noqa: ANN001
            self._start[key] = time.perf_counter()

        def post(m, a, o) -> None:  # noqa: ANN001
            self.now[label] = self.now.get(label, 0.0) + time.perf_counter() - self._start[key]

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)

    def begin(self) -> None:
        self.now = {}

    def end(self, config: tuple, total: float) -> None:
        self.rounds.setdefault(config, []).append({**self.now, "total": total})

    def medians(self, config: tuple) -> dict[str, float]:
        rounds = self.rounds[config]
        keys = dict.fromkeys(k for r in rounds for k in r)
        return {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in keys}


def print_parts(timers: dict[str, PartTimer], configs: dict[str, tuple], batch: int) -> dict:
    """Per-part medians (ms per image) of the models side by side; returns them for the JSON."""
    names = list(timers)
    meds = {n: timers[n].medians(configs[n]) for n in names}
    labels = list(dict.fromkeys(k for n in names for k in meds[n] if k != "total"))
    order = sorted(labels, key=lambda k: (k.startswith("  "), k))  # parts, then inside blocks
    print(f"\nwhere the time goes, batch {batch} (ms per image, median of rounds; hooks)")
    head = "".join(f" {n[:22]:>22s}" for n in names)
    print(f"{'part':36s}{head}")
    out: dict = {}
    for k in ["total", *order]:
        cells = []
        for n in names:
            v = meds[n].get(k)
            if v is None:
                cells.append(f" {'-':>22s}")
                continue
            nb = timers[n].blocks.get(k)
            per = f" ({nb} x {1e3 * v / batch / nb:.2f})" if nb else ""
            cells.append(f" {f'{1e3 * v / batch:.2f}{per}':>22s}")
            out.setdefault(n, {})[k.strip()] = 1e3 * v / batch
        print(f"{k:36s}{''.join(cells)}")
    return out


def time_once(
    model: torch.nn.Module, x: torch.Tensor, parts: PartTimer | None = None, config: tuple = ()
) -> tuple[float, float]:
    if parts is not None:
        parts.begin()
    c0, w0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        model(x)
    w, c = time.perf_counter() - w0, time.process_time() - c0
    if parts is not None:
        parts.end(config, w)
    return w, c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backend", default=None, help="scan backend of VMamba (default: automatic)")
    ap.add_argument("--vmamba", default="vmamba_tiny")
    ap.add_argument("--no-swin", action="store_true")
    ap.add_argument("--scaling", action="store_true", help="VMamba at 224..768, batch 1")
    ap.add_argument("--scaling-res", type=int, nargs="+", default=[224, 384, 512, 768])
    ap.add_argument("--stages", action="store_true", help="time the parts of both models")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    configs: list[tuple[str, int, int]] = []  # (model, resolution, batch)
    for b in args.batches:
        configs.append((args.vmamba, 224, b))
        if not args.no_swin:
            configs.append((SWIN, 224, b))
    if args.scaling:
        for r in args.scaling_res:
            if (args.vmamba, r, 1) not in configs:
                configs.append((args.vmamba, r, 1))
    models = {}
    inputs = {}
    for name, res, b in configs:
        if (name, res) not in models:
            models[name, res] = build(name, res, args.backend)
        inputs[name, res, b] = torch.randn(b, 3, res, res)
    picked = "n/a"
    for name, res, b in configs:  # warm: numba compile/cache load, oneDNN primitive caches
        time_once(models[name, res], inputs[name, res, b])
    if args.backend is None:
        t = torch.zeros(1, 4, 8)
        picked = scanlib.explain(t, t, torch.zeros(4, 1), t[:, :1], t[:, :1])["selected"][0]
    # per-part timers of the 224 models (hooks added after the warm-up)
    parts: dict[str, PartTimer] = {}
    if args.stages:
        parts = {n: PartTimer(models[n, r]) for n, r, _ in configs if r == 224}
    print(
        f"torch {torch.__version__}, {args.threads} threads, VMamba scan backend "
        f"{args.backend or 'auto: ' + picked}, {args.rounds} rounds",
        flush=True,
    )

    wall: dict[tuple, list[float]] = {c: [] for c in configs}
    cpu: dict[tuple, list[float]] = {c: [] for c in configs}
    for i in range(args.rounds):
        k = i % len(configs)
        for c in configs[k:] + configs[:k]:  # rotate the order between rounds
            timer = parts.get(c[0]) if c[1] == 224 else None
            w, p = time_once(models[c[0], c[1]], inputs[c], timer, c)
            wall[c].append(w)
            cpu[c].append(p)
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print(f"\n{'model':30s} {'res':>4s} {'batch':>5s} {'ms/img wall':>12s} {'ms/img CPU':>11s}")
    for c in configs:
        name, res, b = c
        print(
            f"{name:30s} {res:4d} {b:5d} {1e3 * med(wall[c]) / b:12.1f} "
            f"{1e3 * med(cpu[c]) / b:11.1f}"
        )
    summary: dict = {"threads": args.threads, "backend": args.backend or f"auto: {picked}"}
    if not args.no_swin:
        print("\nSwin-T / VMamba-T latency (>1: VMamba faster); median of per-round ratios")
        for b in args.batches:
            v, s = (args.vmamba, 224, b), (SWIN, 224, b)
            rw = med([sw / vw for sw, vw in zip(wall[s], wall[v])])
            rc = med([sc / vc for sc, vc in zip(cpu[s], cpu[v])])
            print(f"  batch {b}: wall {rw:.2f}x, CPU {rc:.2f}x")
            summary[f"swin_over_vmamba_b{b}"] = {"wall": rw, "cpu": rc}
    if parts:
        summary["parts"] = {}
        for b in args.batches:
            cfgs = {n: (n, 224, b) for n in parts}
            summary["parts"][f"b{b}"] = print_parts(parts, cfgs, b)
    if args.scaling:
        base = (args.vmamba, 224, 1)
        print("\nVMamba-T latency growth from 224 (batch 1) vs pixel-count growth")
        for r in args.scaling_res:
            c = (args.vmamba, r, 1)
            gw = med([a / b for a, b in zip(wall[c], wall[base])])
            gc = med([a / b for a, b in zip(cpu[c], cpu[base])])
            px = r * r / 224**2
            print(
                f"  {r}: wall {gw:.2f}x, CPU {gc:.2f}x, pixels {px:.2f}x "
                f"(CPU growth / pixel growth {gc / px:.2f})"
            )
            summary[f"growth_{r}"] = {"wall": gw, "cpu": gc, "pixels": px}
    if args.json:
        rows = [
            {"model": n, "res": r, "batch": b, "wall_s": wall[n, r, b], "cpu_s": cpu[n, r, b]}
            for n, r, b in configs
        ]
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
