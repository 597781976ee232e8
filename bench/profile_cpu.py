"""Where the time of a VMamba forward goes on CPU, per operator and per category.

    python bench/profile_cpu.py --backend numba --batch 1 [--threads 1] [--repeats 3]
    python bench/profile_cpu.py --model swin_tiny_patch4_window7_224   # a timm model
    python bench/profile_cpu.py --clock wall --threads 2      # wall clock, 2 threads
    python bench/profile_cpu.py --table                       # torch.profiler's operator table

``--clock cpu`` (default) times every aten op and every scanlib call with the process CPU clock
through a ``TorchDispatchMode``: on a shared, oversubscribed machine the wall clock mostly
measures waiting for a core, the CPU clock only the work (exact at 1 thread; at more threads it
also counts the threads' spin-waits: use ``--clock wall`` there, on a quiet machine). The total
is the median time of unprofiled forwards; the part the timed ops do not cover is reported as
the rest (Python, dispatch, backend selection; an estimate: profiled ops run a little slower).
Forward only, float32, ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import scanlib
import vmamba

# categories of aten ops outside the labelled calls (operator-name fragments, first match wins)
CATEGORIES = (
    ("GEMM: linear / matmul", ("addmm", "mm", "bmm", "matmul", "einsum", "linear")),
    ("layer norm", ("layer_norm", "batch_norm")),
    ("copy / cat / permute copies", ("copy_", "clone", "cat", "_to_copy", "contiguous")),
    ("gather", ("gather", "index")),
)
#: labelled Python-level calls: their aten ops are charged to them, and the rest of their time
#: (Python, backend selection, numba kernels) to "<label> (non-aten)"
LABELS = {
    "scanlib.selective_scan": "scan",
    "scanlib.cross_scan": "cross_scan",
    "scanlib.cross_merge": "cross_merge",
    "numba kernel": "numba kernel",
    "SS2D.scan": "SS2D scan path (projections, glue)",
}


def category(name: str, shapes: tuple) -> str:
    n = name.lower()
    if "conv" in n:  # 1x1 convolutions are GEMMs; the rest: stem, downsampling, depthwise
        w = shapes[1] if len(shapes) > 1 else ()
        return "GEMM: linear / matmul" if tuple(w[2:]) == (1, 1) else "conv 3x3 / depthwise"
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "elementwise / reductions"


#: the clock the dispatch-mode profiler reads: process CPU time (``--clock cpu``) or wall time
#: (``--clock wall``; with several threads the CPU clock also counts spin-waits)
CLOCK = [time.process_time]


class CPUClock(TorchDispatchMode):
    """Process CPU time of each aten op, keyed (innermost label/op, input shapes), and the self
    time of labelled calls (time in them outside aten ops and nested labels).

    The mode's own bookkeeping is timed and kept out of every figure; its fixed cost per op
    (entering Python) is calibrated on tiny ops and subtracted from the labels' self time."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[tuple[str, tuple], list[float]] = collections.defaultdict(lambda: [0.0, 0])
        self.labels: dict[str, float] = collections.defaultdict(float)
        self.label_ops: dict[str, int] = collections.defaultdict(int)
        self.stack: list[list] = []  # [label, start, time inside (ops, nested labels, bookkeeping)]
        self.per_op_cost = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = CLOCK[0]()
        out = func(*args, **(kwargs or {}))
        t1 = CLOCK[0]()
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        lab = self.stack[-1][0] if self.stack else ""
        rec = self.ops[lab, func.overloadpacket.__name__, shapes]
        rec[0] += t1 - t0
        rec[1] += 1
        if self.stack:
            self.label_ops[lab] += 1
            self.stack[-1][2] += CLOCK[0]() - t0
        return out

    def label(self, fn, label: str):
        def wrapped(*args, **kwargs):
            self.stack.append([label, CLOCK[0](), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                lab, t0, inner = self.stack.pop()
                total = CLOCK[0]() - t0
                self.labels[lab] += total - inner
                if self.stack:
                    self.stack[-1][2] += total

        return wrapped

    def calibrate(self, n: int = 2000) -> None:
        """The mode's untimed cost per op: tiny ops, mode on vs off."""
        a = torch.zeros(1)
        with self:  # the first entry of a dispatch mode has a one-time cost
            torch.add(a, a)
        saved = (self.ops, self.stack)
        self.ops, self.stack = collections.defaultdict(lambda: [0.0, 0]), [["cal", 0.0, 0.0]]
        t = CLOCK[0]()
        with self:
            for _ in range(n):
                torch.add(a, a)
        moded = CLOCK[0]() - t - self.stack[0][2]  # minus the timed part
        self.ops, self.stack = saved
        self.per_op_cost = max(0.0, moded / n)


def run_cpu_clock(model, x, args) -> None:
    clock = CPUClock()
    patches = [
        (scanlib, n, f"scanlib.{n}") for n in ("selective_scan", "cross_scan", "cross_merge")
    ]
    patches.append((vmamba.layers.SS2D, "scan", "SS2D.scan"))
    if args.backend == "numba":
        from scanlib_backends.numba import _run

        patches.append((_run.K, "scan_fwd", "numba kernel"))
    originals = [(obj, n, getattr(obj, n)) for obj, n, _ in patches]
    plain = []  # unprofiled forwards: the real time
    for _ in range(args.repeats):
        c0 = CLOCK[0]()
        model(x)
        plain.append(CLOCK[0]() - c0)
    clock.calibrate()
    for obj, n, lab in patches:
        setattr(obj, n, clock.label(getattr(obj, n), lab))
    try:
        with clock:
            for _ in range(args.repeats):
                model(x)
    finally:
        for obj, n, fn in originals:
            setattr(obj, n, fn)
    r = args.repeats
    rows = sorted(clock.ops.items(), key=lambda kv: -kv[1][0])
    print(f"{'[label/]op':44s} {'input shapes':70s} {'ms':>8s} {'calls':>6s}")
    for (lab, name, shapes), (t, n) in rows[: args.rows]:
        shp = str([list(s) for s in shapes])[:70]
        key = f"{lab}/{name}" if lab else name
        print(f"{key[:44]:44s} {shp:70s} {1e3 * t / r:8.2f} {n // r:6d}")
    cats: dict[str, float] = collections.defaultdict(float)
    for (lab, name, shapes), (t, _) in clock.ops.items():
        cats[f"{LABELS[lab]}: aten ops" if lab else category(name, shapes)] += t
    for lab, t in clock.labels.items():
        own = t - clock.label_ops[lab] * clock.per_op_cost
        kind = "kernel" if lab == "numba kernel" else "Python, selection"
        cats[f"{LABELS[lab]}: {kind}"] += max(0.0, own)
    # the figures are sums over r profiled forwards; the total is the median unprofiled one
    cpu = statistics.median(plain) * r
    rest = cpu - sum(cats.values())
    print(
        f"\n{args.model} {args.res}x{args.res} batch {args.batch}, backend {args.backend}, "
        f"{args.threads} threads: {1e3 * cpu / r:.1f} ms {args.clock} per forward (median of {r} "
        f"unprofiled forwards; ops timed in {r} more; profiler cost "
        f"{1e6 * clock.per_op_cost:.0f} us/op subtracted)"
    )
    for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:44s} {1e3 * t / r:9.1f} ms  {100 * t / cpu:5.1f} %")
    print(
        f"  {'rest: module calls, Python between ops':44s} {1e3 * rest / r:9.1f} ms  "
        f"{100 * rest / cpu:5.1f} %  (negative: profiled ops ran slower than unprofiled)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--model", default="vmamba_tiny")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--table", action="store_true", help="torch.profiler's operator table instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model.startswith("vmamba"):
        model = vmamba.create_model(args.model).eval()
    else:  # a timm model for comparison (untrained, nothing downloaded)
        import timm

        model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, args.res, args.res)
    with scanlib.use_backend(args.backend), torch.inference_mode():
        model(x)  # warm: numba compilation / cache load, oneDNN primitives
        if args.table:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(args.repeats):
                    model(x)
            table = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=args.rows, max_shapes_column_width=70
            )
            print(table)
        else:
            CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
            run_cpu_clock(model, x, args)


if __name__ == "__main__":
    main()
