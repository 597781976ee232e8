"""CPU selective-scan benchmark: every CPU backend at VMamba's shapes, forward and forward+backward.

    python bench/scan_cpu.py                 # full run (the reference's fwd+bwd takes minutes)
    python bench/scan_cpu.py --quick         # skip the reference's forward+backward
    python bench/scan_cpu.py --repeats 9 --backends torch,numba

One process, torch on 2 threads (numba uses its default, one thread per core). Times are medians
of ``--repeats`` runs after one warm-up run (which also compiles numba's kernels or loads them
from the cache; its time is printed). Calls look like VMamba's SS2D: float32, grouped B/C, D skip,
delta_bias with softplus, no z.

The memory-traffic floor is the forward's compulsory traffic (read u, delta, B, C once, write out
once) divided by the copy bandwidth measured here with a large ``numpy.copyto`` (read + write).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import scanlib

SHAPES = [  # B, D, L, N, G
    (8, 384, 3136, 1, 4),
    (2, 768, 3136, 16, 4),
]


def make_inputs(B: int, D: int, L: int, N: int, G: int, grad: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        u=torch.randn(B, D, L, generator=g),
        delta=torch.randn(B, D, L, generator=g) - 1.0,
        A=-torch.exp(torch.rand(D, N, generator=g) * 2.0),
        B=torch.randn(B, G, N, L, generator=g),
        C=torch.randn(B, G, N, L, generator=g),
        D=torch.randn(D, generator=g),
        delta_bias=torch.rand(D, generator=g) - 0.5,
    )
    if grad:
        for v in kw.values():
            v.requires_grad_(True)
    return dict(kw, delta_softplus=True)


def run_once(backend: str, kw: dict, grad: bool, dout: torch.Tensor | None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds: every thread's work, contention does not inflate it)."""
    t = time.perf_counter()
    c = time.process_time()
    if grad:
        out = scanlib.selective_scan(**kw, backend=backend)
        out.backward(dout)
        for v in kw.values():
            if isinstance(v, torch.Tensor):
                v.grad = None
    else:
        with torch.no_grad():
            scanlib.selective_scan(**kw, backend=backend)
    return time.perf_counter() - t, time.process_time() - c


def bench(backend: str, shape, grad: bool, repeats: int) -> tuple[float, float, float]:
    """(median wall seconds, median CPU seconds, first-call wall seconds)."""
    kw = make_inputs(*shape, grad=grad)
    dout = torch.randn(shape[0], shape[1], shape[2]) if grad else None
    first = run_once(backend, kw, grad, dout)[0]
    times = [run_once(backend, kw, grad, dout) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times), first


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 7) -> float:
    """Bytes per second moved (read + write) by numpy.copyto on a large float32 array."""
    src = np.ones(nbytes // 8, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(best)


def floor_bytes(B: int, D: int, L: int, N: int, G: int, itemsize: int = 4) -> int:
    """Forward traffic that no kernel avoids: read u, delta, B, C; write out (params are tiny)."""
    return itemsize * (3 * B * D * L + 2 * B * G * N * L + D * N + 2 * D)


def cpu_backends() -> list[str]:
    kw = make_inputs(1, 4, 8, 1, 1, grad=True)
    inputs = scanlib.scan_inputs(**kw)
    names = []
    for name in ("reference", "torch", "numba"):
        try:
            if not scanlib.get_backend(name).not_supported_reasons(inputs):
                names.append(name)
        except Exception:  # noqa: BLE001 - a backend that fails to load is just not benchmarked
            pass
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    ap.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the slow reference")
    ap.add_argument("--quick", action="store_true", help="skip the reference's forward+backward")
    ap.add_argument(
        "--backends", default=None, help="comma-separated subset of reference,torch,numba"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    names = cpu_backends()
    if args.backends:
        names = [n for n in names if n in args.backends.split(",")]
    extra = ""
    try:
        import numba

        extra = f", numba {numba.__version__} ({numba.get_num_threads()} threads)"
    except ImportError:
        pass
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads){extra}; backends: {', '.join(names)}"
    )
    bw = copy_bandwidth()
    print(f"copy bandwidth (numpy.copyto, read+write): {bw / 1e9:.2f} GB/s")
    print()
    header = (
        f"{'shape [B, D, L, N, G]':22} {'pass':7} {'backend':9} {'wall ms':>9} {'cpu ms':>9} "
        f"{'first ms':>8} {'x ref':>6} {'x torch':>7} {'/floor':>6} | {'x ref':>6} {'x torch':>7}"
    )
    print(f"{'':71}wall clock | CPU time")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        floor = floor_bytes(*shape) / bw
        for grad in (False, True):
            wall: dict[str, float] = {}
            cpu: dict[str, float] = {}
            for name in names:
                if name == "reference" and grad and args.quick:
                    continue
                reps = args.ref_repeats if name == "reference" else args.repeats
                wall[name], cpu[name], first = bench(name, shape, grad, reps)

                def ratio(res: dict[str, float], base: str, width: int, name: str = name) -> str:
                    return (
                        f"{res[base] / res[name]:{width}.1f}" if base in res else f"{'-':>{width}}"
                    )

                flo = f"{wall[name] / floor:6.2f}" if not grad else f"{'':6}"
                print(
                    f"{str(list(shape)):22} {'fwd+bwd' if grad else 'fwd':7} {name:9} "
                    f"{wall[name] * 1e3:9.1f} {cpu[name] * 1e3:9.1f} {first * 1e3:8.0f} "
                    f"{ratio(wall, 'reference', 6)} {ratio(wall, 'torch', 7)} {flo} | "
                    f"{ratio(cpu, 'reference', 6)} {ratio(cpu, 'torch', 7)}",
                    flush=True,
                )
        mb = floor_bytes(*shape) / 1e6
        print(
            f"{'':22} memory floor: {mb:.1f} MB / {bw / 1e9:.2f} GB/s = {floor * 1e3:.1f} ms (forward)"
        )
    print(
        "\nx ref / x torch: speed-up over that backend (higher is faster); /floor: forward wall time"
        "\nover the memory floor; cpu ms: process CPU time of all threads (robust to a busy machine)"
    )


if __name__ == "__main__":
    main()
