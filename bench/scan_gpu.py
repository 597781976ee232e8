"""GPU benchmark: every GPU scan backend at VMamba-T's stage-1 shape, and the fused route ops.

    python bench/scan_gpu.py [--batch 128] [--dim 384] [--seqlen 3136] [--dstate 1] [--groups 4]
                             [--budget 330] [--table out.md] [--json out.json]

Measures, on the current CUDA device:

* the device copy bandwidth (``dst.copy_(src)`` of 1 GiB; bytes read + written per second);
* per scan backend that can run the shape (torch, triton, cupy, cuda... whichever load), with
  bf16 u/delta/B/C, fp32 A/D/delta_bias, softplus, grouped B/C and ``out_dtype=float32``:
  forward (no grad) and forward+backward (``torch.autograd.grad`` of every input) time, median of
  CUDA-event timings; the achieved bandwidth under a minimal-traffic model (below) as a share of
  the copy bandwidth; the speed-up over the torch backend; the forward's error against torch's;
* per backend implementing the route ops: ``cross_scan`` / ``cross_merge`` over "cross2d" at the
  matching map (C = D / 4, H = W = sqrt(L)), channels-first and channels-last.

Traffic model (bytes that must move at least once; E = B*D*L): forward reads u and delta (2 B
each) and writes out (4 B): 8 E (+ B and C, 4 * B*G*N*L); forward+backward adds the backward's
reads of u, delta, dout (fp32) and writes of du, ddelta (bf16): 20 E (+ 8 * B*G*N*L). cross_scan
reads the map once and writes K copies; cross_merge the reverse.

Every measurement is guarded: a backend that fails prints its error and the run goes on. First
calls (kernel compilation, the triton backend's tuning) are warm-up and are not timed. The run
stops measuring once ``--budget`` seconds have passed, marking what is left as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback

import torch

import scanlib
from scanlib.inputs import ScanInputs

DEADLINE = [float("inf")]
#: "cuda"; "cpu" only for --cpu-smoke (checks this script's logic at tiny sizes, no GPU)
DEV = ["cuda"]


def log(*a) -> None:
    print(*a, flush=True)


def time_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` by CUDA events, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    for i in range(reps):
        if DEV[0] == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if i == 1 and times[-1] > 250.0:  # slow: a few samples are enough
            reps = min(reps, 3)
        if i + 1 >= reps:
            break
    return statistics.median(times)


def sync() -> None:
    if DEV[0] == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEV[0] == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEV[0])
    dst = torch.empty_like(src)
    src.fill_(1)
    ms = time_ms(lambda src=src, dst=dst: dst.copy_(src), reps=20, warmup=3)
    del src, dst
    empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def make_inputs(b: int, d: int, L: int, n: int, g: int, seed: int = 0) -> dict:
    dev = DEV[0]
    gen = torch.Generator(device=dev).manual_seed(seed)
    bf = torch.bfloat16

    def rnd(*shape, dtype=bf, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, device=dev) * scale + shift).to(dtype)

    return dict(
        u=rnd(b, d, L),
        delta=rnd(b, d, L, scale=0.5, shift=-1.0),
        A=-torch.exp(torch.rand(d, n, generator=gen, device=dev) * 2.0 - 1.0),
        B=rnd(b, g, n, L),
        C=rnd(b, g, n, L),
        D=rnd(d, dtype=torch.float32),
        delta_bias=rnd(d, dtype=torch.float32, scale=0.1),
        delta_softplus=True,
        out_dtype=torch.float32,
    )


def scan_bytes(b, d, L, n, g, backward: bool) -> int:
    e = b * d * L
    bc = b * g * n * L
    return (20 * e + 8 * bc) if backward else (8 * e + 4 * bc)


def gpu_scan_backends(kw: dict) -> tuple[list[str], dict[str, str]]:
    """Backends that can run ``kw`` here (in priority order) and why the others cannot."""
    inputs = ScanInputs(**kw)
    ok, declined = [], {}
    for name in scanlib.registered_backends():
        if name == "reference":
            continue
        try:
            reasons = scanlib.get_backend(name).not_supported_reasons(inputs)
        except Exception as e:
            reasons = [f"{type(e).__name__}: {e}"]
        if reasons:
            declined[name] = "; ".join(reasons)
        else:
            ok.append(name)
    if "torch" in ok:  # measured first: the others are compared with it
        ok.remove("torch")
        ok.insert(0, "torch")
    return ok, declined


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def over_budget() -> bool:
    return time.monotonic() > DEADLINE[0]


def bench_scan(args, rows: list[dict], copy_bw: float) -> None:
    b, d, L, n, g = args.batch, args.dim, args.seqlen, args.dstate, args.groups
    kw = make_inputs(b, d, L, n, g)
    names, declined = gpu_scan_backends(kw)
    for name, why in declined.items():
        if name in ("numba", "cuda-emulation"):  # CPU backends: not part of a GPU table
            continue
        rows.append(dict(op="scan", backend=name, note=f"declines: {why}"[:160]))
    grad_names = ["u", "delta", "A", "B", "C", "D", "delta_bias"]
    ref_out = None
    torch_ms = {}
    for name in names:
        for phase in ("fwd", "fwd+bwd"):
            row = dict(op=f"scan {phase}", backend=name)
            rows.append(row)
            if over_budget():
                row["note"] = "skipped: time budget spent"
                continue
            try:
                t0 = time.monotonic()
                if phase == "fwd":

                    def fn(name=name, kw=kw):
                        with torch.no_grad():
                            return scanlib.selective_scan(**kw, backend=name)

                    out = fn()  # first call: compile / tune
                    if ref_out is None:
                        ref_out = out
                    else:
                        row["err_vs_torch"] = rel_err(out, ref_out)
                    del out
                else:
                    leaves = {k: kw[k].detach().requires_grad_(True) for k in grad_names}
                    gkw = {**kw, **leaves}
                    dout = torch.randn(b, d, L, device=DEV[0])

                    def fn(name=name, gkw=gkw, leaves=leaves, dout=dout):
                        out = scanlib.selective_scan(**gkw, backend=name)
                        return torch.autograd.grad(out, list(leaves.values()), dout)

                    fn()
                sync()
                row["first_call_s"] = time.monotonic() - t0
                ms = time_ms(fn)
                nbytes = scan_bytes(b, d, L, n, g, phase != "fwd")
                row.update(
                    ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9, of_copy=nbytes / (ms * 1e-3) / copy_bw
                )
                if name == "torch":
                    torch_ms[phase] = ms
                elif phase in torch_ms:
                    row["vs_torch"] = torch_ms[phase] / ms
            except Exception as e:
                row["note"] = f"FAILED {type(e).__name__}: {e}"[:300]
                log(f"[scan {phase} {name}] failed:\n{traceback.format_exc()}")
            finally:
                empty_cache()
            log(f"  {row}")
    del kw, ref_out
    empty_cache()


def bench_routes(args, rows: list[dict], copy_bw: float) -> None:
    from scanlib.routes import RouteInputs, get_route_set

    rs = get_route_set("cross2d")
    K = len(rs)
    H = W = int(round(math.sqrt(args.seqlen)))
    C = args.dim // K
    b = args.batch
    x_cf = torch.randn(b, C, H, W, device=DEV[0]).to(torch.bfloat16)
    x_cl = x_cf.permute(0, 2, 3, 1).contiguous()
    y = torch.randn(b, K, C, H * W, device=DEV[0]).to(torch.bfloat16)
    es = 2
    map_bytes = b * C * H * W * es
    seq_bytes = b * K * C * H * W * es
    probe = RouteInputs.for_scan(x_cf, rs)
    names = []
    for name in scanlib.registered_backends():
        try:
            be = scanlib.get_backend(name)
        except Exception:
            continue
        if "cross_scan" in be.ops and not be.not_supported_reasons(probe) and name != "reference":
            names.append(name)
    if "torch" in names:
        names.remove("torch")
        names.insert(0, "torch")
    ref = {}
    torch_ms = {}
    for op in ("cross_scan", "cross_merge"):
        for cl in (False, True):
            label = f"{op} {'channels_last' if cl else 'channels_first'}"
            for name in names:
                row = dict(op=label, backend=name)
                rows.append(row)
                if over_budget():
                    row["note"] = "skipped: time budget spent"
                    continue
                try:
                    if op == "cross_scan":
                        x = x_cl if cl else x_cf

                        def fn(x=x, cl=cl, name=name):
                            return scanlib.cross_scan(x, rs, channels_last=cl, backend=name)

                    else:

                        def fn(cl=cl, name=name, y=y):
                            return scanlib.cross_merge(y, rs, H, W, channels_last=cl, backend=name)

                    with torch.no_grad():
                        out = fn()
                        if label not in ref:
                            ref[label] = out
                        else:
                            row["err_vs_torch"] = rel_err(out, ref[label])
                        del out
                        ms = time_ms(fn)
                    nbytes = map_bytes + seq_bytes
                    row.update(
                        ms=ms,
                        gbps=nbytes / (ms * 1e-3) / 1e9,
                        of_copy=nbytes / (ms * 1e-3) / copy_bw,
                    )
                    if name == "torch":
                        torch_ms[label] = ms
                    elif label in torch_ms:
                        row["vs_torch"] = torch_ms[label] / ms
                except Exception as e:
                    row["note"] = f"FAILED {type(e).__name__}: {e}"[:300]
                    log(f"[{label} {name}] failed:\n{traceback.format_exc()}")
                log(f"  {row}")
    del x_cf, x_cl, y, ref
    empty_cache()


def fmt_table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| op | backend | time ms | GB/s | % of copy | x torch | err vs torch | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:

        def f(key, spec, r=r):
            v = r.get(key)
            return "" if v is None else format(v, spec)

        pct = "" if r.get("of_copy") is None else f"{100 * r['of_copy']:.0f}%"
        lines.append(
            f"| {r['op']} | {r['backend']} | {f('ms', '.3f')} | {f('gbps', '.0f')} | {pct} | "
            f"{f('vs_torch', '.2f')} | {f('err_vs_torch', '.1e')} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seqlen", type=int, default=3136)
    p.add_argument("--dstate", type=int, default=1)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument(
        "--budget", type=float, default=330.0, help="seconds; later measurements are skipped"
    )
    p.add_argument("--skip-routes", action="store_true")
    p.add_argument("--table", help="also write the markdown table here")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every code path on CPU tensors at a tiny size (checks the script, measures nothing)",
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        DEV[0] = "cpu"
        args.batch, args.dim, args.seqlen = 2, 8, 16
    elif not torch.cuda.is_available():
        print(
            "no CUDA device: nothing to measure (--cpu-smoke checks the script on CPU)",
            file=sys.stderr,
        )
        return 2
    DEADLINE[0] = time.monotonic() + args.budget
    t_start = time.monotonic()
    dev = torch.cuda.get_device_name() if DEV[0] == "cuda" else "cpu (smoke run)"
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except Exception:
        pass
    log(f"device: {dev}; {versions}")
    copy_bw = copy_bandwidth(1 << 30 if DEV[0] == "cuda" else 1 << 20)
    log(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    rows: list[dict] = []
    for section in (bench_scan, None if args.skip_routes else bench_routes):
        if section is None:
            continue
        try:
            section(args, rows, copy_bw)
        except Exception as e:  # a broken section must not hide the others' numbers
            rows.append(
                dict(op=section.__name__, backend="-", note=f"FAILED {type(e).__name__}: {e}"[:300])
            )
            log(traceback.format_exc())
    header = (
        f"GPU check on {dev} ({versions}); copy bandwidth {copy_bw / 1e9:.0f} GB/s.\n"
        f"scan: [B={args.batch}, D={args.dim}, L={args.seqlen}, N={args.dstate}, G={args.groups}] bf16 in, "
        f"fp32 out, softplus + delta_bias + D; routes: cross2d, map [B={args.batch}, "
        f"C={args.dim // 4}, {int(round(math.sqrt(args.seqlen)))}x{int(round(math.sqrt(args.seqlen)))}] bf16. "
        f"Targets: scan fwd >= 60% of copy, cross_scan >= 70%. ({time.monotonic() - t_start:.0f} s)"
    )
    table = fmt_table(rows, header)
    if args.table:
        with open(args.table, "w") as fh:
            fh.write(table + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "device": dev,
                    "versions": versions,
                    "copy_bw": copy_bw,
                    "args": vars(args),
                    "rows": rows,
                },
                fh,
                indent=1,
            )
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
